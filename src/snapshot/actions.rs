//! `PUT /snapshot/create` and `PUT /snapshot/load`: their bodies (Firecracker's shapes) and
//! what they do.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::memory::{map_memory_file, write_memory_file};
use super::{
    read_state_file, write_state_file, DevicesState, MicrovmState, NewFile, SnapshotError,
    VirtioSlotState,
};
use crate::builder::{build, BuildError, Console, Restore};
use crate::config::{VmConfigFile, VmResources};
use crate::device_manager::Subscriber;
use crate::vmm::Vmm;
use crate::vstate::memory::{guest_memory_layout, MemoryError};

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
    #[error("the snapshot's memory regions ({saved}) do not match the machine's layout for its {configured} MiB ({expected})")]
    MemoryLayout {
        saved: String,
        configured: u64,
        expected: String,
    },
    #[error("the snapshot's guest memory: {0}")]
    MemorySize(#[from] MemoryError),
    #[error("snapshot_path and mem_file_path are the same file ({0}): a snapshot needs two")]
    SameFile(PathBuf),
    #[error("mem_file_path {0} is the memory file this microVM was restored from, which it still maps: write the snapshot to another file")]
    OwnMemoryFile(PathBuf),
    #[error("cannot look at {path}: {source}")]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot restore the snapshot: {0}")]
    Build(#[from] BuildError),
}

/// Writes a full snapshot of the paused `vmm`, whose configuration is `resources`. Both files
/// are written under new names and then renamed into place, the memory file first (so a state
/// file on disk always has its memory written); a failure leaves neither behind, and a file
/// replaced is never truncated (running VMs may map the old memory file). The guest is not
/// touched: a failure leaves it paused as it was.
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
    check_destinations(vmm.vm().memory(), params)?;
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
    let mem_path = &params.mem_file_path;
    let mem_file = NewFile::create(mem_path).map_err(|source| SnapshotError::Write {
        what: "the memory file",
        path: mem_path.clone(),
        source,
    })?;
    let memory = write_memory_file(vmm.vm().memory(), mem_file.file(), mem_path)
        .map_err(SnapshotError::from)?;
    let state = MicrovmState {
        config,
        memory,
        vm,
        vcpus,
        devices,
    };
    let state_file = write_state_file(&params.snapshot_path, &state)?;
    mem_file.commit().map_err(|source| SnapshotError::Write {
        what: "the memory file",
        path: mem_path.clone(),
        source,
    })?;
    if let Err(source) = state_file.commit() {
        // No state file refers to the new memory file: it must not stay as if it were one.
        let _ = std::fs::remove_file(mem_path);
        return Err(SnapshotError::Write {
            what: "the snapshot state file",
            path: params.snapshot_path.clone(),
            source,
        }
        .into());
    }
    Ok(())
}

/// Device and inode of the file at `path`, None when there is none.
fn identity(path: &Path) -> Result<Option<(u64, u64)>, SnapshotActionError> {
    match std::fs::metadata(path) {
        Ok(metadata) => Ok(Some((metadata.dev(), metadata.ino()))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SnapshotActionError::Stat {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Whether two paths name one file: as spelt, by device and inode when the file exists, or
/// by the same name in the same directory when it does not yet.
fn same_file(a: &Path, b: &Path) -> Result<bool, SnapshotActionError> {
    if a == b {
        return Ok(true);
    }
    if let (Some(a), Some(b)) = (identity(a)?, identity(b)?) {
        return Ok(a == b);
    }
    let dir = |path: &Path| match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(a.file_name() == b.file_name()
        && identity(&dir(a))?.is_some()
        && identity(&dir(a))? == identity(&dir(b))?)
}

/// Refuses destinations that cannot work: one file for both, or the memory file this VM was
/// restored from (its guest memory is a private mapping of that file: replacing it would
/// keep the guest whole, but a snapshot there is almost always a mistake that loses the old
/// snapshot the guest still reads from).
fn check_destinations(
    mem: &GuestMemoryMmap,
    params: &CreateSnapshotParams,
) -> Result<(), SnapshotActionError> {
    if same_file(&params.snapshot_path, &params.mem_file_path)? {
        return Err(SnapshotActionError::SameFile(params.snapshot_path.clone()));
    }
    let Some(target) = identity(&params.mem_file_path)? else {
        return Ok(());
    };
    for region in mem.iter() {
        let Some(mapped) = region.file_offset() else {
            continue;
        };
        let metadata = mapped
            .file()
            .metadata()
            .map_err(|source| SnapshotActionError::Stat {
                path: params.mem_file_path.clone(),
                source,
            })?;
        if (metadata.dev(), metadata.ino()) == target {
            return Err(SnapshotActionError::OwnMemoryFile(
                params.mem_file_path.clone(),
            ));
        }
    }
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

/// Checks the saved memory regions against the layout a fresh boot of the snapshot's machine
/// would have: a CRC-valid file can still say anything, and a region the machine would not
/// have (in the MMIO gap, or not matching the size) would start a guest that cannot run.
fn check_memory_layout(
    state: &MicrovmState,
    resources: &VmResources,
) -> Result<(), SnapshotActionError> {
    let configured = resources.machine_config.mem_size_mib;
    let expected = guest_memory_layout(configured)?;
    let matches = state.memory.len() == expected.len()
        && state
            .memory
            .iter()
            .zip(&expected)
            .all(|(saved, (addr, size))| {
                saved.guest_addr == addr.raw_value() && saved.size == *size as u64
            });
    if !matches {
        let show = |regions: &mut dyn Iterator<Item = (u64, u64)>| {
            regions
                .map(|(addr, size)| format!("{size:#x} bytes at {addr:#x}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(SnapshotActionError::MemoryLayout {
            saved: show(&mut state.memory.iter().map(|r| (r.guest_addr, r.size))),
            configured,
            expected: show(
                &mut expected
                    .iter()
                    .map(|(addr, size)| (addr.raw_value(), *size as u64)),
            ),
        });
    }
    Ok(())
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
    check_memory_layout(&state, &resources)?;
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

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    #[test]
    fn one_file_under_two_names_is_one_file() {
        let dir = TempDir::new().unwrap();
        let (a, b) = (dir.as_path().join("a"), dir.as_path().join("b"));
        // Neither exists yet: the same name in the same directory, however it is spelt.
        assert!(same_file(&a, &a).unwrap());
        assert!(same_file(&a, &dir.as_path().join(".").join("a")).unwrap());
        assert!(!same_file(&a, &b).unwrap());
        std::fs::write(&a, b"x").unwrap();
        std::fs::hard_link(&a, &b).unwrap();
        assert!(same_file(&a, &b).unwrap());
        std::fs::remove_file(&b).unwrap();
        std::fs::write(&b, b"y").unwrap();
        assert!(!same_file(&a, &b).unwrap());
    }
}
