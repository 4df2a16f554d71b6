//! virtio-balloon (virtio 1.2, 5.5), Firecracker's balloon device: the host sets a target
//! (`num_pages` in the configuration space) and the guest's driver inflates toward it, handing
//! over the frame numbers of pages it will not touch; the device gives those pages back to the
//! host (`madvise(MADV_DONTNEED)`), so the monitor's resident set drops. Deflated pages simply
//! come back, zero (or as the snapshot file had them), when the guest touches them again.
//! Optional queues: statistics (the device returns the driver's buffer at the polling
//! interval and reads it when the driver posts it again), free page hinting (runs the host
//! starts, in which the driver hands over free blocks: `hinting.rs`) and free page reporting
//! (ranges of free guest memory, given back like inflated pages).
//!
//! The driver is not trusted: frame numbers outside guest memory are skipped and counted, an
//! oversized descriptor is skipped whole, and the device's memory for a request is bounded
//! whatever the driver claims.
//!
//! Layout of this file: constants and the configuration space, the statistics, the device
//! state, giving memory back, the queue handlers, the host's requests, activation and
//! snapshots, the event handler, tests.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::memory::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::common::{next_chain_or_notify, signal_used, Active, VirtioCommon};
use super::state::{DeviceSpecificState, DeviceStateError, VirtioDeviceState};
use super::{read_config_bytes, ActivateError, VirtioDevice, TYPE_BALLOON};
use crate::metrics::BalloonMetrics;

pub mod hinting;

use self::hinting::CMD_ID_STOP;
pub use self::hinting::{Hinting, HintingStatus};

/// Feature bits (virtio 1.2, 5.5.3).
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u64 = 1 << 3;
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;

/// The balloon counts in 4 KiB pages whatever the guest's page size (VIRTIO_BALLOON_PFN_SHIFT).
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// The huge pages guest memory may be backed by (`huge_pages: "2M"`).
const HUGE_PAGE_SIZE: u64 = 2 << 20;
pub const PAGES_PER_MIB: u32 = 256;

/// Every queue has up to 256 entries. Queues in order: inflate, deflate, then statistics
/// when polling is on, then free page hinting and then free page reporting when they are on
/// (the driver numbers the queues it has densely, as Linux does).
const QUEUE_SIZE: u16 = 256;
static QUEUE_SIZES: [u16; 5] = [QUEUE_SIZE; 5];
const INFLATE: usize = 0;
const DEFLATE: usize = 1;

/// Most frame numbers one inflate descriptor may carry (256 MiB of guest memory); a longer
/// descriptor is skipped whole. Linux sends 256 at a time.
pub const MAX_PFNS_PER_DESCRIPTOR: usize = 1 << 16;
/// Frame numbers read from guest memory at once: the device's buffer for a request, whatever
/// its length.
const PFN_CHUNK: usize = 1024;
/// Longest chain the device looks at; longer chains loop or lie.
const MAX_CHAIN_LEN: usize = QUEUE_SIZE as usize;

/// Configuration space, u32 little endian each: `num_pages` (the target, set by the host),
/// `actual` (written by the driver), `free_page_hint_cmd_id` (the host's) and `poison_val`
/// (0: page poisoning is not offered).
const CONFIG_SIZE: usize = 16;
const CONFIG_ACTUAL: usize = 4;
const CONFIG_ACTUAL_END: usize = 8;
/// A hinting command from the driver: one u32.
const HINT_CMD_LEN: u32 = 4;

/// One statistic is 10 bytes, packed: a u16 tag and a u64 value. The tags Linux knows (0 to 15)
/// are kept; the device reads at most [`MAX_STATS`] of them from a buffer.
const STAT_SIZE: usize = 10;
pub const STAT_TAGS: usize = 16;
const MAX_STATS: usize = 64;

/// What the configuration fixes for the life of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonOptions {
    /// The first target, in 4 KiB pages.
    pub target_pages: u32,
    pub deflate_on_oom: bool,
    /// 0: no statistics queue.
    pub stats_polling_interval_s: u16,
    pub free_page_hinting: bool,
    pub free_page_reporting: bool,
}

/// `GET /balloon/statistics`: the target and actual sizes, and what the guest last reported
/// under Firecracker's names (absent until the guest reports it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
}

impl BalloonStats {
    fn new(target_pages: u32, actual_pages: u32, guest: &[Option<u64>; STAT_TAGS]) -> Self {
        // By tag: VIRTIO_BALLOON_S_SWAP_IN (0) to VIRTIO_BALLOON_S_DIRECT_RECLAIM (15).
        let [swap_in, swap_out, major_faults, minor_faults, free_memory, total_memory, available_memory, disk_caches, hugetlb_allocations, hugetlb_failures, oom_kill, alloc_stall, async_scan, direct_scan, async_reclaim, direct_reclaim] =
            *guest;
        Self {
            target_pages,
            actual_pages,
            target_mib: target_pages / PAGES_PER_MIB,
            actual_mib: actual_pages / PAGES_PER_MIB,
            swap_in,
            swap_out,
            major_faults,
            minor_faults,
            free_memory,
            total_memory,
            available_memory,
            disk_caches,
            hugetlb_allocations,
            hugetlb_failures,
            oom_kill,
            alloc_stall,
            async_scan,
            direct_scan,
            async_reclaim,
            direct_reclaim,
        }
    }
}

/// What a snapshot keeps of the balloon beyond the common part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub stats_polling_interval_s: u16,
    /// The statistics buffer the device holds until the next poll.
    pub stats_head: Option<u16>,
    pub guest_stats: [Option<u64>; STAT_TAGS],
    /// The configuration generation the driver last saw.
    pub config_generation: u32,
    /// Free page hinting's run (all zero when hinting is off).
    pub hinting: Hinting,
}

/// Why the host's request cannot be done, in Firecracker's words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonError {
    #[error("Device is inactive, check if balloon driver is enabled in guest kernel.")]
    NotActive,
    #[error("Cannot enable/disable the statistics after boot.")]
    StatsStateChange,
    #[error(
        "Free page hinting was not enabled when the balloon was configured (free_page_hinting)."
    )]
    HintingDisabled,
}

pub struct Balloon {
    common: VirtioCommon,
    metrics: Arc<BalloonMetrics>,
    options: BalloonOptions,
    target_pages: u32,
    actual_pages: u32,
    stats_interval_s: u16,
    /// Fires at the polling interval: the device returns the statistics buffer it holds.
    stats_timer: TimerFd,
    stats_head: Option<u16>,
    guest_stats: [Option<u64>; STAT_TAGS],
    hinting: Hinting,
    /// Buffers for one chunk of frame numbers, kept between requests.
    pfn_bytes: Vec<u8>,
    pfns: Vec<u32>,
}

impl Balloon {
    pub fn new(options: BalloonOptions, irq: EventFd) -> std::io::Result<Self> {
        let mut features = 0;
        let mut queues = 2;
        if options.deflate_on_oom {
            features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if options.stats_polling_interval_s > 0 {
            features |= VIRTIO_BALLOON_F_STATS_VQ;
            queues += 1;
        }
        if options.free_page_hinting {
            features |= VIRTIO_BALLOON_F_FREE_PAGE_HINT;
            queues += 1;
        }
        if options.free_page_reporting {
            features |= VIRTIO_BALLOON_F_REPORTING;
            queues += 1;
        }
        let common = VirtioCommon::new(
            "virtio-balloon".into(),
            TYPE_BALLOON,
            &QUEUE_SIZES[..queues],
            features,
            config_bytes(options.target_pages, 0, CMD_ID_STOP),
            irq,
        )?;
        let stats_timer = TimerFd::new()?;
        // A timer re-armed between its event and its read must not block the event loop.
        set_nonblocking(&stats_timer)?;
        let mut balloon = Self {
            common,
            metrics: Arc::new(BalloonMetrics::default()),
            options,
            target_pages: options.target_pages,
            actual_pages: 0,
            stats_interval_s: options.stats_polling_interval_s,
            stats_timer,
            stats_head: None,
            guest_stats: [None; STAT_TAGS],
            hinting: Hinting::default(),
            pfn_bytes: Vec::new(),
            pfns: Vec::new(),
        };
        // Armed now and left running: activation and reset run on a vCPU thread, whose
        // seccomp filter has no timer calls, and a poll with no buffer held does nothing.
        balloon.arm_stats_timer();
        Ok(balloon)
    }

    /// The device's counters, for the monitor's metrics.
    pub fn metrics(&self) -> &Arc<BalloonMetrics> {
        &self.metrics
    }

    fn stats_queue(&self) -> Option<usize> {
        (self.options.stats_polling_interval_s > 0).then_some(2)
    }

    fn hinting_queue(&self) -> Option<usize> {
        self.options
            .free_page_hinting
            .then_some(2 + usize::from(self.stats_queue().is_some()))
    }

    fn reporting_queue(&self) -> Option<usize> {
        self.options.free_page_reporting.then_some(
            2 + usize::from(self.stats_queue().is_some())
                + usize::from(self.hinting_queue().is_some()),
        )
    }

    /// The configuration space as it stands.
    fn config(&self) -> Vec<u8> {
        config_bytes(self.target_pages, self.actual_pages, self.hinting.host_cmd)
    }

    /// Puts a changed configuration space where the driver reads it, and tells it.
    fn config_changed(&mut self) {
        self.common.set_config(self.config());
        self.common.interrupt().signal_config_change();
    }

    /// Serves the inflate queue: every frame number in guest memory is given back.
    fn process_inflate(&mut self) {
        let (pfn_bytes, pfns, metrics) = (&mut self.pfn_bytes, &mut self.pfns, &self.metrics);
        drain(&mut self.common, metrics, INFLATE, |mem, chain| {
            for descriptor in chain.take(MAX_CHAIN_LEN) {
                inflate_descriptor(mem, &descriptor, pfn_bytes, pfns, metrics);
            }
        });
    }

    /// Serves the deflate queue: nothing to do but return the chains, as the device does not
    /// ask to be told before the guest uses a page again (no VIRTIO_BALLOON_F_MUST_TELL_HOST).
    fn process_deflate(&mut self) {
        drain(&mut self.common, &self.metrics, DEFLATE, |_, _| {});
    }

    /// Serves the free page reporting queue: each descriptor is a range of free guest memory,
    /// given back to the host.
    fn process_reporting(&mut self) {
        let Some(index) = self.reporting_queue() else {
            return;
        };
        let metrics = &self.metrics;
        drain(&mut self.common, metrics, index, |mem, chain| {
            metrics.free_page_report_count.inc();
            for descriptor in chain.take(MAX_CHAIN_LEN) {
                let outcome = give_back_buffer(mem, &descriptor);
                metrics.free_page_report_freed.add(outcome.freed);
                if outcome.outside > 0 || outcome.failed > 0 {
                    metrics.free_page_report_fails.inc();
                }
            }
        });
    }

    /// Serves the free page hinting queue: the driver's commands (a 4-byte readable buffer:
    /// its run's id, or STOP) and, within a run, the free blocks it hands over (writable
    /// buffers), which are given back to the host.
    fn process_hinting(&mut self) {
        let Some(index) = self.hinting_queue() else {
            return;
        };
        let (hinting, metrics) = (&mut self.hinting, &self.metrics);
        let mut changed = false;
        drain(&mut self.common, metrics, index, |mem, chain| {
            for descriptor in chain.take(MAX_CHAIN_LEN) {
                if descriptor.is_write_only() {
                    if !hinting.accepts_blocks() {
                        continue;
                    }
                    metrics.free_page_hint_count.inc();
                    let outcome = give_back_buffer(mem, &descriptor);
                    metrics.free_page_hint_freed.add(outcome.freed);
                    if outcome.outside > 0 || outcome.failed > 0 {
                        metrics.free_page_hint_fails.inc();
                    }
                } else {
                    let mut id = [0u8; HINT_CMD_LEN as usize];
                    if descriptor.len() != HINT_CMD_LEN
                        || mem.read_slice(&mut id, descriptor.addr()).is_err()
                    {
                        metrics.free_page_hint_fails.inc();
                        continue;
                    }
                    changed |= hinting.driver_sent(u32::from_le_bytes(id));
                }
            }
        });
        if changed {
            self.config_changed();
        }
    }

    /// Starts a free page hinting run (`PATCH /balloon/hinting/start`).
    pub fn start_hinting(&mut self, acknowledge_on_stop: bool) -> Result<(), BalloonError> {
        self.check_hinting()?;
        self.hinting.start(acknowledge_on_stop);
        self.config_changed();
        Ok(())
    }

    /// Ends the run: the driver frees what it handed over (`PATCH /balloon/hinting/stop`).
    pub fn stop_hinting(&mut self) -> Result<(), BalloonError> {
        self.check_hinting()?;
        self.hinting.stop();
        self.config_changed();
        Ok(())
    }

    /// `GET /balloon/hinting/status`.
    pub fn hinting_status(&self) -> Result<HintingStatus, BalloonError> {
        if !self.options.free_page_hinting {
            return Err(BalloonError::HintingDisabled);
        }
        Ok(self.hinting.status())
    }

    fn check_hinting(&self) -> Result<(), BalloonError> {
        if !self.options.free_page_hinting {
            return Err(BalloonError::HintingDisabled);
        }
        if self.common.active().is_none() {
            return Err(BalloonError::NotActive);
        }
        Ok(())
    }

    /// Reads the statistics the driver posted and holds the buffer until the next poll.
    fn process_stats(&mut self) {
        let Some(index) = self.stats_queue() else {
            return;
        };
        let Some(Active {
            mem,
            queues,
            interrupt,
        }) = self.common.active_mut()
        else {
            return;
        };
        let mem: &GuestMemoryMmap = mem;
        let queue = &mut queues[index];
        loop {
            let chain = match next_chain_or_notify(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(err) => {
                    self.metrics.event_fails.inc();
                    self.common.fail(&format!("statistics queue: {err}"));
                    return;
                }
            };
            let head = chain.head_index();
            if let Some(previous) = self.stats_head.replace(head) {
                // A driver keeps one buffer posted; give back an older one rather than hold it.
                debug!("virtio-balloon: a second statistics buffer; the first goes back");
                if queue.add_used(mem, previous, 0).is_ok() {
                    signal_used(interrupt, queue, mem);
                }
            }
            match chain.take(1).next() {
                Some(descriptor) if read_stats(mem, &descriptor, &mut self.guest_stats) => {
                    self.metrics.stats_updates_count.inc();
                }
                _ => self.metrics.stats_update_fails.inc(),
            }
        }
    }

    /// The polling interval passed: the driver gets its statistics buffer back to fill again.
    fn poll_stats(&mut self) {
        let Some(index) = self.stats_queue() else {
            return;
        };
        let Some(Active {
            mem,
            queues,
            interrupt,
        }) = self.common.active_mut()
        else {
            return;
        };
        let Some(head) = self.stats_head.take() else {
            return;
        };
        let queue = &mut queues[index];
        if let Err(err) = queue.add_used(mem, head, 0) {
            warn!("virtio-balloon: cannot return the statistics buffer: {err}");
            return;
        }
        signal_used(interrupt, queue, mem);
    }

    fn arm_stats_timer(&mut self) {
        let armed = match self.stats_interval_s {
            0 => self.stats_timer.clear(),
            secs => {
                let period = Duration::from_secs(u64::from(secs));
                self.stats_timer.reset(period, Some(period))
            }
        };
        if let Err(err) = armed {
            warn!("virtio-balloon: cannot set the statistics timer: {err}");
        }
    }

    /// The target, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.target_pages
    }

    /// The size the driver says the balloon has, in 4 KiB pages.
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    pub fn stats_polling_interval_s(&self) -> u16 {
        self.stats_interval_s
    }

    /// Sets a new target (`PATCH /balloon`); the driver hears of it by a configuration change.
    pub fn set_target_pages(&mut self, pages: u32) -> Result<(), BalloonError> {
        if self.common.active().is_none() {
            return Err(BalloonError::NotActive);
        }
        self.target_pages = pages;
        self.config_changed();
        Ok(())
    }

    /// A new statistics polling interval (`PATCH /balloon/statistics`); statistics cannot be
    /// turned on or off once the device exists. The first poll is now.
    pub fn set_stats_polling_interval(&mut self, secs: u16) -> Result<(), BalloonError> {
        if secs == self.stats_interval_s {
            return Ok(());
        }
        if secs == 0 || self.stats_interval_s == 0 {
            return Err(BalloonError::StatsStateChange);
        }
        self.stats_interval_s = secs;
        self.arm_stats_timer();
        self.poll_stats();
        Ok(())
    }

    /// The latest statistics; None when the device has none (polling is off).
    pub fn stats(&self) -> Option<BalloonStats> {
        self.stats_queue()
            .map(|_| BalloonStats::new(self.target_pages, self.actual_pages, &self.guest_stats))
    }
}

/// The configuration space for `target` and `actual` pages and the hinting command `cmd`.
fn config_bytes(target: u32, actual: u32, cmd: u32) -> Vec<u8> {
    let mut config = Vec::with_capacity(CONFIG_SIZE);
    config.extend_from_slice(&target.to_le_bytes());
    config.extend_from_slice(&actual.to_le_bytes());
    config.extend_from_slice(&cmd.to_le_bytes());
    config.extend_from_slice(&0u32.to_le_bytes());
    config
}

fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor the caller owns; F_GETFL and F_SETFL touch only its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the statistics in `descriptor` into `stats`; false when the buffer cannot be read.
fn read_stats(
    mem: &GuestMemoryMmap,
    descriptor: &Descriptor,
    stats: &mut [Option<u64>; STAT_TAGS],
) -> bool {
    if descriptor.is_write_only() {
        return false;
    }
    let count = (descriptor.len() as usize / STAT_SIZE).min(MAX_STATS);
    let mut bytes = [0u8; MAX_STATS * STAT_SIZE];
    let bytes = &mut bytes[..count * STAT_SIZE];
    if mem.read_slice(bytes, descriptor.addr()).is_err() {
        return false;
    }
    for stat in bytes.chunks_exact(STAT_SIZE) {
        let tag = usize::from(u16::from_le_bytes([stat[0], stat[1]]));
        let value = u64::from_le_bytes(stat[2..].try_into().unwrap_or_default());
        // A tag this device does not know (a newer driver's) is left out.
        if let Some(slot) = stats.get_mut(tag) {
            *slot = Some(value);
        }
    }
    true
}

/// Gives back the pages whose frame numbers one inflate descriptor lists.
fn inflate_descriptor(
    mem: &GuestMemoryMmap,
    descriptor: &Descriptor,
    bytes: &mut Vec<u8>,
    pfns: &mut Vec<u32>,
    metrics: &BalloonMetrics,
) {
    let len = descriptor.len() as usize;
    if descriptor.is_write_only() || !len.is_multiple_of(4) || len / 4 > MAX_PFNS_PER_DESCRIPTOR {
        debug!("virtio-balloon: skipped an inflate descriptor of {len} bytes");
        metrics.event_fails.inc();
        return;
    }
    let count = len / 4;
    let mut done = 0;
    while done < count {
        let n = (count - done).min(PFN_CHUNK);
        bytes.resize(n * 4, 0);
        let read = descriptor
            .addr()
            .checked_add(done as u64 * 4)
            .is_some_and(|addr| mem.read_slice(bytes, addr).is_ok());
        if !read {
            metrics.event_fails.inc();
            return;
        }
        pfns.clear();
        pfns.extend(
            bytes
                .chunks_exact(4)
                .map(|pfn| u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]])),
        );
        give_back_pfns(mem, pfns, metrics);
        done += n;
    }
}

/// Gives back the pages `pfns` name, in as few runs as they allow: sorted, without duplicates,
/// neighbours joined.
fn give_back_pfns(mem: &GuestMemoryMmap, pfns: &mut Vec<u32>, metrics: &BalloonMetrics) {
    pfns.sort_unstable();
    pfns.dedup();
    let mut rest = &pfns[..];
    while let Some(&first) = rest.first() {
        let run = 1 + rest
            .windows(2)
            .take_while(|pair| pair[0].checked_add(1) == Some(pair[1]))
            .count();
        let outcome = give_back(
            mem,
            GuestAddress(u64::from(first) << PAGE_SHIFT),
            run as u64 * PAGE_SIZE,
        );
        metrics.inflate_freed.add(outcome.freed);
        metrics
            .inflate_invalid_pfns
            .add(outcome.outside / PAGE_SIZE);
        if outcome.failed > 0 {
            metrics.discard_fails.inc();
        }
        rest = &rest[run..];
    }
}

/// Gives back the whole pages inside the buffer `descriptor` names (a reported range, a
/// hinted block); an unaligned edge stays.
fn give_back_buffer(mem: &GuestMemoryMmap, descriptor: &Descriptor) -> GiveBack {
    let start = descriptor.addr().0.next_multiple_of(PAGE_SIZE);
    let end = descriptor
        .addr()
        .0
        .saturating_add(u64::from(descriptor.len()))
        & !(PAGE_SIZE - 1);
    if end <= start {
        return GiveBack::default();
    }
    give_back(mem, GuestAddress(start), end - start)
}

/// Bytes of a range given back, outside guest memory, and whose discard failed.
#[derive(Debug, Default, PartialEq, Eq)]
struct GiveBack {
    freed: u64,
    outside: u64,
    failed: u64,
}

/// Gives the guest memory in `[start, start + len)` back to the host; whatever part of the
/// range is not guest memory is skipped. The range is page aligned.
fn give_back(mem: &GuestMemoryMmap, start: GuestAddress, len: u64) -> GiveBack {
    let mut outcome = GiveBack::default();
    let end = start.0.saturating_add(len);
    let mut addr = start.0;
    while addr < end {
        let Some(region) = mem.find_region(GuestAddress(addr)) else {
            // Up to the next region, if the range reaches one.
            let next = mem
                .iter()
                .map(|region| region.start_addr().0)
                .filter(|start| *start > addr)
                .min()
                .unwrap_or(end)
                .min(end);
            outcome.outside += next - addr;
            addr = next;
            continue;
        };
        let offset = addr - region.start_addr().0;
        let piece = (region.len() - offset).min(end - addr);
        // Memory in huge pages goes back only in whole huge pages (the kernel refuses less):
        // the rest of the range stays with the guest's pages, in use by nobody.
        let granule = if region.is_hugetlbfs() == Some(true) {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        };
        let first = addr.next_multiple_of(granule);
        let last = (addr + piece) & !(granule - 1);
        if last > first {
            let len = last - first;
            match region.get_host_address(MemoryRegionAddress(first - region.start_addr().0)) {
                Ok(host) => match discard(host, len as usize) {
                    Ok(()) => outcome.freed += len,
                    Err(err) => {
                        warn!("virtio-balloon: cannot give back {len} bytes at {first:#x}: {err}");
                        outcome.failed += len;
                    }
                },
                Err(_) => outcome.failed += len,
            }
        }
        addr += piece;
    }
    outcome
}

/// Drops the host pages behind `len` bytes of guest memory at `host`: anonymous memory reads
/// as zeros afterwards, and a private mapping of a snapshot's memory file loses its private
/// copies and reads the file again. Either way the pages leave the monitor's resident set.
fn discard(host: *mut u8, len: usize) -> std::io::Result<()> {
    // SAFETY: `host..host + len` lies inside one region of guest memory, mapped for the VM's
    // lifetime; the guest gave these pages up, and the monitor holds no reference into guest
    // memory (every access goes through vm-memory's volatile copies), so dropping their
    // contents breaks no Rust invariant.
    let done = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl VirtioDevice for Balloon {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    /// The driver writes `actual`; the rest is the host's.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut config = self.config();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let within = start >= CONFIG_ACTUAL
            && start
                .checked_add(data.len())
                .is_some_and(|end| end <= CONFIG_ACTUAL_END);
        if !within {
            debug!("virtio-balloon: ignored write to config at {offset:#x}");
            return;
        }
        config[start..start + data.len()].copy_from_slice(data);
        self.actual_pages = u32::from_le_bytes([config[4], config[5], config[6], config[7]]);
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if let Err(err) = self.common.activate(mem, queues) {
            self.metrics.activate_fails.inc();
            return Err(err);
        }
        // Buffers may have been made available before the driver said DRIVER_OK.
        self.process_all();
        Ok(())
    }

    fn reset(&mut self) {
        self.common.reset();
        self.stats_head = None;
        // A reset driver starts with no run; ids go on, so that none repeats.
        self.hinting = Hinting {
            last_run: self.hinting.last_run,
            ..Hinting::default()
        };
        self.common.set_config(self.config());
    }

    fn save_state(&self) -> Option<VirtioDeviceState> {
        Some(
            self.common
                .save_state(DeviceSpecificState::Balloon(Box::new(BalloonState {
                    target_pages: self.target_pages,
                    actual_pages: self.actual_pages,
                    stats_polling_interval_s: self.stats_interval_s,
                    stats_head: self.stats_head,
                    guest_stats: self.guest_stats,
                    config_generation: self.common.config_generation(),
                    hinting: self.hinting,
                }))),
        )
    }

    fn restore_state(
        &mut self,
        mem: GuestMemoryMmap,
        state: &VirtioDeviceState,
    ) -> Result<(), DeviceStateError> {
        let DeviceSpecificState::Balloon(saved) = &state.specific else {
            return Err(DeviceStateError::TypeMismatch {
                saved: state.device_type,
                built: TYPE_BALLOON,
            });
        };
        // Statistics on or off is fixed by the configuration the device was rebuilt from.
        if (saved.stats_polling_interval_s == 0) != (self.stats_interval_s == 0) {
            return Err(DeviceStateError::Mismatch {
                what: "balloon statistics polling interval",
                saved: saved.stats_polling_interval_s.to_string(),
                built: self.stats_interval_s.to_string(),
            });
        }
        let started = self.common.restore_state(mem, state)?;
        self.target_pages = saved.target_pages;
        self.actual_pages = saved.actual_pages;
        self.stats_interval_s = saved.stats_polling_interval_s;
        self.stats_head = saved.stats_head;
        self.guest_stats = saved.guest_stats;
        self.hinting = saved.hinting;
        self.common.set_config(self.config());
        self.common.set_config_generation(saved.config_generation);
        self.arm_stats_timer();
        if started {
            self.process_all();
        }
        Ok(())
    }
}

impl Balloon {
    fn process_all(&mut self) {
        self.process_inflate();
        self.process_deflate();
        self.process_stats();
        self.process_hinting();
        self.process_reporting();
    }
}

impl MutEventSubscriber for Balloon {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.stats_timer.as_raw_fd() {
            // Non-blocking: a timer re-armed meanwhile has nothing to read, and that is fine.
            let _ = self.stats_timer.wait();
            self.poll_stats();
            return;
        }
        let Some(index) = self
            .common
            .queue_events()
            .iter()
            .position(|event| event.as_raw_fd() == fd)
        else {
            return;
        };
        // Read first: a notification that lands while the queue is served is not lost.
        let _ = self.common.queue_events()[index].read();
        match index {
            INFLATE => {
                self.metrics.inflate_count.inc();
                self.process_inflate();
            }
            DEFLATE => {
                self.metrics.deflate_count.inc();
                self.process_deflate();
            }
            index if Some(index) == self.stats_queue() => self.process_stats(),
            index if Some(index) == self.hinting_queue() => self.process_hinting(),
            index if Some(index) == self.reporting_queue() => self.process_reporting(),
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for event in self.common.queue_events() {
            if let Err(err) = ops.add(Events::new(event, EventSet::IN)) {
                warn!("virtio-balloon: cannot watch its queue: {err}");
            }
        }
        if let Err(err) = ops.add(Events::new(&self.stats_timer, EventSet::IN)) {
            warn!("virtio-balloon: cannot watch the statistics timer: {err}");
        }
    }
}

/// Serves queue `index` of an active device: `serve` reads each chain (the device writes
/// nothing into them), which is then returned, and the driver is told once at the end. A
/// broken queue stops the device until the driver resets it.
fn drain<F>(common: &mut VirtioCommon, metrics: &BalloonMetrics, index: usize, mut serve: F)
where
    F: for<'m> FnMut(&'m GuestMemoryMmap, virtio_queue::DescriptorChain<&'m GuestMemoryMmap>),
{
    let Some(Active {
        mem,
        queues,
        interrupt,
    }) = common.active_mut()
    else {
        return;
    };
    let mem: &GuestMemoryMmap = mem;
    let queue = &mut queues[index];
    let mut used = false;
    loop {
        let chain = match next_chain_or_notify(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => break,
            Err(err) => {
                metrics.event_fails.inc();
                let message = format!("queue {index}: {err}");
                common.fail(&message);
                return;
            }
        };
        let head = chain.head_index();
        serve(mem, chain);
        if let Err(err) = queue.add_used(mem, head, 0) {
            warn!("virtio-balloon: cannot return chain {head} of queue {index}: {err}");
        }
        used = true;
    }
    if used {
        signal_used(interrupt, queue, mem);
    }
}

#[cfg(test)]
mod tests;
