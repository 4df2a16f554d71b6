//! The per-run copy of an image's root file system: a reflink where the file system shares
//! blocks between files (btrfs, xfs), else a copy of the data regions only, so the holes of
//! the sparse image stay holes. Done here rather than by `cp --reflink=auto --sparse=always`,
//! which busybox's cp (an emulated host's, a small distribution's) does not know.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// FICLONE: `ioctl(dest, FICLONE, src)` shares all of src's blocks with dest.
const FICLONE: libc::c_ulong = 0x4004_9409;

fn reflink(src: &File, dest: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both are open files.
    let rc = unsafe { libc::ioctl(dest.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The next data or hole offset at or after `offset` (SEEK_DATA / SEEK_HOLE); None past the
/// end.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    // SAFETY: lseek takes no pointers.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(u64::try_from(found).map_err(io::Error::other)?))
}

/// Copies `len` bytes at `offset` from `src` to the same place in `dest`.
fn copy_range(src: &File, dest: &File, mut offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buffer = vec![0u8; 1 << 20];
    let end = offset + len;
    while offset < end {
        let want = usize::try_from((end - offset).min(buffer.len() as u64)).unwrap_or(0);
        let n = src.read_at(&mut buffer[..want], offset)?;
        if n == 0 {
            break;
        }
        dest.write_all_at(&buffer[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// Copies `src` to the new file `dest`, sharing blocks or keeping holes.
pub fn sparse_copy(src: &Path, dest: &Path) -> io::Result<()> {
    let source = File::open(src)?;
    let len = source.metadata()?.len();
    let target = File::create_new(dest)?;
    if reflink(&source, &target).is_ok() {
        return Ok(());
    }
    target.set_len(len)?;
    let mut offset = 0;
    while offset < len {
        let Some(data) = seek(&source, offset, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(&source, data, libc::SEEK_HOLE)?.unwrap_or(len);
        copy_range(&source, &target, data, hole - data)?;
        offset = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn a_sparse_file_is_copied_whole_and_stays_sparse() {
        let dir = std::env::temp_dir().join(format!("mote-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (src, dest) = (dir.join("src"), dir.join("dest"));
        let file = File::create(&src).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"start", 0).unwrap();
        file.write_all_at(b"middle", 32 << 20).unwrap();
        file.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(file);
        sparse_copy(&src, &dest).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dest).unwrap());
        let blocks = std::fs::metadata(&dest).unwrap().blocks() * 512;
        assert!(
            blocks < 8 << 20,
            "{blocks} bytes allocated for 64 MiB with 3 writes"
        );
        assert!(
            sparse_copy(&src, &dest).is_err(),
            "never over an existing file"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
