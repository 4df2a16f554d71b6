//! Everything that differs between guest architectures. The rest of the monitor calls only
//! what this module re-exports, and never names a register, port, address or KVM structure of
//! one arch. `src/arch/x86_64/` and `src/arch/aarch64/` implement the same interface:
//!
//! - **Layout**: `arch_memory_regions(bytes)` (guest RAM ranges), `MAX_MEM_SIZE_MIB`,
//!   `MAX_VCPUS`, `TRANSPARENT_HUGE_PAGE_SIZE` (the host's), `DEFAULT_BOOT_ARGS`,
//!   `cmdline_capacity()`, and where MMIO devices go:
//!   `BOOT_TIMER_START`, `VIRTIO_MMIO_START`, `MMIO_SLOT_SIZE`, `IRQ_BASE`..=`IRQ_MAX`.
//! - **The VM**: `prepare_vm(kvm, vm)` right after the VM is made, before its memory
//!   (x86_64: KVM's real-mode pages and its list of saveable MSRs; it may run ahead, see
//!   `vstate/spare_vm.rs`), `create_vm_devices(kvm, vm)` once the memory is registered and
//!   before any vCPU exists (x86_64: the irqchip and PIT), `finish_vm_devices(vm, vcpus)`
//!   once all vCPUs exist (aarch64: the vCPUs' KVM_ARM_VCPU_INIT and the GIC, which must come
//!   after them), which
//!   gives the `VmDevices` a VM keeps; `VmState` (save of those devices and the clock;
//!   restored in two parts, `restore_before_vcpus` (x86_64: all of it, the kvm-clock before
//!   the vCPUs' clock MSRs) and `restore_after_vcpus` (aarch64: the GIC)).
//! - **Booting**: `load_kernel`, `initrd_placement`, `configure_system` (boot parameters, and
//!   the virtio-mmio devices announced as the arch's guests expect: kernel command line on
//!   x86_64, device tree on aarch64), `vcpu_features` (what KVM offers every vCPU, read once
//!   per boot) and `configure_vcpu`.
//! - **VM generation ID**: `vmgenid_placement(mem)` says where its 16 bytes go and which line
//!   announces a change; `configure_system` describes it to the guest (ACPI tables on x86_64,
//!   a device-tree node on aarch64).
//! - **vCPUs**: `VcpuState` (save/restore on the vCPU's thread), `handle_exit` for the exits
//!   only this arch has (x86_64: port I/O, through `VcpuIo`), `instruction_pointer` for
//!   reports.
//! - **Legacy devices**: `LegacyDevices` (x86_64: COM1 and the i8042 on the port-I/O bus;
//!   aarch64: the UART and the RTC on MMIO, no i8042) with `LegacyDevicesState` for
//!   snapshots and `send_ctrl_alt_del`; `CTRL_ALT_DEL_UNSUPPORTED` is the API's refusal on
//!   an arch without a keyboard.
//! - **Snapshots** name the arch that wrote them (`SNAPSHOT_ARCH`, the ELF machine number), so
//!   that one arch's state is refused by the other's build before it is decoded.

#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "aarch64")]
mod aarch64;

#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{
    arch_memory_regions, cmdline_capacity, configure_system, configure_vcpu, create_vm_devices,
    finish_vm_devices, initrd_placement, instruction_pointer,
    layout::{BOOT_TIMER_START, IRQ_BASE, IRQ_MAX, MMIO_SLOT_SIZE, VIRTIO_MMIO_START},
    legacy::{handle_exit, LegacyDeviceError, LegacyDevices, LegacyDevicesState, VcpuIo},
    load_kernel, prepare_vm,
    snapshot::{StateError, VcpuState, VmState},
    vcpu_features, vmgenid_placement, ArchError, ArchVcpuError, BootEntry, InitrdPlacement,
    VcpuFeatures, VmDevices, CTRL_ALT_DEL_UNSUPPORTED, DEFAULT_BOOT_ARGS, MAX_MEM_SIZE_MIB,
    MAX_VCPUS, TRANSPARENT_HUGE_PAGE_SIZE,
};

#[cfg(target_arch = "aarch64")]
pub use self::aarch64::{
    arch_memory_regions, cmdline_capacity, configure_system, configure_vcpu, create_vm_devices,
    finish_vm_devices, initrd_placement, instruction_pointer,
    layout::{BOOT_TIMER_START, IRQ_BASE, IRQ_MAX, MMIO_SLOT_SIZE, VIRTIO_MMIO_START},
    legacy::{handle_exit, LegacyDeviceError, LegacyDevices, LegacyDevicesState, VcpuIo},
    load_kernel, prepare_vm,
    snapshot::{StateError, VcpuState, VmState},
    vcpu_features, vmgenid_placement, ArchError, ArchVcpuError, BootEntry, InitrdPlacement,
    VcpuFeatures, VmDevices, CTRL_ALT_DEL_UNSUPPORTED, DEFAULT_BOOT_ARGS, MAX_MEM_SIZE_MIB,
    MAX_VCPUS, TRANSPARENT_HUGE_PAGE_SIZE,
};

/// The arch a snapshot's state belongs to, as its ELF machine number (EM_X86_64, EM_AARCH64).
#[cfg(target_arch = "x86_64")]
pub const SNAPSHOT_ARCH: u16 = 62;
#[cfg(target_arch = "aarch64")]
pub const SNAPSHOT_ARCH: u16 = 183;

/// The arch's name in OCI image configurations and platforms (Go's GOARCH): a container
/// image must be built for it.
#[cfg(target_arch = "x86_64")]
pub const OCI_ARCH: &str = "amd64";
#[cfg(target_arch = "aarch64")]
pub const OCI_ARCH: &str = "arm64";

/// The name of the arch an ELF machine number stands for, for messages.
pub fn arch_name(machine: u16) -> String {
    match machine {
        62 => "x86_64".to_string(),
        183 => "aarch64".to_string(),
        other => format!("machine {other}"),
    }
}

/// A virtio-mmio device as the guest must be told of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// The base of its register window.
    pub addr: u64,
    /// The window's length.
    pub len: u64,
    /// Its interrupt line.
    pub irq: u32,
}
