//! The Intel MultiProcessor table (MP spec 1.4) in the EBDA: how a guest without ACPI learns
//! its processors, its I/O APIC and how the ISA IRQs are wired.

use devices::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_START, IOAPIC_LAST_PIN, IOAPIC_START};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MP_SPEC_REVISION: u8 = 4;
const MPC_OEM: &[u8; 8] = b"MOTE    ";
const MPC_PRODUCT_ID: &[u8; 12] = b"000000000000";
const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 in the processor signature.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURE_FPU: u32 = 1;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
/// Room the MP table may take: from the EBDA start to the 640 KiB line.
const MAX_TABLE_SIZE: usize = (0xa0000 - EBDA_START) as usize;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("an MP table for {0} vCPUs does not fit in the EBDA")]
    TooLarge(u8),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, byte| sum.wrapping_add(*byte))
        .wrapping_neg()
}

/// Serialises the floating pointer and the configuration table for `vcpus` processors.
fn build(vcpus: u8) -> Result<Vec<u8>, MptableError> {
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for apic_id in 0..vcpus {
        let flags = CPU_ENABLED | if apic_id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, apic_id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entry_count += 1;
    for irq in 0..=IOAPIC_LAST_PIN as u8 {
        // Type, interrupt type, flags (u16, bus default), source bus and IRQ, I/O APIC and pin.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        entry_count += 1;
    }
    // LINT0 of every local APIC takes the PIC's ExtINT, LINT1 takes NMIs.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0]);
    entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0]);
    entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, 1]);
    entry_count += 2;

    let table_len = MPC_HEADER_SIZE + entries.len();
    if MPF_SIZE + table_len > MAX_TABLE_SIZE {
        return Err(MptableError::TooLarge(vcpus));
    }
    let table_addr = EBDA_START as u32 + MPF_SIZE as u32;

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    // Length in 16-byte units, revision, checksum, then five feature bytes (0: no default config).
    mpf.extend_from_slice(&[1, MP_SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);

    let mut mpc = Vec::with_capacity(table_len);
    mpc.extend_from_slice(MPC_SIGNATURE);
    mpc.extend_from_slice(&(table_len as u16).to_le_bytes());
    mpc.extend_from_slice(&[MP_SPEC_REVISION, 0]);
    mpc.extend_from_slice(MPC_OEM);
    mpc.extend_from_slice(MPC_PRODUCT_ID);
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&entry_count.to_le_bytes());
    mpc.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    mpc.extend_from_slice(&[0; 4]); // extended table length and checksum, reserved
    mpc.extend_from_slice(&entries);
    mpc[7] = checksum(&mpc);

    mpf.extend_from_slice(&mpc);
    Ok(mpf)
}

/// Writes the MP table for `vcpus` processors at the start of the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let table = build(vcpus)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_valid_and_processors_counted() {
        let table = build(4).unwrap();
        assert_eq!(&table[..4], MPF_SIGNATURE);
        assert_eq!(sum(&table[..MPF_SIZE]), 0);
        let mpc = &table[MPF_SIZE..];
        assert_eq!(&mpc[..4], MPC_SIGNATURE);
        let len = u16::from_le_bytes([mpc[4], mpc[5]]) as usize;
        assert_eq!(len, mpc.len());
        assert_eq!(sum(mpc), 0);
        let processors = mpc[MPC_HEADER_SIZE..]
            .chunks(20)
            .take_while(|e| e[0] == ENTRY_PROCESSOR)
            .filter(|e| e[3] & CPU_ENABLED != 0)
            .count();
        assert_eq!(processors, 4);
    }

    #[test]
    fn the_largest_table_fits_in_the_ebda() {
        assert!(build(32).unwrap().len() <= MAX_TABLE_SIZE);
    }
}
