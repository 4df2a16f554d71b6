//! What a VM is made of, as data: the same serde types serve the command line, the config file
//! and the API (Firecracker's JSON shapes). The builder is the only consumer that makes a VM.

mod balloon;
mod cpu_template;
mod drive;
mod entropy;
mod machine;
mod mmds;
mod net;
mod observability;
mod snapshot;
#[cfg(test)]
mod tests;
mod vsock;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::{MAX_MEM_SIZE_MIB, MAX_VCPUS};
pub use balloon::*;
pub use cpu_template::*;
pub use drive::*;
pub use entropy::*;
pub use machine::*;
pub use mmds::*;
pub use net::*;
pub use observability::*;
pub use snapshot::*;
pub use vsock::*;

pub use devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

/// Checks a rate limiter given for `what` (`drive rootfs rate_limiter`).
pub fn validate_rate_limiter(
    what: impl FnOnce() -> String,
    config: Option<&RateLimiterConfig>,
) -> Result<(), ConfigError> {
    match config.map(RateLimiterConfig::validate) {
        Some(Err(err)) => Err(ConfigError::RateLimiter {
            what: what(),
            reason: err.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Why a configuration is refused; each message names the field and the reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vcpu_count {0} is out of range: a guest has 1 to {MAX_VCPUS} vCPUs")]
    VcpuCount(u64),
    #[error("mem_size_mib 0 is out of range: a guest needs memory")]
    MemSizeZero,
    #[error("mem_size_mib {0} is out of range: a guest has at most {MAX_MEM_SIZE_MIB} MiB")]
    MemSizeTooLarge(u64),
    #[error("mem_size_mib {0} is not a whole number of huge pages: with huge_pages 2M it must be a multiple of 2")]
    MemSizeNotHugePages(u64),
    #[error("cpu_template {0:?}: mote has no static CPU templates; give the masks you need as a custom template with PUT /cpu-config (the config file's cpu-config)")]
    StaticCpuTemplate(StaticCpuTemplate),
    #[error("drive_id {0:?} is invalid: use 1 to 20 letters, digits, '_' or '-'")]
    DriveId(String),
    #[error("drive_id {0:?} is given twice")]
    DuplicateDriveId(String),
    #[error("more than one drive has is_root_device set")]
    TwoRootDevices,
    #[error("vcpu_count {0} does not suit smt: with smt the count must be 1 or even")]
    SmtOddVcpus(u64),
    #[error("vsock guest_cid {0} is out of range: 0-2 are reserved, a guest's is 3 to 2^32-2")]
    VsockCid(u64),
    #[error(
        "vsock uds_path {path:?} is {len} bytes, more than the {VSOCK_UDS_PATH_MAX} it may be"
    )]
    VsockPathTooLong { path: PathBuf, len: usize },
    #[error("vsock uds_path {0:?} is empty")]
    VsockPathEmpty(PathBuf),
    #[error("vsock uds_path {0:?} already exists: mote creates the socket itself")]
    VsockPathExists(PathBuf),
    #[error("{what}: {reason}")]
    RateLimiter { what: String, reason: String },
    #[error("Amount of pages requested is too large: balloon amount_mib {amount_mib} is more than the guest's {mem_size_mib} MiB")]
    BalloonTooLarge { amount_mib: u32, mem_size_mib: u64 },
    #[error("The memory size (MiB) is smaller than the previously set balloon device target size: mem_size_mib {mem_size_mib}, balloon amount_mib {amount_mib}")]
    MemSmallerThanBalloon { mem_size_mib: u64, amount_mib: u32 },
    #[error(
        "{section} is not supported: mote has no {feature} yet (give it as null, or leave it out)"
    )]
    UnsupportedSection {
        section: &'static str,
        feature: &'static str,
    },
    #[error("iface_id {0:?} is invalid: use 1 to 64 letters, digits, '_' or '-'")]
    IfaceId(String),
    #[error("iface_id {0:?} is given twice")]
    DuplicateIfaceId(String),
    #[error("host_dev_name {0:?} is invalid: a TAP name has 1 to 15 bytes, no '/', ' ' or ','")]
    HostDevName(String),
    #[error(
        "interface {iface_id}: mtu {mtu} is below the {} a driver takes",
        devices::virtio::net::MIN_MTU
    )]
    Mtu { iface_id: String, mtu: u16 },
    #[error("interfaces {first} and {second} both use the TAP {tap:?}")]
    DuplicateTap {
        first: String,
        second: String,
        tap: String,
    },
    #[error("The list of network interface IDs that allow forwarding MMDS requests is empty: mmds-config network_interfaces names none.")]
    MmdsNoInterfaces,
    #[error("The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface: mmds-config network_interfaces names {0:?}.")]
    MmdsUnknownInterface(String),
    #[error("The MMDS IPv4 address is not link local: mmds-config ipv4_address {0} is outside 169.254.0.0/16.")]
    MmdsAddress(std::net::Ipv4Addr),
    #[error("interfaces {first} and {second} both have the MAC address {mac}")]
    DuplicateMac {
        first: String,
        second: String,
        mac: MacAddr,
    },
}

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmResources {
    /// None until the API or a config file names a kernel.
    pub boot_source: Option<BootSourceConfig>,
    pub machine_config: MachineConfig,
    /// In the order the guest sees them (`vda`, `vdb`, …); the root device, if any, first.
    pub drives: Vec<DriveConfig>,
    /// Add the boot-timer device and log the guest's boot time.
    pub boot_timer: bool,
    /// Network interfaces in the guest's order (eth0, eth1, …).
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    pub logger: Option<LoggerConfig>,
    pub metrics: Option<MetricsConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// The entropy (virtio-rng) device, if any.
    pub entropy: Option<EntropyConfig>,
    /// The balloon device, if any; after boot its target and statistics interval follow the
    /// PATCH requests.
    pub balloon: Option<BalloonConfig>,
    /// The metadata service's configuration, if any (its data store is the controller's).
    pub mmds_config: Option<MmdsConfig>,
    /// The custom CPU template (`PUT /cpu-config`), if any.
    pub cpu_config: Option<CpuTemplate>,
    /// `--mmds-size-limit`: the most bytes of JSON the MMDS data store holds (None: the API's
    /// payload limit). A property of the process, not of the configuration.
    pub mmds_size_limit: Option<usize>,
}

/// The whole configuration in Firecracker's `--config-file` form, which `GET /vm/config`
/// also returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfigFile {
    #[serde(rename = "boot-source")]
    pub boot_source: Option<BootSourceConfig>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    #[serde(default)]
    pub logger: Option<LoggerConfig>,
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub entropy: Option<EntropyConfig>,
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<CpuTemplate>,
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<MmdsConfig>,
    /// Firecracker's sections for features mote does not have yet: written as Firecracker
    /// writes them when unset (`null`, `pmem` an empty list), so that a configuration
    /// Firecracker wrote or accepts loads here, and refused by name when they say anything.
    #[serde(default)]
    pub pmem: Option<Vec<serde_json::Value>>,
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: Option<serde_json::Value>,
}

impl VmConfigFile {
    /// The first section given for a feature mote does not have, as (section, feature).
    fn unsupported_section(&self) -> Option<(&'static str, &'static str)> {
        [
            (
                "pmem",
                "virtio-pmem devices",
                self.pmem.as_ref().is_some_and(|pmem| !pmem.is_empty()),
            ),
            (
                "memory-hotplug",
                "memory hot-plugging (virtio-mem)",
                self.memory_hotplug.is_some(),
            ),
        ]
        .into_iter()
        .find_map(|(section, feature, given)| given.then_some((section, feature)))
    }
}

impl VmResources {
    /// A machine configuration must leave room for the balloon's target (Firecracker's rule).
    pub fn check_machine_fits_balloon(&self, machine: &MachineConfig) -> Result<(), ConfigError> {
        match &self.balloon {
            Some(balloon) if u64::from(balloon.amount_mib) > machine.mem_size_mib => {
                Err(ConfigError::MemSmallerThanBalloon {
                    mem_size_mib: machine.mem_size_mib,
                    amount_mib: balloon.amount_mib,
                })
            }
            _ => Ok(()),
        }
    }

    /// Adds a drive, or replaces the one with the same id; a root device goes first.
    pub fn insert_drive(&mut self, drive: DriveConfig) -> Result<(), ConfigError> {
        drive.validate()?;
        let mut drives = self.drives.clone();
        match drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
            Some(existing) => *existing = drive,
            None => drives.push(drive),
        }
        // The root device is vda: move it to the front, the rest keep their order.
        drives.sort_by_key(|d| !d.is_root_device);
        validate_drives(&drives)?;
        self.drives = drives;
        Ok(())
    }

    /// Adds a network interface, or replaces the one with the same id (keeping its place).
    pub fn insert_network_interface(
        &mut self,
        iface: NetworkInterfaceConfig,
    ) -> Result<(), ConfigError> {
        iface.validate()?;
        let mut ifaces = self.network_interfaces.clone();
        match ifaces.iter_mut().find(|i| i.iface_id == iface.iface_id) {
            Some(existing) => *existing = iface,
            None => ifaces.push(iface),
        }
        validate_network_interfaces(&ifaces)?;
        self.network_interfaces = ifaces;
        Ok(())
    }

    /// Configures MMDS (`PUT /mmds/config`): the interfaces it names must exist.
    pub fn set_mmds_config(&mut self, mut config: MmdsConfig) -> Result<(), ConfigError> {
        config.validate(&self.network_interfaces)?;
        // Shown with the address in force, as Firecracker's `GET /vm/config` does.
        config.ipv4_address = Some(config.address());
        self.mmds_config = Some(config);
        Ok(())
    }

    pub fn to_config_file(&self) -> VmConfigFile {
        VmConfigFile {
            boot_source: self.boot_source.clone(),
            machine_config: self.machine_config.clone(),
            drives: self.drives.clone(),
            network_interfaces: self.network_interfaces.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            vsock: self.vsock.clone(),
            entropy: self.entropy.clone(),
            balloon: self.balloon.clone(),
            cpu_config: self.cpu_config.clone(),
            mmds_config: self.mmds_config.clone(),
            pmem: Some(Vec::new()),
            memory_hotplug: None,
        }
    }

    /// The resources a config file describes, checked.
    pub fn from_config_file(file: VmConfigFile) -> Result<Self, ConfigError> {
        if let Some((section, feature)) = file.unsupported_section() {
            return Err(ConfigError::UnsupportedSection { section, feature });
        }
        file.machine_config.validate()?;
        // Checked as given: inserting one by one would let a later entry with an id already
        // used replace the earlier one, as a PUT does, and a file's mistake would go unseen.
        validate_drives(&file.drives)?;
        validate_network_interfaces(&file.network_interfaces)?;
        let mut resources = VmResources {
            boot_source: file.boot_source,
            machine_config: file.machine_config,
            logger: file.logger,
            metrics: file.metrics,
            cpu_config: file.cpu_config,
            ..Default::default()
        };
        for drive in file.drives {
            resources.insert_drive(drive)?;
        }
        for iface in file.network_interfaces {
            resources.insert_network_interface(iface)?;
        }
        if let Some(vsock) = file.vsock {
            vsock.validate()?;
            resources.vsock = Some(vsock);
        }
        if let Some(entropy) = file.entropy {
            entropy.validate()?;
            resources.entropy = Some(entropy);
        }
        if let Some(balloon) = file.balloon {
            balloon.validate(&resources.machine_config)?;
            resources.balloon = Some(balloon);
        }
        if let Some(mmds) = file.mmds_config {
            resources.set_mmds_config(mmds)?;
        }
        Ok(resources)
    }
}
