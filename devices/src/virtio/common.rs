//! What every virtio device has and does alike, kept in one [`VirtioCommon`] that each device
//! embeds (after Cloud Hypervisor's `VirtioCommon`): the offered and accepted features, the
//! queues' sizes and notification events, the interrupt, the configuration space, and the
//! queues and memory of a started device. [`VirtioDevice`](super::VirtioDevice)'s provided
//! methods answer the transport from it, so a device writes only what is its own: activation,
//! reset, and the state a snapshot keeps beyond this.
//!
//! One rule decides whether the driver gets an interrupt for used buffers
//! ([`needs_interrupt`]), and every device offers `VIRTIO_RING_F_EVENT_IDX`.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use log::{debug, warn};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::state::{
    queues_from, DeviceSpecificState, DeviceStateError, QueueSnapshot, VirtioDeviceState,
};
use super::{ActivateError, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// Features every device offers: modern devices only, and interrupt and notification
/// suppression by ring index (fewer interrupts and exits than the flags allow).
pub const COMMON_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

/// The queues and memory of a device the driver has started, with the interrupt that tells
/// the driver of used buffers (a handle of the device's own, so that a queue handler can
/// borrow the queues and signal at once).
pub struct Active {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<Interrupt>,
}

/// The device put buffers in `queue`'s used ring: interrupts the driver if it wants that.
pub fn signal_used(interrupt: &Interrupt, queue: &mut Queue, mem: &GuestMemoryMmap) {
    if needs_interrupt(queue, mem) {
        interrupt.signal_used_ring();
    }
}

/// Whether the driver wants an interrupt for the buffers put in `queue`'s used ring since this
/// was last asked (virtio 1.2, 2.7.10): with EVENT_IDX negotiated, when the used index has
/// passed the driver's `used_event` since then (virtio-queue keeps the count, so ask once per
/// batch and after every `add_used`); without it, unless the driver set
/// `VRING_AVAIL_F_NO_INTERRUPT` (which virtio-queue ignores). Where the ring cannot be read the
/// answer is yes: an interrupt too many is harmless, one too few stalls the driver.
pub fn needs_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    // The used index written before must be visible before the driver's flags are read, or
    // a driver that turns interrupts back on and then checks the used ring could miss both.
    fence(Ordering::SeqCst);
    mem.read_obj::<u16>(GuestAddress(queue.avail_ring()))
        .map_or(true, |flags| {
            u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
        })
}

/// The next chain the driver made available in `queue`, if any; an error when the available
/// index is further ahead than the ring is long, as only a broken or hostile driver makes it,
/// and then nothing in the ring can be trusted.
pub fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    queue.iter(mem).map(|mut chains| chains.next())
}

/// The next chain, as [`next_chain`]; when the ring is empty, notifications are turned back on
/// first (with EVENT_IDX that writes `avail_event`, without which the driver would not notify
/// again) and the ring is looked at once more for a chain the driver posted meanwhile. For a
/// device that waits for the driver's buffers.
pub fn next_chain_or_notify<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    if let Some(chain) = next_chain(queue, mem)? {
        return Ok(Some(chain));
    }
    match queue.enable_notification(mem) {
        Ok(true) => next_chain(queue, mem),
        _ => Ok(None),
    }
}

/// The part of a virtio device that is the same for every kind.
pub struct VirtioCommon {
    /// What log lines call the device (`virtio-blk rootfs`).
    name: String,
    device_type: u32,
    queue_max_sizes: &'static [u16],
    avail_features: u64,
    acked_features: u64,
    /// The configuration space, little endian, as the driver reads it.
    config: Vec<u8>,
    /// Bumped with every change of `config` (the transport's ConfigGeneration).
    config_generation: u32,
    queue_events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    active: Option<Active>,
}

impl VirtioCommon {
    /// A device of `device_type` with `queue_max_sizes.len()` queues, offering
    /// [`COMMON_FEATURES`] and `features`, raising `irq` to interrupt the guest.
    pub fn new(
        name: String,
        device_type: u32,
        queue_max_sizes: &'static [u16],
        features: u64,
        config: Vec<u8>,
        irq: EventFd,
    ) -> std::io::Result<Self> {
        let queue_events = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name,
            device_type,
            queue_max_sizes,
            avail_features: COMMON_FEATURES | features,
            acked_features: 0,
            config,
            config_generation: 0,
            queue_events,
            interrupt: Arc::new(Interrupt::new(irq)),
            active: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    pub fn queue_max_sizes(&self) -> &[u16] {
        self.queue_max_sizes
    }

    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver accepted every bit of `features`.
    pub fn acked(&self, features: u64) -> bool {
        self.acked_features & features == features
    }

    /// Offers `features` too (before the driver reads what is offered: at build time).
    pub fn offer(&mut self, features: u64) {
        self.avail_features |= features;
    }

    /// Keeps what the device offers of the driver's `features`.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// Changes the configuration space; the driver learns of it by the generation and the
    /// configuration-change interrupt the device sends.
    pub fn set_config(&mut self, config: Vec<u8>) {
        self.config = config;
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Puts back the generation the driver last saw (from a snapshot).
    pub fn set_config_generation(&mut self, generation: u32) {
        self.config_generation = generation;
    }

    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    pub fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }

    pub fn active_mut(&mut self) -> Option<&mut Active> {
        self.active.as_mut()
    }

    /// Starts serving `queues` in `mem`: exactly the device's number of them, with interrupt
    /// and notification suppression by index when the driver accepted EVENT_IDX.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let want = self.queue_max_sizes.len();
        if queues.len() != want {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want,
            });
        }
        self.serve(mem, queues);
        Ok(())
    }

    fn serve(&mut self, mem: GuestMemoryMmap, mut queues: Vec<Queue>) {
        // The queue's own flag decides how virtio-queue reads and writes the rings' event
        // fields; the features are the one source of it, also for a restored queue.
        let event_idx = self.acked(VIRTIO_RING_F_EVENT_IDX);
        for queue in &mut queues {
            queue.set_event_idx(event_idx);
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt: self.interrupt.clone(),
        });
    }

    /// Wakes the event loop for every queue, as a notification would: for requests the driver
    /// made available before DRIVER_OK. A device starts on a vCPU thread (the driver's status
    /// write), whose seccomp filter allows no device I/O, so it must not serve them there. A
    /// failure stops the device again.
    pub fn kick_queues(&mut self) -> Result<(), ActivateError> {
        for event in &self.queue_events {
            if let Err(err) = event.write(1) {
                self.deactivate();
                return Err(ActivateError::Io(err));
            }
        }
        Ok(())
    }

    /// Stops serving the queues (the device's own part of a failed start).
    pub fn deactivate(&mut self) {
        self.active = None;
    }

    /// The driver broke the ring protocol (`what`): the device stops until it is reset.
    pub fn fail(&mut self, what: &str) {
        warn!("{}: {what}; the device needs a reset", self.name);
        self.interrupt.signal_needs_reset();
        self.active = None;
    }

    /// The driver reset the device: it forgets the queues and the features.
    pub fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    /// The configuration space is read-only for the driver of every device here.
    pub fn write_config(&self, offset: u64) {
        debug!(
            "{}: ignored write to read-only config at {offset:#x}",
            self.name
        );
    }

    /// The device's state for a snapshot, with what is `specific` to its kind.
    pub fn save_state(&self, specific: DeviceSpecificState) -> VirtioDeviceState {
        VirtioDeviceState {
            device_type: self.device_type,
            acked_features: self.acked_features,
            queues: self
                .active
                .as_ref()
                .map(|active| active.queues.iter().map(QueueSnapshot::of).collect()),
            specific,
        }
    }

    /// Takes the saved features and queues (the device checked its own part of `state`);
    /// true when the driver had started the device, which then serves its queues again from
    /// the saved positions. Nothing changes when the state is refused.
    pub fn restore_state(
        &mut self,
        mem: GuestMemoryMmap,
        state: &VirtioDeviceState,
    ) -> Result<bool, DeviceStateError> {
        let queues = match state.queues.as_deref() {
            Some(saved) => {
                let queues = queues_from(saved)?;
                let built = self.queue_max_sizes.len();
                if queues.len() != built {
                    return Err(DeviceStateError::QueueCount {
                        saved: queues.len(),
                        built,
                    });
                }
                // As the transport checks before it activates a device: a queue served from a
                // forged snapshot must not point the device outside guest memory.
                if let Some(index) = queues
                    .iter()
                    .position(|queue| !queue.ready() || !queue.is_valid(&mem))
                {
                    return Err(DeviceStateError::QueueOutsideMemory { index });
                }
                Some(queues)
            }
            None => None,
        };
        self.set_acked_features(state.acked_features);
        self.active = None;
        let started = queues.is_some();
        if let Some(queues) = queues {
            self.serve(mem, queues);
        }
        Ok(started)
    }
}

#[cfg(test)]
mod tests;
