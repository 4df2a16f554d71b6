//! Diff snapshots' memory files: only the pages written since the snapshot before, at their
//! place in a sparse file of the whole guest's size (holes elsewhere), so that
//! `mote snapshot rebase` can lay them over that snapshot's memory file. Dirty pages that are
//! zero are written as data, not left as holes: a hole means "as the base has it".
//!
//! A Diff memory file on its own is not a guest's memory, and nothing in it says so (its size
//! is the guest's). So the state file of a Diff snapshot names a few pages the diff did not
//! write but the guest had non-zero ([`BasePage`]), with their CRC: a restore checks the
//! memory file it is given holds them, which the diff itself does not (holes read as zeros)
//! and neither does the memory file of another snapshot, most likely. They are looked for
//! among the first [`BASE_PAGE_SEARCH`] clean pages (the boot structures and the kernel
//! image of any guest are there); a Diff that finds none names none, and its load cannot
//! tell a diff from a rebased file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crc::{Crc, CRC_64_ECMA_182};
use devices::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{MemoryFileError, MemoryRegionState};
use crate::vstate::dirty::DirtyPages;

const CRC64: Crc<u64> = Crc::<u64>::new(&CRC_64_ECMA_182);
/// How many base pages a Diff snapshot names.
const BASE_PAGES: usize = 4;
/// How many pages are looked at to find them: bounded, so that a guest whose memory is mostly
/// zero does not make every Diff snapshot read all of it.
const BASE_PAGE_SEARCH: usize = 4096;

/// What a snapshot's memory file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryFileKind {
    /// All of guest RAM (zero pages as holes).
    #[default]
    Full,
    /// The pages written since the snapshot before; the rest are holes, which rebasing onto
    /// that snapshot's memory file fills.
    Diff {
        /// Pages the diff left out that the guest had non-zero: the memory file a restore is
        /// given must hold them as they were.
        base_pages: Vec<BasePage>,
    },
}

/// A guest page and the CRC-64 of its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasePage {
    pub guest_addr: u64,
    pub crc64: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("the guest memory from {path} does not hold the page at {addr:#x} as this Diff snapshot's base had it: a Diff snapshot's memory file holds only the pages written since the snapshot before; lay it over that snapshot's memory file (mote snapshot rebase --base-file BASE --diff-file DIFF) and load the result")]
pub struct NotRebased {
    pub path: std::path::PathBuf,
    pub addr: u64,
}

/// The host's page size: the unit of KVM's dirty log and of vm-memory's bitmap.
pub fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as usize,
        _ => 4096,
    }
}

/// Writes the `dirty` pages of `mem` into `file`, new and empty, that will be the memory file
/// `path`: each at its place in a file of the guest's size, holes elsewhere. Returns the
/// regions in file order and what the state file says of the memory file.
///
/// The vCPUs must be paused and no device may be serving its queues.
pub fn write_diff_memory_file(
    mem: &GuestMemoryMmap,
    dirty: &DirtyPages,
    file: &File,
    path: &Path,
) -> Result<(Vec<MemoryRegionState>, MemoryFileKind), MemoryFileError> {
    let write_err = |source| MemoryFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let page = page_size();
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (index, region) in mem.iter().enumerate() {
        let size = region.len() as usize;
        let host = region.as_ptr();
        // SAFETY: `host..host + size` is the region's live mapping, kept by `mem` for the whole
        // call; nothing writes it meanwhile (paused vCPUs, devices idle on this very thread).
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, size) };
        for run in dirty.runs(index, size.div_ceil(page)) {
            let start = run.start * page;
            let end = (run.end * page).min(size);
            file.write_all_at(&bytes[start..end], file_offset + start as u64)
                .map_err(write_err)?;
        }
        regions.push(MemoryRegionState {
            guest_addr: region.start_addr().raw_value(),
            size: size as u64,
        });
        file_offset += size as u64;
    }
    file.set_len(file_offset).map_err(write_err)?;
    let base_pages = find_base_pages(mem, dirty, page);
    Ok((regions, MemoryFileKind::Diff { base_pages }))
}

/// Up to [`BASE_PAGES`] pages that `dirty` leaves out and that are not zero, with their CRCs.
fn find_base_pages(mem: &GuestMemoryMmap, dirty: &DirtyPages, page: usize) -> Vec<BasePage> {
    let mut found = Vec::new();
    let mut looked = 0;
    let mut buf = vec![0u8; page];
    for (index, region) in mem.iter().enumerate() {
        let pages = region.len() as usize / page;
        for number in 0..pages {
            if found.len() == BASE_PAGES || looked == BASE_PAGE_SEARCH {
                return found;
            }
            if dirty.is_dirty(index, number) {
                continue;
            }
            looked += 1;
            let Some(addr) = region.start_addr().checked_add((number * page) as u64) else {
                continue;
            };
            if mem.read_slice(&mut buf, addr).is_err() || buf.iter().all(|b| *b == 0) {
                continue;
            }
            found.push(BasePage {
                guest_addr: addr.raw_value(),
                crc64: CRC64.checksum(&buf),
            });
        }
    }
    found
}

/// Checks that `mem`, mapped from the memory file `path` (or filled by the page-fault handler
/// on the socket `path`), holds the base pages a Diff snapshot names (a Full snapshot's memory
/// file has nothing to check).
pub fn check_base_pages(
    mem: &GuestMemoryMmap,
    kind: &MemoryFileKind,
    path: &Path,
) -> Result<(), NotRebased> {
    let MemoryFileKind::Diff { base_pages } = kind else {
        return Ok(());
    };
    let mut buf = vec![0u8; page_size()];
    for base in base_pages {
        let holds = mem
            .read_slice(&mut buf, GuestAddress(base.guest_addr))
            .is_ok()
            && CRC64.checksum(&buf) == base.crc64;
        if !holds {
            return Err(NotRebased {
                path: path.to_path_buf(),
                addr: base.guest_addr,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::snapshot::memory::{map_memory_file, write_memory_file};

    fn bit(pages: &[usize], len: usize) -> Vec<u64> {
        let mut words = vec![0u64; len.div_ceil(64)];
        for page in pages {
            words[page / 64] |= 1 << (page % 64);
        }
        words
    }

    #[test]
    fn a_diff_holds_the_dirty_pages_only_and_knows_its_base() {
        let page = page_size();
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 * page),
            (GuestAddress(1 << 30), 8 * page),
        ])
        .unwrap();
        // Pages 2 and 3 carry the base's data; page 5 and the second region's page 1 change
        // after it, page 6 becomes zero (and must still be written, as data).
        mem.write_slice(&[0xaa; 16], GuestAddress(2 * page as u64))
            .unwrap();
        mem.write_slice(&[0xbb; 16], GuestAddress(3 * page as u64))
            .unwrap();
        let base = TempFile::new().unwrap();
        let regions = write_memory_file(&mem, false, base.as_file(), base.as_path()).unwrap();
        mem.write_slice(&[0xcc; 16], GuestAddress(5 * page as u64))
            .unwrap();
        mem.write_slice(&[0xdd; 16], GuestAddress((1 << 30) + page as u64))
            .unwrap();
        let dirty = DirtyPages::new(vec![bit(&[5, 6], 64), bit(&[1], 8)]);

        let diff = TempFile::new().unwrap();
        let (diff_regions, kind) =
            write_diff_memory_file(&mem, &dirty, diff.as_file(), diff.as_path()).unwrap();
        assert_eq!(diff_regions, regions);
        let meta = std::fs::metadata(diff.as_path()).unwrap();
        assert_eq!(meta.len(), 72 * page as u64);
        assert!(
            meta.blocks() * 512 <= 3 * page as u64,
            "{} blocks",
            meta.blocks()
        );
        let contents = std::fs::read(diff.as_path()).unwrap();
        assert_eq!(contents[5 * page], 0xcc);
        assert_eq!(contents[65 * page], 0xdd);
        assert_eq!(contents[2 * page], 0, "clean pages are holes");
        let MemoryFileKind::Diff { base_pages } = &kind else {
            panic!("{kind:?}");
        };
        let addrs: Vec<u64> = base_pages.iter().map(|p| p.guest_addr).collect();
        assert_eq!(addrs, [2 * page as u64, 3 * page as u64]);

        // The base holds them, the diff does not.
        let from_base = map_memory_file(base.as_path(), &regions).unwrap();
        check_base_pages(&from_base, &kind, base.as_path()).unwrap();
        let from_diff = map_memory_file(diff.as_path(), &regions).unwrap();
        let err = check_base_pages(&from_diff, &kind, diff.as_path()).unwrap_err();
        assert_eq!(err.addr, 2 * page as u64);
        assert!(err.to_string().contains("mote snapshot rebase"), "{err}");
        check_base_pages(&from_diff, &MemoryFileKind::Full, diff.as_path()).unwrap();
    }
}
