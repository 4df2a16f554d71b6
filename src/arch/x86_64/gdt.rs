//! Segment descriptors for the boot CPU: the GDT the monitor writes into guest memory and the
//! matching segment registers KVM needs (a real CPU would load them from the GDT itself).

use kvm_bindings::kvm_segment;

/// Access flags of a long-mode code segment (present, ring 0, execute/read, L=1, G=1).
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Access flags of a 32-bit code segment for the PVH entry (D=1, G=1).
pub const CODE32_FLAGS: u16 = 0xc09b;
/// Access flags of a flat read/write data segment.
pub const DATA_FLAGS: u16 = 0xc093;
/// Access flags of a busy 64-bit TSS.
pub const TSS_FLAGS: u16 = 0x808b;

/// Packs a segment descriptor the way the CPU reads it from the GDT.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    // With the granularity bit the limit counts 4 KiB pages.
    if granularity(entry) == 1 {
        (limit << 12) | 0xfff
    } else {
        limit
    }
}

fn granularity(entry: u64) -> u8 {
    ((entry >> 55) & 1) as u8
}

/// The segment register contents for GDT entry number `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity(entry),
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment_round_trips() {
        let seg = kvm_segment_from_gdt(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 1);
        assert_eq!(seg.selector, 8);
        assert_eq!(
            (seg.l, seg.db, seg.g, seg.dpl, seg.s, seg.present),
            (1, 0, 1, 0, 1, 1)
        );
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.base, 0);
    }

    #[test]
    fn base_and_small_limit_are_kept() {
        let seg = kvm_segment_from_gdt(gdt_entry(0x008b, 0x1234_5678, 0x67), 3);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0x67);
        assert_eq!(seg.g, 0);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
