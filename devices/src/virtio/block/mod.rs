//! virtio-blk on a raw host file: read, write, flush (fdatasync), GET_ID, read-only drives,
//! and a backing file that can change while the guest runs (`PATCH /drives/{id}`).
//!
//! Layout of this file: constants and the configuration space, the device state, activation,
//! the queue handler, the event handler, tests.

mod async_engine;
mod discard;
mod request;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::memory::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, info, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

pub use self::async_engine::AsyncEngineError;
use self::async_engine::{AsyncEngine, Finished};
use self::request::{data_bytes, io_completion, parse, run_sync, Completion, Disk, Request};
pub use self::request::{RequestError, SECTOR_SIZE};
use super::common::{signal_used, Active, VirtioCommon};
use super::state::{DeviceSpecificState, DeviceStateError, VirtioDeviceState};
use super::{ActivateError, VirtioDevice, TYPE_BLOCK};
use crate::log_limit::{held_back_note, LogLimiter};
use crate::metrics::BlockMetrics;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};

/// One request queue of up to 256 entries.
pub const QUEUE_MAX_SIZES: &[u16] = &[256];
/// Configuration space (`struct virtio_blk_config`) up to `write_zeroes_may_unmap`: the
/// capacity (u64, in 512-byte sectors) at 0 and the discard and write-zeroes limits at 36..57.
const CONFIG_LEN: usize = 60;
const CONFIG_MAX_DISCARD_SECTORS: usize = 36;
const CONFIG_MAX_DISCARD_SEG: usize = 40;
const CONFIG_DISCARD_SECTOR_ALIGNMENT: usize = 44;
const CONFIG_MAX_WRITE_ZEROES_SECTORS: usize = 48;
const CONFIG_MAX_WRITE_ZEROES_SEG: usize = 52;
const CONFIG_WRITE_ZEROES_MAY_UNMAP: usize = 56;

/// The configuration space of a drive of `capacity_sectors`.
fn config_space(capacity_sectors: u64) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    let mut put = |at: usize, value: &[u8]| config[at..at + value.len()].copy_from_slice(value);
    put(0, &capacity_sectors.to_le_bytes());
    put(
        CONFIG_MAX_DISCARD_SECTORS,
        &discard::MAX_SECTORS.to_le_bytes(),
    );
    put(CONFIG_MAX_DISCARD_SEG, &discard::MAX_SEGMENTS.to_le_bytes());
    put(
        CONFIG_DISCARD_SECTOR_ALIGNMENT,
        &discard::SECTOR_ALIGNMENT.to_le_bytes(),
    );
    put(
        CONFIG_MAX_WRITE_ZEROES_SECTORS,
        &discard::MAX_SECTORS.to_le_bytes(),
    );
    put(
        CONFIG_MAX_WRITE_ZEROES_SEG,
        &discard::MAX_SEGMENTS.to_le_bytes(),
    );
    put(CONFIG_WRITE_ZEROES_MAY_UNMAP, &[1]);
    config
}
/// Longest chain the device looks at: header, data buffers, status; longer chains loop or lie.
const MAX_CHAIN_LEN: usize = QUEUE_MAX_SIZES[0] as usize;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot read the size of the drive's file: {0}")]
    Size(std::io::Error),
    #[error("cannot read how the drive's file was opened: {0}")]
    AccessMode(std::io::Error),
    #[error("the drive is read-write but its file was opened read-only")]
    NotWritable,
    #[error("cannot create the queue event: {0}")]
    EventFd(std::io::Error),
    #[error("rate_limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
    #[error(transparent)]
    AsyncEngine(#[from] AsyncEngineError),
}

/// The capacity in sectors of a drive backed by `file`, checking that a read-write drive's
/// file was opened for writing.
fn capacity_of(file: &File, read_only: bool) -> Result<u64, BlockError> {
    if !read_only && !opened_for_writing(file).map_err(BlockError::AccessMode)? {
        return Err(BlockError::NotWritable);
    }
    // The end offset, not the metadata's length: a block device's metadata says 0.
    let size = (&*file).seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
    // A trailing partial sector cannot be addressed by the guest.
    Ok(size / SECTOR_SIZE)
}

fn opened_for_writing(file: &File) -> std::io::Result<bool> {
    // SAFETY: F_GETFL only reads the flags of the open file description behind an fd that
    // `file` owns for the duration of the call.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(flags & libc::O_ACCMODE != libc::O_RDONLY)
}

/// Whether this host can run the Async engine (sets up and drops a small io_uring), for a
/// drive's configuration to be refused when it is given rather than at boot.
pub fn check_async_engine() -> Result<(), AsyncEngineError> {
    AsyncEngine::new(1).map(drop)
}

pub struct Block {
    id: String,
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    common: VirtioCommon,
    metrics: Arc<BlockMetrics>,
    poller: AvailPoller,
    /// Requests wait at the head of the queue while it says so.
    rate_limiter: RateLimiter,
    /// Host I/O errors are logged, but a guest can make them at will (writing past the
    /// file-size limit, on a full disk).
    host_error_log: LogLimiter,
    /// The Async engine's io_uring; None for the Sync engine (I/O on the event loop).
    engine: Option<AsyncEngine>,
}

/// At most one host I/O error line per drive in this time.
const HOST_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

impl Block {
    /// A drive backed by `file` (opened read-only or read-write to match `read_only`).
    pub fn new(
        id: String,
        file: File,
        read_only: bool,
        rate_limiter: &RateLimiterConfig,
        irq: EventFd,
    ) -> Result<Self, BlockError> {
        let rate_limiter = RateLimiter::new(rate_limiter)?;
        let capacity_sectors = capacity_of(&file, read_only)?;
        let mut features = 1 << VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let common = VirtioCommon::new(
            format!("virtio-blk {id}"),
            TYPE_BLOCK,
            QUEUE_MAX_SIZES,
            features,
            config_space(capacity_sectors).to_vec(),
            irq,
        )
        .map_err(BlockError::EventFd)?;
        Ok(Self {
            id,
            file,
            read_only,
            capacity_sectors,
            common,
            metrics: Arc::new(BlockMetrics::default()),
            poller: AvailPoller::default(),
            rate_limiter,
            host_error_log: LogLimiter::new(HOST_ERROR_LOG_INTERVAL),
            engine: None,
        })
    }

    /// Switches the drive to the Async engine (io_uring); before the device is registered with
    /// the event loop, which then watches the engine's completions too.
    pub fn use_async_engine(&mut self) -> Result<(), BlockError> {
        self.engine = Some(AsyncEngine::new(QUEUE_MAX_SIZES[0])?);
        Ok(())
    }

    /// Whether I/O goes through the Async engine.
    pub fn is_async(&self) -> bool {
        self.engine.is_some()
    }

    /// Waits until the Async engine has nothing in flight and completes what it finished, so
    /// that a snapshot sees every request either untouched in the available ring or used.
    /// The Sync engine never has anything in flight.
    pub fn finish_in_flight(&mut self) {
        let Some(engine) = &mut self.engine else {
            return;
        };
        match engine.drain() {
            Ok(finished) => self.complete(finished),
            Err(err) => warn!(
                "virtio-blk {}: cannot wait for the requests in flight: {err}",
                self.id
            ),
        }
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// The drive id the user gave (`drive_id`), also the guest's GET_ID answer.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The file the drive reads and writes now (the monitor compares drives' files by it).
    pub fn backing_file(&self) -> &File {
        &self.file
    }

    /// The drive's counters, for the monitor's metrics.
    pub fn metrics(&self) -> &Arc<BlockMetrics> {
        &self.metrics
    }

    /// Backs the drive with `file` from now on (opened like the first one: read-write unless
    /// the drive is read-only), and tells the guest the new capacity through a
    /// configuration-change interrupt. The drive stays read-only or read-write as it was.
    ///
    /// No request is lost or split between the files: requests are carried out whole while
    /// the device is locked, as this is (the Async engine's in flight are waited for), so each
    /// one the guest made available either finished on the old file or will run on the new one. Writes already done on the old file are in
    /// the host's page cache and survive it being closed.
    pub fn update_backing(&mut self, file: File) -> Result<(), BlockError> {
        let capacity_sectors = capacity_of(&file, self.read_only)?;
        // Requests in flight on the old file finish there first.
        self.finish_in_flight();
        self.file = file;
        self.capacity_sectors = capacity_sectors;
        self.common
            .set_config(config_space(capacity_sectors).to_vec());
        self.metrics.update_count.inc();
        info!(
            "virtio-blk {}: new backing file, {capacity_sectors} sectors",
            self.id
        );
        // A driver that has not started the device reads the configuration when it does.
        if self.common.active().is_some() {
            self.common.interrupt().signal_config_change();
        }
        Ok(())
    }

    /// The rate limiter in force (`GET /vm/config` shows what PATCH made of it).
    pub fn rate_limiter_config(&self) -> RateLimiterConfig {
        self.rate_limiter.config()
    }

    /// Takes new limits at once (`PATCH /drives/{id}` with `rate_limiter`): the buckets named
    /// are replaced, and a request waiting at the head of the queue is tried again under them.
    pub fn update_rate_limiter(&mut self, update: &RateLimiterConfig) -> Result<(), BlockError> {
        self.rate_limiter.update(update)?;
        info!(
            "virtio-blk {}: rate limiter now {:?}",
            self.id,
            self.rate_limiter.config()
        );
        self.process_queue();
        Ok(())
    }

    /// Serves every request the driver has made available, signals the guest after each batch,
    /// and briefly polls for the next one before it goes back to waiting for a notification.
    /// With the Async engine a batch's reads, writes and flushes go to the kernel together and
    /// complete when it says so (here, for those it finished at once; `complete` for the rest).
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
        let disk = Disk {
            file: &self.file,
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
            id: self.id.as_bytes(),
            metrics: &self.metrics,
        };
        let queue = &mut queues[0];
        let mut descriptors = Vec::with_capacity(4);
        loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            let mut done = Vec::new();
            let mut throttled = false;
            // The engine is full: the next completion brings the device back.
            let mut stalled = false;
            loop {
                if self
                    .engine
                    .as_ref()
                    .is_some_and(|engine| !engine.has_room())
                {
                    stalled = true;
                    break;
                }
                let chain = match queue.iter(mem) {
                    Ok(mut chains) => chains.next(),
                    Err(err) => {
                        // The available index is further ahead than the ring is long: the
                        // driver is broken or hostile, and nothing in the ring can be trusted.
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
                if !self.rate_limiter.consume(data_bytes(mem, &descriptors)) {
                    // Not now: the request stays at the head, and the limiter's timer brings
                    // the device back when it fits.
                    queue.go_to_previous_position();
                    self.metrics.rate_limiter_throttled_events.inc();
                    throttled = true;
                    break;
                }
                let completion = match parse(mem, &descriptors, &disk) {
                    Request::Done(completion) => completion,
                    Request::Io(io) => match &mut self.engine {
                        None => {
                            let result = run_sync(mem, &io, &self.file);
                            io_completion(&io, result, &self.metrics)
                        }
                        Some(engine) => match engine.push(mem, &self.file, head, io) {
                            Ok(()) => continue,
                            Err((io, err)) => io_completion(&io, Err(err), &self.metrics),
                        },
                    },
                };
                finish_request(&self.id, mem, &mut self.host_error_log, &completion);
                done.push((head, completion.used_len));
            }
            if let Some(engine) = &mut self.engine {
                if let Err(err) = engine.submit() {
                    warn!(
                        "virtio-blk {}: cannot submit to the io_uring: {err}",
                        self.id
                    );
                }
                // What the kernel finished while submitting (a read from the page cache) is
                // used now, without a trip through the event loop; so is what its workers
                // finish within a short poll, for a driver with one request in flight.
                if done.is_empty() && engine.in_flight() > 0 {
                    engine.poll_completion(COMPLETION_POLL_WINDOW);
                }
                for Finished { head, io, result } in engine.reap() {
                    let completion = complete_io(mem, &self.file, &io, result, &self.metrics);
                    finish_request(&self.id, mem, &mut self.host_error_log, &completion);
                    done.push((head, completion.used_len));
                }
            }
            let completed = !done.is_empty();
            add_used(&self.id, queue, mem, done);
            // Signal before polling: the guest must not wait for the poll window to end.
            if completed {
                signal_used(interrupt, queue, mem);
            }
            if throttled || stalled {
                // Notifications stay off: the timer or a completion, not the driver, says when
                // to look again.
                break;
            }
            // With notifications still off, a driver that submits its next request at once
            // (one request in flight) hands it over without an exit to the host.
            if completed && self.poller.more_arrived(queue, mem) {
                continue;
            }
            // Re-enable notifications; if the driver added requests meanwhile, serve those too.
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
    }

    /// Puts the Async engine's `finished` requests into the used ring and signals the guest;
    /// then serves the queue again, which a full engine had stopped.
    fn complete(&mut self, finished: Vec<Finished>) {
        if finished.is_empty() {
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
        let queue = &mut queues[0];
        let mut done = Vec::with_capacity(finished.len());
        for Finished { head, io, result } in finished {
            let completion = complete_io(mem, &self.file, &io, result, &self.metrics);
            finish_request(&self.id, mem, &mut self.host_error_log, &completion);
            done.push((head, completion.used_len));
        }
        add_used(&self.id, queue, mem, done);
        signal_used(interrupt, queue, mem);
        if !self.rate_limiter.is_blocked() {
            self.process_queue();
        }
    }

    /// The Async engine's completions, when the event loop says some arrived.
    fn on_completions(&mut self) {
        let Some(engine) = &mut self.engine else {
            return;
        };
        engine.clear_completion_event();
        let finished = engine.reap();
        self.complete(finished);
    }
}

/// The completion of `io` once the Async engine moved `result`'s bytes. A short transfer (the
/// kernel may stop early, e.g. at a signal) is finished here on the Sync path.
fn complete_io(
    mem: &GuestMemoryMmap,
    file: &File,
    io: &request::IoRequest,
    result: Result<u64, RequestError>,
    metrics: &BlockMetrics,
) -> Completion {
    let result = result.and_then(|bytes| {
        if io.op != request::IoOp::Flush && bytes < io.len() {
            run_sync(mem, &io.remainder(bytes), file)
        } else {
            Ok(())
        }
    });
    io_completion(io, result, metrics)
}

/// Writes a request's status byte, logging a host I/O error behind it (rate-limited).
fn finish_request(
    id: &str,
    mem: &GuestMemoryMmap,
    host_error_log: &mut LogLimiter,
    completion: &Completion,
) {
    if let Some(err) = &completion.host_error {
        if let Some(held_back) = host_error_log.allow() {
            warn!(
                "virtio-blk {id}: {err}; the guest gets an I/O error{}",
                held_back_note(held_back)
            );
        }
    }
    if let Some(addr) = completion.status_addr {
        if mem.write_obj(completion.status, addr).is_err() {
            debug!("virtio-blk {id}: status byte outside guest memory");
        }
    }
}

/// Returns finished chains to the driver.
fn add_used(id: &str, queue: &mut Queue, mem: &GuestMemoryMmap, done: Vec<(u16, u32)>) {
    for (head, len) in done {
        if let Err(err) = queue.add_used(mem, head, len) {
            warn!("virtio-blk {id}: cannot complete request {head}: {err}");
        }
    }
}

/// How long the device watches the available ring after a batch, at most.
const POLL_WINDOW_MAX: Duration = Duration::from_micros(20);
/// How long the device waits for the Async engine's completion after a submission that
/// completed nothing at once, before it leaves the completion to the event loop.
const COMPLETION_POLL_WINDOW: Duration = Duration::from_micros(20);
/// Below this a poll window is not worth its cost: polling stops for a while.
const POLL_WINDOW_MIN: Duration = Duration::from_micros(2);
/// Batches served without polling before polling is tried again.
const POLL_COOLDOWN_BATCHES: u32 = 64;

/// Adaptive polling of the available ring. A queue notification costs the guest an exit and the
/// event loop a wake-up, several microseconds on a PVM host, while a driver with one request in
/// flight submits the next within a microsecond of seeing the last one complete. Polling pays
/// off for such a driver and is wasted on one that submits rarely: the window halves after
/// each miss and, once it is too small to matter, polling pauses for a number of batches.
#[derive(Debug)]
struct AvailPoller {
    window: Duration,
    cooldown: u32,
}

impl Default for AvailPoller {
    fn default() -> Self {
        Self {
            window: POLL_WINDOW_MAX,
            cooldown: 0,
        }
    }
}

impl AvailPoller {
    /// Watches the ring for up to the current window; true when the driver made more available.
    fn more_arrived(&mut self, queue: &Queue, mem: &GuestMemoryMmap) -> bool {
        if self.window.is_zero() {
            if self.cooldown > 0 {
                self.cooldown -= 1;
                return false;
            }
            self.window = POLL_WINDOW_MAX;
        }
        let start = Instant::now();
        loop {
            let avail = queue.avail_idx(mem, Ordering::Acquire).map(|idx| idx.0);
            if avail.is_ok_and(|idx| idx != queue.next_avail()) {
                self.window = POLL_WINDOW_MAX;
                return true;
            }
            if start.elapsed() >= self.window {
                break;
            }
            std::hint::spin_loop();
        }
        self.window /= 2;
        if self.window < POLL_WINDOW_MIN {
            self.window = Duration::ZERO;
            self.cooldown = POLL_COOLDOWN_BATCHES;
        }
        false
    }
}

impl VirtioDevice for Block {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        self.common.activate(mem, queues)?;
        // Requests may have been made available before the driver said DRIVER_OK.
        self.common.kick_queues()
    }

    fn reset(&mut self) {
        // On a vCPU thread, which does not wait for the kernel: what is in flight is dropped
        // when it completes.
        if let Some(engine) = &mut self.engine {
            engine.orphan_all();
        }
        self.common.reset();
    }

    fn save_state(&self) -> Option<VirtioDeviceState> {
        Some(self.common.save_state(DeviceSpecificState::Block {
            drive_id: self.id.clone(),
            config_generation: self.common.config_generation(),
            rate_limiter: self.rate_limiter.state(),
        }))
    }

    fn restore_state(
        &mut self,
        mem: GuestMemoryMmap,
        state: &VirtioDeviceState,
    ) -> Result<(), DeviceStateError> {
        let DeviceSpecificState::Block {
            drive_id,
            config_generation,
            rate_limiter,
        } = &state.specific
        else {
            return Err(DeviceStateError::TypeMismatch {
                saved: state.device_type,
                built: TYPE_BLOCK,
            });
        };
        if *drive_id != self.id {
            return Err(DeviceStateError::Mismatch {
                what: "drive id",
                saved: drive_id.clone(),
                built: self.id.clone(),
            });
        }
        self.rate_limiter
            .restore(rate_limiter)
            .map_err(|err| DeviceStateError::RateLimiter(err.to_string()))?;
        let started = self.common.restore_state(mem, state)?;
        self.common.set_config_generation(*config_generation);
        if started {
            // Requests the driver made available after the snapshot's last notification was
            // read would otherwise wait for the next one.
            self.process_queue();
        }
        Ok(())
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let queue_event = &self.common.queue_events()[0];
        if events.fd() == queue_event.as_raw_fd() {
            // Read first: a notification that lands while the queue is served is not lost.
            let _ = queue_event.read();
            self.metrics.queue_event_count.inc();
            if self.rate_limiter.is_blocked() {
                // The timer will serve it.
                self.metrics.rate_limiter_throttled_events.inc();
            } else {
                self.process_queue();
            }
        } else if events.fd() == self.rate_limiter.as_raw_fd() {
            self.metrics.rate_limiter_event_count.inc();
            self.rate_limiter.on_timer();
            self.process_queue();
        } else if self
            .engine
            .as_ref()
            .is_some_and(|engine| events.fd() == engine.completion_fd())
        {
            self.on_completions();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let queue = Events::new(&self.common.queue_events()[0], EventSet::IN);
        let timer = Events::new_raw(self.rate_limiter.as_raw_fd(), EventSet::IN);
        let completions = self
            .engine
            .as_ref()
            .map(|engine| Events::new_raw(engine.completion_fd(), EventSet::IN));
        for events in [Some(queue), Some(timer), completions]
            .into_iter()
            .flatten()
        {
            if let Err(err) = ops.add(events) {
                warn!("virtio-blk {}: cannot watch its queue: {err}", self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests;
