//! Raw mode for the console when stdin is a terminal: the guest gets every key (Ctrl-C too) as
//! it is typed. The original settings come back on every exit path: the guard's drop, and the
//! panic hook (the release build aborts on panic, so no drop would run there).

use std::sync::Mutex;

/// The terminal's settings before raw mode, while raw mode is on.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Keeps stdin in raw mode while alive.
pub struct RawTerminal(());

impl RawTerminal {
    /// Switches stdin to raw mode when it is a terminal; otherwise does nothing.
    pub fn enable() -> std::io::Result<Option<Self>> {
        // SAFETY: termios is plain data; tcgetattr fills it completely on success.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // tcgetattr is the terminal test too (isatty would be another ioctl, TIOCGWINSZ in musl,
        // for the seccomp filters to allow). SAFETY: `original` outlives the call.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut original) } != 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                // Not a terminal, or no stdin at all.
                Some(libc::ENOTTY) | Some(libc::EBADF) => Ok(None),
                _ => Err(err),
            };
        }
        let mut raw = original;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(original);
        // SAFETY: as above; `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(Self(())))
    }
}

/// Puts back the settings saved by [`RawTerminal::enable`], if any.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(original) = saved {
        // SAFETY: stdin is a valid descriptor and `original` came from tcgetattr.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &original) };
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}
