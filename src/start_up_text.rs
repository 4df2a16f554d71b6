//! Gives back the monitor's start-up code once the VM runs. The binary's text and read-only
//! data are mapped by fault-around, 64 KiB at a time, so parsing arguments, building the VM
//! and restoring a snapshot leave most of them mapped in the process: ~2.2 MiB of Rss that a
//! running monitor does not touch again. Once the VM runs, dropping this process's mappings of
//! its read-only segments (the page cache keeps the pages, shared with every other monitor)
//! lets the running monitor fault back only what its event loop, vCPUs and devices use
//! (issue 19's memory goal).

use log::debug;

/// Drops this process's mappings of the executable's read-only load segments (not the pages:
/// they stay in the page cache). Safe at any time, from any thread: those segments are never
/// written (relocations go to the writable RELRO segment, which is left alone), so a later
/// access faults the same bytes back from the file.
pub fn release() {
    // SAFETY: the callback only reads the headers dl_iterate_phdr hands it, and
    // `drop_read_only_segments` is sound for any such headers (see there).
    unsafe { libc::dl_iterate_phdr(Some(drop_read_only_segments), std::ptr::null_mut()) };
}

/// dl_iterate_phdr's callback: the first object is the executable itself; its read-only
/// PT_LOAD segments are given back, and the walk stops there.
unsafe extern "C" fn drop_read_only_segments(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    _data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: sysconf only reads a constant of the system.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as usize,
        _ => return 1,
    };
    // SAFETY: dl_iterate_phdr passes a valid dl_phdr_info for the duration of the call.
    let info = unsafe { &*info };
    if info.dlpi_phdr.is_null() {
        return 1;
    }
    // SAFETY: dlpi_phdr points at dlpi_phnum program headers of the loaded object.
    let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
    for header in headers {
        if header.p_type != libc::PT_LOAD || header.p_flags & libc::PF_W != 0 {
            continue;
        }
        let start = info.dlpi_addr as usize + header.p_vaddr as usize;
        // Whole pages only inside the segment: a page shared with a writable neighbour stays.
        let first = start.div_ceil(page) * page;
        let end = (start + header.p_memsz as usize) / page * page;
        if end <= first {
            continue;
        }
        // SAFETY: [first, end) is whole pages of a read-only, never-written segment of this
        // executable; MADV_DONTNEED on them only drops page-table entries.
        let done =
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) };
        if done != 0 {
            debug!(
                "cannot drop the read-only segment at {first:#x}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    1
}
