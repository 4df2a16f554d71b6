//! Firecracker's API endpoints, each spelt once: its method, the first segment of its path, and
//! the name Firecracker's metrics count it under. The router serves only what is listed here and
//! the metrics count from the same list, so the two cannot drift apart.

/// What a request is, from its method and the first segment of its path (its body and the
/// rest of its path are the router's to check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    GetMachineConfig,
    /// `GET /vm/config`.
    GetVm,
    PutActions,
    PutBootSource,
    /// `PUT /drives/{id}`.
    PutDrive,
    PutLogger,
    PutMachineConfig,
    PutMetrics,
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface,
    PutVsock,
    PutEntropy,
    /// `PUT /cpu-config`: a custom CPU template.
    PutCpuConfig,
    /// `GET /balloon` and `GET /balloon/statistics`.
    GetBalloon,
    PutBalloon,
    /// `PATCH /balloon` and `PATCH /balloon/statistics`.
    PatchBalloon,
    /// `PUT /snapshot/create` and `PUT /snapshot/load`.
    PutSnapshot,
    /// `PATCH /drives/{id}`.
    PatchDrive,
    PatchMachineConfig,
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface,
    /// `PATCH /vm`: pause and resume.
    PatchVm,
    /// `GET /mmds`.
    GetMmds,
    /// `PUT /mmds` and `PUT /mmds/config`.
    PutMmds,
    /// `PATCH /mmds`.
    PatchMmds,
}

/// One endpoint: a method and a path's first segment.
#[derive(Debug)]
pub struct Endpoint {
    pub kind: Kind,
    pub method: &'static str,
    /// The path's first segment (`drives` in `/drives/rootfs`); empty for `/`.
    pub segment: &'static str,
    /// Its counters' name in Firecracker's `<method>_api_requests` metrics (`<name>_count`, and
    /// `<name>_fails` but for GET); `None` for a request those metrics do not count.
    pub metrics: Option<&'static str>,
}

const fn endpoint(
    kind: Kind,
    method: &'static str,
    segment: &'static str,
    metrics: Option<&'static str>,
) -> Endpoint {
    Endpoint {
        kind,
        method,
        segment,
        metrics,
    }
}

/// Every endpoint mote serves.
pub const ENDPOINTS: [Endpoint; 25] = [
    endpoint(Kind::GetInstanceInfo, "GET", "", Some("instance_info")),
    endpoint(Kind::GetVersion, "GET", "version", Some("vmm_version")),
    endpoint(
        Kind::GetMachineConfig,
        "GET",
        "machine-config",
        Some("machine_cfg"),
    ),
    endpoint(Kind::GetVm, "GET", "vm", Some("vm_config")),
    endpoint(Kind::PutActions, "PUT", "actions", Some("actions")),
    endpoint(
        Kind::PutBootSource,
        "PUT",
        "boot-source",
        Some("boot_source"),
    ),
    endpoint(Kind::PutDrive, "PUT", "drives", Some("drive")),
    endpoint(Kind::PutLogger, "PUT", "logger", Some("logger")),
    endpoint(
        Kind::PutMachineConfig,
        "PUT",
        "machine-config",
        Some("machine_cfg"),
    ),
    endpoint(Kind::PutMetrics, "PUT", "metrics", Some("metrics")),
    endpoint(
        Kind::PutNetworkInterface,
        "PUT",
        "network-interfaces",
        Some("network"),
    ),
    endpoint(Kind::PutVsock, "PUT", "vsock", Some("vsock")),
    // Firecracker's `put_api_requests` has no counters for it.
    endpoint(Kind::PutEntropy, "PUT", "entropy", None),
    endpoint(Kind::PutCpuConfig, "PUT", "cpu-config", Some("cpu_cfg")),
    endpoint(Kind::PutSnapshot, "PUT", "snapshot", None),
    // Firecracker's request metrics have no counters for the balloon.
    endpoint(Kind::GetBalloon, "GET", "balloon", None),
    endpoint(Kind::PutBalloon, "PUT", "balloon", None),
    endpoint(Kind::PatchBalloon, "PATCH", "balloon", None),
    endpoint(Kind::PatchDrive, "PATCH", "drives", Some("drive")),
    endpoint(
        Kind::PatchMachineConfig,
        "PATCH",
        "machine-config",
        Some("machine_cfg"),
    ),
    endpoint(
        Kind::PatchNetworkInterface,
        "PATCH",
        "network-interfaces",
        Some("network"),
    ),
    endpoint(Kind::PatchVm, "PATCH", "vm", Some("vm")),
    endpoint(Kind::GetMmds, "GET", "mmds", Some("mmds")),
    endpoint(Kind::PutMmds, "PUT", "mmds", Some("mmds")),
    endpoint(Kind::PatchMmds, "PATCH", "mmds", Some("mmds")),
];

/// Firecracker paths mote does not implement yet: a clear refusal, not a generic one.
pub const NOT_YET: [&str; 1] = ["hotplug"];

/// The endpoint `method /segment/…` is, and its place in [`ENDPOINTS`], if mote serves it.
pub fn find(method: &str, segment: &str) -> Option<(usize, &'static Endpoint)> {
    ENDPOINTS
        .iter()
        .enumerate()
        .find(|(_, endpoint)| endpoint.method == method && endpoint.segment == segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_endpoint_and_each_metrics_name_is_listed_once() {
        for (index, endpoint) in ENDPOINTS.iter().enumerate() {
            let (found, _) = find(endpoint.method, endpoint.segment).unwrap();
            assert_eq!(found, index, "{endpoint:?} is listed twice");
            assert!(!NOT_YET.contains(&endpoint.segment), "{endpoint:?}");
            let same_name = ENDPOINTS.iter().filter(|other| {
                other.method == endpoint.method && other.metrics == endpoint.metrics
            });
            if endpoint.metrics.is_some() {
                assert_eq!(
                    same_name.count(),
                    1,
                    "{endpoint:?}: its metrics name is taken"
                );
            }
        }
    }
}
