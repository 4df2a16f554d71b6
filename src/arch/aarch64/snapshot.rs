//! The KVM state of an aarch64 guest that a snapshot keeps: per vCPU, every register KVM lists
//! (core, FP/SIMD, system, timer and firmware registers) and the MP state (powered off or
//! not); per VM, the vGICv3's distributor, redistributors and CPU interfaces.
//!
//! The vCPUs are initialised (KVM_ARM_VCPU_INIT) before their registers are written; the GIC
//! is restored after them, as its CPU interfaces belong to the vCPUs.

use kvm_bindings::kvm_mp_state;
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::gic::{GicError, GicState};
use super::regs::{self, RegsError, SavedReg};
use super::VmDevices;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Regs(#[from] RegsError),
    #[error("the vGIC: {0}")]
    Gic(#[from] GicError),
    #[error("clock_realtime is not supported on aarch64: the guest's counter carries on from the snapshot")]
    ClockRealtimeUnsupported,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// Everything KVM holds about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: Vec<SavedReg>,
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN (paused), on its own thread.
    pub fn save(fd: &VcpuFd) -> Result<Self, StateError> {
        let mp_state = fd.get_mp_state().map_err(kvm("read the MP state"))?;
        let regs = regs::save_all(fd)?;
        Ok(Self { mp_state, regs })
    }

    /// Writes the state into an initialised vCPU that has not run yet.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        regs::restore_all(fd, &self.regs)?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("set the MP state"))?;
        Ok(())
    }
}

/// The VM-wide in-kernel device: the vGIC.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmState {
    pub gic: GicState,
}

impl VmState {
    pub fn save(_fd: &VmFd, devices: &VmDevices) -> Result<Self, StateError> {
        Ok(Self {
            gic: devices.gic.save()?,
        })
    }

    /// Nothing of aarch64's VM state can come before the vCPUs: the GIC is created after them.
    pub fn restore_before_vcpus(&self, _fd: &VmFd, clock_realtime: bool) -> Result<(), StateError> {
        if clock_realtime {
            return Err(StateError::ClockRealtimeUnsupported);
        }
        Ok(())
    }

    /// The GIC, once the vCPUs' registers are back.
    pub fn restore_after_vcpus(&self, _fd: &VmFd, devices: &VmDevices) -> Result<(), StateError> {
        Ok(devices.gic.restore(&self.gic)?)
    }
}
