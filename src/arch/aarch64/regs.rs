//! vCPU registers: KVM's vCPU initialisation (PSCI 0.2, pointer authentication, secondaries
//! powered off), the boot vCPU's entry state for the arm64 Linux boot protocol, and every
//! register KVM lists for a snapshot (`KVM_GET_REG_LIST`, `KVM_GET_ONE_REG` /
//! `KVM_SET_ONE_REG`).

use std::mem::offset_of;

use kvm_bindings::{
    kvm_regs, kvm_vcpu_init, user_pt_regs, PSR_MODE_EL1h, RegList, KVM_ARM_VCPU_POWER_OFF,
    KVM_ARM_VCPU_PSCI_0_2, KVM_ARM_VCPU_PTRAUTH_ADDRESS, KVM_ARM_VCPU_PTRAUTH_GENERIC,
    KVM_REG_ARM64, KVM_REG_ARM_CORE, KVM_REG_SIZE_MASK, KVM_REG_SIZE_SHIFT, KVM_REG_SIZE_U64,
    PSR_A_BIT, PSR_D_BIT, PSR_F_BIT, PSR_I_BIT,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::cpu_template::{apply_vcpu_features, CpuTemplateError};
use crate::config::VcpuFeatureModifier;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot read KVM's preferred vCPU target: {0}")]
    PreferredTarget(kvm_ioctls::Error),
    #[error("cannot initialise vCPU {index} (KVM_ARM_VCPU_INIT): {source}")]
    Init {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set register {name}: {source}")]
    Set {
        name: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot list the vCPU's registers: {0}")]
    List(kvm_ioctls::Error),
    #[error("cannot make room for a list of {REG_LIST_CAPACITY} registers")]
    ListCapacity,
    #[error("cannot read register {id:#x}: {source}")]
    GetOne { id: u64, source: kvm_ioctls::Error },
    #[error("cannot write register {id:#x}: {source}")]
    SetOne { id: u64, source: kvm_ioctls::Error },
    #[error("register {id:#x} is {size} bytes wide; mote keeps registers of at most 256 bytes")]
    TooWide { id: u64, size: usize },
    #[error(transparent)]
    CpuTemplate(#[from] CpuTemplateError),
}

/// The most registers KVM lists for one vCPU: kvm-bindings' limit for the list (about 250 on
/// an SVE-less host).
const REG_LIST_CAPACITY: usize = 500;

/// The boot vCPU starts at EL1h with debug, SError, IRQ and FIQ masked (arm64 boot protocol).
const BOOT_PSTATE: u64 = (PSR_MODE_EL1h | PSR_A_BIT | PSR_F_BIT | PSR_I_BIT | PSR_D_BIT) as u64;

/// The KVM id of a 64-bit core register at byte `offset` of `struct kvm_regs`.
const fn core_reg(offset: usize) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (offset / 4) as u64
}

const fn regs_offset(field: usize) -> usize {
    offset_of!(kvm_regs, regs) + field
}

/// X0: the device tree's address on entry.
const REG_X0: u64 = core_reg(regs_offset(offset_of!(user_pt_regs, regs)));
const REG_PC: u64 = core_reg(regs_offset(offset_of!(user_pt_regs, pc)));
const REG_PSTATE: u64 = core_reg(regs_offset(offset_of!(user_pt_regs, pstate)));

/// The MPIDR KVM gives vCPU `index` (`reset_mpidr`: Aff0 takes the low 4 bits of the id, Aff1
/// the next 8), without its RES1 bit 31: the value a device tree's `cpu` node carries and the
/// vGIC's redistributors are addressed by.
pub const fn mpidr_affinity(index: u8) -> u64 {
    let id = index as u64;
    (id & 0xf) | (((id >> 4) & 0xff) << 8)
}

/// KVM_ARM_VCPU_INIT for every vCPU with the host's preferred target, PSCI 0.2 and, where the
/// host has it, pointer authentication (as Firecracker gives its guests: arm64 kernels sign
/// return addresses with it); all but the boot vCPU start powered off until the guest turns
/// them on with PSCI CPU_ON. A snapshot's vCPUs are initialised the same way, so it restores
/// on a host with the same features (its pointer-authentication keys are registers KVM lists).
pub fn init_vcpus(
    vm: &VmFd,
    vcpus: &[VcpuFd],
    template: &[VcpuFeatureModifier],
) -> Result<(), RegsError> {
    let mut preferred = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut preferred)
        .map_err(RegsError::PreferredTarget)?;
    if vm.check_extension(Cap::ArmPtrAuthAddress) && vm.check_extension(Cap::ArmPtrAuthGeneric) {
        preferred.features[0] |=
            (1 << KVM_ARM_VCPU_PTRAUTH_ADDRESS) | (1 << KVM_ARM_VCPU_PTRAUTH_GENERIC);
    }
    // A custom CPU template's features, then what mote's boot cannot do without.
    apply_vcpu_features(&mut preferred, template)?;
    preferred.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    for (fd, index) in vcpus.iter().zip(0u8..) {
        let mut init = preferred;
        if index > 0 {
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        fd.vcpu_init(&init)
            .map_err(|source| RegsError::Init { index, source })?;
    }
    Ok(())
}

fn set_u64(vcpu: &VcpuFd, id: u64, name: &'static str, value: u64) -> Result<(), RegsError> {
    vcpu.set_one_reg(id, &value.to_le_bytes())
        .map(drop)
        .map_err(|source| RegsError::Set { name, source })
}

/// The boot vCPU's entry state: PC at the kernel's entry, X0 the device tree, EL1h masked.
/// Secondaries need nothing: PSCI CPU_ON gives them their entry point.
pub fn setup_boot_regs(vcpu: &VcpuFd, entry: u64, fdt_addr: u64) -> Result<(), RegsError> {
    set_u64(vcpu, REG_PSTATE, "PSTATE", BOOT_PSTATE)?;
    set_u64(vcpu, REG_PC, "PC", entry)?;
    set_u64(vcpu, REG_X0, "X0", fdt_addr)
}

/// The vCPU's program counter, for a report of where the guest failed.
pub fn program_counter(vcpu: &VcpuFd) -> Option<u64> {
    let mut bytes = [0u8; 8];
    vcpu.get_one_reg(REG_PC, &mut bytes).ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// One register's id and value (little-endian, as wide as the id says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedReg {
    pub id: u64,
    pub value: Vec<u8>,
}

pub fn reg_size(id: u64) -> usize {
    1 << ((id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)
}

/// Every register KVM lists for the vCPU, in its order: core, FP/SIMD, system, timer and
/// firmware registers.
pub fn save_all(vcpu: &VcpuFd) -> Result<Vec<SavedReg>, RegsError> {
    let mut list = RegList::new(REG_LIST_CAPACITY).map_err(|_| RegsError::ListCapacity)?;
    vcpu.get_reg_list(&mut list).map_err(RegsError::List)?;
    list.as_slice()
        .iter()
        .map(|&id| {
            let size = reg_size(id);
            if size > 256 {
                return Err(RegsError::TooWide { id, size });
            }
            let mut value = vec![0u8; size];
            vcpu.get_one_reg(id, &mut value)
                .map_err(|source| RegsError::GetOne { id, source })?;
            Ok(SavedReg { id, value })
        })
        .collect()
}

/// Writes back what [`save_all`] read, in the same order.
pub fn restore_all(vcpu: &VcpuFd, regs: &[SavedReg]) -> Result<(), RegsError> {
    for reg in regs {
        vcpu.set_one_reg(reg.id, &reg.value)
            .map_err(|source| RegsError::SetOne { id: reg.id, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_register_ids_match_the_kernel_abi() {
        // arch/arm64/include/uapi/asm/kvm.h: x0 is word 0, pc word 64, pstate word 66.
        assert_eq!(REG_X0, 0x6030_0000_0010_0000);
        assert_eq!(REG_PC, 0x6030_0000_0010_0040);
        assert_eq!(REG_PSTATE, 0x6030_0000_0010_0042);
        assert_eq!(reg_size(REG_PC), 8);
    }

    #[test]
    fn mpidr_follows_kvms_reset_value() {
        assert_eq!(mpidr_affinity(0), 0);
        assert_eq!(mpidr_affinity(15), 0xf);
        assert_eq!(mpidr_affinity(16), 0x100);
        assert_eq!(mpidr_affinity(31), 0x10f);
    }
}
