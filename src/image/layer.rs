//! Applying a layer (a tar stream) onto a root directory on this host, as OCI says: entries in
//! order, `.wh.NAME` removes NAME from the layers below, `.wh..wh..opq` empties its directory
//! of what the layers below put there; modes, owners, times, symlinks, hard links, device
//! nodes and extended attributes are kept.
//!
//! A layer is hostile input. Every path is resolved inside the root as if the root were `/`:
//! an entry with `..` or an absolute path is refused, a symlink met on the way (absolute or
//! relative, however many) is followed within the root and never out of it, and the last
//! component of an entry is never followed (whatever is there is replaced). So nothing a layer
//! holds can write outside the root.

use std::collections::HashSet;
use std::ffi::{CString, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

/// The most symlinks followed resolving one path, as Linux's own limit (ELOOP).
const MAX_SYMLINKS: usize = 40;
/// A whiteout's name prefix.
const WHITEOUT_PREFIX: &str = ".wh.";
/// The name that makes its directory opaque.
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The PAX record prefix that carries an extended attribute (file capabilities, …).
const XATTR_PREFIX: &str = "SCHILY.xattr.";

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot read the layer's tar stream: {0}")]
    Tar(io::Error),
    #[error("entry {entry:?}: {reason}")]
    Refused { entry: String, reason: &'static str },
    #[error("entry {entry:?}: too many levels of symbolic links")]
    SymlinkLoop { entry: String },
    #[error("entry {entry:?}: {what}: {source}")]
    Write {
        entry: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("entry {entry:?}: tar entry type {kind:?} is not supported")]
    Unsupported { entry: String, kind: u8 },
}

/// Applies the layer read from `tar` onto `root`.
pub fn apply_layer(root: &Path, tar: impl Read) -> Result<(), LayerError> {
    let mut archive = tar::Archive::new(tar);
    let mut layer = LayerState {
        root,
        created: HashSet::new(),
    };
    for entry in archive.entries().map_err(LayerError::Tar)? {
        let mut entry = entry.map_err(LayerError::Tar)?;
        layer.apply(&mut entry)?;
    }
    Ok(())
}

struct LayerState<'a> {
    root: &'a Path,
    /// What this layer made, which its opaque markers keep.
    created: HashSet<PathBuf>,
}

/// An entry's path as components below the root; `..` and absolute paths are refused.
fn entry_components(entry: &str, path: &Path) -> Result<Vec<OsString>, LayerError> {
    let mut components = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => components.push(name.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(LayerError::Refused {
                    entry: entry.to_string(),
                    reason: "a path with `..` could leave the root",
                })
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(LayerError::Refused {
                    entry: entry.to_string(),
                    reason: "an absolute path",
                })
            }
        }
    }
    Ok(components)
}

/// Resolves the directory `components` names inside `root` (creating what is missing as
/// directories), following symlinks within the root: an absolute target starts again at the
/// root, and `..` never climbs above it. Gives the host path of that directory.
fn resolve_dir(
    root: &Path,
    components: &[OsString],
    entry: &str,
    created: &mut HashSet<PathBuf>,
) -> Result<PathBuf, LayerError> {
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: Vec<OsString> = components.iter().rev().cloned().collect();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        if name == "." || name.is_empty() {
            continue;
        }
        let host = host_path(root, &resolved).join(&name);
        match fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(LayerError::SymlinkLoop {
                        entry: entry.to_string(),
                    });
                }
                let target = fs::read_link(&host).map_err(|source| LayerError::Write {
                    entry: entry.to_string(),
                    what: "cannot read a symlink on its path",
                    source,
                })?;
                if target.is_absolute() {
                    resolved.clear();
                }
                // The target's components go first, then what was left of the path.
                for part in target.components().rev() {
                    match part {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(meta) if meta.is_dir() => resolved.push(name),
            Ok(_) => {
                return Err(LayerError::Refused {
                    entry: entry.to_string(),
                    reason: "a file on its path is not a directory",
                })
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&host).map_err(|source| LayerError::Write {
                    entry: entry.to_string(),
                    what: "cannot create a directory on its path",
                    source,
                })?;
                created.insert(host);
                resolved.push(name);
            }
            Err(source) => {
                return Err(LayerError::Write {
                    entry: entry.to_string(),
                    what: "cannot look at its path",
                    source,
                })
            }
        }
    }
    Ok(host_path(root, &resolved))
}

fn host_path(root: &Path, components: &[OsString]) -> PathBuf {
    let mut path = root.to_path_buf();
    path.extend(components);
    path
}

/// Removes whatever is at `path` (not following a symlink there).
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
}

/// Sets an entry's owner without following a symlink.
fn set_owner(path: &Path, uid: u64, gid: u64) -> io::Result<()> {
    let uid = u32::try_from(uid).map_err(|_| io::Error::other("uid out of range"))?;
    let gid = u32::try_from(gid).map_err(|_| io::Error::other("gid out of range"))?;
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

/// Sets an entry's modification (and access) time without following a symlink.
fn set_mtime(path: &Path, mtime: u64) -> io::Result<()> {
    let path = c_path(path)?;
    let time = libc::timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let times = [time, time];
    // SAFETY: `path` is a NUL-terminated string and `times` two valid timespecs, both alive
    // for the call; utimensat only reads them.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes a device node or FIFO.
fn make_node(path: &Path, kind: libc::mode_t, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let path = c_path(path)?;
    let device = libc::makedev(major, minor);
    // SAFETY: `path` is a NUL-terminated string alive for the call; mknod only reads it.
    let rc = unsafe { libc::mknod(path.as_ptr(), kind | (mode & 0o7777), device) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The extended attributes an entry's PAX records carry.
fn xattrs_of<R: Read>(entry: &mut tar::Entry<R>) -> Result<Vec<(CString, Vec<u8>)>, LayerError> {
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry.pax_extensions().map_err(LayerError::Tar)? {
        for extension in extensions {
            let extension = extension.map_err(LayerError::Tar)?;
            if let Some(name) = extension.key_bytes().strip_prefix(XATTR_PREFIX.as_bytes()) {
                if let Ok(name) = CString::new(name) {
                    xattrs.push((name, extension.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(xattrs)
}

/// Sets an extended attribute without following a symlink.
fn set_xattr(path: &Path, name: &CString, value: &[u8]) -> io::Result<()> {
    let path = c_path(path)?;
    // SAFETY: `path` and `name` are NUL-terminated strings and `value` a byte slice whose
    // pointer and length go together, all alive for the call; lsetxattr only reads them.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl LayerState<'_> {
    fn apply<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<(), LayerError> {
        let xattrs = xattrs_of(entry)?;
        let path = entry.path().map_err(LayerError::Tar)?.into_owned();
        let name = path.display().to_string();
        let components = entry_components(&name, &path)?;
        let kind = entry.header().entry_type();
        let write = |what: &'static str| {
            let entry = name.clone();
            move |source| LayerError::Write {
                entry,
                what,
                source,
            }
        };
        let Some((last, parents)) = components.split_last() else {
            // The root itself (`./`): only its metadata.
            return self.set_metadata(entry, self.root, &name);
        };
        let dir = resolve_dir(self.root, parents, &name, &mut self.created)?;
        let last_str = last.to_string_lossy();
        if last_str == OPAQUE_MARKER {
            return self.make_opaque(&dir, &name);
        }
        if let Some(hidden) = last_str.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(LayerError::Refused {
                    entry: name,
                    reason: "a whiteout of no name",
                });
            }
            return remove_any(&dir.join(hidden))
                .map_err(write("cannot remove what it whites out"));
        }
        let target = dir.join(last);
        match kind {
            EntryType::Directory => {
                let is_dir = fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir());
                if !is_dir {
                    remove_any(&target).map_err(write("cannot replace what was there"))?;
                    fs::create_dir(&target).map_err(write("cannot create the directory"))?;
                }
            }
            EntryType::Regular | EntryType::Continuous => {
                remove_any(&target).map_err(write("cannot replace what was there"))?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .map_err(write("cannot create the file"))?;
                io::copy(entry, &mut file).map_err(write("cannot write the file"))?;
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(LayerError::Tar)?
                    .ok_or_else(|| LayerError::Refused {
                        entry: name.clone(),
                        reason: "a symlink without a target",
                    })?
                    .into_owned();
                remove_any(&target).map_err(write("cannot replace what was there"))?;
                // The target is stored as it is: it is only ever followed inside the root.
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(write("cannot create the symlink"))?;
            }
            EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(LayerError::Tar)?
                    .ok_or_else(|| LayerError::Refused {
                        entry: name.clone(),
                        reason: "a hard link without a target",
                    })?
                    .into_owned();
                let existing = self.resolve_entry(&link, &name)?;
                let meta = fs::symlink_metadata(&existing)
                    .map_err(write("the hard link's target is not in the image"))?;
                if meta.is_dir() {
                    return Err(LayerError::Refused {
                        entry: name,
                        reason: "a hard link to a directory",
                    });
                }
                if existing != target {
                    remove_any(&target).map_err(write("cannot replace what was there"))?;
                    fs::hard_link(&existing, &target)
                        .map_err(write("cannot create the hard link"))?;
                }
                self.created.insert(target);
                // A hard link shares its target's metadata, which the target's entry set.
                return Ok(());
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let node_kind = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let header = entry.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let mode = header.mode().unwrap_or(0o600);
                remove_any(&target).map_err(write("cannot replace what was there"))?;
                make_node(&target, node_kind, mode, major, minor)
                    .map_err(write("cannot create the device node"))?;
            }
            other => {
                return Err(LayerError::Unsupported {
                    entry: name,
                    kind: other.as_byte(),
                })
            }
        }
        self.created.insert(target.clone());
        self.set_metadata(entry, &target, &name)?;
        // After the owner: a change of owner drops a file's capabilities.
        for (key, value) in &xattrs {
            set_xattr(&target, key, value).map_err(|source| LayerError::Write {
                entry: name.clone(),
                what: "cannot set an extended attribute",
                source,
            })?;
        }
        Ok(())
    }

    /// The host path of an existing entry named by `link` (a hard link's target): its
    /// directory resolved in the root, its last component not followed.
    fn resolve_entry(&mut self, link: &Path, entry: &str) -> Result<PathBuf, LayerError> {
        let components = entry_components(entry, link)?;
        let (last, parents) = components.split_last().ok_or(LayerError::Refused {
            entry: entry.to_string(),
            reason: "a hard link to the root",
        })?;
        Ok(resolve_dir(self.root, parents, entry, &mut self.created)?.join(last))
    }

    /// Owner, then mode (a change of owner clears set-user-ID bits), then time.
    fn set_metadata<R: Read>(
        &self,
        entry: &tar::Entry<R>,
        target: &Path,
        name: &str,
    ) -> Result<(), LayerError> {
        let header = entry.header();
        let write = |what: &'static str| {
            move |source| LayerError::Write {
                entry: name.to_string(),
                what,
                source,
            }
        };
        let uid = header.uid().map_err(LayerError::Tar)?;
        let gid = header.gid().map_err(LayerError::Tar)?;
        set_owner(target, uid, gid).map_err(write(
            "cannot set its owner (mote needs root to unpack an image)",
        ))?;
        if header.entry_type() != EntryType::Symlink {
            let mode = header.mode().map_err(LayerError::Tar)? & 0o7777;
            fs::set_permissions(target, fs::Permissions::from_mode(mode))
                .map_err(write("cannot set its mode"))?;
        }
        if let Ok(mtime) = header.mtime() {
            set_mtime(target, mtime).map_err(write("cannot set its time"))?;
        }
        Ok(())
    }

    /// Empties `dir` of everything the layers below put there; what this layer made stays.
    fn make_opaque(&self, dir: &Path, name: &str) -> Result<(), LayerError> {
        let entries = fs::read_dir(dir).map_err(|source| LayerError::Write {
            entry: name.to_string(),
            what: "cannot list the opaque directory",
            source,
        })?;
        for child in entries {
            let child = child.map_err(|source| LayerError::Write {
                entry: name.to_string(),
                what: "cannot list the opaque directory",
                source,
            })?;
            let path = child.path();
            if !self.created.contains(&path) {
                remove_any(&path).map_err(|source| LayerError::Write {
                    entry: name.to_string(),
                    what: "cannot empty the opaque directory",
                    source,
                })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "layer_tests.rs"]
mod tests;
