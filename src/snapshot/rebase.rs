//! `mote snapshot rebase`: lays a Diff snapshot's memory file over the memory file of the
//! snapshot before it (Firecracker's `rebase-snap`), so that the Diff's state file can be
//! loaded with the result.
//!
//! Firecracker's tool writes into the base in place. mote does not: the result is a new file
//! that takes the base's name (or `--output`'s) once whole, so a failure half-way leaves the
//! base as it was, and VMs restored from the base, which map it, keep their memory (writing
//! into a file they map `MAP_PRIVATE` would change the pages they have not copied yet). The
//! cost is a copy of the base's data; its holes stay holes.
//!
//! The diff's data is found with `SEEK_DATA`/`SEEK_HOLE`, which every Linux file system in
//! use answers (one without them would show the whole diff as data, holes as zeros, and
//! wipe the base). Its blocks must be no larger than a page, as on ext4, XFS, btrfs and
//! tmpfs: a larger block would carry zeros of pages the diff did not write.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::NewFile;
use crate::host_file::{self, FileKind, HostFileError};

/// Copies go through a buffer of this size.
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RebaseError {
    #[error(transparent)]
    Open(#[from] HostFileError),
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the diff {diff} has {diff_len} bytes and the base {base} has {base_len}: a Diff memory file is laid over the memory file of the snapshot before it, of the same guest and size")]
    Sizes {
        base: PathBuf,
        base_len: u64,
        diff: PathBuf,
        diff_len: u64,
    },
    #[error("the base and the diff are the same file ({0})")]
    SameFile(PathBuf),
    #[error("cannot write the rebased memory file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a rebase did, for the one line the command prints.
#[derive(Debug, PartialEq, Eq)]
pub struct Rebased {
    /// The diff's data: the extents laid over the base, and their bytes.
    pub extents: usize,
    pub bytes: u64,
}

/// Lays the data of the memory file `diff` over the memory file `base`, into a new file that
/// then replaces `output` (the base itself when None).
pub fn rebase(base: &Path, diff: &Path, output: Option<&Path>) -> Result<Rebased, RebaseError> {
    let base_file = host_file::open("the base memory file", base, FileKind::Regular, false)?;
    let diff_file = host_file::open("the diff memory file", diff, FileKind::Regular, false)?;
    let stat = |file: &File, what, path: &Path| {
        file.metadata().map_err(|source| RebaseError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let base_meta = stat(&base_file, "the base memory file", base)?;
    let diff_meta = stat(&diff_file, "the diff memory file", diff)?;
    if (base_meta.dev(), base_meta.ino()) == (diff_meta.dev(), diff_meta.ino()) {
        return Err(RebaseError::SameFile(diff.to_path_buf()));
    }
    if base_meta.len() != diff_meta.len() {
        return Err(RebaseError::Sizes {
            base: base.to_path_buf(),
            base_len: base_meta.len(),
            diff: diff.to_path_buf(),
            diff_len: diff_meta.len(),
        });
    }
    let len = base_meta.len();
    let target = output.unwrap_or(base);
    let write_err = |source| RebaseError::Write {
        path: target.to_path_buf(),
        source,
    };
    let new = NewFile::create(target).map_err(write_err)?;
    let base_data = data_extents(&base_file, len).map_err(|source| RebaseError::Read {
        what: "the base memory file",
        path: base.to_path_buf(),
        source,
    })?;
    copy_extents(&base_file, new.file(), &base_data)
        .map_err(|err| err.naming("the base memory file", base, target))?;
    let diff_data = data_extents(&diff_file, len).map_err(|source| RebaseError::Read {
        what: "the diff memory file",
        path: diff.to_path_buf(),
        source,
    })?;
    copy_extents(&diff_file, new.file(), &diff_data)
        .map_err(|err| err.naming("the diff memory file", diff, target))?;
    new.file().set_len(len).map_err(write_err)?;
    // The base's name goes to the new file only once its data is on disk: a crash never
    // leaves a half-written file under it.
    new.file().sync_all().map_err(write_err)?;
    new.commit().map_err(write_err)?;
    Ok(Rebased {
        extents: diff_data.len(),
        bytes: diff_data.iter().map(|r| r.end - r.start).sum(),
    })
}

/// The byte ranges of `file` (of `len` bytes) that hold data, holes left out.
pub fn data_extents(file: &File, len: u64) -> std::io::Result<Vec<Range<u64>>> {
    let seek = |offset: u64, whence| -> std::io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: lseek only moves the offset of a descriptor `file` keeps open.
        match unsafe { libc::lseek(file.as_raw_fd(), offset, whence) } {
            -1 => match std::io::Error::last_os_error() {
                // No data from `offset` to the end.
                err if err.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                err => Err(err),
            },
            at => Ok(Some(at as u64)),
        }
    };
    let mut extents = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if start >= len {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        extents.push(start..end);
        at = end;
    }
    Ok(extents)
}

/// Which side of a copy failed.
enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

impl CopyError {
    fn naming(self, what: &'static str, from: &Path, to: &Path) -> RebaseError {
        match self {
            CopyError::Read(source) => RebaseError::Read {
                what,
                path: from.to_path_buf(),
                source,
            },
            CopyError::Write(source) => RebaseError::Write {
                path: to.to_path_buf(),
                source,
            },
        }
    }
}

/// Copies `extents` of `from` to the same offsets of `to`.
fn copy_extents(from: &File, to: &File, extents: &[Range<u64>]) -> Result<(), CopyError> {
    let mut buf = vec![0u8; CHUNK];
    for extent in extents {
        let mut at = extent.start;
        while at < extent.end {
            let n = usize::try_from(extent.end - at).unwrap_or(CHUNK).min(CHUNK);
            from.read_exact_at(&mut buf[..n], at)
                .map_err(CopyError::Read)?;
            to.write_all_at(&buf[..n], at).map_err(CopyError::Write)?;
            at += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    const PAGE: u64 = 4096;

    /// A sparse file of `pages` pages with `fill` at each listed page.
    fn sparse(path: &Path, pages: u64, data: &[(u64, u8)]) {
        let file = File::create(path).unwrap();
        for (page, fill) in data {
            file.write_all_at(&[*fill; PAGE as usize], page * PAGE)
                .unwrap();
        }
        file.set_len(pages * PAGE).unwrap();
    }

    #[test]
    fn data_extents_leave_the_holes_out() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("f");
        sparse(&path, 16, &[(1, 1), (2, 2), (7, 0), (15, 3)]);
        let file = File::open(&path).unwrap();
        assert_eq!(
            data_extents(&file, 16 * PAGE).unwrap(),
            vec![PAGE..3 * PAGE, 7 * PAGE..8 * PAGE, 15 * PAGE..16 * PAGE]
        );
        sparse(&path, 4, &[]);
        assert!(data_extents(&File::open(&path).unwrap(), 4 * PAGE)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn the_diff_lands_on_a_copy_that_replaces_the_base() {
        let dir = TempDir::new().unwrap();
        let (base, diff) = (dir.as_path().join("base"), dir.as_path().join("diff"));
        sparse(&base, 8, &[(0, 0xa0), (1, 0xa1), (5, 0xa5)]);
        // The diff rewrites page 1, zeroes page 5 (data, not a hole) and adds page 6.
        sparse(&diff, 8, &[(1, 0xd1), (5, 0), (6, 0xd6)]);
        let old_base = File::open(&base).unwrap();
        let done = rebase(&base, &diff, None).unwrap();
        assert_eq!(
            done,
            Rebased {
                extents: 2,
                bytes: 3 * PAGE
            }
        );
        let bytes = std::fs::read(&base).unwrap();
        let at = |page: u64| bytes[(page * PAGE) as usize];
        assert_eq!(
            [at(0), at(1), at(2), at(5), at(6), at(7)],
            [0xa0, 0xd1, 0, 0, 0xd6, 0]
        );
        assert_eq!(bytes.len() as u64, 8 * PAGE);
        // Whoever had the base open (a VM restored from it) still reads the old one.
        let mut page = [0u8; 1];
        old_base.read_exact_at(&mut page, PAGE).unwrap();
        assert_eq!(page[0], 0xa1);
        // Holes of both stay holes.
        let rebased = File::open(&base).unwrap();
        assert_eq!(
            data_extents(&rebased, 8 * PAGE).unwrap(),
            vec![0..2 * PAGE, 5 * PAGE..7 * PAGE]
        );
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 2);
    }

    #[test]
    fn files_of_other_sizes_are_refused_and_the_base_is_left_alone() {
        let dir = TempDir::new().unwrap();
        let (base, diff) = (dir.as_path().join("base"), dir.as_path().join("diff"));
        sparse(&base, 8, &[(0, 0xa0)]);
        sparse(&diff, 4, &[(0, 0xd0)]);
        let err = rebase(&base, &diff, None).unwrap_err().to_string();
        assert!(
            err.contains("has 16384 bytes") && err.contains("has 32768"),
            "{err}"
        );
        assert_eq!(std::fs::read(&base).unwrap()[0], 0xa0);
        let err = rebase(&base, &base, None).unwrap_err();
        assert!(matches!(err, RebaseError::SameFile(_)), "{err}");
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 2);
    }

    #[test]
    fn the_result_can_go_elsewhere() {
        let dir = TempDir::new().unwrap();
        let (base, diff, out) = (
            dir.as_path().join("base"),
            dir.as_path().join("diff"),
            dir.as_path().join("out"),
        );
        sparse(&base, 2, &[(0, 0xa0)]);
        sparse(&diff, 2, &[(1, 0xd1)]);
        rebase(&base, &diff, Some(&out)).unwrap();
        assert_eq!(std::fs::read(&base).unwrap()[PAGE as usize], 0);
        let out = std::fs::read(&out).unwrap();
        assert_eq!((out[0], out[PAGE as usize]), (0xa0, 0xd1));
    }
}
