//! virtio-blk against virtio-queue's mock queues: good requests reach the file, and every
//! malformed chain a hostile driver can build fails alone, leaving the device serving.

use std::io::Write;
use std::os::unix::fs::FileExt;

use crate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::virtio::{
    INTERRUPT_CONFIG, INTERRUPT_USED_RING, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

const QUEUE_LEN: u16 = 16;
const HEADER_ADDR: u64 = 0x1_0000;
const DATA_ADDR: u64 = 0x2_0000;
const STATUS_ADDR: u64 = 0x3_0000;
/// The used ring, away from the mock's: the mock lays its used ring over the end of its
/// available ring (`used_event` included).
const USED_RING_ADDR: u64 = 0x8000;
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
    fixture_with(read_only, VIRTIO_F_VERSION_1)
}

/// A drive whose driver accepted `features`.
fn fixture_with(read_only: bool, features: u64) -> Fixture {
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
    let mut block = Block::new(
        "drive-id".into(),
        backing,
        read_only,
        &Default::default(),
        irq,
    )
    .unwrap();
    block.set_acked_features(features);
    let mock = MockSplitQueue::new(mem, QUEUE_LEN);
    let mut queue = mock.create_queue::<Queue>().unwrap();
    queue.set_used_ring_address(Some(USED_RING_ADDR as u32), Some(0));
    block.activate(mem.clone(), vec![queue]).unwrap();
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
        // Served chains free their slots: start again at the table's top rather than run off
        // its end.
        if usize::from(self.next_desc) + descs.len() > usize::from(QUEUE_LEN) {
            self.next_desc = 0;
        }
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
        // The Async engine's requests complete here, as the event loop would complete them.
        self.block.finish_in_flight();
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
        let used = GuestAddress(USED_RING_ADDR);
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let elem = used.unchecked_add(4 + 8 * u64::from(idx.wrapping_sub(1) % QUEUE_LEN));
        let id = self.mem.read_obj(elem).unwrap();
        let len = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
        (id, len, idx)
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

/// A writable drive served by the Async engine (io_uring).
fn fixture_async() -> Fixture {
    let mut f = fixture(false);
    f.block.use_async_engine().unwrap();
    assert!(f.block.is_async());
    f
}

#[test]
fn the_async_engine_reads_writes_flushes_and_fails_what_sync_fails() {
    let mut f = fixture_async();
    f.standard(VIRTIO_BLK_T_IN, 3, W, 1024);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(f.guest_data(1024), [pattern(3), pattern(4)].concat());
    assert_eq!(f.last_used(), (0, 1025, 1));
    f.mem
        .write_slice(&[0xcd; 512], GuestAddress(DATA_ADDR))
        .unwrap();
    f.standard(VIRTIO_BLK_T_OUT, 9, 0, 512);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(f.file_sector(9), vec![0xcd; 512]);
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    f.submit(&[(HEADER_ADDR, 16, N, 1), (STATUS_ADDR, 1, W, 0)]);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
    // Beyond the disk, and a buffer outside guest memory: failed before the kernel sees them.
    f.standard(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, W, 1024);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
    f.header(VIRTIO_BLK_T_IN, 0);
    f.submit(&[
        (HEADER_ADDR, 16, N, 1),
        (0x10_0000 - 256, 512, W | N, 2),
        (STATUS_ADDR, 1, W, 0),
    ]);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
    f.assert_still_serves();
    let metrics = f.block.metrics();
    assert_eq!(metrics.write_count.total(), 1);
    assert_eq!(metrics.flush_count.total(), 1);
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
    let mut block = Block::new(
        "d".into(),
        file.as_file().try_clone().unwrap(),
        false,
        &Default::default(),
        irq,
    )
    .unwrap();
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
    assert!(f.block.common.active().is_none());
}

impl Fixture {
    /// Whether the device raised its used-ring interrupt since the last call.
    fn interrupted(&self) -> bool {
        let raised = self.block.interrupt().irq_evt().read().is_ok();
        assert_eq!(
            raised,
            self.block.interrupt().status() & INTERRUPT_USED_RING != 0,
            "the status bit goes with the irqfd"
        );
        self.block.interrupt().acknowledge(INTERRUPT_USED_RING);
        raised
    }

    fn read_sector(&mut self) {
        self.standard(VIRTIO_BLK_T_IN, 1, W, SECTOR_SIZE as u32);
        assert_eq!(self.status(), VIRTIO_BLK_S_OK as u8);
    }
}

#[test]
fn with_event_idx_a_completion_interrupts_only_once_used_event_is_passed() {
    let mut f = fixture_with(false, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    assert!(f.block.avail_features() & VIRTIO_RING_F_EVENT_IDX != 0);
    // The driver wants to hear when the used index passes 1: after the second request.
    let used_event = f
        .mock
        .avail_addr()
        .unchecked_add(4 + 2 * u64::from(QUEUE_LEN));
    f.mem.write_obj(1u16, used_event).unwrap();
    // Also set: the flag is for drivers without EVENT_IDX, a device with it must ignore it.
    f.mem.write_obj(1u16, f.mock.avail_addr()).unwrap();
    f.read_sector();
    assert!(!f.interrupted(), "used index 1 has not passed used_event 1");
    f.read_sector();
    assert!(f.interrupted(), "used index 2 passed used_event 1");
    f.read_sector();
    assert!(
        !f.interrupted(),
        "nothing new for the driver until it moves used_event"
    );
    // As Linux's driver does when it re-enables interrupts: tell me of the next one.
    f.mem.write_obj(3u16, used_event).unwrap();
    f.read_sector();
    assert!(f.interrupted(), "used index 4 passed used_event 3");
}

#[test]
fn without_event_idx_no_interrupt_silences_completions() {
    let mut f = fixture(false);
    f.mem.write_obj(1u16, f.mock.avail_addr()).unwrap();
    f.read_sector();
    assert!(!f.interrupted(), "VRING_AVAIL_F_NO_INTERRUPT is set");
    // used_event means nothing without EVENT_IDX.
    let used_event = f
        .mock
        .avail_addr()
        .unchecked_add(4 + 2 * u64::from(QUEUE_LEN));
    f.mem.write_obj(100u16, used_event).unwrap();
    f.mem.write_obj(0u16, f.mock.avail_addr()).unwrap();
    f.read_sector();
    assert!(f.interrupted(), "interrupts are back on");
}

const SEGMENT_ADDR: u64 = 0x4_0000;

impl Fixture {
    /// A DISCARD or WRITE_ZEROES request for one segment.
    fn segment_request(&mut self, request_type: u32, sector: u64, sectors: u32, flags: u32) {
        self.header(request_type, 0);
        let mut segment = [0u8; 16];
        segment[0..8].copy_from_slice(&sector.to_le_bytes());
        segment[8..12].copy_from_slice(&sectors.to_le_bytes());
        segment[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem
            .write_slice(&segment, GuestAddress(SEGMENT_ADDR))
            .unwrap();
        self.submit(&[
            (HEADER_ADDR, 16, N, 1),
            (SEGMENT_ADDR, 16, N, 2),
            (STATUS_ADDR, 1, W, 0),
        ]);
    }
}

fn allocated_bytes(file: &std::fs::File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().unwrap().blocks() * 512
}

#[test]
fn discard_and_write_zeroes_are_offered_to_writable_drives_only() {
    let f = fixture(false);
    let discard = 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    assert_eq!(f.block.avail_features() & discard, discard);
    let mut limits = [0u8; 4];
    f.block.read_config(36, &mut limits);
    assert_eq!(u32::from_le_bytes(limits), discard::MAX_SECTORS);
    let f = fixture(true);
    assert_eq!(f.block.avail_features() & discard, 0);
}

#[test]
fn write_zeroes_zeroes_the_range_in_the_file() {
    for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
        let mut f = fixture(false);
        f.segment_request(VIRTIO_BLK_T_WRITE_ZEROES, 8, 16, flags);
        assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8, "flags {flags}");
        for sector in 8..24 {
            assert_eq!(f.file_sector(sector), vec![0u8; 512], "sector {sector}");
        }
        assert_eq!(f.file_sector(7), pattern(7), "before the range");
        assert_eq!(f.file_sector(24), pattern(24), "after the range");
        assert_eq!(f.block.metrics().write_zeroes_count.total(), 1);
    }
}

#[test]
fn discard_punches_a_hole_that_reads_back_as_zeros() {
    let mut f = fixture(false);
    let before = allocated_bytes(f.file.as_file());
    f.segment_request(VIRTIO_BLK_T_DISCARD, 32, 32, 0);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(f.file_sector(32), vec![0u8; 512]);
    assert_eq!(f.file_sector(63), vec![0u8; 512]);
    assert_eq!(f.file_sector(31), pattern(31));
    let after = allocated_bytes(f.file.as_file());
    assert!(after < before, "no space came back: {before} -> {after}");
    assert_eq!(
        f.file.as_file().metadata().unwrap().len(),
        DISK_SECTORS * 512
    );
    f.assert_still_serves();
}

#[test]
fn bad_discard_and_write_zeroes_requests_fail_alone() {
    let mut f = fixture(false);
    // Beyond the disk, discard with flags, unknown flags.
    f.segment_request(VIRTIO_BLK_T_DISCARD, DISK_SECTORS - 1, 2, 0);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
    f.segment_request(
        VIRTIO_BLK_T_DISCARD,
        0,
        1,
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    );
    assert_eq!(f.status(), VIRTIO_BLK_S_UNSUPP as u8);
    f.segment_request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 0x80);
    assert_eq!(f.status(), VIRTIO_BLK_S_UNSUPP as u8);
    f.segment_request(VIRTIO_BLK_T_WRITE_ZEROES, u64::MAX, 8, 0);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
    // A short segment, a device-writable one, one outside guest memory.
    f.header(VIRTIO_BLK_T_DISCARD, 0);
    f.submit(&[
        (HEADER_ADDR, 16, N, 1),
        (SEGMENT_ADDR, 8, N, 2),
        (STATUS_ADDR, 1, W, 0),
    ]);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
    f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    f.submit(&[
        (HEADER_ADDR, 16, N, 1),
        (SEGMENT_ADDR, 16, W | N, 2),
        (STATUS_ADDR, 1, W, 0),
    ]);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
    f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    f.submit(&[
        (HEADER_ADDR, 16, N, 1),
        (0xfff_0000, 16, N, 2),
        (STATUS_ADDR, 1, W, 0),
    ]);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
    for sector in 0..DISK_SECTORS {
        assert_eq!(
            f.file_sector(sector),
            pattern(sector),
            "sector {sector} changed"
        );
    }
    assert!(f.block.metrics().invalid_reqs_count.total() >= 7);
    f.assert_still_serves();
}

#[test]
fn a_read_only_drive_refuses_write_zeroes() {
    let mut f = fixture(true);
    f.segment_request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(f.file_sector(0), pattern(0));
}
