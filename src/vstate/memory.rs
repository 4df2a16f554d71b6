//! Guest RAM: anonymous host memory in the arch's layout, checked against what the host has.

use std::fs;

use devices::memory::{GuestMemoryMmap, GuestRegionMmap};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::GuestAddress;

use crate::arch;
use crate::config::HugePages;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest memory of {wanted_mib} MiB is more than this host's {host_mib} MiB of RAM and swap"
    )]
    MoreThanHost { wanted_mib: u64, host_mib: u64 },
    #[error("guest memory of {mib} MiB is more than a guest can address")]
    TooLarge { mib: u64 },
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("huge_pages 2M: the guest's {mib} MiB need {needed} huge pages of 2 MiB, and this host has {available} free in its pool; reserve more (e.g. echo {needed} > /proc/sys/vm/nr_hugepages, as root)")]
    HugePagesShort {
        mib: u64,
        needed: u64,
        available: u64,
    },
    #[error("huge_pages 2M: cannot map {mib} MiB of guest memory in 2 MiB pages: {source} (is the host's pool, /proc/sys/vm/nr_hugepages, large enough?)")]
    HugePagesMap {
        mib: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// The host's 2 MiB huge pages that are free and not promised to a mapping already.
fn available_huge_pages() -> Option<u64> {
    let read = |name: &str| -> Option<u64> {
        fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("free_hugepages")?.saturating_sub(read("resv_hugepages")?))
}

/// RAM plus swap of the host, in MiB, from /proc/meminfo (None when it cannot be read).
fn host_memory_mib() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|line| line.strip_prefix(key))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((kib("MemTotal:")? + kib("SwapTotal:").unwrap_or(0)) / 1024)
}

/// The guest RAM regions of `mib` MiB in the arch's layout, once the size is checked as for
/// any guest: a size the host could never back is refused (a boot and a restore alike).
pub fn guest_memory_layout(mib: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    if let Some(host_mib) = host_memory_mib() {
        if mib > host_mib {
            return Err(MemoryError::MoreThanHost {
                wanted_mib: mib,
                host_mib,
            });
        }
    }
    let bytes = mib
        .checked_mul(1 << 20)
        .ok_or(MemoryError::TooLarge { mib })?;
    Ok(arch::arch_memory_regions(bytes))
}

/// Maps `mib` MiB of guest RAM in pages of the kind `huge_pages` names. Pages are allocated by
/// the host when the guest first touches them, so a guest costs what it uses; but a size the
/// host could never back is refused.
pub fn create_guest_memory(
    mib: u64,
    huge_pages: HugePages,
) -> Result<GuestMemoryMmap, MemoryError> {
    let layout = guest_memory_layout(mib)?;
    match huge_pages {
        HugePages::None => {
            GuestMemoryMmap::from_ranges(&layout).map_err(|source| MemoryError::Map { mib, source })
        }
        HugePages::Hugetlbfs2M => hugetlb_memory(mib, &layout),
    }
}

/// Guest RAM in 2 MiB pages of the host's hugetlbfs pool. Unlike Firecracker's mapping, this
/// one is not MAP_NORESERVE: the kernel sets the pages aside when it is made, so a pool that
/// cannot back the whole guest fails here, with a message, instead of with a SIGBUS when the
/// guest touches a page the pool no longer has. The pages themselves are still taken when
/// first touched.
fn hugetlb_memory(
    mib: u64,
    layout: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let needed = (mib << 20) / HugePages::Hugetlbfs2M.page_size();
    if let Some(available) = available_huge_pages() {
        if available < needed {
            return Err(MemoryError::HugePagesShort {
                mib,
                needed,
                available,
            });
        }
    }
    let regions = layout
        .iter()
        .map(|&(addr, size)| {
            // The dirty bitmap counts 4 KiB pages whatever backs them (KVM's log does too).
            let mapping = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(
                    libc::MAP_PRIVATE
                        | libc::MAP_ANONYMOUS
                        | libc::MAP_HUGETLB
                        | libc::MAP_HUGE_2MB,
                )
                .with_hugetlbfs(true)
                .build()
                .map_err(|source| MemoryError::HugePagesMap { mib, source })?;
            // The layout's regions neither overlap nor wrap: this is a start-up invariant.
            Ok(GuestRegionMmap::new(mapping, addr)
                .expect("a guest RAM region fits the address space"))
        })
        .collect::<Result<Vec<_>, MemoryError>>()?;
    Ok(GuestMemoryMmap::from_regions(regions).expect("the arch's RAM regions do not overlap"))
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryBackend;

    use super::*;

    #[test]
    fn maps_the_requested_size() {
        let mem = create_guest_memory(16, HugePages::None).unwrap();
        assert_eq!(
            mem.iter()
                .map(vm_memory::GuestMemoryRegion::len)
                .sum::<u64>(),
            16 << 20
        );
    }

    #[test]
    fn refuses_more_than_the_host_has() {
        let err = create_guest_memory(u64::MAX >> 21, HugePages::None).unwrap_err();
        assert!(matches!(err, MemoryError::MoreThanHost { .. }), "{err}");
    }
}
