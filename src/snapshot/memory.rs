//! The memory file: guest RAM regions one after another, written once with holes where pages
//! are zero; and its restore, a MAP_PRIVATE mapping of it per region, so that restoring costs
//! the same for any size and clones share the pages they have not written.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::host_file::{self, FileKind, HostFileError};
use devices::memory::{GuestMemoryMmap, GuestRegionMmap};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const PAGE_SIZE: usize = 4096;
/// /proc/self/pagemap: one u64 per page; bit 63 "present", bit 62 "swapped".
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write the memory file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Open(#[from] HostFileError),
    #[error("cannot read the size of the memory file {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the memory file {path} has {len} bytes; the snapshot's guest memory is {expected}")]
    WrongSize {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("cannot map the memory file {path}: {reason}")]
    Map { path: PathBuf, reason: String },
}

/// One guest RAM region; its bytes follow the previous region's in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub size: u64,
}

/// Which pages of an anonymous mapping were ever touched (present or swapped out), from
/// /proc/self/pagemap; None when that cannot be read (then every page is looked at).
fn touched_pages(start: usize, pages: usize) -> Option<Vec<bool>> {
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let mut raw = vec![0u8; pages * 8];
    let offset = (start / PAGE_SIZE * 8) as u64;
    pagemap.read_exact_at(&mut raw, offset).ok()?;
    Some(
        raw.chunks_exact(8)
            .map(|entry| {
                let bits = u64::from_le_bytes(entry.try_into().unwrap_or_default());
                bits & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0
            })
            .collect(),
    )
}

/// Writes every region of `mem` into `file`, new and empty, that will be the memory file
/// `path`, leaving holes for zero pages; returns the regions in file order. With `lazy`
/// (a page-fault handler fills `mem`) every page is read, through the handler.
///
/// The vCPUs must be paused and no device may be serving its queues (the caller runs on the
/// event loop's thread, which is where devices do).
pub fn write_memory_file(
    mem: &GuestMemoryMmap,
    lazy: bool,
    file: &File,
    path: &Path,
) -> Result<Vec<MemoryRegionState>, MemoryFileError> {
    let write_err = |source| MemoryFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let size = region.len() as usize;
        let host = region.as_ptr();
        // SAFETY: `host..host + size` is the region's live mapping, kept by `mem` for the whole
        // call; nothing writes it meanwhile (paused vCPUs, devices idle on this very thread).
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, size) };
        // Untouched pages of anonymous memory are zero: skip them without faulting them in.
        // A file-backed region (a restored VM) has pages that are not resident yet are not
        // zero, nor has memory a page-fault handler fills.
        let touched = match region.file_offset() {
            None if !lazy => touched_pages(host as usize, size / PAGE_SIZE),
            _ => None,
        };
        let pages = size / PAGE_SIZE;
        let is_data = |p: usize| {
            touched.as_ref().is_none_or(|t| t[p])
                && bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                    .iter()
                    .any(|b| *b != 0)
        };
        let mut page = 0;
        while page < pages {
            if !is_data(page) {
                page += 1;
                continue;
            }
            // A run of data pages goes out in one write.
            let first = page;
            while page < pages && is_data(page) {
                page += 1;
            }
            let run = &bytes[first * PAGE_SIZE..page * PAGE_SIZE];
            file.write_all_at(run, file_offset + (first * PAGE_SIZE) as u64)
                .map_err(write_err)?;
        }
        regions.push(MemoryRegionState {
            guest_addr: region.start_addr().raw_value(),
            size: size as u64,
        });
        file_offset += size as u64;
    }
    // The holes at the end count too.
    file.set_len(file_offset).map_err(write_err)?;
    Ok(regions)
}

/// Opens the memory file `path`, checking it is a regular file exactly as long as `regions`.
pub fn open_memory_file(
    path: &Path,
    regions: &[MemoryRegionState],
) -> Result<File, MemoryFileError> {
    let file = host_file::open("the memory file", path, FileKind::Regular, false)?;
    let len = file
        .metadata()
        .map_err(|source| MemoryFileError::Size {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let expected: u64 = regions.iter().map(|r| r.size).sum();
    if len != expected {
        return Err(MemoryFileError::WrongSize {
            path: path.to_path_buf(),
            len,
            expected,
        });
    }
    Ok(file)
}

/// Maps the memory file privately, region by region: the guest reads the file's pages through
/// the page cache (shared by every restore of it) and its writes go to private copies.
pub fn map_memory_file(
    path: &Path,
    regions: &[MemoryRegionState],
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let file = open_memory_file(path, regions)?;
    let map_err = |reason: String| MemoryFileError::Map {
        path: path.to_path_buf(),
        reason,
    };
    let mut mapped = Vec::with_capacity(regions.len());
    let mut offset = 0u64;
    for region in regions {
        let size = usize::try_from(region.size).map_err(|err| map_err(err.to_string()))?;
        let fd = file.try_clone().map_err(|err| map_err(err.to_string()))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|err| map_err(err.to_string()))?;
        let guest = GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr))
            .ok_or_else(|| map_err(format!("region at {:#x} overflows", region.guest_addr)))?;
        mapped.push(guest);
        offset += region.size;
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|err| map_err(err.to_string()))
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    #[test]
    fn memory_round_trips_through_the_file_with_holes() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 * PAGE_SIZE),
            (GuestAddress(0x10_0000), 16 * PAGE_SIZE),
        ])
        .unwrap();
        mem.write_obj(0xdead_beef_u64, GuestAddress(5 * 4096 + 8))
            .unwrap();
        mem.write_obj(0x1234_u32, GuestAddress(0x10_0000 + 15 * 4096))
            .unwrap();
        let file = TempFile::new().unwrap();
        let regions = write_memory_file(&mem, false, file.as_file(), file.as_path()).unwrap();
        assert_eq!(regions.len(), 2);
        let meta = std::fs::metadata(file.as_path()).unwrap();
        assert_eq!(meta.len(), 80 * PAGE_SIZE as u64);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 16 * PAGE_SIZE as u64,
            "zero pages are holes"
        );

        let restored = map_memory_file(file.as_path(), &regions).unwrap();
        let value: u64 = restored.read_obj(GuestAddress(5 * 4096 + 8)).unwrap();
        assert_eq!(value, 0xdead_beef);
        let value: u32 = restored
            .read_obj(GuestAddress(0x10_0000 + 15 * 4096))
            .unwrap();
        assert_eq!(value, 0x1234);
        // Writes stay private: the file keeps the snapshot.
        restored
            .write_obj(7u64, GuestAddress(5 * 4096 + 8))
            .unwrap();
        let again = map_memory_file(file.as_path(), &regions).unwrap();
        let value: u64 = again.read_obj(GuestAddress(5 * 4096 + 8)).unwrap();
        assert_eq!(value, 0xdead_beef);
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_is_refused() {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(4096).unwrap();
        let regions = [MemoryRegionState {
            guest_addr: 0,
            size: 8192,
        }];
        let err = map_memory_file(file.as_path(), &regions).unwrap_err();
        assert!(
            matches!(err, MemoryFileError::WrongSize { len: 4096, .. }),
            "{err}"
        );
    }
}
