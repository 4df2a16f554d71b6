//! virtio-net through the probe guest's polling driver, each test inside a network namespace of
//! its own with a TAP in it: the host pings the guest, 10 MiB go each way with a checksum,
//! malformed transmit chains are dropped while the device goes on, and bad host input (a
//! missing, busy or doubled TAP, an invalid MAC) is refused before boot. No traffic leaves the
//! namespace.

mod common;

#[path = "net/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{probe_kernel, require_kvm};
use netns::{bulk_byte, fnv, parse_field, Netns, PacketSocket, BULK_HLEN, ETH_HLEN};

const GUEST_MAC: [u8; 6] = [0x06, 0, 0x0a, 0, 0, 0x02];
const GUEST_MAC_ARG: &str = "06:00:0a:00:00:02";
const HOST_MAC: [u8; 6] = [0x06, 0, 0x0a, 0, 0, 0x01];
const TRANSFER_BYTES: usize = 10 << 20;
/// The probe's bulk frames: 1514 bytes, 1490 of them payload.
const FRAME_LEN: usize = 1514;
const PAYLOAD: usize = FRAME_LEN - ETH_HLEN - BULK_HLEN;
/// Data frames the host may send beyond the guest's last credit: more than the probe's 128
/// receive buffers (so the device runs out and must wait), less than the TAP's queue.
const WINDOW: u32 = 256;

fn probe_args(steps: &str, net: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--kernel",
        probe_kernel().to_str().unwrap(),
        "--append",
        &format!("probe.run={steps}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for spec in net {
        args.push("--net".into());
        args.push(spec.to_string());
    }
    args
}

/// Arguments for mote in Firecracker's way: a config file with the probe and one interface
/// `eth0` on `tap0`, metrics written to a file (the last line at exit) whose path it returns.
fn config_file_args(ns: &Netns, steps: &str) -> (Vec<String>, PathBuf) {
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": probe_kernel(),
            "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
        },
        "network-interfaces": [
            {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC_ARG}
        ],
    });
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(&ns.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let metrics = dir.join("metrics.json");
    let args = [
        "--no-api",
        "--config-file",
        config_path.to_str().unwrap(),
        "--metrics-path",
        metrics.to_str().unwrap(),
    ];
    (args.iter().map(|s| s.to_string()).collect(), metrics)
}

/// The last metrics line mote wrote.
fn last_metrics(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text.lines().last().expect("no metrics line");
    serde_json::from_str(line).unwrap()
}

fn assert_clean(run: &common::Run) {
    assert_eq!(
        run.status.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(!run.stdout.contains("error"), "{}", run.stdout);
}

#[test]
fn the_host_pings_the_guest_through_the_tap() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", Some("10.0.0.1/24"));
    let net = format!("tap=tap0,mac={GUEST_MAC_ARG}");
    let mote = ns.spawn_mote(&probe_args("net-init,net-serve:10.0.0.2:3:30", &[&net]));
    mote.wait_for_line("net-serve ready", Duration::from_secs(20));
    let ping = ns.run(&["ping", "-c", "3", "-W", "1", "-i", "0.2", "10.0.0.2"]);
    assert!(ping.status.success(), "ping failed:\n{}", ping.stdout);
    assert!(ping.stdout.contains("3 received"), "{}", ping.stdout);
    let run = mote.wait(Duration::from_secs(20));
    assert_clean(&run);
    assert!(
        run.stdout
            .contains(&format!("net-init mac={GUEST_MAC_ARG} link=up")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("net-serve answered=3 arp="),
        "{}",
        run.stdout
    );
}

#[test]
fn ten_mib_go_from_guest_to_host_intact() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", None);
    let socket = PacketSocket::open(&ns, "tap0");
    let count = TRANSFER_BYTES.div_ceil(PAYLOAD) as u32;
    let net = format!("tap=tap0,mac={GUEST_MAC_ARG}");
    let steps = format!("net-init,net-send:{count}:8:{FRAME_LEN}");
    let run = ns
        .spawn_mote(&probe_args(&steps, &[&net]))
        .wait(Duration::from_secs(60));
    assert_clean(&run);
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("net-send done"))
        .unwrap_or_else(|| panic!("no net-send done in:\n{}", run.stdout));
    assert_eq!(
        parse_field(line, "frames"),
        Some(u64::from(count)),
        "{line}"
    );

    // The socket kept every frame (its buffer holds them all): check them in order.
    let mut sum = fnv::new();
    let mut next = 0u32;
    let mut buf = vec![0u8; 65536];
    while next < count {
        let len = socket
            .recv(&mut buf, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("frame {next} of {count} never reached the host"));
        let frame = &buf[..len];
        let Some((kind, seq)) = netns::parse_bulk(frame) else {
            continue; // the host's own IPv6 chatter, for one
        };
        assert_eq!(&frame[6..12], &GUEST_MAC, "bulk frame from elsewhere");
        assert_eq!(kind, netns::KIND_DATA);
        assert_eq!(seq, next, "frames out of order or lost");
        let payload = &frame[ETH_HLEN + BULK_HLEN..];
        assert_eq!(payload.len(), PAYLOAD);
        fnv::add(&mut sum, payload);
        next += 1;
    }
    let guest_sum = format!("sum={sum:#018x}");
    assert!(line.contains(&guest_sum), "host {guest_sum}, guest {line}");
}

#[test]
fn ten_mib_go_from_host_to_guest_intact_when_the_guest_runs_out_of_buffers() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", None);
    let socket = PacketSocket::open(&ns, "tap0");
    let count = TRANSFER_BYTES.div_ceil(PAYLOAD) as u32;
    let steps = format!("net-init,net-recv:{count}:60");
    let (args, metrics) = config_file_args(&ns, &steps);
    let mote = ns.spawn_mote(&args);
    ns.wait_for_carrier("tap0");

    let mut expected = fnv::new();
    let mut frame = vec![0u8; FRAME_LEN];
    let mut buf = vec![0u8; 65536];
    let (mut sent, mut granted) = (0u32, 0u32);
    let started = std::time::Instant::now();
    while sent < count {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "sent {sent} of {count}, credit up to {granted}"
        );
        // Take every credit waiting; block briefly only when the window is closed.
        let wait = if sent < granted {
            Duration::ZERO
        } else {
            Duration::from_millis(5)
        };
        if let Some(len) = socket.recv(&mut buf, wait) {
            if let Some((netns::KIND_CREDIT, received)) = netns::parse_bulk(&buf[..len]) {
                granted = granted.max(received.saturating_add(WINDOW));
            }
            continue;
        }
        while sent < granted.min(count) {
            netns::bulk_frame(
                &mut frame,
                &GUEST_MAC,
                &HOST_MAC,
                netns::KIND_DATA,
                sent,
                count,
            );
            for (i, byte) in frame[ETH_HLEN + BULK_HLEN..].iter_mut().enumerate() {
                *byte = bulk_byte(sent, i);
            }
            fnv::add(&mut expected, &frame[ETH_HLEN + BULK_HLEN..]);
            socket.send(&frame);
            sent += 1;
        }
    }
    let run = mote.wait(Duration::from_secs(60));
    assert_clean(&run);
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("net-recv done"))
        .unwrap_or_else(|| panic!("no net-recv done in:\n{}", run.stdout));
    assert_eq!(
        parse_field(line, "frames"),
        Some(u64::from(count)),
        "{line}"
    );
    assert_eq!(
        parse_field(line, "bytes"),
        Some(u64::from(count) * PAYLOAD as u64)
    );
    assert_eq!(parse_field(line, "out_of_order"), Some(0), "{line}");
    assert_eq!(parse_field(line, "bad"), Some(0), "{line}");
    assert!(
        line.contains(&format!("sum={expected:#018x}")),
        "host sum={expected:#018x}, guest {line}"
    );
    // The guest ran out of buffers on the way (the host's window is twice its buffers), the
    // device waited for it, and dropped nothing.
    let report = last_metrics(&metrics);
    let eth0 = &report["net_eth0"];
    assert!(eth0["no_rx_avail_buffer"].as_u64().unwrap() > 0, "{eth0}");
    assert!(
        eth0["rx_packets_count"].as_u64().unwrap() >= u64::from(count),
        "{eth0}"
    );
    for dropped in ["rx_dropped_too_big", "rx_bad_chain", "rx_tap_errors"] {
        assert_eq!(eth0[dropped], 0, "{dropped}: {eth0}");
    }
    assert_eq!(report["net"]["rx_packets_count"], eth0["rx_packets_count"]);
}

#[test]
fn malformed_transmit_chains_are_dropped_and_the_device_goes_on() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", None);
    let socket = PacketSocket::open(&ns, "tap0");
    let cases = ["oob", "writable", "short-header", "oversized", "bad-gso"];
    let steps: Vec<String> = cases.iter().map(|c| format!("net-hostile:{c}")).collect();
    let steps = format!("net-init,{}", steps.join(","));
    let (args, metrics) = config_file_args(&ns, &steps);
    let run = ns.spawn_mote(&args).wait(Duration::from_secs(30));
    assert_clean(&run);
    for case in cases {
        assert!(
            run.stdout.contains(&format!("net-hostile {case} returned")),
            "{}",
            run.stdout
        );
    }
    assert_eq!(run.stdout.matches("net-alive").count(), cases.len());
    // Only the good frames (sequence 1) came out; none of the malformed ones (sequence 0).
    let mut buf = vec![0u8; 65536];
    let mut good = 0;
    while let Some(len) = socket.recv(&mut buf, Duration::from_millis(500)) {
        if let Some((_, seq)) = netns::parse_bulk(&buf[..len]) {
            assert_eq!(seq, 1, "a malformed frame reached the host");
            good += 1;
        }
    }
    assert_eq!(good, cases.len());
    // Each drop was counted under its reason.
    let eth0 = &last_metrics(&metrics)["net_eth0"];
    assert_eq!(eth0["tx_dropped_bad_chain"], 2, "oob and writable: {eth0}");
    assert_eq!(eth0["tx_dropped_truncated_header"], 1, "{eth0}");
    assert_eq!(eth0["tx_dropped_oversized"], 1, "{eth0}");
    assert_eq!(eth0["tx_dropped_bad_header"], 1, "{eth0}");
    assert_eq!(eth0["tx_packets_count"], cases.len() as u64, "{eth0}");
}

#[test]
fn the_api_configures_an_interface_before_boot_only() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", Some("10.0.0.1/24"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(&ns.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let mote = ns.spawn_mote(&["--api-sock".to_string(), sock.display().to_string()]);
    common::api::wait_for_socket(&sock, Duration::from_secs(10), String::new);
    let api =
        |method: &str, path: &str, body: &str| common::api::request(&sock, method, path, body);

    // A bad bucket is refused naming it; PATCH waits for the guest to run.
    let limited = r#"{"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"ops": {"size": 9, "refill_time": 0}}}"#;
    let fault = api("PUT", "/network-interfaces/eth0", limited).fault();
    assert!(
        fault.contains("interface eth0 rx_rate_limiter: ops: refill_time is 0"),
        "{fault}"
    );
    let patch = r#"{"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 100000, "refill_time": 1000}}}"#;
    let fault = api("PATCH", "/network-interfaces/eth0", patch).fault();
    assert!(fault.contains("not supported before starting"), "{fault}");
    let eth0 = format!(
        r#"{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "{GUEST_MAC_ARG}"}}"#
    );
    assert_eq!(api("PUT", "/network-interfaces/eth0", &eth0).status, 204);
    let fault = api(
        "PUT",
        "/network-interfaces/eth1",
        r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#,
    )
    .fault();
    assert!(fault.contains("both use the TAP"), "{fault}");
    let config = api("GET", "/vm/config", "").json();
    assert_eq!(
        config["network-interfaces"],
        serde_json::json!([{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC_ARG}])
    );

    let boot = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=net-init,net-serve:10.0.0.2:1:30",
    });
    assert_eq!(api("PUT", "/boot-source", &boot.to_string()).status, 204);
    assert_eq!(
        api("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#).status,
        204
    );
    mote.wait_for_line("net-serve ready", Duration::from_secs(20));
    let fault = api("PUT", "/network-interfaces/eth0", &eth0).fault();
    assert!(fault.contains("not supported after starting"), "{fault}");
    // Limits far above what a ping needs, taken at once by the running device.
    assert_eq!(api("PATCH", "/network-interfaces/eth0", patch).status, 204);
    assert_eq!(
        api("GET", "/vm/config", "").json()["network-interfaces"][0]["tx_rate_limiter"],
        serde_json::json!({"ops": {"size": 100000, "refill_time": 1000}})
    );
    let fault = api(
        "PATCH",
        "/network-interfaces/eth9",
        r#"{"iface_id": "eth9"}"#,
    )
    .fault();
    assert!(fault.contains("no network interface has the id"), "{fault}");
    let ping = ns.run(&["ping", "-c", "1", "-W", "2", "10.0.0.2"]);
    assert!(ping.status.success(), "ping failed:\n{}", ping.stdout);
    let run = mote.wait(Duration::from_secs(20));
    assert_eq!(run.status.code(), Some(0), "stderr:\n{}", run.stderr);
    assert!(
        run.stdout.contains("net-serve answered=1"),
        "{}",
        run.stdout
    );
}

/// Runs the probe (which never gets to boot) with `net` options; returns mote's stderr.
fn refused(ns: &Netns, net: &[&str]) -> String {
    let run = ns
        .spawn_mote(&probe_args("net-init", net))
        .wait(Duration::from_secs(20));
    assert_eq!(
        run.status.code(),
        Some(1),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        !run.stdout.contains("probe:"),
        "the guest ran: {}",
        run.stdout
    );
    run.stderr
}

#[test]
fn a_missing_tap_is_refused_before_boot() {
    if !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    let err = refused(&ns, &["tap=tap9"]);
    assert!(err.contains("no network interface \"tap9\""), "{err}");
    // And mote did not create it.
    let links = ns.run(&["ip", "link", "show"]);
    assert!(!links.stdout.contains("tap9"), "{}", links.stdout);
}

#[test]
fn a_busy_tap_is_refused_before_boot() {
    if !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", None);
    let _holder = netns::attach_tap(&ns, "tap0");
    let err = refused(&ns, &["tap=tap0"]);
    assert!(err.contains("TAP \"tap0\" is busy"), "{err}");
}

#[test]
fn the_same_tap_twice_is_refused_before_boot() {
    if !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", None);
    let err = refused(&ns, &["tap=tap0", "tap=tap0,mac=06:00:00:00:00:09"]);
    assert!(
        err.contains("eth0 and eth1 both use the TAP \"tap0\""),
        "{err}"
    );
}

#[test]
fn an_invalid_mac_is_refused_before_boot() {
    if !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", None);
    let run = ns
        .spawn_mote(&probe_args("net-init", &["tap=tap0,mac=06:00:0a:00:02"]))
        .wait(Duration::from_secs(20));
    assert_eq!(
        run.status.code(),
        Some(153),
        "a usage error, Firecracker's ArgParsing status: {}",
        run.stderr
    );
    assert!(run.stderr.contains("invalid MAC address"), "{}", run.stderr);
}

#[test]
fn an_interface_that_is_not_a_tap_is_refused() {
    if !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    // Every namespace has a loopback interface.
    let err = refused(&ns, &["tap=lo"]);
    assert!(err.contains("\"lo\" is not a TAP device"), "{err}");
}
