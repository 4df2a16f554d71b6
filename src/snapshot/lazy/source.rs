//! Where the lazy pager's pages come from: the memory file, mapped read-only once, and which
//! of its pages are holes (zero pages, left out when it was written). Every fill of guest
//! memory, by the working-set load, the fault thread or the prefetch thread, goes through
//! here, so the three agree on what a page holds. The working set's dense blocks are read
//! whole before the userfaultfd is registered ([`PageSource::read_blocks`], [`super::blocks`]);
//! the prefetch then passes over every page the load brought in without asking the kernel.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use devices::memory::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::blocks::{self, Block, Plan, Region, BLOCK};
use crate::vstate::uffd::{Filled, Uffd, UffdError};

/// The pages the lazy pager serves: 4 KiB (a huge-page snapshot goes through `Uffd`).
pub const PAGE_SIZE: u64 = 4096;

/// The pages from host address `host` to the end of its [`BLOCK`] of host memory. One fill
/// stays within it: the blocks read whole were marked `MADV_HUGEPAGE`, which splits guest
/// memory's mapping at their edges, and the kernel refuses a UFFDIO_COPY or ZEROPAGE that
/// runs from one mapping into the next (ENOENT). Where guest memory does not start on a
/// block's edge in the host (older kernels do not align large anonymous mappings), those
/// edges fall inside the prefetch's steps.
pub fn pages_to_block_end(host: u64) -> u64 {
    (BLOCK - host % BLOCK) / PAGE_SIZE
}

/// How long the prefetch waits, after the kernel asked it to fill again later, for the fault
/// thread to read the event that holds fills back. An EAGAIN with no event behind it (a
/// signal) lets nothing change: it looks again after this.
const EVENTS_READ_WAIT: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot map the memory file {path} for the lazy pager: {source}")]
    Map { path: PathBuf, source: io::Error },
    #[error("cannot find the holes of the memory file {path}: {source}")]
    Holes { path: PathBuf, source: io::Error },
}

/// The memory file and guest memory, page for page.
pub struct PageSource {
    /// The memory file, mapped read-only and shared: UFFDIO_COPY reads the page cache through
    /// it, so no page is read twice or into a buffer of ours.
    file_map: *const u8,
    file_len: u64,
    regions: Vec<Region>,
    /// One bit per page of the memory file: set where the file has data, clear in its holes.
    data: Vec<u64>,
    /// One bit per page: set when the balloon gave the page back (UFFD_EVENT_REMOVE). The
    /// guest must find such a page zero, not as the snapshot had it.
    removed: Vec<AtomicU64>,
    /// One bit per page: set when the working-set load brought the page in, before the pager
    /// started (whole blocks read, or pages copied); the prefetch passes over these in runs
    /// instead of being refused once per page. Written only before the source is shared.
    loaded: Vec<u64>,
    /// Odd while the fault thread reads events and marks the removed pages among them, even
    /// between: a prefetch fill the count changed under may have raced a remove (below).
    reading: AtomicU64,
    /// Guest memory, kept mapped while the pager's threads may fill it: a load refused after
    /// the pager started drops its own handle, and a fill must not then find the mapping
    /// gone (or, worse, something else mapped there).
    _memory: GuestMemoryMmap,
}

// SAFETY: `file_map` is a read-only mapping owned by the source for its whole life and never
// written; reading it from any thread is sound.
unsafe impl Send for PageSource {}
// SAFETY: as for Send: shared access only reads the mapping; `removed` is atomic, `loaded`
// is written only through `&mut self`, before the source is shared.
unsafe impl Sync for PageSource {}

impl PageSource {
    /// Maps `file` (the memory file at `path`, already checked to be as long as `memory`)
    /// and finds its holes.
    pub fn new(file: &File, path: &Path, memory: &GuestMemoryMmap) -> Result<Self, SourceError> {
        let mut regions = Vec::new();
        let mut file_offset = 0;
        for region in memory.iter() {
            regions.push(Region {
                host: region.as_ptr() as u64,
                len: region.len(),
                file_offset,
            });
            file_offset += region.len();
        }
        let file_len = file_offset;
        let pages = file_len.div_ceil(PAGE_SIZE) as usize;
        let data = data_pages(file, file_len).map_err(|source| SourceError::Holes {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: a new read-only shared mapping of `file_len` bytes of an open file; the
        // kernel picks the address, nothing else is replaced. MAP_NORESERVE: nothing is
        // allocated for it, pages come from the page cache.
        let file_map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                file_len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if file_map == libc::MAP_FAILED {
            return Err(SourceError::Map {
                path: path.to_path_buf(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file_map: file_map.cast(),
            file_len,
            regions,
            data,
            removed: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            loaded: vec![0; pages.div_ceil(64)],
            reading: AtomicU64::new(0),
            _memory: memory.clone(),
        })
    }

    /// How many pages guest memory (and the memory file) has.
    pub fn pages(&self) -> u64 {
        self.file_len / PAGE_SIZE
    }

    /// The memory file's page that guest memory at host address `addr` holds.
    pub fn page_at(&self, addr: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| (r.host..r.host + r.len).contains(&addr))
            .map(|r| (r.file_offset + (addr - r.host)) / PAGE_SIZE)
    }

    /// Where page `page` of the memory file goes in this process, and how many pages of its
    /// region follow it (itself included).
    fn host_of(&self, page: u64) -> Option<(u64, u64)> {
        let offset = page * PAGE_SIZE;
        self.regions
            .iter()
            .find(|r| (r.file_offset..r.file_offset + r.len).contains(&offset))
            .map(|r| {
                let within = offset - r.file_offset;
                (r.host + within, (r.len - within) / PAGE_SIZE)
            })
    }

    fn has_data(&self, page: u64) -> bool {
        bit(&self.data, page)
    }

    fn is_removed(&self, page: u64) -> bool {
        self.removed[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Records that the balloon gave back guest memory `[start, end)` (host addresses).
    pub fn remove(&self, start: u64, end: u64) {
        let mut addr = start;
        while addr < end {
            if let Some(page) = self.page_at(addr) {
                self.removed[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
            }
            addr += PAGE_SIZE;
        }
    }

    /// Fills page `page` and up to `max - 1` pages after it of the same kind (data from the
    /// file, or a hole or a removed page, zero) within one region and one block of host
    /// memory ([`pages_to_block_end`]); returns how many pages it filled and how many pages it
    /// looked at (filled or found there already).
    pub fn fill_run(&self, uffd: &Uffd, page: u64, max: u64) -> Result<(u64, u64), UffdError> {
        let Some((host, left)) = self.host_of(page) else {
            return Ok((0, 1));
        };
        let zero = self.is_zero(page);
        let limit = max.min(left).min(pages_to_block_end(host));
        let mut run = 1;
        while run < limit && self.is_zero(page + run) == zero {
            run += 1;
        }
        let len = run * PAGE_SIZE;
        let filled = if zero {
            uffd.zero(host, len)?
        } else {
            // SAFETY: pages `page..page + run` are within the file (`host_of` found them in a
            // region, and the regions span the file), whose mapping `file_map` lives as long
            // as `self`.
            unsafe { uffd.copy(host, self.file_map.add((page * PAGE_SIZE) as usize), len)? }
        };
        Ok(match filled {
            Filled::All => (run, run),
            // Stopped at a page there already (the next call skips it) or interrupted (the
            // next call tries it again).
            Filled::Part(bytes) if bytes > 0 => (bytes / PAGE_SIZE, bytes / PAGE_SIZE),
            // Interrupted before the first page: look at it again.
            Filled::Part(_) => (0, 0),
            Filled::Present => (0, 1),
        })
    }

    /// The fault thread is about to read the userfaultfd: removes it reads are marked before
    /// [`Self::end_reading`].
    pub fn begin_reading(&self) {
        self.reading.fetch_add(1, Ordering::SeqCst);
    }

    /// The events read since [`Self::begin_reading`] are acted on.
    pub fn end_reading(&self) {
        self.reading.fetch_add(1, Ordering::SeqCst);
    }

    /// The reading count once no reading is under way.
    fn settled_reading(&self) -> u64 {
        loop {
            let count = self.reading.load(Ordering::SeqCst);
            if count % 2 == 0 {
                return count;
            }
            std::thread::yield_now();
        }
    }

    /// Fills up to `max` missing pages from `page` as [`Self::fill_run`], for the prefetch
    /// thread, which unlike the fault thread does not read the events itself.
    ///
    /// The race it closes: the balloon's madvise raises a remove event and waits until it is
    /// read, then drops the pages; the fault thread marks them removed only after its read.
    /// A fill decided before the mark (the page has data) can reach the kernel after the
    /// drop, and bring the snapshot's page back where the balloon left none: resident memory
    /// the guest gave back, with the old contents where the guest must find zeros. The
    /// kernel refuses fills (EAGAIN) only while the event is unread. So: a fill the kernel
    /// refused waits for the fault thread's read to end, then looks at the pages again; a
    /// fill during which a read began drops again the pages of its run that are marked
    /// removed by now (the madvise raises another remove, which marks nothing new).
    ///
    /// Pages the working-set load brought in are passed over in one step, without a call
    /// (unless the balloon has since removed them: those are filled zero as any removed page).
    pub fn prefetch_run(&self, uffd: &Uffd, page: u64, max: u64) -> Result<(u64, u64), UffdError> {
        let loaded = self.loaded_run(page, max);
        if loaded > 0 {
            return Ok((0, loaded));
        }
        loop {
            let before = self.settled_reading();
            let (filled, looked) = self.fill_run(uffd, page, max)?;
            if looked == 0 {
                self.wait_for_reading_after(before);
                continue;
            }
            if filled > 0 && self.reading.load(Ordering::SeqCst) != before {
                self.drop_removed(page, looked);
            }
            return Ok((filled, looked));
        }
    }

    /// Waits (a little at most) until the fault thread has read and acted on events since
    /// the reading count was `before`.
    fn wait_for_reading_after(&self, before: u64) {
        let until = Instant::now() + EVENTS_READ_WAIT;
        while Instant::now() < until {
            let now = self.reading.load(Ordering::SeqCst);
            if now != before && now % 2 == 0 {
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Drops again the pages of `[page, page + count)` that hold the file's data but are
    /// marked removed.
    fn drop_removed(&self, page: u64, count: u64) {
        for page in page..page + count {
            if !self.has_data(page) || !self.is_removed(page) {
                continue;
            }
            let Some((host, _)) = self.host_of(page) else {
                continue;
            };
            log::debug!("page {page}: filled as the balloon removed it; dropped again");
            // SAFETY: one page of guest memory, which `_memory` keeps mapped; the balloon
            // gave it back, so no one may rely on its contents, and it reads zero from now
            // on (the fault thread serves it zeroed).
            let ret = unsafe {
                libc::madvise(
                    host as *mut libc::c_void,
                    PAGE_SIZE as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if ret != 0 {
                log::warn!(
                    "cannot drop again page {page} the balloon removed: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }

    fn is_zero(&self, page: u64) -> bool {
        !self.has_data(page) || self.is_removed(page)
    }

    /// How many pages from `page` (up to `max`, within its region) the working-set load
    /// brought in and the balloon has not removed since. Only the prefetch passes over them
    /// so: passing over a page never brings back what the balloon removed, while a fault must
    /// always be answered with a fill (a missing page faults again otherwise).
    fn loaded_run(&self, page: u64, max: u64) -> u64 {
        let Some((_, left)) = self.host_of(page) else {
            return 0;
        };
        let mut run = 0;
        while run < max.min(left) && bit(&self.loaded, page + run) && !self.is_removed(page + run) {
            run += 1;
        }
        run
    }

    fn mark_loaded(&mut self, pages: std::ops::Range<u64>) {
        for page in pages {
            self.loaded[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Which of the working set `pages` are read whole, in blocks, and which copied.
    pub fn plan(&self, pages: &[u32]) -> Plan {
        blocks::plan(pages, &self.regions, |page| self.has_data(page))
    }

    /// Queues every read of the memory file that loading `plan` makes (`MADV_WILLNEED` on the
    /// file's mapping, which only starts reads into the page cache), so that the disk has them
    /// all in hand before the first `pread` or copy waits: the copied pages' too, or each run
    /// of them would wait for its own read, one after the other (20 pages of a 16 MiB working
    /// set took 8 ms so under strace, with the page cache dropped). Runs of copied pages closer
    /// than [`QUEUE_GAP_PAGES`] are queued as one, the pages between read along.
    pub fn queue_reads(&self, plan: &Plan) {
        let pages = page_runs(&plan.pages, QUEUE_GAP_PAGES).map(|(first, count)| Block {
            host: 0,
            len: count * PAGE_SIZE,
            file_offset: first * PAGE_SIZE,
        });
        for range in blocks::ranges(&plan.whole).into_iter().chain(pages) {
            // SAFETY: `file_offset..file_offset + len` is inside the file's mapping (a
            // region's part of the file, or pages of it); MADV_WILLNEED only starts reads.
            unsafe {
                libc::madvise(
                    self.file_map.add(range.file_offset as usize) as *mut libc::c_void,
                    range.len as usize,
                    libc::MADV_WILLNEED,
                )
            };
        }
    }

    /// Reads `blocks` (of [`Self::plan`]) whole from the memory file `file` straight into
    /// guest memory; before the userfaultfd is registered on it, which refuses to fill a page
    /// any way but through it. Guest memory there is first marked `MADV_HUGEPAGE`, so that
    /// each block (aligned in host memory, as KVM needs) becomes one transparent huge page
    /// mapped whole by KVM, as the File backend's page cache is. Holes in a block read zeros,
    /// which is what a hole means. Returns the pages read.
    ///
    /// Two threads read ([`read_in_parallel`]): beyond the disk, a block costs faulting in its
    /// huge page and copying 2 MiB into it, CPU work that a second CPU shares.
    pub fn read_blocks(&mut self, file: &File, blocks: &[Block]) -> io::Result<u64> {
        for range in blocks::ranges(blocks) {
            // SAFETY: guest memory of one region (`plan` clamps blocks to their region),
            // mapped for as long as `_memory` is; MADV_HUGEPAGE only lets the kernel back it
            // with huge pages, contents unchanged.
            let ret = unsafe {
                libc::madvise(
                    range.host as *mut libc::c_void,
                    range.len as usize,
                    libc::MADV_HUGEPAGE,
                )
            };
            if ret != 0 {
                // A kernel without transparent huge pages: the blocks are read all the same.
                log::debug!(
                    "lazy restore: no huge pages for guest memory at {:#x}: {}",
                    range.host,
                    io::Error::last_os_error()
                );
            }
        }
        read_in_parallel(file, blocks)?;
        let mut pages = 0;
        for block in blocks {
            self.mark_loaded(block.pages());
            pages += block.len / PAGE_SIZE;
        }
        Ok(pages)
    }

    /// Copies `pages` (sorted, of [`Self::plan`]) in through the registered `uffd`, one call
    /// per run of neighbours of the same kind; returns the pages filled.
    pub fn copy_pages(&mut self, uffd: &Uffd, pages: &[u64]) -> Result<u64, UffdError> {
        let mut filled = 0;
        for (first, count) in page_runs(pages, 1) {
            let last = first + count - 1;
            let mut page = first;
            while page <= last {
                let (count, looked) = self.fill_run(uffd, page, last - page + 1)?;
                filled += count;
                self.mark_loaded(page..page + looked);
                page += looked;
            }
        }
        Ok(filled)
    }

    /// Fills the one page `page`: Some(true) when it was missing, Some(false) when someone
    /// filled it first (whoever waits on it is woken), None when the kernel asks to try again
    /// later (EAGAIN: guest memory is changing under an event, a balloon's remove, that the
    /// fault thread must read before any fill can succeed).
    pub fn fill_page(&self, uffd: &Uffd, page: u64) -> Result<Option<bool>, UffdError> {
        match self.fill_run(uffd, page, 1)? {
            (1, _) => Ok(Some(true)),
            (_, 0) => Ok(None),
            _ => {
                if let Some((host, _)) = self.host_of(page) {
                    uffd.wake(host, PAGE_SIZE)?;
                }
                Ok(Some(false))
            }
        }
    }
}

impl Drop for PageSource {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length; nothing uses it any more.
        unsafe { libc::munmap(self.file_map as *mut libc::c_void, self.file_len as usize) };
    }
}

fn bit(bits: &[u64], index: u64) -> bool {
    bits[(index / 64) as usize] & (1 << (index % 64)) != 0
}

/// Runs of copied pages at most this far apart are queued for reading as one (128 KiB): a
/// read of the pages between costs the disk less than a request of its own.
const QUEUE_GAP_PAGES: u64 = 32;

/// `pages` (sorted, each once) as runs `(first, count)`: a page at most `gap` pages after the
/// last one joins its run (1: neighbours only; more: the pages between are taken along).
fn page_runs(pages: &[u64], gap: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let first = *pages.get(at)?;
        let mut last = first;
        at += 1;
        while let Some(&next) = pages.get(at) {
            if next > last + gap {
                break;
            }
            last = next;
            at += 1;
        }
        Some((first, last - first + 1))
    })
}

/// Reads `blocks` whole, on this thread and one more, each taking the next block not yet
/// taken; without the second thread (it could not be started) this one reads them all.
///
/// Why two: with the page cache cold the disk reads every block at once (queued by
/// [`PageSource::queue_reads`]) while the threads fault in huge pages and copy, and new
/// memory is dear on a nested host, whose free pages the hypervisor takes back (free page
/// reporting) and must give again at the first touch: 256 MiB of fresh huge pages took
/// 530-630 ms to touch there against 23-57 ms for pages just freed. Two threads halve what
/// that costs the load (docs/benchmarks.md: 256 MiB cold, the load's median 241 → 152 ms).
fn read_in_parallel(file: &File, blocks: &[Block]) -> io::Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || -> io::Result<()> {
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(block) = blocks.get(index) else {
                return Ok(());
            };
            read_whole(file, block)?;
        }
    };
    std::thread::scope(|scope| {
        let helper = if blocks.len() > 1 {
            crate::thread::spawn_helper(scope, "mote_ws_read", work)
                .map_err(|err| log::debug!("lazy restore: reading the blocks alone: {err}"))
                .ok()
        } else {
            None
        };
        let mine = work();
        let theirs = match helper {
            Some(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the block-reading thread panicked"))),
            None => Ok(()),
        };
        mine.and(theirs)
    })
}

/// Reads `block` of the memory file `file` into guest memory, whole.
fn read_whole(file: &File, block: &Block) -> io::Result<()> {
    let mut done = 0;
    while done < block.len {
        // SAFETY: `host + done .. host + len` is guest memory of one region, mapped while the
        // source lives and run by no vCPU yet; pread writes at most `len - done` bytes there.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                (block.host + done) as *mut libc::c_void,
                (block.len - done) as usize,
                (block.file_offset + done) as libc::off_t,
            )
        };
        match read {
            n if n > 0 => done += n as u64,
            // The file was checked to be as long as guest memory: cut short since.
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// One bit per page of the file's `len` bytes, set where it has data: from SEEK_DATA and
/// SEEK_HOLE, so no page is read. A file system that does not report holes reports all data.
fn data_pages(file: &File, len: u64) -> io::Result<Vec<u64>> {
    let pages = len.div_ceil(PAGE_SIZE);
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        // SAFETY: lseek on an open descriptor; it only moves the file position.
        let at = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
        if at < 0 {
            let err = io::Error::last_os_error();
            // ENXIO: no data at or after `offset`.
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(at as u64))
    };
    let mut offset = 0;
    while offset < len {
        let Some(start) = seek(offset, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        // A page is data if any of its bytes is.
        for page in start / PAGE_SIZE..end.div_ceil(PAGE_SIZE) {
            bits[(page / 64) as usize] |= 1 << (page % 64);
        }
        offset = end;
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    #[test]
    fn a_fill_ends_at_the_edge_of_its_block_of_host_memory() {
        let block = 2 << 20;
        assert_eq!(pages_to_block_end(0x7f00_0000_0000), 512);
        assert_eq!(pages_to_block_end(0x7f00_0000_0000 + block - 4096), 1);
        // Guest memory at 0x...7c8000 (seen on a 6.1 host): the prefetch's first 1 MiB step
        // from there would cross the block edge 56 pages on, into the next mapping.
        assert_eq!(pages_to_block_end(0x7f29_307c_8000), 56);
    }

    #[test]
    fn copied_pages_go_in_runs_of_neighbours_and_are_queued_across_small_gaps() {
        let pages = [3, 4, 5, 40, 72, 73, 200];
        let runs: Vec<(u64, u64)> = page_runs(&pages, 32).collect();
        // 5 → 40 is 35 pages on (a run of its own), 40 → 72 is 32 (joined), 73 → 200 apart.
        assert_eq!(runs, vec![(3, 3), (40, 34), (200, 1)]);
        // 1: neighbours only, the runs the copies go in.
        let neighbours: Vec<(u64, u64)> = page_runs(&pages, 1).collect();
        assert_eq!(neighbours, vec![(3, 3), (40, 1), (72, 2), (200, 1)]);
        assert_eq!(page_runs(&[], 32).count(), 0);
        assert_eq!(page_runs(&[7], 0).collect::<Vec<_>>(), vec![(7, 1)]);
    }

    #[test]
    fn blocks_read_on_two_threads_hold_the_files_bytes() {
        let file = TempFile::new().unwrap();
        let f = file.as_file();
        let len = 5 * PAGE_SIZE as usize;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&bytes, 0).unwrap();
        let mut memory = vec![0u8; len];
        let blocks: Vec<Block> = (0..5)
            .map(|i| Block {
                host: memory.as_mut_ptr() as u64 + i * PAGE_SIZE,
                len: PAGE_SIZE,
                file_offset: i * PAGE_SIZE,
            })
            .collect();
        read_in_parallel(f, &blocks).unwrap();
        assert_eq!(memory, bytes);
        // A block past the file's end is an error, whichever thread reads it.
        let short = [Block {
            host: memory.as_mut_ptr() as u64,
            len: PAGE_SIZE,
            file_offset: 5 * PAGE_SIZE,
        }; 2];
        assert!(read_in_parallel(f, &short).is_err());
    }

    #[test]
    fn holes_are_told_from_data_page_by_page() {
        let file = TempFile::new().unwrap();
        let f = file.as_file();
        f.set_len(64 * PAGE_SIZE).unwrap();
        f.write_all_at(&[1; 10], 3 * PAGE_SIZE + 100).unwrap();
        f.write_all_at(&[1; 4096], 40 * PAGE_SIZE).unwrap();
        let bits = data_pages(f, 64 * PAGE_SIZE).unwrap();
        let data: Vec<u64> = (0..64).filter(|p| bit(&bits, *p)).collect();
        // File systems report data in blocks (at least a page): the written pages are data,
        // and a file system without holes reports everything.
        assert!(data.contains(&3) && data.contains(&40), "{data:?}");
        assert!(data.len() == 64 || data.len() <= 4, "{data:?}");
    }
}
