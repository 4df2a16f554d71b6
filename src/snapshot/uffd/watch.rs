//! The stall watch of a Uffd-restored VM: a thread that looks at the userfaultfd without
//! reading it, and ends the monitor with a message when a fault has waited unread for longer
//! than the load's `fault_timeout_ms`.
//!
//! A handler that is gone (crashed, or closed everything) or stuck leaves the faults it was
//! meant to serve queued on the userfaultfd, which stays readable while any is. Firecracker
//! waits for ever then. A vCPU waiting on a fault can still be paused and the monitor still
//! stopped by a signal on kernels where KVM waits interruptibly (x86_64 from Linux 6.3), but a
//! fault taken by the monitor's own thread (a device writing guest memory, or the restore
//! writing the VM generation ID) holds that thread, and the API's requests wait behind it. So
//! the watch runs on a thread of its own, touches no guest memory, and is the one thing sure
//! to end such a monitor.
//!
//! What it cannot see: a handler that reads a fault and then never answers it (the message is
//! gone from the descriptor). Samples are taken every tenth of the limit (between 10 and
//! 250 ms), and a fault counts as waiting from the first sample that saw the descriptor
//! readable, as long as every sample since has: a handler that keeps up empties the queue
//! between samples, even under a storm of faults.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::seccomp::{thread_filter, Filter};
use crate::vstate::uffd::Uffd;

/// The limit when a load names none: far beyond any handler's time to read a fault (they read
/// as soon as the descriptor is readable), well short of an operator giving up.
pub const DEFAULT_FAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch the userfaultfd for unserved faults: {0}")]
    Epoll(std::io::Error),
    #[error("cannot start the thread that watches for unserved faults: {0}")]
    Spawn(std::io::Error),
}

/// How often the descriptor is looked at for `limit`.
fn tick(limit: Duration) -> Duration {
    (limit / 10).clamp(Duration::from_millis(10), Duration::from_millis(250))
}

/// Starts the watch of `uffd`, whose handler listens on `path`; it ends the process after
/// `limit` of an unread fault.
pub fn start(uffd: Arc<Uffd>, path: PathBuf, limit: Duration) -> Result<(), WatchError> {
    // Made here, under the main thread's filter: the watch's own only waits on it.
    let epoll = Epoll::new().map_err(WatchError::Epoll)?;
    epoll
        .ctl(
            ControlOperation::Add,
            uffd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .map_err(WatchError::Epoll)?;
    crate::thread::spawn_named(
        "mote_uffd_watch".into(),
        thread_filter(Filter::UffdWatch),
        move || watch(&epoll, &uffd, &path, limit),
        |err| log::error!("the watch for unserved faults did not start: {err}"),
    )
    .map_err(WatchError::Spawn)?;
    Ok(())
}

fn watch(epoll: &Epoll, _uffd: &Uffd, path: &std::path::Path, limit: Duration) {
    let tick = tick(limit);
    let mut waiting_since: Option<Instant> = None;
    let mut events = [EpollEvent::default(); 1];
    loop {
        // A zero time-out: a look at the level, nothing read.
        let readable = matches!(epoll.wait(0, &mut events), Ok(n) if n > 0);
        let now = Instant::now();
        waiting_since = match (readable, waiting_since) {
            (false, _) => None,
            (true, None) => Some(now),
            (true, Some(since)) => {
                if now.duration_since(since) >= limit {
                    give_up(path, limit);
                }
                Some(since)
            }
        };
        std::thread::sleep(tick);
    }
}

/// Ends the monitor: the guest cannot go on, and the thread that would end it in order may be
/// the one waiting on the fault.
fn give_up(path: &std::path::Path, limit: Duration) -> ! {
    crate::snapshot::failure::end_monitor(&format!(
        "a guest memory fault waited unread for {} ms (mem_backend fault_timeout_ms) on the userfaultfd given to the page-fault handler on {}: the handler is gone or stuck, so this monitor ends",
        limit.as_millis(),
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_is_a_tenth_of_the_limit_within_bounds() {
        assert_eq!(tick(Duration::from_secs(1)), Duration::from_millis(100));
        assert_eq!(tick(Duration::from_secs(30)), Duration::from_millis(250));
        assert_eq!(tick(Duration::from_millis(20)), Duration::from_millis(10));
    }
}
