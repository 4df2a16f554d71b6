//! The signals that stop the monitor in order (SIGTERM, SIGINT, SIGHUP), turned into readable
//! fds for the event loop, so that stopping runs the same path as any other exit.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

/// Signals that ask the monitor to stop.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// One readable end per stop signal.
pub struct StopSignals {
    pipes: Vec<(libc::c_int, UnixStream)>,
}

static REGISTERED: OnceLock<StopSignals> = OnceLock::new();

impl StopSignals {
    /// The process's one set of pipes, registered on first use. One set, so that a signal
    /// that lands while the API waits before boot, or while the VM is built, is still in its
    /// pipe when the running monitor's event loop starts watching.
    pub fn get() -> io::Result<&'static Self> {
        if let Some(signals) = REGISTERED.get() {
            return Ok(signals);
        }
        let signals = Self::register()?;
        Ok(REGISTERED.get_or_init(|| signals))
    }

    fn register() -> io::Result<Self> {
        let mut pipes = Vec::new();
        for signal in STOP_SIGNALS {
            let (read_end, write_end) = UnixStream::pair()?;
            read_end.set_nonblocking(true)?;
            signal_hook::low_level::pipe::register(signal, write_end)?;
            pipes.push((signal, read_end));
        }
        Ok(Self { pipes })
    }

    pub fn fds(&self) -> impl Iterator<Item = (libc::c_int, RawFd)> + '_ {
        self.pipes
            .iter()
            .map(|(sig, pipe)| (*sig, pipe.as_raw_fd()))
    }

    /// Empties the pipe of `signal` after it woke the loop.
    pub fn drain(&self, signal: libc::c_int) {
        if let Some((_, pipe)) = self.pipes.iter().find(|(sig, _)| *sig == signal) {
            let mut buf = [0u8; 16];
            while matches!((&*pipe).read(&mut buf), Ok(n) if n > 0) {}
        }
    }
}

/// The signal's name, for messages.
pub fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
