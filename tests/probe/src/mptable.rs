//! Counts the processors of the Intel MultiProcessor table, as a guest without ACPI does.

use crate::port::read_phys;

const SEARCH_RANGES: [(u64, u64); 2] = [(0x9fc00, 0xa0000), (0xf0000, 0x100000)];
const ENTRY_PROCESSOR: u8 = 0;
const CPU_ENABLED: u8 = 1;

fn find_floating_pointer() -> Option<u64> {
    SEARCH_RANGES.iter().find_map(|&(start, end)| {
        (start..end)
            .step_by(16)
            .find(|&addr| read_phys::<[u8; 4]>(addr) == *b"_MP_")
    })
}

/// Enabled processors, or None without an MP table.
pub fn enabled_processors() -> Option<u32> {
    let mpf = find_floating_pointer()?;
    let table = u64::from(read_phys::<u32>(mpf + 4));
    if read_phys::<[u8; 4]>(table) != *b"PCMP" {
        return None;
    }
    let entry_count = read_phys::<u16>(table + 34);
    let mut entry = table + 44;
    let mut processors = 0;
    for _ in 0..entry_count {
        let kind = read_phys::<u8>(entry);
        if kind == ENTRY_PROCESSOR {
            if read_phys::<u8>(entry + 3) & CPU_ENABLED != 0 {
                processors += 1;
            }
            entry += 20;
        } else {
            entry += 8;
        }
    }
    Some(processors)
}
