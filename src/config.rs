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

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmResources {
    pub boot_source: BootSourceConfig,
    pub machine_config: MachineConfig,
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
