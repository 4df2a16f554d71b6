//! What the monitor handed over in the Linux zero page: the command line and the e820 map.

use crate::port::read_phys;

const CMD_LINE_PTR: u64 = 0x228;
const E820_ENTRIES: u64 = 0x1e8;
const E820_TABLE: u64 = 0x2d0;
const E820_ENTRY_SIZE: u64 = 20;
const E820_RAM: u32 = 1;
pub const CMDLINE_MAX: usize = 2048;

pub struct ZeroPage(pub u64);

pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl ZeroPage {
    /// The NUL-terminated command line, as bytes.
    pub fn cmdline(&self) -> &'static [u8] {
        let ptr = u64::from(read_phys::<u32>(self.0 + CMD_LINE_PTR));
        if ptr == 0 {
            return &[];
        }
        let mut len = 0;
        while len < CMDLINE_MAX && read_phys::<u8>(ptr + len as u64) != 0 {
            len += 1;
        }
        // SAFETY: the monitor wrote `len` bytes of command line at `ptr`, identity-mapped and
        // never written again while the probe runs.
        unsafe { core::slice::from_raw_parts(ptr as *const u8, len) }
    }

    pub fn e820(&self) -> impl Iterator<Item = E820Entry> + '_ {
        let count = u64::from(read_phys::<u8>(self.0 + E820_ENTRIES));
        (0..count).map(move |i| {
            let entry = self.0 + E820_TABLE + i * E820_ENTRY_SIZE;
            E820Entry {
                addr: read_phys(entry),
                size: read_phys(entry + 8),
                kind: read_phys(entry + 16),
            }
        })
    }

    /// (RAM in KiB, end of the highest RAM range).
    pub fn ram(&self) -> (u64, u64) {
        self.e820()
            .filter(|e| e.kind == E820_RAM)
            .fold((0, 0), |(kib, top), e| {
                (kib + e.size / 1024, top.max(e.addr + e.size))
            })
    }
}
