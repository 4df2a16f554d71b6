//! The `Uffd` memory backend of `PUT /snapshot/load`, Firecracker's contract: guest memory is
//! mapped anonymous (in 2 MiB pages for a huge-page snapshot) and registered with a
//! userfaultfd; mote connects to the page-fault handler listening on `backend_path` and sends
//! it, in one message, the JSON array of [`GuestRegionUffdMapping`] with the userfaultfd
//! attached (SCM_RIGHTS). From then on the handler serves every fault on guest memory, the
//! monitor's own accesses included, usually with UFFDIO_COPY from the memory file it has.
//!
//! Beyond Firecracker: the connection stays open and is watched ([`link`]) so that a handler
//! that hangs up is reported, and a thread ([`watch`]) ends the monitor with a message when a
//! fault goes unread for longer than the load's `fault_timeout_ms`, where Firecracker would
//! hang for ever.

pub mod link;
pub mod watch;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use devices::memory::GuestMemoryMmap;
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::config::HugePages;
use crate::host_file::describe;
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::uffd::{Uffd, UffdError, FEATURE_EVENT_REMOVE};

#[derive(Debug, thiserror::Error)]
pub enum UffdBackendError {
    #[error("mem_backend backend_path {0}: no such file; it must be the Unix socket a page-fault handler listens on")]
    Missing(PathBuf),
    #[error("mem_backend backend_path {path} is not a Unix socket ({kind}); it must be the socket a page-fault handler listens on")]
    NotSocket { path: PathBuf, kind: &'static str },
    #[error("mem_backend backend_path {0}: nobody listens on this socket (is the page-fault handler running?)")]
    NobodyListens(PathBuf),
    #[error("mem_backend backend_path {path}: cannot connect to the page-fault handler: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("cannot send the userfaultfd and the memory layout to the page-fault handler on {path}: {source}")]
    Send { path: PathBuf, source: io::Error },
    #[error("cannot map guest memory for the page-fault handler: {0}")]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
}

/// Where a guest memory region's contents are, for the handler: Firecracker's
/// `GuestRegionUffdMapping`, field for field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestRegionUffdMapping {
    /// The region's first byte in this process (where UFFDIO_COPY writes).
    pub base_host_virt_addr: u64,
    pub size: u64,
    /// Where the region's bytes start in the memory file (regions follow one another there).
    pub offset: u64,
    /// The pages backing the region, in bytes (4096, or 2 MiB for a huge-page snapshot).
    pub page_size: usize,
    /// Firecracker's older name for `page_size`, which despite its name also holds bytes;
    /// still sent, as Firecracker does, for handlers written against it.
    pub page_size_kib: usize,
}

/// Connects to the handler's socket at `path`: the first step of a Uffd load, taken before
/// anything of the snapshot is read, so a wrong path is a refusal that leaves the monitor as
/// it was. The kinds of wrong path get their own messages.
pub fn connect(path: &Path) -> Result<UnixStream, UffdBackendError> {
    match std::fs::metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(UffdBackendError::Missing(path.to_path_buf()))
        }
        Ok(metadata) if !metadata.file_type().is_socket() => {
            return Err(UffdBackendError::NotSocket {
                path: path.to_path_buf(),
                kind: describe(metadata.file_type()),
            })
        }
        // Anything else (a directory on the way we may not search, say) connect reports.
        _ => {}
    }
    UnixStream::connect(path).map_err(|source| match source.raw_os_error() {
        Some(libc::ECONNREFUSED) => UffdBackendError::NobodyListens(path.to_path_buf()),
        _ => UffdBackendError::Connect {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Maps `mib` MiB of guest memory in the pages `huge_pages` names, registers it with a new
/// userfaultfd and sends both to the handler on `stream` (connected to `path`); returns the
/// memory, which the handler fills as the guest and the monitor touch it, and the userfaultfd.
pub fn hand_over(
    stream: &UnixStream,
    path: &Path,
    mib: u64,
    huge_pages: HugePages,
) -> Result<(GuestMemoryMmap, Uffd), UffdBackendError> {
    let memory = create_guest_memory(mib, huge_pages)?;
    // EVENT_REMOVE always, as Firecracker: the kernel only uses it when mote gives pages back
    // (the balloon's madvise), and a handler must then serve those pages zeroed, not from the
    // file.
    let uffd = Uffd::new(FEATURE_EVENT_REMOVE)?;
    for region in memory.iter() {
        uffd.register(region.as_ptr() as u64, region.len())?;
    }
    let mappings = mappings(&memory, huge_pages);
    let message = serde_json::to_vec(&mappings).map_err(|err| UffdBackendError::Send {
        path: path.to_path_buf(),
        source: io::Error::other(err),
    })?;
    let sent = stream
        .send_with_fd(&message[..], uffd.as_raw_fd())
        .map_err(|err| UffdBackendError::Send {
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(err.errno()),
        })?;
    if sent != message.len() {
        // A stream socket with an empty buffer takes a few hundred bytes whole; anything else
        // would leave the handler a message cut short.
        return Err(UffdBackendError::Send {
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::WriteZero,
                format!("{sent} of {} bytes sent", message.len()),
            ),
        });
    }
    log::info!(
        "guest memory handed to the page-fault handler on {}: {} regions, {} byte pages",
        path.display(),
        mappings.len(),
        huge_pages.page_size()
    );
    Ok((memory, uffd))
}

/// The layout message for `memory`: regions in guest order, which is the memory file's.
fn mappings(memory: &GuestMemoryMmap, huge_pages: HugePages) -> Vec<GuestRegionUffdMapping> {
    let page_size = huge_pages.page_size() as usize;
    let mut offset = 0;
    memory
        .iter()
        .map(|region| {
            let mapping = GuestRegionUffdMapping {
                base_host_virt_addr: region.as_ptr() as u64,
                size: region.len(),
                offset,
                page_size,
                page_size_kib: page_size,
            };
            offset += region.len();
            mapping
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    #[test]
    fn the_message_has_firecrackers_fields() {
        let memory = create_guest_memory(16, HugePages::None).unwrap();
        let json = serde_json::to_value(mappings(&memory, HugePages::None)).unwrap();
        let region = &json[0];
        let mut keys: Vec<_> = region.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "base_host_virt_addr",
                "offset",
                "page_size",
                "page_size_kib",
                "size"
            ]
        );
        assert_eq!(region["size"], 16 << 20);
        assert_eq!(region["offset"], 0);
        assert_eq!(region["page_size"], 4096);
        assert_eq!(region["page_size_kib"], 4096);
    }

    #[test]
    fn wrong_socket_paths_are_told_apart() {
        let dir = TempDir::new().unwrap();
        let missing = dir.as_path().join("missing.sock");
        let err = connect(&missing).unwrap_err();
        assert!(matches!(err, UffdBackendError::Missing(_)), "{err}");
        assert!(err.to_string().contains("missing.sock"), "{err}");
        let file = dir.as_path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = connect(&file).unwrap_err().to_string();
        assert!(
            err.contains("is not a Unix socket (a regular file)"),
            "{err}"
        );
        let gone = dir.as_path().join("gone.sock");
        drop(UnixListener::bind(&gone).unwrap());
        let err = connect(&gone).unwrap_err().to_string();
        assert!(err.contains("nobody listens"), "{err}");
        let live = dir.as_path().join("live.sock");
        let _listener = UnixListener::bind(&live).unwrap();
        connect(&live).unwrap();
    }
}
