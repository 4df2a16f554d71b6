//! Where `mote run --restore` takes guest memory from: `PUT /snapshot/load`'s `mem_backend`,
//! on the command line. `--mem-backend file|lazy|uffd` picks the backend (Firecracker's
//! `backend_type`; `file` by default), and the path has a flag named for what it is, so that
//! neither can be taken for the other: `--mem-file` is the memory file, which mote reads
//! itself (`file`, `lazy`), `--uffd-sock` the socket of the page-fault handler that reads it
//! (`uffd`). A path given for the wrong backend is refused, saying which flag it wanted.

use std::path::{Path, PathBuf};

use crate::config::{MemBackend, MemBackendType};

/// `--mem-backend`'s values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MemBackendArg {
    /// The memory file, mapped privately (Firecracker's `File`).
    #[default]
    File,
    /// The memory file, served on demand by mote's own pager (mote's `Lazy`).
    Lazy,
    /// A page-fault handler listening on --uffd-sock serves every page (Firecracker's `Uffd`).
    Uffd,
}

impl MemBackendArg {
    fn name(self) -> &'static str {
        match self {
            MemBackendArg::File => "file",
            MemBackendArg::Lazy => "lazy",
            MemBackendArg::Uffd => "uffd",
        }
    }
}

/// The load's `mem_backend` for `backend` with the paths given, or why they do not go
/// together.
pub fn mem_backend(
    backend: MemBackendArg,
    mem_file: Option<&Path>,
    uffd_sock: Option<&Path>,
) -> Result<MemBackend, String> {
    let name = backend.name();
    let (backend_type, backend_path) = match (backend, mem_file, uffd_sock) {
        (MemBackendArg::Uffd, Some(_), _) => {
            return Err(
                "--mem-backend uffd takes no --mem-file: the page-fault handler reads \
                        the memory file; give the socket it listens on with --uffd-sock PATH"
                    .into(),
            )
        }
        (MemBackendArg::Uffd, None, None) => {
            return Err(
                "--mem-backend uffd needs --uffd-sock PATH, the Unix socket the \
                        page-fault handler listens on"
                    .into(),
            )
        }
        (MemBackendArg::Uffd, None, Some(socket)) => (MemBackendType::Uffd, socket),
        (_, _, Some(_)) => {
            return Err(format!(
                "--uffd-sock is the page-fault handler's socket, for --mem-backend uffd only; \
                 --mem-backend {name} reads the memory file itself (--mem-file PATH)"
            ))
        }
        (_, None, None) => {
            return Err(format!(
                "--restore needs the snapshot's memory: --mem-file PATH (--mem-backend {name}), \
                 or --mem-backend uffd with --uffd-sock PATH"
            ))
        }
        (MemBackendArg::File, Some(file), None) => (MemBackendType::File, file),
        (MemBackendArg::Lazy, Some(file), None) => (MemBackendType::Lazy, file),
    };
    Ok(MemBackend {
        backend_type,
        backend_path: PathBuf::from(backend_path),
        fault_timeout_ms: None,
        working_set_ms: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_backend_takes_its_own_path() {
        let file = Some(Path::new("/m"));
        let sock = Some(Path::new("/h.sock"));
        let kind = |backend, mem_file, uffd_sock| {
            let chosen = mem_backend(backend, mem_file, uffd_sock).unwrap();
            (chosen.backend_type, chosen.backend_path)
        };
        assert_eq!(
            kind(MemBackendArg::File, file, None),
            (MemBackendType::File, "/m".into())
        );
        assert_eq!(
            kind(MemBackendArg::Lazy, file, None),
            (MemBackendType::Lazy, "/m".into())
        );
        assert_eq!(
            kind(MemBackendArg::Uffd, None, sock),
            (MemBackendType::Uffd, "/h.sock".into())
        );
    }

    #[test]
    fn a_path_for_the_wrong_backend_is_refused_naming_the_right_flag() {
        let file = Some(Path::new("/m"));
        let sock = Some(Path::new("/h.sock"));
        let err = mem_backend(MemBackendArg::Uffd, file, None).unwrap_err();
        assert!(
            err.contains("--mem-backend uffd takes no --mem-file"),
            "{err}"
        );
        assert!(err.contains("--uffd-sock PATH"), "{err}");
        let err = mem_backend(MemBackendArg::Uffd, None, None).unwrap_err();
        assert!(err.contains("needs --uffd-sock PATH"), "{err}");
        let err = mem_backend(MemBackendArg::Lazy, file, sock).unwrap_err();
        assert!(err.contains("for --mem-backend uffd only"), "{err}");
        assert!(
            err.contains("--mem-backend lazy reads the memory file"),
            "{err}"
        );
        let err = mem_backend(MemBackendArg::File, None, None).unwrap_err();
        assert!(
            err.contains("--restore needs the snapshot's memory"),
            "{err}"
        );
    }
}
