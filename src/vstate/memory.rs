//! Guest RAM: anonymous host memory in the arch's layout, checked against what the host has.

use std::fs;

use vm_memory::GuestMemoryMmap;

use crate::arch;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest memory of {wanted_mib} MiB is more than this host's {host_mib} MiB of RAM and swap"
    )]
    MoreThanHost { wanted_mib: u64, host_mib: u64 },
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

/// Maps `mib` MiB of guest RAM. Pages are allocated by the host when the guest first touches
/// them, so a guest costs what it uses; but a size the host could never back is refused.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if let Some(host_mib) = host_memory_mib() {
        if mib > host_mib {
            return Err(MemoryError::MoreThanHost {
                wanted_mib: mib,
                host_mib,
            });
        }
    }
    GuestMemoryMmap::from_ranges(&arch::arch_memory_regions(mib << 20))
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
