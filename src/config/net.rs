//! Network interfaces: Firecracker's `network-interfaces` entries and MAC addresses.

use serde::{Deserialize, Serialize};

pub use devices::virtio::net::MacAddr;
use devices::virtio::net::MIN_MTU;

use super::{validate_rate_limiter, ConfigError, RateLimiterConfig};

/// Firecracker's `network-interfaces` entry: a virtio-net device on an existing host TAP, with
/// optional rate limiters for what it receives and what it sends (bytes of frames, frames).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    pub iface_id: String,
    /// The TAP device on the host (it must exist; mote does not create it).
    pub host_dev_name: String,
    /// The guest's MAC address; without one the guest picks its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// The MTU the guest's driver is told (VIRTIO_NET_F_MTU); without one it picks its own
    /// (1500). The TAP's MTU is the host's to set to match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

/// `PATCH /network-interfaces/{id}`: new limits for a running guest's interface. A limiter or
/// bucket left out stays as it is; a bucket of size 0 is removed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetworkInterfaceUpdate {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_limiters(
            &self.iface_id,
            self.rx_rate_limiter.as_ref(),
            self.tx_rate_limiter.as_ref(),
        )
    }
}

fn validate_limiters(
    iface_id: &str,
    rx: Option<&RateLimiterConfig>,
    tx: Option<&RateLimiterConfig>,
) -> Result<(), ConfigError> {
    validate_rate_limiter(|| format!("interface {iface_id} rx_rate_limiter"), rx)?;
    validate_rate_limiter(|| format!("interface {iface_id} tx_rate_limiter"), tx)
}

/// The longest interface id (Firecracker's limit for ids in paths).
pub const IFACE_ID_MAX_LEN: usize = 64;
/// The longest host interface name Linux takes.
pub const HOST_DEV_NAME_MAX_LEN: usize = 15;

impl NetworkInterfaceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if self.iface_id.is_empty()
            || self.iface_id.len() > IFACE_ID_MAX_LEN
            || !self.iface_id.chars().all(valid_char)
        {
            return Err(ConfigError::IfaceId(self.iface_id.clone()));
        }
        let name = &self.host_dev_name;
        if name.is_empty()
            || name.len() > HOST_DEV_NAME_MAX_LEN
            || name
                .chars()
                .any(|c| c == '/' || c == ',' || c.is_whitespace() || c == '\0')
        {
            return Err(ConfigError::HostDevName(name.clone()));
        }
        if let Some(mtu) = self.mtu.filter(|mtu| *mtu < MIN_MTU) {
            return Err(ConfigError::Mtu {
                iface_id: self.iface_id.clone(),
                mtu,
            });
        }
        validate_limiters(
            &self.iface_id,
            self.rx_rate_limiter.as_ref(),
            self.tx_rate_limiter.as_ref(),
        )
    }
}

/// Checks a set of interfaces: valid ids and names, no id, TAP or MAC used twice.
pub fn validate_network_interfaces(ifaces: &[NetworkInterfaceConfig]) -> Result<(), ConfigError> {
    for (index, iface) in ifaces.iter().enumerate() {
        iface.validate()?;
        for earlier in &ifaces[..index] {
            if earlier.iface_id == iface.iface_id {
                return Err(ConfigError::DuplicateIfaceId(iface.iface_id.clone()));
            }
            if earlier.host_dev_name == iface.host_dev_name {
                return Err(ConfigError::DuplicateTap {
                    first: earlier.iface_id.clone(),
                    second: iface.iface_id.clone(),
                    tap: iface.host_dev_name.clone(),
                });
            }
            if let Some(mac) = iface
                .guest_mac
                .filter(|mac| Some(*mac) == earlier.guest_mac)
            {
                return Err(ConfigError::DuplicateMac {
                    first: earlier.iface_id.clone(),
                    second: iface.iface_id.clone(),
                    mac,
                });
            }
        }
    }
    Ok(())
}
