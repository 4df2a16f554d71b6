//! Drives' host files: opened as the drive uses them, one sharing rule wherever a drive gets
//! its file (boot, restore, `PATCH /drives`), and an advisory lock that keeps two monitors
//! from one image.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::virtio::block::Block;
use log::warn;

use super::DeviceError;
use crate::config::RateLimiterConfig;
use crate::config::{DriveConfig, IoEngine};
use crate::host_file::{self, FileKind};
use crate::sync::lock;

/// The running VM's block devices. The transport (on vCPU threads) and the event loop share
/// each one behind its lock; these handles let the Vmm reach them too.
#[derive(Clone, Default)]
pub struct Drives(Vec<Arc<Mutex<Block>>>);

impl Drives {
    pub(super) fn push(&mut self, block: Arc<Mutex<Block>>) {
        self.0.push(block);
    }

    /// The block device of drive `drive_id`.
    pub fn find(&self, drive_id: &str) -> Option<&Arc<Mutex<Block>>> {
        self.0.iter().find(|block| lock(block).id() == drive_id)
    }

    /// Completes every request the drives' Async engines have in flight (for a snapshot).
    pub fn finish_in_flight(&self) {
        for block in &self.0 {
            lock(block).finish_in_flight();
        }
    }

    /// Gives drive `drive_id` new limits at once (`PATCH /drives/{id}` with `rate_limiter`).
    pub fn update_rate_limiter(
        &self,
        drive_id: &str,
        update: &RateLimiterConfig,
    ) -> Result<(), DeviceError> {
        let block = self
            .find(drive_id)
            .ok_or_else(|| DeviceError::UnknownDrive {
                id: drive_id.to_string(),
            })?;
        lock(block)
            .update_rate_limiter(update)
            .map_err(|source| DeviceError::Block {
                id: drive_id.to_string(),
                source,
            })
    }

    /// Backs drive `drive_id` with the file at `path` from now on (`PATCH /drives/{id}` with
    /// `path_on_host`), opened read-only or read-write as the drive is; the guest is told the
    /// new capacity.
    pub fn update_path(&self, drive_id: &str, path: &Path) -> Result<(), DeviceError> {
        let block = self
            .find(drive_id)
            .ok_or_else(|| DeviceError::UnknownDrive {
                id: drive_id.to_string(),
            })?;
        let read_only = lock(block).read_only();
        // Opened before the device is locked: a slow open must not stall the guest's I/O.
        let mut file = open_disk(drive_id, path, read_only)?;
        let this = DiskUse {
            id: drive_id.to_string(),
            read_only,
            identity: identity(&file, drive_id, path)?,
        };
        let mut others = Vec::with_capacity(self.0.len());
        let mut same_file = None;
        for other in &self.0 {
            let other = lock(other);
            let current = other.backing_file();
            let metadata = current
                .metadata()
                .map_err(|source| DeviceError::OpenDrive {
                    id: other.id().to_string(),
                    path: path.to_path_buf(),
                    source,
                })?;
            let other_use = DiskUse {
                id: other.id().to_string(),
                read_only: other.read_only(),
                identity: (metadata.dev(), metadata.ino()),
            };
            if other.id() != drive_id {
                others.push(other_use);
            } else if other_use.identity == this.identity {
                // The file the drive has already (a size change to announce): a second open
                // of it could not take the lock this drive holds, so share that open instead.
                let shared = current
                    .try_clone()
                    .map_err(|source| DeviceError::OpenDrive {
                        id: drive_id.to_string(),
                        path: path.to_path_buf(),
                        source,
                    })?;
                same_file = Some(shared);
            }
        }
        check_not_shared(&this, path, &others)?;
        match same_file {
            Some(shared) => file = shared,
            None => lock_disk(&file, drive_id, path, read_only)?,
        }
        lock(block)
            .update_backing(file)
            .map_err(|source| DeviceError::UpdateDrive {
                id: drive_id.to_string(),
                path: path.to_path_buf(),
                source,
            })
    }
}

/// Opens a drive's file as the drive uses it, refusing anything but a file or block device.
fn open_disk(id: &str, path: &Path, read_only: bool) -> Result<File, DeviceError> {
    Ok(host_file::open(
        format!("drive {id}'s file"),
        path,
        FileKind::Disk,
        !read_only,
    )?)
}

/// Which file a drive uses: device and inode, so that two names of one file are one file.
type FileIdentity = (u64, u64);

fn identity(file: &File, id: &str, path: &Path) -> Result<FileIdentity, DeviceError> {
    let metadata = file.metadata().map_err(|source| DeviceError::OpenDrive {
        id: id.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    Ok((metadata.dev(), metadata.ino()))
}

/// A drive's file as the sharing rule sees it.
struct DiskUse {
    id: String,
    read_only: bool,
    identity: FileIdentity,
}

/// The one rule for drives sharing a file, wherever a drive gets its file (boot, restore,
/// `PATCH /drives`): drives may read one file together, but none may write a file another
/// drive uses (the guest would see its own writes change under it, and one file system
/// mounted twice read-write is corrupted).
fn check_not_shared(drive: &DiskUse, path: &Path, others: &[DiskUse]) -> Result<(), DeviceError> {
    let clash = others
        .iter()
        .find(|other| other.identity == drive.identity && !(drive.read_only && other.read_only));
    match clash {
        Some(other) => Err(DeviceError::SharedDisk {
            id: drive.id.clone(),
            other: other.id.clone(),
            path: path.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Takes the advisory lock that keeps two monitors from one image: exclusive for a writable
/// drive, shared for a read-only one. The lock goes with the last descriptor of this open file.
fn lock_disk(file: &File, id: &str, path: &Path, read_only: bool) -> Result<(), DeviceError> {
    let mode = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock only changes the lock of the open file behind a descriptor `file` owns for
    // the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.kind() == std::io::ErrorKind::WouldBlock {
        return Err(DeviceError::DiskLocked {
            id: id.to_string(),
            path: path.to_path_buf(),
            why: if read_only {
                "it is being written"
            } else {
                "a writable drive needs it to itself"
            },
        });
    }
    // A file system without locks (some network ones) still works, unprotected.
    warn!(
        "drive {id}: cannot lock {}: {err}; other monitors are not kept from it",
        path.display()
    );
    Ok(())
}

/// Opens `drive`'s file as the drive would use it, as `PUT /drives/{id}` does when the request
/// arrives: a missing file, or one that is not a disk, is refused then; so is the Async engine
/// on a host whose kernel refuses io_uring.
pub fn check_drive_file(drive: &DriveConfig) -> Result<(), DeviceError> {
    open_disk(&drive.drive_id, &drive.path_on_host, drive.is_read_only)?;
    if drive.io_engine == IoEngine::Async {
        devices::virtio::block::check_async_engine().map_err(|source| DeviceError::Block {
            id: drive.drive_id.clone(),
            source: source.into(),
        })?;
    }
    Ok(())
}

/// Opens every drive's file, refusing files that are not disks, a file that two drives
/// would share while one of them writes it, and files another process has locked.
pub fn open_drives(drives: &[DriveConfig]) -> Result<Vec<File>, DeviceError> {
    let mut files = Vec::with_capacity(drives.len());
    let mut uses: Vec<DiskUse> = Vec::with_capacity(drives.len());
    for drive in drives {
        let file = open_disk(&drive.drive_id, &drive.path_on_host, drive.is_read_only)?;
        let this = DiskUse {
            id: drive.drive_id.clone(),
            read_only: drive.is_read_only,
            identity: identity(&file, &drive.drive_id, &drive.path_on_host)?,
        };
        check_not_shared(&this, &drive.path_on_host, &uses)?;
        uses.push(this);
        files.push(file);
    }
    // Locked once the drives agree among themselves: two read-only drives of one file each
    // take a shared lock, and the sharing rule speaks before another process's lock does.
    for (drive, file) in drives.iter().zip(&files) {
        lock_disk(
            file,
            &drive.drive_id,
            &drive.path_on_host,
            drive.is_read_only,
        )?;
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    #[test]
    fn a_writer_locks_out_every_other_open_and_readers_share() {
        let image = TempFile::new().unwrap();
        let path = image.as_path();
        let open = |read_only| open_disk("d", path, read_only).unwrap();
        let reader = open(true);
        lock_disk(&reader, "d", path, true).unwrap();
        lock_disk(&open(true), "d", path, true).unwrap();
        let err = lock_disk(&open(false), "d", path, false).unwrap_err();
        assert!(matches!(err, DeviceError::DiskLocked { .. }), "{err}");
        drop(reader);
        let writer = open(false);
        lock_disk(&writer, "d", path, false).unwrap();
        for read_only in [true, false] {
            let err = lock_disk(&open(read_only), "d", path, read_only).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!(
                    "drive d's file {} is locked by another process",
                    path.display()
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn drives_may_share_a_file_only_to_read_it() {
        let disk = |id: &str, read_only| DiskUse {
            id: id.into(),
            read_only,
            identity: (1, 2),
        };
        let path = Path::new("/img");
        assert!(check_not_shared(&disk("b", true), path, &[disk("a", true)]).is_ok());
        for (a, b) in [(true, false), (false, true), (false, false)] {
            let err = check_not_shared(&disk("b", b), path, &[disk("a", a)]).unwrap_err();
            assert_eq!(
                err.to_string(),
                "drives a and b both use /img, and one of them writes it"
            );
        }
        let elsewhere = DiskUse {
            identity: (1, 3),
            ..disk("b", false)
        };
        assert!(check_not_shared(&elsewhere, path, &[disk("a", false)]).is_ok());
    }
}
