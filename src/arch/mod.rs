//! Everything that differs between guest architectures. The rest of the monitor calls only
//! what this module re-exports; aarch64 will add a sibling module with the same interface.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use self::x86_64::snapshot::{read_msr_index_list, StateError, VcpuState, VmState};
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{
    arch_memory_regions, cmdline_capacity, configure_system, configure_vcpu, create_vm_devices,
    initrd_placement, load_kernel, ArchError, ArchVcpuError, BootEntry, InitrdPlacement,
    DEFAULT_BOOT_ARGS, MAX_MEM_SIZE_MIB, MAX_VCPUS,
};
