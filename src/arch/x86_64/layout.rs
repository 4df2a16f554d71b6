//! The x86_64 guest's physical memory map: every address the monitor writes for the guest is
//! named here, with what the guest expects at it. Firecracker-compatible where a guest can tell.

/// Global descriptor table used for the boot CPU's first instructions.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty interrupt descriptor table (the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux's `struct boot_params`, the "zero page"; RSI points here on a 64-bit entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PVH `hvm_start_info`; RBX points here on a PVH entry.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory-map table, just after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Initial stack pointer of the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level-4 table of the boot page tables.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot page tables.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot page tables: 512 2 MiB entries identity-map the first GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the guest accepts, NUL included (Linux's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area, where the MP table lives; reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap below 4 GiB (no RAM between here and 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap; RAM beyond 3 GiB continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The end of the guest-physical address space mote gives a guest (46 bits, what x86_64 hosts
/// with the fewest physical address bits KVM runs on offer); RAM never reaches beyond.
pub const GUEST_PHYS_END: u64 = 1 << 46;
/// Firecracker's boot-timer device: the guest writes 123 here when it has booted.
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
/// Size of one MMIO device slot.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// First virtio-mmio device slot, after the boot timer.
pub const VIRTIO_MMIO_START: u64 = BOOT_TIMER_START + MMIO_SLOT_SIZE;
/// Local APIC registers, as the MP table announces them.
pub const APIC_START: u64 = 0xfee0_0000;
/// I/O APIC registers, as the MP table announces them.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// KVM's real-mode TSS (three pages), out of the guest's RAM, just below the BIOS area.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for real mode, the page before the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// First IRQ line handed to virtio-mmio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
pub const IRQ_BASE: u32 = 5;
/// Last line the I/O APIC has.
pub const IOAPIC_LAST_PIN: u32 = 23;
/// The VM generation ID's interrupt line: the I/O APIC's last, kept from virtio devices.
pub const VMGENID_IRQ: u32 = IOAPIC_LAST_PIN;
/// Last IRQ line handed to virtio-mmio devices.
pub const IRQ_MAX: u32 = VMGENID_IRQ - 1;
/// ACPI's root pointer (RSDP), in the BIOS area where Linux searches for it (0xe0000-0xfffff,
/// on 16-byte boundaries) when neither the zero page nor the PVH start info names it (both
/// do). The area is not RAM in the e820 map, so the guest leaves all of it alone.
pub const RSDP_START: u64 = 0xe_0000;
/// The VM generation ID's 16 bytes, after the 36-byte RSDP.
pub const VMGENID_START: u64 = 0xe_0040;
/// The ACPI tables (XSDT, FADT, MADT, DSDT), one after another, up to `ACPI_TABLES_END`.
pub const ACPI_TABLES_START: u64 = 0xe_1000;
pub const ACPI_TABLES_END: u64 = 0xf_0000;
/// COM1's ports and IRQ line.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;
/// The i8042's ports (0x60 data, 0x64 command) as one range.
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
/// The i8042's keyboard IRQ line (the guest learns of keystrokes, e.g. Ctrl-Alt-Del).
pub const I8042_IRQ: u32 = 1;
