//! Firecracker's `entropy` device.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Firecracker's `entropy`: a virtio-rng device that fills the guest's buffers from the host's
/// `getrandom`. Its `rate_limiter` is taken so that it can be refused by name: mote has no
/// rate limiters yet, and a limit silently dropped would be a limit the user thinks is there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

impl EntropyConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.rate_limiter {
            // Firecracker reads an explicit null as no rate limiter.
            None | Some(serde_json::Value::Null) => Ok(()),
            Some(_) => Err(ConfigError::EntropyRateLimiter),
        }
    }
}
