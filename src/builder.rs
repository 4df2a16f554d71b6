//! Turns [`VmResources`] into a running [`Vmm`]: the only place that does.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::boot_timer::BootTimer;
use devices::legacy::i8042::I8042;
use devices::legacy::serial::SerialDevice;
use devices::legacy::EventFdTrigger;
use devices::Bus;
use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{
    BOOT_TIMER_START, COM1_IRQ, COM1_PORT, COM1_PORT_LEN, I8042_IRQ, I8042_PORT, I8042_PORT_LEN,
    MMIO_SLOT_SIZE,
};
use crate::arch::{self, DEFAULT_BOOT_ARGS};
use crate::config::{
    validate_drives, validate_network_interfaces, ConfigError, DriveConfig, VmResources,
};
use crate::device_manager::{
    block_device, net_device, open_drives, vsock_device, DeviceError, DeviceHandles, MmioDevices,
    Subscriber,
};
use crate::host_file::{self, FileKind, HostFileError};
use crate::snapshot::{DevicesState, MicrovmState};
use crate::vmm::Vmm;
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
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
    #[error("cannot place a device: {0}")]
    Bus(#[from] devices::BusError),
    #[error("cannot restore vCPU {index}: {source}")]
    RestoreVcpu { index: u8, source: arch::StateError },
    #[error("the snapshot does not fit its own configuration: {0}")]
    SnapshotMismatch(String),
    #[error("cannot restore the virtio device at {addr:#x}: {source}")]
    DeviceState {
        addr: u64,
        source: devices::virtio::state::DeviceStateError,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Io { what, source }
}

/// Where the guest's console goes.
pub struct Console {
    pub output: Box<dyn Write + Send>,
    /// Read by the event loop; None gives the guest no input.
    pub input: Option<File>,
}

impl Console {
    /// The monitor's own stdout and stdin.
    pub fn stdio() -> std::io::Result<Self> {
        // A raw fd, not io::Stdin: Stdin buffers, and bytes held in its buffer would never
        // wake the event loop.
        let input = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map(File::from)?;
        Ok(Self {
            output: Box::new(std::io::stdout()),
            input: Some(input),
        })
    }
}

/// Opens a file the guest boots from, checking it is a regular file.
fn open_boot_file(what: &'static str, path: &Path) -> Result<File, BuildError> {
    Ok(host_file::open(what, path, FileKind::Regular, false)?)
}

/// The kernel command line: the user's or the defaults, then the root device (unless the user
/// named one) and the virtio-mmio devices.
fn build_cmdline(
    boot_args: Option<&str>,
    root: Option<&DriveConfig>,
    devices: &[String],
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
    for device in devices {
        args.push(' ');
        args.push_str(device);
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

/// Builds the VM described by `resources`, vCPUs paused, and returns it with the subscribers
/// the event loop must serve (device data paths, the console's input).
pub fn build_microvm(
    resources: &VmResources,
    console: Console,
    process_start: Instant,
    process_start_cpu_us: u64,
) -> Result<(Vmm, Vec<Subscriber>), BuildError> {
    build(
        resources,
        console,
        process_start,
        process_start_cpu_us,
        None,
    )
}

/// A snapshot to restore instead of booting a kernel: its state and its mapped memory file.
pub struct Restore<'a> {
    pub state: &'a MicrovmState,
    pub memory: GuestMemoryMmap,
}

/// Builds the VM of `resources`, vCPUs paused: booting its kernel, or, with `restore`, in the
/// state a snapshot saved (its `resources` being the snapshot's own configuration). Either
/// way the same devices are attached in the same order, so a snapshot finds its devices.
pub fn build(
    resources: &VmResources,
    console: Console,
    process_start: Instant,
    process_start_cpu_us: u64,
    restore: Option<Restore<'_>>,
) -> Result<(Vmm, Vec<Subscriber>), BuildError> {
    let vcpu_count = resources.machine_config.vcpus()?;
    if let Some(restore) = &restore {
        snapshot_matches(restore, vcpu_count)?;
    }
    validate_drives(&resources.drives)?;
    validate_network_interfaces(&resources.network_interfaces)?;
    if let Some(vsock) = &resources.vsock {
        vsock.validate()?;
    }
    let boot_source = resources
        .boot_source
        .as_ref()
        .ok_or(BuildError::NoBootSource)?;
    // Both opened before anything costly, so that a file that cannot be used fails the start
    // at once.
    let (kernel, initrd_file) = match restore {
        None => (
            Some(open_boot_file(
                "kernel image",
                &boot_source.kernel_image_path,
            )?),
            boot_source
                .initrd_path
                .as_deref()
                .map(|path| open_boot_file("initrd", path).map(|file| (file, path)))
                .transpose()?,
        ),
        Some(_) => (None, None),
    };
    let drive_files = open_drives(&resources.drives)?;
    // TAPs are taken before anything costly: a missing or busy TAP fails the start at once.
    let nets = resources
        .network_interfaces
        .iter()
        .map(net_device)
        .collect::<Result<Vec<_>, _>>()?;

    let memory = match &restore {
        Some(restore) => restore.memory.clone(),
        None => create_guest_memory(resources.machine_config.mem_size_mib)?,
    };
    let vm = Vm::new(memory)?;
    let mem = vm.memory();
    if let Some(restore) = &restore {
        vm.restore_state(&restore.state.vm)?;
    }

    let boot = match kernel {
        Some(mut kernel) => {
            let boot =
                arch::load_kernel(mem, &mut kernel).map_err(|source| BuildError::LoadKernel {
                    path: boot_source.kernel_image_path.clone(),
                    source,
                })?;
            let initrd = initrd_file
                .map(|(file, path)| load_initrd(mem, &boot, file, path))
                .transpose()?;
            Some((boot, initrd))
        }
        None => None,
    };

    let mut pio_bus = Bus::new();
    let mut mmio_bus = Bus::new();
    let mut mmio_devices = MmioDevices::default();
    // virtio-mmio slots go in this order, which guests (and the probe's steps) rely on:
    // drives (vda, …), then network interfaces (eth0, …), then vsock.
    for (drive, file) in resources.drives.iter().zip(drive_files) {
        mmio_devices.attach_block(&vm, &mut mmio_bus, block_device(drive, file)?)?;
    }
    for net in nets {
        mmio_devices.attach(&vm, &mut mmio_bus, net)?;
    }
    // vsock last, after the drives and the network interfaces.
    if let Some(vsock) = &resources.vsock {
        mmio_devices.attach(&vm, &mut mmio_bus, vsock_device(vsock)?)?;
    }
    if let Some((boot, initrd)) = &boot {
        let root = resources.drives.iter().find(|d| d.is_root_device);
        let cmdline = build_cmdline(
            boot_source.boot_args.as_deref(),
            root,
            &mmio_devices.cmdline_args,
        )?;
        arch::configure_system(mem, boot, &cmdline, *initrd, vcpu_count)
            .map_err(BuildError::Configure)?;
    }

    let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("the reset event"))?;

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("the serial IRQ event"))?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let serial = match &restore {
        Some(restore) => SerialDevice::from_state(
            EventFdTrigger::new(serial_irq),
            console.output,
            &restore.state.devices.serial,
        ),
        None => SerialDevice::new(EventFdTrigger::new(serial_irq), console.output),
    }
    .map_err(io_err("the serial port"))?;
    let mut subscribers = mmio_devices.subscribers;
    if let Some(input) = console.input {
        let input = serial.input(input).map_err(io_err("the serial input"))?;
        subscribers.push(Arc::new(Mutex::new(input)));
    }
    let serial = Arc::new(Mutex::new(serial));
    pio_bus.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)?;
    let i8042_reset = reset_evt.try_clone().map_err(io_err("the reset event"))?;
    let kbd_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("the keyboard IRQ event"))?;
    vm.register_irqfd(&kbd_irq, I8042_IRQ)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        EventFdTrigger::new(i8042_reset),
        EventFdTrigger::new(kbd_irq),
    )));
    pio_bus.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)?;
    let device_handles = DeviceHandles {
        i8042,
        serial,
        transports: mmio_devices.transports.clone(),
        drives: mmio_devices.drives.clone(),
    };
    if resources.boot_timer {
        let timer = BootTimer::new(process_start, process_start_cpu_us);
        mmio_bus.insert(
            Arc::new(Mutex::new(timer)),
            BOOT_TIMER_START,
            MMIO_SLOT_SIZE,
        )?;
    }

    if let Some(restore) = &restore {
        restore_devices(&device_handles, &restore.state.devices)?;
    }

    let pio_bus = Arc::new(pio_bus);
    let mmio_bus = Arc::new(mmio_bus);
    let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("the vCPU exit event"))?;
    // A restored vCPU gets its CPUID from the snapshot: asking KVM costs a fraction of a
    // millisecond that a restore need not pay.
    let supported_cpuid = match boot {
        Some(_) => Some(vm.supported_cpuid()?),
        None => None,
    };
    let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
    for index in 0..vcpu_count {
        let fd = vm.create_vcpu(index)?;
        if let Some(restore) = &restore {
            restore.state.vcpus[usize::from(index)]
                .restore(&fd)
                .map_err(|source| BuildError::RestoreVcpu { index, source })?;
        } else if let (Some((boot, _)), Some(supported_cpuid)) = (&boot, &supported_cpuid) {
            arch::configure_vcpu(&fd, mem, boot, supported_cpuid, index, vcpu_count)
                .map_err(|source| BuildError::ConfigureVcpu { index, source })?;
        }
        let exit = exit_evt
            .try_clone()
            .map_err(io_err("the vCPU exit event"))?;
        let vcpu = Vcpu::new(index, fd, pio_bus.clone(), mmio_bus.clone(), exit);
        vcpus.push(vcpu.start().map_err(io_err("a vCPU thread"))?);
    }

    let mut vmm = Vmm::new(vm, vcpus, exit_evt, reset_evt, device_handles)
        .map_err(io_err("the signal handlers"))?;
    if restore.is_some() {
        // A restored guest stays paused until it is told to resume.
        vmm.mark_paused();
    }
    Ok((vmm, subscribers))
}

/// Checks a snapshot against the configuration it carries, before anything is built.
fn snapshot_matches(restore: &Restore<'_>, vcpu_count: u8) -> Result<(), BuildError> {
    let state = restore.state;
    if state.vcpus.len() != usize::from(vcpu_count) {
        return Err(BuildError::SnapshotMismatch(format!(
            "{} saved vCPUs for a machine of {vcpu_count}",
            state.vcpus.len()
        )));
    }
    Ok(())
}

/// Puts the legacy devices' and the virtio transports' saved state into the rebuilt ones.
fn restore_devices(handles: &DeviceHandles, saved: &DevicesState) -> Result<(), BuildError> {
    handles
        .i8042
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .restore(&saved.i8042)
        .map_err(|err| BuildError::SnapshotMismatch(format!("i8042: {err}")))?;
    if saved.virtio.len() != handles.transports.len() {
        return Err(BuildError::SnapshotMismatch(format!(
            "{} virtio devices saved, {} configured",
            saved.virtio.len(),
            handles.transports.len()
        )));
    }
    for (slot, (addr, transport)) in saved.virtio.iter().zip(&handles.transports) {
        if slot.addr != *addr {
            return Err(BuildError::SnapshotMismatch(format!(
                "a virtio device saved at {:#x} is at {addr:#x} now",
                slot.addr
            )));
        }
        transport
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .restore_state(&slot.transport)
            .map_err(|source| BuildError::DeviceState {
                addr: *addr,
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_command_line_is_firecrackers() {
        let cmdline = build_cmdline(None, None, &[]).unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            DEFAULT_BOOT_ARGS
        );
    }

    #[test]
    fn overlong_command_line_is_refused_with_its_length() {
        let args = "a".repeat(2048);
        match build_cmdline(Some(&args), None, &[]) {
            Err(BuildError::CmdlineTooLong {
                len: 2048,
                max: 2047,
            }) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(build_cmdline(Some(&"a".repeat(2047)), None, &[]).is_ok());
    }

    #[test]
    fn root_drive_and_devices_join_the_command_line() {
        let root = DriveConfig {
            drive_id: "rootfs".into(),
            path_on_host: "/r".into(),
            is_root_device: true,
            is_read_only: true,
            partuuid: None,
            cache_type: Default::default(),
            io_engine: Default::default(),
        };
        let devices = ["virtio_mmio.device=4K@0xc0001000:5".to_string()];
        let cmdline = build_cmdline(Some("console=ttyS0"), Some(&root), &devices).unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 root=/dev/vda ro virtio_mmio.device=4K@0xc0001000:5"
        );
        // A root the user named wins.
        let cmdline = build_cmdline(Some("root=/dev/vdb"), Some(&root), &[]).unwrap();
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
