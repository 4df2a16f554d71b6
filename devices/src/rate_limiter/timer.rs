//! A non-blocking timerfd on CLOCK_MONOTONIC: the event loop watches it, and a read after the
//! timer was re-armed or disarmed finds nothing rather than blocking the loop.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::Duration;

#[derive(Debug)]
pub struct Timer(File);

impl Timer {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Self(unsafe { File::from_raw_fd(fd) }))
    }

    /// Fires once after `after` (never zero: a zero time would disarm the timer); replaces any
    /// earlier setting.
    pub fn arm(&self, after: Duration) -> std::io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        self.set(libc::timespec {
            // At most 68 years, which fits every libc's time_t.
            tv_sec: after.as_secs().min(i32::MAX as u64) as _,
            tv_nsec: after.subsec_nanos() as _,
        })
    }

    pub fn disarm(&self) -> std::io::Result<()> {
        self.set(libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        })
    }

    fn set(&self, value: libc::timespec) -> std::io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: `spec` lives for the call and the old value is not asked for (null).
        let ret =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes the expiry the event loop saw, if it is still there.
    pub fn acknowledge(&self) {
        let mut ticks = [0u8; 8];
        let _ = (&self.0).read(&mut ticks);
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
