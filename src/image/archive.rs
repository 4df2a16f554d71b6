//! An image archive (`docker save`'s tar, or an OCI layout packed as a tar) unpacked into a
//! directory, to be read as one. Only directories and regular files are taken (that is all
//! either form holds), each at a plain relative path.

use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot read the image archive {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the image archive {path} holds {entry:?}, which is not a plain relative path")]
    BadPath { path: PathBuf, entry: String },
    #[error("cannot unpack {entry:?} of the image archive {path}: {source}")]
    Write {
        path: PathBuf,
        entry: String,
        source: io::Error,
    },
}

/// True when `path` looks like a tar archive (the "ustar" magic at offset 257).
pub fn is_tar(path: &Path) -> bool {
    let mut header = [0u8; 262];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok_and(|()| &header[257..262] == b"ustar")
}

/// Unpacks the archive at `path` into the existing directory `dest`; with `max_file`, only
/// the files of at most that many bytes (the JSON documents that name an image, without its
/// layers).
pub fn unpack(path: &Path, dest: &Path, max_file: Option<u64>) -> Result<(), ArchiveError> {
    let read = |source| ArchiveError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(read)?;
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    let mut links = Vec::new();
    for entry in archive.entries().map_err(read)? {
        let mut entry = entry.map_err(read)?;
        let name = entry.path().map_err(read)?.into_owned();
        let shown = name.display().to_string();
        let plain = name
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !plain {
            return Err(ArchiveError::BadPath {
                path: path.to_path_buf(),
                entry: shown,
            });
        }
        let target = dest.join(&name);
        let write = |source| ArchiveError::Write {
            path: path.to_path_buf(),
            entry: shown.clone(),
            source,
        };
        match entry.header().entry_type() {
            tar::EntryType::Directory => fs::create_dir_all(&target).map_err(write)?,
            tar::EntryType::Regular | tar::EntryType::Continuous
                if max_file.is_some_and(|max| entry.size() > max) => {}
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(write)?;
                }
                // The directory is new and only this code writes it: no symlink can be there.
                let mut out = fs::File::create_new(&target).map_err(write)?;
                io::copy(&mut entry, &mut out).map_err(write)?;
            }
            // `docker save` links a layer that two images share to its first copy; made at
            // the end (the target may come later), as hard links within `dest` only.
            tar::EntryType::Symlink => {
                if let Some(to) = entry.link_name().map_err(read)? {
                    links.push((name.clone(), to.into_owned()));
                }
            }
            _ => {}
        }
    }
    for (name, to) in links {
        let Some(target) = lexically_inside(&name, &to) else {
            return Err(ArchiveError::BadPath {
                path: path.to_path_buf(),
                entry: format!("{} -> {}", name.display(), to.display()),
            });
        };
        let (from, to) = (dest.join(&target), dest.join(&name));
        // Only a file this archive unpacked: never a symlink, never a directory.
        if fs::symlink_metadata(&from).is_ok_and(|m| m.is_file()) {
            if let Some(parent) = to.parent() {
                let _ = fs::create_dir_all(parent);
            }
            fs::hard_link(&from, &to).map_err(|source| ArchiveError::Write {
                path: path.to_path_buf(),
                entry: name.display().to_string(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Where the relative symlink `name -> to` points, as a path below the archive's top, or None
/// when it would leave it.
fn lexically_inside(name: &Path, to: &Path) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    let parent = name.parent().unwrap_or(Path::new(""));
    for component in parent.components().chain(to.components()) {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}
