//! Firecracker's custom CPU templates (`PUT /cpu-config`, the config file's `cpu-config`): what
//! the guest is told about its CPU, as bit masks over CPUID leaves and MSRs (x86_64) or
//! registers and vCPU features (aarch64), and KVM capabilities the host must have. The language
//! is Firecracker's (its `docs/cpu_templates/schema.json`); applying it is the arch's
//! (`src/arch/*/cpu_template.rs`).

use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A custom CPU template. Sections of the other arch are refused when the VM is built.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTemplate {
    /// `"N"`: the host's KVM must have capability N; `"!N"`: do not check for N.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_capabilities: Vec<KvmCapability>,
    /// aarch64: bits of `kvm_vcpu_init.features[index]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_features: Vec<VcpuFeatureModifier>,
    /// x86_64: bits of CPUID leaves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// x86_64: bits of MSRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub msr_modifiers: Vec<MsrModifier>,
    /// aarch64: bits of registers (KVM_SET_ONE_REG ids).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reg_modifiers: Vec<RegModifier>,
}

/// A KVM capability the template requires, or one whose check it drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmCapability {
    Require(u32),
    Drop(u32),
}

impl<'de> Deserialize<'de> for KvmCapability {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let (drop, number) = match text.strip_prefix('!') {
            Some(number) => (true, number),
            None => (false, text.as_str()),
        };
        let cap = number.parse::<u32>().map_err(|_| {
            D::Error::custom(format!(
                "kvm_capabilities: {text:?} is not a capability number (\"N\" or \"!N\")"
            ))
        })?;
        Ok(if drop {
            KvmCapability::Drop(cap)
        } else {
            KvmCapability::Require(cap)
        })
    }
}

impl Serialize for KvmCapability {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            KvmCapability::Require(cap) => serializer.collect_str(cap),
            KvmCapability::Drop(cap) => serializer.collect_str(&format_args!("!{cap}")),
        }
    }
}

/// Bits to clear, set or keep in a value of `BITS` bits: Firecracker's `0b[01x]…` strings,
/// where a string shorter than the value keeps the bits it leaves out (they are `x`), and `_`
/// may separate groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bitmap<const BITS: u32> {
    /// The bits the template decides.
    pub filter: u128,
    /// What it decides for them.
    pub value: u128,
}

impl<const BITS: u32> Bitmap<BITS> {
    /// `old` with the template's bits put in.
    pub fn apply(&self, old: u128) -> u128 {
        (old & !self.filter) | (self.value & self.filter)
    }

    fn parse(text: &str) -> Result<Self, String> {
        let digits = text
            .strip_prefix("0b")
            .ok_or_else(|| format!("bitmap {text:?} does not start with 0b"))?;
        let digits: Vec<char> = digits.chars().filter(|c| *c != '_').collect();
        if digits.len() > BITS as usize {
            return Err(format!(
                "bitmap {text:?} has {} bits; the register has {BITS}",
                digits.len()
            ));
        }
        let mut bitmap = Self {
            filter: 0,
            value: 0,
        };
        for (bit, digit) in digits.iter().rev().enumerate() {
            match digit {
                '0' => bitmap.filter |= 1 << bit,
                '1' => {
                    bitmap.filter |= 1 << bit;
                    bitmap.value |= 1 << bit;
                }
                'x' => {}
                other => {
                    return Err(format!(
                        "bitmap {text:?} has {other:?}: use 0, 1 or x (keep)"
                    ))
                }
            }
        }
        Ok(bitmap)
    }
}

impl<const BITS: u32> fmt::Display for Bitmap<BITS> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0b")?;
        for bit in (0..BITS).rev() {
            let c = match (self.filter >> bit & 1, self.value >> bit & 1) {
                (0, _) => 'x',
                (_, 0) => '0',
                _ => '1',
            };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl<'de, const BITS: u32> Deserialize<'de> for Bitmap<BITS> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::parse(&String::deserialize(deserializer)?).map_err(D::Error::custom)
    }
}

impl<const BITS: u32> Serialize for Bitmap<BITS> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A number written as a string (`"0x1"`, `"10"`), as Firecracker's templates write leaves,
/// subleaves and addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Number(pub u64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        };
        parsed
            .map(Number)
            .map_err(|_| D::Error::custom(format!("{text:?} is not a number (\"0x1a\" or \"26\")")))
    }
}

impl Serialize for Number {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{:#x}", self.0))
    }
}

/// The CPUID registers a leaf answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuidRegister {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    pub register: CpuidRegister,
    pub bitmap: Bitmap<32>,
}

/// The changes to one CPUID leaf (and subleaf).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    pub leaf: Number,
    pub subleaf: Number,
    /// KVM's CPUID entry flags (`KVM_CPUID_FLAG_SIGNIFCANT_INDEX`: the subleaf counts).
    #[serde(default)]
    pub flags: u32,
    pub modifiers: Vec<CpuidRegisterModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    pub addr: Number,
    pub bitmap: Bitmap<64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegModifier {
    pub addr: Number,
    pub bitmap: Bitmap<128>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuFeatureModifier {
    pub index: u32,
    pub bitmap: Bitmap<32>,
}

/// Firecracker's static CPU templates (`machine-config`'s `cpu_template`). Only `None` is
/// taken: mote has none of the built-in ones, and says so naming the template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StaticCpuTemplate {
    #[default]
    None,
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_clear_set_and_keep_and_short_ones_keep_the_rest() {
        let bitmap: Bitmap<32> = serde_json::from_str(r#""0b10_x0""#).unwrap();
        assert_eq!(bitmap.filter, 0b1101);
        assert_eq!(bitmap.value, 0b1000);
        assert_eq!(bitmap.apply(0xffff_fff7), 0xffff_fffa);
        assert_eq!(bitmap.apply(0), 0b1000);
        assert_eq!(
            bitmap.to_string(),
            format!("0b{}10x0", "x".repeat(28)),
            "written back whole"
        );
        let again: Bitmap<32> = serde_json::from_str(&format!("\"{bitmap}\"")).unwrap();
        assert_eq!(again, bitmap);
    }

    #[test]
    fn bad_bitmaps_are_refused_naming_what_is_wrong() {
        let err = |text: &str| {
            serde_json::from_str::<Bitmap<32>>(text)
                .unwrap_err()
                .to_string()
        };
        assert!(err(r#""101""#).contains("does not start with 0b"));
        assert!(err(r#""0b102""#).contains("use 0, 1 or x"));
        assert!(err(&format!("\"0b{}\"", "1".repeat(33))).contains("has 33 bits"));
        assert!(serde_json::from_str::<Bitmap<128>>(&format!("\"0b{}\"", "1".repeat(128))).is_ok());
    }

    /// Firecracker's own example template (docs/cpu_templates/cpu-templates.md) reads, and
    /// writes back in the same language.
    #[test]
    fn firecrackers_example_templates_read() {
        let x86: CpuTemplate = serde_json::from_str(
            r#"{"kvm_capabilities": ["!56"],
                "cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                  "modifiers": [{"register": "eax", "bitmap": "0bxxxx000000000011xx00011011110010"}]}],
                "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b0000000000000000000000000000000000000000000000000000000000000000"}]}"#,
        )
        .unwrap();
        assert_eq!(x86.kvm_capabilities, [KvmCapability::Drop(56)]);
        assert_eq!(x86.cpuid_modifiers[0].leaf, Number(1));
        assert_eq!(x86.msr_modifiers[0].addr, Number(0x10a));
        assert_eq!(x86.msr_modifiers[0].bitmap.filter, u128::from(u64::MAX));
        let arm: CpuTemplate = serde_json::from_str(
            r#"{"kvm_capabilities": ["171", "172"],
                "vcpu_features": [{"index": 0, "bitmap": "0b1100000"}],
                "reg_modifiers": [{"addr": "0x603000000013c020",
                  "bitmap": "0bxxxxxxxxxxxx0000xxxxxxxxxxxx0000xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}"#,
        )
        .unwrap();
        assert_eq!(arm.reg_modifiers[0].addr, Number(0x6030_0000_0013_c020));
        assert_eq!(arm.vcpu_features[0].bitmap.value, 0b110_0000);
        let text = serde_json::to_string(&arm).unwrap();
        assert_eq!(serde_json::from_str::<CpuTemplate>(&text).unwrap(), arm);
        assert!(
            text.contains(r#""kvm_capabilities":["171","172"]"#),
            "{text}"
        );
    }

    #[test]
    fn unknown_fields_and_bad_numbers_are_refused() {
        assert!(serde_json::from_str::<CpuTemplate>(r#"{"cpuid": []}"#).is_err());
        let err = serde_json::from_str::<CpuTemplate>(r#"{"kvm_capabilities": ["x"]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a capability number"), "{err}");
        let err = serde_json::from_str::<MsrModifier>(r#"{"addr": "0xzz", "bitmap": "0b1"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a number"), "{err}");
        // Firecracker's schema writes numbers as strings only.
        assert!(serde_json::from_str::<MsrModifier>(r#"{"addr": 266, "bitmap": "0b1"}"#).is_err());
    }
}
