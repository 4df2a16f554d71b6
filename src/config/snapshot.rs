//! The bodies of `PUT /snapshot/create` and `PUT /snapshot/load` (Firecracker's shapes), and
//! what a load's overrides change in the snapshot's configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::net::MacAddr;
use super::VmConfigFile;
use crate::snapshot::lazy::DEFAULT_WORKING_SET_WINDOW;
use crate::snapshot::uffd::watch::DEFAULT_FAULT_TIMEOUT;

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotParams {
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSnapshotParams {
    pub snapshot_path: PathBuf,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Firecracker's older form of `mem_backend` with a file.
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    /// The guest's clock advances by the host's real time since the snapshot (x86_64's
    /// kvm-clock), rather than carrying on from where it stood.
    #[serde(default)]
    pub clock_realtime: bool,
    /// Other TAP devices for the snapshot's network interfaces (clones need their own).
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// mote's extension: another socket path for the snapshot's vsock device (clones need
    /// their own; the saved one belongs to the VM the snapshot was taken from).
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// mote's extension: the restored VM's MMDS data store (a snapshot keeps the MMDS
    /// configuration but not the data, as Firecracker's does: a clone gets its own here).
    #[serde(default)]
    pub mmds_data: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: PathBuf,
    /// mote's extension, Uffd only: how long a guest memory fault may wait unread by the
    /// page-fault handler before the monitor ends with a message (0: never); 30 s when unset.
    #[serde(default)]
    pub fault_timeout_ms: Option<u64>,
    /// mote's extension, Lazy only: for how long after the VM is resumed the pages the guest
    /// faults are recorded as the snapshot's working set, when it has none yet (0: never);
    /// 1000 ms when unset.
    #[serde(default)]
    pub working_set_ms: Option<u64>,
}

/// Where a load's guest memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySource<'a> {
    /// The memory file, mapped privately.
    File(&'a Path),
    /// A page-fault handler listening on this socket (Firecracker's `Uffd`), which must read
    /// each fault within `fault_timeout` (None: no limit).
    Uffd {
        socket: &'a Path,
        fault_timeout: Option<Duration>,
    },
    /// The memory file, served into anonymous memory by mote's own pager (mote's `Lazy`),
    /// which records a working set for `working_set_window` when the snapshot has none.
    Lazy {
        file: &'a Path,
        working_set_window: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
    /// mote's extension: the memory file served lazily by mote itself.
    Lazy,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
    /// mote's extension: the clone's own MAC. The device offers it in its configuration space
    /// from the restore on; a Linux driver reads the MAC when it probes, so the guest takes it
    /// up when it binds the driver again (or sets it itself).
    #[serde(default)]
    pub guest_mac: Option<MacAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// A `PUT /snapshot/load` body that cannot be acted on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadParamsError {
    #[error("mem_backend fault_timeout_ms is for backend_type Uffd only (it limits how long a fault may wait for the page-fault handler)")]
    TimeoutNeedsUffd,
    #[error("mem_backend working_set_ms is for backend_type Lazy only (it is how long mote's own pager records the pages a restored guest faults)")]
    WorkingSetNeedsLazy,
    #[error("no memory file given: set mem_backend (or mem_file_path)")]
    NoMemFile,
    #[error("give the memory file once: mem_backend or mem_file_path, not both")]
    TwoMemFiles,
    #[error("network_overrides names {0:?}, which the snapshot has no network interface for")]
    UnknownIface(String),
    #[error("vsock_override given, but the snapshot has no vsock device")]
    NoVsock,
}

impl LoadSnapshotParams {
    /// Where guest memory comes from, from whichever form the request used.
    pub fn memory_source(&self) -> Result<MemorySource<'_>, LoadParamsError> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err(LoadParamsError::TwoMemFiles),
            (Some(backend), None) => match (backend.backend_type, backend.fault_timeout_ms) {
                (MemBackendType::File | MemBackendType::Lazy, Some(_)) => {
                    Err(LoadParamsError::TimeoutNeedsUffd)
                }
                (MemBackendType::File | MemBackendType::Uffd, _)
                    if backend.working_set_ms.is_some() =>
                {
                    Err(LoadParamsError::WorkingSetNeedsLazy)
                }
                (MemBackendType::File, None) => Ok(MemorySource::File(&backend.backend_path)),
                (MemBackendType::Lazy, None) => Ok(MemorySource::Lazy {
                    file: &backend.backend_path,
                    working_set_window: backend
                        .working_set_ms
                        .map_or(DEFAULT_WORKING_SET_WINDOW, Duration::from_millis),
                }),
                (MemBackendType::Uffd, timeout) => Ok(MemorySource::Uffd {
                    socket: &backend.backend_path,
                    fault_timeout: match timeout {
                        None => Some(DEFAULT_FAULT_TIMEOUT),
                        Some(0) => None,
                        Some(ms) => Some(Duration::from_millis(ms)),
                    },
                }),
            },
            (None, Some(path)) => Ok(MemorySource::File(path)),
            (None, None) => Err(LoadParamsError::NoMemFile),
        }
    }

    /// Puts the overrides into the snapshot's configuration: the TAPs and the vsock socket a
    /// clone uses instead of its original's.
    pub fn apply_overrides(&self, config: &mut VmConfigFile) -> Result<(), LoadParamsError> {
        for change in &self.network_overrides {
            let iface = config
                .network_interfaces
                .iter_mut()
                .find(|iface| iface.iface_id == change.iface_id)
                .ok_or_else(|| LoadParamsError::UnknownIface(change.iface_id.clone()))?;
            iface.host_dev_name = change.host_dev_name.clone();
            if let Some(mac) = change.guest_mac {
                iface.guest_mac = Some(mac);
            }
        }
        if let Some(vsock) = &self.vsock_override {
            let saved = config.vsock.as_mut().ok_or(LoadParamsError::NoVsock)?;
            saved.uds_path = vsock.uds_path.clone();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(body: &str) -> LoadSnapshotParams {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn overrides_change_only_what_they_name() {
        let mut config: VmConfigFile = serde_json::from_str(
            r#"{"network-interfaces": [
                   {"iface_id": "eth0", "host_dev_name": "tap0"},
                   {"iface_id": "eth1", "host_dev_name": "tap1"}],
                "vsock": {"guest_cid": 3, "uds_path": "/old.sock"}}"#,
        )
        .unwrap();
        let params = load(
            r#"{"snapshot_path": "s", "mem_file_path": "m",
                "network_overrides": [{"iface_id": "eth1", "host_dev_name": "tap9",
                                       "guest_mac": "06:00:ac:10:00:09"}],
                "vsock_override": {"uds_path": "/new.sock"}}"#,
        );
        params.apply_overrides(&mut config).unwrap();
        let macs: Vec<_> = config
            .network_interfaces
            .iter()
            .map(|iface| iface.guest_mac)
            .collect();
        assert_eq!(macs, [None, Some(MacAddr([6, 0, 0xac, 0x10, 0, 9]))]);
        let taps: Vec<_> = config
            .network_interfaces
            .iter()
            .map(|iface| iface.host_dev_name.as_str())
            .collect();
        assert_eq!(taps, ["tap0", "tap9"]);
        assert_eq!(config.vsock.unwrap().uds_path, Path::new("/new.sock"));
    }

    #[test]
    fn overrides_for_devices_the_snapshot_lacks_are_refused() {
        let mut config: VmConfigFile = serde_json::from_str("{}").unwrap();
        let iface = load(
            r#"{"snapshot_path": "s", "mem_file_path": "m",
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]}"#,
        );
        assert_eq!(
            iface.apply_overrides(&mut config),
            Err(LoadParamsError::UnknownIface("eth0".into()))
        );
        let vsock = load(
            r#"{"snapshot_path": "s", "mem_file_path": "m",
                "vsock_override": {"uds_path": "/new.sock"}}"#,
        );
        assert_eq!(
            vsock.apply_overrides(&mut config),
            Err(LoadParamsError::NoVsock)
        );
    }

    #[test]
    fn the_memory_file_is_named_once() {
        let both = load(
            r#"{"snapshot_path": "s", "mem_file_path": "m",
                "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#,
        );
        assert_eq!(both.memory_source(), Err(LoadParamsError::TwoMemFiles));
        let none = load(r#"{"snapshot_path": "s"}"#);
        assert_eq!(none.memory_source(), Err(LoadParamsError::NoMemFile));
        let old = load(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#);
        assert_eq!(old.memory_source(), Ok(MemorySource::File(Path::new("m"))));
    }

    #[test]
    fn a_uffd_backend_has_a_fault_time_out_and_a_file_none() {
        let uffd = |extra: &str| {
            load(&format!(
                r#"{{"snapshot_path": "s",
                    "mem_backend": {{"backend_type": "Uffd", "backend_path": "/u.sock"{extra}}}}}"#
            ))
        };
        let source = |timeout| MemorySource::Uffd {
            socket: Path::new("/u.sock"),
            fault_timeout: timeout,
        };
        assert_eq!(
            uffd("").memory_source(),
            Ok(source(Some(DEFAULT_FAULT_TIMEOUT)))
        );
        assert_eq!(
            uffd(r#", "fault_timeout_ms": 1500"#).memory_source(),
            Ok(source(Some(Duration::from_millis(1500))))
        );
        assert_eq!(
            uffd(r#", "fault_timeout_ms": 0"#).memory_source(),
            Ok(source(None))
        );
        let file = load(
            r#"{"snapshot_path": "s",
                "mem_backend": {"backend_type": "File", "backend_path": "m",
                                "fault_timeout_ms": 5}}"#,
        );
        assert_eq!(file.memory_source(), Err(LoadParamsError::TimeoutNeedsUffd));
    }

    #[test]
    fn a_lazy_backend_records_a_working_set_for_a_second_unless_told() {
        let lazy = |extra: &str| {
            load(&format!(
                r#"{{"snapshot_path": "s",
                    "mem_backend": {{"backend_type": "Lazy", "backend_path": "m"{extra}}}}}"#
            ))
        };
        let source = |ms| MemorySource::Lazy {
            file: Path::new("m"),
            working_set_window: Duration::from_millis(ms),
        };
        assert_eq!(lazy("").memory_source(), Ok(source(1000)));
        assert_eq!(
            lazy(r#", "working_set_ms": 250"#).memory_source(),
            Ok(source(250))
        );
        assert_eq!(
            lazy(r#", "working_set_ms": 0"#).memory_source(),
            Ok(source(0))
        );
        assert_eq!(
            lazy(r#", "fault_timeout_ms": 5"#).memory_source(),
            Err(LoadParamsError::TimeoutNeedsUffd)
        );
        let uffd = load(
            r#"{"snapshot_path": "s",
                "mem_backend": {"backend_type": "Uffd", "backend_path": "u",
                                "working_set_ms": 5}}"#,
        );
        assert_eq!(
            uffd.memory_source(),
            Err(LoadParamsError::WorkingSetNeedsLazy)
        );
    }
}
