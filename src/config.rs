//! What a VM is made of, as data: the same serde types serve the command line, the config file
//! and the API (Firecracker's JSON shapes). The builder is the only consumer that makes a VM.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::MAX_VCPUS;

/// Firecracker's `boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// The whole kernel command line; the default boot arguments when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// Firecracker's `machine-config` (the parts a guest can observe so far).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u64,
    pub mem_size_mib: u64,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vcpu_count {0} is out of range: a guest has 1 to {MAX_VCPUS} vCPUs")]
    VcpuCount(u64),
    #[error("mem_size_mib 0 is out of range: a guest needs memory")]
    MemSizeZero,
    #[error("drive_id {0:?} is invalid: use 1 to 20 letters, digits, '_' or '-'")]
    DriveId(String),
    #[error("drive_id {0:?} is given twice")]
    DuplicateDriveId(String),
    #[error("more than one drive has is_root_device set")]
    TwoRootDevices,
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=u64::from(MAX_VCPUS)).contains(&self.vcpu_count) {
            return Err(ConfigError::VcpuCount(self.vcpu_count));
        }
        if self.mem_size_mib == 0 {
            return Err(ConfigError::MemSizeZero);
        }
        Ok(())
    }

    /// The vCPU count once validated.
    pub fn vcpus(&self) -> Result<u8, ConfigError> {
        self.validate()?;
        u8::try_from(self.vcpu_count).map_err(|_| ConfigError::VcpuCount(self.vcpu_count))
    }
}

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
        Ok(())
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

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmResources {
    pub boot_source: BootSourceConfig,
    pub machine_config: MachineConfig,
    /// In the order the guest sees them (`vda`, `vdb`, …); the root device, if any, first.
    pub drives: Vec<DriveConfig>,
    /// Add the boot-timer device and log the guest's boot time.
    pub boot_timer: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_count_must_be_1_to_32() {
        let mut config = MachineConfig::default();
        for bad in [0, 33, 1000] {
            config.vcpu_count = bad;
            assert_eq!(config.validate(), Err(ConfigError::VcpuCount(bad)));
        }
        config.vcpu_count = 32;
        assert_eq!(config.vcpus(), Ok(32));
    }

    fn drive(id: &str, root: bool) -> DriveConfig {
        DriveConfig {
            drive_id: id.into(),
            path_on_host: "/d".into(),
            is_root_device: root,
            is_read_only: false,
        }
    }

    #[test]
    fn drive_ids_are_checked() {
        assert!(validate_drives(&[drive("rootfs", true), drive("data_1", false)]).is_ok());
        assert_eq!(
            validate_drives(&[drive("a b", false)]),
            Err(ConfigError::DriveId("a b".into()))
        );
        assert_eq!(
            validate_drives(&[drive(&"x".repeat(21), false)]),
            Err(ConfigError::DriveId("x".repeat(21)))
        );
        assert_eq!(
            validate_drives(&[drive("a", false), drive("a", false)]),
            Err(ConfigError::DuplicateDriveId("a".into()))
        );
        assert_eq!(
            validate_drives(&[drive("a", true), drive("b", true)]),
            Err(ConfigError::TwoRootDevices)
        );
    }

    #[test]
    fn zero_memory_is_refused() {
        let config = MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 0,
        };
        assert_eq!(config.validate(), Err(ConfigError::MemSizeZero));
    }

    #[test]
    fn firecracker_json_shapes_parse_and_unknown_fields_do_not() {
        let boot: BootSourceConfig =
            serde_json::from_str(r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#)
                .unwrap();
        assert_eq!(boot.boot_args.as_deref(), Some("console=ttyS0"));
        let err = serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
