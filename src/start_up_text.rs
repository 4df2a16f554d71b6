//! Gives back the monitor's start-up code once the VM runs. The binary's text and read-only
//! data are mapped by fault-around, 64 KiB at a time, so parsing arguments, building the VM
//! and restoring a snapshot leave most of them mapped in the process: ~2 MiB of Rss that a
//! running monitor does not touch again. Dropping this process's mappings of its read-only
//! segments (the page cache keeps the pages, shared with every other monitor) lets the running
//! monitor fault back only what its event loop, vCPUs and devices use (issue 19).
//!
//! (Mapping them whole at the start instead, one MADV_POPULATE_READ, was measured and is not
//! done: it took 330-440 us, more than the faults it saves before the API's first answer.)

use log::debug;

/// Drops this process's mappings of the executable's read-only segments (not the pages: they
/// stay in the page cache). Safe at any time, from any thread: those segments are never
/// written (relocations go to the writable RELRO segment, which is left alone), so a later
/// access faults the same bytes back from the file.
pub fn release() {
    for_each_read_only_segment(|start, len| advise(start, len, libc::MADV_DONTNEED));
}

fn advise(start: usize, len: usize, advice: libc::c_int) {
    // SAFETY: [start, start + len) is whole pages of a read-only, never-written segment of
    // this executable (see `for_each_read_only_segment`); MADV_DONTNEED only drops its
    // page-table entries, the next access faulting the file's bytes back in.
    if unsafe { libc::madvise(start as *mut libc::c_void, len, advice) } != 0 {
        debug!(
            "madvise({advice}) of the read-only segment at {start:#x}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Calls `each(start, len)` for the whole pages of every read-only PT_LOAD segment of the
/// executable (the first object dl_iterate_phdr reports).
fn for_each_read_only_segment(mut each: impl FnMut(usize, usize)) {
    let mut each: &mut dyn FnMut(usize, usize) = &mut each;
    // SAFETY: the callback only reads the headers dl_iterate_phdr hands it, and `data` is
    // the `&mut dyn FnMut` above, alive for the whole call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(read_only_segments),
            (&mut each as *mut &mut dyn FnMut(usize, usize)).cast(),
        )
    };
}

/// dl_iterate_phdr's callback: hands the first object's (the executable's) read-only PT_LOAD
/// segments to the closure behind `data`, then stops the walk.
unsafe extern "C" fn read_only_segments(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `&mut dyn FnMut` that `for_each_read_only_segment` passed.
    let each = unsafe { &mut *data.cast::<&mut dyn FnMut(usize, usize)>() };
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
        if end > first {
            each(first, end - first);
        }
    }
    1
}
