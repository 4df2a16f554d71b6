//! Turns [`VmResources`] into a VM, vCPUs paused: the only place that does. A boot and a
//! restore share their steps (the backends opened first, the VM and its memory, the devices
//! in one fixed order, the vCPUs) and differ in where the machine's state comes from: a kernel
//! loaded with its boot parameters written, or a snapshot's state put back.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use devices::legacy::boot_timer::BootTimer;
use devices::memory::GuestMemoryMmap;
use devices::mmds::{MmdsStack, SharedMmds, StackError};
use devices::virtio::net::Net;
use devices::virtio::vsock::Vsock;
use linux_loader::cmdline::Cmdline;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::{self, DEFAULT_BOOT_ARGS};
use crate::config::{
    validate_drives, validate_network_interfaces, BootSourceConfig, ConfigError, DriveConfig,
    VmResources,
};
pub use crate::device_manager::Console;
use crate::device_manager::{
    balloon_device, block_device, entropy_device, net_device, open_drives, vsock_device,
    DeviceError, DeviceManager, RestoreDevicesError, Subscriber,
};
use crate::host_file::{self, FileKind, HostFileError};
use crate::snapshot::MicrovmState;
use crate::sync::lock;
use crate::vmm::Vmm;
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("mmds: {0}")]
    Mmds(StackError),
    #[error("no kernel to boot: configure the boot source first (PUT /boot-source)")]
    NoBootSource,
    #[error("the microVM is already running")]
    AlreadyStarted,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    OpenFile(#[from] HostFileError),
    #[error("cannot read the size of {what} {path}: {source}")]
    FileSize {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load kernel image {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        source: arch::ArchError,
    },
    #[error("cannot load initrd {path}: {source}")]
    PlaceInitrd {
        path: PathBuf,
        source: arch::ArchError,
    },
    #[error("cannot read initrd {path} into guest memory: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("the kernel command line is {len} bytes, more than the {max} the guest accepts")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot write the boot state: {0}")]
    Configure(arch::ArchError),
    #[error("cannot set up vCPU {index}: {source}")]
    ConfigureVcpu {
        index: u8,
        source: arch::ArchVcpuError,
    },
    #[error("cannot create {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot restore vCPU {index}: {source}")]
    RestoreVcpu { index: u8, source: arch::StateError },
    #[error("the snapshot does not fit its own configuration: {saved} saved vCPUs for a machine of {configured}")]
    VcpuCount { saved: usize, configured: u8 },
    #[error(transparent)]
    RestoreDevices(#[from] RestoreDevicesError),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Io { what, source }
}

/// When the process started, to date the boot timer's measurement.
#[derive(Debug, Clone, Copy)]
pub struct ProcessStart {
    pub instant: Instant,
    pub cpu_us: u64,
}

/// A built VM and what its event loop must serve (the devices' data paths, the console).
pub struct Built {
    pub vmm: Vmm,
    pub subscribers: Vec<Subscriber>,
}

/// Opens a file the guest boots from, checking it is a regular file.
fn open_boot_file(what: &'static str, path: &Path) -> Result<File, BuildError> {
    Ok(host_file::open(what, path, FileKind::Regular, false)?)
}

/// Opens the kernel and initrd a boot source names, as `PUT /boot-source` does when the request
/// arrives (Firecracker's rule: a configuration that cannot boot is refused at the request that
/// made it so), with the messages a start would give.
pub fn check_boot_files(boot_source: &BootSourceConfig) -> Result<(), BuildError> {
    open_boot_file("kernel image", &boot_source.kernel_image_path)?;
    if let Some(initrd) = &boot_source.initrd_path {
        open_boot_file("initrd", initrd)?;
    }
    Ok(())
}

/// The kernel command line: the user's or the defaults, then the root device unless the user
/// named one. (The arch announces the devices on it, or elsewhere.)
fn build_cmdline(
    boot_args: Option<&str>,
    root: Option<&DriveConfig>,
) -> Result<Cmdline, BuildError> {
    let mut args = boot_args.unwrap_or(DEFAULT_BOOT_ARGS).trim().to_string();
    let names_root = args.split_whitespace().any(|arg| arg.starts_with("root="));
    if let Some(root) = root.filter(|_| !names_root) {
        let mode = if root.is_read_only { "ro" } else { "rw" };
        match &root.partuuid {
            Some(uuid) => args.push_str(&format!(" root=PARTUUID={uuid} {mode}")),
            None => args.push_str(&format!(" root=/dev/vda {mode}")),
        }
    }
    let args = args.trim();
    let max = arch::cmdline_capacity() - 1;
    if args.len() > max {
        return Err(BuildError::CmdlineTooLong {
            len: args.len(),
            max,
        });
    }
    let mut cmdline = Cmdline::new(arch::cmdline_capacity()).map_err(BuildError::Cmdline)?;
    if !args.is_empty() {
        cmdline.insert_str(args).map_err(BuildError::Cmdline)?;
    }
    Ok(cmdline)
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    boot: &arch::BootEntry,
    mut file: File,
    path: &Path,
) -> Result<arch::InitrdPlacement, BuildError> {
    let size = file
        .metadata()
        .map_err(|source| BuildError::FileSize {
            what: "initrd",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let placement =
        arch::initrd_placement(mem, boot, size).map_err(|source| BuildError::PlaceInitrd {
            path: path.to_path_buf(),
            source,
        })?;
    mem.read_exact_volatile_from(placement.address, &mut file, size as usize)
        .map_err(|source| BuildError::ReadInitrd {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(placement)
}

/// The devices' host resources, taken before anything costly so that a file that cannot be
/// used or a missing or busy TAP fails the start at once.
struct Backends {
    drive_files: Vec<File>,
    nets: Vec<Net>,
    vsock: Option<Vsock>,
}

/// Devices made before the build, by the requests that configured them: the vsock device,
/// whose host socket listens from `PUT /vsock` on, as Firecracker's does.
#[derive(Default)]
pub struct EarlyDevices {
    pub vsock: Option<Vsock>,
    /// The metadata service the API fills; the interfaces `mmds-config` names answer from it.
    pub mmds: Option<SharedMmds>,
}

/// Checks the configuration as a whole and opens the devices' backends; returns the vCPU count.
fn open_backends(
    resources: &VmResources,
    early: EarlyDevices,
) -> Result<(u8, Backends), BuildError> {
    let vcpu_count = resources.machine_config.vcpus()?;
    validate_drives(&resources.drives)?;
    validate_network_interfaces(&resources.network_interfaces)?;
    if let Some(vsock) = &resources.vsock {
        vsock.validate()?;
    }
    if let Some(entropy) = &resources.entropy {
        entropy.validate()?;
    }
    if let Some(balloon) = &resources.balloon {
        balloon.validate(&resources.machine_config)?;
    }
    let drive_files = open_drives(&resources.drives)?;
    let mut nets = resources
        .network_interfaces
        .iter()
        .map(net_device)
        .collect::<Result<Vec<_>, _>>()?;
    if let (Some(config), Some(mmds)) = (&resources.mmds_config, &early.mmds) {
        config.validate(&resources.network_interfaces)?;
        lock(mmds).set_options(config.version, config.imds_compat);
        for net in nets
            .iter_mut()
            .filter(|net| config.network_interfaces.iter().any(|id| id == net.id()))
        {
            let stack = MmdsStack::new(config.address(), mmds.clone()).map_err(BuildError::Mmds)?;
            net.set_mmds(stack);
        }
    }
    // The early device serves the configured one; a configuration without one made (a config
    // file, a snapshot) gets its device here.
    let vsock = match (&resources.vsock, early.vsock) {
        (Some(_), Some(made)) => Some(made),
        (Some(config), None) => Some(vsock_device(config)?),
        (None, _) => None,
    };
    Ok((
        vcpu_count,
        Backends {
            drive_files,
            nets,
            vsock,
        },
    ))
}

/// Attaches the configured devices in the order guests (and the probe's steps) rely on, the
/// same for a boot and a restore so that a snapshot finds its devices: drives (vda, …), then
/// network interfaces (eth0, …), then vsock, then the entropy device, then the balloon, then
/// the boot timer.
fn attach_devices(
    vm: &Vm,
    devices: &mut DeviceManager,
    resources: &VmResources,
    backends: Backends,
    start: ProcessStart,
) -> Result<(), BuildError> {
    for (drive, file) in resources.drives.iter().zip(backends.drive_files) {
        devices.attach_block(vm, block_device(drive, file)?)?;
    }
    for net in backends.nets {
        devices.attach_net(vm, net)?;
    }
    if let Some(vsock) = backends.vsock {
        devices.attach_virtio(vm, vsock)?;
    }
    if let Some(entropy) = &resources.entropy {
        devices.attach_virtio(vm, entropy_device(entropy)?)?;
    }
    if let Some(balloon) = &resources.balloon {
        devices.attach_balloon(vm, balloon_device(balloon)?)?;
    }
    if resources.boot_timer {
        devices.attach_boot_timer(BootTimer::new(start.instant, start.cpu_us))?;
    }
    Ok(())
}

/// Starts a thread for each vCPU, paused.
fn start_vcpus(
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    devices: &DeviceManager,
    exit_evt: &EventFd,
) -> Result<Vec<VcpuHandle>, BuildError> {
    let buses = devices.vcpu_buses();
    vcpu_fds
        .into_iter()
        .zip(0u8..)
        .map(|(fd, index)| {
            let exit = exit_evt
                .try_clone()
                .map_err(io_err("the vCPU exit event"))?;
            Vcpu::new(index, fd, buses.clone(), exit)
                .start()
                .map_err(io_err("a vCPU thread"))
        })
        .collect()
}

/// The VM's last steps, the same for a boot and a restore: the vCPU threads and the Vmm.
fn finish(
    vm: Vm,
    mut devices: DeviceManager,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    reset_evt: EventFd,
) -> Result<Built, BuildError> {
    let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("the vCPU exit event"))?;
    let vcpus = start_vcpus(vcpu_fds, &devices, &exit_evt)?;
    let subscribers = devices.take_subscribers();
    let vmm =
        Vmm::new(vm, vcpus, exit_evt, reset_evt, devices).map_err(io_err("the signal handlers"))?;
    Ok(Built { vmm, subscribers })
}

/// The device manager of a new VM, its legacy devices in place; `reset_evt` is the guest's
/// reset request.
fn device_manager(
    vm: &Vm,
    console: Console,
    restored: Option<&MicrovmState>,
) -> Result<(DeviceManager, EventFd), BuildError> {
    let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("the reset event"))?;
    let legacy_reset = reset_evt.try_clone().map_err(io_err("the reset event"))?;
    let serial_state = restored.map(|state| &state.devices.serial);
    let devices = DeviceManager::new(vm, console, serial_state, legacy_reset)?;
    Ok((devices, reset_evt))
}

/// Builds the VM `resources` describe, booting its kernel; the vCPUs wait to be resumed.
pub fn build_microvm_for_boot(
    resources: &VmResources,
    early: EarlyDevices,
    console: Console,
    start: ProcessStart,
) -> Result<Built, BuildError> {
    let boot_source = resources
        .boot_source
        .as_ref()
        .ok_or(BuildError::NoBootSource)?;
    let (vcpu_count, backends) = open_backends(resources, early)?;
    let mut kernel = open_boot_file("kernel image", &boot_source.kernel_image_path)?;
    let initrd = boot_source
        .initrd_path
        .as_deref()
        .map(|path| open_boot_file("initrd", path).map(|file| (file, path)))
        .transpose()?;

    let machine = &resources.machine_config;
    let mut vm = Vm::new(
        create_guest_memory(machine.mem_size_mib, machine.huge_pages)?,
        machine.track_dirty_pages,
    )?;
    // The vCPUs (and the interrupt controller that some arches create after them) come
    // before the devices whose interrupt lines they route.
    let template = resources.cpu_config.as_ref();
    let vcpu_fds = vm.create_vcpus(vcpu_count, template)?;
    let mem = vm.memory();
    let boot = arch::load_kernel(mem, &mut kernel).map_err(|source| BuildError::LoadKernel {
        path: boot_source.kernel_image_path.clone(),
        source,
    })?;
    let initrd = initrd
        .map(|(file, path)| load_initrd(mem, &boot, file, path))
        .transpose()?;

    let (mut devices, reset_evt) = device_manager(&vm, console, None)?;
    attach_devices(&vm, &mut devices, resources, backends, start)?;
    let vmgenid = arch::vmgenid_placement(mem).map_err(BuildError::Configure)?;
    devices.attach_vmgenid(&vm, vmgenid)?;
    let root = resources.drives.iter().find(|d| d.is_root_device);
    let cmdline = build_cmdline(boot_source.boot_args.as_deref(), root)?;
    arch::configure_system(
        mem,
        &boot,
        cmdline,
        devices.mmio_devices(),
        initrd,
        vcpu_count,
        &vmgenid,
    )
    .map_err(BuildError::Configure)?;

    let features = vm.vcpu_features(template)?;
    for (fd, index) in vcpu_fds.iter().zip(0u8..) {
        arch::configure_vcpu(fd, mem, &boot, &features, index, vcpu_count)
            .map_err(|source| BuildError::ConfigureVcpu { index, source })?;
    }
    finish(vm, devices, vcpu_fds, reset_evt)
}

/// Builds the VM a snapshot saved, in its saved state, from the snapshot's own configuration
/// `resources` and its mapped guest `memory`; the vCPUs stay paused until told to resume.
pub fn build_microvm_from_snapshot(
    resources: &VmResources,
    console: Console,
    start: ProcessStart,
    state: &MicrovmState,
    memory: GuestMemoryMmap,
    clock_realtime: bool,
    mmds: &SharedMmds,
) -> Result<Built, BuildError> {
    let early = EarlyDevices {
        vsock: None,
        mmds: Some(mmds.clone()),
    };
    let (vcpu_count, backends) = open_backends(resources, early)?;
    if state.vcpus.len() != usize::from(vcpu_count) {
        return Err(BuildError::VcpuCount {
            saved: state.vcpus.len(),
            configured: vcpu_count,
        });
    }

    let mut vm = Vm::new(memory, resources.machine_config.track_dirty_pages)?;
    vm.restore_state_before_vcpus(&state.vm, clock_realtime)?;
    let vcpu_fds = vm.create_vcpus(vcpu_count, resources.cpu_config.as_ref())?;
    let (mut devices, reset_evt) = device_manager(&vm, console, Some(state))?;
    attach_devices(&vm, &mut devices, resources, backends, start)?;
    devices.restore_state(&state.devices)?;
    // A clone must not share its random state with its siblings: a new generation ID, which
    // the guest hears of below.
    if let Some(vmgenid) = state.devices.vmgenid {
        devices.attach_vmgenid(&vm, vmgenid)?;
    }

    for ((fd, saved), index) in vcpu_fds.iter().zip(&state.vcpus).zip(0u8..) {
        saved
            .restore(fd)
            .map_err(|source| BuildError::RestoreVcpu { index, source })?;
    }
    vm.restore_state_after_vcpus(&state.vm)?;
    // The interrupt controllers hold their restored state now: the edge waits in them until
    // the vCPUs run.
    devices.notify_vmgenid()?;
    let mut built = finish(vm, devices, vcpu_fds, reset_evt)?;
    built.vmm.mark_paused();
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_command_line_is_firecrackers() {
        let cmdline = build_cmdline(None, None).unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            DEFAULT_BOOT_ARGS
        );
    }

    #[test]
    fn overlong_command_line_is_refused_with_its_length() {
        let args = "a".repeat(2048);
        match build_cmdline(Some(&args), None) {
            Err(BuildError::CmdlineTooLong {
                len: 2048,
                max: 2047,
            }) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(build_cmdline(Some(&"a".repeat(2047)), None).is_ok());
    }

    #[test]
    fn the_root_drive_joins_the_command_line() {
        let root = DriveConfig {
            drive_id: "rootfs".into(),
            path_on_host: "/r".into(),
            is_root_device: true,
            is_read_only: true,
            partuuid: None,
            cache_type: Default::default(),
            io_engine: Default::default(),
            rate_limiter: None,
        };
        let cmdline = build_cmdline(Some("console=ttyS0"), Some(&root)).unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 root=/dev/vda ro"
        );
        // A root the user named wins.
        let cmdline = build_cmdline(Some("root=/dev/vdb"), Some(&root)).unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            "root=/dev/vdb"
        );
    }

    #[test]
    fn a_directory_is_not_a_kernel() {
        let err = open_boot_file("kernel image", Path::new("/")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel image / is not a regular file (a directory)"
        );
    }
}
