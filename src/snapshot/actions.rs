//! What `PUT /snapshot/create` and `PUT /snapshot/load` do (their bodies are in `config/`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use devices::memory::GuestMemoryMmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use devices::virtio::state::DeviceSpecificState;

use super::diff::{check_base_pages, write_diff_memory_file, NotRebased};
use super::lazy::{self, LazyError};
use super::memory::{map_memory_file, write_memory_file};
use super::uffd::link::HandlerLink;
use super::uffd::watch::{self, WatchError};
use super::uffd::{self as uffd_backend, UffdBackendError};
use super::{
    read_state_file, write_state_file, MemoryFileKind, MicrovmState, NewFile, SnapshotError,
};
use crate::builder::{build_microvm_from_snapshot, BuildError, Built, Console, ProcessStart};
use crate::config::{
    ConfigError, CreateSnapshotParams, HugePages, LoadParamsError, LoadSnapshotParams,
    MemorySource, SnapshotType, VmResources,
};
use crate::device_manager::SaveDevicesError;
use crate::metrics::{LatencyTimer, METRICS};
use crate::vmm::{Vmm, VmmError};
use crate::vstate::dirty::DirtyPages;
use crate::vstate::memory::{guest_memory_layout, MemoryError};
use crate::vstate::vm::Lazily;
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotActionError {
    #[error("the microVM must be paused before a snapshot is taken (PATCH /vm {{\"state\": \"Paused\"}})")]
    NotPaused,
    #[error("Diff snapshots need dirty page tracking, which this microVM does not have: set track_dirty_pages in machine-config before boot (or enable_diff_snapshots when loading a snapshot), or take a Full snapshot")]
    DiffNeedsTracking,
    #[error(transparent)]
    NotRebased(#[from] NotRebased),
    #[error(transparent)]
    Params(#[from] LoadParamsError),
    #[error("cannot save the microVM: {0}")]
    SaveVcpus(#[from] VmmError),
    #[error("cannot save the microVM: {0}")]
    SaveVm(#[from] VmError),
    #[error("cannot save the microVM: {0}")]
    SaveDevices(#[from] SaveDevicesError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("the snapshot's configuration is invalid: {0}")]
    Config(#[from] ConfigError),
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
    #[error("the snapshot's guest memory was backed by 2 MiB huge pages, and such a snapshot can only be restored through the Uffd memory backend (as with Firecracker): mem_backend {{\"backend_type\": \"Uffd\", \"backend_path\": the socket of a page-fault handler}}")]
    HugePagesNeedUffd,
    #[error(transparent)]
    Uffd(#[from] UffdBackendError),
    #[error(transparent)]
    UffdWatch(#[from] WatchError),
    #[error("the snapshot's guest memory was backed by 2 MiB huge pages, which mote's Lazy memory backend does not serve: restore it through the Uffd memory backend")]
    HugePagesNotLazy,
    #[error("cannot restore the snapshot lazily: {0}")]
    Lazy(#[from] LazyError),
}

impl SnapshotActionError {
    /// Whether a failed load left the monitor as it was: only the request's own shape was
    /// refused, before anything of the snapshot was read or built. Any other failed load ends
    /// the monitor, as Firecracker's does: a half-loaded monitor is not reused.
    pub fn leaves_monitor_usable(&self) -> bool {
        matches!(
            self,
            SnapshotActionError::Params(
                LoadParamsError::TimeoutNeedsUffd
                    | LoadParamsError::WorkingSetNeedsLazy
                    | LoadParamsError::NoMemFile
                    | LoadParamsError::TwoMemFiles
            ) // Nothing is built before the hand-over to the handler: mapped guest memory
              // and the userfaultfd are dropped again, and the handler's connection closed.
              | SnapshotActionError::Uffd(_)
        )
    }
}

/// Writes a snapshot of the paused `vmm`, whose configuration is `resources`: Full, or Diff
/// (only the pages written since the last snapshot, which needs dirty page tracking). Both
/// files are written under new names and then renamed into place, the memory file first (so a
/// state file on disk always has its memory written); a failure leaves neither behind, and a
/// file replaced is never truncated (running VMs may map the old memory file). The guest is
/// not touched: a failure leaves it paused as it was, and the pages it had dirty stay so.
pub fn create_snapshot(
    vmm: &mut Vmm,
    resources: &VmResources,
    params: &CreateSnapshotParams,
) -> Result<(), SnapshotActionError> {
    let diff = params.snapshot_type == SnapshotType::Diff;
    let _latency = LatencyTimer::start(if diff {
        &METRICS.latencies_us.vmm_diff_create_snapshot
    } else {
        &METRICS.latencies_us.vmm_full_create_snapshot
    });
    if diff && !vmm.vm().tracks_dirty_pages() {
        return Err(SnapshotActionError::DiffNeedsTracking);
    }
    if !vmm.is_paused() {
        return Err(SnapshotActionError::NotPaused);
    }
    check_destinations(vmm.vm().memory(), params)?;
    let vcpus = vmm.save_vcpu_states()?;
    let vm = vmm.vm().save_state()?;
    let devices = vmm.device_manager().save_state()?;
    // Every snapshot, Full or Diff, starts a new diff. The pages are taken only now that the
    // devices are quiet (saving a block device waits for its requests in flight, whose reads
    // land in guest memory), and given back if the snapshot fails.
    let dirty = vmm.vm_mut().take_dirty_pages()?;
    let saved = SavedParts { vcpus, vm, devices };
    let written = write_snapshot(
        vmm.vm(),
        saved,
        resources,
        params,
        dirty.as_ref().filter(|_| diff),
    );
    if let (Err(_), Some(dirty)) = (&written, &dirty) {
        vmm.vm_mut().keep_dirty_pages(dirty);
    }
    written
}

/// What a snapshot saves of the vCPUs, the VM and the devices.
struct SavedParts {
    vcpus: Vec<crate::arch::VcpuState>,
    vm: crate::arch::VmState,
    devices: crate::device_manager::DevicesState,
}

/// [`create_snapshot`]'s files; a Diff's memory file holds the `diff` pages only.
fn write_snapshot(
    vm: &Vm,
    saved: SavedParts,
    resources: &VmResources,
    params: &CreateSnapshotParams,
    diff: Option<&DirtyPages>,
) -> Result<(), SnapshotActionError> {
    let SavedParts {
        vcpus,
        vm: vm_state,
        devices,
    } = saved;
    let mut config = resources.to_config_file();
    // The logger and metrics belong to the monitor process, not to the machine.
    config.logger = None;
    config.metrics = None;
    let mem_path = &params.mem_file_path;
    let mem_file = NewFile::create(mem_path).map_err(|source| SnapshotError::Write {
        what: "the memory file",
        path: mem_path.clone(),
        source,
    })?;
    let guest = vm.memory();
    let (memory, memory_file) = match diff {
        Some(dirty) => write_diff_memory_file(guest, dirty, mem_file.file(), mem_path),
        None => write_memory_file(guest, vm.memory_is_lazy(), mem_file.file(), mem_path)
            .map(|regions| (regions, MemoryFileKind::Full)),
    }
    .map_err(SnapshotError::from)?;
    if let Some(dirty) = diff {
        log::info!(
            "Diff snapshot: {} dirty pages in {}",
            dirty.count(),
            mem_path.display()
        );
    }
    let state = MicrovmState {
        config,
        memory,
        vm: vm_state,
        vcpus,
        devices,
        memory_file,
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

/// The snapshot's configuration with the overrides applied.
fn configuration(
    state: &MicrovmState,
    params: &LoadSnapshotParams,
) -> Result<VmResources, SnapshotActionError> {
    let mut config = state.config.clone();
    params.apply_overrides(&mut config)?;
    Ok(VmResources::from_config_file(config)?)
}

/// The saved network devices take the MACs `network_overrides` gives the clone, so that the
/// devices built from the overridden configuration match their saved state.
fn give_clone_macs(state: &mut MicrovmState, params: &LoadSnapshotParams) {
    for change in &params.network_overrides {
        let Some(new_mac) = change.guest_mac else {
            continue;
        };
        for slot in &mut state.devices.virtio {
            if let DeviceSpecificState::Net { iface_id, mac, .. } =
                &mut slot.transport.device.specific
            {
                if *iface_id == change.iface_id {
                    *mac = Some(new_mac.0);
                }
            }
        }
    }
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

/// Where a load's guest memory comes from, once the handler's socket (if any) is connected.
enum Backing<'a> {
    File(&'a Path),
    Uffd {
        stream: std::os::unix::net::UnixStream,
        socket: &'a Path,
        fault_timeout: Option<std::time::Duration>,
    },
    Lazy {
        file: &'a Path,
        working_set_window: std::time::Duration,
    },
}

/// Restores a snapshot: checks the state file, maps guest memory (the memory file, or anonymous
/// memory a page-fault handler fills), builds the VM in the saved state (vCPUs paused) with the
/// snapshot's configuration, which it returns with the VM. Nothing is left behind on failure.
pub fn load_snapshot(
    params: &LoadSnapshotParams,
    console: Console,
    start: ProcessStart,
    boot_timer: bool,
    mmds: &devices::mmds::SharedMmds,
) -> Result<(VmResources, Built), SnapshotActionError> {
    let _latency = LatencyTimer::start(&METRICS.latencies_us.vmm_load_snapshot);
    // The handler's socket first: a wrong path is refused before anything is read.
    let backing = match params.memory_source()? {
        MemorySource::File(path) => Backing::File(path),
        MemorySource::Uffd {
            socket,
            fault_timeout,
        } => Backing::Uffd {
            stream: uffd_backend::connect(socket)?,
            socket,
            fault_timeout,
        },
        MemorySource::Lazy {
            file,
            working_set_window,
        } => Backing::Lazy {
            file,
            working_set_window,
        },
    };
    let mut state = read_state_file(&params.snapshot_path)?;
    let mut resources = configuration(&state, params)?;
    let huge_pages = resources.machine_config.huge_pages;
    if huge_pages != HugePages::None {
        match backing {
            // A private mapping of the memory file would give the guest ordinary pages, and
            // Firecracker's rule is that a snapshot comes back in the pages it was taken in.
            Backing::File(_) => return Err(SnapshotActionError::HugePagesNeedUffd),
            Backing::Lazy { .. } => return Err(SnapshotActionError::HugePagesNotLazy),
            Backing::Uffd { .. } => {}
        }
    }
    give_clone_macs(&mut state, params);
    resources.boot_timer = boot_timer;
    // Tracking is the load's choice, as Firecracker's, whatever the snapshotted VM had (its
    // dirty pages are of no use to the clone): what GET /vm/config shows is what runs.
    resources.machine_config.track_dirty_pages =
        params.enable_diff_snapshots || params.track_dirty_pages;
    check_memory_layout(&state, &resources)?;
    let (memory, link, lazily) = match backing {
        Backing::File(mem_file) => {
            let memory = map_memory_file(mem_file, &state.memory).map_err(SnapshotError::from)?;
            check_base_pages(&memory, &state.memory_file, mem_file)?;
            (memory, None, None)
        }
        Backing::Lazy {
            file,
            working_set_window,
        } => {
            let (memory, pager) = lazy::restore(
                &params.snapshot_path,
                file,
                &state.memory,
                resources.machine_config.mem_size_mib,
                working_set_window,
            )?;
            // Read through the pager, as any page of a lazy restore.
            check_base_pages(&memory, &state.memory_file, file)?;
            (memory, None, Some(Lazily::Pager(pager)))
        }
        Backing::Uffd {
            stream,
            socket,
            fault_timeout,
        } => {
            let mib = resources.machine_config.mem_size_mib;
            let (memory, uffd) = uffd_backend::hand_over(&stream, socket, mib, huge_pages)?;
            // Watched from here on: every touch of guest memory below may wait on the handler.
            let uffd = std::sync::Arc::new(uffd);
            if let Some(limit) = fault_timeout {
                watch::start(uffd.clone(), socket.to_path_buf(), limit)?;
            }
            // A Diff's handler must serve its memory file rebased onto the base: the pages
            // the state names are read through it, as from a file.
            check_base_pages(&memory, &state.memory_file, socket)?;
            (
                memory,
                Some(HandlerLink::new(
                    stream,
                    socket.to_path_buf(),
                    uffd,
                    fault_timeout,
                )),
                Some(Lazily::Handler),
            )
        }
    };
    let mut built = build_microvm_from_snapshot(
        &resources,
        console,
        start,
        &state,
        memory,
        params.clock_realtime,
        mmds,
    )?;
    if let Some(lazily) = lazily {
        built.vmm.vm_mut().mark_memory_lazy(lazily);
    }
    if let Some(link) = link {
        built
            .subscribers
            .push(std::sync::Arc::new(std::sync::Mutex::new(link)));
    }
    Ok((resources, built))
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
