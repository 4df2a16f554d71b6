//! A KVM VM made ahead of need. Every start and every snapshot load begins with the same fresh
//! VM (`KVM_CREATE_VM` and, on x86_64, KVM's real-mode pages): 0.2-0.3 ms on these hosts, a
//! sixth of a snapshot load. A monitor waiting for its first request has that time, so it
//! makes one while idle ([`prepare`]), and the start or load that comes takes it.
//!
//! Only the VM: its in-kernel devices must come after the guest's memory is registered (on
//! x86_64 a memory slot added within some 7 ms of the irqchip waited out those 7 ms), and the
//! vCPUs after those devices.
//!
//! The cost where no VM ever comes (a monitor spawned into a pool and stopped unused): one
//! VM's kernel memory for the monitor's life.

use std::sync::Mutex;

use kvm_ioctls::{Kvm, VmFd};
use log::debug;

use super::vm::VmError;
use crate::arch;

/// The only KVM API version there has ever been.
pub const KVM_API_VERSION: i32 = 12;

/// A new VM, prepared by the arch, without memory, devices or vCPUs.
pub struct FreshVm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

/// The VM made ahead, while it waits to be taken.
static SPARE: Mutex<Option<FreshVm>> = Mutex::new(None);

/// Opens KVM and creates a VM, prepared as the arch wants a new one.
fn create() -> Result<FreshVm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(VmError::ApiVersion(version));
    }
    let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
    arch::prepare_vm(&kvm, &fd)?;
    Ok(FreshVm { kvm, fd })
}

/// Makes the spare VM, unless there is one. A failure only means the start or load that
/// comes creates its own, and reports the error then, as without a spare.
pub fn prepare() {
    let Ok(mut spare) = SPARE.lock() else {
        return;
    };
    if spare.is_some() {
        return;
    }
    match create() {
        Ok(vm) => {
            *spare = Some(vm);
            debug!("a VM was made ahead of the start");
        }
        Err(err) => debug!("no VM made ahead of the start: {err}"),
    }
}

/// The spare VM, or a new one.
pub fn take_or_create() -> Result<FreshVm, VmError> {
    let spare = SPARE.lock().ok().and_then(|mut spare| spare.take());
    match spare {
        Some(vm) => Ok(vm),
        None => create(),
    }
}
