//! Places virtio-mmio devices: an MMIO slot and an IRQ line each, queue notifications as KVM
//! ioeventfds, interrupts as irqfds, the transport on the MMIO bus, the device's data path on the
//! event loop, and the slot announced on the kernel command line.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use devices::virtio::VirtioDevice;
use devices::Bus;
use event_manager::MutEventSubscriber;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{IRQ_BASE, IRQ_MAX, MMIO_SLOT_SIZE, VIRTIO_MMIO_START};
use crate::config::DriveConfig;
use crate::vstate::vm::{Vm, VmError};

/// A subscriber of the main thread's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot open drive {id}'s file {path}: {source}")]
    OpenDrive {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drive {id}'s file {path} is not a regular file or block device")]
    NotADisk { id: String, path: PathBuf },
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
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("no IRQ line is left for another virtio device (at most {max})")]
    OutOfIrqs { max: u32 },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot place a virtio device: {0}")]
    Bus(#[from] devices::BusError),
}

/// Hands out MMIO slots and IRQs, in order.
#[derive(Default)]
pub struct MmioDevices {
    next_slot: u32,
    /// `virtio_mmio.device=` arguments, one per device.
    pub cmdline_args: Vec<String>,
    pub subscribers: Vec<Subscriber>,
}

impl MmioDevices {
    /// Attaches `device`, whose data path `subscriber` serves on the event loop.
    pub fn attach<D: VirtioDevice + MutEventSubscriber + 'static>(
        &mut self,
        vm: &Vm,
        mmio_bus: &mut Bus,
        device: D,
    ) -> Result<(), DeviceError> {
        let irq = IRQ_BASE + self.next_slot;
        if irq > IRQ_MAX {
            return Err(DeviceError::OutOfIrqs {
                max: IRQ_MAX - IRQ_BASE + 1,
            });
        }
        let addr = VIRTIO_MMIO_START + u64::from(self.next_slot) * MMIO_SLOT_SIZE;
        vm.register_irqfd(device.interrupt().irq_evt(), irq)?;
        for (index, evt) in device.queue_events().iter().enumerate() {
            vm.register_mmio_ioevent(evt, addr + REG_QUEUE_NOTIFY, index as u32)?;
        }
        let device = Arc::new(Mutex::new(device));
        let transport = MmioTransport::new(vm.memory().clone(), device.clone());
        mmio_bus.insert(Arc::new(Mutex::new(transport)), addr, MMIO_SLOT_SIZE)?;
        self.subscribers.push(device);
        self.cmdline_args
            .push(format!("virtio_mmio.device=4K@{addr:#x}:{irq}"));
        self.next_slot += 1;
        Ok(())
    }
}

/// Opens every drive's file, refusing files that are not disks and a file that two drives
/// would share while one of them writes it.
pub fn open_drives(drives: &[DriveConfig]) -> Result<Vec<File>, DeviceError> {
    let mut opened: Vec<(File, (u64, u64))> = Vec::with_capacity(drives.len());
    for drive in drives {
        let open_err = |source| DeviceError::OpenDrive {
            id: drive.drive_id.clone(),
            path: drive.path_on_host.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!drive.is_read_only)
            .open(&drive.path_on_host)
            .map_err(open_err)?;
        let metadata = file.metadata().map_err(open_err)?;
        if !(metadata.is_file() || metadata.file_type().is_block_device()) {
            return Err(DeviceError::NotADisk {
                id: drive.drive_id.clone(),
                path: drive.path_on_host.clone(),
            });
        }
        let identity = (metadata.dev(), metadata.ino());
        let clash = opened.iter().zip(drives).find(|((_, other), other_drive)| {
            *other == identity && !(drive.is_read_only && other_drive.is_read_only)
        });
        if let Some((_, other)) = clash {
            return Err(DeviceError::SharedDisk {
                id: drive.drive_id.clone(),
                other: other.drive_id.clone(),
                path: drive.path_on_host.clone(),
            });
        }
        opened.push((file, identity));
    }
    Ok(opened.into_iter().map(|(file, _)| file).collect())
}

/// A virtio-blk device for `drive`, backed by its opened `file`.
pub fn block_device(drive: &DriveConfig, file: File) -> Result<Block, DeviceError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    Block::new(drive.drive_id.clone(), file, drive.is_read_only, irq).map_err(|source| {
        DeviceError::Block {
            id: drive.drive_id.clone(),
            source,
        }
    })
}
