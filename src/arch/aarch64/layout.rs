//! The aarch64 guest's physical memory map: every address the monitor gives the guest is named
//! here. Devices live below 1 GiB and from 1 GiB, RAM from 2 GiB, as on Firecracker's and
//! QEMU's `virt` machines, so that a kernel built for those finds nothing unexpected.

/// The GICv3 distributor (64 KiB), where QEMU's `virt` machine has it.
pub const GIC_DIST_START: u64 = 0x0800_0000;
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// The redistributors: one 128 KiB pair of frames (RD and SGI) per vCPU, contiguous.
pub const GIC_REDIST_START: u64 = 0x080a_0000;
pub const GIC_REDIST_SIZE_PER_VCPU: u64 = 0x2_0000;
/// The console's 16550-compatible UART on MMIO (one byte per register).
pub const SERIAL_START: u64 = 0x0900_0000;
pub const SERIAL_SIZE: u64 = 0x1000;
/// The PL031 real-time clock.
pub const RTC_START: u64 = 0x0901_0000;
pub const RTC_SIZE: u64 = 0x1000;
/// Firecracker's boot-timer device: the guest writes 123 here when it has booted.
pub const BOOT_TIMER_START: u64 = 0x4000_0000;
/// Size of one MMIO device slot.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// First virtio-mmio device slot, after the boot timer.
pub const VIRTIO_MMIO_START: u64 = BOOT_TIMER_START + MMIO_SLOT_SIZE;
/// Guest RAM starts here (the arm64 boot protocol has no fixed address; 2 GiB is the custom).
pub const DRAM_START: u64 = 0x8000_0000;
/// The end of the guest-physical address space mote gives a guest: 40 bits, KVM's default IPA
/// size, which every arm64 host with KVM offers.
pub const GUEST_PHYS_END: u64 = 1 << 40;
/// The device tree goes at the top of RAM, in a 2 MiB block of its own (the arm64 boot
/// protocol: at most 2 MiB, 8-byte aligned, not sharing a 2 MiB block with anything mapped
/// otherwise).
pub const FDT_MAX_SIZE: u64 = 0x20_0000;
/// Largest command line the guest accepts, NUL included (arm64's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Interrupt numbers here are GIC SPI numbers (INTID - 32): what KVM's irqfd routing and the
/// device tree's `interrupts` both use.
/// The UART's line.
pub const SERIAL_IRQ: u32 = 0;
/// The RTC's line.
pub const RTC_IRQ: u32 = 1;
/// First line handed to virtio-mmio devices.
pub const IRQ_BASE: u32 = 2;
/// The VM generation ID's line: the last SPI the vGIC is created with (`GIC_NR_IRQS` in all,
/// the 32 private ones included), kept from virtio devices.
pub const VMGENID_IRQ: u32 = GIC_NR_IRQS - 32 - 1;
/// Last line handed to virtio-mmio devices.
pub const IRQ_MAX: u32 = VMGENID_IRQ - 1;
/// The VM generation ID's page: the last of the device tree's 2 MiB block at the top of RAM
/// (the tree itself is far smaller), reserved in the tree's memory reservation block so that
/// the guest keeps its hands off.
pub const VMGENID_PAGE_SIZE: u64 = 0x1000;
/// Interrupt lines the vGIC is given: 32 private (SGIs and PPIs) and 96 shared.
pub const GIC_NR_IRQS: u32 = 128;
