//! How a lazy pager that cannot go on ends the monitor. Its threads are the only ones that
//! fill guest memory: once one is gone, the next fault of the guest (or of the monitor's own
//! threads, a device writing guest memory) waits for ever, with nothing said. As the Uffd
//! backend's stall watch does for a handler that is gone, the monitor ends instead, with the
//! thread and the reason, so that whoever runs it sees why its VM went.

use std::fmt::Display;

/// Ends the monitor (exit status 1) because the pager thread `thread` failed with `reason`.
pub fn end_monitor(thread: &str, reason: &dyn Display) -> ! {
    let message = format!(
        "the lazy pager's thread {thread} failed: {reason}; guest memory can no longer be filled from the memory file, so this monitor ends"
    );
    log::error!("{message}");
    log::error!("mote exiting with error. exit_code=1");
    crate::terminal::restore();
    eprintln!("mote: {message}");
    std::process::exit(1)
}
