//! The guest's ACPI tables: an RSDP pointing at an XSDT, which lists a FADT (hardware-reduced
//! ACPI: no PM blocks, no SCI, no legacy PIC) and a MADT (the local APICs and the I/O APIC, as
//! the MP table also says); the FADT points at a DSDT with every device a guest must find:
//! COM1, the i8042, each virtio-mmio device (`LNRO0005`, Linux's ACPI name for virtio-mmio), the
//! VM generation ID, and the Generic Event Device (GED) whose interrupt tells the guest the ID
//! changed. Built with rust-vmm's `acpi_tables`.
//!
//! The devices must be in the DSDT: in hardware-reduced mode Linux maps no ISA IRQ by itself,
//! so a device only gets its line through the interrupt resource its ACPI description names.
//! (Hence also no `virtio_mmio.device=` on the command line, as with Firecracker, unless the
//! guest is told `acpi=off`: then the MP table and the command line describe the machine.)

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use devices::memory::GuestMemoryMmap;
use devices::vmgenid::VmGenIdState;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    ACPI_TABLES_END, ACPI_TABLES_START, APIC_START, COM1_IRQ, COM1_PORT, COM1_PORT_LEN, I8042_IRQ,
    I8042_PORT, IOAPIC_START, RSDP_START,
};
use crate::arch::MmioDeviceInfo;

/// Who made the tables, in every table's header.
const OEM_ID: [u8; 6] = *b"MOTE  ";
const OEM_REVISION: u32 = 1;
/// The FADT's hypervisor vendor identity.
const HYPERVISOR_VENDOR: [u8; 8] = *b"MOTE-KVM";
/// DSDT revision 2: integers are 64 bits.
const DSDT_REVISION: u8 = 2;
/// IA-PC boot architecture flags (ACPI 6.5, table 5.11): an 8042 is there, no VGA, no MSI, no
/// PCIe ASPM controls.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
/// The I/O APIC's ID (the MP table's is the vCPU count; ACPI guests take this one).
const IOAPIC_ID: u8 = 0;
/// `Notify` value 0x80: "the device's state changed" (for VMGenID: the ID did).
const NOTIFY_STATUS_CHANGED: u8 = 0x80;
/// The i8042's command/status port, four after its data port.
const I8042_COMMAND_PORT: u16 = I8042_PORT as u16 + 4;
/// `_CCA` 1: virtio-mmio devices' DMA is cache-coherent.
const CACHE_COHERENT: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({len} bytes) do not fit between {ACPI_TABLES_START:#x} and {ACPI_TABLES_END:#x}")]
    TooLarge { len: u64 },
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// An interrupt resource for `line`: edge-triggered, active high, exclusive (what mote's
/// irqfds give: one edge per interrupt).
fn edge_interrupt(line: u32) -> aml::Interrupt {
    aml::Interrupt::new(true, true, false, false, line)
}

/// COM1 (a 16550, `PNP0501`) and the i8042 (`PNP0303`, data and command ports) on their ISA
/// ports and lines.
fn legacy_devices(body: &mut Vec<u8>) {
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &1u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT as u16, COM1_PORT as u16, 1, COM1_PORT_LEN as u8),
                    &edge_interrupt(COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(body);
    aml::Device::new(
        "_SB_.PS2_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(I8042_PORT as u16, I8042_PORT as u16, 1, 1),
                    &aml::IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1),
                    &edge_interrupt(I8042_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// One virtio-mmio device: its register window and its line.
fn virtio_mmio_device(body: &mut Vec<u8>, index: usize, device: &MmioDeviceInfo) {
    aml::Device::new(
        format!("_SB_.V{index:03}").as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &index),
            &aml::Name::new("_CCA".into(), &CACHE_COHERENT),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(true, device.addr as u32, device.len as u32),
                    &edge_interrupt(device.irq),
                ]),
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// The VM generation ID device (Linux's `vmgenid` driver matches its compatible ID
/// "VM_Gen_Counter" and reads the ID's address from `ADDR`) and the GED, whose `_EVT` turns the
/// ID's interrupt into a `Notify` of that device.
fn vmgenid_devices(body: &mut Vec<u8>, vmgenid: &VmGenIdState) {
    let addr_low = vmgenid.addr as u32;
    let addr_high = (vmgenid.addr >> 32) as u32;
    aml::Device::new(
        "_SB_.VGEN".into(),
        vec![
            &aml::Name::new("_HID".into(), &"MOTEVGID"),
            &aml::Name::new("_CID".into(), &"VM_Gen_Counter"),
            &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &aml::Name::new(
                "ADDR".into(),
                &aml::Package::new(vec![&addr_low, &addr_high]),
            ),
        ],
    )
    .to_aml_bytes(body);
    // The line is below 256, so Linux's GED passes it to `_EVT` as it is.
    let irq_arg = vmgenid.irq as u8;
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&edge_interrupt(vmgenid.irq)]),
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![&aml::If::new(
                    &aml::Equal::new(&aml::Arg(0), &irq_arg),
                    vec![&aml::Notify::new(
                        &aml::Path::new("\\_SB_.VGEN"),
                        &NOTIFY_STATUS_CHANGED,
                    )],
                )],
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// The DSDT's AML: every device the guest must find.
fn dsdt_body(devices: &[MmioDeviceInfo], vmgenid: &VmGenIdState) -> Vec<u8> {
    let mut body = Vec::new();
    legacy_devices(&mut body);
    for (index, device) in devices.iter().enumerate() {
        virtio_mmio_device(&mut body, index, device);
    }
    vmgenid_devices(&mut body, vmgenid);
    body
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The tables for `vcpus` vCPUs, the virtio-mmio `devices` and the generation ID at `vmgenid`,
/// laid out from `ACPI_TABLES_START`: (address, bytes) for each, the RSDP first.
fn build_tables(
    vcpus: u8,
    devices: &[MmioDeviceInfo],
    vmgenid: &VmGenIdState,
) -> Vec<(u64, Vec<u8>)> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"MOTEDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&dsdt_body(devices, vmgenid));
    let dsdt = bytes_of(&dsdt);
    let dsdt_addr = ACPI_TABLES_START;

    let mut fadt = FADTBuilder::new(OEM_ID, *b"MOTEFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_8042
        | IAPC_BOOT_ARCH_VGA_NOT_PRESENT
        | IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED
        | IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS)
        .into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    let fadt = bytes_of(&fadt.finalize());
    let fadt_addr = dsdt_addr + dsdt.len() as u64;

    let mut madt = MADT::new(
        OEM_ID,
        *b"MOTEAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for index in 0..vcpus {
        // APIC IDs are the vCPU indexes (cpuid.rs gives each vCPU its index).
        madt.add_structure(ProcessorLocalApic::new(
            index,
            index,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(IOAPIC_ID, IOAPIC_START as u32, 0));
    let madt = bytes_of(&madt);
    let madt_addr = fadt_addr + fadt.len() as u64;

    let mut xsdt = XSDT::new(OEM_ID, *b"MOTEXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = madt_addr + madt.len() as u64;

    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    vec![
        (RSDP_START, rsdp),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ]
}

/// Writes the tables into guest memory; returns the RSDP's address for the boot parameters.
pub fn setup_acpi(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[MmioDeviceInfo],
    vmgenid: &VmGenIdState,
) -> Result<u64, AcpiError> {
    let tables = build_tables(vcpus, devices, vmgenid);
    let end = tables
        .iter()
        .map(|(addr, bytes)| addr + bytes.len() as u64)
        .max()
        .unwrap_or(ACPI_TABLES_START);
    if end > ACPI_TABLES_END {
        return Err(AcpiError::TooLarge {
            len: end - ACPI_TABLES_START,
        });
    }
    for (addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{VMGENID_IRQ, VMGENID_START};

    const VMGENID: VmGenIdState = VmGenIdState {
        addr: VMGENID_START,
        irq: VMGENID_IRQ,
    };

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// Reads the tables back from guest memory the way a guest does: RSDP, XSDT, then each
    /// table's signature, length and checksum.
    #[test]
    fn a_guest_finds_every_table_from_the_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let devices = [
            MmioDeviceInfo {
                addr: 0xc000_1000,
                len: 0x1000,
                irq: 5,
            },
            MmioDeviceInfo {
                addr: 0xc000_2000,
                len: 0x1000,
                irq: 6,
            },
        ];
        let rsdp_addr = setup_acpi(&mem, 2, &devices, &VMGENID).unwrap();
        let read = |addr: u64, len: usize| {
            let mut bytes = vec![0u8; len];
            mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            bytes
        };
        let table = |addr: u64| {
            let len = u32_at(&read(addr, 8), 4) as usize;
            let bytes = read(addr, len);
            assert_eq!(sum(&bytes), 0, "checksum of {:?}", &bytes[..4]);
            bytes
        };
        let rsdp = read(rsdp_addr, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt = table(u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|at| u64_at(&xsdt, at))
            .collect();
        assert_eq!(entries.len(), 2);

        let fadt = table(entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "hardware-reduced ACPI");
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]) & 2, 2, "an 8042");
        let dsdt = table(u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        let body = &dsdt[36..];
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"VGEN") && has(b"VM_Gen_Counter\0") && has(b"ACPI0013\0"));
        assert!(has(b"COM1") && has(b"PS2_"));
        // Both virtio devices, each with its window (Memory32Fixed: 0x86, length 9, read-write,
        // base, length) and its line (an extended interrupt descriptor: 0x89, length 6, flags
        // edge|consumer, one line).
        for (name, base, line) in [(b"V000", 0xc000_1000u32, 5u8), (b"V001", 0xc000_2000, 6)] {
            assert!(has(name), "{:?}", std::str::from_utf8(name));
            let mut window = vec![0x86, 9, 0, 1];
            window.extend_from_slice(&base.to_le_bytes());
            window.extend_from_slice(&0x1000u32.to_le_bytes());
            assert!(has(&window), "window of {base:#x}");
            assert!(has(&[0x89, 6, 0, 3, 1, line, 0, 0, 0]), "line {line}");
        }
        assert_eq!(body.windows(9).filter(|w| *w == b"LNRO0005\0").count(), 2);
        assert!(has(b"ADDR"));
        // The ID's address as a word (0xe0040 > 0xffff: a DWordPrefix constant).
        assert!(has(&[0x0c, 0x40, 0x00, 0x0e, 0x00]), "ADDR's low half");

        let madt = table(entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(u32_at(&madt, 36), APIC_START as u32);
        // Two local APICs (type 0, IDs 0 and 1), then the I/O APIC (type 1).
        assert_eq!(&madt[44..46], &[0, 8]);
        assert_eq!(madt[47], 0);
        assert_eq!(&madt[52..54], &[0, 8]);
        assert_eq!(madt[55], 1);
        assert_eq!(&madt[60..62], &[1, 12]);
        assert_eq!(u32_at(&madt, 64), IOAPIC_START as u32);
    }

    #[test]
    fn tables_for_the_most_vcpus_and_devices_fit() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let devices: Vec<MmioDeviceInfo> = (0..18)
            .map(|slot| MmioDeviceInfo {
                addr: 0xc000_1000 + slot * 0x1000,
                len: 0x1000,
                irq: 5 + slot as u32,
            })
            .collect();
        setup_acpi(&mem, crate::arch::x86_64::MAX_VCPUS, &devices, &VMGENID).unwrap();
    }
}
