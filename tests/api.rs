//! The Firecracker-compatible REST API, driven over its Unix socket as a client would: a whole
//! probe-guest lifecycle, every class of refusal, config files, `GET /vm/config` round trips,
//! pause and resume, Ctrl-Alt-Del, drive updates, metrics and the logger.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::api::{read_answer, ApiMote};
use common::{probe_kernel, require_kvm, run_mote};

const SECTOR: u64 = 512;
const WAIT: Duration = Duration::from_secs(20);

fn boot_source(steps: &str) -> String {
    serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
    })
    .to_string()
}

fn drive_json(id: &str, path: &Path, root: bool, read_only: bool) -> String {
    serde_json::json!({
        "drive_id": id,
        "path_on_host": path,
        "is_root_device": root,
        "is_read_only": read_only,
    })
    .to_string()
}

fn start(mote: &ApiMote) {
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
}

#[test]
fn a_whole_probe_lifecycle_through_the_api() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("lifecycle", &[]);
    let info = mote.request("GET", "/", "").json();
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "anonymous-instance");
    let disk = mote.dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 * SECTOR as usize]).unwrap();

    mote.ok(
        "PUT",
        "/boot-source",
        &boot_source("hello,cpus,mem,blk-init,blk-id"),
    );
    mote.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 96}"#,
    );
    mote.ok("PATCH", "/machine-config", r#"{"vcpu_count": 3}"#);
    mote.ok(
        "PUT",
        "/drives/scratch",
        &drive_json("scratch", &disk, false, false),
    );
    let config = mote.request("GET", "/machine-config", "").json();
    assert_eq!(config["vcpu_count"], 3);
    assert_eq!(config["mem_size_mib"], 96);
    start(&mote);
    let socket = mote.socket.clone();
    let run = mote.wait(WAIT);
    assert_eq!(run.status.code(), Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(!socket.exists(), "the API socket outlived the monitor");
    assert!(run.stdout.contains("probe: hello"), "{}", run.stdout);
    assert!(run.stdout.contains("probe: cpus=3"), "{}", run.stdout);
    assert!(
        run.stdout.contains("probe: blk-id status=0 id=scratch"),
        "{}",
        run.stdout
    );
}

/// Waits for `mote` to end after `signal` and checks that it ended in order: status 128 + N,
/// a line naming the signal, and no socket left behind to make the next start fail.
fn assert_stopped_in_order(mote: ApiMote, signal: libc::c_int, name: &str) {
    common::send_signal(mote.pid(), signal);
    let socket = mote.socket.clone();
    let run = mote.wait(WAIT);
    assert_eq!(
        run.status.code(),
        Some(128 + signal),
        "{name}: {:?}\n{}",
        run.status,
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!("stopped by {name}")),
        "{}",
        run.stderr
    );
    assert!(!socket.exists(), "the API socket outlived the monitor");
}

/// Every signal that would end the monitor ends it in order, before boot as after: not only
/// SIGTERM and SIGINT but SIGQUIT (Ctrl-\), SIGUSR1 and the others a supervisor may send.
#[test]
fn a_stop_signal_before_boot_ends_in_order_and_removes_the_socket() {
    if !require_kvm() {
        return;
    }
    for (signal, name) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGALRM, "SIGALRM"),
    ] {
        let mote = ApiMote::spawn(&format!("preboot-{name}"), &[]);
        mote.ok(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
        );
        assert_stopped_in_order(mote, signal, name);
    }
}

#[test]
fn sigquit_and_sigusr1_stop_a_running_guest_in_order() {
    if !require_kvm() {
        return;
    }
    for (signal, name) in [(libc::SIGQUIT, "SIGQUIT"), (libc::SIGUSR1, "SIGUSR1")] {
        let mote = ApiMote::spawn(&format!("running-{name}"), &[]);
        mote.ok("PUT", "/boot-source", &boot_source("hello,spin"));
        start(&mote);
        mote.wait_for_stdout("probe: hello", WAIT);
        assert_stopped_in_order(mote, signal, name);
    }
}

#[test]
fn get_reports_running_and_paused_and_pause_stops_the_guest() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("pause", &[]);
    mote.ok("PUT", "/boot-source", &boot_source("count:100000:200000"));
    start(&mote);
    assert_eq!(mote.request("GET", "/", "").json()["state"], "Running");
    mote.wait_for_stdout("probe: count=3\n", WAIT);

    mote.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(mote.request("GET", "/", "").json()["state"], "Paused");
    // What the guest wrote before the pause may still be on its way (the console's buffer,
    // the pipe, this test's reader): the output at the pause is the one that stopped growing.
    // (Ten tries at most: a guest that goes on printing fails the check below.)
    let mut at_pause = mote.stdout();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        let now = mote.stdout();
        if now == at_pause {
            break;
        }
        at_pause = now;
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(mote.stdout(), at_pause, "the guest printed while paused");
    // Pausing twice is harmless, as in Firecracker.
    mote.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);

    mote.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(mote.request("GET", "/", "").json()["state"], "Running");
    let last = at_pause
        .lines()
        .filter_map(|l| l.strip_prefix("probe: count="))
        .filter_map(|n| n.parse::<u64>().ok())
        .max()
        .unwrap();
    // It goes on from where it stopped.
    mote.wait_for_stdout(&format!("probe: count={}\n", last + 2), WAIT);
}

#[test]
fn ctrl_alt_del_reaches_the_guests_keyboard() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("ctrl-alt-del", &[]);
    mote.ok("PUT", "/boot-source", &boot_source("kbd:8"));
    start(&mote);
    mote.wait_for_stdout("probe: kbd: waiting", WAIT);
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let run = mote.wait(WAIT);
    assert!(
        run.stdout.contains("probe: kbd: 14 11 e0 71 e0 f0 71 f0"),
        "{}",
        run.stdout
    );
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
}

#[test]
fn a_drive_gets_a_new_file_after_boot_and_the_guest_sees_its_size() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("patch-drive", &[]);
    let small = mote.dir.join("small.img");
    let large = mote.dir.join("large.img");
    std::fs::write(&small, vec![0u8; 16 * SECTOR as usize]).unwrap();
    std::fs::write(&large, vec![0u8; 96 * SECTOR as usize]).unwrap();
    mote.ok(
        "PUT",
        "/boot-source",
        &boot_source("blk-init,blk-wait-resize"),
    );
    mote.ok(
        "PUT",
        "/drives/data",
        &drive_json("data", &small, false, false),
    );
    start(&mote);
    mote.wait_for_stdout("probe: blk: waiting for resize", WAIT);

    let missing = mote.dir.join("missing.img");
    let patch =
        |path: &Path| serde_json::json!({"drive_id": "data", "path_on_host": path}).to_string();
    let fault = mote
        .request("PATCH", "/drives/data", &patch(&missing))
        .fault();
    assert!(fault.contains("missing.img"), "{fault}");
    let fault = mote
        .request(
            "PATCH",
            "/drives/other",
            &serde_json::json!({"drive_id": "other", "path_on_host": large}).to_string(),
        )
        .fault();
    assert!(fault.contains("other"), "{fault}");

    mote.ok("PATCH", "/drives/data", &patch(&large));
    let run = mote.wait(WAIT);
    assert!(
        run.stdout.contains("probe: blk-capacity: 96"),
        "{}",
        run.stdout
    );
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
}

#[test]
fn every_kind_of_bad_request_gets_a_400_naming_the_problem() {
    let mote = ApiMote::spawn("bad-requests", &[]);
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "PUT",
            "/machine-config",
            "{\"vcpu_count\": 2",
            "invalid machine-config body",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64, "gpu": true}"#,
            "unknown field `gpu`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "two", "mem_size_mib": 64}"#,
            "field `vcpu_count`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 64}"#,
            "vcpu_count 0 is out of range",
        ),
        (
            "PATCH",
            "/machine-config",
            r#"{"vcpu_count": 33}"#,
            "vcpu_count 33 is out of range",
        ),
        (
            "PATCH",
            "/machine-config",
            r#"{"mem_size_mib": 0}"#,
            "mem_size_mib 0",
        ),
        (
            "PUT",
            "/drives/a",
            r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#,
            "does not match",
        ),
        (
            "PUT",
            "/drives/bad!id",
            r#"{"drive_id": "bad!id", "path_on_host": "/x", "is_root_device": false}"#,
            // Firecracker's words for an id in the path.
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "Reboot"}"#,
            "field `action_type`",
        ),
        (
            "PATCH",
            "/vm",
            r#"{"state": "Paused"}"#,
            "before starting the microVM",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
            "before starting",
        ),
        (
            "PATCH",
            "/drives/a",
            r#"{"drive_id": "a", "path_on_host": "/x"}"#,
            "before starting",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
            "configure the boot source",
        ),
        (
            "GET",
            "/no/such/path",
            "",
            "Invalid request method and/or path",
        ),
        (
            "DELETE",
            "/machine-config",
            "",
            "Invalid request method and/or path",
        ),
        ("PUT", "/boot-source", "", "Empty PUT request."),
        // serde alone would read this as vcpu_count 2, mem_size_mib 64 (found by tools/api-fuzz).
        (
            "PUT",
            "/machine-config",
            "[2, 64]",
            "expected a JSON object",
        ),
        (
            "PUT",
            "/logger",
            r#"{"level": "Loud"}"#,
            "unknown log level",
        ),
    ];
    for (method, path, body, expected) in cases {
        let fault = mote.request(method, path, body).fault();
        assert!(
            fault.contains(expected),
            "{method} {path} {body}: {fault:?} does not say {expected:?}"
        );
    }
    // Firecracker opens the files a request names when it arrives: a boot source with a
    // missing kernel or initrd, or a drive with a missing file, is refused then, and the
    // monitor stays up for a corrected one.
    let kernel = probe_kernel();
    for (path, body, missing) in [
        (
            "/boot-source",
            serde_json::json!({"kernel_image_path": "/no/such/vmlinux"}),
            "/no/such/vmlinux",
        ),
        (
            "/boot-source",
            serde_json::json!({"kernel_image_path": kernel, "initrd_path": "/no/such/initrd"}),
            "/no/such/initrd",
        ),
        (
            "/drives/data",
            serde_json::json!({"drive_id": "data", "path_on_host": "/no/such/disk",
                               "is_root_device": false}),
            "/no/such/disk",
        ),
    ] {
        let fault = mote.request("PUT", path, &body.to_string()).fault();
        assert!(fault.contains(missing), "{path}: {fault}");
    }
    let fault = mote
        .request("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#)
        .fault();
    assert!(fault.contains("configure the boot source"), "{fault}");
    // FlushMetrics is for a running VM, as in Firecracker.
    let fault = mote
        .request("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#)
        .fault();
    assert!(fault.contains("before starting the microVM"), "{fault}");
    assert_eq!(mote.request("GET", "/", "").json()["state"], "Not started");
}

/// A snapshot brings its own configuration: once a request configured what only a boot uses,
/// Firecracker refuses to load one, and so does mote (the monitor stays up). The logger and
/// metrics are the process's, not the machine's, and do not count.
#[test]
fn a_snapshot_load_after_boot_configuration_is_refused() {
    let mote = ApiMote::spawn("load-after-config", &[]);
    let load = r#"{"snapshot_path": "/no/such/state", "mem_file_path": "/no/such/mem"}"#;
    let logger = serde_json::json!({"log_path": mote.dir.join("log")}).to_string();
    mote.ok("PUT", "/logger", &logger);
    mote.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
    );
    let fault = mote.request("PUT", "/snapshot/load", load).fault();
    assert_eq!(
        fault,
        "Loading a microVM snapshot not allowed after configuring boot-specific resources."
    );
    assert_eq!(mote.request("GET", "/", "").json()["state"], "Not started");
}

#[test]
fn boot_only_requests_are_refused_after_boot() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("after-boot", &[]);
    mote.ok("PUT", "/boot-source", &boot_source("spin"));
    start(&mote);
    for (method, path, body) in [
        ("PUT", "/boot-source", boot_source("hello")),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64}"#.to_string(),
        ),
        (
            "PATCH",
            "/machine-config",
            r#"{"vcpu_count": 2}"#.to_string(),
        ),
        (
            "PUT",
            "/drives/x",
            r#"{"drive_id": "x", "path_on_host": "/x", "is_root_device": false}"#.to_string(),
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_string(),
        ),
    ] {
        let fault = mote.request(method, path, &body).fault();
        assert!(
            fault.contains("after starting the microVM"),
            "{method} {path}: {fault}"
        );
    }
    assert_eq!(mote.request("GET", "/", "").json()["state"], "Running");
}

#[test]
fn oversized_garbage_and_abandoned_requests_never_stall_the_api() {
    let mote = ApiMote::spawn("hostile-clients", &["--http-api-max-payload-size", "1024"]);
    // A body over the limit is refused from its headers, before it is sent.
    let mut big = UnixStream::connect(&mote.socket).unwrap();
    big.write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
        .unwrap();
    let answer = read_answer(&mut big);
    assert!(
        answer.fault().contains("larger than the limit of 1024"),
        "{answer:?}"
    );

    // Idle, half-sent and garbage clients, all at once.
    let mut idle = UnixStream::connect(&mote.socket).unwrap();
    idle.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    for _ in 0..5 {
        let mut gone = UnixStream::connect(&mote.socket).unwrap();
        gone.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    }
    let mut garbage = UnixStream::connect(&mote.socket).unwrap();
    garbage
        .write_all(&[0u8, 0xff, 0x13, b'\r', b'\n', b'\r', b'\n'])
        .unwrap();
    assert_eq!(read_answer(&mut garbage).status, 400);

    // Meanwhile another client is served, with keep-alive.
    let mut client = UnixStream::connect(&mote.socket).unwrap();
    for _ in 0..3 {
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let answer = read_answer(&mut client);
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    // A body that arrives in pieces, after `Expect: 100-continue`, is served whole.
    let body = r#"{"vcpu_count": 2, "mem_size_mib": 64}"#;
    let mut slow = UnixStream::connect(&mote.socket).unwrap();
    write!(
        slow,
        "PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let continue_100 = read_answer(&mut slow);
    assert_eq!(continue_100.status, 100);
    slow.write_all(&body.as_bytes()[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    slow.write_all(&body.as_bytes()[10..]).unwrap();
    assert_eq!(read_answer(&mut slow).status, 204);
    drop(idle);
    assert_eq!(
        mote.request("GET", "/machine-config", "").json()["vcpu_count"],
        2
    );
}

#[test]
fn a_config_file_boots_without_api_calls_and_vm_config_round_trips() {
    if !require_kvm() {
        return;
    }
    // Configure through the API, read the effective configuration back…
    let mote = ApiMote::spawn("vm-config", &[]);
    let disk = mote.dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 32 * SECTOR as usize]).unwrap();
    mote.ok(
        "PUT",
        "/boot-source",
        &boot_source("hello,cmdline,cpus,blk-init,blk-id"),
    );
    mote.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 80}"#,
    );
    mote.ok(
        "PUT",
        "/drives/rootfs",
        &drive_json("rootfs", &disk, true, true),
    );
    let config = mote.request("GET", "/vm/config", "");
    assert_eq!(config.status, 200);
    let json = config.json();
    assert_eq!(json["machine-config"]["vcpu_count"], 2);
    assert_eq!(json["drives"][0]["drive_id"], "rootfs");

    // …and boot another monitor from it, with no API at all.
    let file = mote.dir.join("config.json");
    std::fs::write(&file, &config.body).unwrap();
    let run = run_mote(
        &["--no-api", "--config-file", file.to_str().unwrap()],
        None,
        WAIT,
    );
    assert_eq!(run.status.code(), Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("probe: cpus=2"), "{}", run.stdout);
    assert!(
        run.stdout.contains("probe: blk-id status=0 id=rootfs"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("root=/dev/vda ro"), "{}", run.stdout);
}

#[test]
fn a_config_file_boots_and_the_api_serves_the_running_guest() {
    if !require_kvm() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("api/config-and-api");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.json");
    let config = serde_json::json!({
        "boot-source": serde_json::from_str::<serde_json::Value>(&boot_source("spin")).unwrap(),
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
    });
    std::fs::write(&file, config.to_string()).unwrap();
    let mote = ApiMote::spawn(
        "config-and-api-run",
        &["--config-file", file.to_str().unwrap()],
    );
    let info = mote.request("GET", "/", "").json();
    assert_eq!(info["state"], "Running");
    let fault = mote
        .request("PUT", "/boot-source", &boot_source("hello"))
        .fault();
    assert!(fault.contains("after starting"), "{fault}");
}

#[test]
fn bad_config_files_and_flags_are_refused_with_a_reason() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("api/bad-config");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let run = run_mote(&["--no-api"], None, WAIT);
    assert_ne!(run.status.code(), Some(0));
    assert!(run.stderr.contains("--config-file"), "{}", run.stderr);

    let missing = dir.join("missing.json");
    let run = run_mote(
        &["--no-api", "--config-file", missing.to_str().unwrap()],
        None,
        WAIT,
    );
    // Firecracker's BadConfiguration status, for every config file it cannot use.
    assert_eq!(run.status.code(), Some(152));
    assert!(run.stderr.contains("missing.json"), "{}", run.stderr);

    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"machine-config": {"vcpu_count": "one", "mem_size_mib": 64}}"#,
    )
    .unwrap();
    let run = run_mote(
        &["--no-api", "--config-file", bad.to_str().unwrap()],
        None,
        WAIT,
    );
    assert_eq!(run.status.code(), Some(152));
    assert!(
        run.stderr.contains("bad.json") && run.stderr.contains("vcpu_count"),
        "{}",
        run.stderr
    );

    // A config file whose kernel is not there: read and parsed, but it cannot boot.
    let unbootable = dir.join("unbootable.json");
    std::fs::write(
        &unbootable,
        serde_json::json!({"boot-source": {"kernel_image_path": dir.join("no-such-kernel")}})
            .to_string(),
    )
    .unwrap();
    let run = run_mote(
        &["--no-api", "--config-file", unbootable.to_str().unwrap()],
        None,
        WAIT,
    );
    assert_eq!(run.status.code(), Some(152), "{}", run.stderr);
    assert!(run.stderr.contains("no-such-kernel"), "{}", run.stderr);

    // A socket path that is taken.
    let taken = dir.join("taken.sock");
    std::fs::write(&taken, "").unwrap();
    let run = run_mote(&["--api-sock", taken.to_str().unwrap()], None, WAIT);
    assert_eq!(run.status.code(), Some(1));
    assert!(run.stderr.contains("taken.sock"), "{}", run.stderr);
}

#[test]
fn metrics_count_api_requests_and_disk_io() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("metrics", &[]);
    let metrics = mote.dir.join("metrics.json");
    let disk = mote.dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 * SECTOR as usize]).unwrap();
    mote.ok(
        "PUT",
        "/metrics",
        &serde_json::json!({ "metrics_path": metrics }).to_string(),
    );
    mote.ok(
        "PUT",
        "/boot-source",
        &boot_source("blk-init,blk-write:0:8:5,blk-flush,blk-read:0:8:5,hello,spin"),
    );
    mote.ok(
        "PUT",
        "/drives/data",
        &drive_json("data", &disk, false, false),
    );
    let _ = mote.request(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 0, "mem_size_mib": 1}"#,
    );
    start(&mote);
    mote.wait_for_stdout("probe: hello", WAIT);
    mote.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["put_api_requests"]["drive_count"], 1, "{line}");
    assert_eq!(line["put_api_requests"]["machine_cfg_fails"], 1, "{line}");
    assert_eq!(line["block_data"]["write_bytes"], 8 * SECTOR, "{line}");
    assert_eq!(line["block_data"]["read_bytes"], 8 * SECTOR, "{line}");
    assert_eq!(line["block_data"]["flush_count"], 1, "{line}");
    assert!(line["vcpu"]["exit_io_out"].as_u64().unwrap() > 0, "{line}");
    // Counters are per report: a second flush starts from zero.
    mote.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["block_data"]["write_bytes"], 0, "{line}");
    assert_eq!(line["put_api_requests"]["actions_count"], 1, "{line}");
}

/// Firecracker's other metrics sections: `latencies_us` times pause, resume, snapshot create
/// and load (at the API and in the monitor), `uart` counts the console's bytes, `interrupts`
/// the devices' interrupts, `deprecated_api` a deprecated request (which is answered with
/// `Deprecation: true`), and `signals` and `logger` are there with Firecracker's names.
#[test]
fn latencies_uart_interrupts_and_deprecations_are_in_the_metrics() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("metrics-sections", &[]);
    let metrics = mote.dir.join("metrics.json");
    mote.ok(
        "PUT",
        "/metrics",
        &serde_json::json!({ "metrics_path": metrics }).to_string(),
    );
    let vsock = serde_json::json!({"vsock_id": "vsock0", "guest_cid": 3,
                                   "uds_path": mote.dir.join("v.sock")});
    let answer = mote.request("PUT", "/vsock", &vsock.to_string());
    assert_eq!(answer.status, 204, "{answer:?}");
    assert!(answer.head.contains("\r\nDeprecation: true"), "{answer:?}");
    let plain = mote.request("GET", "/machine-config", "");
    assert!(!plain.head.contains("Deprecation"), "{plain:?}");
    mote.ok(
        "PUT",
        "/boot-source",
        &boot_source("hello,count:1000:3000000"),
    );
    start(&mote);
    mote.wait_for_stdout("probe: count=1\n", WAIT);
    let (state, mem) = mote.pause_and_snapshot();
    mote.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    mote.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let latencies = &line["latencies_us"];
    for name in [
        "pause_vm",
        "resume_vm",
        "full_create_snapshot",
        "vmm_pause_vm",
        "vmm_resume_vm",
        "vmm_full_create_snapshot",
    ] {
        assert!(latencies[name].as_u64().unwrap() > 0, "{name}: {line}");
    }
    // The API's view includes the monitor's.
    assert!(
        latencies["full_create_snapshot"].as_u64()
            >= latencies["vmm_full_create_snapshot"].as_u64(),
        "{line}"
    );
    assert_eq!(latencies["diff_create_snapshot"], 0, "{line}");
    // The probe's console lines went through the UART, a byte at a time.
    let written = line["uart"]["write_count"].as_u64().unwrap();
    assert!(written >= "probe: hello\n".len() as u64, "{line}");
    assert_eq!(line["uart"]["flush_count"], written, "{line}");
    assert_eq!(line["uart"]["error_count"], 0, "{line}");
    assert_eq!(line["interrupts"]["config_updates"], 0, "{line}");
    assert_eq!(
        line["deprecated_api"]["deprecated_http_api_calls"], 1,
        "{line}"
    );
    for name in ["sighup", "sigxcpu", "sigxfsz", "sigpipe"] {
        assert_eq!(line["signals"][name], 0, "{name}: {line}");
    }
    for name in ["missed_metrics_count", "metrics_fails", "missed_log_count"] {
        assert_eq!(line["logger"][name], 0, "{name}: {line}");
    }
    drop(mote);

    // A restore times the load, at the API and in the monitor.
    let restored = ApiMote::spawn("metrics-sections-restored", &[]);
    let metrics = restored.dir.join("metrics.json");
    restored.ok(
        "PUT",
        "/metrics",
        &serde_json::json!({ "metrics_path": metrics }).to_string(),
    );
    let load = serde_json::json!({"snapshot_path": state, "mem_file_path": mem,
                                  "resume_vm": true,
                                  "vsock_override": {"uds_path": restored.dir.join("v.sock")}});
    let answer = restored.request("PUT", "/snapshot/load", &load.to_string());
    assert_eq!(answer.status, 204, "{answer:?}");
    restored.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(
        line["latencies_us"]["load_snapshot"].as_u64().unwrap() > 0,
        "{line}"
    );
    assert!(
        line["latencies_us"]["vmm_load_snapshot"].as_u64().unwrap() > 0,
        "{line}"
    );
}

#[test]
fn the_logger_writes_to_its_file_in_firecrackers_format() {
    let mote = ApiMote::spawn("logger", &["--id", "vm-7"]);
    let log = mote.dir.join("mote.log");
    mote.ok(
        "PUT",
        "/logger",
        &serde_json::json!({"log_path": log, "level": "Info", "show_level": true,
                            "show_log_origin": false})
        .to_string(),
    );
    // A refusal is logged there: `<timestamp> [vm-7:mote_api:INFO] API: PUT /boot-source: 400 …`.
    let _ = mote.request("PUT", "/boot-source", "{}");
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("PUT /boot-source: 400"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(" [vm-7:mote_api:INFO] "), "{line}");

    // Configured again, as Firecracker allows before boot: what is given changes, the rest
    // stays (the file, show_level), the level left out goes back to Info.
    mote.ok(
        "PUT",
        "/logger",
        &serde_json::json!({"show_log_origin": true, "level": "Warning"}).to_string(),
    );
    let _ = mote.request("PUT", "/boot-source", "{}");
    mote.ok("PUT", "/logger", r#"{"show_level": false}"#);
    let _ = mote.request("PUT", "/machine-config", "{}");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // At Warning, the 400 (logged at Info) is not written; back at Info, it is, without the
    // level but with the origin.
    let machine = lines
        .iter()
        .find(|l| l.contains("PUT /machine-config: 400"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        machine.contains(" [vm-7:mote_api:src/api/mod.rs:"),
        "{machine}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("PUT /boot-source: 400"))
            .count(),
        1,
        "{text}"
    );
    let config = mote.request("GET", "/vm/config", "").json();
    assert_eq!(
        config["logger"],
        serde_json::json!({"log_path": log, "level": "Info", "show_level": false,
                           "show_log_origin": true}),
        "{config}"
    );
    // A file that cannot be opened changes nothing.
    let fault = mote
        .request(
            "PUT",
            "/logger",
            &serde_json::json!({"log_path": mote.dir.join("no/such/dir/log"), "level": "Off"})
                .to_string(),
        )
        .fault();
    assert!(fault.contains("cannot open the log file"), "{fault}");
    let config = mote.request("GET", "/vm/config", "").json();
    assert_eq!(config["logger"]["level"], "Info", "{config}");
}

/// The descriptors of process `pid` whose target starts with `prefix`: VMs are
/// `anon_inode:kvm-vm`, vCPUs `anon_inode:kvm-vcpu:N`.
fn kvm_fds(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter(|target| target.to_str().is_some_and(|t| t.starts_with(prefix)))
                .count()
        })
        .unwrap_or(0)
}

fn kvm_vms(pid: u32) -> usize {
    kvm_fds(pid, "anon_inode:kvm-vm")
}

/// A monitor waiting for its first request makes the KVM VM every start needs ahead, and the
/// start takes that one: the guest runs with one VM in the process, not two.
#[test]
fn a_waiting_monitor_makes_its_vm_ahead_and_the_start_takes_it() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("vm-ahead", &[]);
    let deadline = Instant::now() + WAIT;
    while kvm_vms(mote.pid()) == 0 {
        assert!(
            Instant::now() < deadline,
            "no VM made while the monitor waited"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(kvm_fds(mote.pid(), "anon_inode:kvm-vcpu:"), 0);
    assert_eq!(mote.request("GET", "/", "").json()["state"], "Not started");
    // The guest spins on after its hello: a guest that ends takes its VM with it.
    mote.ok("PUT", "/boot-source", &boot_source("hello,spin"));
    start(&mote);
    mote.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(kvm_vms(mote.pid()), 1, "the start made a VM of its own");
}
