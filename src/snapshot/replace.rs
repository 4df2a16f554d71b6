//! Snapshot files are written under a new name beside their target and renamed into place
//! once whole. Never truncated in place: a memory file may be mapped by running VMs (restored
//! from it, or clones of it), and truncating it would pull their memory from under them. A
//! rename leaves them the old file, which lives on while they map it.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Tells apart the new files of one process.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// A file being written for `target`; removed when dropped before [`NewFile::commit`].
pub struct NewFile {
    file: File,
    partial: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl NewFile {
    /// A new, empty file in the target's directory, under a name no other writer uses.
    pub fn create(target: &Path) -> std::io::Result<Self> {
        let name = target.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
        })?;
        let mut partial_name = std::ffi::OsString::from(".");
        partial_name.push(name);
        partial_name.push(format!(
            ".{}-{}.partial",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let partial = target.with_file_name(partial_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)?;
        Ok(Self {
            file,
            partial,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Gives the finished file its name, replacing whatever had it.
    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.partial, &self.target)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    #[test]
    fn the_old_file_stays_whole_for_whoever_has_it_open() {
        let dir = TempDir::new().unwrap();
        let target = dir.as_path().join("mem");
        std::fs::write(&target, b"old contents").unwrap();
        let reader = File::open(&target).unwrap();
        let new = NewFile::create(&target).unwrap();
        new.file().write_all(b"new").unwrap();
        new.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        let mut old = [0u8; 12];
        reader.read_exact_at(&mut old, 0).unwrap();
        assert_eq!(&old, b"old contents");
    }

    #[test]
    fn an_unfinished_file_leaves_nothing() {
        let dir = TempDir::new().unwrap();
        let target = dir.as_path().join("state");
        drop(NewFile::create(&target).unwrap());
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 0);
    }
}
