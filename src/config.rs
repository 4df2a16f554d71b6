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

/// Firecracker's `machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u64,
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: with it, vCPUs pair up as sibling threads of one core.
    #[serde(default)]
    pub smt: bool,
    /// Kept for snapshots (diff snapshots need dirty-page tracking); no effect on a boot.
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
}

/// How guest RAM is backed. Only ordinary pages so far; Firecracker's "2M" (hugetlbfs) is
/// refused rather than silently ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    #[default]
    None,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
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
    #[error("iface_id {0:?} is invalid: use 1 to 64 letters, digits, '_' or '-'")]
    IfaceId(String),
    #[error("iface_id {0:?} is given twice")]
    DuplicateIfaceId(String),
    #[error("host_dev_name {0:?} is invalid: a TAP name has 1 to 15 bytes, no '/', ' ' or ','")]
    HostDevName(String),
    #[error("interfaces {first} and {second} both use the TAP {tap:?}")]
    DuplicateTap {
        first: String,
        second: String,
        tap: String,
    },
    #[error("interfaces {first} and {second} both have the MAC address {mac}")]
    DuplicateMac {
        first: String,
        second: String,
        mac: MacAddr,
    },
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=u64::from(MAX_VCPUS)).contains(&self.vcpu_count) {
            return Err(ConfigError::VcpuCount(self.vcpu_count));
        }
        if self.mem_size_mib == 0 {
            return Err(ConfigError::MemSizeZero);
        }
        if self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 == 1 {
            return Err(ConfigError::SmtOddVcpus(self.vcpu_count));
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
    /// The root partition's PARTUUID: with it the root is `root=PARTUUID=…` instead of
    /// `/dev/vda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default)]
    pub io_engine: IoEngine,
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

/// Firecracker's drive I/O engines; only synchronous I/O on the event loop here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    #[default]
    Sync,
}

/// `PATCH /drives/{id}`: a new backing file for a running guest's drive.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    pub path_on_host: Option<PathBuf>,
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

/// A MAC address, written `aa:bb:cc:dd:ee:ff` in JSON and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || {
            format!("invalid MAC address {text:?}: expected six hex bytes like 06:00:ac:10:00:02")
        };
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().filter(|p| p.len() == 2).ok_or_else(invalid)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(Self(bytes))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Firecracker's `network-interfaces` entry: a virtio-net device on an existing host TAP.
/// Firecracker's `rx_rate_limiter` and `tx_rate_limiter` are refused as unknown fields: mote
/// has no rate limiter yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    pub iface_id: String,
    /// The TAP device on the host (it must exist; mote does not create it).
    pub host_dev_name: String,
    /// The guest's MAC address; without one the guest picks its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<MacAddr>,
}

/// The longest interface id (Firecracker's limit for ids in paths).
pub const IFACE_ID_MAX_LEN: usize = 64;
/// The longest host interface name Linux takes.
pub const HOST_DEV_NAME_MAX_LEN: usize = 15;

impl NetworkInterfaceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if self.iface_id.is_empty()
            || self.iface_id.len() > IFACE_ID_MAX_LEN
            || !self.iface_id.chars().all(valid_char)
        {
            return Err(ConfigError::IfaceId(self.iface_id.clone()));
        }
        let name = &self.host_dev_name;
        if name.is_empty()
            || name.len() > HOST_DEV_NAME_MAX_LEN
            || name
                .chars()
                .any(|c| c == '/' || c == ',' || c.is_whitespace() || c == '\0')
        {
            return Err(ConfigError::HostDevName(name.clone()));
        }
        Ok(())
    }
}

/// Checks a set of interfaces: valid ids and names, no id, TAP or MAC used twice.
pub fn validate_network_interfaces(ifaces: &[NetworkInterfaceConfig]) -> Result<(), ConfigError> {
    for (index, iface) in ifaces.iter().enumerate() {
        iface.validate()?;
        for earlier in &ifaces[..index] {
            if earlier.iface_id == iface.iface_id {
                return Err(ConfigError::DuplicateIfaceId(iface.iface_id.clone()));
            }
            if earlier.host_dev_name == iface.host_dev_name {
                return Err(ConfigError::DuplicateTap {
                    first: earlier.iface_id.clone(),
                    second: iface.iface_id.clone(),
                    tap: iface.host_dev_name.clone(),
                });
            }
            if let Some(mac) = iface
                .guest_mac
                .filter(|mac| Some(*mac) == earlier.guest_mac)
            {
                return Err(ConfigError::DuplicateMac {
                    first: earlier.iface_id.clone(),
                    second: iface.iface_id.clone(),
                    mac,
                });
            }
        }
    }
    Ok(())
}

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

/// Firecracker's `logger`: where log lines go and what they show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// A file (appended to, created if missing) or a named pipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// Error, Warning, Info, Debug, Trace or Off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(default)]
    pub show_level: bool,
    #[serde(default)]
    pub show_log_origin: bool,
    /// Only lines from this module path (for example `mote::api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// Firecracker's `metrics`: where the JSON metrics lines go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A file (appended to, created if missing) or a named pipe.
    pub metrics_path: PathBuf,
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
}

impl VmResources {
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

    pub fn to_config_file(&self) -> VmConfigFile {
        VmConfigFile {
            boot_source: self.boot_source.clone(),
            machine_config: self.machine_config.clone(),
            drives: self.drives.clone(),
            network_interfaces: self.network_interfaces.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            vsock: self.vsock.clone(),
        }
    }

    /// The resources a config file describes, checked.
    pub fn from_config_file(file: VmConfigFile) -> Result<Self, ConfigError> {
        file.machine_config.validate()?;
        let mut resources = VmResources {
            boot_source: file.boot_source,
            machine_config: file.machine_config,
            logger: file.logger,
            metrics: file.metrics,
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
        Ok(resources)
    }
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
            partuuid: None,
            cache_type: CacheType::Unsafe,
            io_engine: IoEngine::Sync,
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
            mem_size_mib: 0,
            ..Default::default()
        };
        assert_eq!(config.validate(), Err(ConfigError::MemSizeZero));
    }

    #[test]
    fn a_root_drive_goes_first_and_a_drive_id_is_replaced() {
        let mut resources = VmResources::default();
        resources.insert_drive(drive("data", false)).unwrap();
        resources.insert_drive(drive("root", true)).unwrap();
        let ids: Vec<_> = resources
            .drives
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect();
        assert_eq!(ids, ["root", "data"]);
        let mut moved = drive("data", false);
        moved.path_on_host = "/e".into();
        resources.insert_drive(moved).unwrap();
        assert_eq!(resources.drives[1].path_on_host, PathBuf::from("/e"));
        assert_eq!(
            resources.insert_drive(drive("other", true)),
            Err(ConfigError::TwoRootDevices)
        );
        assert_eq!(resources.drives.len(), 2, "a refused drive changes nothing");
    }

    #[test]
    fn smt_needs_an_even_vcpu_count() {
        let config = MachineConfig {
            vcpu_count: 3,
            smt: true,
            ..Default::default()
        };
        assert_eq!(config.validate(), Err(ConfigError::SmtOddVcpus(3)));
    }

    #[test]
    fn a_config_file_round_trips() {
        let text = r#"{"boot-source": {"kernel_image_path": "/k"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
            "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true}]}"#;
        let file: VmConfigFile = serde_json::from_str(text).unwrap();
        let resources = VmResources::from_config_file(file).unwrap();
        assert_eq!(resources.machine_config.vcpu_count, 2);
        let again: VmConfigFile =
            serde_json::from_str(&serde_json::to_string(&resources.to_config_file()).unwrap())
                .unwrap();
        assert_eq!(VmResources::from_config_file(again).unwrap(), resources);
    }

    fn iface(id: &str, tap: &str, mac: Option<&str>) -> NetworkInterfaceConfig {
        NetworkInterfaceConfig {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: mac.map(|m| m.parse().unwrap()),
        }
    }

    #[test]
    fn network_interfaces_parse_and_are_checked() {
        let parsed: NetworkInterfaceConfig = serde_json::from_str(
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}"#,
        )
        .unwrap();
        assert_eq!(parsed, iface("eth0", "tap0", Some("06:00:ac:10:00:02")));
        assert_eq!(
            serde_json::to_string(&parsed).unwrap(),
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:ac:10:00:02"}"#
        );
        for bad in [
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "06:00:ac:10:00:zz",
            "0600ac100002",
        ] {
            let text =
                format!(r#"{{"iface_id": "a", "host_dev_name": "t", "guest_mac": "{bad}"}}"#);
            let err = serde_json::from_str::<NetworkInterfaceConfig>(&text).unwrap_err();
            assert!(err.to_string().contains("invalid MAC address"), "{err}");
        }
        let err = serde_json::from_str::<NetworkInterfaceConfig>(
            r#"{"iface_id": "a", "host_dev_name": "t", "rx_rate_limiter": {}}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `rx_rate_limiter`"),
            "{err}"
        );

        let mut resources = VmResources::default();
        resources
            .insert_network_interface(iface("eth0", "tap0", Some("06:00:00:00:00:01")))
            .unwrap();
        resources
            .insert_network_interface(iface("eth1", "tap1", None))
            .unwrap();
        assert!(matches!(
            resources.insert_network_interface(iface("eth2", "tap0", None)),
            Err(ConfigError::DuplicateTap { .. })
        ));
        assert!(matches!(
            resources.insert_network_interface(iface("eth2", "tap2", Some("06:00:00:00:00:01"))),
            Err(ConfigError::DuplicateMac { .. })
        ));
        assert_eq!(
            resources.insert_network_interface(iface("eth0", "much-too-long-name", None)),
            Err(ConfigError::HostDevName("much-too-long-name".into()))
        );
        assert_eq!(
            resources.insert_network_interface(iface("a b", "tap3", None)),
            Err(ConfigError::IfaceId("a b".into()))
        );
        // Replacing eth0 keeps its place.
        resources
            .insert_network_interface(iface("eth0", "tap9", None))
            .unwrap();
        let taps: Vec<_> = resources
            .network_interfaces
            .iter()
            .map(|i| i.host_dev_name.as_str())
            .collect();
        assert_eq!(taps, ["tap9", "tap1"]);
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

    fn vsock(cid: u64, path: &str) -> VsockConfig {
        VsockConfig {
            vsock_id: None,
            guest_cid: cid,
            uds_path: path.into(),
        }
    }

    #[test]
    fn vsock_cid_and_path_are_checked() {
        assert_eq!(vsock(3, "/v.sock").validate(), Ok(()));
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
            assert_eq!(vsock(cid, "/v").validate(), Err(ConfigError::VsockCid(cid)));
        }
        let long = format!("/{}", "p".repeat(VSOCK_UDS_PATH_MAX));
        assert_eq!(
            vsock(3, &long).validate(),
            Err(ConfigError::VsockPathTooLong {
                path: long.clone().into(),
                len: VSOCK_UDS_PATH_MAX + 1
            })
        );
        assert!(vsock(3, &long[..VSOCK_UDS_PATH_MAX]).validate().is_ok());
        assert_eq!(
            vsock(3, "/").check_path_free(),
            Err(ConfigError::VsockPathExists("/".into()))
        );
    }

    #[test]
    fn vsock_takes_firecrackers_shape_with_the_deprecated_id() {
        let text = r#"{"boot-source": {"kernel_image_path": "/k"},
            "vsock": {"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"}}"#;
        let file: VmConfigFile = serde_json::from_str(text).unwrap();
        let resources = VmResources::from_config_file(file).unwrap();
        assert_eq!(resources.vsock.as_ref().unwrap().guest_cid, 3);
        let shown = serde_json::to_value(resources.to_config_file()).unwrap();
        assert_eq!(
            shown["vsock"],
            serde_json::json!({"guest_cid": 3, "uds_path": "/tmp/v.sock"})
        );
        let bad: VmConfigFile =
            serde_json::from_str(r#"{"vsock": {"guest_cid": 2, "uds_path": "/v"}}"#).unwrap();
        assert_eq!(
            VmResources::from_config_file(bad),
            Err(ConfigError::VsockCid(2))
        );
    }
}
