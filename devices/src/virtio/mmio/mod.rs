//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the register file, the
//! device-status state machine and queue set-up. Modern devices only (`VIRTIO_F_VERSION_1`).

use std::sync::{Arc, Mutex, MutexGuard};

use crate::memory::GuestMemoryMmap;
use log::{debug, warn};
use virtio_queue::{Queue, QueueT};

use super::state::{queues_from, DeviceStateError, MmioTransportState, QueueSnapshot};
use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::sync::lock;

/// "virt" in little endian.
const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// mote's vendor id ("MOTE").
const VENDOR_ID: u32 = 0x4554_4f4d;

const REG_MAGIC_VALUE: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify: normally caught by a KVM ioeventfd before it gets here.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.2, section 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// The MMIO register file of one virtio device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    activated: bool,
}

impl MmioTransport {
    pub fn new(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .filter_map(|max| Queue::new(*max).ok())
            .collect();
        Self {
            device,
            mem,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            activated: false,
        }
    }

    /// The registers, the queues' set-up and the device's state, for a snapshot.
    pub fn save_state(&self) -> Result<MmioTransportState, DeviceStateError> {
        let device = self.device();
        let saved = device
            .save_state()
            .ok_or(DeviceStateError::Unsupported(device.device_type()))?;
        let (interrupt_status, needs_reset) = device.interrupt().state();
        Ok(MmioTransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            activated: self.activated,
            interrupt_status,
            needs_reset,
            device: saved,
        })
    }

    /// Takes a saved state into a freshly built transport and device; a device the driver
    /// had started serves its queues again.
    pub fn restore_state(&mut self, state: &MmioTransportState) -> Result<(), DeviceStateError> {
        let built = self.device().device_type();
        if state.device.device_type != built {
            return Err(DeviceStateError::TypeMismatch {
                saved: state.device.device_type,
                built,
            });
        }
        let queues = queues_from(&state.queues)?;
        if queues.len() != self.queues.len() {
            return Err(DeviceStateError::QueueCount {
                saved: queues.len(),
                built: self.queues.len(),
            });
        }
        // The interrupt first: a device that signals the guest as it restores (a request
        // served, an event sent) adds its bit to the saved ones instead of losing it to them.
        self.device()
            .interrupt()
            .restore(state.interrupt_status, state.needs_reset);
        self.device()
            .restore_state(self.mem.clone(), &state.device)?;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues = queues;
        self.activated = state.activated;
        Ok(())
    }

    fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        lock(&self.device)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    /// Feature registers may change only between DRIVER and FEATURES_OK.
    fn features_config_allowed(&self) -> bool {
        self.status & (STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_FAILED) == STATUS_DRIVER
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device().device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.device().avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.device().interrupt().status(),
            REG_STATUS => {
                let needs_reset = self.device().interrupt().needs_reset();
                self.status
                    | if needs_reset {
                        STATUS_DEVICE_NEEDS_RESET
                    } else {
                        0
                    }
            }
            REG_CONFIG_GENERATION => self.device().config_generation(),
            _ => {
                debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if self.features_config_allowed() => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.device().interrupt().acknowledge(value),
            REG_STATUS => self.set_status(value),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if self.queue_config_allowed() =>
            {
                if let Some(queue) = self.selected_queue() {
                    match offset {
                        REG_QUEUE_NUM => queue.set_size(value as u16),
                        REG_QUEUE_READY => queue.set_ready(value == 1),
                        REG_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
                        REG_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
                        REG_QUEUE_DRIVER_LOW => queue.set_avail_ring_address(Some(value), None),
                        REG_QUEUE_DRIVER_HIGH => queue.set_avail_ring_address(None, Some(value)),
                        REG_QUEUE_DEVICE_LOW => queue.set_used_ring_address(Some(value), None),
                        REG_QUEUE_DEVICE_HIGH => queue.set_used_ring_address(None, Some(value)),
                        _ => {}
                    }
                }
            }
            _ => debug!(
                "virtio-mmio: ignored write of {value:#x} to register {offset:#x} in status {:#x}",
                self.status
            ),
        }
    }

    /// A notification that did not go through an ioeventfd: pass it on to the device.
    fn notify(&self, queue: u32) {
        if let Some(evt) = self.device().queue_events().get(queue as usize) {
            if let Err(err) = evt.write(1) {
                warn!("virtio-mmio: cannot pass on the notification of queue {queue}: {err}");
            }
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        let added = value & !self.status;
        // Bits are only ever added, and one step at a time in the order the spec gives.
        if value & self.status != self.status {
            warn!(
                "virtio-mmio: driver tried to clear status bits ({:#x} -> {value:#x})",
                self.status
            );
            return;
        }
        let allowed = match added {
            STATUS_ACKNOWLEDGE => self.status == 0,
            STATUS_DRIVER => self.status == STATUS_ACKNOWLEDGE,
            STATUS_FEATURES_OK => {
                self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER && self.accept_features()
            }
            STATUS_DRIVER_OK => {
                self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
                    && self.activate()
            }
            0 => true,
            _ => false,
        };
        if allowed {
            self.status = value;
        } else {
            debug!(
                "virtio-mmio: status {value:#x} refused in status {:#x}",
                self.status
            );
        }
    }

    /// Checks the driver's features: a subset of the device's, including VERSION_1.
    fn accept_features(&mut self) -> bool {
        let offered = self.device().avail_features();
        let wanted = self.driver_features;
        if wanted & !offered != 0 || wanted & VIRTIO_F_VERSION_1 == 0 {
            warn!("virtio-mmio: driver features {wanted:#x} refused (device offers {offered:#x})");
            return false;
        }
        self.device().set_acked_features(wanted);
        true
    }

    fn activate(&mut self) -> bool {
        for (index, queue) in self.queues.iter().enumerate() {
            if !queue.ready() || !queue.is_valid(&self.mem) {
                warn!("virtio-mmio: queue {index} is not ready or not valid; device not started");
                self.device().interrupt().signal_needs_reset();
                return false;
            }
        }
        let queues = self
            .queues
            .iter()
            .map(|queue| Queue::try_from(queue.state()))
            .collect::<Result<Vec<_>, _>>();
        let result = match queues {
            Ok(queues) => self.device().activate(self.mem.clone(), queues),
            Err(err) => {
                warn!("virtio-mmio: cannot hand over the queues: {err}");
                self.device().interrupt().signal_needs_reset();
                return false;
            }
        };
        match result {
            Ok(()) => {
                self.activated = true;
                true
            }
            Err(err) => {
                warn!("virtio-mmio: {err}");
                self.device().interrupt().signal_needs_reset();
                false
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device().reset();
            self.activated = false;
        }
        self.device().interrupt().clear();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device().read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32 bits wide and read whole.
        let len = data.len();
        match <&mut [u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => {
                *word = self.read_register(offset).to_le_bytes()
            }
            Ok(word) => word.fill(0),
            Err(_) => debug!("virtio-mmio: {len}-byte read of register {offset:#x}"),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device().write_config(offset - CONFIG_SPACE, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => {
                self.write_register(offset, u32::from_le_bytes(word))
            }
            _ => debug!(
                "virtio-mmio: {}-byte write of register {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests;
