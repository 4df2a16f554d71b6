//! virtio-rng (virtio 1.2, 5.4), Firecracker's entropy device: one queue of write-only buffers
//! the device fills with bytes from the host's `getrandom`. Linux feeds them to its crng and
//! offers them as `/dev/hwrng`.
//!
//! Layout of this file: constants, the device state, filling a request, the queue handler,
//! activation and snapshots, the event handler, tests.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::common::{signal_used, Active, VirtioCommon};
use super::state::{DeviceSpecificState, DeviceStateError, VirtioDeviceState};
use super::{ActivateError, VirtioDevice, TYPE_RNG};
use crate::metrics::EntropyMetrics;
use crate::random::getrandom;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};

/// One request queue (`requestq`) of up to 256 entries.
pub const QUEUE_MAX_SIZES: &[u16] = &[256];
/// Most bytes one request gets, however long its buffers are: a driver may offer a chain of
/// many large buffers, and the device must not allocate (or read the host's pool) without
/// bound for it. Linux asks for at most a page or so at a time; a request that gets fewer
/// bytes than it offered room for simply asks again.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest chain the device looks at; longer chains loop or lie.
const MAX_CHAIN_LEN: usize = QUEUE_MAX_SIZES[0] as usize;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot create the queue event: {0}")]
    EventFd(std::io::Error),
    #[error("rate_limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
}

pub struct Rng {
    common: VirtioCommon,
    metrics: Arc<EntropyMetrics>,
    /// The bytes of one request, kept between requests (at most [`MAX_REQUEST_BYTES`]).
    bytes: Vec<u8>,
    /// Requests wait at the head of the queue while it says so (bandwidth: the bytes a request
    /// gets; ops: requests).
    rate_limiter: RateLimiter,
}

impl Rng {
    pub fn new(rate_limiter: &RateLimiterConfig, irq: EventFd) -> Result<Self, RngError> {
        let rate_limiter = RateLimiter::new(rate_limiter)?;
        let common = VirtioCommon::new(
            "virtio-rng".into(),
            TYPE_RNG,
            QUEUE_MAX_SIZES,
            0,
            Vec::new(),
            irq,
        )
        .map_err(RngError::EventFd)?;
        Ok(Self {
            common,
            metrics: Arc::new(EntropyMetrics::default()),
            bytes: Vec::new(),
            rate_limiter,
        })
    }

    /// The device's counters, for the monitor's metrics.
    pub fn metrics(&self) -> &Arc<EntropyMetrics> {
        &self.metrics
    }

    /// Serves every request the driver has made available and signals the guest after each
    /// batch.
    fn process_queue(&mut self) {
        let Some(Active {
            mem,
            queues,
            interrupt,
        }) = self.common.active_mut()
        else {
            return;
        };
        let mem: &GuestMemoryMmap = mem;
        let queue = &mut queues[0];
        let mut descriptors = Vec::with_capacity(4);
        loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            let mut done = Vec::new();
            let mut throttled = false;
            loop {
                let chain = match queue.iter(mem) {
                    Ok(mut chains) => chains.next(),
                    Err(err) => {
                        // The available index is further ahead than the ring is long.
                        self.metrics.entropy_event_fails.inc();
                        self.common.fail(&err.to_string());
                        return;
                    }
                };
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                descriptors.clear();
                descriptors.extend(chain.take(MAX_CHAIN_LEN));
                let bytes = request_len(mem, &descriptors).unwrap_or(0) as u64;
                if !self.rate_limiter.consume(bytes) {
                    // The request stays at the head; the limiter's timer brings us back.
                    queue.go_to_previous_position();
                    self.metrics.entropy_rate_limiter_throttled.inc();
                    throttled = true;
                    break;
                }
                let len = fill_request(mem, &descriptors, &mut self.bytes, &self.metrics);
                done.push((head, len));
            }
            let completed = !done.is_empty();
            for (head, len) in done {
                if let Err(err) = queue.add_used(mem, head, len) {
                    warn!("virtio-rng: cannot complete request {head}: {err}");
                }
            }
            if completed {
                signal_used(interrupt, queue, mem);
            }
            if throttled {
                break;
            }
            // Re-enable notifications; if the driver added requests meanwhile, serve those too.
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
    }
}

/// Why a request got no bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum RequestError {
    #[error("descriptor {0} is not writable by the device")]
    ReadOnly(usize),
    #[error("descriptor {0} is not in guest memory")]
    OutsideMemory(usize),
}

/// Fills the write-only buffers of one request with up to [`MAX_REQUEST_BYTES`] of host
/// randomness, in order; returns the used length. A request with a buffer the device may not
/// write, or one outside guest memory, is returned with nothing written, as is one the host
/// could not find randomness for (the driver asks again).
fn fill_request(
    mem: &GuestMemoryMmap,
    descriptors: &[Descriptor],
    bytes: &mut Vec<u8>,
    metrics: &EntropyMetrics,
) -> u32 {
    let wanted = match request_len(mem, descriptors) {
        Ok(wanted) => wanted,
        Err(err) => {
            debug!("virtio-rng: refused a request: {err}");
            metrics.entropy_event_fails.inc();
            return 0;
        }
    };
    bytes.resize(wanted, 0);
    if let Err(err) = getrandom(bytes) {
        warn!("virtio-rng: the host has no randomness to give: {err}");
        metrics.host_rng_fails.inc();
        return 0;
    }
    let mut written = 0;
    for descriptor in descriptors {
        if written == wanted {
            break;
        }
        let len = (descriptor.len() as usize).min(wanted - written);
        if mem
            .write_slice(&bytes[written..written + len], descriptor.addr())
            .is_err()
        {
            // Checked above; guest memory does not shrink while the device runs.
            metrics.entropy_event_fails.inc();
            return 0;
        }
        written += len;
    }
    metrics.entropy_bytes.add(written as u64);
    // At most MAX_REQUEST_BYTES.
    written as u32
}

/// How many bytes a request gets: the room its buffers offer, capped; an error when a buffer
/// is read-only or outside guest memory.
fn request_len(mem: &GuestMemoryMmap, descriptors: &[Descriptor]) -> Result<usize, RequestError> {
    let mut room = 0usize;
    for (index, descriptor) in descriptors.iter().enumerate() {
        if !descriptor.is_write_only() {
            return Err(RequestError::ReadOnly(index));
        }
        if !mem.check_range(
            descriptor.addr(),
            descriptor.len() as usize,
            Permissions::Write,
        ) {
            return Err(RequestError::OutsideMemory(index));
        }
        room = room.saturating_add(descriptor.len() as usize);
    }
    Ok(room.min(MAX_REQUEST_BYTES))
}

impl VirtioDevice for Rng {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if let Err(err) = self.common.activate(mem, queues) {
            self.metrics.activate_fails.inc();
            return Err(err);
        }
        // Requests may have been made available before the driver said DRIVER_OK.
        self.common.kick_queues()
    }

    fn reset(&mut self) {
        self.common.reset();
    }

    fn save_state(&self) -> Option<VirtioDeviceState> {
        Some(self.common.save_state(DeviceSpecificState::Entropy {
            rate_limiter: self.rate_limiter.state(),
        }))
    }

    fn restore_state(
        &mut self,
        mem: GuestMemoryMmap,
        state: &VirtioDeviceState,
    ) -> Result<(), DeviceStateError> {
        let DeviceSpecificState::Entropy { rate_limiter } = &state.specific else {
            return Err(DeviceStateError::TypeMismatch {
                saved: state.device_type,
                built: TYPE_RNG,
            });
        };
        self.rate_limiter
            .restore(rate_limiter)
            .map_err(|err| DeviceStateError::RateLimiter(err.to_string()))?;
        if self.common.restore_state(mem, state)? {
            // Requests made available after the snapshot's last notification was read would
            // otherwise wait for the next one.
            self.process_queue();
        }
        Ok(())
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let queue_event = &self.common.queue_events()[0];
        if events.fd() == queue_event.as_raw_fd() {
            // Read first: a notification that lands while the queue is served is not lost.
            let _ = queue_event.read();
            self.metrics.entropy_event_count.inc();
            if self.rate_limiter.is_blocked() {
                self.metrics.entropy_rate_limiter_throttled.inc();
            } else {
                self.process_queue();
            }
        } else if events.fd() == self.rate_limiter.as_raw_fd() {
            self.metrics.rate_limiter_event_count.inc();
            self.rate_limiter.on_timer();
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let queue = Events::new(&self.common.queue_events()[0], EventSet::IN);
        let timer = Events::new_raw(self.rate_limiter.as_raw_fd(), EventSet::IN);
        for events in [queue, timer] {
            if let Err(err) = ops.add(events) {
                warn!("virtio-rng: cannot watch its queue: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::virtio::VIRTIO_F_VERSION_1;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const QUEUE_LEN: u16 = 16;
    const RING: u64 = 0x1_0000;
    const BUFFERS: u64 = 0x4_0000;
    const MEM_SIZE: usize = 0x40_0000;

    struct Fixture {
        mem: &'static GuestMemoryMmap,
        queue: MockSplitQueue<'static, GuestMemoryMmap>,
        rng: Rng,
        next_desc: u16,
    }

    fn fixture() -> Fixture {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let queue = MockSplitQueue::create(mem, GuestAddress(RING), QUEUE_LEN);
        let mut rng = Rng::new(&Default::default(), EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
        rng.set_acked_features(VIRTIO_F_VERSION_1);
        rng.activate(mem.clone(), vec![queue.create_queue::<Queue>().unwrap()])
            .unwrap();
        Fixture {
            mem,
            queue,
            rng,
            next_desc: 0,
        }
    }

    impl Fixture {
        /// Makes a request of buffers (address, length, flags) available and serves it.
        fn request(&mut self, buffers: &[(u64, u32, u16)]) {
            let last = buffers.len() - 1;
            let descs: Vec<RawDescriptor> = buffers
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let (flags, next) = if i < last {
                        (flags | NEXT, self.next_desc + i as u16 + 1)
                    } else {
                        (flags, 0)
                    };
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
                })
                .collect();
            self.queue.add_desc_chains(&descs, self.next_desc).unwrap();
            self.next_desc += descs.len() as u16;
            self.rng.process_queue();
        }

        /// (id, len) of used entry `n`, and the used index.
        fn used(&self, n: u16) -> (u32, u32, u16) {
            let idx = self.queue.used().idx().load();
            let elem = self
                .queue
                .used()
                .ring()
                .ref_at(usize::from(n))
                .unwrap()
                .load();
            (elem.id(), elem.len(), idx)
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut bytes = vec![0u8; len];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            bytes
        }
    }

    /// Whether `bytes` look random rather than left alone: not all one value.
    fn not_constant(bytes: &[u8]) -> bool {
        bytes.iter().any(|b| *b != bytes[0])
    }

    #[test]
    fn a_request_gets_random_bytes_in_every_buffer() {
        let mut f = fixture();
        f.request(&[(BUFFERS, 64, W), (BUFFERS + 0x1000, 32, W)]);
        assert_eq!(f.used(0), (0, 96, 1));
        let first = f.read(BUFFERS, 64);
        let second = f.read(BUFFERS + 0x1000, 32);
        assert!(not_constant(&first), "{first:?}");
        assert!(not_constant(&second), "{second:?}");
        // Nothing past the buffers is touched.
        assert_eq!(f.read(BUFFERS + 64, 16), vec![0; 16]);
        assert_eq!(f.read(BUFFERS + 0x1000 + 32, 16), vec![0; 16]);
        // The next request gets other bytes.
        f.request(&[(BUFFERS + 0x2000, 64, W)]);
        assert_eq!(f.used(1), (2, 64, 2));
        assert_ne!(f.read(BUFFERS + 0x2000, 64), first);
        assert_eq!(f.rng.metrics.entropy_bytes.total(), 160);
        assert!(f.rng.interrupt().state().0 & crate::virtio::INTERRUPT_USED_RING != 0);
    }

    #[test]
    fn a_read_only_buffer_is_refused_untouched() {
        let mut f = fixture();
        f.request(&[(BUFFERS, 64, W), (BUFFERS + 0x1000, 64, 0)]);
        assert_eq!(f.used(0), (0, 0, 1));
        assert_eq!(f.read(BUFFERS, 64), vec![0; 64]);
        assert_eq!(f.rng.metrics.entropy_event_fails.total(), 1);
        // A buffer outside guest memory is refused the same way.
        f.request(&[(MEM_SIZE as u64 - 16, 64, W)]);
        assert_eq!(f.used(1), (2, 0, 2));
        assert_eq!(f.rng.metrics.entropy_event_fails.total(), 2);
        // The device goes on serving good requests.
        f.request(&[(BUFFERS, 8, W)]);
        assert_eq!(f.used(2), (3, 8, 3));
        assert!(!f.rng.interrupt().state().1);
    }

    #[test]
    fn a_huge_request_gets_at_most_the_cap() {
        let mut f = fixture();
        // 3 MiB of room offered in three buffers.
        let mib = 1 << 20;
        f.request(&[
            (BUFFERS, mib, W),
            (BUFFERS + u64::from(mib), mib, W),
            (BUFFERS + 2 * u64::from(mib), mib / 2, W),
        ]);
        assert_eq!(f.used(0), (0, MAX_REQUEST_BYTES as u32, 1));
        assert!(not_constant(&f.read(BUFFERS, MAX_REQUEST_BYTES)));
        let beyond = f.read(BUFFERS + MAX_REQUEST_BYTES as u64, 4096);
        assert_eq!(beyond, vec![0; 4096]);
        assert!(f.rng.bytes.capacity() < 2 * MAX_REQUEST_BYTES);
    }

    #[test]
    fn an_impossible_available_index_makes_the_device_need_a_reset() {
        let mut f = fixture();
        f.queue.avail().idx().store(QUEUE_LEN * 4);
        f.rng.process_queue();
        assert!(f.rng.interrupt().state().1);
        assert!(f.rng.common.active().is_none());
    }

    #[test]
    fn a_restored_device_goes_on_from_the_saved_positions() {
        let mut f = fixture();
        f.request(&[(BUFFERS, 16, W)]);
        let state = f.rng.save_state().unwrap();
        assert_eq!(state.device_type, TYPE_RNG);
        let mut again = Rng::new(&Default::default(), EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
        again.restore_state(f.mem.clone(), &state).unwrap();
        f.rng = again;
        f.request(&[(BUFFERS + 0x1000, 16, W)]);
        assert_eq!(f.used(1), (1, 16, 2));

        // Another kind of device's state is refused.
        let mut other = state.clone();
        other.specific = DeviceSpecificState::Vsock { guest_cid: 3 };
        let mut fresh = Rng::new(&Default::default(), EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
        assert!(fresh.restore_state(f.mem.clone(), &other).is_err());
    }
}
