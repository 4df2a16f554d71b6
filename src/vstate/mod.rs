//! KVM state owned by the monitor: guest memory, the VM, and the vCPU threads.

pub mod dirty;
pub mod memory;
pub mod spare_vm;
pub mod uffd;
pub mod vcpu;
pub mod vm;
