//! The x86_64 machine: memory map, kernel entry, boot parameters and per-vCPU state.

pub mod acpi;
pub mod cpu_template;
pub mod cpuid;
pub mod gdt;
pub mod kernel_image;
pub mod lapic;
pub mod layout;
pub mod legacy;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod snapshot;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use devices::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use devices::vmgenid::VmGenIdState;

use self::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, GUEST_PHYS_END, HIMEM_START,
    KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, MMIO_GAP_END, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_START, VMGENID_IRQ, VMGENID_START, ZERO_PAGE_START,
};
use super::MmioDeviceInfo;
use crate::config::{CpuTemplate, MsrModifier};

/// The most guest RAM, in MiB: what fits below [`GUEST_PHYS_END`] around the MMIO gap.
pub const MAX_MEM_SIZE_MIB: u64 = (GUEST_PHYS_END - (MMIO_GAP_END - MMIO_GAP_START)) >> 20;
/// The most vCPUs a guest may have (the MP table and the I/O APIC IDs are sized for this).
pub const MAX_VCPUS: u8 = 32;

/// The host's transparent huge page (a PMD's reach with 4 KiB pages): 2 MiB on x86_64, as on
/// aarch64 with a 4 KiB granule. The `Lazy` pager reads dense parts of the working set in
/// blocks of this size so that each becomes one huge page KVM maps whole.
pub const TRANSPARENT_HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Boot arguments when the user gives none: the serial console, reset through the i8042, reboot
/// one second after a panic, and no PCI bus to probe.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// `SendCtrlAltDel` is served (the i8042's keyboard): no refusal.
pub const CTRL_ALT_DEL_UNSUPPORTED: Option<&str> = None;
/// Where the PVH module list (the initrd) goes, after the memory map.
const PVH_MODLIST_START: u64 = PVH_MEMMAP_START + 0x200;
/// e820 / PVH memory types.
const E820_RAM: u32 = 1;
/// Linux boot protocol: "HdrS" magic, the 0xaa55 boot flag, and "loader type unknown".
pub(crate) const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Where a relocatable kernel wants to be aligned (16 MiB, as Firecracker tells the guest).
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// bzImage: the 64-bit entry point is 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// bzImage `xloadflags` bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;
/// The PVH start-info magic (Xen's `XEN_HVM_START_MAGIC_VALUE`).
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
pub(crate) const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const PAGE_SIZE: u64 = 0x1000;

/// How the boot CPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux's 64-bit boot protocol: long mode, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode without paging, RBX = `hvm_start_info`.
    Pvh,
}

/// Where and how the loaded kernel is entered.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry: GuestAddress,
    pub protocol: BootProtocol,
    /// First byte after the loaded kernel.
    pub kernel_end: u64,
    /// A bzImage's setup header, which the zero page must carry.
    setup_header: Option<setup_header>,
}

/// Where the initrd was put.
#[derive(Debug, Clone, Copy)]
pub struct InitrdPlacement {
    pub address: GuestAddress,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("cannot read the kernel image header: {0}")]
    ReadHeader(std::io::Error),
    #[error("not an ELF vmlinux: {0}")]
    Elf(linux_loader::loader::Error),
    #[error("not an ELF vmlinux nor a bzImage: {0}")]
    BzImage(linux_loader::loader::Error),
    #[error(transparent)]
    KernelImage(#[from] kernel_image::KernelImageError),
    #[error("the kernel image needs guest memory up to {end:#x}, more than the guest's {mem_mib} MiB of memory hold: give the guest more memory")]
    KernelNeedsMemory { end: u64, mem_mib: u64 },
    #[error("the bzImage has no 64-bit entry point")]
    BzImageNot64Bit,
    #[error("the initrd ({size} bytes) does not fit in guest memory between the kernel's end at {kernel_end:#x} and {low_ram_end:#x}")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        low_ram_end: u64,
    },
    #[error("cannot write the kernel command line: {0}")]
    Cmdline(linux_loader::loader::Error),
    #[error(
        "cannot announce the virtio-mmio device at {addr:#x} on the kernel command line: {source}"
    )]
    AnnounceDevice {
        addr: u64,
        source: linux_loader::cmdline::Error,
    },
    #[error("cannot write the boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    State(#[from] snapshot::StateError),
}

#[derive(Debug, thiserror::Error)]
pub enum ArchVcpuError {
    #[error("cannot read KVM's supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error("cannot set the vCPU's CPUID: {0}")]
    SetCpuid(kvm_ioctls::Error),
    #[error(transparent)]
    Msr(#[from] msr::MsrError),
    #[error(transparent)]
    CpuTemplate(#[from] cpu_template::CpuTemplateError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("cannot set the local APIC's LINT pins: {0}")]
    Lapic(kvm_ioctls::Error),
}

/// Guest RAM ranges for `size` bytes: below the 32-bit MMIO gap, the rest from 4 GiB.
pub fn arch_memory_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// KVM's real-mode helper pages, on a new VM (before any vCPU). Also reads KVM's list of
/// saveable MSRs, which vCPU threads (that may not open /dev/kvm) need for snapshots.
pub fn prepare_vm(kvm_fd: &Kvm, vm: &VmFd) -> Result<(), ArchError> {
    snapshot::read_msr_index_list(kvm_fd)?;
    let kvm = |what| move |source| ArchError::Kvm { what, source };
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm("set the identity-map address"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm("set the TSS address"))
}

/// The in-kernel interrupt controllers and timer. Must run before any vCPU is created, and
/// after guest memory is registered: a memory slot added within some 7 ms of the irqchip's
/// creation waited that long here (measured: 7.3 ms against 0.1 ms).
pub fn create_vm_devices(_kvm_fd: &Kvm, vm: &VmFd) -> Result<(), ArchError> {
    let kvm = |what| move |source| ArchError::Kvm { what, source };
    vm.create_irq_chip()
        .map_err(kvm("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm("create the in-kernel PIT"))
}

/// The in-kernel devices a VM keeps once its vCPUs exist: none on x86_64, whose interrupt
/// controllers came before them and are reached through the VM's fd.
pub struct VmDevices;

/// Nothing more once the vCPUs exist: x86's interrupt controllers came before them.
pub fn finish_vm_devices(
    _vm: &VmFd,
    _vcpus: &[VcpuFd],
    _template: Option<&CpuTemplate>,
) -> Result<VmDevices, ArchError> {
    Ok(VmDevices)
}

/// What KVM offers every vCPU of a booting VM: its supported CPUID, read once per boot and
/// shaped per vCPU by [`configure_vcpu`]. (A restored vCPU takes its CPUID from the snapshot.)
pub struct VcpuFeatures {
    /// With the custom CPU template's CPUID modifiers applied.
    supported_cpuid: CpuId,
    /// The custom CPU template's, for every vCPU once its boot MSRs are set.
    msr_modifiers: Vec<MsrModifier>,
}

pub fn vcpu_features(
    kvm_fd: &Kvm,
    _vm: &VmFd,
    template: Option<&CpuTemplate>,
) -> Result<VcpuFeatures, ArchVcpuError> {
    let mut supported_cpuid = kvm_fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ArchVcpuError::SupportedCpuid)?;
    let mut msr_modifiers = Vec::new();
    if let Some(template) = template {
        cpu_template::check(template)?;
        cpu_template::apply_cpuid(&mut supported_cpuid, &template.cpuid_modifiers)?;
        msr_modifiers.clone_from(&template.msr_modifiers);
    }
    Ok(VcpuFeatures {
        supported_cpuid,
        msr_modifiers,
    })
}

/// The vCPU's instruction pointer (RIP), for a report of where the guest failed.
pub fn instruction_pointer(vcpu: &VcpuFd) -> Option<u64> {
    vcpu.get_regs().ok().map(|regs| regs.rip)
}

/// Loads an ELF vmlinux or a bzImage at 1 MiB or above.
pub fn load_kernel(mem: &GuestMemoryMmap, image: &mut File) -> Result<BootEntry, ArchError> {
    let mut magic = [0u8; 4];
    image
        .read_exact(&mut magic)
        .and_then(|_| image.seek(SeekFrom::Start(0)))
        .map_err(ArchError::ReadHeader)?;
    let himem = Some(GuestAddress(HIMEM_START));
    // The loaders' own error for a kernel beyond the end of memory is "Unable to read kernel
    // image", which misleads: say what is short before they try.
    let needed = kernel_image::kernel_extent(image)?;
    image
        .seek(SeekFrom::Start(0))
        .map_err(ArchError::ReadHeader)?;
    if let Some(end) = needed {
        if end > HIMEM_START && !mem.address_in_range(GuestAddress(end - 1)) {
            let mem_mib = mem.iter().map(|region| region.len()).sum::<u64>() >> 20;
            return Err(ArchError::KernelNeedsMemory { end, mem_mib });
        }
    }
    if &magic == ELF_MAGIC {
        let loaded = Elf::load(mem, None, image, himem).map_err(ArchError::Elf)?;
        let (entry, protocol) = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(pvh_entry) => (pvh_entry, BootProtocol::Pvh),
            _ => (loaded.kernel_load, BootProtocol::Linux64),
        };
        Ok(BootEntry {
            entry,
            protocol,
            kernel_end: loaded.kernel_end,
            setup_header: None,
        })
    } else {
        let loaded = BzImage::load(mem, None, image, himem).map_err(ArchError::BzImage)?;
        let header = loaded.setup_header.ok_or(ArchError::BzImageNot64Bit)?;
        if header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(ArchError::BzImageNot64Bit);
        }
        Ok(BootEntry {
            entry: loaded.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
            protocol: BootProtocol::Linux64,
            kernel_end: loaded.kernel_end,
            setup_header: Some(header),
        })
    }
}

/// End of RAM below the MMIO gap.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .find(|region| region.start_addr().raw_value() == 0)
        .map_or(0, |region| region.len())
}

/// Where an initrd of `size` bytes goes: page-aligned at the top of low RAM, after the kernel.
pub fn initrd_placement(
    mem: &GuestMemoryMmap,
    boot: &BootEntry,
    size: u64,
) -> Result<InitrdPlacement, ArchError> {
    let low_ram_end = low_ram_end(mem);
    let too_large = || ArchError::InitrdTooLarge {
        size,
        kernel_end: boot.kernel_end,
        low_ram_end,
    };
    let address = low_ram_end.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if address < boot.kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    Ok(InitrdPlacement {
        address: GuestAddress(address),
        size,
    })
}

/// RAM ranges the guest may use, as (start, length).
fn ram_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut ranges = vec![(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            ranges.push((start, end - start));
        }
    }
    ranges
}

/// Where the VM generation ID goes in a guest's memory and which line announces a change: in
/// the BIOS area beside the ACPI tables, on the I/O APIC's last line.
pub fn vmgenid_placement(_mem: &GuestMemoryMmap) -> Result<VmGenIdState, ArchError> {
    Ok(VmGenIdState {
        addr: VMGENID_START,
        irq: VMGENID_IRQ,
    })
}

/// Writes the ACPI tables, which describe the virtio-mmio `devices`, the legacy devices and the
/// VM generation ID at `vmgenid`; the MP table; the command line; and the boot parameters of
/// `boot.protocol`. A guest told `acpi=off` ignores the ACPI tables: it gets `devices` on the
/// command line instead (`virtio_mmio.device=4K@0x…:IRQ`), and the MP table for the rest.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    boot: &BootEntry,
    mut cmdline: Cmdline,
    devices: &[MmioDeviceInfo],
    initrd: Option<InitrdPlacement>,
    vcpus: u8,
    vmgenid: &VmGenIdState,
) -> Result<(), ArchError> {
    if acpi_off(&cmdline) {
        for device in devices {
            cmdline
                .add_virtio_mmio_device(device.len, GuestAddress(device.addr), device.irq, None)
                .map_err(|source| ArchError::AnnounceDevice {
                    addr: device.addr,
                    source,
                })?;
        }
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(ArchError::Cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    mptable::setup_mptable(mem, vcpus)?;
    let rsdp = acpi::setup_acpi(mem, vcpus, devices, vmgenid)?;
    match boot.protocol {
        BootProtocol::Linux64 => write_zero_page(mem, boot, cmdline_len, initrd, rsdp),
        BootProtocol::Pvh => write_pvh_start_info(mem, initrd, rsdp),
    }
}

/// Whether the command line tells Linux to ignore ACPI.
fn acpi_off(cmdline: &Cmdline) -> bool {
    cmdline.as_cstring().is_ok_and(|text| {
        text.to_string_lossy()
            .split_whitespace()
            .any(|word| word == "acpi=off")
    })
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    boot: &BootEntry,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    rsdp: u64,
) -> Result<(), ArchError> {
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    if let Some(header) = boot.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let ranges = ram_ranges(mem);
    for (slot, (addr, size)) in params.e820_table.iter_mut().zip(&ranges) {
        slot.addr = *addr;
        slot.size = *size;
        slot.r#type = E820_RAM;
    }
    params.e820_entries = ranges.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(ArchError::BootParams)
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    rsdp: u64,
) -> Result<(), ArchError> {
    let memmap: Vec<hvm_memmap_table_entry> = ram_ranges(mem)
        .into_iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(initrd) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
        params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
        let module = hvm_modlist_entry {
            paddr: initrd.address.raw_value(),
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(ArchError::BootParams)
}

/// Everything one vCPU needs before its first KVM_RUN.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    boot: &BootEntry,
    features: &VcpuFeatures,
    index: u8,
    count: u8,
) -> Result<(), ArchVcpuError> {
    let cpuid = cpuid::cpuid_for_vcpu(&features.supported_cpuid, index, count)?;
    vcpu.set_cpuid2(&cpuid).map_err(ArchVcpuError::SetCpuid)?;
    msr::setup_msrs(vcpu)?;
    cpu_template::apply_msrs(vcpu, &features.msr_modifiers)?;
    regs::setup_regs(vcpu, boot.entry.raw_value(), boot.protocol)?;
    regs::setup_fpu(vcpu)?;
    regs::setup_sregs(mem, vcpu, boot.protocol)?;
    lapic::set_lint(vcpu).map_err(ArchVcpuError::Lapic)?;
    Ok(())
}

/// The largest command line, without its NUL.
pub const fn cmdline_capacity() -> usize {
    CMDLINE_MAX_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_have_one_region() {
        let regions = arch_memory_regions(128 << 20);
        assert_eq!(regions, vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_guests_skip_the_mmio_gap() {
        let regions = arch_memory_regions(4 << 30);
        assert_eq!(
            regions,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
    }

    #[test]
    fn ram_ranges_leave_out_the_bios_area_and_the_gap() {
        let mem = GuestMemoryMmap::from_ranges(&arch_memory_regions(64 << 20)).unwrap();
        assert_eq!(
            ram_ranges(&mem),
            vec![(0, EBDA_START), (HIMEM_START, (64 << 20) - HIMEM_START)]
        );
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_low_ram() {
        let mem = GuestMemoryMmap::from_ranges(&arch_memory_regions(64 << 20)).unwrap();
        let boot = BootEntry {
            entry: GuestAddress(HIMEM_START),
            protocol: BootProtocol::Linux64,
            kernel_end: 0x20_0000,
            setup_header: None,
        };
        let placed = initrd_placement(&mem, &boot, 0x1234).unwrap();
        assert_eq!(placed.address.raw_value(), (64 << 20) - 0x2000);
        assert!(matches!(
            initrd_placement(&mem, &boot, 63 << 20),
            Err(ArchError::InitrdTooLarge { .. })
        ));
    }
}
