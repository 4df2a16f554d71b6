use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::*;
use crate::virtio::{INTERRUPT_CONFIG, VIRTIO_F_VERSION_1};

const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const QUEUE_LEN: u16 = 16;
/// Each queue's rings, 64 KiB apart.
const RINGS: u64 = 0x1_0000;
/// Where the requests' own buffers (frame numbers, statistics) go.
const BUFFERS: u64 = 0x10_0000;
/// The pages the tests inflate: from 1 MiB up.
const DATA: u64 = 0x20_0000;
const MEM_SIZE: usize = 0x40_0000;
const STATS: usize = 2;
const HINTING: usize = 3;
const REPORTING: usize = 4;

struct Fixture {
    mem: &'static GuestMemoryMmap,
    queues: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    balloon: Balloon,
    next_desc: Vec<u16>,
}

fn options() -> BalloonOptions {
    BalloonOptions {
        target_pages: 256,
        deflate_on_oom: true,
        stats_polling_interval_s: 1,
        free_page_hinting: true,
        free_page_reporting: true,
    }
}

fn fixture_with(options: BalloonOptions) -> Fixture {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
    ));
    let mut balloon = Balloon::new(options, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    let count = balloon.queue_max_sizes().len();
    let queues: Vec<_> = (0..count)
        .map(|i| MockSplitQueue::create(mem, GuestAddress(RINGS * (i as u64 + 1)), QUEUE_LEN))
        .collect();
    balloon.set_acked_features(balloon.avail_features());
    let ready = queues
        .iter()
        .map(|q| q.create_queue::<Queue>().unwrap())
        .collect();
    balloon.activate(mem.clone(), ready).unwrap();
    Fixture {
        mem,
        queues,
        balloon,
        next_desc: vec![0; count],
    }
}

fn fixture() -> Fixture {
    fixture_with(options())
}

impl Fixture {
    /// Makes a chain of buffers (address, length, flags) available in queue `q`.
    fn post(&mut self, q: usize, buffers: &[(u64, u32, u16)]) {
        let last = buffers.len() - 1;
        let first = self.next_desc[q];
        let descs: Vec<RawDescriptor> = buffers
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let (flags, next) = if i < last {
                    (flags | NEXT, first + i as u16 + 1)
                } else {
                    (flags, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.queues[q].add_desc_chains(&descs, first).unwrap();
        self.next_desc[q] += descs.len() as u16;
    }

    /// Writes frame numbers at `at` and inflates them in one descriptor.
    fn inflate(&mut self, at: u64, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        self.post(INFLATE, &[(at, bytes.len() as u32, 0)]);
        self.balloon.process_inflate();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.queues[q].used().idx().load()
    }

    fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }
}

fn pfn(addr: u64) -> u32 {
    (addr >> PAGE_SHIFT) as u32
}

#[test]
fn the_device_offers_what_its_configuration_asks_for() {
    let f = fixture();
    let features = f.balloon.avail_features();
    assert_eq!(f.balloon.device_type(), TYPE_BALLOON);
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    assert_ne!(features & VIRTIO_BALLOON_F_DEFLATE_ON_OOM, 0);
    assert_ne!(features & VIRTIO_BALLOON_F_STATS_VQ, 0);
    assert_ne!(features & VIRTIO_BALLOON_F_REPORTING, 0);
    assert_ne!(features & VIRTIO_BALLOON_F_FREE_PAGE_HINT, 0);
    assert_eq!(f.balloon.queue_max_sizes().len(), 5);
    let plain = Balloon::new(
        BalloonOptions {
            target_pages: 0,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_hinting: false,
            free_page_reporting: false,
        },
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    assert_eq!(plain.queue_max_sizes().len(), 2);
    assert_eq!(plain.avail_features() & 0xff, 0);
    assert_eq!(plain.stats(), None);
    assert_eq!(plain.hinting_status(), Err(BalloonError::HintingDisabled));
}

#[test]
fn inflated_pages_are_given_back_and_read_as_zeros() {
    let mut f = fixture();
    f.fill(DATA, 4 * 4096, 0xaa);
    // Pages 0, 1 and 3 of DATA, out of order and one twice.
    f.inflate(
        BUFFERS,
        &[pfn(DATA + 0x3000), pfn(DATA), pfn(DATA + 0x1000), pfn(DATA)],
    );
    assert_eq!(f.used_idx(INFLATE), 1);
    assert_eq!(f.read(DATA, 8192), vec![0; 8192]);
    assert_eq!(f.read(DATA + 0x2000, 4096), vec![0xaa; 4096]);
    assert_eq!(f.read(DATA + 0x3000, 4096), vec![0; 4096]);
    assert_eq!(f.balloon.metrics.inflate_freed.total(), 3 * 4096);
    assert_eq!(f.balloon.metrics.inflate_invalid_pfns.total(), 0);
    assert!(f.balloon.interrupt().state().0 & crate::virtio::INTERRUPT_USED_RING != 0);
}

#[test]
fn a_hostile_inflate_changes_nothing_it_should_not() {
    let mut f = fixture();
    f.fill(DATA, 4096, 0x55);
    let beyond = pfn(MEM_SIZE as u64);
    // Frame numbers past the end of memory, the largest there is, and a range straddling
    // the end: only the page inside memory goes.
    f.inflate(
        BUFFERS,
        &[beyond, u32::MAX, beyond + 7, pfn(MEM_SIZE as u64 - 4096)],
    );
    assert_eq!(f.used_idx(INFLATE), 1);
    assert_eq!(f.balloon.metrics.inflate_invalid_pfns.total(), 3);
    assert_eq!(f.balloon.metrics.inflate_freed.total(), 4096);
    assert_eq!(f.read(DATA, 4096), vec![0x55; 4096]);

    // A descriptor longer than the cap, one of an odd length, a device-writable one and one
    // outside memory are skipped whole, and still returned.
    let too_long = (MAX_PFNS_PER_DESCRIPTOR as u32 + 1) * 4;
    f.post(INFLATE, &[(BUFFERS, too_long, 0)]);
    f.post(INFLATE, &[(BUFFERS, 6, 0)]);
    f.post(INFLATE, &[(BUFFERS, 4, W)]);
    f.post(INFLATE, &[(MEM_SIZE as u64 - 2, 4, 0)]);
    f.balloon.process_inflate();
    assert_eq!(f.used_idx(INFLATE), 5);
    assert_eq!(f.balloon.metrics.event_fails.total(), 4);
    assert_eq!(f.read(DATA, 4096), vec![0x55; 4096]);
    assert!(f.balloon.pfns.capacity() <= 2 * PFN_CHUNK);

    // The device goes on serving good requests.
    f.inflate(BUFFERS, &[pfn(DATA)]);
    assert_eq!(f.read(DATA, 4096), vec![0; 4096]);
    assert!(!f.balloon.interrupt().state().1);
}

#[test]
fn a_large_inflate_is_read_in_chunks() {
    let mut f = fixture();
    // 512 pages (2 MiB) of DATA, each listed twice: more frame numbers than one chunk holds.
    f.fill(DATA, 2 << 20, 0x11);
    let pfns: Vec<u32> = (0..2)
        .flat_map(|_| (0..512).map(|i| pfn(DATA) + i))
        .collect();
    assert!(pfns.len() == PFN_CHUNK);
    let more: Vec<u32> = pfns.iter().chain(&pfns).copied().collect();
    f.inflate(BUFFERS, &more);
    assert_eq!(f.read(DATA, 2 << 20), vec![0; 2 << 20]);
    // Each chunk gave back the 2 MiB (duplicates within a chunk are dropped).
    assert_eq!(f.balloon.metrics.inflate_freed.total(), 2 * (2 << 20));
}

#[test]
fn the_host_sets_the_target_and_the_driver_writes_actual() {
    let mut f = fixture();
    let mut word = [0u8; 4];
    f.balloon.read_config(0, &mut word);
    assert_eq!(u32::from_le_bytes(word), 256);
    let generation = f.balloon.config_generation();
    f.balloon.set_target_pages(1024).unwrap();
    f.balloon.read_config(0, &mut word);
    assert_eq!(u32::from_le_bytes(word), 1024);
    assert_ne!(f.balloon.config_generation(), generation);
    assert!(f.balloon.interrupt().state().0 & INTERRUPT_CONFIG != 0);
    // The driver may write actual, not num_pages.
    f.balloon.write_config(4, &100u32.to_le_bytes());
    f.balloon.write_config(0, &7u32.to_le_bytes());
    assert_eq!(f.balloon.actual_pages(), 100);
    assert_eq!(f.balloon.target_pages(), 1024);
    f.balloon.read_config(4, &mut word);
    assert_eq!(u32::from_le_bytes(word), 100);

    // Before the driver starts the device, a new target is refused in Firecracker's words.
    f.balloon.reset();
    assert_eq!(f.balloon.set_target_pages(1), Err(BalloonError::NotActive));
}

/// A statistics buffer of (tag, value) pairs at BUFFERS.
fn stats_buffer(f: &Fixture, stats: &[(u16, u64)]) -> u32 {
    let bytes: Vec<u8> = stats
        .iter()
        .flat_map(|(tag, value)| {
            tag.to_le_bytes()
                .into_iter()
                .chain(value.to_le_bytes())
                .collect::<Vec<_>>()
        })
        .collect();
    f.mem.write_slice(&bytes, GuestAddress(BUFFERS)).unwrap();
    bytes.len() as u32
}

#[test]
fn statistics_are_read_when_posted_and_the_buffer_returned_at_each_poll() {
    let mut f = fixture();
    let len = stats_buffer(&f, &[(4, 1000), (5, 8000), (99, 1)]);
    f.post(STATS, &[(BUFFERS, len, 0)]);
    f.balloon.process_stats();
    // Held until the poll.
    assert_eq!(f.used_idx(STATS), 0);
    let stats = f.balloon.stats().unwrap();
    assert_eq!(stats.free_memory, Some(1000));
    assert_eq!(stats.total_memory, Some(8000));
    assert_eq!(stats.swap_in, None);
    assert_eq!(stats.target_pages, 256);
    assert_eq!(stats.target_mib, 1);
    let json = serde_json::to_value(&stats).unwrap();
    assert_eq!(json["free_memory"], 1000);
    assert!(json.get("swap_in").is_none());
    f.balloon.poll_stats();
    assert_eq!(f.used_idx(STATS), 1);
    // Nothing held: a second poll returns nothing.
    f.balloon.poll_stats();
    assert_eq!(f.used_idx(STATS), 1);
    assert_eq!(f.balloon.metrics.stats_updates_count.total(), 1);

    // The interval changes, but statistics are not turned on or off.
    assert_eq!(
        f.balloon.set_stats_polling_interval(0),
        Err(BalloonError::StatsStateChange)
    );
    f.balloon.set_stats_polling_interval(5).unwrap();
    assert_eq!(f.balloon.stats_polling_interval_s(), 5);
}

#[test]
fn free_page_reports_are_given_back() {
    let mut f = fixture();
    f.fill(DATA, 3 * 4096, 0x77);
    let reporting = REPORTING;
    // Linux posts the free ranges device-writable; an unaligned edge is left alone.
    f.post(reporting, &[(DATA, 8192, W), (DATA + 0x2000 + 16, 4096, W)]);
    f.balloon.process_reporting();
    assert_eq!(f.used_idx(reporting), 1);
    assert_eq!(f.read(DATA, 8192), vec![0; 8192]);
    assert_eq!(f.read(DATA + 0x2000, 4096), vec![0x77; 4096]);
    assert_eq!(f.balloon.metrics.free_page_report_count.total(), 1);
    assert_eq!(f.balloon.metrics.free_page_report_freed.total(), 8192);
    // A report outside memory is counted as failed and changes nothing.
    f.post(reporting, &[(MEM_SIZE as u64, 1 << 20, W)]);
    f.balloon.process_reporting();
    assert_eq!(f.used_idx(reporting), 2);
    assert_eq!(f.balloon.metrics.free_page_report_fails.total(), 1);
}

#[test]
fn a_restored_balloon_keeps_its_target_interval_and_statistics_buffer() {
    let mut f = fixture();
    f.balloon.set_target_pages(512).unwrap();
    f.balloon.write_config(4, &300u32.to_le_bytes());
    f.balloon.set_stats_polling_interval(3).unwrap();
    let len = stats_buffer(&f, &[(4, 1234)]);
    f.post(STATS, &[(BUFFERS, len, 0)]);
    f.balloon.process_stats();
    let state = f.balloon.save_state().unwrap();

    let mut again = Balloon::new(options(), EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    again.restore_state(f.mem.clone(), &state).unwrap();
    assert_eq!(again.target_pages(), 512);
    assert_eq!(again.actual_pages(), 300);
    assert_eq!(again.stats_polling_interval_s(), 3);
    assert_eq!(again.config_generation(), f.balloon.config_generation());
    assert_eq!(again.stats().unwrap().free_memory, Some(1234));
    // The held buffer goes back at the next poll.
    again.poll_stats();
    assert_eq!(f.used_idx(STATS), 1);

    // A configuration without statistics does not take a state with them.
    let mut plain = Balloon::new(
        BalloonOptions {
            stats_polling_interval_s: 0,
            ..options()
        },
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    assert!(plain.restore_state(f.mem.clone(), &state).is_err());
}

impl Fixture {
    /// The driver sends hinting command `id` (a 4-byte readable buffer at BUFFERS + 0x100).
    fn hint_command(&mut self, id: u32) {
        let at = BUFFERS + 0x100 + u64::from(self.next_desc[HINTING]) * 8;
        self.mem
            .write_slice(&id.to_le_bytes(), GuestAddress(at))
            .unwrap();
        self.post(HINTING, &[(at, 4, 0)]);
        self.balloon.process_hinting();
    }

    fn hint_block(&mut self, addr: u64, len: u32) {
        self.post(HINTING, &[(addr, len, W)]);
        self.balloon.process_hinting();
    }

    fn config_cmd(&self) -> u32 {
        let mut word = [0u8; 4];
        self.balloon.read_config(8, &mut word);
        u32::from_le_bytes(word)
    }
}

#[test]
fn a_hinting_run_gives_back_the_blocks_of_its_run_only() {
    let mut f = fixture();
    f.fill(DATA, 4 * 4096, 0x33);
    // Blocks before any run are returned untouched.
    f.hint_block(DATA, 4096);
    assert_eq!(f.read(DATA, 4096), vec![0x33; 4096]);
    assert_eq!(f.config_cmd(), hinting::CMD_ID_STOP);

    f.balloon.start_hinting(true).unwrap();
    let id = f.config_cmd();
    assert!(id > hinting::CMD_ID_DONE);
    assert!(f.balloon.interrupt().state().0 & INTERRUPT_CONFIG != 0);
    f.hint_command(id);
    assert_eq!(
        f.balloon.hinting_status().unwrap(),
        HintingStatus {
            host_cmd: id,
            guest_cmd: Some(id)
        }
    );
    f.hint_block(DATA, 2 * 4096);
    assert_eq!(f.read(DATA, 2 * 4096), vec![0; 2 * 4096]);
    assert_eq!(f.balloon.metrics.free_page_hint_freed.total(), 2 * 4096);
    // A block outside memory counts as failed and changes nothing.
    f.hint_block(MEM_SIZE as u64, 4096);
    assert_eq!(f.balloon.metrics.free_page_hint_fails.total(), 1);

    // The driver's STOP is acknowledged with DONE at once; later blocks stay.
    f.hint_command(hinting::CMD_ID_STOP);
    assert_eq!(f.config_cmd(), hinting::CMD_ID_DONE);
    f.hint_block(DATA + 0x3000, 4096);
    assert_eq!(f.read(DATA + 0x3000, 4096), vec![0x33; 4096]);
    assert_eq!(f.used_idx(HINTING), 6);

    // A command that is not one u32 is refused and returned.
    f.post(HINTING, &[(BUFFERS, 6, 0)]);
    f.balloon.process_hinting();
    assert_eq!(f.used_idx(HINTING), 7);
    assert_eq!(f.balloon.metrics.free_page_hint_fails.total(), 2);
}

#[test]
fn the_host_ends_a_run_without_acknowledge_and_a_restore_keeps_it() {
    let mut f = fixture();
    f.balloon.start_hinting(false).unwrap();
    let id = f.config_cmd();
    f.hint_command(id);
    f.hint_command(hinting::CMD_ID_STOP);
    assert_eq!(f.config_cmd(), id, "no acknowledge: the run stands");
    let state = f.balloon.save_state().unwrap();
    let mut again = Balloon::new(options(), EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    again.restore_state(f.mem.clone(), &state).unwrap();
    assert_eq!(
        again.hinting_status().unwrap(),
        HintingStatus {
            host_cmd: id,
            guest_cmd: Some(hinting::CMD_ID_STOP)
        }
    );
    again.stop_hinting().unwrap();
    assert_eq!(
        again.hinting_status().unwrap().host_cmd,
        hinting::CMD_ID_DONE
    );
    // The next run's id is new to the driver.
    again.start_hinting(true).unwrap();
    assert_eq!(again.hinting_status().unwrap().host_cmd, id + 1);

    // Before the driver starts the device, a run is refused in Firecracker's words.
    again.reset();
    assert_eq!(again.start_hinting(true), Err(BalloonError::NotActive));
}
