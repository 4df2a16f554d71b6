//! Firecracker's `vsock` device.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Firecracker's `vsock`: a virtio-vsock device whose host side is the Unix socket `uds_path`
/// (host processes connect there; guest connections to port P go to `<uds_path>_<P>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Firecracker's deprecated device id: accepted and ignored.
    #[serde(default, skip_serializing)]
    pub vsock_id: Option<String>,
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// The longest Unix socket path: `sun_path` is 108 bytes with the terminating NUL. Guest
/// connections use `<uds_path>_<port>`, which may be up to 11 bytes longer.
pub const VSOCK_UDS_PATH_MAX: usize = 107;

impl VsockConfig {
    /// Checks the CID and the path's length (not whether the path is free: see
    /// [`VsockConfig::check_path_free`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        // VMADDR_CID_ANY (u32::MAX) and anything above 32 bits is no CID a guest can use.
        if !(3..u64::from(u32::MAX)).contains(&self.guest_cid) {
            return Err(ConfigError::VsockCid(self.guest_cid));
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 {
            return Err(ConfigError::VsockPathEmpty(self.uds_path.clone()));
        }
        if len > VSOCK_UDS_PATH_MAX {
            return Err(ConfigError::VsockPathTooLong {
                path: self.uds_path.clone(),
                len,
            });
        }
        Ok(())
    }

    /// The socket path must not exist: the device creates (and on exit removes) it.
    pub fn check_path_free(&self) -> Result<(), ConfigError> {
        if self.uds_path.symlink_metadata().is_ok() {
            return Err(ConfigError::VsockPathExists(self.uds_path.clone()));
        }
        Ok(())
    }
}
