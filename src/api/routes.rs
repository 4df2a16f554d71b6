//! From an HTTP request to a [`VmmAction`]: Firecracker's paths, methods and JSON bodies. Every
//! refusal names what was wrong (the field, for a body) so a client can fix its request.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::paths::{self, Kind, NOT_YET};
use crate::config::{
    BalloonConfig, BalloonHintingStart, BalloonStatsUpdate, BalloonUpdate, BootSourceConfig,
    CpuTemplate, DriveConfig, DriveUpdate, EntropyConfig, LoggerConfig, MachineConfig,
    MachineConfigUpdate, MetricsConfig, MmdsConfig, MmdsData, NetworkInterfaceConfig,
    NetworkInterfaceUpdate, VsockConfig,
};
use crate::config::{CreateSnapshotParams, LoadSnapshotParams};
use crate::rpc::VmmAction;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /version`, answered by the API thread itself.
    Version,
    Action(VmmAction),
}

/// `PUT /actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceActionInfo {
    action_type: ActionType,
}

#[derive(Debug, Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmState {
    state: State,
}

#[derive(Debug, Deserialize)]
enum State {
    Paused,
    Resumed,
}

/// Parses a JSON body; the error names the body, the field's path in it, and the reason.
fn body<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(format!("the {what} request needs a JSON body"));
    }
    // serde would also read a struct from a JSON array of its fields in order (`[1, 128]` as
    // a machine-config); every body here is an object, so anything else is refused.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(format!("invalid {what} body: expected a JSON object"));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path == "." {
            format!("invalid {what} body: {inner}")
        } else {
            format!("invalid {what} body: field `{path}`: {inner}")
        }
    })?;
    deserializer
        .end()
        .map_err(|err| format!("invalid {what} body: {err}"))?;
    Ok(value)
}

/// A body that must be `{}` when given.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

/// The MMDS data store's body: a JSON object (Firecracker's document says so), anything in it.
fn mmds_body(bytes: &[u8]) -> Result<MmdsData, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err("the mmds request needs a JSON body".to_string());
    }
    let data: MmdsData =
        serde_json::from_slice(bytes).map_err(|err| format!("invalid mmds body: {err}"))?;
    if !data.is_object() {
        return Err("invalid mmds body: expected a JSON object".to_string());
    }
    Ok(data)
}

/// Firecracker's answer for a path or method it does not serve.
fn invalid(method: &str, path: &str) -> String {
    format!("Invalid request method and/or path: {method} {path}.")
}

/// Maps a request to what it asks for.
pub fn route(method: &str, path: &str, bytes: &[u8]) -> Result<Route, String> {
    let trimmed = path.trim_end_matches('/');
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    let (first, rest) = match segments.split_first() {
        Some((first, rest)) => (*first, rest),
        None => ("", &[][..]),
    };
    // Firecracker's words for both.
    if method == "GET" && !bytes.is_empty() {
        return Err("GET request cannot have a body.".to_string());
    }
    // Firecracker answers a PUT or PATCH without a body so whatever the path, but for the
    // balloon's PATCHes (its hinting stop takes none).
    if bytes.is_empty() && !(method == "PATCH" && first == "balloon") {
        match method {
            "PUT" => return Err("Empty PUT request.".to_string()),
            "PATCH" => return Err("Empty PATCH request.".to_string()),
            _ => {}
        }
    }
    let Some((_, endpoint)) = paths::find(method, first) else {
        if NOT_YET.contains(&first) {
            return Err(format!(
                "{method} {path}: /{first} is not implemented by mote yet"
            ));
        }
        return Err(invalid(method, path));
    };
    let action = match (endpoint.kind, rest) {
        (Kind::GetInstanceInfo, []) => VmmAction::GetInstanceInfo,
        (Kind::GetVersion, []) => return Ok(Route::Version),
        (Kind::GetVm, ["config"]) => VmmAction::GetVmConfig,
        (Kind::GetMachineConfig, []) => VmmAction::GetMachineConfig,
        (Kind::PutMachineConfig, []) => {
            VmmAction::PutMachineConfig(body::<MachineConfig>("machine-config", bytes)?)
        }
        (Kind::PatchMachineConfig, []) => {
            let update = body::<MachineConfigUpdate>("machine-config", bytes)?;
            if update == MachineConfigUpdate::default() {
                return Err("Empty PATCH request.".to_string());
            }
            VmmAction::PatchMachineConfig(update)
        }
        (Kind::PutBootSource, []) => {
            VmmAction::PutBootSource(body::<BootSourceConfig>("boot-source", bytes)?)
        }
        (Kind::PutDrive, [id]) => {
            checked_id(id)?;
            let drive = body::<DriveConfig>("drive", bytes)?;
            check_id(id, &drive.drive_id)?;
            VmmAction::PutDrive(drive)
        }
        (Kind::PatchDrive, [id]) => {
            checked_id(id)?;
            let update = body::<DriveUpdate>("drive", bytes)?;
            check_id(id, &update.drive_id)?;
            update
                .validate()
                .map_err(|err| format!("invalid drive body: {err}"))?;
            VmmAction::PatchDrive(update)
        }
        (Kind::PutNetworkInterface, [id]) => {
            checked_id(id)?;
            let iface = body::<NetworkInterfaceConfig>("network-interfaces", bytes)?;
            check_id(id, &iface.iface_id)?;
            VmmAction::PutNetworkInterface(iface)
        }
        (Kind::PatchNetworkInterface, [id]) => {
            checked_id(id)?;
            let update = body::<NetworkInterfaceUpdate>("network-interfaces", bytes)?;
            check_id(id, &update.iface_id)?;
            update
                .validate()
                .map_err(|err| format!("invalid network-interfaces body: {err}"))?;
            VmmAction::PatchNetworkInterface(update)
        }
        (
            Kind::PutDrive
            | Kind::PatchDrive
            | Kind::PutNetworkInterface
            | Kind::PatchNetworkInterface,
            [],
        ) => return Err(EMPTY_ID.to_string()),
        (Kind::PutSnapshot, []) => return Err("Missing snapshot operation type.".to_string()),
        (Kind::PutLogger, []) => VmmAction::PutLogger(body::<LoggerConfig>("logger", bytes)?),
        (Kind::PutMetrics, []) => VmmAction::PutMetrics(body::<MetricsConfig>("metrics", bytes)?),
        (Kind::PutVsock, []) => VmmAction::PutVsock(body::<VsockConfig>("vsock", bytes)?),
        (Kind::PutCpuConfig, []) => {
            VmmAction::PutCpuConfig(body::<CpuTemplate>("cpu-config", bytes)?)
        }
        (Kind::PutEntropy, []) => {
            let config = body::<EntropyConfig>("entropy", bytes)?;
            config
                .validate()
                .map_err(|err| format!("invalid entropy body: {err}"))?;
            VmmAction::PutEntropy(config)
        }
        (Kind::GetBalloon, []) => VmmAction::GetBalloon,
        (Kind::GetBalloon, ["statistics"]) => VmmAction::GetBalloonStats,
        (Kind::PutBalloon, []) => VmmAction::PutBalloon(body::<BalloonConfig>("balloon", bytes)?),
        (Kind::PatchBalloon, []) => {
            VmmAction::PatchBalloon(body::<BalloonUpdate>("balloon", bytes)?)
        }
        (Kind::PatchBalloon, ["statistics"]) => {
            VmmAction::PatchBalloonStats(body::<BalloonStatsUpdate>("balloon/statistics", bytes)?)
        }
        (Kind::GetBalloon, ["hinting", "status"]) => VmmAction::GetBalloonHintingStatus,
        (Kind::PatchBalloon, ["hinting", "start"]) => {
            // The body is optional, as with Firecracker.
            let start = if bytes.iter().all(u8::is_ascii_whitespace) {
                BalloonHintingStart::default()
            } else {
                body::<BalloonHintingStart>("balloon/hinting/start", bytes)?
            };
            VmmAction::StartBalloonHinting(start)
        }
        (Kind::PatchBalloon, ["hinting", "stop"]) => {
            if !bytes.iter().all(u8::is_ascii_whitespace) {
                body::<EmptyBody>("balloon/hinting/stop", bytes)?;
            }
            VmmAction::StopBalloonHinting
        }
        (Kind::PutActions, []) => match body::<InstanceActionInfo>("actions", bytes)?.action_type {
            ActionType::InstanceStart => VmmAction::InstanceStart,
            // An arch without a keyboard refuses it at once, in Firecracker's words.
            ActionType::SendCtrlAltDel => match crate::arch::CTRL_ALT_DEL_UNSUPPORTED {
                Some(refusal) => return Err(refusal.to_string()),
                None => VmmAction::SendCtrlAltDel,
            },
            ActionType::FlushMetrics => VmmAction::FlushMetrics,
        },
        (Kind::PutSnapshot, ["create"]) => {
            VmmAction::CreateSnapshot(body::<CreateSnapshotParams>("snapshot/create", bytes)?)
        }
        (Kind::PutSnapshot, ["load"]) => {
            VmmAction::LoadSnapshot(body::<LoadSnapshotParams>("snapshot/load", bytes)?)
        }
        (Kind::GetMmds, []) => VmmAction::GetMmds,
        (Kind::PutMmds, []) => VmmAction::PutMmds(mmds_body(bytes)?),
        (Kind::PatchMmds, []) => VmmAction::PatchMmds(mmds_body(bytes)?),
        (Kind::PutMmds, ["config"]) => {
            VmmAction::PutMmdsConfig(body::<MmdsConfig>("mmds/config", bytes)?)
        }
        (Kind::PatchVm, []) => match body::<VmState>("vm", bytes)?.state {
            State::Paused => VmmAction::Pause,
            State::Resumed => VmmAction::Resume,
        },
        _ => return Err(invalid(method, path)),
    };
    Ok(Route::Action(action))
}

/// What is deprecated in `action`'s request, as Firecracker says it, if anything: such an
/// answer carries `Deprecation: true` and the request is counted in `deprecated_api`.
pub fn deprecation(action: &VmmAction) -> Option<&'static str> {
    match action {
        VmmAction::PutVsock(config) if config.vsock_id.is_some() => {
            Some("the vsock_id field is deprecated")
        }
        VmmAction::LoadSnapshot(params) if params.mem_file_path.is_some() => {
            Some("PUT /snapshot/load: mem_file_path field is deprecated.")
        }
        _ => None,
    }
}

/// Firecracker's answer for a drive or network interface path without an id.
const EMPTY_ID: &str = "The ID cannot be empty.";

/// Firecracker's rule for the id in a drive's or network interface's path: letters, digits and
/// underscores.
fn checked_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(EMPTY_ID.to_string());
    }
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(
            "API Resource IDs can only contain alphanumeric characters and underscores."
                .to_string(),
        );
    }
    Ok(())
}

/// A drive's id in the path and in the body must agree (Firecracker's rule).
fn check_id(path_id: &str, body_id: &str) -> Result<(), String> {
    if path_id == body_id {
        Ok(())
    } else {
        Err(format!(
            "The id from the path ({path_id:?}) does not match the id from the body ({body_id:?})!"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::paths::ENDPOINTS;
    use super::*;

    fn action(method: &str, path: &str, body: &str) -> VmmAction {
        match route(method, path, body.as_bytes()) {
            Ok(Route::Action(action)) => action,
            other => panic!("{other:?}"),
        }
    }

    fn refusal(method: &str, path: &str, body: &str) -> String {
        route(method, path, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn a_get_with_a_body_and_an_empty_patch_are_refused_in_firecrackers_words() {
        assert_eq!(
            refusal("GET", "/machine-config", "{}"),
            "GET request cannot have a body."
        );
        assert_eq!(refusal("GET", "/", "x"), "GET request cannot have a body.");
        assert_eq!(
            refusal("PATCH", "/machine-config", "{}"),
            "Empty PATCH request."
        );
        assert!(route("PATCH", "/machine-config", br#"{"smt": false}"#).is_ok());
    }

    #[test]
    fn firecrackers_requests_map_to_actions() {
        assert_eq!(action("GET", "/", ""), VmmAction::GetInstanceInfo);
        assert_eq!(route("GET", "/version", b""), Ok(Route::Version));
        assert_eq!(action("GET", "/vm/config", ""), VmmAction::GetVmConfig);
        assert_eq!(
            action("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
            VmmAction::InstanceStart
        );
        let ctrl_alt_del = r#"{"action_type": "SendCtrlAltDel"}"#;
        match crate::arch::CTRL_ALT_DEL_UNSUPPORTED {
            None => assert_eq!(
                action("PUT", "/actions", ctrl_alt_del),
                VmmAction::SendCtrlAltDel
            ),
            Some(refusal) => assert_eq!(
                route("PUT", "/actions", ctrl_alt_del.as_bytes()),
                Err(refusal.to_string())
            ),
        }
        assert_eq!(
            action("PATCH", "/vm", r#"{"state": "Paused"}"#),
            VmmAction::Pause
        );
        match action(
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true}"#,
        ) {
            VmmAction::PutDrive(drive) => assert!(drive.is_root_device),
            other => panic!("{other:?}"),
        }
        match action("PATCH", "/machine-config", r#"{"vcpu_count": 2}"#) {
            VmmAction::PatchMachineConfig(update) => assert_eq!(update.vcpu_count, Some(2)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn body_errors_name_the_field_and_the_reason() {
        let err = refusal(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "two", "mem_size_mib": 128}"#,
        );
        assert!(
            err.contains("field `vcpu_count`") && err.contains("invalid type"),
            "{err}"
        );
        let err = refusal(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "turbo": true}"#,
        );
        assert!(err.contains("unknown field `turbo`"), "{err}");
        let err = refusal("PUT", "/machine-config", r#"{"vcpu_count": 1}"#);
        assert!(err.contains("missing field `mem_size_mib`"), "{err}");
        let err = refusal("PUT", "/boot-source", "{not json");
        assert!(err.contains("invalid boot-source body"), "{err}");
        assert_eq!(refusal("PUT", "/boot-source", ""), "Empty PUT request.");
        assert_eq!(refusal("PATCH", "/drives/x", ""), "Empty PATCH request.");
        let err = refusal("PUT", "/boot-source", " ");
        assert!(err.contains("needs a JSON body"), "{err}");
        assert_eq!(
            refusal("PUT", "/drives", r#"{"drive_id": "a"}"#),
            "The ID cannot be empty."
        );
        assert!(
            refusal("PUT", "/drives/a-b", r#"{"drive_id": "a-b"}"#).starts_with("API Resource IDs")
        );
        assert!(refusal("PATCH", "/network-interfaces/a.b", "{}").starts_with("API Resource IDs"));
        let err = refusal("PUT", "/actions", r#"{"action_type": "Explode"}"#);
        assert!(
            err.contains("field `action_type`") && err.contains("Explode"),
            "{err}"
        );
        let err = refusal("PUT", "/boot-source", r#"{"kernel_image_path": "/k"} {}"#);
        assert!(err.contains("trailing characters"), "{err}");
        // serde reads a struct from an array of its fields too; a body must be an object.
        for body in [r#"[null, null]"#, "[1, 128]", "7", r#""x""#] {
            let err = refusal("PUT", "/logger", body);
            assert!(err.contains("expected a JSON object"), "{body}: {err}");
        }
        let err = refusal("PUT", "/machine-config", " \n[1, 128]");
        assert_eq!(err, "invalid machine-config body: expected a JSON object");
    }

    #[test]
    fn unknown_paths_and_methods_are_refused() {
        assert_eq!(
            refusal("DELETE", "/machine-config", ""),
            "Invalid request method and/or path: DELETE /machine-config."
        );
        assert!(refusal("GET", "/nowhere", "").starts_with("Invalid request"));
        assert!(refusal("PUT", "/hotplug/memory", "{}").contains("not implemented by mote yet"));
        assert_eq!(
            action("PUT", "/cpu-config", r#"{"kvm_capabilities": ["171"]}"#),
            VmmAction::PutCpuConfig(CpuTemplate {
                kvm_capabilities: vec![crate::config::KvmCapability::Require(171)],
                ..Default::default()
            })
        );
        assert_eq!(
            refusal("PUT", "/snapshot", "{}"),
            "Missing snapshot operation type."
        );
        assert_eq!(
            refusal("PUT", "/snapshot/fork", "{}"),
            "Invalid request method and/or path: PUT /snapshot/fork."
        );
    }

    #[test]
    fn mmds_requests_map_to_actions() {
        assert_eq!(action("GET", "/mmds", ""), VmmAction::GetMmds);
        assert_eq!(
            action("PUT", "/mmds", r#"{"a": 1}"#),
            VmmAction::PutMmds(serde_json::json!({"a": 1}))
        );
        assert_eq!(
            action("PATCH", "/mmds", r#"{"a": null}"#),
            VmmAction::PatchMmds(serde_json::json!({"a": null}))
        );
        match action(
            "PUT",
            "/mmds/config",
            r#"{"version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "169.254.1.1", "imds_compat": true}"#,
        ) {
            VmmAction::PutMmdsConfig(config) => {
                assert_eq!(config.version, crate::config::MmdsVersion::V2);
                assert_eq!(config.address().to_string(), "169.254.1.1");
                assert!(config.imds_compat);
            }
            other => panic!("{other:?}"),
        }
        assert!(refusal("PUT", "/mmds", "{nope").contains("invalid mmds body"));
        assert_eq!(refusal("PUT", "/mmds", ""), "Empty PUT request.");
        assert!(refusal("PUT", "/mmds", " ").contains("needs a JSON body"));
        for body in ["[1]", "7", r#""x""#, "null"] {
            let err = refusal("PATCH", "/mmds", body);
            assert!(err.contains("expected a JSON object"), "{body}: {err}");
        }
        let err = refusal(
            "PUT",
            "/mmds/config",
            r#"{"version": "V3", "network_interfaces": []}"#,
        );
        assert!(err.contains("field `version`"), "{err}");
        let err = refusal(
            "PUT",
            "/mmds/config",
            r#"{"network_interfaces": ["eth0"], "ipv4_address": "nope"}"#,
        );
        assert!(err.contains("field `ipv4_address`"), "{err}");
        assert!(refusal("PATCH", "/mmds/config", "{}").starts_with("Invalid request"));
    }

    #[test]
    fn entropy_maps_to_an_action() {
        assert_eq!(
            action("PUT", "/entropy", "{}"),
            VmmAction::PutEntropy(EntropyConfig::default())
        );
        let err = refusal(
            "PUT",
            "/entropy",
            r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 0}}}"#,
        );
        assert!(
            err.contains("entropy rate_limiter: bandwidth: refill_time is 0"),
            "{err}"
        );
        let err = refusal("PUT", "/entropy", r#"{"bogus": 1}"#);
        assert!(err.contains("unknown field `bogus`"), "{err}");
    }

    #[test]
    fn balloon_requests_map_to_actions_in_firecrackers_shapes() {
        assert_eq!(
            action(
                "PUT",
                "/balloon",
                r#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#
            ),
            VmmAction::PutBalloon(BalloonConfig {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: 1,
                ..Default::default()
            })
        );
        assert_eq!(action("GET", "/balloon", ""), VmmAction::GetBalloon);
        assert_eq!(
            action("GET", "/balloon/statistics", ""),
            VmmAction::GetBalloonStats
        );
        assert_eq!(
            action("PATCH", "/balloon", r#"{"amount_mib": 8}"#),
            VmmAction::PatchBalloon(BalloonUpdate { amount_mib: 8 })
        );
        assert_eq!(
            action(
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s": 2}"#
            ),
            VmmAction::PatchBalloonStats(BalloonStatsUpdate {
                stats_polling_interval_s: 2
            })
        );
        let err = refusal("PUT", "/balloon", r#"{"amount_mib": 1}"#);
        assert!(err.contains("missing field `deflate_on_oom`"), "{err}");
        let err = refusal("PATCH", "/balloon", r#"{"deflate_on_oom": true}"#);
        assert!(err.contains("unknown field `deflate_on_oom`"), "{err}");
        let err = refusal(
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s": 70000}"#,
        );
        assert!(err.contains("field `stats_polling_interval_s`"), "{err}");
        assert_eq!(
            action("PATCH", "/balloon/hinting/start", ""),
            VmmAction::StartBalloonHinting(BalloonHintingStart {
                acknowledge_on_stop: true
            })
        );
        assert_eq!(
            action(
                "PATCH",
                "/balloon/hinting/start",
                r#"{"acknowledge_on_stop": false}"#
            ),
            VmmAction::StartBalloonHinting(BalloonHintingStart {
                acknowledge_on_stop: false
            })
        );
        assert_eq!(
            action("PATCH", "/balloon/hinting/stop", "{}"),
            VmmAction::StopBalloonHinting
        );
        assert_eq!(
            action("GET", "/balloon/hinting/status", ""),
            VmmAction::GetBalloonHintingStatus
        );
        let err = refusal(
            "PATCH",
            "/balloon/hinting/start",
            r#"{"acknowledge_on_stop": 1}"#,
        );
        assert!(err.contains("acknowledge_on_stop"), "{err}");
        assert!(refusal("PATCH", "/balloon/hinting/stop", r#"{"x": 1}"#).contains("unknown field"));
        assert!(refusal("PATCH", "/balloon/hinting/pause", "").starts_with("Invalid request"));
        assert!(refusal("PUT", "/balloon/statistics", "{}").starts_with("Invalid request"));
    }

    #[test]
    fn vsock_maps_to_an_action_and_takes_the_deprecated_id() {
        let expected = VsockConfig {
            vsock_id: Some("vsock0".into()),
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
        };
        assert_eq!(
            action(
                "PUT",
                "/vsock",
                r#"{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"}"#
            ),
            VmmAction::PutVsock(expected)
        );
        let err = refusal("PUT", "/vsock", r#"{"guest_cid": 3}"#);
        assert!(err.contains("missing field `uds_path`"), "{err}");
        let err = refusal("PUT", "/vsock", r#"{"guest_cid": -1, "uds_path": "/v"}"#);
        assert!(err.contains("field `guest_cid`"), "{err}");
    }

    #[test]
    fn deprecated_forms_are_named() {
        let vsock = action(
            "PUT",
            "/vsock",
            r#"{"vsock_id": "v", "guest_cid": 3, "uds_path": "/v"}"#,
        );
        assert!(deprecation(&vsock).is_some());
        let vsock = action("PUT", "/vsock", r#"{"guest_cid": 3, "uds_path": "/v"}"#);
        assert!(deprecation(&vsock).is_none());
        let load = action(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "s", "mem_file_path": "m"}"#,
        );
        assert!(deprecation(&load).is_some_and(|d| d.contains("mem_file_path")));
        let load = action(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#,
        );
        assert!(deprecation(&load).is_none());
    }

    #[test]
    fn network_interfaces_map_to_actions() {
        match action(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#,
        ) {
            VmmAction::PutNetworkInterface(iface) => {
                assert_eq!(iface.host_dev_name, "tap0");
                assert_eq!(iface.guest_mac.unwrap().to_string(), "06:00:ac:10:00:02");
            }
            other => panic!("{other:?}"),
        }
        let err = refusal(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "tx_limiter": {}}"#,
        );
        assert!(err.contains("unknown field `tx_limiter`"), "{err}");
        let err = refusal(
            "PUT",
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#,
        );
        assert!(err.contains("does not match"), "{err}");
        let err = refusal(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "nope"}"#,
        );
        assert!(
            err.contains("field `guest_mac`") && err.contains("invalid MAC"),
            "{err}"
        );
        let err = refusal("PATCH", "/network-interfaces/eth0", "{}");
        assert!(err.contains("missing field `iface_id`"), "{err}");
    }

    #[test]
    fn rate_limiters_are_taken_on_drives_interfaces_and_entropy() {
        let limiter = r#"{"bandwidth": {"size": 1000, "one_time_burst": 10, "refill_time": 100}, "ops": {"size": 5, "refill_time": 1}}"#;
        match action(
            "PUT",
            "/network-interfaces/eth0",
            &format!(
                r#"{{"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {limiter}, "tx_rate_limiter": {{"ops": {{"size": 1, "refill_time": 1}}}}}}"#
            ),
        ) {
            VmmAction::PutNetworkInterface(iface) => {
                assert_eq!(iface.rx_rate_limiter.unwrap().bandwidth.unwrap().size, 1000);
                assert_eq!(iface.tx_rate_limiter.unwrap().ops.unwrap().size, 1);
            }
            other => panic!("{other:?}"),
        }
        match action(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#,
        ) {
            VmmAction::PatchNetworkInterface(update) => {
                assert!(update.rx_rate_limiter.is_none());
                assert_eq!(update.tx_rate_limiter.unwrap().bandwidth.unwrap().size, 0);
            }
            other => panic!("{other:?}"),
        }
        match action(
            "PATCH",
            "/drives/d",
            &format!(r#"{{"drive_id": "d", "rate_limiter": {limiter}}}"#),
        ) {
            VmmAction::PatchDrive(update) => {
                assert_eq!(update.rate_limiter.unwrap().ops.unwrap().refill_time, 1);
                assert!(update.path_on_host.is_none());
            }
            other => panic!("{other:?}"),
        }
        match action(
            "PUT",
            "/entropy",
            &format!(r#"{{"rate_limiter": {limiter}}}"#),
        ) {
            VmmAction::PutEntropy(config) => assert!(config.rate_limiter.is_some()),
            other => panic!("{other:?}"),
        }
        // Bad buckets are refused with what was wrong.
        let err = refusal(
            "PATCH",
            "/drives/d",
            r#"{"drive_id": "d", "rate_limiter": {"ops": {"size": 5, "refill_time": 0}}}"#,
        );
        assert!(
            err.contains("drive d rate_limiter: ops: refill_time is 0 for a bucket of size 5"),
            "{err}"
        );
        let err = refusal(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": -5, "refill_time": 1}}}"#,
        );
        assert!(
            err.contains("field `rx_rate_limiter.ops.size`") && err.contains("-5"),
            "{err}"
        );
        let err = refusal(
            "PUT",
            "/entropy",
            r#"{"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "burst": 3}}}"#,
        );
        assert!(err.contains("unknown field `burst`"), "{err}");
        let err = refusal(
            "PATCH",
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth0"}"#,
        );
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn every_endpoint_is_routed_and_all_but_the_listed_are_counted() {
        for endpoint in &ENDPOINTS {
            // Somewhere under its first segment: a refusal there, if any, is about the body.
            let routed = ["", "/config", "/create", "/rootfs"].iter().any(|rest| {
                let path = format!("/{}{rest}", endpoint.segment);
                route(endpoint.method, &path, b"{}") != Err(invalid(endpoint.method, &path))
            });
            assert!(routed, "{endpoint:?} is not routed");
        }
        // A request Firecracker's metrics do not count is an exception made on purpose.
        let uncounted: Vec<_> = ENDPOINTS
            .iter()
            .filter(|endpoint| endpoint.metrics.is_none())
            .map(|endpoint| (endpoint.method, endpoint.segment))
            .collect();
        assert_eq!(
            uncounted,
            [
                ("PUT", "entropy"),
                ("PUT", "snapshot"),
                ("GET", "balloon"),
                ("PUT", "balloon"),
                ("PATCH", "balloon"),
            ]
        );
    }

    #[test]
    fn a_drive_id_must_match_its_path() {
        let err = refusal(
            "PUT",
            "/drives/a",
            r#"{"drive_id": "b", "path_on_host": "/r", "is_root_device": false}"#,
        );
        assert!(err.contains("does not match"), "{err}");
    }
}
