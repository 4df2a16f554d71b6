//! The guest's kernel and machine: Firecracker's `boot-source` and `machine-config`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, StaticCpuTemplate};
use crate::arch::{MAX_MEM_SIZE_MIB, MAX_VCPUS};

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

/// Firecracker's `machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u64,
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: with it, vCPUs pair up as sibling threads of one core.
    #[serde(default)]
    pub smt: bool,
    /// KVM logs the guest's writes to memory and the monitor keeps its own, so that Diff
    /// snapshots can write only the pages changed since the last snapshot.
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Firecracker's static CPU templates: only `None` (see [`StaticCpuTemplate`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<StaticCpuTemplate>,
}

/// How guest RAM is backed (Firecracker's names): ordinary pages, or 2 MiB pages from the
/// host's hugetlbfs pool (`vm.nr_hugepages`), reserved when the guest is built so that a pool
/// too small is an error then, not a SIGBUS later.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    #[default]
    None,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl HugePages {
    /// The size of the pages that back guest RAM.
    pub fn page_size(self) -> u64 {
        match self {
            HugePages::None => 4 << 10,
            HugePages::Hugetlbfs2M => 2 << 20,
        }
    }
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            cpu_template: None,
        }
    }
}

/// `PATCH /machine-config`: the fields to change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u64>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<HugePages>,
    pub cpu_template: Option<StaticCpuTemplate>,
}

impl MachineConfig {
    /// This configuration with `update`'s fields applied (not yet validated).
    pub fn updated(&self, update: &MachineConfigUpdate) -> Self {
        Self {
            vcpu_count: update.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: update.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: update.smt.unwrap_or(self.smt),
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: update.huge_pages.unwrap_or(self.huge_pages),
            cpu_template: update.cpu_template.or(self.cpu_template),
        }
    }
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=u64::from(MAX_VCPUS)).contains(&self.vcpu_count) {
            return Err(ConfigError::VcpuCount(self.vcpu_count));
        }
        if self.mem_size_mib == 0 {
            return Err(ConfigError::MemSizeZero);
        }
        // Also what keeps the size in bytes from overflowing wherever it is computed.
        if self.mem_size_mib > MAX_MEM_SIZE_MIB {
            return Err(ConfigError::MemSizeTooLarge(self.mem_size_mib));
        }
        if self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 == 1 {
            return Err(ConfigError::SmtOddVcpus(self.vcpu_count));
        }
        if let Some(template) = self.cpu_template.filter(|t| *t != StaticCpuTemplate::None) {
            return Err(ConfigError::StaticCpuTemplate(template));
        }
        if (self.mem_size_mib << 20) % self.huge_pages.page_size() != 0 {
            return Err(ConfigError::MemSizeNotHugePages(self.mem_size_mib));
        }
        Ok(())
    }

    /// The vCPU count once validated.
    pub fn vcpus(&self) -> Result<u8, ConfigError> {
        self.validate()?;
        u8::try_from(self.vcpu_count).map_err(|_| ConfigError::VcpuCount(self.vcpu_count))
    }
}
