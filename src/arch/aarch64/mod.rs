//! The aarch64 machine: memory from 2 GiB, an arm64 `Image` entered with X0 pointing at a
//! device tree, vCPUs with PSCI 0.2, a vGICv3, a 16550 UART and a PL031 RTC on MMIO.

pub mod cpu_template;
pub mod fdt;
pub mod gic;
pub mod layout;
pub mod legacy;
pub mod regs;
pub mod snapshot;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use devices::memory::GuestMemoryMmap;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{KernelLoader, PE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use self::gic::{Gic, GicError};
use devices::vmgenid::VmGenIdState;

use self::layout::{
    CMDLINE_MAX_SIZE, DRAM_START, FDT_MAX_SIZE, GUEST_PHYS_END, VMGENID_IRQ, VMGENID_PAGE_SIZE,
};
use self::regs::RegsError;
use super::MmioDeviceInfo;
use crate::config::{CpuTemplate, RegModifier};

/// The most guest RAM, in MiB: what fits between 2 GiB and the end of a 40-bit address space.
pub const MAX_MEM_SIZE_MIB: u64 = (GUEST_PHYS_END - DRAM_START) >> 20;
/// The most vCPUs a guest may have (the redistributor region and the device tree are sized
/// for this; Firecracker's limit too).
pub const MAX_VCPUS: u8 = 32;

/// The host's transparent huge page (a PMD's reach): 2 MiB with the 4 KiB granule mote's host
/// pages are (the `Lazy` pager serves 4 KiB pages), as on x86_64; a 16 or 64 KiB granule kernel
/// would have 32 or 512 MiB. The `Lazy` pager reads dense parts of the working set in blocks of
/// this size so that each becomes one huge page KVM maps whole.
pub const TRANSPARENT_HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Boot arguments when the user gives none: the UART as the console, reboot one second after
/// a panic, and no PCI bus to probe. (`reboot=k` of x86_64 has no meaning here: PSCI resets.)
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 panic=1 pci=off";
/// Firecracker's answer to `SendCtrlAltDel` on aarch64, word for word (clients match it).
pub const CTRL_ALT_DEL_UNSUPPORTED: Option<&str> =
    Some("SendCtrlAltDel does not supported on aarch64.");
/// The arm64 Image header's magic, "ARM\x64", at byte 0x38.
const IMAGE_MAGIC: u32 = 0x644d_5241;
const IMAGE_MAGIC_OFFSET: usize = 0x38;
/// The header's `image_size` (the kernel's whole footprint, BSS included) at byte 16.
const IMAGE_SIZE_OFFSET: usize = 16;
const IMAGE_HEADER_LEN: usize = 64;
const PAGE_SIZE: u64 = 0x1000;
/// The device tree lives in its own 2 MiB block.
const FDT_ALIGN: u64 = 0x20_0000;

/// Where the loaded kernel is entered.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry: GuestAddress,
    /// First byte after the kernel's footprint in memory (its BSS included).
    pub kernel_end: u64,
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
    #[error("not an arm64 Image: there is no \"ARM\\x64\" magic at byte 0x38 (mote on aarch64 boots the uncompressed arch/arm64/boot/Image, not a vmlinux ELF, a bzImage or a compressed Image.gz)")]
    NotAnImage,
    #[error("cannot load the arm64 Image: {0}")]
    Load(linux_loader::loader::Error),
    #[error("the kernel image needs guest memory up to {end:#x}, more than the guest's {mem_mib} MiB of memory hold: give the guest more memory")]
    KernelNeedsMemory { end: u64, mem_mib: u64 },
    #[error("the initrd ({size} bytes) does not fit in guest memory between the kernel's end at {kernel_end:#x} and the device tree at {fdt:#x}")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        fdt: u64,
    },
    #[error("guest memory ends before there is room for the device tree after the kernel")]
    NoRoomForFdt,
    #[error(transparent)]
    Fdt(#[from] fdt::FdtError),
    #[error(
        "the device tree is {len} bytes, more than the {} of its block left beside the VM generation ID", FDT_MAX_SIZE - VMGENID_PAGE_SIZE
    )]
    FdtTooLarge { len: usize },
    #[error("cannot write the device tree into guest memory: {0}")]
    WriteFdt(vm_memory::GuestMemoryError),
    #[error(transparent)]
    Regs(#[from] RegsError),
    #[error(transparent)]
    Gic(#[from] GicError),
    #[error(transparent)]
    State(#[from] snapshot::StateError),
}

#[derive(Debug, thiserror::Error)]
pub enum ArchVcpuError {
    #[error(transparent)]
    Regs(#[from] RegsError),
    #[error(transparent)]
    CpuTemplate(#[from] cpu_template::CpuTemplateError),
    #[error("cannot find the device tree's place in guest memory")]
    NoRoomForFdt,
}

/// Guest RAM: one range from 2 GiB.
pub fn arch_memory_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    vec![(GuestAddress(DRAM_START), size as usize)]
}

/// Nothing to set on a new VM.
pub fn prepare_vm(_kvm_fd: &Kvm, _vm: &VmFd) -> Result<(), ArchError> {
    Ok(())
}

/// Nothing before the vCPUs: the vGIC must come after them.
pub fn create_vm_devices(_kvm_fd: &Kvm, _vm: &VmFd) -> Result<(), ArchError> {
    Ok(())
}

/// The in-kernel devices that exist once the vCPUs do: here the vGIC, whose fd saves and
/// restores it.
pub struct VmDevices {
    gic: Gic,
}

/// Initialises every vCPU (PSCI 0.2, all but the first powered off) and creates the vGIC for
/// them; for a boot and a restore alike.
pub fn finish_vm_devices(
    vm: &VmFd,
    vcpus: &[VcpuFd],
    template: Option<&CpuTemplate>,
) -> Result<VmDevices, ArchError> {
    let features = template.map_or(&[][..], |t| t.vcpu_features.as_slice());
    regs::init_vcpus(vm, vcpus, features)?;
    let count = u8::try_from(vcpus.len()).unwrap_or(MAX_VCPUS);
    Ok(VmDevices {
        gic: Gic::create(vm, count)?,
    })
}

/// What every vCPU of a booting VM needs beyond what [`finish_vm_devices`] gave them: the
/// custom CPU template's register modifiers.
pub struct VcpuFeatures {
    reg_modifiers: Vec<RegModifier>,
}

pub fn vcpu_features(
    _kvm_fd: &Kvm,
    _vm: &VmFd,
    template: Option<&CpuTemplate>,
) -> Result<VcpuFeatures, ArchVcpuError> {
    let mut reg_modifiers = Vec::new();
    if let Some(template) = template {
        cpu_template::check(template)?;
        reg_modifiers.clone_from(&template.reg_modifiers);
    }
    Ok(VcpuFeatures { reg_modifiers })
}

/// The vCPU's program counter, for a report of where the guest failed.
pub fn instruction_pointer(vcpu: &VcpuFd) -> Option<u64> {
    regs::program_counter(vcpu)
}

fn mem_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|region| region.start_addr().0 + region.len())
        .max()
        .unwrap_or(DRAM_START)
}

fn mem_mib(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|region| region.len()).sum::<u64>() >> 20
}

/// Where the device tree goes: the last 2 MiB-aligned block of RAM.
fn fdt_address(mem: &GuestMemoryMmap) -> Option<u64> {
    let address = mem_end(mem).checked_sub(FDT_MAX_SIZE)? & !(FDT_ALIGN - 1);
    (address >= DRAM_START).then_some(address)
}

/// Where the VM generation ID goes: the last page of the device tree's block at the top of
/// RAM, on the last SPI.
pub fn vmgenid_placement(mem: &GuestMemoryMmap) -> Result<VmGenIdState, ArchError> {
    let fdt = fdt_address(mem).ok_or(ArchError::NoRoomForFdt)?;
    Ok(VmGenIdState {
        addr: fdt + FDT_MAX_SIZE - VMGENID_PAGE_SIZE,
        irq: VMGENID_IRQ,
    })
}

/// Loads an arm64 `Image` at the start of RAM (plus its text offset).
pub fn load_kernel(mem: &GuestMemoryMmap, image: &mut File) -> Result<BootEntry, ArchError> {
    let mut header = [0u8; IMAGE_HEADER_LEN];
    image
        .read_exact(&mut header)
        .and_then(|_| image.seek(SeekFrom::Start(0)))
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::UnexpectedEof => ArchError::NotAnImage,
            _ => ArchError::ReadHeader(err),
        })?;
    let word = |at: usize, len: usize| {
        header[at..at + len]
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    };
    if word(IMAGE_MAGIC_OFFSET, 4) != u64::from(IMAGE_MAGIC) {
        return Err(ArchError::NotAnImage);
    }
    let file_len = image.metadata().map_err(ArchError::ReadHeader)?.len();
    // The kernel's footprint: its BSS is past the file's end. (A zero image_size means a
    // kernel older than 3.17, loaded 512 KiB in.)
    let footprint = word(IMAGE_SIZE_OFFSET, 8).max(file_len);
    let text_offset = match word(IMAGE_SIZE_OFFSET, 8) {
        0 => 0x8_0000,
        _ => word(8, 8),
    };
    let end = DRAM_START + text_offset + footprint;
    if end > mem_end(mem) || fdt_address(mem).is_none_or(|fdt| end > fdt) {
        return Err(ArchError::KernelNeedsMemory {
            end: end + FDT_MAX_SIZE,
            mem_mib: mem_mib(mem),
        });
    }
    let loaded =
        PE::load(mem, Some(GuestAddress(DRAM_START)), image, None).map_err(ArchError::Load)?;
    Ok(BootEntry {
        entry: loaded.kernel_load,
        kernel_end: end,
    })
}

/// Where an initrd of `size` bytes goes: page-aligned, just below the device tree.
pub fn initrd_placement(
    mem: &GuestMemoryMmap,
    boot: &BootEntry,
    size: u64,
) -> Result<InitrdPlacement, ArchError> {
    let fdt = fdt_address(mem).ok_or(ArchError::NoRoomForFdt)?;
    let too_large = || ArchError::InitrdTooLarge {
        size,
        kernel_end: boot.kernel_end,
        fdt,
    };
    let address = fdt.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if address < boot.kernel_end {
        return Err(too_large());
    }
    Ok(InitrdPlacement {
        address: GuestAddress(address),
        size,
    })
}

/// Writes the device tree (memory, vCPUs, GIC, timer, PSCI, UART, RTC, `devices`, the
/// command line and the initrd) at the top of RAM, where the boot vCPU's X0 will point.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    _boot: &BootEntry,
    cmdline: Cmdline,
    devices: &[MmioDeviceInfo],
    initrd: Option<InitrdPlacement>,
    vcpus: u8,
    vmgenid: &VmGenIdState,
) -> Result<(), ArchError> {
    let cmdline = cmdline
        .as_cstring()
        .map(|text| text.to_string_lossy().into_owned())
        .unwrap_or_default();
    let blob = fdt::create_fdt(
        mem,
        &fdt::FdtConfig {
            cmdline: &cmdline,
            vcpus,
            devices,
            initrd,
            vmgenid,
        },
    )?;
    // The block's last page is the VM generation ID's.
    if blob.len() as u64 > FDT_MAX_SIZE - VMGENID_PAGE_SIZE {
        return Err(ArchError::FdtTooLarge { len: blob.len() });
    }
    let address = fdt_address(mem).ok_or(ArchError::NoRoomForFdt)?;
    mem.write_slice(&blob, GuestAddress(address))
        .map_err(ArchError::WriteFdt)
}

/// The boot vCPU's entry registers; secondaries wait, powered off, for PSCI CPU_ON.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    boot: &BootEntry,
    features: &VcpuFeatures,
    index: u8,
    _count: u8,
) -> Result<(), ArchVcpuError> {
    if index == 0 {
        let fdt = fdt_address(mem).ok_or(ArchVcpuError::NoRoomForFdt)?;
        regs::setup_boot_regs(vcpu, boot.entry.0, fdt)?;
    }
    cpu_template::apply_regs(vcpu, &features.reg_modifiers)?;
    Ok(())
}

/// The largest command line, without its NUL.
pub const fn cmdline_capacity() -> usize {
    CMDLINE_MAX_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(text_offset: u64, image_size: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; 0x1_0000];
        bytes[8..16].copy_from_slice(&text_offset.to_le_bytes());
        bytes[16..24].copy_from_slice(&image_size.to_le_bytes());
        bytes[0x38..0x3c].copy_from_slice(&IMAGE_MAGIC.to_le_bytes());
        bytes
    }

    fn file_with(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "mote-arm64-image-{}-{}",
            std::process::id(),
            bytes.len()
        ));
        std::fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn an_image_loads_at_the_start_of_ram_and_counts_its_bss() {
        let mem = GuestMemoryMmap::from_ranges(&arch_memory_regions(64 << 20)).unwrap();
        let boot = load_kernel(&mem, &mut file_with(&image(0, 0x40_0000))).unwrap();
        assert_eq!(boot.entry, GuestAddress(DRAM_START));
        assert_eq!(boot.kernel_end, DRAM_START + 0x40_0000);
        let initrd = initrd_placement(&mem, &boot, 0x1234).unwrap();
        assert_eq!(fdt_address(&mem), Some(DRAM_START + (62 << 20)));
        assert_eq!(initrd.address.0, DRAM_START + (62 << 20) - 0x2000);
    }

    #[test]
    fn other_kernels_are_refused_by_name() {
        let mem = GuestMemoryMmap::from_ranges(&arch_memory_regions(64 << 20)).unwrap();
        let mut elf = vec![0u8; 0x1000];
        elf[..4].copy_from_slice(b"\x7fELF");
        assert!(matches!(
            load_kernel(&mem, &mut file_with(&elf)),
            Err(ArchError::NotAnImage)
        ));
        assert!(matches!(
            load_kernel(&mem, &mut file_with(b"tiny")),
            Err(ArchError::NotAnImage)
        ));
    }

    #[test]
    fn a_kernel_bigger_than_memory_says_so() {
        let mem = GuestMemoryMmap::from_ranges(&arch_memory_regions(16 << 20)).unwrap();
        assert!(matches!(
            load_kernel(&mem, &mut file_with(&image(0, 30 << 20))),
            Err(ArchError::KernelNeedsMemory { .. })
        ));
    }
}
