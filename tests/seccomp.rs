//! Seccomp: every thread of a running monitor is filtered, the filters can be replaced or
//! turned off, and a call outside them kills the monitor with SIGSYS.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::api::ApiMote;
use common::{mote_bin, probe_kernel, require_kvm};

const FILTERS: &str = env!("MOTE_SECCOMP_JSON");

/// One thread's seccomp state, from /proc/PID/task/TID/status.
#[derive(Debug)]
struct ThreadSeccomp {
    name: String,
    mode: u32,
    filters: u32,
}

fn threads(pid: u32) -> Vec<ThreadSeccomp> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in {status}"))
        };
        threads.push(ThreadSeccomp {
            name: field("Name:"),
            mode: field("Seccomp:").parse().unwrap(),
            filters: field("Seccomp_filters:").parse().unwrap(),
        });
    }
    threads.sort_by(|a, b| a.name.cmp(&b.name));
    threads
}

/// Waits until the process has `count` threads whose names start with `prefix`.
fn wait_for_threads(pid: u32, prefix: &str, count: usize) -> Vec<ThreadSeccomp> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = threads(pid);
        if all.iter().filter(|t| t.name.starts_with(prefix)).count() >= count {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "no {count} {prefix} threads: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn filters_of<'a>(threads: &'a [ThreadSeccomp], name: &str) -> &'a ThreadSeccomp {
    threads
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no thread {name}: {threads:?}"))
}

/// `mote run` of a probe that spins, with `extra` flags; killed by the caller.
fn spawn_spinning_guest(extra: &[&str]) -> Child {
    let probe = probe_kernel();
    Command::new(mote_bin())
        .args(extra)
        .args(["run", "--kernel", probe.to_str().unwrap()])
        .args(["--append", "probe.run=hello,spin", "--vcpus", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start mote")
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn every_thread_of_mote_run_runs_under_a_filter() {
    if !require_kvm() {
        return;
    }
    let child = spawn_spinning_guest(&[]);
    let pid = child.id();
    let threads = wait_for_threads(pid, "mote_vcpu", 2);
    // Let the main thread stack its running filter after the vCPUs started.
    std::thread::sleep(Duration::from_millis(100));
    let threads_now = self::threads(pid);
    stop(child);
    for thread in &threads_now {
        assert_eq!(
            thread.mode, 2,
            "{thread:?} is not in filter mode: {threads:?}"
        );
        assert!(thread.filters >= 1, "{thread:?}");
    }
    // `mote run` has no client: the main thread runs under `vmm` alone from the event loop
    // on, and the vCPUs under `vcpu`.
    assert_eq!(
        filters_of(&threads_now, "mote").filters,
        1,
        "{threads_now:?}"
    );
    assert_eq!(filters_of(&threads_now, "mote_vcpu0").filters, 1);
    assert_eq!(filters_of(&threads_now, "mote_vcpu1").filters, 1);
}

fn start_spinning_guest(mote: &ApiMote) {
    let probe = probe_kernel();
    let boot_source = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=hello,spin"}}"#,
        probe.display()
    );
    mote.ok("PUT", "/boot-source", &boot_source);
    mote.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote.wait_for_stdout("probe: hello", Duration::from_secs(10));
}

#[test]
fn every_thread_of_an_api_driven_mote_runs_under_a_filter() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("seccomp-threads", &[]);
    let pid = mote.pid();
    // Before boot: the API thread has its filter, the main thread `build` once it serves.
    // (`GET /` is the API thread's own answer before the start; `GET /machine-config` is the
    // main thread's.)
    wait_for_threads(pid, "mote_api", 1);
    let answer = mote.request("GET", "/machine-config", "");
    assert_eq!(answer.status, 200, "{answer:?}");
    let before = threads(pid);
    assert_eq!(filters_of(&before, "mote_api").mode, 2, "{before:?}");
    assert_eq!(filters_of(&before, "mote").mode, 2, "{before:?}");
    assert_eq!(filters_of(&before, "mote").filters, 1, "{before:?}");
    start_spinning_guest(&mote);
    let after = wait_for_threads(pid, "mote_vcpu", 2);
    for thread in &after {
        assert_eq!(thread.mode, 2, "{thread:?}: {after:?}");
        assert!(thread.filters >= 1, "{thread:?}");
    }
    assert_eq!(filters_of(&after, "mote_api").filters, 1, "{after:?}");
    assert_eq!(filters_of(&after, "mote_vcpu1").filters, 2, "{after:?}");
    // Requests after boot still work under the filters: pause, resume, read the state.
    mote.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    mote.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let answer = mote.request("GET", "/", "");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(filters_of(&threads(pid), "mote").filters, 2);
}

/// `mote run --restore … --api-sock`: the restored monitor's threads are filtered like a booted
/// one's, and its socket goes with it.
#[test]
fn every_thread_of_a_restored_mote_runs_under_a_filter() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("seccomp-restore-source", &[]);
    start_spinning_guest(&mote);
    let (state, mem) = mote.pause_and_snapshot();
    let socket = mote.dir.join("restored.sock");
    let child = Command::new(mote_bin())
        .args(["run", "--restore"])
        .arg(&state)
        .arg("--mem-file")
        .arg(&mem)
        .arg("--api-sock")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start mote");
    let pid = child.id();
    wait_for_threads(pid, "mote_vcpu", 2);
    // The API answers once the event loop runs, which is after the main thread's filter.
    let answer = common::api::request(&socket, "GET", "/", "");
    assert_eq!(answer.json()["state"], "Running", "{answer:?}");
    let threads = threads(pid);
    common::send_signal(pid, libc::SIGTERM);
    let mut child = child;
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(!socket.exists(), "the API socket outlived the monitor");
    for thread in &threads {
        assert_eq!(thread.mode, 2, "{thread:?} is not filtered: {threads:?}");
    }
    assert_eq!(filters_of(&threads, "mote").filters, 1, "{threads:?}");
    assert_eq!(filters_of(&threads, "mote_api").filters, 1, "{threads:?}");
    assert_eq!(filters_of(&threads, "mote_vcpu1").filters, 1, "{threads:?}");
}

#[test]
fn no_seccomp_leaves_every_thread_unfiltered() {
    if !require_kvm() {
        return;
    }
    let child = spawn_spinning_guest(&["--no-seccomp"]);
    let threads = wait_for_threads(child.id(), "mote_vcpu", 2);
    stop(child);
    assert!(threads.iter().all(|t| t.mode == 0), "{threads:?}");
}

/// Writes the built-in filters less the rules of `filter` that `drop` picks, to a file.
fn filters_without(name: &str, filter: &str, drop: impl Fn(&serde_json::Value) -> bool) -> PathBuf {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(FILTERS).unwrap()).unwrap();
    let rules = json[filter]["filter"].as_array_mut().unwrap();
    let before = rules.len();
    rules.retain(|rule| !drop(rule));
    assert!(rules.len() < before, "no rule of `{filter}` dropped");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("seccomp");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

fn wait_for_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mote did not die within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn an_api_request_outside_the_api_filter_kills_with_sigsys() {
    if !require_kvm() {
        return;
    }
    // The API thread accepts each client with accept4: without it, the first client kills mote.
    let path = filters_without("api-without-accept4.json", "api", |rule| {
        rule["syscall"] == "accept4"
    });
    let mote = ApiMote::spawn(
        "seccomp-sigsys",
        &["--seccomp-filter", path.to_str().unwrap()],
    );
    let _ = std::os::unix::net::UnixStream::connect(&mote.socket);
    let run = mote.wait(Duration::from_secs(10));
    assert_eq!(
        run.status.signal(),
        Some(libc::SIGSYS),
        "{:?}\n{}",
        run.status,
        run.stderr
    );
}

#[test]
fn a_guest_exit_outside_the_vcpu_filter_kills_with_sigsys() {
    if !require_kvm() {
        return;
    }
    // Without KVM_RUN in `vcpu`, the first resume kills mote.
    let path = filters_without("vcpu-without-kvm-run.json", "vcpu", |rule| {
        rule["syscall"] == "ioctl" && rule["args"][0]["val"] == 0xae80
    });
    let mut child = spawn_spinning_guest(&["--seccomp-filter", path.to_str().unwrap()]);
    let status = wait_for_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}

#[test]
fn the_filters_can_be_given_as_a_file() {
    if !require_kvm() {
        return;
    }
    let run = common::probe_run("hello", &["--seccomp-filter", FILTERS]);
    assert!(run.status.success(), "{:?}\n{}", run.status, run.stderr);
    assert!(run.stdout.contains("probe: hello"), "{}", run.stdout);
    assert!(
        run.stderr.contains("seccomp filters from"),
        "{}",
        run.stderr
    );

    let missing = common::run_mote(
        &[
            "--seccomp-filter",
            "/nonexistent/filters.json",
            "run",
            "--kernel",
            "/k",
        ],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(
        missing.status.code(),
        Some(1),
        "{missing:?}",
        missing = missing.stderr
    );
    assert!(
        missing
            .stderr
            .contains("cannot open the seccomp filter file /nonexistent/filters.json"),
        "{}",
        missing.stderr
    );
}
