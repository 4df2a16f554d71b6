//! What a snapshot keeps of the devices, and putting it back into the same devices rebuilt
//! from the snapshot's configuration.

use devices::legacy::serial::SerialDeviceState;
use devices::virtio::state::{DeviceStateError, MmioTransportState};
use devices::vmgenid::VmGenIdState;
use serde::{Deserialize, Serialize};

use super::DeviceManager;
use crate::arch::{LegacyDeviceError, LegacyDevicesState};
use crate::sync::lock;

/// A virtio-mmio device: where it sits and its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioSlotState {
    /// The base of its MMIO slot, checked against the rebuilt device's.
    pub addr: u64,
    pub transport: MmioTransportState,
}

/// The devices the monitor emulates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    /// The console's UART (every arch has one).
    pub serial: SerialDeviceState,
    /// The arch's own devices (x86_64: the i8042).
    pub legacy: LegacyDevicesState,
    /// In slot order.
    pub virtio: Vec<VirtioSlotState>,
    /// Where the guest was told its generation ID is (None in snapshots of format 3 and
    /// earlier: those guests have no such device). A restore writes a new ID there.
    pub vmgenid: Option<VmGenIdState>,
}

#[derive(Debug, thiserror::Error)]
pub enum SaveDevicesError {
    #[error("cannot save the virtio device at {addr:#x}: {source}")]
    Virtio { addr: u64, source: DeviceStateError },
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreDevicesError {
    #[error("the snapshot does not fit its own configuration: {saved} virtio devices saved, {configured} configured")]
    VirtioCount { saved: usize, configured: usize },
    #[error("the snapshot does not fit its own configuration: a virtio device saved at {saved:#x} is at {now:#x} now")]
    VirtioMoved { saved: u64, now: u64 },
    #[error("cannot restore the virtio device at {addr:#x}: {source}")]
    Virtio { addr: u64, source: DeviceStateError },
    #[error("the snapshot does not fit its own configuration: {0}")]
    Legacy(#[from] LegacyDeviceError),
}

impl DeviceManager {
    /// The devices' state; the vCPUs must be paused.
    pub fn save_state(&self) -> Result<DevicesState, SaveDevicesError> {
        // A request in flight on an Async drive is neither available nor used: it would be
        // lost. Each one finishes first, before guest memory is written too.
        self.drives.finish_in_flight();
        let mut virtio = Vec::with_capacity(self.transports.len());
        for (slot, transport) in &self.transports {
            let transport =
                lock(transport)
                    .save_state()
                    .map_err(|source| SaveDevicesError::Virtio {
                        addr: slot.addr,
                        source,
                    })?;
            virtio.push(VirtioSlotState {
                addr: slot.addr,
                transport,
            });
        }
        Ok(DevicesState {
            serial: lock(&self.serial).state(),
            legacy: self.legacy.save_state(),
            virtio,
            vmgenid: self.vmgenid.as_ref().map(|device| device.state()),
        })
    }

    /// Puts the saved state into devices built from the snapshot's configuration, in the
    /// same order (the UART was built from its state already).
    pub fn restore_state(&self, saved: &DevicesState) -> Result<(), RestoreDevicesError> {
        self.legacy.restore_state(&saved.legacy)?;
        if saved.virtio.len() != self.transports.len() {
            return Err(RestoreDevicesError::VirtioCount {
                saved: saved.virtio.len(),
                configured: self.transports.len(),
            });
        }
        for (state, (slot, transport)) in saved.virtio.iter().zip(&self.transports) {
            if state.addr != slot.addr {
                return Err(RestoreDevicesError::VirtioMoved {
                    saved: state.addr,
                    now: slot.addr,
                });
            }
            lock(transport)
                .restore_state(&state.transport)
                .map_err(|source| RestoreDevicesError::Virtio {
                    addr: slot.addr,
                    source,
                })?;
        }
        Ok(())
    }
}
