//! The in-kernel GICv3 (`KVM_DEV_TYPE_ARM_VGIC_V3`): created once all vCPUs exist, and its
//! state read and written through the device's attributes for snapshots: the distributor,
//! each vCPU's redistributor and CPU interface. No ITS: mote's devices use wired interrupts.
//!
//! The register lists follow the GICv3 architecture specification (IHI 0069) and what QEMU
//! and Firecracker save: read/write registers only; GICD_{S,C}PENDSGIR are left out, being
//! unused with affinity routing, which the guest cannot turn off here.

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
    KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_DIST_REGS, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, VmFd};
use serde::{Deserialize, Serialize};

use super::layout::{GIC_DIST_START, GIC_NR_IRQS, GIC_REDIST_SIZE_PER_VCPU, GIC_REDIST_START};
use super::regs::mpidr_affinity;

#[derive(Debug, thiserror::Error)]
pub enum GicError {
    #[error("cannot create the vGICv3: {0} (mote needs a GICv3 host: a KVM that offers only a vGICv2 is not supported)")]
    Create(kvm_ioctls::Error),
    #[error("cannot {what} of the vGICv3: {source}")]
    Attr {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot read GIC register {group}:{offset:#x}: {source}")]
    Read {
        group: u32,
        offset: u64,
        source: kvm_ioctls::Error,
    },
    #[error("cannot write GIC register {group}:{offset:#x}: {source}")]
    Write {
        group: u32,
        offset: u64,
        source: kvm_ioctls::Error,
    },
    #[error("the snapshot's GIC has state for {saved} vCPUs, this VM has {present}")]
    VcpuCount { saved: usize, present: usize },
    #[error("the snapshot's GIC state does not fit this vGIC: {0}")]
    Shape(&'static str),
}

/// The vGIC of a VM; dropping it would leave KVM's device in place, but its fd is what saves
/// and restores it.
pub struct Gic {
    fd: DeviceFd,
    vcpu_count: u8,
}

/// The redistributor region's size for `vcpus`.
pub const fn redist_size(vcpus: u8) -> u64 {
    GIC_REDIST_SIZE_PER_VCPU * vcpus as u64
}

fn set_attr(
    fd: &DeviceFd,
    what: &'static str,
    group: u32,
    attr: u64,
    addr: u64,
) -> Result<(), GicError> {
    let attr = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr,
    };
    fd.set_device_attr(&attr)
        .map_err(|source| GicError::Attr { what, source })
}

impl Gic {
    /// Creates the vGICv3 for `vcpu_count` vCPUs (which must all exist) at the layout's
    /// addresses and initialises it.
    pub fn create(vm: &VmFd, vcpu_count: u8) -> Result<Self, GicError> {
        let mut device = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
            fd: 0,
            flags: 0,
        };
        let fd = vm.create_device(&mut device).map_err(GicError::Create)?;
        let dist = GIC_DIST_START;
        let redist = GIC_REDIST_START;
        let nr_irqs: u32 = GIC_NR_IRQS;
        set_attr(
            &fd,
            "place the distributor",
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_DIST.into(),
            &dist as *const u64 as u64,
        )?;
        set_attr(
            &fd,
            "place the redistributors",
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_REDIST.into(),
            &redist as *const u64 as u64,
        )?;
        set_attr(
            &fd,
            "set the number of interrupts",
            KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
            0,
            &nr_irqs as *const u32 as u64,
        )?;
        set_attr(
            &fd,
            "initialise",
            KVM_DEV_ARM_VGIC_GRP_CTRL,
            KVM_DEV_ARM_VGIC_CTRL_INIT.into(),
            0,
        )?;
        Ok(Self { fd, vcpu_count })
    }

    pub fn save(&self) -> Result<GicState, GicError> {
        let dist = DIST_REGS
            .iter()
            .map(|reg| read_reg(&self.fd, KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0, reg))
            .collect::<Result<_, _>>()?;
        let vcpus = (0..self.vcpu_count)
            .map(|index| {
                let mpidr = vgic_mpidr(index);
                let redist = REDIST_REGS
                    .iter()
                    .map(|reg| read_reg(&self.fd, KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, mpidr, reg))
                    .collect::<Result<_, _>>()?;
                let icc = save_icc(&self.fd, mpidr)?;
                Ok(GicVcpuState { redist, icc })
            })
            .collect::<Result<_, GicError>>()?;
        Ok(GicState { dist, vcpus })
    }

    /// Puts back what [`Gic::save`] read; the vCPUs' own registers must be restored first.
    pub fn restore(&self, state: &GicState) -> Result<(), GicError> {
        if state.vcpus.len() != usize::from(self.vcpu_count) {
            return Err(GicError::VcpuCount {
                saved: state.vcpus.len(),
                present: usize::from(self.vcpu_count),
            });
        }
        if state.dist.len() != DIST_REGS.len() {
            return Err(GicError::Shape("distributor registers"));
        }
        for (reg, values) in DIST_REGS.iter().zip(&state.dist) {
            write_reg(&self.fd, KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0, reg, values)?;
        }
        for (vcpu, index) in state.vcpus.iter().zip(0u8..) {
            let mpidr = vgic_mpidr(index);
            if vcpu.redist.len() != REDIST_REGS.len() {
                return Err(GicError::Shape("redistributor registers"));
            }
            for (reg, values) in REDIST_REGS.iter().zip(&vcpu.redist) {
                write_reg(
                    &self.fd,
                    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                    mpidr,
                    reg,
                    values,
                )?;
            }
            restore_icc(&self.fd, mpidr, &vcpu.icc)?;
        }
        Ok(())
    }
}

/// What a snapshot keeps of the vGIC.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GicState {
    /// One entry per [`DIST_REGS`] register: its 32-bit words.
    pub dist: Vec<Vec<u32>>,
    pub vcpus: Vec<GicVcpuState>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GicVcpuState {
    /// One entry per [`REDIST_REGS`] register.
    pub redist: Vec<Vec<u32>>,
    /// The CPU interface's system registers, by their KVM attribute.
    pub icc: Vec<(u64, u64)>,
}

/// A memory-mapped GIC register (or register array) as 32-bit words from `offset`.
struct MmioReg {
    offset: u64,
    words: u64,
}

/// A register with `bits` bits per interrupt, for the shared interrupts only (the private
/// ones' part of the distributor's copy is RAZ/WI with affinity routing: they live in the
/// redistributors).
const fn per_spi(offset: u64, bits: u64) -> MmioReg {
    let first = offset + 32 * bits / 8;
    let bytes = (GIC_NR_IRQS as u64 - 32) * bits / 8;
    MmioReg {
        offset: first,
        words: bytes / 4,
    }
}

const fn simple(offset: u64, bytes: u64) -> MmioReg {
    MmioReg {
        offset,
        words: bytes / 4,
    }
}

/// Distributor registers, in the order QEMU restores them: each "clear" register before its
/// "set" one, so that the set bits are exactly the saved ones whatever came before.
static DIST_REGS: [MmioReg; 12] = [
    simple(0x0000, 4),   // GICD_CTLR
    simple(0x0010, 4),   // GICD_STATUSR
    per_spi(0x0180, 1),  // GICD_ICENABLER
    per_spi(0x0100, 1),  // GICD_ISENABLER
    per_spi(0x0080, 1),  // GICD_IGROUPR
    per_spi(0x6000, 64), // GICD_IROUTER
    per_spi(0x0c00, 2),  // GICD_ICFGR
    per_spi(0x0280, 1),  // GICD_ICPENDR
    per_spi(0x0200, 1),  // GICD_ISPENDR
    per_spi(0x0380, 1),  // GICD_ICACTIVER
    per_spi(0x0300, 1),  // GICD_ISACTIVER
    per_spi(0x0400, 8),  // GICD_IPRIORITYR
];

/// The SGI/PPI frame follows the redistributor's control frame.
const SGI_FRAME: u64 = 0x1_0000;

/// Redistributor registers per vCPU: the control frame's, then the private interrupts'.
static REDIST_REGS: [MmioReg; 14] = [
    simple(0x0000, 4),              // GICR_CTLR
    simple(0x0010, 4),              // GICR_STATUSR
    simple(0x0014, 4),              // GICR_WAKER
    simple(0x0070, 8),              // GICR_PROPBASER
    simple(0x0078, 8),              // GICR_PENDBASER
    simple(SGI_FRAME + 0x0080, 4),  // GICR_IGROUPR0
    simple(SGI_FRAME + 0x0180, 4),  // GICR_ICENABLER0
    simple(SGI_FRAME + 0x0100, 4),  // GICR_ISENABLER0
    simple(SGI_FRAME + 0x0c00, 8),  // GICR_ICFGR0, GICR_ICFGR1
    simple(SGI_FRAME + 0x0280, 4),  // GICR_ICPENDR0
    simple(SGI_FRAME + 0x0200, 4),  // GICR_ISPENDR0
    simple(SGI_FRAME + 0x0380, 4),  // GICR_ICACTIVER0
    simple(SGI_FRAME + 0x0300, 4),  // GICR_ISACTIVER0
    simple(SGI_FRAME + 0x0400, 32), // GICR_IPRIORITYR0..7
];

/// The vGIC's name for vCPU `index` in an attribute: its affinity (Aff3.Aff2.Aff1.Aff0, a
/// byte each) in bits 63:32.
fn vgic_mpidr(index: u8) -> u64 {
    let affinity = mpidr_affinity(index);
    let (aff0, aff1, aff2, aff3) = (
        affinity & 0xff,
        (affinity >> 8) & 0xff,
        (affinity >> 16) & 0xff,
        (affinity >> 32) & 0xff,
    );
    ((aff3 << 24) | (aff2 << 16) | (aff1 << 8) | aff0) << 32
}

fn read_word<T: Default>(fd: &DeviceFd, group: u32, attr: u64) -> Result<T, GicError> {
    let mut value = T::default();
    let mut request = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr: &mut value as *mut T as u64,
    };
    // SAFETY: `addr` points at a live value of the width KVM writes for this group (32 bits
    // for the distributor and redistributors, 64 for the CPU interface's system registers).
    unsafe { fd.get_device_attr(&mut request) }.map_err(|source| GicError::Read {
        group,
        offset: attr & 0xffff_ffff,
        source,
    })?;
    Ok(value)
}

fn write_word<T>(fd: &DeviceFd, group: u32, attr: u64, value: &T) -> Result<(), GicError> {
    let request = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr: value as *const T as u64,
    };
    fd.set_device_attr(&request)
        .map_err(|source| GicError::Write {
            group,
            offset: attr & 0xffff_ffff,
            source,
        })
}

fn read_reg(fd: &DeviceFd, group: u32, mpidr: u64, reg: &MmioReg) -> Result<Vec<u32>, GicError> {
    (0..reg.words)
        .map(|word| read_word::<u32>(fd, group, mpidr | (reg.offset + 4 * word)))
        .collect()
}

fn write_reg(
    fd: &DeviceFd,
    group: u32,
    mpidr: u64,
    reg: &MmioReg,
    values: &[u32],
) -> Result<(), GicError> {
    if values.len() as u64 != reg.words {
        return Err(GicError::Shape("a register's width"));
    }
    for (word, value) in values.iter().enumerate() {
        write_word(fd, group, mpidr | (reg.offset + 4 * word as u64), value)?;
    }
    Ok(())
}

/// A CPU-interface system register's attribute: its encoding, as in `KVM_REG_ARM64_SYSREG`.
const fn icc(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}

const ICC_CTLR_EL1: u64 = icc(3, 0, 12, 12, 4);

/// The CPU interface's registers, ICC_SRE_EL1 first (it decides how the rest are accessed).
const ICC_MAIN: [u64; 7] = [
    icc(3, 0, 12, 12, 5), // ICC_SRE_EL1
    ICC_CTLR_EL1,
    icc(3, 0, 12, 12, 6), // ICC_IGRPEN0_EL1
    icc(3, 0, 12, 12, 7), // ICC_IGRPEN1_EL1
    icc(3, 0, 4, 6, 0),   // ICC_PMR_EL1
    icc(3, 0, 12, 8, 3),  // ICC_BPR0_EL1
    icc(3, 0, 12, 12, 3), // ICC_BPR1_EL1
];

/// The active-priority registers ICC_AP0R<n>_EL1 and ICC_AP1R<n>_EL1 that exist with
/// `priority_bits` bits of priority: n = 0 always, 1 from 6 bits, 2 and 3 with 7.
fn icc_active_priority(priority_bits: u64) -> Vec<u64> {
    let count = match priority_bits {
        7.. => 4,
        6 => 2,
        _ => 1,
    };
    (0..count)
        .map(|n| icc(3, 0, 12, 8, 4 | n))
        .chain((0..count).map(|n| icc(3, 0, 12, 9, n)))
        .collect()
}

/// ICC_CTLR_EL1.PRIbits holds the number of priority bits minus one.
fn priority_bits(ctlr: u64) -> u64 {
    ((ctlr >> 8) & 0x7) + 1
}

fn save_icc(fd: &DeviceFd, mpidr: u64) -> Result<Vec<(u64, u64)>, GicError> {
    let group = KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS;
    let ctlr = read_word::<u64>(fd, group, mpidr | ICC_CTLR_EL1)?;
    ICC_MAIN
        .iter()
        .copied()
        .chain(icc_active_priority(priority_bits(ctlr)))
        .map(|reg| Ok((reg, read_word::<u64>(fd, group, mpidr | reg)?)))
        .collect()
}

fn restore_icc(fd: &DeviceFd, mpidr: u64, regs: &[(u64, u64)]) -> Result<(), GicError> {
    let group = KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS;
    let allowed: Vec<u64> = ICC_MAIN
        .iter()
        .copied()
        .chain(icc_active_priority(7))
        .collect();
    for (reg, value) in regs {
        if !allowed.contains(reg) {
            return Err(GicError::Shape(
                "a CPU-interface register mote does not know",
            ));
        }
        write_word(fd, group, mpidr | reg, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_ranges_cover_the_shared_interrupts_only() {
        // 96 SPIs: 3 words of enable bits from 0x104, 24 of priorities from 0x420, 96
        // double-words of routing from 0x6100.
        assert_eq!((DIST_REGS[3].offset, DIST_REGS[3].words), (0x104, 3));
        assert_eq!((DIST_REGS[11].offset, DIST_REGS[11].words), (0x420, 24));
        assert_eq!((DIST_REGS[5].offset, DIST_REGS[5].words), (0x6100, 192));
        assert_eq!((DIST_REGS[6].offset, DIST_REGS[6].words), (0xc08, 6));
    }

    #[test]
    fn icc_encodings_match_the_kernels() {
        // ICC_SRE_EL1 and ICC_AP1R1_EL1 as Firecracker's and the kernel's tables give them.
        assert_eq!(ICC_MAIN[0], 50789);
        assert_eq!(icc(3, 0, 12, 9, 1), 50761);
        assert_eq!(icc_active_priority(5).len(), 2);
        assert_eq!(icc_active_priority(6).len(), 4);
        assert_eq!(icc_active_priority(7).len(), 8);
        assert_eq!(priority_bits(0x0400), 5);
    }

    #[test]
    fn vgic_names_vcpus_by_affinity_in_the_high_word() {
        assert_eq!(vgic_mpidr(0), 0);
        assert_eq!(vgic_mpidr(3), 3 << 32);
        assert_eq!(vgic_mpidr(17), 0x101 << 32);
    }
}
