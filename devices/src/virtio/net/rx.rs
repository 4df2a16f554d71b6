//! The receive queue: frames from MMDS and the TAP into the guest's buffers.

use crate::memory::GuestMemoryMmap;
use log::{debug, warn};
use virtio_queue::{QueueOwnedT, QueueT};

use super::frame::{scatter, RxRefusal};
use super::{Net, FRAME_BUF_LEN, NUM_BUFFERS_OFFSET, RX_INDEX, VNET_HDR_LEN};
use crate::metrics::MMDS_METRICS;
use crate::mmds::MmdsStack;
use crate::virtio::common::{signal_used, Active};

impl Net {
    /// Moves frames from the TAP to the guest while it has buffers for them and the receive
    /// limiter lets them through.
    pub(super) fn process_rx(&mut self) {
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
}
