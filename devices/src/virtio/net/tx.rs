//! The transmit queue: the guest's frames to the TAP, or to MMDS when they are for it.

use std::time::Instant;

use crate::memory::GuestMemoryMmap;
use log::{debug, warn};
use virtio_queue::{QueueOwnedT, QueueT};

use super::frame::{check_tx_header, gather, TxDrop};
use super::{Net, TX_INDEX, TX_SLICE, VNET_HDR_LEN};
use crate::mmds::{is_mmds_frame, MmdsStack};
use crate::virtio::common::{signal_used, Active};

impl Net {
    /// Sends every frame the driver has made available to the TAP. Notifications stay off while
    /// it does: a driver streaming frames stores them meanwhile without an exit each (measured
    /// here: 400 000 frames sent one per notification by the probe took 100 to 5 000
    /// notifications). Polling the ring after a batch (as virtio-blk does) brought no more
    /// than that and cost much when the monitor's thread shared a CPU with the vCPU.
    pub(super) fn process_tx(&mut self) {
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
    pub(super) fn process_mmds_answers(&mut self) {
        if self.mmds.as_ref().is_some_and(MmdsStack::has_frames) {
            self.process_rx();
        }
    }
}
