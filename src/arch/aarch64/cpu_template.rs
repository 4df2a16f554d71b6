//! A custom CPU template on aarch64: its vCPU features change `kvm_vcpu_init.features` (mote
//! still sets PSCI 0.2 and powers secondaries off: its boot needs both), and its register
//! modifiers change registers once the boot vCPU state is set. KVM refuses writes to ID
//! registers unless the host kernel lets them be written (Linux 6.7 and later).

use kvm_bindings::kvm_vcpu_init;
use kvm_ioctls::VcpuFd;

use super::regs::reg_size;
use crate::config::{CpuTemplate, RegModifier, VcpuFeatureModifier};

#[derive(Debug, thiserror::Error)]
pub enum CpuTemplateError {
    #[error("cpu-config: {0} are for x86_64; this is an aarch64 host")]
    OtherArch(&'static str),
    #[error("cpu-config: vcpu_features index {0} is out of range: KVM has 7 feature words")]
    FeatureIndex(u32),
    #[error("cpu-config: register {id:#x} is {size} bytes wide; a template modifies at most 16")]
    TooWide { id: u64, size: usize },
    #[error("cpu-config: cannot {what} register {id:#x}: {source}")]
    Reg {
        what: &'static str,
        id: u64,
        source: kvm_ioctls::Error,
    },
}

/// Refuses the sections a template may only have on x86_64.
pub fn check(template: &CpuTemplate) -> Result<(), CpuTemplateError> {
    if !template.cpuid_modifiers.is_empty() {
        return Err(CpuTemplateError::OtherArch("cpuid_modifiers"));
    }
    if !template.msr_modifiers.is_empty() {
        return Err(CpuTemplateError::OtherArch("msr_modifiers"));
    }
    Ok(())
}

/// Applies the vCPU feature modifiers to `init`.
pub fn apply_vcpu_features(
    init: &mut kvm_vcpu_init,
    modifiers: &[VcpuFeatureModifier],
) -> Result<(), CpuTemplateError> {
    for modifier in modifiers {
        let word = usize::try_from(modifier.index)
            .ok()
            .and_then(|index| init.features.get_mut(index))
            .ok_or(CpuTemplateError::FeatureIndex(modifier.index))?;
        // A 32-bit bitmap only touches the low 32 bits.
        *word = modifier.bitmap.apply(u128::from(*word)) as u32;
    }
    Ok(())
}

/// Applies the register modifiers to the vCPU's registers as they are now.
pub fn apply_regs(vcpu: &VcpuFd, modifiers: &[RegModifier]) -> Result<(), CpuTemplateError> {
    for modifier in modifiers {
        let id = modifier.addr.0;
        let size = reg_size(id);
        if size > 16 {
            return Err(CpuTemplateError::TooWide { id, size });
        }
        let mut bytes = [0u8; 16];
        vcpu.get_one_reg(id, &mut bytes[..size])
            .map_err(|source| CpuTemplateError::Reg {
                what: "read",
                id,
                source,
            })?;
        let new = modifier
            .bitmap
            .apply(u128::from_le_bytes(bytes))
            .to_le_bytes();
        vcpu.set_one_reg(id, &new[..size])
            .map_err(|source| CpuTemplateError::Reg {
                what: "write",
                id,
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_features_change_their_word_and_bad_indexes_are_refused() {
        let template: CpuTemplate =
            serde_json::from_str(r#"{"vcpu_features": [{"index": 0, "bitmap": "0b0xx00000"}]}"#)
                .unwrap();
        let mut init = kvm_vcpu_init::default();
        init.features[0] = 0b1110_0101;
        apply_vcpu_features(&mut init, &template.vcpu_features).unwrap();
        assert_eq!(init.features[0], 0b0110_0000);
        let bad: CpuTemplate =
            serde_json::from_str(r#"{"vcpu_features": [{"index": 7, "bitmap": "0b1"}]}"#).unwrap();
        assert!(apply_vcpu_features(&mut init, &bad.vcpu_features).is_err());
    }

    #[test]
    fn x86_sections_are_refused() {
        let template: CpuTemplate =
            serde_json::from_str(r#"{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b0"}]}"#)
                .unwrap();
        assert_eq!(
            check(&template).unwrap_err().to_string(),
            "cpu-config: msr_modifiers are for x86_64; this is an aarch64 host"
        );
    }
}
