//! MMDS, the metadata service: Firecracker's `mmds-config` (`PUT /mmds/config`), checked
//! against the network interfaces it names.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub use devices::mmds::{MmdsVersion, DEFAULT_IPV4_ADDR as DEFAULT_MMDS_IPV4_ADDR};

use super::{ConfigError, NetworkInterfaceConfig};

/// Firecracker's `MmdsConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: MmdsVersion,
    /// The interfaces whose frames to the MMDS address are answered by MMDS.
    pub network_interfaces: Vec<String>,
    /// A link-local address (169.254.0.0/16); 169.254.169.254 when not given.
    #[serde(default)]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Always answer in IMDS text, whatever the guest's `Accept` asks for.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// The address MMDS answers on.
    pub fn address(&self) -> Ipv4Addr {
        self.ipv4_address.unwrap_or(DEFAULT_MMDS_IPV4_ADDR)
    }

    /// Checks the configuration against the interfaces configured (Firecracker's rules and
    /// words).
    pub fn validate(&self, ifaces: &[NetworkInterfaceConfig]) -> Result<(), ConfigError> {
        if self.network_interfaces.is_empty() {
            return Err(ConfigError::MmdsNoInterfaces);
        }
        if let Some(unknown) = self
            .network_interfaces
            .iter()
            .find(|id| !ifaces.iter().any(|iface| iface.iface_id == **id))
        {
            return Err(ConfigError::MmdsUnknownInterface(unknown.clone()));
        }
        let addr = self.address();
        if !addr.is_link_local() {
            return Err(ConfigError::MmdsAddress(addr));
        }
        Ok(())
    }
}

/// The data store's document: `PUT|PATCH /mmds` and `PUT /snapshot/load`'s `mmds_data` carry a JSON
/// object, anything in it.
pub type MmdsData = serde_json::Value;

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(id: &str) -> NetworkInterfaceConfig {
        NetworkInterfaceConfig {
            iface_id: id.into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            mtu: None,
        }
    }

    #[test]
    fn mmds_config_is_checked_in_firecrackers_words() {
        let ifaces = [iface("eth0")];
        let config: MmdsConfig =
            serde_json::from_str(r#"{"network_interfaces": ["eth0"]}"#).unwrap();
        assert_eq!(config.version, MmdsVersion::V1);
        assert_eq!(config.address(), Ipv4Addr::new(169, 254, 169, 254));
        config.validate(&ifaces).unwrap();
        let bad = |json: &str| {
            serde_json::from_str::<MmdsConfig>(json)
                .unwrap()
                .validate(&ifaces)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(r#"{"network_interfaces": []}"#).contains("is empty"));
        let err = bad(r#"{"network_interfaces": ["eth0", "eth9"]}"#);
        assert!(
            err.contains("does not correspond to any existing network interface")
                && err.contains("eth9"),
            "{err}"
        );
        let err = bad(r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#);
        assert!(
            err.contains("not link local") && err.contains("ipv4_address 10.0.0.1"),
            "{err}"
        );
        assert!(serde_json::from_str::<MmdsConfig>(
            r#"{"network_interfaces": [], "version": "V3"}"#
        )
        .is_err());
    }
}
