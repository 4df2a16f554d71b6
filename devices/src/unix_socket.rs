//! Listening Unix sockets whose files answer from the moment they exist.
//!
//! `bind` makes the socket's file before `listen` makes it answer, and clients (Firecracker's
//! SDKs, our tests, anyone) wait for the file and then connect: in between they get
//! ECONNREFUSED. The API socket and the vsock device's socket both bind this way.

use std::io::{self, ErrorKind};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

/// Longest path a `sockaddr_un` holds, its terminating NUL aside.
pub const MAX_SOCKET_PATH: usize = 107;

/// Binds a listening socket at `path` so that it accepts connections from the moment its file
/// exists: bound and listening under a private name beside `path` first, then hard-linked to
/// `path`, which also never replaces a file that is already there (EADDRINUSE, as `bind`).
/// A path longer than [`MAX_SOCKET_PATH`] is refused (InvalidInput): a shorter private name
/// would bind, and the link would make a file no client can connect to.
pub fn bind_listening(path: &Path) -> io::Result<UnixListener> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("a Unix socket path holds at most {MAX_SOCKET_PATH} bytes"),
        ));
    }
    // One process may bind several sockets in one directory.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let private = path.with_file_name(format!(
        ".mote-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    if private.as_os_str().len() > MAX_SOCKET_PATH {
        return UnixListener::bind(path);
    }
    // A leftover of a killed process that had our pid.
    let _ = std::fs::remove_file(&private);
    let listener = UnixListener::bind(&private)?;
    let linked = std::fs::hard_link(&private, path);
    let _ = std::fs::remove_file(&private);
    match linked {
        Ok(()) => Ok(listener),
        Err(err) if err.kind() == ErrorKind::AlreadyExists => {
            Err(io::Error::from_raw_os_error(libc::EADDRINUSE))
        }
        // A file system without hard links: the plain bind, with its short window.
        Err(_) => UnixListener::bind(path),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn the_file_appears_listening_alone_and_never_replaces_a_file() {
        let dir = std::env::temp_dir().join(format!("mote-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
        let _first = bind_listening(&a).unwrap();
        let _second = bind_listening(&b).unwrap();
        UnixStream::connect(&a).expect("the file exists, so it must answer");
        UnixStream::connect(&b).expect("the file exists, so it must answer");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["a.sock", "b.sock"]);

        let taken = dir.join("taken");
        std::fs::write(&taken, b"keep me").unwrap();
        let err = bind_listening(&taken).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
        assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_too_long_for_a_socket_address_is_refused_and_no_file_appears() {
        let dir = std::env::temp_dir().join(format!("mote-bind-long-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let long = dir.join("s".repeat(MAX_SOCKET_PATH));
        let err = bind_listening(&long).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
