//! The one owner of a VM's emulated devices: it hands out MMIO slots and IRQ lines, attaches
//! devices (queue notifications as KVM ioeventfds, interrupts as irqfds, the transport on the
//! MMIO bus), keeps the handles the running VM acts on (drives, the arch's legacy devices),
//! gives the event loop the devices' data paths, and saves and restores the devices' state
//! (`persist.rs`).

mod drives;
mod mmio;
mod persist;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::legacy::boot_timer::BootTimer;
use devices::legacy::serial::{SerialDevice, SerialDeviceState};
use devices::legacy::EventFdTrigger;
use devices::virtio::balloon::{Balloon, BalloonOptions, PAGES_PER_MIB};
use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use devices::virtio::net::{Net, NetError, NetLimits};
use devices::virtio::rng::{Rng, RngError};
use devices::virtio::vsock::{Vsock, VsockError};
use devices::virtio::VirtioDevice;
use devices::vmgenid::{VmGenId, VmGenIdError, VmGenIdState};
use devices::Bus;
use event_manager::MutEventSubscriber;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use self::drives::{check_drive_file, open_drives, Drives};
use self::mmio::MmioSlots;
pub use self::persist::{DevicesState, RestoreDevicesError, SaveDevicesError, VirtioSlotState};
use crate::arch::{
    LegacyDeviceError, LegacyDevices, MmioDeviceInfo, VcpuIo, BOOT_TIMER_START, MMIO_SLOT_SIZE,
};
use crate::config::{
    BalloonConfig, DriveConfig, EntropyConfig, IoEngine, NetworkInterfaceConfig,
    NetworkInterfaceUpdate, RateLimiterConfig, VsockConfig,
};
use crate::host_file::HostFileError;
use crate::metrics::METRICS;
use crate::sync::lock;
use crate::vstate::vm::{Vm, VmError};

/// A subscriber of the main thread's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot read drive {id}'s file {path}: {source}")]
    OpenDrive {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    DiskFile(#[from] HostFileError),
    #[error("drive {id}'s file {path} is locked by another process ({why})")]
    DiskLocked {
        id: String,
        path: PathBuf,
        why: &'static str,
    },
    #[error("drives {other} and {id} both use {path}, and one of them writes it")]
    SharedDisk {
        id: String,
        other: String,
        path: PathBuf,
    },
    #[error("cannot create drive {id}: {source}")]
    Block {
        id: String,
        source: devices::virtio::block::BlockError,
    },
    #[error("no drive has the id {id}")]
    UnknownDrive { id: String },
    #[error("cannot switch drive {id} to {path}: {source}")]
    UpdateDrive {
        id: String,
        path: PathBuf,
        source: devices::virtio::block::BlockError,
    },
    #[error("cannot create {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("network interface {id}: {source}")]
    Net { id: String, source: NetError },
    #[error("entropy device: {0}")]
    Rng(#[from] RngError),
    #[error("no network interface has the id {id}")]
    UnknownNet { id: String },
    #[error("vsock: {0}")]
    Vsock(#[from] VsockError),
    #[error("no IRQ line is left for another virtio device (at most {max})")]
    OutOfIrqs { max: u32 },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot place a device: {0}")]
    Bus(#[from] devices::BusError),
    #[error("devices cannot be attached once the vCPUs run")]
    BusInUse,
    #[error(transparent)]
    Legacy(#[from] LegacyDeviceError),
    #[error(transparent)]
    VmGenId(#[from] VmGenIdError),
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> DeviceError {
    move |source| DeviceError::Io { what, source }
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

/// What a vCPU thread needs to reach the devices.
#[derive(Clone)]
pub struct VcpuBuses {
    pub mmio: Arc<Bus>,
    /// The exits only this arch has (x86_64: port I/O).
    pub arch: VcpuIo,
}

pub struct DeviceManager {
    /// Shared with the vCPU threads once they exist; until then devices may be added.
    mmio_bus: Arc<Bus>,
    slots: MmioSlots,
    /// Every virtio transport with its slot, in slot order.
    transports: Vec<(MmioDeviceInfo, Arc<Mutex<MmioTransport>>)>,
    drives: Drives,
    /// The balloon, for `PATCH /balloon` and its statistics.
    balloon: Option<Arc<Mutex<Balloon>>>,
    /// The network interfaces, for `PATCH /network-interfaces`.
    nets: Vec<Arc<Mutex<Net>>>,
    /// The console's UART; where it sits is the arch's business.
    serial: Arc<Mutex<SerialDevice>>,
    legacy: LegacyDevices,
    /// The VM generation ID (None only for a VM restored from a snapshot taken before mote had
    /// one: its guest was never told of the device).
    vmgenid: Option<VmGenId>,
    /// The devices' data paths and the console's input, for the event loop.
    subscribers: Vec<Subscriber>,
}

impl DeviceManager {
    /// The console's UART and the arch's own devices; `reset_evt` is written when the guest
    /// asks for a reset. A restore gives the UART's saved state (its FIFO and registers are
    /// built in, not put back afterwards).
    pub fn new(
        vm: &Vm,
        console: Console,
        serial_state: Option<&SerialDeviceState>,
        reset_evt: EventFd,
    ) -> Result<Self, DeviceError> {
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("the serial IRQ event"))?;
        let trigger = EventFdTrigger::new(
            serial_irq
                .try_clone()
                .map_err(io_err("the serial IRQ event"))?,
        );
        let serial = match serial_state {
            Some(state) => SerialDevice::from_state(trigger, console.output, state),
            None => SerialDevice::new(trigger, console.output),
        }
        .map_err(io_err("the serial port"))?;
        let mut subscribers: Vec<Subscriber> = Vec::new();
        if let Some(input) = console.input {
            let input = serial.input(input).map_err(io_err("the serial input"))?;
            subscribers.push(Arc::new(Mutex::new(input)));
        }
        let serial = Arc::new(Mutex::new(serial));
        let mut mmio_bus = Bus::new();
        let legacy = LegacyDevices::create(
            vm.fd(),
            &mut mmio_bus,
            serial.clone(),
            &serial_irq,
            reset_evt,
        )?;
        Ok(Self {
            mmio_bus: Arc::new(mmio_bus),
            slots: MmioSlots::default(),
            transports: Vec::new(),
            drives: Drives::default(),
            balloon: None,
            nets: Vec::new(),
            serial,
            legacy,
            vmgenid: None,
            subscribers,
        })
    }

    /// The VM generation ID at `placement`, with a fresh ID in guest memory and its line
    /// connected. A restore passes the snapshot's placement: the guest found the device there.
    pub fn attach_vmgenid(&mut self, vm: &Vm, placement: VmGenIdState) -> Result<(), DeviceError> {
        let device = VmGenId::new(placement, vm.memory())?;
        vm.register_irqfd(device.irq_evt(), placement.irq)?;
        self.vmgenid = Some(device);
        Ok(())
    }

    /// Tells a restored guest that its generation ID changed (once its interrupt controllers
    /// hold their restored state).
    pub fn notify_vmgenid(&self) -> Result<(), DeviceError> {
        if let Some(vmgenid) = &self.vmgenid {
            vmgenid.notify_guest()?;
        }
        Ok(())
    }

    fn mmio_bus_mut(&mut self) -> Result<&mut Bus, DeviceError> {
        Arc::get_mut(&mut self.mmio_bus).ok_or(DeviceError::BusInUse)
    }

    /// Attaches `device` in the next MMIO slot; its data path is served on the event loop.
    /// Returns the handle the transport and the event loop share.
    pub fn attach_virtio<D: VirtioDevice + MutEventSubscriber + 'static>(
        &mut self,
        vm: &Vm,
        device: D,
    ) -> Result<Arc<Mutex<D>>, DeviceError> {
        let slot = self.slots.allocate()?;
        vm.register_irqfd(device.interrupt().irq_evt(), slot.irq)?;
        for (index, evt) in device.queue_events().iter().enumerate() {
            vm.register_mmio_ioevent(evt, slot.addr + REG_QUEUE_NOTIFY, index as u32)?;
        }
        let device = Arc::new(Mutex::new(device));
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            vm.memory().clone(),
            device.clone(),
        )));
        self.mmio_bus_mut()?
            .insert(transport.clone(), slot.addr, slot.len)?;
        self.transports.push((slot, transport));
        self.subscribers.push(device.clone());
        Ok(device)
    }

    /// Attaches a block device and keeps a handle to it for `PATCH /drives`.
    pub fn attach_block(&mut self, vm: &Vm, block: Block) -> Result<(), DeviceError> {
        let block = self.attach_virtio(vm, block)?;
        self.drives.push(block);
        Ok(())
    }

    /// Attaches the balloon and keeps a handle to it for the API.
    pub fn attach_balloon(&mut self, vm: &Vm, balloon: Balloon) -> Result<(), DeviceError> {
        self.balloon = Some(self.attach_virtio(vm, balloon)?);
        Ok(())
    }

    /// The balloon, if the VM has one.
    pub fn balloon(&self) -> Option<&Arc<Mutex<Balloon>>> {
        self.balloon.as_ref()
    }

    /// Attaches a network device and keeps a handle to it for `PATCH /network-interfaces`.
    pub fn attach_net(&mut self, vm: &Vm, net: Net) -> Result<(), DeviceError> {
        let net = self.attach_virtio(vm, net)?;
        self.nets.push(net);
        Ok(())
    }

    /// Firecracker's boot timer, at the arch's address.
    pub fn attach_boot_timer(&mut self, timer: BootTimer) -> Result<(), DeviceError> {
        self.mmio_bus_mut()?.insert(
            Arc::new(Mutex::new(timer)),
            BOOT_TIMER_START,
            MMIO_SLOT_SIZE,
        )?;
        Ok(())
    }

    /// The virtio-mmio devices, in slot order, for the arch to announce to the guest.
    pub fn mmio_devices(&self) -> &[MmioDeviceInfo] {
        self.slots.taken()
    }

    /// What the vCPU threads dispatch their exits to.
    pub fn vcpu_buses(&self) -> VcpuBuses {
        VcpuBuses {
            mmio: self.mmio_bus.clone(),
            arch: self.legacy.vcpu_io(),
        }
    }

    /// The event loop's share: the devices' data paths and the console's input (once).
    pub fn take_subscribers(&mut self) -> Vec<Subscriber> {
        std::mem::take(&mut self.subscribers)
    }

    /// Types Ctrl-Alt-Del on the guest's keyboard (`SendCtrlAltDel`).
    pub fn send_ctrl_alt_del(&self) -> Result<(), DeviceError> {
        Ok(self.legacy.send_ctrl_alt_del()?)
    }

    /// New limits for drive `drive_id`, at once (`PATCH /drives/{id}` with `rate_limiter`).
    pub fn update_drive_rate_limiter(
        &self,
        drive_id: &str,
        update: &RateLimiterConfig,
    ) -> Result<(), DeviceError> {
        self.drives.update_rate_limiter(drive_id, update)
    }

    /// New limits for a network interface, at once (`PATCH /network-interfaces/{id}`).
    pub fn update_net_rate_limiters(
        &self,
        update: &NetworkInterfaceUpdate,
    ) -> Result<(), DeviceError> {
        let net = self
            .nets
            .iter()
            .find(|net| lock(net).id() == update.iface_id)
            .ok_or_else(|| DeviceError::UnknownNet {
                id: update.iface_id.clone(),
            })?;
        lock(net)
            .update_rate_limiters(
                update.rx_rate_limiter.as_ref(),
                update.tx_rate_limiter.as_ref(),
            )
            .map_err(|source| DeviceError::Net {
                id: update.iface_id.clone(),
                source,
            })
    }

    /// Backs drive `drive_id` with the file at `path` (`PATCH /drives/{id}` with
    /// `path_on_host` after boot); the guest sees the new capacity.
    pub fn update_drive_path(&self, drive_id: &str, path: &Path) -> Result<(), DeviceError> {
        self.drives.update_path(drive_id, path)
    }
}

/// A virtio-blk device for `drive`, backed by its opened `file`.
pub fn block_device(drive: &DriveConfig, file: File) -> Result<Block, DeviceError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("an IRQ event"))?;
    let block_error = |source| DeviceError::Block {
        id: drive.drive_id.clone(),
        source,
    };
    let mut block = Block::new(
        drive.drive_id.clone(),
        file,
        drive.is_read_only,
        &drive.rate_limiter.unwrap_or_default(),
        irq,
    )
    .map_err(block_error)?;
    if drive.io_engine == IoEngine::Async {
        block.use_async_engine().map_err(block_error)?;
    }
    METRICS.register_block(&drive.drive_id, block.metrics().clone());
    Ok(block)
}

/// A virtio-net device for `iface`, attached to its TAP (which must exist and be free).
pub fn net_device(iface: &NetworkInterfaceConfig) -> Result<Net, DeviceError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("an IRQ event"))?;
    let mut net = Net::new(
        iface.iface_id.clone(),
        &iface.host_dev_name,
        iface.guest_mac.map(|mac| mac.0),
        NetLimits {
            rx: iface.rx_rate_limiter.unwrap_or_default(),
            tx: iface.tx_rate_limiter.unwrap_or_default(),
        },
        irq,
    )
    .map_err(|source| DeviceError::Net {
        id: iface.iface_id.clone(),
        source,
    })?;
    if let Some(mtu) = iface.mtu {
        net.set_mtu(mtu);
    }
    METRICS.register_net(&iface.iface_id, net.metrics().clone());
    Ok(net)
}

/// The virtio-rng device, with the rate limiter `config` gives.
pub fn entropy_device(config: &EntropyConfig) -> Result<Rng, DeviceError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("an IRQ event"))?;
    let rng = Rng::new(&config.rate_limiter.unwrap_or_default(), irq)?;
    METRICS.register_entropy(rng.metrics().clone());
    Ok(rng)
}

/// The virtio-balloon device of `config` (checked against the machine already).
pub fn balloon_device(config: &BalloonConfig) -> Result<Balloon, DeviceError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("an IRQ event"))?;
    let options = BalloonOptions {
        target_pages: config.amount_mib.saturating_mul(PAGES_PER_MIB),
        deflate_on_oom: config.deflate_on_oom,
        stats_polling_interval_s: config.stats_polling_interval_s,
        free_page_hinting: config.free_page_hinting,
        free_page_reporting: config.free_page_reporting,
    };
    let balloon = Balloon::new(options, irq).map_err(io_err("the virtio-balloon device"))?;
    METRICS.register_balloon(balloon.metrics().clone());
    Ok(balloon)
}

/// The virtio-vsock device of `config`, listening on its `uds_path` (created here).
pub fn vsock_device(config: &VsockConfig) -> Result<Vsock, DeviceError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("an IRQ event"))?;
    let vsock = Vsock::new(config.guest_cid, &config.uds_path, irq)?;
    METRICS.register_vsock(vsock.metrics().clone());
    Ok(vsock)
}
