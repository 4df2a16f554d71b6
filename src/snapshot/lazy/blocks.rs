//! How a recorded working set is brought in: which of its parts are read whole, in blocks of a
//! transparent huge page, and which page by page.
//!
//! Anonymous guest memory filled 4 KiB at a time by UFFDIO_COPY is mapped by KVM 4 KiB at a
//! time too (a KVM fault every few pages the guest touches), where the File backend's page
//! cache, in large folios, is mapped 2 MiB at a time: with every page resident, a guest read
//! 256 MiB in 203-335 ms from Lazy memory against 30-48 ms from File's (docs/benchmarks.md). A
//! block read whole with `pread` into memory marked `MADV_HUGEPAGE`, before the userfaultfd is
//! registered, becomes one huge page, mapped whole. But a block read whole also reads its pages
//! outside the working set before the vCPUs may run, so only blocks dense enough in the working
//! set are: see [`DENSE_FRACTION`].

use super::source::PAGE_SIZE;

/// The blocks read whole: the host's transparent huge page, 2 MiB on x86_64 and on aarch64
/// with 4 KiB pages alike (src/arch).
pub const BLOCK: u64 = crate::arch::TRANSPARENT_HUGE_PAGE_SIZE;

/// A block is read whole when at least 1/8 of its pages (64 of 512) are in the working set;
/// the working set's pages in sparser blocks are copied in one by one (in runs of neighbours).
///
/// Why an eighth: what a whole block costs beyond its working-set pages is reading the rest
/// before the vCPUs run (the prefetch would bring them in behind the guest anyway, so it is
/// time, not memory). The disk does not read 4 KiB at a time either: the page cache fills by
/// readahead in windows of 0.5-2.6 MiB here (a cold 16 MiB read by File read 29 MiB), so the
/// 64 or more scattered pages of a block at that density already cost most of the block's
/// I/O, paid one fault on the file's mapping at a time, and leave the guest with 4 KiB
/// mappings. At 1/8 a whole read costs at most 8 times the working set's bytes in copying
/// (about 0.5 GB/s into new memory on the nested host measured); much sparser (a page or two
/// per block, a scattered working set) it would cost up to 512 times, for a huge page the
/// guest's few accesses gain little from.
pub const DENSE_FRACTION: u64 = 8;

/// One guest RAM region: where it is in this process and in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub host: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// A part of guest memory read whole: a [`BLOCK`]-aligned block of host memory (the huge
/// page's alignment), clamped to its region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub host: u64,
    pub len: u64,
    pub file_offset: u64,
}

impl Block {
    /// The memory file's pages it holds.
    pub fn pages(&self) -> std::ops::Range<u64> {
        self.file_offset / PAGE_SIZE..(self.file_offset + self.len) / PAGE_SIZE
    }
}

/// How a working set comes in.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Blocks read whole, in address order.
    pub whole: Vec<Block>,
    /// The working set's other pages (of the memory file), sorted, each once.
    pub pages: Vec<u64>,
}

/// Splits the working set `pages` (pages of the memory file, any order, repeats allowed) of
/// guest memory `regions` (in file order) into blocks read whole and pages copied one by one.
/// `has_data` tells the file's data from its holes: a block of holes only is never read whole
/// (its pages are zero pages, which cost nothing to fill).
pub fn plan(pages: &[u32], regions: &[Region], has_data: impl Fn(u64) -> bool) -> Plan {
    let mut sorted: Vec<u64> = pages.iter().map(|p| u64::from(*p)).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut plan = Plan::default();
    let mut at = 0;
    while at < sorted.len() {
        let Some(block) = block_of(sorted[at], regions) else {
            at += 1;
            continue;
        };
        // The file's pages of a block are consecutive, so its working-set pages are too here.
        let range = block.pages();
        let mut end = at;
        while end < sorted.len() && range.contains(&sorted[end]) {
            end += 1;
        }
        let dense = (end - at) as u64 * DENSE_FRACTION >= range.end - range.start;
        if dense && range.clone().any(&has_data) {
            plan.whole.push(block);
        } else {
            plan.pages.extend_from_slice(&sorted[at..end]);
        }
        at = end;
    }
    plan
}

/// The block that holds page `page` of the memory file.
fn block_of(page: u64, regions: &[Region]) -> Option<Block> {
    let offset = page * PAGE_SIZE;
    let region = regions
        .iter()
        .find(|r| (r.file_offset..r.file_offset + r.len).contains(&offset))?;
    let host = region.host + (offset - region.file_offset);
    let from = (host & !(BLOCK - 1)).max(region.host);
    let to = ((host & !(BLOCK - 1)) + BLOCK).min(region.host + region.len);
    Some(Block {
        host: from,
        len: to - from,
        file_offset: region.file_offset + (from - region.host),
    })
}

/// Consecutive blocks of `blocks` (in address order) joined into ranges `(host, len,
/// file_offset)`: one madvise each instead of one per block, and fewer areas split off guest
/// memory's mapping.
pub fn ranges(blocks: &[Block]) -> Vec<Block> {
    let mut out: Vec<Block> = Vec::new();
    for block in blocks {
        match out.last_mut() {
            Some(last)
                if last.host + last.len == block.host
                    && last.file_offset + last.len == block.file_offset =>
            {
                last.len += block.len;
            }
            _ => out.push(*block),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGES_PER_BLOCK: u64 = BLOCK / PAGE_SIZE;

    /// Two regions: 8 MiB at a huge-page-aligned host address, then 3 MiB + 4 KiB at an
    /// address 1 MiB into a block (so its first and last blocks are clamped).
    fn regions() -> Vec<Region> {
        vec![
            Region {
                host: 0x4000_0000,
                len: 8 << 20,
                file_offset: 0,
            },
            Region {
                host: 0x8010_0000,
                len: (3 << 20) + PAGE_SIZE,
                file_offset: 8 << 20,
            },
        ]
    }

    #[test]
    fn a_block_with_an_eighth_of_its_pages_in_the_working_set_is_read_whole() {
        let threshold = PAGES_PER_BLOCK / DENSE_FRACTION;
        // Block 1 of region 0 at the threshold (in reverse, repeated), block 2 one short.
        let mut pages: Vec<u32> = (0..threshold)
            .rev()
            .map(|i| (PAGES_PER_BLOCK + 3 * i) as u32)
            .collect();
        pages.extend(pages.clone());
        let sparse: Vec<u32> = (0..threshold - 1)
            .map(|i| (2 * PAGES_PER_BLOCK + i) as u32)
            .collect();
        pages.extend(&sparse);
        let plan = plan(&pages, &regions(), |_| true);
        assert_eq!(
            plan.whole,
            vec![Block {
                host: 0x4000_0000 + BLOCK,
                len: BLOCK,
                file_offset: BLOCK,
            }]
        );
        let expected: Vec<u64> = sparse.iter().map(|p| u64::from(*p)).collect();
        assert_eq!(plan.pages, expected);
    }

    #[test]
    fn blocks_are_clamped_to_their_region_and_judged_by_their_own_size() {
        let first = (8 << 20) / PAGE_SIZE;
        // The second region's first block is 1 MiB (256 pages): 32 pages are an eighth.
        let pages: Vec<u32> = (first..first + 32).map(|p| p as u32).collect();
        let plan = plan(&pages, &regions(), |_| true);
        assert_eq!(
            plan.whole,
            vec![Block {
                host: 0x8010_0000,
                len: 1 << 20,
                file_offset: 8 << 20,
            }]
        );
        // Its last block is the one page past 3 MiB: one page is all of it.
        let last = first + (3 << 20) / PAGE_SIZE;
        let plan = super::plan(&[last as u32], &regions(), |_| true);
        assert_eq!(plan.whole[0].len, PAGE_SIZE);
        assert!(plan.pages.is_empty());
    }

    #[test]
    fn a_dense_block_of_holes_only_is_left_to_the_page_copies() {
        let pages: Vec<u32> = (0..PAGES_PER_BLOCK as u32).collect();
        let plan = plan(&pages, &regions(), |page| page >= PAGES_PER_BLOCK);
        assert!(plan.whole.is_empty());
        assert_eq!(plan.pages.len() as u64, PAGES_PER_BLOCK);
    }

    #[test]
    fn neighbouring_blocks_join_into_one_range() {
        let blocks = [0, 1, 3].map(|i| Block {
            host: 0x4000_0000 + i * BLOCK,
            len: BLOCK,
            file_offset: i * BLOCK,
        });
        let joined = ranges(&blocks);
        assert_eq!(joined.len(), 2);
        assert_eq!(joined[0].len, 2 * BLOCK);
        assert_eq!(joined[1], blocks[2]);
    }
}
