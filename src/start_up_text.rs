//! Gives back the monitor's start-up code once the VM runs. The binary's text and read-only
//! data are mapped by fault-around, 64 KiB at a time, so parsing arguments, building the VM
//! and restoring a snapshot leave most of them mapped in the process: ~2 MiB of Rss that a
//! running monitor does not touch again. Dropping this process's mappings of its read-only
//! segments (the page cache keeps the pages, shared with every other monitor) lets the running
//! monitor fault back only what its event loop, vCPUs and devices use (issue 19).
//!
//! The guest's boot then faults back more: device activation, the first exits, log lines. That
//! code is given back once more, [`AFTER_BOOT`] after the VM started ([`ReleaseAfterBoot`]), so
//! an idle monitor keeps mapped little more than its event loop.
//!
//! (Mapping them whole at the start instead, one MADV_POPULATE_READ, was measured and is not
//! done: it took 330-440 us, more than the faults it saves before the API's first answer.)

use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// When the code of the guest's boot is given back, from the VM's start: a Linux guest is at
/// its init in a fraction of that on KVM (a slower boot only faults some of it back).
pub const AFTER_BOOT: Duration = Duration::from_secs(2);

/// Gives the read-only segments back once more, [`AFTER_BOOT`] after it is made, from the
/// event loop: a one-shot timer that leaves the loop once it fired.
pub struct ReleaseAfterBoot {
    timer: TimerFd,
}

impl ReleaseAfterBoot {
    pub fn new() -> std::io::Result<Self> {
        let mut timer = TimerFd::new()?;
        timer.reset(AFTER_BOOT, None)?;
        Ok(Self { timer })
    }
}

impl MutEventSubscriber for ReleaseAfterBoot {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        // Readable, so this read does not block; it only clears the expiry.
        let _ = self.timer.wait();
        release();
        debug!("the code of the guest's boot was given back");
        if let Err(err) = ops.remove(Events::new(&self.timer, EventSet::IN)) {
            warn!("cannot stop watching the release timer: {err}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            warn!("cannot watch the release timer: {err}");
        }
    }
}

/// Drops this process's mappings of the executable's read-only segments (not the pages: they
/// stay in the page cache). Safe at any time, from any thread: those segments are never
/// written (relocations go to the writable RELRO segment, which is left alone), so a later
/// access faults the same bytes back from the file.
pub fn release() {
    // SAFETY: the callback only reads the headers dl_iterate_phdr hands it; `data` is unused.
    unsafe { libc::dl_iterate_phdr(Some(drop_read_only_segments), std::ptr::null_mut()) };
}

/// Drops the mappings of [start, start + len), whole pages of a read-only segment.
fn drop_mappings(start: usize, len: usize) {
    // SAFETY: [start, start + len) is whole pages of a read-only, never-written segment of
    // this executable (see `drop_read_only_segments`); MADV_DONTNEED only drops its
    // page-table entries, the next access faulting the file's bytes back in.
    if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
        debug!(
            "cannot drop the read-only segment at {start:#x}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// dl_iterate_phdr's callback: the first object's (the executable's) read-only PT_LOAD
/// segments are given back, and the walk stops there.
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
        if end > first {
            drop_mappings(first, end - first);
        }
    }
    1
}
