//! The CPUID each vCPU sees: KVM's supported set, with this vCPU's APIC ID, the topology of
//! `vcpu_count` single-threaded cores in one package, and the hypervisor bit.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1: EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
const LEAF_FEATURES: u32 = 0x1;
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Leaf 4 (Intel): cache parameters, with cores per package in EAX[31:26].
const LEAF_CACHE_PARAMS: u32 = 0x4;
/// Leaf 6: thermal and power management, which a guest cannot use.
const LEAF_THERMAL_POWER: u32 = 0x6;
/// Leaf 0xb: extended topology, x2APIC ID in EDX.
const LEAF_TOPOLOGY: u32 = 0xb;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;
/// Leaf 0x4000_0000: the hypervisor vendor leaf ("KVMKVMKVM").
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
/// Leaf 0x8000_0008 (AMD): ECX[7:0] is the number of cores minus one.
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM's supported CPUID has no hypervisor leaf {LEAF_HYPERVISOR:#x}")]
    NoHypervisorLeaf,
}

/// Bits needed to number `count` cores.
fn bits_for(count: u8) -> u32 {
    (u32::from(count.max(1)) - 1)
        .checked_ilog2()
        .map_or(0, |log| log + 1)
}

fn patch_entry(entry: &mut kvm_cpuid_entry2, apic_id: u8, vcpu_count: u8) {
    let id = u32::from(apic_id);
    let count = u32::from(vcpu_count);
    match entry.function {
        LEAF_FEATURES => {
            entry.ebx = (entry.ebx & 0x0000_ffff)
                | (id << EBX_APIC_ID_SHIFT)
                | (count << EBX_LOGICAL_COUNT_SHIFT);
            entry.ecx |= ECX_HYPERVISOR;
            if vcpu_count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            let cache_level = (entry.eax >> 5) & 0x7;
            // One thread per core; the last-level cache is shared by the whole package.
            let sharing = if cache_level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
        }
        LEAF_THERMAL_POWER => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_TOPOLOGY => {
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = bits_for(vcpu_count);
                    entry.ebx = count;
                    entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
            entry.edx = id;
        }
        LEAF_AMD_SIZE_IDS => {
            entry.ecx = (entry.ecx & !0xff) | (count - 1);
        }
        _ => {}
    }
}

/// Adapts KVM's supported CPUID for vCPU `apic_id` of `vcpu_count`.
pub fn cpuid_for_vcpu(supported: &CpuId, apic_id: u8, vcpu_count: u8) -> Result<CpuId, CpuidError> {
    let mut cpuid = supported.clone();
    if !cpuid
        .as_slice()
        .iter()
        .any(|entry| entry.function == LEAF_HYPERVISOR)
    {
        return Err(CpuidError::NoHypervisorLeaf);
    }
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, apic_id, vcpu_count);
    }
    Ok(cpuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn each_vcpu_sees_its_apic_id_and_the_count() {
        let supported = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_HYPERVISOR, 0),
        ])
        .unwrap();
        let cpuid = cpuid_for_vcpu(&supported, 3, 4).unwrap();
        let leaves = cpuid.as_slice();
        assert_eq!(leaves[0].ebx >> 24, 3);
        assert_eq!((leaves[0].ebx >> 16) & 0xff, 4);
        assert_ne!(leaves[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaves[1].edx, 3);
        assert_eq!(leaves[2].ebx, 4);
        assert_eq!(leaves[2].eax, 2);
    }

    #[test]
    fn topology_shift_covers_the_count() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(32), 5);
    }

    #[test]
    fn missing_hypervisor_leaf_is_an_error() {
        let supported = CpuId::from_entries(&[entry(LEAF_FEATURES, 0)]).unwrap();
        assert!(cpuid_for_vcpu(&supported, 0, 1).is_err());
    }
}
