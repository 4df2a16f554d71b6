//! Virtio devices and their MMIO transport.
//!
//! A device ([`VirtioDevice`]) knows its queues, features and configuration space and nothing of
//! MMIO registers; the transport ([`mmio::MmioTransport`]) knows the registers and the status
//! state machine and nothing of blocks or packets. Queue notifications arrive on the device's
//! queue [`EventFd`]s (KVM ioeventfds, so no vCPU exit), and the device signals the guest
//! through an [`Interrupt`] (an irqfd underneath). What the devices have alike (features,
//! queue events, interrupt, configuration space, started queues, the rule for interrupting the
//! driver) is in [`common`].

pub mod balloon;
pub mod block;
pub mod common;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod state;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::memory::GuestMemoryMmap;
use log::warn;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use self::common::VirtioCommon;

/// Device types (virtio 1.2, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bits every modern device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Bits of the InterruptStatus register.
pub const INTERRUPT_USED_RING: u32 = 1;
pub const INTERRUPT_CONFIG: u32 = 2;

/// Why a device could not start serving its queues.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver gave {got} queues, the device has {want}")]
    QueueCount { got: usize, want: usize },
    #[error("queue {0} is not valid in guest memory")]
    InvalidQueue(usize),
    #[error("cannot start the device: {0}")]
    Io(#[from] std::io::Error),
}

/// The device's line to the guest: the InterruptStatus bits, the irqfd that raises the IRQ, and
/// the device's request for a reset when the driver broke the protocol.
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFd,
}

impl Interrupt {
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        }
    }

    /// The fd to register as the irqfd of the device's interrupt line.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq
    }

    fn raise(&self, bit: u32) {
        crate::metrics::INTERRUPT_METRICS.triggers.inc();
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(err) = self.irq.write(1) {
            warn!("virtio: cannot raise the interrupt: {err}");
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_ring(&self) {
        self.raise(INTERRUPT_USED_RING);
    }

    /// The device's configuration space changed: the driver should read it again.
    pub fn signal_config_change(&self) {
        self.raise(INTERRUPT_CONFIG);
    }

    /// The driver broke the protocol: the device stops until the driver resets it.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INTERRUPT_CONFIG);
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The InterruptStatus bits and the needs-reset flag, for a snapshot.
    pub fn state(&self) -> (u32, bool) {
        (self.status(), self.needs_reset())
    }

    /// Puts back what [`Interrupt::state`] saved, without raising the line: the interrupt
    /// controllers' own state says whether the guest still has it pending.
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// A virtio device as the transport sees it. What every device has alike is answered from its
/// [`VirtioCommon`]; a device implements activation, reset and its snapshot state, and
/// overrides a provided method only where it differs.
pub trait VirtioDevice: Send {
    /// The part of the device that is the same for every kind.
    fn common(&self) -> &VirtioCommon;
    fn common_mut(&mut self) -> &mut VirtioCommon;
    /// The virtio device type (`TYPE_BLOCK`, …).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }
    /// The most entries each queue may have; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_max_sizes()
    }
    /// The features the device offers.
    fn avail_features(&self) -> u64 {
        self.common().avail_features()
    }
    /// The features the driver accepted (the transport checked they are a subset of
    /// `avail_features`).
    fn set_acked_features(&mut self, features: u64) {
        self.common_mut().set_acked_features(features);
    }
    /// Reads the device's configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.common().config(), offset, data);
    }
    /// Writes the device's configuration space (read-only unless the device says otherwise).
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        self.common().write_config(offset);
    }
    /// Changes whenever the configuration space does, so that a driver can tell a read that
    /// straddled a change (the ConfigGeneration register).
    fn config_generation(&self) -> u32 {
        self.common().config_generation()
    }
    /// One event per queue, written when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd] {
        self.common().queue_events()
    }
    /// The device's interrupt.
    fn interrupt(&self) -> &std::sync::Arc<Interrupt> {
        self.common().interrupt()
    }
    /// Starts serving `queues` (validated by the transport) in `mem`.
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError>;
    /// Stops serving the queues and forgets them: the driver reset the device.
    fn reset(&mut self);
    /// The device's state for a snapshot; None for a kind of device that cannot be
    /// snapshotted (snapshot creation then refuses, naming it).
    fn save_state(&self) -> Option<state::VirtioDeviceState> {
        None
    }
    /// Takes a saved state into a device built from the same configuration; a device that was
    /// serving its queues serves them again, in `mem`, from the saved positions.
    fn restore_state(
        &mut self,
        _mem: GuestMemoryMmap,
        state: &state::VirtioDeviceState,
    ) -> Result<(), state::DeviceStateError> {
        Err(state::DeviceStateError::Unsupported(state.device_type))
    }
}

/// Reads `data.len()` bytes of a little-endian configuration space laid out in `config`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    match start
        .checked_add(data.len())
        .and_then(|end| config.get(start..end))
    {
        Some(bytes) => data.copy_from_slice(bytes),
        // Outside the configuration space reads as zeros.
        None => data.fill(0),
    }
}
