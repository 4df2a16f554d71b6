//! virtio-vsock (virtio 1.2, section 5.10) with Firecracker's host-side contract: stream sockets
//! between guest ports and Unix sockets on the host (see [`muxer`]).
//!
//! Layout: constants and the configuration space, the device state, the RX, TX and event queue
//! handlers, activation, the event handler, tests. Everything runs on the event loop: the queue
//! events, the listening socket and each stream's socket are watched there, and a stream's
//! socket is read only when the guest has both credit and an RX buffer for its data.
//!
//! Streams do not survive a snapshot (Firecracker's contract): their host sockets belonged to
//! the monitor that took it. A restored device sends the driver a transport reset on the event
//! queue, and the driver drops the streams it had; new ones then work both ways.

mod connection;
pub mod muxer;
pub mod packet;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, info, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::muxer::{Muxer, MuxerError};
use self::packet::{read_packet, HDR_LEN, MAX_PAYLOAD, MIN_GUEST_CID};
use super::common::{next_chain, next_chain_or_notify, signal_used, Active, VirtioCommon};
use super::state::{DeviceSpecificState, DeviceStateError, VirtioDeviceState};
use super::{ActivateError, VirtioDevice, TYPE_VSOCK};
use crate::metrics::VsockMetrics;

/// RX (device to guest), TX (guest to device) and event queues, 256 entries each.
pub const QUEUE_MAX_SIZES: &[u16] = &[256, 256, 256];
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// `struct virtio_vsock_event`'s id for "every stream is gone" (virtio 1.2, 5.10.6.7); the
/// event is this one little-endian u32.
const EVENT_TRANSPORT_RESET: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved: a guest's CID is {MIN_GUEST_CID} or more")]
    ReservedCid(u64),
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    #[error("cannot create the queue events: {0}")]
    EventFd(std::io::Error),
}

pub struct Vsock {
    cid: u64,
    common: VirtioCommon,
    /// TX stopped because answers for the guest backed up; resumes as RX drains them.
    tx_stalled: bool,
    /// Wakes the event loop to catch up with changes made outside it (activation, reset).
    kick: EventFd,
    /// The driver has yet to hear that its streams are gone (after a restore); sent once it
    /// has an event buffer posted.
    transport_reset_pending: bool,
    muxer: Muxer,
    /// Scratch space for one packet's payload toward the guest (always `MAX_PAYLOAD` long).
    rx_payload: Vec<u8>,
    /// Scratch space for one packet's payload from the guest (always `MAX_PAYLOAD` long).
    tx_payload: Vec<u8>,
    metrics: Arc<VsockMetrics>,
}

impl Vsock {
    /// A device for guest `cid`, listening for host connections on `uds_path` (which must not
    /// exist).
    pub fn new(cid: u64, uds_path: &Path, irq: EventFd) -> Result<Self, VsockError> {
        if cid < MIN_GUEST_CID {
            return Err(VsockError::ReservedCid(cid));
        }
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(cid, uds_path, metrics.clone())?;
        let common = VirtioCommon::new(
            "vsock".into(),
            TYPE_VSOCK,
            QUEUE_MAX_SIZES,
            0,
            cid.to_le_bytes().to_vec(),
            irq,
        )
        .map_err(VsockError::EventFd)?;
        Ok(Self {
            cid,
            common,
            tx_stalled: false,
            kick: EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?,
            transport_reset_pending: false,
            muxer,
            rx_payload: vec![0; MAX_PAYLOAD],
            tx_payload: vec![0; MAX_PAYLOAD],
            metrics,
        })
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The device's counters, for the monitor's metrics.
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }

    /// Fills RX buffers while the muxer has packets for the guest.
    fn process_rx(&mut self) {
        self.process_event_queue();
        if self.transport_reset_pending {
            // The driver must drop its old streams before it hears of new ones: a REQUEST
            // reusing an old stream's ports would be taken for that stream, and then dropped
            // with it. Packets wait until the driver posts an event buffer.
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
        let queue = &mut queues[RX];
        let mut used = false;
        let mut broken = None;
        while self.muxer.has_rx() {
            // No buffers: the driver is asked to notify the RX queue when it posts some.
            let chain = match next_chain_or_notify(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(err) => {
                    broken = Some(err);
                    break;
                }
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(mem) {
                Ok(writer) if writer.available_bytes() >= HDR_LEN => writer,
                result => {
                    debug!("vsock: unusable RX buffer {head}: {:?}", result.err());
                    self.metrics.rx_invalid_buffers.inc();
                    used |= add_used(queue, mem, head, 0);
                    continue;
                }
            };
            let room = (writer.available_bytes() - HDR_LEN).min(MAX_PAYLOAD);
            let Some(header) = self.muxer.fill_rx(&mut self.rx_payload[..room]) else {
                // Nothing came of it (a socket with no data after all): keep the buffer.
                queue.go_to_previous_position();
                continue;
            };
            let len = header.len as usize;
            let written = std::io::Write::write_all(&mut writer, &header.to_bytes())
                .and_then(|()| std::io::Write::write_all(&mut writer, &self.rx_payload[..len]));
            if let Err(err) = written {
                // The buffer was checked for room and memory: only a driver changing it under
                // us gets here, and then the packet is lost with its stream's data.
                warn!("vsock: cannot write an RX packet: {err}");
                self.metrics.rx_invalid_buffers.inc();
            }
            self.metrics.rx_packets_count.inc();
            self.metrics.rx_bytes_count.add(len as u64);
            used |= add_used(queue, mem, head, (HDR_LEN + len) as u32);
        }
        if used {
            signal_used(interrupt, queue, mem);
        }
        if let Some(err) = broken {
            return self.common.fail(&format!("RX ring: {err}"));
        }
        if self.tx_stalled && !self.muxer.rx_backlog_full() {
            self.tx_stalled = false;
            self.process_tx();
        }
    }

    /// Takes the guest's TX packets and hands them to the muxer.
    fn process_tx(&mut self) {
        let Some(Active {
            mem,
            queues,
            interrupt,
        }) = self.common.active_mut()
        else {
            return;
        };
        let mem: &GuestMemoryMmap = mem;
        let queue = &mut queues[TX];
        let mut used = false;
        let mut broken = None;
        'ring: loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            loop {
                let chain = match next_chain(queue, mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(err) => {
                        broken = Some(err);
                        break 'ring;
                    }
                };
                if self.muxer.rx_backlog_full() {
                    // Notifications stay off: RX resumes TX itself once the backlog drains.
                    queue.go_to_previous_position();
                    self.tx_stalled = true;
                    break 'ring;
                }
                let head = chain.head_index();
                match chain.reader(mem) {
                    Ok(mut reader) => {
                        let available = reader.available_bytes();
                        match read_packet(&mut reader, available, self.cid, &mut self.tx_payload) {
                            Ok(header) => {
                                self.metrics.tx_packets_count.inc();
                                self.metrics.tx_bytes_count.add(u64::from(header.len));
                                let payload = &self.tx_payload[..header.len as usize];
                                self.muxer.send_to_host(&header, payload);
                            }
                            Err(err) => {
                                debug!("vsock: TX packet {head} dropped: {err}");
                                self.metrics.invalid_packets.inc();
                            }
                        }
                    }
                    Err(err) => {
                        debug!("vsock: TX packet {head} outside guest memory: {err}");
                        self.metrics.invalid_packets.inc();
                    }
                }
                used |= add_used(queue, mem, head, 0);
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        self.muxer.flush_burst();
        if used {
            signal_used(interrupt, queue, mem);
        }
        if let Some(err) = broken {
            return self.common.fail(&format!("TX ring: {err}"));
        }
        // Packets from the guest may have answers (responses, resets, credit).
        self.process_rx();
    }

    /// Tells the driver its streams are gone, in the first event buffer it has posted.
    fn process_event_queue(&mut self) {
        if !self.transport_reset_pending {
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
        let queue = &mut queues[EVENT];
        let mut used = false;
        let mut broken = None;
        loop {
            // No buffer yet: the driver is asked to notify the event queue when it posts one.
            let chain = match next_chain_or_notify(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(err) => {
                    broken = Some(err);
                    break;
                }
            };
            let head = chain.head_index();
            let event = EVENT_TRANSPORT_RESET.to_le_bytes();
            let written = chain
                .writer(mem)
                .map_err(|err| err.to_string())
                .and_then(|mut w| {
                    if w.available_bytes() < event.len() {
                        return Err(format!("{} bytes", w.available_bytes()));
                    }
                    std::io::Write::write_all(&mut w, &event).map_err(|err| err.to_string())
                });
            match written {
                Ok(()) => {
                    used |= add_used(queue, mem, head, event.len() as u32);
                    self.transport_reset_pending = false;
                    info!("vsock: sent the guest a transport reset");
                    break;
                }
                Err(err) => {
                    debug!("vsock: unusable event buffer {head}: {err}");
                    used |= add_used(queue, mem, head, 0);
                }
            }
        }
        if used {
            signal_used(interrupt, queue, mem);
        }
        if let Some(err) = broken {
            self.common.fail(&format!("event ring: {err}"));
        }
    }

    fn watch(&self, ops: &mut EventOps, fd: std::os::fd::RawFd, what: &str) {
        if let Err(err) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            warn!("vsock: cannot watch {what}: {err}");
        }
    }
}

/// Returns the chain `head` to the guest with `len` bytes written; true when it went.
fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(err) => {
            warn!("vsock: cannot return buffer {head}: {err}");
            false
        }
    }
}

impl VirtioDevice for Vsock {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        self.common.activate(mem, queues)?;
        self.tx_stalled = false;
        // Host connections may have waited for the guest; the event loop sends their requests.
        if let Err(err) = self.kick.write(1) {
            self.common.deactivate();
            return Err(ActivateError::Io(err));
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.common.reset();
        self.tx_stalled = false;
        // A driver that starts afresh has no streams to drop.
        self.transport_reset_pending = false;
        self.muxer.reset();
        // The closed streams are unwatched on the event loop.
        if let Err(err) = self.kick.write(1) {
            warn!("vsock: cannot wake the event loop: {err}");
        }
    }

    fn save_state(&self) -> Option<VirtioDeviceState> {
        Some(self.common.save_state(DeviceSpecificState::Vsock {
            guest_cid: self.cid,
        }))
    }

    fn restore_state(
        &mut self,
        mem: GuestMemoryMmap,
        state: &VirtioDeviceState,
    ) -> Result<(), DeviceStateError> {
        let DeviceSpecificState::Vsock { guest_cid } = &state.specific else {
            return Err(DeviceStateError::TypeMismatch {
                saved: state.device_type,
                built: TYPE_VSOCK,
            });
        };
        // The driver keeps the CID it read (Linux rereads it only on a transport reset, which
        // would then change the guest's address under its listeners).
        if *guest_cid != self.cid {
            return Err(DeviceStateError::Mismatch {
                what: "vsock guest CID",
                saved: guest_cid.to_string(),
                built: self.cid.to_string(),
            });
        }
        let started = self.common.restore_state(mem, state)?;
        self.tx_stalled = false;
        // The driver's streams were with the old monitor's sockets; it must drop them before
        // it hears of new ones. The event loop sends the reset first, then serves what the
        // driver left in its TX ring (packets of dropped streams get RSTs).
        self.transport_reset_pending = started;
        if started {
            self.kick
                .write(1)
                .map_err(|err| DeviceStateError::Activate(ActivateError::Io(err)))?;
        }
        Ok(())
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let queue_events = self.common.queue_events();
        if fd == queue_events[RX].as_raw_fd() {
            let _ = queue_events[RX].read();
            self.metrics.rx_queue_event_count.inc();
            self.process_rx();
        } else if fd == queue_events[TX].as_raw_fd() {
            let _ = queue_events[TX].read();
            self.metrics.tx_queue_event_count.inc();
            self.process_tx();
        } else if fd == queue_events[EVENT].as_raw_fd() {
            // The event queue only carries transport resets (after a snapshot restore): the
            // driver posted a buffer for one, and packets may be waiting for it to go first.
            let _ = queue_events[EVENT].read();
            self.process_rx();
        } else if fd == self.kick.as_raw_fd() {
            let _ = self.kick.read();
            self.process_tx();
        } else if fd == self.muxer.listener_fd() {
            self.muxer.accept();
        } else {
            self.muxer.handle_event(fd, events.event_set());
            self.process_rx();
        }
        self.muxer.sync_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.common.queue_events().iter().enumerate() {
            self.watch(ops, evt.as_raw_fd(), &format!("queue {index}"));
        }
        self.watch(ops, self.kick.as_raw_fd(), "its wake-up event");
        self.watch(ops, self.muxer.listener_fd(), "its listening socket");
    }
}

#[cfg(test)]
mod tests;
