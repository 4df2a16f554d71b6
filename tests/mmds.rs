//! MMDS, the metadata service, through the probe guest's hand-built ARP, TCP and HTTP: V1 and
//! V2 answers, tokens that expire or were never given, IMDS text, hostile traffic after which
//! MMDS still answers, no frame for the MMDS address on the TAP, and the API's refusals. Each
//! guest runs inside a network namespace of its own with its TAP; no traffic leaves it.

mod common;

#[path = "net/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::api::{request, wait_for_socket, Answer};
use common::{probe_kernel, require_kvm};
use netns::{Netns, PacketSocket};

const GUEST_MAC_ARG: &str = "06:00:0a:00:00:02";
const MMDS_IP: [u8; 4] = [169, 254, 169, 254];
const DATA: &str =
    r#"{"latest": {"meta-data": {"instance-id": "i-0123", "n": 7, "tags": {"a": "b"}}}}"#;

/// A monitor in a namespace with `tap0`, driven through its API socket.
struct Guest {
    ns: Netns,
    sock: PathBuf,
    mote: Option<netns::Mote>,
}

impl Guest {
    fn spawn(extra: &[&str]) -> Self {
        let ns = Netns::new();
        ns.add_tap("tap0", Some("10.0.0.1/24"));
        let (sock, mote) = spawn_mote(&ns, "api.sock", extra);
        Self {
            ns,
            sock,
            mote: Some(mote),
        }
    }

    fn api(&self, method: &str, path: &str, body: &str) -> Answer {
        request(&self.sock, method, path, body)
    }

    fn ok(&self, method: &str, path: &str, body: &str) {
        let answer = self.api(method, path, body);
        assert_eq!(answer.status, 204, "{method} {path}: {answer:?}");
    }

    /// The probe with `steps`, eth0 on tap0, MMDS as `mmds_config` with DATA in its store.
    fn configure(&self, steps: &str, mmds_config: &str) {
        self.ok(
            "PUT",
            "/boot-source",
            &serde_json::json!({
                "kernel_image_path": probe_kernel(),
                "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
            })
            .to_string(),
        );
        self.ok(
            "PUT",
            "/network-interfaces/eth0",
            &format!(
                r#"{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "{GUEST_MAC_ARG}"}}"#
            ),
        );
        self.ok("PUT", "/mmds/config", mmds_config);
        self.ok("PUT", "/mmds", DATA);
    }

    /// Starts the guest and waits for it to end; returns its console.
    fn run(mut self) -> String {
        self.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
        let run = self.mote.take().unwrap().wait(Duration::from_secs(60));
        assert_eq!(
            run.status.code(),
            Some(0),
            "stdout:\n{}\nstderr:\n{}",
            run.stdout,
            run.stderr
        );
        assert!(run.stdout.contains("probe: done"), "{}", run.stdout);
        run.stdout
    }
}

/// A monitor in `ns` with its API socket `name` in the namespace's scratch directory.
fn spawn_mote(ns: &Netns, name: &str, extra: &[&str]) -> (PathBuf, netns::Mote) {
    let dir = scratch(ns);
    let sock = dir.join(name);
    let _ = std::fs::remove_file(&sock);
    let mut args = vec!["--api-sock".to_string(), sock.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mote = ns.spawn_mote(&args);
    wait_for_socket(&sock, Duration::from_secs(10), String::new);
    (sock, mote)
}

fn scratch(ns: &Netns) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(&ns.name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn line<'a>(console: &'a str, start: &str) -> &'a str {
    console
        .lines()
        .find(|line| line.starts_with(&format!("probe: {start}")))
        .unwrap_or_else(|| panic!("no line {start:?} in:\n{console}"))
}

/// Frames seen on the TAP, collected by a thread until `stop`.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Capture {
    fn start(ns: &Netns) -> Self {
        let socket = PacketSocket::open(ns, "tap0");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !stopped.load(Ordering::Relaxed) {
                if let Some(n) = socket.recv(&mut buf, Duration::from_millis(100)) {
                    frames.push(buf[..n].to_vec());
                }
            }
            frames
        });
        Self { stop, thread }
    }

    fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// An ARP packet about the MMDS address or an IPv4 packet to it.
fn for_mmds(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x06]) => frame.get(38..42) == Some(&MMDS_IP[..]),
        Some([0x08, 0x00]) => frame.get(30..34) == Some(&MMDS_IP[..]),
        _ => false,
    }
}

#[test]
fn v1_answers_as_json_and_imds_text_and_nothing_for_mmds_reaches_the_tap() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let metrics = std::env::temp_dir().join(format!("mote-mmds-metrics-{}", std::process::id()));
    let _ = std::fs::remove_file(&metrics);
    let guest = Guest::spawn(&["--metrics-path", metrics.to_str().unwrap()]);
    let capture = Capture::start(&guest.ns);
    guest.configure(
        "net-init,mmds-arp,mmds-get:/latest/meta-data/instance-id:j,\
         mmds-get:/latest/meta-data/instance-id,mmds-get:/latest/meta-data/,\
         mmds-get:/latest/meta-data/n,mmds-get:/nowhere,mmds-get:/latest/meta-data:jc,\
         net-send:3:1:100",
        r#"{"network_interfaces": ["eth0"]}"#,
    );
    let config = guest.api("GET", "/vm/config", "").json();
    assert_eq!(
        config["mmds-config"],
        serde_json::json!({"version": "V1", "network_interfaces": ["eth0"],
            "ipv4_address": "169.254.169.254", "imds_compat": false})
    );
    assert_eq!(
        guest.api("GET", "/mmds", "").json(),
        serde_json::from_str::<serde_json::Value>(DATA).unwrap()
    );
    let ns_name = guest.ns.name.clone();
    let console = guest.run();
    assert_eq!(
        line(&console, "mmds-arp"),
        "probe: mmds-arp mac=06:01:23:45:67:01"
    );
    let gets: Vec<_> = console
        .lines()
        .filter(|l| l.starts_with("probe: mmds-get"))
        .collect();
    assert_eq!(
        gets,
        [
            r#"probe: mmds-get status=200 body="i-0123""#,
            "probe: mmds-get status=200 body=i-0123",
            r#"probe: mmds-get status=200 body=instance-id\nn\ntags/"#,
            "probe: mmds-get status=501 body=Cannot retrieve value. The value has an unsupported type.",
            "probe: mmds-get status=404 body=Resource not found: /nowhere.",
            r#"probe: mmds-get status=200 body={"instance-id":"i-0123","n":7,"tags":{"a":"b"}}"#,
        ],
        "{console}"
    );
    // The last metrics line (at exit) counts what MMDS saw, in Firecracker's names.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let _ = std::fs::remove_file(&metrics);
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let mmds = &last["mmds"];
    let count = |name: &str| {
        mmds[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {mmds}"))
    };
    assert!(count("rx_accepted") >= 6 * 4, "{mmds}");
    assert!(count("rx_count") >= 6 * 4, "{mmds}");
    assert_eq!(count("connections_created"), 6, "{mmds}");
    assert!(
        count("tx_frames") >= 6 * 3 && count("tx_bytes") > 0,
        "{mmds}"
    );
    for name in [
        "rx_bad_eth",
        "rx_accepted_err",
        "rx_invalid_token",
        "rx_no_token",
        "tx_errors",
    ] {
        assert_eq!(count(name), 0, "{name}: {mmds}");
    }
    let frames = capture.finish();
    let bulk = frames
        .iter()
        .filter(|f| f.get(12..14) == Some(&[0x88, 0xb5][..]))
        .count();
    assert_eq!(bulk, 3, "the capture saw the probe's ordinary frames");
    let leaked: Vec<_> = frames.iter().filter(|f| for_mmds(f)).collect();
    assert!(
        leaked.is_empty(),
        "{} frames for the MMDS address reached the TAP in {ns_name}: {:02x?}",
        leaked.len(),
        leaked.first()
    );
}

#[test]
fn v2_wants_a_valid_unexpired_token_and_imds_compat_gives_text() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let guest = Guest::spawn(&[]);
    guest.configure(
        "net-init,mmds-get:/latest/meta-data/instance-id,\
         mmds-get:/latest/meta-data/instance-id:b,mmds-token:0,mmds-token:1,\
         mmds-get:/latest/meta-data/instance-id:tj,mmds-wait:1500,\
         mmds-get:/latest/meta-data/instance-id:t,mmds-token:60,\
         mmds-get:/latest/meta-data/instance-id:tj",
        r#"{"version": "V2", "network_interfaces": ["eth0"], "imds_compat": true}"#,
    );
    let console = guest.run();
    let answers: Vec<_> = console
        .lines()
        .filter(|l| l.starts_with("probe: mmds-get") || l.starts_with("probe: mmds-token"))
        .collect();
    assert_eq!(
        answers,
        [
            "probe: mmds-get status=401 body=No MMDS token provided. Use `X-metadata-token` header to specify the session token.",
            "probe: mmds-get status=401 body=MMDS token not valid.",
            "probe: mmds-token status=400 len=93",
            "probe: mmds-token status=200 len=64",
            // imds_compat: text although JSON was asked for.
            "probe: mmds-get status=200 body=i-0123",
            // The 1-second token expired.
            "probe: mmds-get status=401 body=MMDS token not valid.",
            "probe: mmds-token status=200 len=64",
            "probe: mmds-get status=200 body=i-0123",
        ],
        "{console}"
    );
}

#[test]
fn hostile_traffic_leaves_mmds_answering() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let guest = Guest::spawn(&[]);
    let capture = Capture::start(&guest.ns);
    guest.configure(
        "net-init,mmds-hostile:window,mmds-hostile:synflood,\
         mmds-get:/latest/meta-data/instance-id,mmds-hostile:big,mmds-hostile:junk,\
         mmds-get:/latest/meta-data/instance-id",
        r#"{"network_interfaces": ["eth0"]}"#,
    );
    let console = guest.run();
    assert_eq!(
        line(&console, "mmds-hostile window"),
        "probe: mmds-hostile window status=200 body=i-0123"
    );
    assert!(line(&console, "mmds-hostile big").starts_with("probe: mmds-hostile big status=413"));
    let gets = console
        .lines()
        .filter(|l| *l == "probe: mmds-get status=200 body=i-0123")
        .count();
    assert_eq!(gets, 2, "{console}");
    assert!(!console.contains("error"), "{console}");
    let leaked = capture.finish().into_iter().filter(|f| for_mmds(f)).count();
    assert_eq!(leaked, 0, "frames for the MMDS address reached the TAP");
}

#[test]
fn bad_mmds_requests_are_refused_naming_the_field() {
    let mote = common::api::ApiMote::spawn("mmds-bad-input", &["--mmds-size-limit", "64"]);
    let fault = |method: &str, path: &str, body: &str| mote.request(method, path, body).fault();
    let err = fault(
        "PUT",
        "/mmds",
        &format!(r#"{{"x": "{}"}}"#, "y".repeat(100)),
    );
    assert!(
        err.contains("The MMDS data store limit is exceeded") && err.contains("64 bytes"),
        "{err}"
    );
    let err = fault("PATCH", "/mmds", r#"{"a": 1}"#);
    assert!(err.contains("not initialized"), "{err}");
    mote.ok("PUT", "/mmds", r#"{"a": "b"}"#);
    let err = fault(
        "PATCH",
        "/mmds",
        &format!(r#"{{"c": "{}"}}"#, "d".repeat(80)),
    );
    assert!(err.contains("limit is exceeded"), "{err}");
    mote.ok("PATCH", "/mmds", r#"{"a": null, "c": 1}"#);
    assert_eq!(
        mote.request("GET", "/mmds", "").json(),
        serde_json::json!({"c": 1})
    );
    let err = fault("PUT", "/mmds/config", r#"{"network_interfaces": ["eth9"]}"#);
    assert!(
        err.contains("does not correspond to any existing network interface")
            && err.contains("\"eth9\""),
        "{err}"
    );
    mote.ok(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#,
    );
    let err = fault(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.9"}"#,
    );
    assert!(
        err.contains("not link local") && err.contains("ipv4_address 10.0.0.9"),
        "{err}"
    );
    let err = fault("PUT", "/mmds/config", r#"{"network_interfaces": []}"#);
    assert!(err.contains("is empty"), "{err}");
    let err = fault(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"], "version": "V9"}"#,
    );
    assert!(err.contains("field `version`"), "{err}");
    let err = fault("PUT", "/mmds", "not json");
    assert!(err.contains("invalid mmds body"), "{err}");
    mote.ok(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"], "ipv4_address": "169.254.1.2", "version": "V2"}"#,
    );
    assert_eq!(
        mote.request("GET", "/vm/config", "").json()["mmds-config"]["ipv4_address"],
        "169.254.1.2"
    );
}

/// As Firecracker's: a snapshot keeps the MMDS configuration but not the store or the
/// tokens; `mmds_data` gives the restored clone its own store.
#[test]
fn a_restored_clone_keeps_mmds_config_and_gets_its_own_data() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let mut guest = Guest::spawn(&[]);
    guest.configure(
        "net-init,mmds-token:600,mmds-get:/latest/meta-data/instance-id:t,mmds-wait:3000,\
         mmds-get:/latest/meta-data/instance-id:t,mmds-token:600,\
         mmds-get:/latest/meta-data/instance-id:t",
        r#"{"version": "V2", "network_interfaces": ["eth0"]}"#,
    );
    guest.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let original = guest.mote.take().unwrap();
    original.wait_for_line("mmds-get status=200 body=i-0123", Duration::from_secs(30));
    let (state, mem) = common::api::pause_and_snapshot(&guest.sock, &scratch(&guest.ns));
    drop(original);

    let (sock, clone) = spawn_mote(&guest.ns, "clone.sock", &[]);
    let load = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
        "mmds_data": {"latest": {"meta-data": {"instance-id": "i-clone"}}},
    });
    let answer = request(&sock, "PUT", "/snapshot/load", &load.to_string());
    assert_eq!(answer.status, 204, "{answer:?}");
    let config = request(&sock, "GET", "/vm/config", "").json();
    assert_eq!(config["mmds-config"]["version"], "V2", "{config}");
    assert_eq!(
        request(&sock, "GET", "/mmds", "").json()["latest"]["meta-data"]["instance-id"],
        "i-clone"
    );
    let run = clone.wait(Duration::from_secs(60));
    let answers: Vec<_> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("probe: mmds-get") || l.starts_with("probe: mmds-token"))
        .collect();
    assert_eq!(
        answers,
        [
            // The old monitor's token means nothing to the new one.
            "probe: mmds-get status=401 body=MMDS token not valid.",
            "probe: mmds-token status=200 len=64",
            "probe: mmds-get status=200 body=i-clone",
        ],
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
}
