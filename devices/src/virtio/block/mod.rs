//! virtio-blk on a raw host file: read, write, flush (fdatasync), GET_ID, read-only drives,
//! and a backing file that can change while the guest runs (`PATCH /drives/{id}`).
//!
//! Layout of this file: constants and the configuration space, the device state, activation,
//! the queue handler, the event handler, tests.

mod request;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, info, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::request::{execute, Disk};
pub use self::request::{RequestError, SECTOR_SIZE};
use super::{
    read_config_bytes, ActivateError, Interrupt, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::metrics::BlockMetrics;

/// One request queue of up to 256 entries.
pub const QUEUE_MAX_SIZES: &[u16] = &[256];
/// Configuration space: `capacity` (u64, in 512-byte sectors) is all the driver needs.
const CONFIG_CAPACITY_LEN: usize = 8;
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

/// The queue and memory of a device the driver has started.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
}

pub struct Block {
    id: String,
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    config: [u8; CONFIG_CAPACITY_LEN],
    /// Bumped with every change of `config` (the transport's ConfigGeneration).
    config_generation: u32,
    avail_features: u64,
    acked_features: u64,
    queue_events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    active: Option<Active>,
    metrics: Arc<BlockMetrics>,
    poller: AvailPoller,
}

impl Block {
    /// A drive backed by `file` (opened read-only or read-write to match `read_only`).
    pub fn new(id: String, file: File, read_only: bool, irq: EventFd) -> Result<Self, BlockError> {
        let capacity_sectors = capacity_of(&file, read_only)?;
        let mut avail_features =
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_BLK_F_FLUSH;
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        Ok(Self {
            id,
            file,
            read_only,
            capacity_sectors,
            config: capacity_sectors.to_le_bytes(),
            config_generation: 0,
            avail_features,
            acked_features: 0,
            queue_events: vec![EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            interrupt: Arc::new(Interrupt::new(irq)),
            active: None,
            metrics: Arc::new(BlockMetrics::default()),
            poller: AvailPoller::default(),
        })
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

    /// The drive's counters, for the monitor's metrics.
    pub fn metrics(&self) -> &Arc<BlockMetrics> {
        &self.metrics
    }

    /// Backs the drive with `file` from now on (opened like the first one: read-write unless
    /// the drive is read-only), and tells the guest the new capacity through a
    /// configuration-change interrupt. The drive stays read-only or read-write as it was.
    ///
    /// No request is lost or split between the files: requests are carried out whole while
    /// the device is locked, as this is, so each one the guest made available either finished
    /// on the old file or will run on the new one. Writes already done on the old file are in
    /// the host's page cache and survive it being closed.
    pub fn update_backing(&mut self, file: File) -> Result<(), BlockError> {
        let capacity_sectors = capacity_of(&file, self.read_only)?;
        self.file = file;
        self.capacity_sectors = capacity_sectors;
        self.config = capacity_sectors.to_le_bytes();
        self.config_generation = self.config_generation.wrapping_add(1);
        self.metrics.update_count.inc();
        info!(
            "virtio-blk {}: new backing file, {capacity_sectors} sectors",
            self.id
        );
        // A driver that has not started the device reads the configuration when it does.
        if self.active.is_some() {
            self.interrupt.signal_config_change();
        }
        Ok(())
    }

    /// Serves every request the driver has made available, signals the guest after each batch,
    /// and briefly polls for the next one before it goes back to waiting for a notification.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let disk = Disk {
            file: &self.file,
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
            id: self.id.as_bytes(),
            metrics: &self.metrics,
        };
        let mem = &active.mem;
        let queue = &mut active.queue;
        let mut descriptors = Vec::with_capacity(4);
        loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            let chains = match queue.iter(mem) {
                Ok(chains) => chains,
                Err(err) => {
                    // The available index is further ahead than the ring is long: the driver
                    // is broken or hostile, and nothing in the ring can be trusted.
                    warn!("virtio-blk {}: {err}; the device needs a reset", self.id);
                    self.interrupt.signal_needs_reset();
                    self.active = None;
                    return;
                }
            };
            let mut done = Vec::new();
            for chain in chains {
                let head = chain.head_index();
                descriptors.clear();
                descriptors.extend(chain.take(MAX_CHAIN_LEN));
                let completion = execute(mem, &descriptors, &disk);
                if let Some(addr) = completion.status_addr {
                    if mem.write_obj(completion.status, addr).is_err() {
                        debug!("virtio-blk {}: status byte outside guest memory", self.id);
                    }
                }
                done.push((head, completion.used_len));
            }
            let completed = !done.is_empty();
            for (head, len) in done {
                if let Err(err) = queue.add_used(mem, head, len) {
                    warn!(
                        "virtio-blk {}: cannot complete request {head}: {err}",
                        self.id
                    );
                }
            }
            // Signal before polling: the guest must not wait for the poll window to end.
            if completed && queue.needs_notification(mem).unwrap_or(true) {
                self.interrupt.signal_used_ring();
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
}

/// How long the device watches the available ring after a batch, at most.
const POLL_WINDOW_MAX: Duration = Duration::from_micros(20);
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
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_MAX_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!(
            "virtio-blk {}: ignored write to read-only config at {offset:#x}",
            self.id
        );
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        let got = queues.len();
        let mut queue = queues
            .into_iter()
            .next()
            .filter(|_| got == QUEUE_MAX_SIZES.len())
            .ok_or(ActivateError::QueueCount {
                got,
                want: QUEUE_MAX_SIZES.len(),
            })?;
        queue.set_event_idx(self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        self.active = Some(Active { mem, queue });
        // Requests may have been made available before the driver said DRIVER_OK.
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_events[0].as_raw_fd() {
            // Read first: a notification that lands while the queue is served is not lost.
            let _ = self.queue_events[0].read();
            self.metrics.queue_event_count.inc();
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.queue_events[0], EventSet::IN)) {
            warn!("virtio-blk {}: cannot watch its queue: {err}", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::virtio::INTERRUPT_CONFIG;

    const QUEUE_LEN: u16 = 16;
    const HEADER_ADDR: u64 = 0x1_0000;
    const DATA_ADDR: u64 = 0x2_0000;
    const STATUS_ADDR: u64 = 0x3_0000;
    const DISK_SECTORS: u64 = 64;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    struct Fixture {
        mem: &'static GuestMemoryMmap,
        /// The driver's view of the queue, for the whole test (creating one zeroes the rings).
        mock: MockSplitQueue<'static, GuestMemoryMmap>,
        file: TempFile,
        block: Block,
        next_desc: u16,
    }

    fn pattern(sector: u64) -> Vec<u8> {
        (0..SECTOR_SIZE)
            .map(|i| (sector as u8).wrapping_mul(7) ^ i as u8)
            .collect()
    }

    fn fixture(read_only: bool) -> Fixture {
        // Leaked so that the mock queue can borrow it for the whole test.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        ));
        let file = TempFile::new().unwrap();
        for sector in 0..DISK_SECTORS {
            file.as_file().write_all(&pattern(sector)).unwrap();
        }
        let backing = file.as_file().try_clone().unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut block = Block::new("drive-id".into(), backing, read_only, irq).unwrap();
        block.set_acked_features(VIRTIO_F_VERSION_1);
        let mock = MockSplitQueue::new(mem, QUEUE_LEN);
        block
            .activate(mem.clone(), vec![mock.create_queue::<Queue>().unwrap()])
            .unwrap();
        Fixture {
            mem,
            mock,
            file,
            block,
            next_desc: 0,
        }
    }

    impl Fixture {
        fn header(&self, request_type: u32, sector: u64) {
            self.mem
                .write_obj(request_type, GuestAddress(HEADER_ADDR))
                .unwrap();
            self.mem
                .write_obj(0u32, GuestAddress(HEADER_ADDR + 4))
                .unwrap();
            self.mem
                .write_obj(sector, GuestAddress(HEADER_ADDR + 8))
                .unwrap();
            self.mem
                .write_obj(0xffu8, GuestAddress(STATUS_ADDR))
                .unwrap();
        }

        /// Makes `descs` (addr, len, flags, next relative to the chain's first) available as
        /// one chain, and lets the device serve it.
        fn submit(&mut self, descs: &[(u64, u32, u16, u16)]) {
            let base = self.next_desc;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .map(|&(addr, len, flags, next)| {
                    RawDescriptor::from(SplitDescriptor::new(
                        addr,
                        len,
                        flags,
                        (base + next) % QUEUE_LEN,
                    ))
                })
                .collect();
            self.mock.add_desc_chains(&raw, base).unwrap();
            self.next_desc = (base + descs.len() as u16) % QUEUE_LEN;
            self.block.process_queue();
        }

        fn standard(&mut self, request_type: u32, sector: u64, data_flags: u16, data_len: u32) {
            self.header(request_type, sector);
            self.submit(&[
                (HEADER_ADDR, 16, N, 1),
                (DATA_ADDR, data_len, data_flags | N, 2),
                (STATUS_ADDR, 1, W, 0),
            ]);
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS_ADDR)).unwrap()
        }

        /// (id, len) of the newest used-ring entry, and the used index.
        fn last_used(&self) -> (u32, u32, u16) {
            let idx = self.mock.used().idx().load();
            let elem = self
                .mock
                .used()
                .ring()
                .ref_at(usize::from(idx.wrapping_sub(1) % QUEUE_LEN))
                .unwrap()
                .load();
            (elem.id(), elem.len(), idx)
        }

        fn file_sector(&self, sector: u64) -> Vec<u8> {
            let mut buf = vec![0u8; SECTOR_SIZE as usize];
            self.file
                .as_file()
                .read_exact_at(&mut buf, sector * SECTOR_SIZE)
                .unwrap();
            buf
        }

        fn guest_data(&self, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem
                .read_slice(&mut buf, GuestAddress(DATA_ADDR))
                .unwrap();
            buf
        }

        /// A good read still works: the device was not wedged by what came before.
        fn assert_still_serves(&mut self) {
            self.mem
                .write_slice(&[0u8; 512], GuestAddress(DATA_ADDR))
                .unwrap();
            self.standard(VIRTIO_BLK_T_IN, 5, W, 512);
            assert_eq!(self.status(), VIRTIO_BLK_S_OK as u8);
            assert_eq!(self.guest_data(512), pattern(5));
        }
    }

    #[test]
    fn read_copies_file_sectors_into_the_guest() {
        let mut f = fixture(false);
        f.standard(VIRTIO_BLK_T_IN, 3, W, 1024);
        assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(f.guest_data(1024), [pattern(3), pattern(4)].concat());
        assert_eq!(f.last_used(), (0, 1025, 1));
    }

    #[test]
    fn write_lands_in_the_host_file() {
        let mut f = fixture(false);
        f.mem
            .write_slice(&[0xab; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        f.standard(VIRTIO_BLK_T_OUT, 7, 0, 512);
        assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(f.file_sector(7), vec![0xab; 512]);
        assert_eq!(f.file_sector(8), pattern(8));
        assert_eq!(f.last_used().1, 1);
    }

    #[test]
    fn read_only_drive_rejects_write_and_leaves_the_file_unchanged() {
        let mut f = fixture(true);
        assert_ne!(f.block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        f.mem
            .write_slice(&[0xab; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        f.standard(VIRTIO_BLK_T_OUT, 7, 0, 512);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(f.file_sector(7), pattern(7));
        f.assert_still_serves();
    }

    #[test]
    fn flush_and_get_id() {
        let mut f = fixture(false);
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        f.submit(&[(HEADER_ADDR, 16, N, 1), (STATUS_ADDR, 1, W, 0)]);
        assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
        f.standard(VIRTIO_BLK_T_GET_ID, 0, W, 20);
        assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(&f.guest_data(20)[..10], b"drive-id\0\0");
    }

    #[test]
    fn sectors_beyond_the_disk_fail() {
        let mut f = fixture(false);
        f.standard(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, W, 1024);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
        f.standard(VIRTIO_BLK_T_IN, u64::MAX, W, 512);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
        f.assert_still_serves();
    }

    #[test]
    fn buffers_outside_guest_memory_fail() {
        let mut f = fixture(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        f.submit(&[
            (HEADER_ADDR, 16, N, 1),
            (0xdead_0000_0000, 512, W | N, 2),
            (STATUS_ADDR, 1, W, 0),
        ]);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
        // A buffer that starts inside memory and runs past its end.
        f.header(VIRTIO_BLK_T_OUT, 0);
        f.submit(&[
            (HEADER_ADDR, 16, N, 1),
            (0xf_fe00, 1024, N, 2),
            (STATUS_ADDR, 1, W, 0),
        ]);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(f.file_sector(0), pattern(0));
        // A header outside memory.
        f.submit(&[(0xdead_0000_0000, 16, N, 1), (STATUS_ADDR, 1, W, 0)]);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
        f.assert_still_serves();
    }

    #[test]
    fn huge_and_zero_lengths_fail() {
        let mut f = fixture(false);
        f.standard(VIRTIO_BLK_T_IN, 0, W, 0xffff_fe00);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
        f.standard(VIRTIO_BLK_T_IN, 0, W, 100);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8, "partial sector");
        // A zero-length status buffer: nowhere to report, nothing written.
        f.header(VIRTIO_BLK_T_IN, 0);
        f.submit(&[
            (HEADER_ADDR, 16, N, 1),
            (DATA_ADDR, 512, W | N, 2),
            (STATUS_ADDR, 0, W, 0),
        ]);
        assert_eq!(f.status(), 0xff);
        assert_eq!(f.last_used().1, 0);
        f.assert_still_serves();
    }

    #[test]
    fn wrong_direction_buffers_fail_without_touching_memory() {
        let mut f = fixture(false);
        f.mem
            .write_slice(&[0x11; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        // A read into a buffer the device may not write.
        f.standard(VIRTIO_BLK_T_IN, 1, 0, 512);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(f.guest_data(512), vec![0x11; 512]);
        // A writable header.
        f.header(VIRTIO_BLK_T_IN, 1);
        f.submit(&[
            (HEADER_ADDR, 16, W | N, 1),
            (DATA_ADDR, 512, W | N, 2),
            (STATUS_ADDR, 1, W, 0),
        ]);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
        f.assert_still_serves();
    }

    #[test]
    fn status_byte_that_is_not_writable_gets_nothing() {
        let mut f = fixture(false);
        f.header(VIRTIO_BLK_T_IN, 1);
        f.submit(&[
            (HEADER_ADDR, 16, N, 1),
            (DATA_ADDR, 512, W | N, 2),
            (STATUS_ADDR, 1, 0, 0),
        ]);
        assert_eq!(f.status(), 0xff);
        assert_eq!(f.last_used().1, 0);
        f.assert_still_serves();
    }

    #[test]
    fn looping_chain_ends_and_the_device_goes_on() {
        let mut f = fixture(false);
        f.header(VIRTIO_BLK_T_IN, 1);
        // Two descriptors that point at each other forever.
        f.submit(&[(HEADER_ADDR, 16, N, 1), (DATA_ADDR, 512, W | N, 0)]);
        let (_, len, idx) = f.last_used();
        assert_eq!((len, idx), (0, 1), "completed with nothing written");
        f.assert_still_serves();
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let mut f = fixture(false);
        f.standard(0x1234, 0, W, 512);
        assert_eq!(f.status(), VIRTIO_BLK_S_UNSUPP as u8);
        f.assert_still_serves();
    }

    /// A new backing file of `sectors` sectors, each filled with `byte`.
    fn new_backing(sectors: u64, byte: u8, writable: bool) -> (TempFile, File) {
        let file = TempFile::new().unwrap();
        file.as_file()
            .write_all(&vec![byte; (sectors * SECTOR_SIZE) as usize])
            .unwrap();
        let backing = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(file.as_path())
            .unwrap();
        (file, backing)
    }

    #[test]
    fn new_backing_changes_capacity_and_generation_and_interrupts_the_guest() {
        let mut f = fixture(false);
        let generation = f.block.config_generation();
        let _ = f.block.interrupt().irq_evt().read();
        let (_new, backing) = new_backing(2 * DISK_SECTORS, 0x5a, true);
        f.block.update_backing(backing).unwrap();

        assert_eq!(f.block.capacity_sectors(), 2 * DISK_SECTORS);
        let mut capacity = [0u8; 8];
        f.block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 2 * DISK_SECTORS);
        assert_eq!(f.block.config_generation(), generation.wrapping_add(1));
        assert_ne!(f.block.interrupt().status() & INTERRUPT_CONFIG, 0);
        assert_eq!(f.block.interrupt().irq_evt().read().unwrap(), 1);

        // Requests now reach the new file, including sectors the old one did not have.
        f.standard(VIRTIO_BLK_T_IN, DISK_SECTORS + 1, W, 512);
        assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(f.guest_data(512), vec![0x5a; 512]);
    }

    #[test]
    fn a_smaller_backing_file_shrinks_the_disk() {
        let mut f = fixture(false);
        let (_new, backing) = new_backing(4, 0, true);
        f.block.update_backing(backing).unwrap();
        assert_eq!(f.block.capacity_sectors(), 4);
        f.standard(VIRTIO_BLK_T_IN, 4, W, 512);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn a_read_only_drive_stays_read_only_on_a_new_file() {
        let mut f = fixture(true);
        let (new, backing) = new_backing(DISK_SECTORS, 0x11, true);
        f.block.update_backing(backing).unwrap();
        assert!(f.block.read_only());
        assert_ne!(f.block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        f.mem
            .write_slice(&[0xab; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        f.standard(VIRTIO_BLK_T_OUT, 7, 0, 512);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
        let mut sector = vec![0u8; 512];
        new.as_file()
            .read_exact_at(&mut sector, 7 * SECTOR_SIZE)
            .unwrap();
        assert_eq!(sector, vec![0x11; 512]);
        // A read-only file is fine for a read-only drive.
        let (_other, backing) = new_backing(DISK_SECTORS, 0, false);
        f.block.update_backing(backing).unwrap();
    }

    #[test]
    fn a_read_write_drive_refuses_a_file_opened_read_only() {
        let mut f = fixture(false);
        let (_new, backing) = new_backing(2 * DISK_SECTORS, 0, false);
        let generation = f.block.config_generation();
        assert!(matches!(
            f.block.update_backing(backing),
            Err(BlockError::NotWritable)
        ));
        // Nothing changed: still the old file, size and generation.
        assert_eq!(f.block.capacity_sectors(), DISK_SECTORS);
        assert_eq!(f.block.config_generation(), generation);
        f.assert_still_serves();
    }

    #[test]
    fn a_device_not_started_changes_backing_without_an_interrupt() {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(4096).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut block =
            Block::new("d".into(), file.as_file().try_clone().unwrap(), false, irq).unwrap();
        let (_new, backing) = new_backing(16, 0, true);
        block.update_backing(backing).unwrap();
        assert_eq!(block.capacity_sectors(), 16);
        assert_eq!(block.config_generation(), 1);
        assert_eq!(block.interrupt().status(), 0);
        assert!(block.interrupt().irq_evt().read().is_err());
    }

    #[test]
    fn an_impossible_available_index_makes_the_device_need_a_reset() {
        let mut f = fixture(false);
        f.mock.avail().idx().store(QUEUE_LEN * 4);
        f.block.process_queue();
        assert!(f.block.interrupt().needs_reset());
        assert!(f.block.active.is_none());
    }
}
