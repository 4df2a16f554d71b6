//! Disks: Firecracker's `drives` entries and their updates after boot.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{validate_rate_limiter, ConfigError, RateLimiterConfig};

/// Firecracker's `drives` entry: a virtio-blk device backed by a host file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    /// The root file system: the first drive (`/dev/vda`), named on the command line.
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    /// The root partition's PARTUUID: with it the root is `root=PARTUUID=…` instead of
    /// `/dev/vda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default)]
    pub io_engine: IoEngine,
    /// Bytes (`bandwidth`) and requests (`ops`) the guest may move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Firecracker's drive cache types. Accepted for compatibility; mote offers the guest
/// VIRTIO_BLK_F_FLUSH and honours every flush (fdatasync) with either, as a flushed write must
/// never be lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

/// Firecracker's drive I/O engines: `Sync` carries out each request on the event loop as it
/// comes; `Async` hands reads, writes and flushes to the kernel through an io_uring, several at
/// once, with the same durability (a flush is an fdatasync that waits for the writes before
/// it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// `PATCH /drives/{id}`: a new backing file and/or new limits for a running guest's drive.
/// A bucket of the rate limiter left out stays as it is; one of size 0 is removed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    pub path_on_host: Option<PathBuf>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl DriveUpdate {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_rate_limiter(
            || format!("drive {} rate_limiter", self.drive_id),
            self.rate_limiter.as_ref(),
        )
    }
}

/// The longest drive id; also what the guest reads back with GET_ID (20 bytes).
pub const DRIVE_ID_MAX_LEN: usize = 20;

impl DriveConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if self.drive_id.is_empty()
            || self.drive_id.len() > DRIVE_ID_MAX_LEN
            || !self.drive_id.chars().all(valid_char)
        {
            return Err(ConfigError::DriveId(self.drive_id.clone()));
        }
        validate_rate_limiter(
            || format!("drive {} rate_limiter", self.drive_id),
            self.rate_limiter.as_ref(),
        )
    }
}

/// Checks a set of drives: valid and unique ids, at most one root device.
pub fn validate_drives(drives: &[DriveConfig]) -> Result<(), ConfigError> {
    for (index, drive) in drives.iter().enumerate() {
        drive.validate()?;
        if drives[..index].iter().any(|d| d.drive_id == drive.drive_id) {
            return Err(ConfigError::DuplicateDriveId(drive.drive_id.clone()));
        }
    }
    if drives.iter().filter(|d| d.is_root_device).count() > 1 {
        return Err(ConfigError::TwoRootDevices);
    }
    Ok(())
}
