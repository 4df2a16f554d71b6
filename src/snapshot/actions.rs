//! `PUT /snapshot/create` and `PUT /snapshot/load`: their bodies (Firecracker's shapes) and
//! what they do.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;

use super::memory::map_memory_file;
use super::{
    read_state_file, write_state_file, DevicesState, MicrovmState, SnapshotError, VirtioSlotState,
};
use crate::builder::{build, BuildError, Console, Restore};
use crate::config::{VmConfigFile, VmResources};
use crate::device_manager::Subscriber;
use crate::vmm::Vmm;

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
    /// Other TAP devices for the snapshot's network interfaces (clones need their own).
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// mote's extension: another socket path for the snapshot's vsock device (clones need
    /// their own; the saved one belongs to the VM the snapshot was taken from).
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotActionError {
    #[error("the microVM must be paused before a snapshot is taken (PATCH /vm {{\"state\": \"Paused\"}})")]
    NotPaused,
    #[error("Diff snapshots are not supported by mote: take a Full snapshot")]
    DiffUnsupported,
    #[error("the Uffd memory backend is not supported by mote: use backend_type File")]
    UffdUnsupported,
    #[error("no memory file given: set mem_backend (or mem_file_path)")]
    NoMemFile,
    #[error("give the memory file once: mem_backend or mem_file_path, not both")]
    TwoMemFiles,
    #[error("cannot save the microVM: {0}")]
    Save(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("the snapshot's configuration is invalid: {0}")]
    Config(String),
    #[error("network_overrides names {0:?}, which the snapshot has no network interface for")]
    UnknownIface(String),
    #[error("vsock_override given, but the snapshot has no vsock device")]
    NoVsock,
    #[error("the snapshot's memory ({saved} MiB in its file layout) does not match its machine configuration ({configured} MiB)")]
    MemoryLayout { saved: u64, configured: u64 },
    #[error("cannot restore the snapshot: {0}")]
    Build(#[from] BuildError),
}

/// Writes a full snapshot of the paused `vmm`, whose configuration is `resources`: the memory
/// file first, then the state file (so a state file on disk always has its memory written).
/// The guest is not touched: a failure leaves it paused as it was.
pub fn create_snapshot(
    vmm: &mut Vmm,
    resources: &VmResources,
    params: &CreateSnapshotParams,
) -> Result<(), SnapshotActionError> {
    if params.snapshot_type == SnapshotType::Diff {
        return Err(SnapshotActionError::DiffUnsupported);
    }
    if !vmm.is_paused() {
        return Err(SnapshotActionError::NotPaused);
    }
    let save = |err: &dyn std::fmt::Display| SnapshotActionError::Save(err.to_string());
    let vcpus = vmm.save_vcpu_states().map_err(|err| save(&err))?;
    let vm = vmm.vm().save_state().map_err(|err| save(&err))?;
    let handles = vmm.devices();
    let mut virtio = Vec::with_capacity(handles.transports.len());
    for (addr, transport) in &handles.transports {
        let transport = lock(transport).save_state().map_err(|err| save(&err))?;
        virtio.push(VirtioSlotState {
            addr: *addr,
            transport,
        });
    }
    let devices = DevicesState {
        serial: lock(&handles.serial).state(),
        i8042: lock(&handles.i8042).state(),
        virtio,
    };
    let mut config = resources.to_config_file();
    // The logger and metrics belong to the monitor process, not to the machine.
    config.logger = None;
    config.metrics = None;
    let config = serde_json::to_string(&config).map_err(|err| save(&err))?;
    let memory = super::memory::write_memory_file(vmm.vm().memory(), &params.mem_file_path)
        .map_err(SnapshotError::from)?;
    let state = MicrovmState {
        config,
        memory,
        vm,
        vcpus,
        devices,
    };
    write_state_file(&params.snapshot_path, &state)?;
    Ok(())
}

fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl LoadSnapshotParams {
    /// The memory file, from whichever form the request used.
    pub fn mem_file(&self) -> Result<&Path, SnapshotActionError> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err(SnapshotActionError::TwoMemFiles),
            (Some(backend), None) => match backend.backend_type {
                MemBackendType::File => Ok(&backend.backend_path),
                MemBackendType::Uffd => Err(SnapshotActionError::UffdUnsupported),
            },
            (None, Some(path)) => Ok(path),
            (None, None) => Err(SnapshotActionError::NoMemFile),
        }
    }
}

/// The snapshot's configuration with the overrides applied, in the config file's JSON form (so
/// that overrides reach devices whatever fields their configuration has).
fn configuration(
    state: &MicrovmState,
    params: &LoadSnapshotParams,
) -> Result<VmResources, SnapshotActionError> {
    let config_err = |err: &dyn std::fmt::Display| SnapshotActionError::Config(err.to_string());
    let mut config: serde_json::Value =
        serde_json::from_str(&state.config).map_err(|err| config_err(&err))?;
    for change in &params.network_overrides {
        let iface = config
            .get_mut("network-interfaces")
            .and_then(|ifaces| ifaces.as_array_mut())
            .and_then(|ifaces| {
                ifaces
                    .iter_mut()
                    .find(|iface| iface["iface_id"] == change.iface_id.as_str())
            })
            .ok_or_else(|| SnapshotActionError::UnknownIface(change.iface_id.clone()))?;
        iface["host_dev_name"] = change.host_dev_name.clone().into();
    }
    if let Some(vsock) = &params.vsock_override {
        let saved = config
            .get_mut("vsock")
            .filter(|vsock| vsock.is_object())
            .ok_or(SnapshotActionError::NoVsock)?;
        saved["uds_path"] = vsock.uds_path.to_string_lossy().into_owned().into();
    }
    let file: VmConfigFile = serde_json::from_value(config).map_err(|err| config_err(&err))?;
    VmResources::from_config_file(file).map_err(|err| config_err(&err))
}

/// Restores a snapshot: checks the state file, maps the memory file, builds the VM in the saved
/// state (vCPUs paused) with the snapshot's configuration, which it returns with the VM.
/// Nothing is left behind on failure.
pub fn load_snapshot(
    params: &LoadSnapshotParams,
    console: Console,
    process_start: Instant,
    process_start_cpu_us: u64,
    boot_timer: bool,
) -> Result<(VmResources, Vmm, Vec<Subscriber>), SnapshotActionError> {
    if params.enable_diff_snapshots || params.track_dirty_pages {
        return Err(SnapshotActionError::DiffUnsupported);
    }
    let mem_file = params.mem_file()?;
    let state = read_state_file(&params.snapshot_path)?;
    let mut resources = configuration(&state, params)?;
    resources.boot_timer = boot_timer;
    let saved: u64 = state.memory.iter().map(|region| region.size).sum();
    let configured = resources.machine_config.mem_size_mib;
    if saved != configured << 20 {
        return Err(SnapshotActionError::MemoryLayout {
            saved: saved >> 20,
            configured,
        });
    }
    let memory = map_memory_file(mem_file, &state.memory).map_err(SnapshotError::from)?;
    let restore = Restore {
        state: &state,
        memory,
    };
    let (vmm, subscribers) = build(
        &resources,
        console,
        process_start,
        process_start_cpu_us,
        Some(restore),
    )?;
    Ok((resources, vmm, subscribers))
}
