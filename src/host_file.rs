//! Opening the host files an operator names (kernel, initrd, config file, drives, snapshot
//! files): one helper for all, so that none of them can hang or exhaust the monitor.
//!
//! Every open is non-blocking (a named pipe with no writer would otherwise block the opening
//! thread, and with it the API and the stop signals) and is followed by a check of what was
//! opened: a regular file, or a block device where a disk is wanted. Whole-file reads are
//! capped, so that a huge file is refused with its size rather than read until memory runs out.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What an operator's file must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file (kernel, initrd, config file, snapshot files).
    Regular,
    /// A regular file or a block device (drives).
    Disk,
}

impl FileKind {
    fn wanted(self) -> &'static str {
        match self {
            FileKind::Regular => "a regular file",
            FileKind::Disk => "a regular file or block device",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} is not {wanted} ({found})")]
    WrongKind {
        what: String,
        path: PathBuf,
        wanted: &'static str,
        found: &'static str,
    },
    #[error("{what} {path} is larger than the {limit} bytes mote reads from it")]
    TooLarge {
        what: String,
        path: PathBuf,
        limit: u64,
    },
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A name for what a file is, for messages.
pub fn describe(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a named pipe"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "of an unknown type"
    }
}

fn clear_nonblocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL only read and set the status flags of the open file
    // description behind `fd`, which `file` owns for the duration of both calls.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Opens the operator's file `path` (`what` names it in messages) for reading, and for
/// writing too with `write`; refuses it unless it is of `kind`.
pub fn open(
    what: impl Into<String>,
    path: &Path,
    kind: FileKind,
    write: bool,
) -> Result<File, HostFileError> {
    let what = what.into();
    let open_err = |what: String| {
        move |source| HostFileError::Open {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        // O_NONBLOCK: a FIFO opens at once (and is refused below) instead of waiting for a
        // writer; O_NOCTTY: a terminal named by mistake does not become ours.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(open_err(what.clone()))?;
    let file_type = file.metadata().map_err(open_err(what.clone()))?.file_type();
    let fits = file_type.is_file() || (kind == FileKind::Disk && file_type.is_block_device());
    if !fits {
        return Err(HostFileError::WrongKind {
            what,
            path: path.to_path_buf(),
            wanted: kind.wanted(),
            found: describe(file_type),
        });
    }
    // Reads and writes of a regular file or disk never wait anyway, but the flag would be
    // inherited by every clone of the descriptor: leave it as an ordinary open would.
    clear_nonblocking(&file).map_err(open_err(what))?;
    Ok(file)
}

/// Reads the whole of the regular file `path`, refusing one of more than `limit` bytes.
pub fn read_capped(
    what: impl Into<String>,
    path: &Path,
    limit: u64,
) -> Result<Vec<u8>, HostFileError> {
    let what = what.into();
    let file = open(what.clone(), path, FileKind::Regular, false)?;
    let too_large = |what: String| HostFileError::TooLarge {
        what,
        path: path.to_path_buf(),
        limit,
    };
    let read_err = |what: String| {
        move |source| HostFileError::Read {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let len = file.metadata().map_err(read_err(what.clone()))?.len();
    if len > limit {
        return Err(too_large(what));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // One byte past the limit tells a file that grew since the size was read.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err(what.clone()))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(what));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vmm_sys_util::tempdir::TempDir;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    fn mkfifo(path: &Path) {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, which lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_named_pipe_is_refused_at_once() {
        let dir = TempDir::new().unwrap();
        let fifo = dir.as_path().join("fifo");
        mkfifo(&fifo);
        let started = Instant::now();
        for write in [false, true] {
            let err = open("kernel image", &fifo, FileKind::Regular, write).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "kernel image {} is not a regular file (a named pipe)",
                    fifo.display()
                )
            );
        }
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn devices_and_directories_are_named_for_what_they_are() {
        let err = open(
            "config file",
            Path::new("/dev/zero"),
            FileKind::Regular,
            false,
        );
        assert_eq!(
            err.unwrap_err().to_string(),
            "config file /dev/zero is not a regular file (a character device)"
        );
        let err = open("drive x's file", Path::new("/"), FileKind::Disk, false);
        assert_eq!(
            err.unwrap_err().to_string(),
            "drive x's file / is not a regular file or block device (a directory)"
        );
    }

    #[test]
    fn an_opened_file_blocks_as_usual() {
        let file = TempFile::new().unwrap();
        let opened = open("initrd", file.as_path(), FileKind::Regular, true).unwrap();
        // SAFETY: F_GETFL only reads the flags of a descriptor `opened` owns.
        let flags = unsafe { libc::fcntl(opened.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn reads_are_capped() {
        let file = TempFile::new().unwrap();
        std::fs::write(file.as_path(), b"0123456789").unwrap();
        assert_eq!(
            read_capped("config file", file.as_path(), 10).unwrap(),
            b"0123456789"
        );
        let err = read_capped("config file", file.as_path(), 9).unwrap_err();
        assert!(
            matches!(err, HostFileError::TooLarge { limit: 9, .. }),
            "{err}"
        );
    }
}
