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
//! Layout of this file: constants and the configuration space, the device state, activation,
//! the queue handlers, the event handler, tests.

mod frame;
mod mac;
pub mod tap;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, info, warn};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use self::frame::{check_tx_header, gather, scatter, RxRefusal, TxDrop};
pub use self::mac::MacAddr;
pub use self::tap::TapError;
use self::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use super::common::{signal_used, Active, VirtioCommon};
use super::state::{DeviceSpecificState, DeviceStateError, VirtioDeviceState};
use super::{ActivateError, VirtioDevice, TYPE_NET};
use crate::metrics::{NetMetrics, MMDS_METRICS};
use crate::mmds::{is_mmds_frame, MmdsStack};
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
/// Configuration space: `mac` (6 bytes), `status` (u16). Read-only: the MAC is the host's
/// choice (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
const CONFIG_LEN: usize = 8;
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

    /// Moves frames from the TAP to the guest while it has buffers for them and the receive
    /// limiter lets them through.
    fn process_rx(&mut self) {
        if self.rx_rate_limiter.is_blocked() {
            // The limiter's timer comes back here, and reads the TAP dry then.
            self.metrics.rx_rate_limiter_throttled.inc();
            return;
        }
        let Some(Active {
            mem,
            queues,
            interrupt,
        }) = self.common.active_mut()
        else {
            return;
        };
        let mem: &GuestMemoryMmap = mem;
        let queue = &mut queues[RX_INDEX];
        // The driver need not tell us of new buffers while the TAP has nothing for them: we
        // look at the ring when a frame arrives. Notifications come back on when we run out.
        if queue.disable_notification(mem).is_err() {
            return self.common.fail("cannot reach the receive ring");
        }
        let mut delivered = false;
        let mut broken = None;
        loop {
            let mmds_frame = match self.rx_pending {
                Some(_) => None,
                None => self.mmds.as_mut().and_then(MmdsStack::next_frame),
            };
            let frame_len = match self.rx_pending {
                Some(len) => len,
                // MMDS's answers first: they are few and the guest waits for them.
                None if mmds_frame.is_some() => {
                    let frame = mmds_frame.unwrap_or_default();
                    let len = (VNET_HDR_LEN + frame.len()).min(FRAME_BUF_LEN);
                    self.rx_frame[..VNET_HDR_LEN].fill(0);
                    self.rx_frame[VNET_HDR_LEN..len].copy_from_slice(&frame[..len - VNET_HDR_LEN]);
                    self.rx_pending = Some(len);
                    self.rx_pending_mmds = true;
                    len
                }
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(len) if len >= VNET_HDR_LEN => {
                        self.rx_pending = Some(len);
                        len
                    }
                    Ok(len) => {
                        debug!("virtio-net {}: {len}-byte read from the TAP", self.id);
                        self.metrics.rx_tap_errors.inc();
                        continue;
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(err) => {
                        // The TAP went away (deleted under us): nothing more will come.
                        warn!("virtio-net {}: cannot read the TAP: {err}", self.id);
                        self.metrics.rx_tap_errors.inc();
                        break;
                    }
                },
            };
            let chain = match queue.iter(mem) {
                Ok(mut chains) => chains.next(),
                Err(err) => {
                    broken = Some(err.to_string());
                    break;
                }
            };
            let Some(chain) = chain else {
                // No buffer: keep the frame, stop reading the TAP, and have the driver tell
                // us when it posts one (unless it just did).
                match queue.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.metrics.no_rx_avail_buffer.inc();
                        break;
                    }
                    Err(err) => {
                        broken = Some(err.to_string());
                        break;
                    }
                }
            };
            if !self
                .rx_rate_limiter
                .consume((frame_len - VNET_HDR_LEN) as u64)
            {
                // The frame waits, and the TAP's queue behind it, until the timer fires.
                queue.go_to_previous_position();
                self.metrics.rx_rate_limiter_throttled.inc();
                break;
            }
            let head = chain.head_index();
            // No merged buffers: the whole frame goes in this one chain.
            self.rx_frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            let frame = &self.rx_frame[..frame_len];
            let used_len = match scatter(mem, chain, frame, &mut self.rx_scratch) {
                Ok(len) => {
                    self.rx_pending = None;
                    if std::mem::take(&mut self.rx_pending_mmds) {
                        MMDS_METRICS.tx_frames.inc();
                        MMDS_METRICS.tx_bytes.add((frame_len - VNET_HDR_LEN) as u64);
                    } else {
                        self.metrics.rx_packets_count.inc();
                        self.metrics
                            .rx_bytes_count
                            .add((frame_len - VNET_HDR_LEN) as u64);
                    }
                    len
                }
                Err(RxRefusal::TooSmall) => {
                    // The chain may fit the next frame: give it back and drop this one.
                    debug!(
                        "virtio-net {}: {frame_len}-byte frame dropped: buffer too small",
                        self.id
                    );
                    self.rx_pending = None;
                    self.rx_pending_mmds = false;
                    self.metrics.rx_dropped_too_big.inc();
                    queue.go_to_previous_position();
                    continue;
                }
                Err(RxRefusal::BadChain) => {
                    // The frame is not at fault: keep it for the next chain.
                    self.metrics.rx_bad_chain.inc();
                    0
                }
            };
            if let Err(err) = queue.add_used(mem, head, used_len) {
                broken = Some(err.to_string());
                break;
            }
            delivered = true;
        }
        if delivered {
            signal_used(interrupt, queue, mem);
        }
        if let Some(err) = broken {
            self.common.fail(&format!("receive ring: {err}"));
        }
    }

    /// Sends every frame the driver has made available to the TAP. Notifications stay off while
    /// it does: a driver streaming frames stores them meanwhile without an exit each (measured
    /// here: 400 000 frames sent one per notification by the probe took 100 to 5 000
    /// notifications). Polling the ring after a batch (as virtio-blk does) brought no more
    /// than that and cost much when the monitor's thread shared a CPU with the vCPU.
    fn process_tx(&mut self) {
        let acked_features = self.common.acked_features();
        let Some(Active {
            mem,
            queues,
            interrupt,
        }) = self.common.active_mut()
        else {
            return;
        };
        let mem: &GuestMemoryMmap = mem;
        let queue = &mut queues[TX_INDEX];
        let started = Instant::now();
        let mut reschedule = false;
        let mut throttled = false;
        let mut mmds_answered = false;
        loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            let mut served = false;
            loop {
                let chain = match queue.iter(mem) {
                    Ok(mut chains) => chains.next(),
                    Err(err) => {
                        // The available index is further ahead than the ring is long.
                        return self.common.fail(&format!("transmit ring: {err}"));
                    }
                };
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                let sent = gather(mem, chain, &mut self.tx_frame).and_then(|len| {
                    let frame = &self.tx_frame[..len];
                    check_tx_header(frame, acked_features)?;
                    Ok(frame)
                });
                if let Ok(frame) = &sent {
                    if !self
                        .tx_rate_limiter
                        .consume((frame.len() - VNET_HDR_LEN) as u64)
                    {
                        // The frame stays in the ring; the limiter's timer resumes sending.
                        queue.go_to_previous_position();
                        self.metrics.tx_rate_limiter_throttled.inc();
                        throttled = true;
                        break;
                    }
                }
                let for_mmds = match (&sent, self.mmds.as_mut()) {
                    (Ok(frame), Some(stack))
                        if is_mmds_frame(&frame[VNET_HDR_LEN..], stack.addr()) =>
                    {
                        stack.receive(&frame[VNET_HDR_LEN..]);
                        true
                    }
                    _ => false,
                };
                match sent {
                    // Never to the TAP: MMDS took it (or dropped it).
                    Ok(_) if for_mmds => mmds_answered = true,
                    Ok(frame) => match self.tap.write_frame(frame) {
                        Ok(_) => {
                            self.metrics.tx_packets_count.inc();
                            self.metrics
                                .tx_bytes_count
                                .add((frame.len() - VNET_HDR_LEN) as u64);
                        }
                        Err(err) => {
                            debug!("virtio-net {}: the TAP refused a frame: {err}", self.id);
                            self.metrics.tx_tap_errors.inc();
                        }
                    },
                    Err(reason) => {
                        debug!("virtio-net {}: transmit frame dropped: {reason:?}", self.id);
                        match reason {
                            TxDrop::BadChain => &self.metrics.tx_dropped_bad_chain,
                            TxDrop::TruncatedHeader => &self.metrics.tx_dropped_truncated_header,
                            TxDrop::BadHeader => &self.metrics.tx_dropped_bad_header,
                            TxDrop::Oversized => &self.metrics.tx_dropped_oversized,
                        }
                        .inc();
                    }
                }
                // A transmit buffer is only read: the used length is 0 either way. Returned at
                // once, so the driver can reuse it while we look for the next frame.
                if let Err(err) = queue.add_used(mem, head, 0) {
                    return self.common.fail(&format!("transmit ring: {err}"));
                }
                served = true;
            }
            if served {
                signal_used(interrupt, queue, mem);
            }
            if throttled {
                // Notifications stay off: the timer says when to look again.
                break;
            }
            if started.elapsed() >= TX_SLICE {
                // Busy for a whole slice: let the event loop serve the others, and come back.
                reschedule = true;
                let _ = queue.enable_notification(mem);
                break;
            }
            // Re-enable notifications; if the driver added frames meanwhile, send those too.
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if reschedule {
            if let Err(err) = self.common.queue_events()[TX_INDEX].write(1) {
                warn!(
                    "virtio-net {}: cannot requeue its transmit work: {err}",
                    self.id
                );
            }
        }
        if mmds_answered {
            self.process_mmds_answers();
        }
    }

    /// Puts what MMDS has for the guest on the receive queue.
    fn process_mmds_answers(&mut self) {
        if self.mmds.as_ref().is_some_and(MmdsStack::has_frames) {
            self.process_rx();
        }
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
