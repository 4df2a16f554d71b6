//! Known contents for chosen pages (`poke`, `peek`): each 8-byte word a function of a seed and
//! its own address, so that any page of a range can be checked on its own, wherever a test
//! found it (a snapshot's memory file, a restored guest).

use crate::port::{read_phys, write_phys};

const PAGE: u64 = 4096;

/// The word at `addr` for `seed` (tests/diff_snapshot.rs has the same function); never zero,
/// so a page of it is never a hole.
pub fn word(seed: u64, addr: u64) -> u64 {
    (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ addr).wrapping_mul(0xff51_afd7_ed55_8ccd) | 1
}

/// Fills `pages` pages from `at`, one every `stride` pages, with the seed's pattern.
pub fn poke(at: u64, pages: u64, seed: u64, stride: u64) {
    for page in 0..pages {
        let start = at + page * stride * PAGE;
        for addr in (start..start + PAGE).step_by(8) {
            write_phys(addr, word(seed, addr));
        }
    }
}

/// The first address from `at` on (`pages` pages) that does not hold the seed's pattern.
pub fn peek(at: u64, pages: u64, seed: u64) -> Option<u64> {
    (at..at + pages * PAGE)
        .step_by(8)
        .find(|addr| read_phys::<u64>(*addr) != word(seed, *addr))
}

/// How many of `pages` pages from `at` hold a word that is not zero, and the first such word's
/// address.
pub fn nonzero(at: u64, pages: u64) -> (u64, Option<u64>) {
    let mut count = 0;
    let mut first = None;
    for page in 0..pages {
        let start = at + page * PAGE;
        if let Some(addr) = (start..start + PAGE)
            .step_by(8)
            .find(|addr| read_phys::<u64>(*addr) != 0)
        {
            count += 1;
            first = first.or(Some(addr));
        }
    }
    (count, first)
}
