//! A custom CPU template on x86_64: its CPUID modifiers change the CPUID KVM supports before
//! mote shapes it per vCPU (APIC IDs and topology stay mote's, as Firecracker's normalization
//! keeps them its own), and its MSR modifiers change the boot MSRs' values once they are set.

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use crate::config::{CpuTemplate, CpuidLeafModifier, CpuidRegister, MsrModifier};

#[derive(Debug, thiserror::Error)]
pub enum CpuTemplateError {
    #[error("cpu-config: {0} are for aarch64; this is an x86_64 host")]
    OtherArch(&'static str),
    #[error("cpu-config: CPUID leaf {leaf:#x} subleaf {subleaf:#x} is not one KVM offers on this host, so there is nothing to modify")]
    NoLeaf { leaf: u64, subleaf: u64 },
    #[error("cpu-config: {what} {value:#x} is out of range")]
    OutOfRange { what: &'static str, value: u64 },
    #[error("cpu-config: cannot {what} MSR {addr:#x}: {reason}")]
    Msr {
        what: &'static str,
        addr: u64,
        reason: String,
    },
}

/// Refuses the sections a template may only have on aarch64.
pub fn check(template: &CpuTemplate) -> Result<(), CpuTemplateError> {
    if !template.reg_modifiers.is_empty() {
        return Err(CpuTemplateError::OtherArch("reg_modifiers"));
    }
    if !template.vcpu_features.is_empty() {
        return Err(CpuTemplateError::OtherArch("vcpu_features"));
    }
    Ok(())
}

/// Applies the CPUID modifiers to `cpuid`; a leaf KVM does not offer is an error (a template
/// written for another CPU).
pub fn apply_cpuid(
    cpuid: &mut CpuId,
    modifiers: &[CpuidLeafModifier],
) -> Result<(), CpuTemplateError> {
    for modifier in modifiers {
        let leaf = u32::try_from(modifier.leaf.0).map_err(|_| CpuTemplateError::OutOfRange {
            what: "CPUID leaf",
            value: modifier.leaf.0,
        })?;
        let subleaf =
            u32::try_from(modifier.subleaf.0).map_err(|_| CpuTemplateError::OutOfRange {
                what: "CPUID subleaf",
                value: modifier.subleaf.0,
            })?;
        let entry = cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|entry| entry.function == leaf && entry.index == subleaf)
            .ok_or(CpuTemplateError::NoLeaf {
                leaf: modifier.leaf.0,
                subleaf: modifier.subleaf.0,
            })?;
        entry.flags = modifier.flags;
        for register in &modifier.modifiers {
            let value = match register.register {
                CpuidRegister::Eax => &mut entry.eax,
                CpuidRegister::Ebx => &mut entry.ebx,
                CpuidRegister::Ecx => &mut entry.ecx,
                CpuidRegister::Edx => &mut entry.edx,
            };
            // A 32-bit bitmap only touches the low 32 bits.
            *value = register.bitmap.apply(u128::from(*value)) as u32;
        }
    }
    Ok(())
}

/// Applies the MSR modifiers to the vCPU's MSRs as they are now (after the boot MSRs).
pub fn apply_msrs(vcpu: &VcpuFd, modifiers: &[MsrModifier]) -> Result<(), CpuTemplateError> {
    for modifier in modifiers {
        let addr = modifier.addr.0;
        let index = u32::try_from(addr).map_err(|_| CpuTemplateError::OutOfRange {
            what: "MSR address",
            value: addr,
        })?;
        let msr_error =
            |what: &'static str, reason: String| CpuTemplateError::Msr { what, addr, reason };
        let entry = kvm_msr_entry {
            index,
            ..Default::default()
        };
        let mut msrs =
            Msrs::from_entries(&[entry]).map_err(|err| msr_error("read", format!("{err:?}")))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(|err| msr_error("read", err.to_string()))?;
        if read != 1 {
            return Err(msr_error("read", "KVM does not have it".to_string()));
        }
        let old = msrs.as_slice()[0].data;
        let entry = kvm_msr_entry {
            index,
            // A 64-bit bitmap only touches the low 64 bits.
            data: modifier.bitmap.apply(u128::from(old)) as u64,
            ..Default::default()
        };
        let msrs =
            Msrs::from_entries(&[entry]).map_err(|err| msr_error("write", format!("{err:?}")))?;
        let written = vcpu
            .set_msrs(&msrs)
            .map_err(|err| msr_error("write", err.to_string()))?;
        if written != 1 {
            return Err(msr_error("write", "KVM refused the value".to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    fn cpuid() -> CpuId {
        let entry = |function, index, ecx| kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ..Default::default()
        };
        CpuId::from_entries(&[entry(1, 0, 0xffff_0000), entry(7, 0, 0), entry(7, 1, 0)]).unwrap()
    }

    #[test]
    fn cpuid_modifiers_change_only_their_leaf_and_bits() {
        let template: CpuTemplate = serde_json::from_str(
            r#"{"cpuid_modifiers": [
                {"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                 "modifiers": [{"register": "ecx", "bitmap": "0b0xxxxxxxxxxxxxxx_xxxxxxxxxxxxxx11"}]},
                {"leaf": "0x7", "subleaf": "0x1", "flags": 1,
                 "modifiers": [{"register": "ebx", "bitmap": "0b101"}]}]}"#,
        )
        .unwrap();
        let mut cpuid = cpuid();
        apply_cpuid(&mut cpuid, &template.cpuid_modifiers).unwrap();
        let entries = cpuid.as_slice();
        assert_eq!(entries[0].ecx, 0x7fff_0003);
        assert_eq!(entries[1].ebx, 0, "leaf 7 subleaf 0 untouched");
        assert_eq!((entries[2].ebx, entries[2].flags), (0b101, 1));
    }

    #[test]
    fn a_leaf_kvm_does_not_offer_is_refused() {
        let template: CpuTemplate = serde_json::from_str(
            r#"{"cpuid_modifiers": [{"leaf": "0x8000001f", "subleaf": "0x0", "flags": 0,
                 "modifiers": [{"register": "eax", "bitmap": "0b0"}]}]}"#,
        )
        .unwrap();
        let err = apply_cpuid(&mut cpuid(), &template.cpuid_modifiers).unwrap_err();
        assert!(
            err.to_string().contains("leaf 0x8000001f subleaf 0x0"),
            "{err}"
        );
    }

    #[test]
    fn aarch64_sections_are_refused() {
        let template: CpuTemplate =
            serde_json::from_str(r#"{"vcpu_features": [{"index": 0, "bitmap": "0b1"}]}"#).unwrap();
        assert_eq!(
            check(&template).unwrap_err().to_string(),
            "cpu-config: vcpu_features are for aarch64; this is an x86_64 host"
        );
    }
}
