//! Guest RAM: anonymous host memory in the arch's layout, checked against what the host has.

use std::fs;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch;

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

/// Maps `mib` MiB of guest RAM. Pages are allocated by the host when the guest first touches
/// them, so a guest costs what it uses; but a size the host could never back is refused.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&guest_memory_layout(mib)?)
        .map_err(|source| MemoryError::Map { mib, source })
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryBackend;

    use super::*;

    #[test]
    fn maps_the_requested_size() {
        let mem = create_guest_memory(16).unwrap();
        assert_eq!(
            mem.iter()
                .map(vm_memory::GuestMemoryRegion::len)
                .sum::<u64>(),
            16 << 20
        );
    }

    #[test]
    fn refuses_more_than_the_host_has() {
        let err = create_guest_memory(u64::MAX >> 21).unwrap_err();
        assert!(matches!(err, MemoryError::MoreThanHost { .. }), "{err}");
    }
}
