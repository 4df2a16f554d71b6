//! virtio-net on a host TAP device: one receive and one transmit queue, checksum and TSO
//! offloads carried in the virtio-net header, the MAC address and link status in the
//! configuration space.
//!
//! Event-driven: the TAP fd (edge-triggered), the two queue events. Frames from the TAP go to
//! the guest only while it has posted receive buffers; when it has none the device keeps the
//! frame it holds, stops reading the TAP, and asks the driver to notify it of new buffers, so
//! frames wait in the TAP's queue instead of being dropped.
//!
//! A snapshot keeps the negotiated features and both queues' positions; the restored device
//! reopens its TAP from the configuration (another one with a network override), keeps the MAC
//! the guest knows, and drops the frame the old monitor held, as a lossy network may.
//!
//! Layout: this file has the constants and the configuration space, the device state,
//! activation and the event handler; `rx.rs` and `tx.rs` the queue handlers; `tests.rs` the
//! tests.

mod frame;
mod mac;
mod rx;
pub mod tap;
mod tx;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::memory::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, info, warn};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::Queue;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

pub use self::mac::MacAddr;
pub use self::tap::TapError;
use self::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use super::common::VirtioCommon;
use super::state::{DeviceSpecificState, DeviceStateError, VirtioDeviceState};
use super::{ActivateError, VirtioDevice, TYPE_NET};
use crate::metrics::NetMetrics;
use crate::mmds::MmdsStack;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};

/// A receive queue and a transmit queue of up to 256 entries each.
pub const QUEUE_MAX_SIZES: &[u16] = &[256, 256];
const RX_INDEX: usize = 0;
const TX_INDEX: usize = 1;
/// `virtio_net_hdr_v1` (with `num_buffers`), in front of every frame both ways.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame: an Ethernet header and a 64 KiB (segmentation-offloaded) packet.
pub const MAX_FRAME_LEN: usize = 14 + 65536;
const FRAME_BUF_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Configuration space: `mac` (6 bytes), `status` (u16), and with an MTU also
/// `max_virtqueue_pairs` (u16, 1) and `mtu` (u16). Read-only: the MAC is the host's choice
/// (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
const CONFIG_LEN: usize = 8;
const CONFIG_LEN_WITH_MTU: usize = 12;
/// The smallest MTU a driver takes (virtio 1.2, 5.1.4.1: IPv4's 68).
pub const MIN_MTU: u16 = 68;
/// Where `num_buffers` sits in the header: always 1 here (no merged receive buffers).
const NUM_BUFFERS_OFFSET: usize = 10;
/// The longest the device serves transmit frames in one go before the event loop serves the
/// others (it then comes back through its own queue event).
const TX_SLICE: Duration = Duration::from_micros(500);

/// Event data telling the device's fds apart.
const RX_QUEUE_EVENT: u32 = 0;
const TX_QUEUE_EVENT: u32 = 1;
const TAP_EVENT: u32 = 2;
const RX_RATE_LIMITER_EVENT: u32 = 3;
const TX_RATE_LIMITER_EVENT: u32 = 4;
const MMDS_TIMER_EVENT: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create a queue event: {0}")]
    EventFd(std::io::Error),
    #[error("rx_rate_limiter: {0}")]
    RxRateLimiter(RateLimiterError),
    #[error("tx_rate_limiter: {0}")]
    TxRateLimiter(RateLimiterError),
}

/// The limits on what an interface receives and sends: bytes of frames (without the
/// virtio-net header) and frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetLimits {
    pub rx: RateLimiterConfig,
    pub tx: RateLimiterConfig,
}

pub struct Net {
    id: String,
    tap: Tap,
    common: VirtioCommon,
    metrics: Arc<NetMetrics>,
    /// A frame read from the TAP, kept while the guest has no buffer for it.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    tx_frame: Vec<u8>,
    /// The buffers of the receive chain being filled (kept to reuse the allocation).
    rx_scratch: Vec<(GuestAddress, usize)>,
    /// While the receive limiter blocks, the frame waits in `rx_frame` and the rest in the TAP.
    rx_rate_limiter: RateLimiter,
    /// While the transmit limiter blocks, frames wait in the transmit ring.
    tx_rate_limiter: RateLimiter,
    /// The metadata service's endpoint, on an interface allowed to reach it: frames the guest
    /// sends to its address go there instead of the TAP, and its answers come before the TAP's
    /// frames on the receive queue.
    mmds: Option<MmdsStack>,
    /// The frame in `rx_frame` came from MMDS, not the TAP.
    rx_pending_mmds: bool,
}

impl Net {
    /// Interface `id` on the TAP `tap_name`, with `mac` in its configuration space when given
    /// (without one the guest picks its own).
    pub fn new(
        id: String,
        tap_name: &str,
        mac: Option<[u8; 6]>,
        limits: NetLimits,
        irq: EventFd,
    ) -> Result<Self, NetError> {
        let rx_rate_limiter = RateLimiter::new(&limits.rx).map_err(NetError::RxRateLimiter)?;
        let tx_rate_limiter = RateLimiter::new(&limits.tx).map_err(NetError::TxRateLimiter)?;
        let tap = Tap::open(tap_name)?;
        let mut features = 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_STATUS;
        let mut config = [0u8; CONFIG_LEN];
        if let Some(mac) = mac {
            features |= 1 << VIRTIO_NET_F_MAC;
            config[..6].copy_from_slice(&mac);
        }
        // The TAP is up for as long as the device exists: the link is always up.
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        let common = VirtioCommon::new(
            format!("virtio-net {id}"),
            TYPE_NET,
            QUEUE_MAX_SIZES,
            features,
            config.to_vec(),
            irq,
        )
        .map_err(NetError::EventFd)?;
        Ok(Self {
            id,
            tap,
            common,
            metrics: Arc::new(NetMetrics::default()),
            rx_frame: vec![0; FRAME_BUF_LEN],
            rx_pending: None,
            tx_frame: vec![0; FRAME_BUF_LEN],
            rx_scratch: Vec::with_capacity(32),
            rx_rate_limiter,
            tx_rate_limiter,
            mmds: None,
            rx_pending_mmds: false,
        })
    }

    /// Tells the driver the interface's MTU (VIRTIO_NET_F_MTU), before the device is served;
    /// the TAP's own MTU is the host's to set to match.
    pub fn set_mtu(&mut self, mtu: u16) {
        self.common.offer(1 << VIRTIO_NET_F_MTU);
        let mut config = self.common.config().to_vec();
        config.resize(CONFIG_LEN_WITH_MTU, 0);
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu.to_le_bytes());
        self.common.set_config(config);
    }

    /// Lets the guest reach MMDS through this interface (before the device is served).
    pub fn set_mmds(&mut self, stack: MmdsStack) {
        info!("virtio-net {}: MMDS answers at {}", self.id, stack.addr());
        self.mmds = Some(stack);
    }

    /// The limits in force (`GET /vm/config` shows what PATCH made of them).
    pub fn limits(&self) -> NetLimits {
        NetLimits {
            rx: self.rx_rate_limiter.config(),
            tx: self.tx_rate_limiter.config(),
        }
    }

    /// Takes new limits at once (`PATCH /network-interfaces/{id}`): the buckets named are
    /// replaced, and the queues are looked at again under them (from the event loop).
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), NetError> {
        // Both checked before either changes.
        for (config, wrap) in [
            (
                rx,
                NetError::RxRateLimiter as fn(RateLimiterError) -> NetError,
            ),
            (tx, NetError::TxRateLimiter),
        ] {
            if let Some(config) = config {
                config.validate().map_err(wrap)?;
            }
        }
        if let Some(rx) = rx {
            self.rx_rate_limiter
                .update(rx)
                .map_err(NetError::RxRateLimiter)?;
        }
        if let Some(tx) = tx {
            self.tx_rate_limiter
                .update(tx)
                .map_err(NetError::TxRateLimiter)?;
        }
        info!(
            "virtio-net {}: rate limiters now {:?}",
            self.id,
            self.limits()
        );
        if self.common.active().is_some() {
            for event in self.common.queue_events() {
                if let Err(err) = event.write(1) {
                    warn!("virtio-net {}: cannot requeue its work: {err}", self.id);
                }
            }
        }
        Ok(())
    }

    /// The interface id the user gave (`iface_id`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The interface's counters, for the monitor's metrics.
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }

    /// The MAC in the configuration space; None when the guest picks its own.
    fn mac(&self) -> Option<[u8; 6]> {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.common.config()[..6]);
        (self.common.avail_features() & 1 << VIRTIO_NET_F_MAC != 0).then_some(mac)
    }

    /// Serves the queues the device now holds: at activation and after a restore. A device
    /// that cannot start does not keep them.
    fn start(&mut self) -> Result<(), ActivateError> {
        if let Err(err) = self.tap.set_offload(self.tap_offloads()) {
            self.common.deactivate();
            return Err(ActivateError::Io(std::io::Error::other(err.to_string())));
        }
        // Buffers may have been posted, and frames may be waiting in the TAP, already: the
        // event loop does the TAP I/O (this runs on a vCPU thread, or while the VM is built).
        self.common.kick_queues()?;
        info!(
            "virtio-net {}: started on TAP {} (features {:#x})",
            self.id,
            self.tap.name(),
            self.common.acked_features()
        );
        Ok(())
    }

    /// The TAP offloads matching what the driver takes in the frames it receives.
    fn tap_offloads(&self) -> u32 {
        let has = |bit: u32| self.common.acked(1 << bit);
        let mut flags = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
        }
        flags
    }
}

impl VirtioDevice for Net {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        self.common.activate(mem, queues)?;
        self.start()
    }

    fn reset(&mut self) {
        self.common.reset();
        self.rx_pending_mmds = false;
        if self.rx_pending.take().is_some() {
            self.metrics.rx_dropped_reset.inc();
        }
        if let Err(err) = self.tap.set_offload(0) {
            warn!("virtio-net {}: {err}", self.id);
        }
    }

    fn save_state(&self) -> Option<VirtioDeviceState> {
        Some(self.common.save_state(DeviceSpecificState::Net {
            iface_id: self.id.clone(),
            mac: self.mac(),
            rx_rate_limiter: self.rx_rate_limiter.state(),
            tx_rate_limiter: self.tx_rate_limiter.state(),
        }))
    }

    fn restore_state(
        &mut self,
        mem: GuestMemoryMmap,
        state: &VirtioDeviceState,
    ) -> Result<(), DeviceStateError> {
        let DeviceSpecificState::Net {
            iface_id,
            mac,
            rx_rate_limiter,
            tx_rate_limiter,
        } = &state.specific
        else {
            return Err(DeviceStateError::TypeMismatch {
                saved: state.device_type,
                built: TYPE_NET,
            });
        };
        if *iface_id != self.id {
            return Err(DeviceStateError::Mismatch {
                what: "network interface id",
                saved: iface_id.clone(),
                built: self.id.clone(),
            });
        }
        // The driver read the MAC once, at probe time: another one in the configuration space
        // would not reach it, and the host would address frames to a MAC the guest never uses.
        if *mac != self.mac() {
            return Err(DeviceStateError::Mismatch {
                what: "MAC address",
                saved: mac_text(*mac),
                built: mac_text(self.mac()),
            });
        }
        for (limiter, saved) in [
            (&mut self.rx_rate_limiter, rx_rate_limiter),
            (&mut self.tx_rate_limiter, tx_rate_limiter),
        ] {
            limiter
                .restore(saved)
                .map_err(|err| DeviceStateError::RateLimiter(err.to_string()))?;
        }
        let started = self.common.restore_state(mem, state)?;
        // The frame the old monitor held for the guest is lost, as a network may lose any.
        self.rx_pending = None;
        self.rx_pending_mmds = false;
        if started {
            self.start()?;
        }
        Ok(())
    }
}

/// A MAC for messages: `06:00:0a:00:00:02`, or `none` when the guest picks its own.
fn mac_text(mac: Option<[u8; 6]>) -> String {
    mac.map_or_else(|| "none".to_string(), |mac| MacAddr(mac).to_string())
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            RX_QUEUE_EVENT => {
                // Read first: a notification that lands while the queue is served is not lost.
                let _ = self.common.queue_events()[RX_INDEX].read();
                self.metrics.rx_queue_event_count.inc();
                self.process_rx();
            }
            TX_QUEUE_EVENT => {
                let _ = self.common.queue_events()[TX_INDEX].read();
                self.metrics.tx_queue_event_count.inc();
                if self.tx_rate_limiter.is_blocked() {
                    self.metrics.tx_rate_limiter_throttled.inc();
                } else {
                    self.process_tx();
                }
            }
            RX_RATE_LIMITER_EVENT => {
                self.metrics.rx_event_rate_limiter_count.inc();
                self.rx_rate_limiter.on_timer();
                self.process_rx();
            }
            TX_RATE_LIMITER_EVENT => {
                self.metrics.tx_rate_limiter_event_count.inc();
                self.tx_rate_limiter.on_timer();
                self.process_tx();
            }
            TAP_EVENT => {
                self.metrics.rx_tap_event_count.inc();
                self.process_rx();
            }
            MMDS_TIMER_EVENT => {
                if let Some(stack) = self.mmds.as_mut() {
                    stack.on_timer();
                }
                self.process_mmds_answers();
            }
            other => debug!("virtio-net {}: unexpected event {other}", self.id),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let rx = &self.common.queue_events()[RX_INDEX];
        let tx = &self.common.queue_events()[TX_INDEX];
        // Edge-triggered: while the guest has no buffers the device leaves frames in the TAP,
        // and a level-triggered TAP would wake the loop again and again for them.
        let tap = Events::with_data_raw(
            self.tap.as_raw_fd(),
            TAP_EVENT,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        for events in [
            Events::with_data(rx, RX_QUEUE_EVENT, EventSet::IN),
            Events::with_data(tx, TX_QUEUE_EVENT, EventSet::IN),
            tap,
            Events::with_data_raw(
                self.rx_rate_limiter.as_raw_fd(),
                RX_RATE_LIMITER_EVENT,
                EventSet::IN,
            ),
            Events::with_data_raw(
                self.tx_rate_limiter.as_raw_fd(),
                TX_RATE_LIMITER_EVENT,
                EventSet::IN,
            ),
        ] {
            if let Err(err) = ops.add(events) {
                warn!("virtio-net {}: cannot watch its fds: {err}", self.id);
            }
        }
        if let Some(stack) = &self.mmds {
            let timer = Events::with_data_raw(stack.as_raw_fd(), MMDS_TIMER_EVENT, EventSet::IN);
            if let Err(err) = ops.add(timer) {
                warn!("virtio-net {}: cannot watch its MMDS timer: {err}", self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests;
