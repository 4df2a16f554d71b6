//! The root file system image built from an unpacked tree: ext4 by `mkfs.ext4 -d` (e2fsprogs).
//!
//! ext4 rather than erofs: the guest kernel mote's tools build has ext4 (it is its root file
//! system already) and not erofs; and a read-only erofs root would need an overlay and a
//! scratch drive in the guest for the container's writes, where an ext4 copy is writable as
//! it is and costs one sparse copy per run (`copy.rs`). Measured on a busybox image
//! (README, "Run a container image"): mkfs.ext4 -d builds it in tens of milliseconds.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Free space given to the container's own writes beyond what the image holds. The file is
/// sparse: space the container never writes costs nothing on the host.
const HEADROOM_BYTES: u64 = 512 << 20;
/// Inodes beyond the image's own, for the files the container makes.
const SPARE_INODES: u64 = 65536;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot measure the unpacked image at {path}: {source}")]
    Measure { path: PathBuf, source: io::Error },
    #[error("cannot create the root file system image {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot run mkfs.ext4 (install e2fsprogs): {0}")]
    Spawn(io::Error),
    #[error("mkfs.ext4 -d failed ({status}): {stderr}")]
    Mkfs { status: String, stderr: String },
}

/// Bytes and inodes a tree takes.
fn measure(tree: &Path) -> Result<(u64, u64), RootfsError> {
    let mut bytes = 0;
    let mut inodes = 0;
    let mut pending = vec![tree.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let measure_err = |source| RootfsError::Measure {
            path: dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&dir).map_err(measure_err)? {
            let entry = entry.map_err(measure_err)?;
            let meta = entry.metadata().map_err(measure_err)?;
            bytes += meta.blocks() * 512;
            inodes += 1;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Builds the ext4 image `image` holding `tree` (owners, modes, links and device nodes as
/// they are there). Gives the bytes the tree takes.
pub fn build_ext4(tree: &Path, image: &Path) -> Result<u64, RootfsError> {
    let (bytes, inodes) = measure(tree)?;
    // ext4's own metadata (journal, tables) on top of the data, then the headroom.
    let size = (bytes + bytes / 4 + (16 << 20) + HEADROOM_BYTES).next_multiple_of(1 << 20);
    let create = |source| RootfsError::Create {
        path: image.to_path_buf(),
        source,
    };
    std::fs::File::create_new(image)
        .and_then(|file| file.set_len(size))
        .map_err(create)?;
    let output = Command::new("mkfs.ext4")
        .args(["-F", "-q", "-m", "0", "-L", "mote-root"])
        .arg("-N")
        .arg((inodes + SPARE_INODES).to_string())
        .arg("-d")
        .arg(tree)
        .arg(image)
        .env("PATH", search_path())
        .output()
        .map_err(RootfsError::Spawn)?;
    if !output.status.success() {
        return Err(RootfsError::Mkfs {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(bytes)
}

/// The caller's PATH with the sbin directories mkfs.ext4 lives in, which a user's PATH may
/// lack.
fn search_path() -> std::ffi::OsString {
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    path.push(":/usr/sbin:/sbin");
    path
}
