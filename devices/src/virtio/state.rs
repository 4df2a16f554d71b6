//! What a snapshot keeps of a virtio device: the transport's registers and queue set-up, the
//! device's negotiated features and the positions of the queues it serves, and what is
//! particular to each kind of device.
//!
//! A restore first builds the device from the VM's configuration as a cold boot does (the
//! backing file, the TAP, the socket: possibly overridden), then hands it this state. A new
//! device kind joins by implementing [`VirtioDevice::save_state`](super::VirtioDevice) and
//! `restore_state`, with a [`DeviceSpecificState`] variant for what else it must keep; a
//! device that does not is refused by snapshot creation with a clear reason.

use serde::{Deserialize, Serialize};
#[cfg(test)]
use virtio_queue::QueueT;
use virtio_queue::{Queue, QueueState};

use crate::rate_limiter::RateLimiterState;

/// One virtio queue: its set-up by the driver and the device's positions in its rings
/// (virtio-queue's `QueueState`, field for field, which is not serde-serializable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl QueueSnapshot {
    /// The queue's state as it is now.
    pub fn of(queue: &Queue) -> Self {
        queue.state().into()
    }

    /// The queue again; refused when the saved set-up is not one virtio-queue accepts (a
    /// corrupted or forged snapshot).
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// What each kind of device keeps beyond the common part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceSpecificState {
    /// virtio-blk: the drive (checked against the rebuilt device) and its configuration
    /// generation (bumped by backing-file changes the driver has seen).
    Block {
        drive_id: String,
        config_generation: u32,
        /// The limiter's buckets, with the configuration PATCH may have changed.
        rate_limiter: RateLimiterState,
    },
    /// virtio-net: the interface and the MAC in its configuration space, both checked against
    /// the rebuilt device (the guest goes on using the MAC it read at probe time). A frame read
    /// from the TAP but not yet delivered is not kept: the network may lose it.
    Net {
        iface_id: String,
        mac: Option<[u8; 6]>,
        rx_rate_limiter: RateLimiterState,
        tx_rate_limiter: RateLimiterState,
    },
    /// virtio-vsock: the guest's CID, checked against the rebuilt device. Streams are not kept
    /// (their host sockets belonged to the old monitor); a restored device tells the driver so
    /// with a transport reset event.
    Vsock { guest_cid: u64 },
    /// virtio-rng: its rate limiter's buckets (a request is served whole when it is read, so
    /// none is half done).
    Entropy { rate_limiter: RateLimiterState },
    /// virtio-balloon: its target, the driver's actual size, the statistics interval and the
    /// statistics buffer it holds. Pages given back stay given back: they are holes in the
    /// memory file.
    Balloon(Box<super::balloon::BalloonState>),
}

/// A virtio device's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    pub device_type: u32,
    pub acked_features: u64,
    /// The queues the device serves, with its positions in them; None before the driver
    /// started the device (DRIVER_OK).
    pub queues: Option<Vec<QueueSnapshot>>,
    pub specific: DeviceSpecificState,
}

/// A virtio-mmio transport's registers, with its device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    /// The queues as the driver set them up through the registers.
    pub queues: Vec<QueueSnapshot>,
    pub activated: bool,
    /// InterruptStatus bits the driver has not acknowledged yet.
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub device: VirtioDeviceState,
}

/// Why a device's state cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("virtio device type {0} does not support snapshots yet")]
    Unsupported(u32),
    #[error("the snapshot has a virtio device of type {saved} where the VM has type {built}")]
    TypeMismatch { saved: u32, built: u32 },
    #[error("the snapshot's {what} does not match the VM's ({saved} vs {built})")]
    Mismatch {
        what: &'static str,
        saved: String,
        built: String,
    },
    #[error("the snapshot's queue {index} is not valid: {source}")]
    Queue {
        index: usize,
        source: virtio_queue::Error,
    },
    #[error("the snapshot has {saved} queues for a device with {built}")]
    QueueCount { saved: usize, built: usize },
    #[error("the snapshot's queue {index} is not ready or its rings are not in guest memory")]
    QueueOutsideMemory { index: usize },
    #[error("the snapshot's rate limiter is not valid: {0}")]
    RateLimiter(String),
    #[error("cannot restart the device: {0}")]
    Activate(#[from] super::ActivateError),
}

/// Rebuilds saved queues, checking each.
pub fn queues_from(saved: &[QueueSnapshot]) -> Result<Vec<Queue>, DeviceStateError> {
    saved
        .iter()
        .enumerate()
        .map(|(index, queue)| {
            queue
                .to_queue()
                .map_err(|source| DeviceStateError::Queue { index, source })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_survives_the_round_trip_with_its_positions() {
        let mut queue = Queue::new(256).unwrap();
        queue.set_size(64);
        queue.set_desc_table_address(Some(0x1000), None);
        queue.set_avail_ring_address(Some(0x2000), None);
        queue.set_used_ring_address(Some(0x3000), None);
        queue.set_ready(true);
        queue.set_next_avail(17);
        queue.set_next_used(15);
        let saved = QueueSnapshot::of(&queue);
        let again = saved.to_queue().unwrap();
        assert_eq!(QueueSnapshot::of(&again), saved);
        assert_eq!(again.next_avail(), 17);
        assert_eq!(again.size(), 64);
    }

    #[test]
    fn a_forged_queue_size_is_refused() {
        let mut saved = QueueSnapshot::of(&Queue::new(256).unwrap());
        saved.size = 3;
        assert!(queues_from(&[saved]).is_err());
    }
}
