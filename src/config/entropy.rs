//! Firecracker's `entropy` device.

use serde::{Deserialize, Serialize};

use super::{validate_rate_limiter, ConfigError, RateLimiterConfig};

/// Firecracker's `entropy`: a virtio-rng device that fills the guest's buffers from the host's
/// `getrandom`, with an optional rate limiter (bandwidth in bytes, ops in requests).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl EntropyConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_rate_limiter(
            || "entropy rate_limiter".to_string(),
            self.rate_limiter.as_ref(),
        )
    }
}
