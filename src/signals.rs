//! The signals that would end the monitor, turned into one readable fd for the event loop, so
//! that stopping runs the same path as any other exit (status 128 + N, the API socket and
//! every other file mote made removed). Only the synchronous crash signals (SIGSEGV, SIGBUS,
//! SIGILL, SIGFPE, SIGTRAP, SIGABRT, SIGSYS) keep their default action: after one of those the
//! monitor's own state cannot be trusted to stop in order. SIGPIPE and SIGXFSZ are caught by
//! [`count_write_error_signals`], so both become write errors (EPIPE, EFBIG), and counted.
//! Firecracker's `signals` metrics come from [`take_counts`].

use std::io::{self, Read};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Signals whose default action ends the process and that someone else sends (a supervisor,
/// a terminal, a timer, the kernel at a CPU-time limit); the real-time ones from
/// `SIGRTMIN() + 1` are added at registration (`SIGRTMIN()` itself is the vCPU kick).
pub const STOP_SIGNALS: [libc::c_int; 13] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGXCPU,
    libc::SIGIO,
    libc::SIGPWR,
    libc::SIGSTKFLT,
];

/// The first stop signal that arrived, 0 before any did.
static FIRST: AtomicI32 = AtomicI32::new(0);

/// The write end of the stop pipe, -1 until [`StopSignals::register`] made it; the handler
/// reads it, so it is a plain atomic rather than something behind a lock.
static PIPE_WRITE_FD: AtomicI32 = AtomicI32::new(-1);

/// The readable end of the one pipe every stop signal writes.
pub struct StopSignals {
    pipe: UnixStream,
}

static REGISTERED: OnceLock<StopSignals> = OnceLock::new();

impl StopSignals {
    /// The process's one pipe, registered on first use. One, so that a signal that lands
    /// while the API waits before boot, or while the VM is built, is still in the pipe when
    /// the running monitor's event loop starts watching.
    pub fn get() -> io::Result<&'static Self> {
        if let Some(signals) = REGISTERED.get() {
            return Ok(signals);
        }
        let signals = Self::register()?;
        Ok(REGISTERED.get_or_init(|| signals))
    }

    fn register() -> io::Result<Self> {
        let (read_end, write_end) = UnixStream::pair()?;
        read_end.set_nonblocking(true)?;
        // The handler never blocks: a full pipe already wakes the loop.
        write_end.set_nonblocking(true)?;
        // The write end lives as long as the process.
        PIPE_WRITE_FD.store(write_end.into_raw_fd(), Ordering::SeqCst);
        for signal in stop_signals() {
            install(signal, on_stop_signal)?;
        }
        Ok(Self { pipe: read_end })
    }

    /// The fd that turns readable when a stop signal arrived.
    pub fn fd(&self) -> RawFd {
        self.pipe.as_raw_fd()
    }

    /// Empties the pipe after it woke the loop, and says which signal came first.
    pub fn take(&self) -> Option<libc::c_int> {
        let mut buf = [0u8; 64];
        while matches!((&self.pipe).read(&mut buf), Ok(n) if n > 0) {}
        match FIRST.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(signal),
        }
    }
}

/// Every signal that asks the monitor to stop: [`STOP_SIGNALS`] and the real-time signals
/// after the vCPU kick.
pub fn stop_signals() -> impl Iterator<Item = libc::c_int> {
    STOP_SIGNALS
        .into_iter()
        .chain(libc::SIGRTMIN() + 1..=libc::SIGRTMAX())
}

/// How many times each signal of Firecracker's `signals` metrics that mote catches arrived
/// since the last report: SIGHUP and SIGXCPU (stop signals), SIGXFSZ and SIGPIPE (write
/// errors). Plain atomics, which a signal handler may touch; the crash signals (SIGBUS,
/// SIGSEGV, SIGILL) are not caught (the process dies of them), so they are never counted.
static SIGHUP_COUNT: AtomicU64 = AtomicU64::new(0);
static SIGXCPU_COUNT: AtomicU64 = AtomicU64::new(0);
static SIGXFSZ_COUNT: AtomicU64 = AtomicU64::new(0);
static SIGPIPE_COUNT: AtomicU64 = AtomicU64::new(0);

/// The counter of `signal`, if it is one that is counted.
fn count_of(signal: libc::c_int) -> Option<&'static AtomicU64> {
    match signal {
        libc::SIGHUP => Some(&SIGHUP_COUNT),
        libc::SIGXCPU => Some(&SIGXCPU_COUNT),
        libc::SIGXFSZ => Some(&SIGXFSZ_COUNT),
        libc::SIGPIPE => Some(&SIGPIPE_COUNT),
        _ => None,
    }
}

/// The counts since the previous call, by Firecracker's metric names.
pub fn take_counts() -> [(&'static str, u64); 4] {
    let take = |count: &AtomicU64| count.swap(0, Ordering::Relaxed);
    [
        ("sighup", take(&SIGHUP_COUNT)),
        ("sigxcpu", take(&SIGXCPU_COUNT)),
        ("sigxfsz", take(&SIGXFSZ_COUNT)),
        ("sigpipe", take(&SIGPIPE_COUNT)),
    ]
}

/// A write past RLIMIT_FSIZE (`mote-jailer --resource-limit fsize=N`) raises SIGXFSZ, whose
/// default action kills the process without a word and leaves its socket behind; a write to a
/// pipe nobody reads raises SIGPIPE, which Rust's runtime ignores. Both are caught here by a
/// handler that only counts them, so the write fails with EFBIG or EPIPE and the device or
/// file that made it reports the error (a guest's disk write gets IOERR). Call before any
/// thread starts: threads inherit it.
pub fn count_write_error_signals() -> io::Result<()> {
    for signal in [libc::SIGXFSZ, libc::SIGPIPE] {
        install(signal, on_write_error_signal)?;
    }
    Ok(())
}

/// The handler of every stop signal: count it, remember the first, wake the event loop. It
/// only does atomic operations and a send(2), all async-signal-safe; it takes no lock, does
/// not allocate, and keeps the interrupted code's errno.
extern "C" fn on_stop_signal(signal: libc::c_int) {
    let errno = Errno::save();
    if let Some(count) = count_of(signal) {
        count.fetch_add(1, Ordering::Relaxed);
    }
    let _ = FIRST.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    let fd = PIPE_WRITE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: send(2) is async-signal-safe; `fd` is the pipe's write end, never closed,
        // and the buffer is one byte on the stack. MSG_DONTWAIT is what the seccomp filters
        // allow the handler on every thread.
        unsafe {
            libc::send(fd, [1u8].as_ptr().cast(), 1, libc::MSG_DONTWAIT);
        }
    }
    errno.restore();
}

/// The handler of SIGXFSZ and SIGPIPE: one relaxed atomic increment, no system call (so
/// every thread's seccomp filter allows it).
extern "C" fn on_write_error_signal(signal: libc::c_int) {
    if let Some(count) = count_of(signal) {
        count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Installs `handler` for `signal` with one sigaction(2). Written out rather than through
/// signal-hook: its registry copies itself on every registration, and registering the ~45
/// stop signals that way was more than half of the instructions from `execve` to the API's
/// first answer (callgrind), with a few hundred mmap/munmap calls from the allocator.
fn install(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value (no handler, empty mask, no flags);
    // the fields that matter are set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler as libc::sighandler_t;
    // Restart interrupted system calls, as Rust's runtime and signal-hook do; epoll waits
    // still return EINTR, which is how a blocked loop notices.
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and the handler is async-signal-safe (see the
    // handlers above); the old action is not wanted.
    if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The errno of the code a signal interrupted, kept across the handler's own system calls.
struct Errno(libc::c_int);

impl Errno {
    fn save() -> Self {
        // SAFETY: __errno_location returns this thread's errno slot, valid for its lifetime.
        Self(unsafe { *libc::__errno_location() })
    }

    fn restore(self) {
        // SAFETY: as in `save`.
        unsafe { *libc::__errno_location() = self.0 };
    }
}

/// The signal's name, for messages.
pub fn signal_name(signal: libc::c_int) -> String {
    let name = match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGALRM => "SIGALRM",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGIO => "SIGIO",
        libc::SIGPWR => "SIGPWR",
        libc::SIGSTKFLT => "SIGSTKFLT",
        _ if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&signal) => {
            return format!("SIGRTMIN+{}", signal - libc::SIGRTMIN())
        }
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catchable_signal_that_would_end_the_process_is_a_stop_signal() {
        let stops: Vec<_> = stop_signals().collect();
        // Default action "terminate" or "core" (signal(7)), less the synchronous crashes,
        // SIGKILL, the ignored SIGPIPE and SIGXFSZ, and the vCPU kick.
        let not_stops = [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGTRAP,
            libc::SIGABRT,
            libc::SIGSYS,
            libc::SIGKILL,
            libc::SIGPIPE,
            libc::SIGXFSZ,
            libc::SIGRTMIN(),
        ];
        let ignored_or_stopping = [
            libc::SIGCHLD,
            libc::SIGCONT,
            libc::SIGSTOP,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGURG,
            libc::SIGWINCH,
        ];
        for signal in 1..=libc::SIGRTMAX() {
            // Reserved for the C library's own threads.
            if (32..libc::SIGRTMIN()).contains(&signal) {
                continue;
            }
            let expected = !not_stops.contains(&signal) && !ignored_or_stopping.contains(&signal);
            assert_eq!(stops.contains(&signal), expected, "signal {signal}");
        }
        assert_eq!(signal_name(libc::SIGQUIT), "SIGQUIT");
        assert_eq!(signal_name(libc::SIGRTMIN() + 2), "SIGRTMIN+2");
    }
}
