//! Firecracker's `balloon` device and its updates after boot.

use serde::{Deserialize, Serialize};

use super::{ConfigError, MachineConfig};

/// Firecracker's `balloon`: the target size and the device's options, fixed at boot but for
/// the target and the statistics interval.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target size, MiB of guest memory the balloon should hold.
    pub amount_mib: u32,
    /// Let the guest take pages back from the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0 turns the statistics off.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting (Firecracker 1.14): the host starts runs in which the guest hands
    /// over free memory (`/balloon/hinting/…`).
    #[serde(default)]
    pub free_page_hinting: bool,
    /// The guest reports free memory, which goes back to the host.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl BalloonConfig {
    /// Checks the options and that the target fits in the guest's memory.
    pub fn validate(&self, machine: &MachineConfig) -> Result<(), ConfigError> {
        check_amount(self.amount_mib, machine.mem_size_mib)
    }
}

/// The balloon cannot be larger than the guest's memory (Firecracker's rule, at PUT and at
/// PATCH).
pub fn check_amount(amount_mib: u32, mem_size_mib: u64) -> Result<(), ConfigError> {
    if u64::from(amount_mib) > mem_size_mib {
        return Err(ConfigError::BalloonTooLarge {
            amount_mib,
            mem_size_mib,
        });
    }
    Ok(())
}

/// `PATCH /balloon/hinting/start`: whether the guest's end of the run is acknowledged at once
/// (Firecracker's default), so that it frees what it handed over.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonHintingStart {
    #[serde(default = "acknowledge_by_default")]
    pub acknowledge_on_stop: bool,
}

impl Default for BalloonHintingStart {
    fn default() -> Self {
        Self {
            acknowledge_on_stop: acknowledge_by_default(),
        }
    }
}

fn acknowledge_by_default() -> bool {
    true
}

/// `PATCH /balloon`: a new target.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`: a new polling interval (statistics stay on or off).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}
