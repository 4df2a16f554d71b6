//! Firecracker's process contract: the flags a drop-in must take or refuse, the log lines tools
//! wait for, `--describe-snapshot`, and the startup metrics the jailer's flags feed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::api::ApiMote;
use common::{mote, probe_kernel, require_kvm};

const WAIT: Duration = Duration::from_secs(20);

/// Checks that `args` are refused as a bad flag (Firecracker's ArgParsing status, 153) with
/// `expected` in the one error line.
fn assert_refused(args: &[&str], expected: &str) {
    let output = mote(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(153), "{args:?}: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
    assert!(errors[0].contains(expected), "{args:?}: {stderr}");
}

#[test]
fn enable_pci_is_refused_naming_the_missing_transport() {
    assert_refused(
        &["--api-sock", "/nonexistent/a.sock", "--enable-pci"],
        "--enable-pci: mote has no PCI transport yet",
    );
}

#[test]
fn an_id_outside_firecrackers_rule_is_refused() {
    let long = "x".repeat(65);
    for (id, why) in [
        ("vm_1", "'_' at position 2"),
        (long.as_str(), "65 bytes long"),
    ] {
        assert_refused(
            &["--id", id],
            &format!("{why}; an id is 1 to 64 characters, each a letter, a digit or '-'"),
        );
    }
}

fn wait_for_file_text(path: &Path, text: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let contents = std::fs::read_to_string(path).unwrap_or_default();
        if contents.contains(text) {
            return contents;
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} in {}:\n{contents}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_log_says_api_server_started_once_the_socket_answers_and_the_exit_at_exit() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flags-log");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("mote.log");
    let _ = std::fs::remove_file(&log);
    let mote = ApiMote::spawn(
        "started-line",
        &["--log-path", log.to_str().unwrap(), "--id", "started-1"],
    );
    assert_eq!(mote.request("GET", "/", "").status, 200);
    let text = std::fs::read_to_string(&log).unwrap();
    let started: Vec<&str> = text
        .lines()
        .filter(|l| l.ends_with("API server started."))
        .collect();
    assert_eq!(started.len(), 1, "{text}");
    // A stop signal before boot ends the monitor in order, with 128 + SIGTERM.
    common::send_signal(mote.pid(), libc::SIGTERM);
    let run = mote.wait(WAIT);
    assert_eq!(
        run.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        run.stderr
    );
    let text = wait_for_file_text(&log, "exiting");
    let last = text.lines().last().unwrap_or("");
    assert!(
        last.ends_with("mote exiting with error. exit_code=143"),
        "{text}"
    );
}

#[test]
fn a_guest_that_stops_logs_exiting_successfully() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("exit-line", &[]);
    let boot = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=hello",
    });
    mote.ok("PUT", "/boot-source", &boot.to_string());
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let run = mote.wait(WAIT);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    let last = run.stderr.lines().last().unwrap_or("");
    assert!(
        last.ends_with("mote exiting successfully. exit_code=0"),
        "{}",
        run.stderr
    );
}

/// With no log path, a monitor driven as Firecracker is logs where Firecracker does, on stdout
/// (beside the console); `mote run` keeps stdout for the console and logs on stderr.
#[test]
fn without_a_log_path_the_api_monitor_logs_on_stdout_and_mote_run_on_stderr() {
    if !require_kvm() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flags-log-default");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let config = dir.join("config.json");
    let boot = serde_json::json!({"boot-source": {
        "kernel_image_path": probe_kernel(),
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=hello",
    }});
    std::fs::write(&config, boot.to_string()).unwrap();
    let api = common::run_mote(
        &[
            "--api-sock",
            socket.to_str().unwrap(),
            "--config-file",
            config.to_str().unwrap(),
        ],
        None,
        WAIT,
    );
    assert_eq!(api.status.code(), Some(0), "{}", api.stderr);
    // Log lines may land inside a console line, as with Firecracker.
    assert!(api.stdout.contains("hello"), "{}", api.stdout);
    assert!(api.stdout.contains("API server started."), "{}", api.stdout);
    assert!(
        api.stdout
            .contains("mote exiting successfully. exit_code=0"),
        "{}",
        api.stdout
    );
    assert!(
        !api.stderr.contains("API server started."),
        "{}",
        api.stderr
    );

    let probe = probe_kernel();
    let run = common::run_mote(
        &[
            "run",
            "--kernel",
            probe.to_str().unwrap(),
            "--append",
            "probe.run=hello",
        ],
        None,
        WAIT,
    );
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("probe: hello"), "{}", run.stdout);
    assert!(
        !run.stdout.contains("exiting successfully"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr
            .contains("mote exiting successfully. exit_code=0"),
        "{}",
        run.stderr
    );
}

#[test]
fn describe_snapshot_prints_the_version_of_a_real_snapshot() {
    if !require_kvm() {
        return;
    }
    let api = ApiMote::spawn("describe", &[]);
    let boot = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=hello,count:1000:3000000",
    });
    api.ok("PUT", "/boot-source", &boot.to_string());
    api.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    api.wait_for_stdout("probe: count=1\n", WAIT);
    let (state, _mem) = api.pause_and_snapshot();
    drop(api);
    let described = mote(&["--describe-snapshot", state.to_str().unwrap()]);
    let version = mote(&["--snapshot-version"]);
    assert!(described.status.success(), "{described:?}");
    assert_eq!(
        String::from_utf8_lossy(&described.stdout),
        format!("v{}\n", mote::cli::SNAPSHOT_VERSION)
    );
    assert_eq!(described.stdout, version.stdout);
}

#[test]
fn describe_snapshot_refuses_what_is_not_one() {
    let output = mote(&["--describe-snapshot", "/etc/passwd"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "mote: /etc/passwd: not a mote snapshot state file (wrong magic)\n"
    );
    assert!(output.stdout.is_empty());
    let output = mote(&["--describe-snapshot", "/"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "mote: the snapshot state file / is not a regular file (a directory)\n"
    );
}

fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass, which outlives the call.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(ret, 0);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The `api_server` section of a metrics line flushed once a probe guest runs (Firecracker
/// refuses FlushMetrics before boot).
fn flushed_api_server(mote: &ApiMote, metrics: &Path) -> serde_json::Value {
    let source = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=boot,spin",
    });
    mote.ok("PUT", "/boot-source", &source.to_string());
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(metrics).unwrap();
    let line = text.lines().last().unwrap();
    serde_json::from_str::<serde_json::Value>(line).unwrap()["api_server"].clone()
}

#[test]
fn the_jailers_start_times_become_the_startup_metrics() {
    if !require_kvm() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flags-metrics");
    std::fs::create_dir_all(&dir).unwrap();
    let metrics = dir.join("metrics.json");
    let _ = std::fs::remove_file(&metrics);
    // As if a jailer had started 2 s ago and spent 300 ms of CPU.
    let start = (monotonic_us() - 2_000_000).to_string();
    let mote = ApiMote::spawn(
        "startup-metrics",
        &[
            "--metrics-path",
            metrics.to_str().unwrap(),
            "--start-time-us",
            &start,
            "--start-time-cpu-us",
            "0",
            "--parent-cpu-time-us",
            "300000",
        ],
    );
    let api_server = flushed_api_server(&mote, &metrics);
    let wall = api_server["process_startup_time_us"].as_u64().unwrap();
    assert!(
        (2_000_000..2_000_000 + WAIT.as_micros() as u64).contains(&wall),
        "{api_server}"
    );
    let cpu = api_server["process_startup_time_cpu_us"].as_u64().unwrap();
    assert!(cpu > 300_000, "{api_server}");

    // Without the flags, Firecracker reports 0.
    let metrics = dir.join("metrics-none.json");
    let _ = std::fs::remove_file(&metrics);
    let mote = ApiMote::spawn(
        "no-startup-metrics",
        &["--metrics-path", metrics.to_str().unwrap()],
    );
    let api_server = flushed_api_server(&mote, &metrics);
    assert_eq!(api_server["process_startup_time_us"], 0, "{api_server}");
    assert_eq!(api_server["process_startup_time_cpu_us"], 0, "{api_server}");
}

/// `--level` holds for the log file `--log-path` names, and `--module` (Firecracker's flag)
/// keeps only one module's lines.
#[test]
fn level_and_module_flags_filter_the_log_file() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flags-level-module");
    std::fs::create_dir_all(&dir).unwrap();
    let (warned, api_only) = (dir.join("warning.log"), dir.join("api.log"));
    for log in [&warned, &api_only] {
        let _ = std::fs::remove_file(log);
    }
    // At Warning, a refused request (logged at Info) is not written.
    let mote = ApiMote::spawn(
        "level-flag",
        &["--log-path", warned.to_str().unwrap(), "--level", "Warning"],
    );
    assert_eq!(mote.request("PUT", "/boot-source", "{}").status, 400);
    mote.ok("PUT", "/logger", r#"{"level": "Warning"}"#);
    drop(mote);
    let text = std::fs::read_to_string(&warned).unwrap_or_default();
    assert!(!text.contains("PUT /boot-source: 400"), "{text}");
    assert!(!text.contains("API server started."), "{text}");

    // With --module mote::api, the API's lines are there and the exit line (mote's) is not.
    let mote = ApiMote::spawn(
        "module-flag",
        &[
            "--log-path",
            api_only.to_str().unwrap(),
            "--module",
            "mote::api",
        ],
    );
    assert_eq!(mote.request("PUT", "/boot-source", "{}").status, 400);
    common::send_signal(mote.pid(), libc::SIGTERM);
    let run = mote.wait(WAIT);
    assert_eq!(
        run.status.code(),
        Some(128 + libc::SIGTERM),
        "{:?} {}",
        run.status,
        run.stderr
    );
    let text = wait_for_file_text(&api_only, "PUT /boot-source: 400");
    assert!(text.contains("API server started."), "{text}");
    assert!(!text.contains("exiting"), "{text}");
}
