//! How a memory backend's thread that cannot go on ends the monitor: the Uffd backend's stall
//! watch (a handler gone or stuck) and the Lazy backend's pager threads. They are the only
//! ones that see guest memory can no longer be filled; the next fault of the guest (or of a
//! monitor thread writing guest memory) would wait for ever, with nothing said, and the thread
//! that would end the monitor in order may be the one waiting. So the monitor ends there and
//! then, with the reason, so that whoever runs it sees why its VM went.

/// Ends the monitor with exit status 1, logging `message` and printing it on stderr, as the
/// main thread ends with an error.
pub fn end_monitor(message: &str) -> ! {
    log::error!("{message}");
    log::error!("mote exiting with error. exit_code=1");
    crate::terminal::restore();
    eprintln!("mote: {message}");
    std::process::exit(1)
}
