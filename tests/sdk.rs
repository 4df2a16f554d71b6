//! Python SDKs for Firecracker from PyPI, run unchanged against mote through their ordinary flows
//! (`tests/sdk/*_flow.py`, in a venv under target/ that `tests/sdk/venv.py` makes), and
//! Firecracker's getting-started sequence with curl (`tests/sdk/getting-started.sh`). mote is
//! installed for them as `firecracker` in a scratch `bin/` first on PATH, and everything runs
//! inside a network namespace of the test's own (the SDKs make TAPs and NAT rules): nothing
//! leaves it. The probe guest stands in for their Linux guests; where an SDK's flow needs the
//! guest's user space (SSH), this host cannot go further, and the script says where it stops.

mod common;
#[path = "net/netns.rs"]
mod netns;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use netns::Netns;

/// Longest a flow may take; each takes a few seconds.
const FLOW_TIMEOUT: Duration = Duration::from_secs(120);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory with `bin/firecracker` (mote) and `bin/sudo` (runs its arguments: the
/// tests run as root); on drop, every process still running from it is killed and it is
/// removed. Short and under the temporary directory, as the SDKs put sockets in it.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mote-sdk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("making the scratch directory");
        std::os::unix::fs::symlink(common::mote_bin(), bin.join("firecracker"))
            .expect("linking mote as firecracker");
        let sudo = bin.join("sudo");
        std::fs::write(&sudo, "#!/bin/sh\nexec \"$@\"\n").expect("writing the sudo shim");
        std::fs::set_permissions(&sudo, std::fs::Permissions::from_mode(0o755))
            .expect("making the sudo shim executable");
        Self { dir }
    }

    fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    /// The processes whose command line names this directory (the monitors the SDKs started).
    fn stragglers(&self) -> Vec<i32> {
        let needle = self.dir.to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for pid in self.stragglers() {
            // SAFETY: kill only sends a signal, to a process this test's SDK started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// target/sdk-venv's python, made on first use: PyPI must be reachable then.
fn venv_python() -> PathBuf {
    let out = Command::new("python3")
        .arg(repo().join("tests/sdk/venv.py"))
        .arg(repo())
        .stdin(Stdio::null())
        .output()
        .expect("cannot run python3 (install python3)");
    assert!(
        out.status.success(),
        "cannot make target/sdk-venv with the Firecracker SDKs from PyPI (is PyPI reachable? \
         these tests need it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Waits for `child` up to FLOW_TIMEOUT, killing it after; its output.
fn wait_with_timeout(mut child: Child, what: &str) -> Output {
    let started = Instant::now();
    while child.try_wait().expect("waiting for the child").is_none() {
        if started.elapsed() > FLOW_TIMEOUT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collecting the output");
            panic!(
                "{what} did not end within {FLOW_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collecting the output")
}

/// Runs `tests/sdk/SCRIPT` with the venv's python inside `ns`; it must exit 0.
fn run_flow(script: &str, ns: &Netns, scratch: &Scratch) -> String {
    let python = venv_python();
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&python)
        .arg(repo().join("tests/sdk").join(script))
        .env("PATH", scratch.path_env())
        .env("MOTE_SDK_WORK", &scratch.dir)
        .env("MOTE_PROBE_KERNEL", common::probe_kernel())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(&scratch.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run ip netns exec");
    let out = wait_with_timeout(child, script);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed ({})\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{stdout}");
    stdout
}

/// Where a line of mote's log (`2026-12-07T03:31:30.464516945 [id:thread:LEVEL…] …`) starts in
/// `text`, if one does.
fn log_line_start(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>, at: usize| {
        range.into_iter().all(|k| bytes[at + k].is_ascii_digit())
    };
    (0..bytes.len().saturating_sub(20)).find(|&at| {
        digits(0..4, at)
            && bytes[at + 4] == b'-'
            && digits(5..7, at)
            && bytes[at + 7] == b'-'
            && digits(8..10, at)
            && bytes[at + 10] == b'T'
            && bytes[at + 13] == b':'
            && bytes[at + 16] == b':'
    })
}

/// The guest's console in what mote wrote on stdout: without mote's log lines, which go there
/// before a logger is configured (as Firecracker's) and are written whole, but may land in the
/// middle of a line of the guest's.
fn console(stdout: &str) -> String {
    let mut out = String::new();
    let mut rest = stdout;
    while let Some(at) = log_line_start(rest) {
        out.push_str(&rest[..at]);
        rest = rest[at..].split_once('\n').map_or("", |(_, after)| after);
    }
    out.push_str(rest);
    out
}

fn ready() -> bool {
    common::require_kvm() && netns::require_root()
}

#[test]
fn log_lines_are_taken_out_of_the_console() {
    let stdout = "probe: 2026-12-07T03:47:04.064658886 [anonymous-instance:main:INFO:src/a.rs:1] \
                  running\nhello\n2026-12-07T03:47:04.1 [x] y\nprobe: done\n";
    assert_eq!(console(stdout), "probe: hello\nprobe: done\n");
}

#[test]
fn sdk_pyrecracker_whole_flow_with_snapshot_and_restore() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new("pyrecracker");
    let ns = Netns::new();
    let out = run_flow("pyrecracker_flow.py", &ns, &scratch);
    assert!(out.contains("restored and carried on"), "{out}");
}

#[test]
fn sdk_microheart_config_and_client_and_its_enable_pci_refused() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new("microheart");
    let ns = Netns::new();
    // microheart's NAT rule names the interface of the default route.
    ns.ip(&["route", "add", "default", "dev", "lo"]);
    let out = run_flow("microheart_flow.py", &ns, &scratch);
    assert!(out.contains("clean() removed everything"), "{out}");
}

#[test]
fn firecracker_getting_started_with_curl() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new("curl");
    let ns = Netns::new();
    ns.add_tap("tap0", Some("172.16.0.1/30"));
    let socket = scratch.dir.join("firecracker.socket");
    let rootfs = scratch.dir.join("rootfs.ext4");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).expect("writing the drive");
    let log = scratch.dir.join("firecracker.log");
    std::fs::write(&log, "").expect("making the log file");
    // As the guide does: `firecracker --api-sock …`, the guest's console on its stdout.
    let mut monitor = Command::new("ip")
        .args(["netns", "exec", &ns.name, "firecracker", "--api-sock"])
        .arg(&socket)
        .env("PATH", scratch.path_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start mote as firecracker");
    common::api::wait_for_socket(&socket, Duration::from_secs(10), || {
        "mote (as firecracker) did not make its socket".to_string()
    });
    let script = Command::new("sh")
        .arg(repo().join("tests/sdk/getting-started.sh"))
        .env("API_SOCKET", &socket)
        .env("KERNEL", common::probe_kernel())
        .env("ROOTFS", &rootfs)
        .env("LOGFILE", &log)
        .env("TAP_DEV", "tap0")
        .env(
            "KERNEL_BOOT_ARGS",
            "console=ttyS0 reboot=k panic=1 pci=off probe.run=hello,cpus,mem",
        )
        .stdin(Stdio::null())
        .output()
        .expect("cannot run sh");
    if !script.status.success() {
        let _ = monitor.kill();
    }
    let run = wait_with_timeout(monitor, "mote (as firecracker)");
    let console = console(&String::from_utf8_lossy(&run.stdout));
    assert!(
        script.status.success(),
        "the getting-started calls failed: {}\nmote's stderr:\n{}",
        String::from_utf8_lossy(&script.stderr),
        String::from_utf8_lossy(&run.stderr)
    );
    // The guest ran with what the calls configured, and reset, which ends the monitor with 0.
    for line in [
        "probe: hello",
        "probe: cpus=2",
        "probe: mem ram_kib=",
        "probe: done",
    ] {
        assert!(
            console.contains(line),
            "no {line:?} on the console:\n{console}"
        );
    }
    let ram_kib: u64 = console
        .split("probe: mem ram_kib=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        (250 * 1024..=256 * 1024).contains(&ram_kib),
        "the guest has {ram_kib} KiB of RAM, not the 256 MiB configured:\n{console}"
    );
    assert!(run.status.success(), "mote ended with {}", run.status);
    let logged = std::fs::read_to_string(&log).expect("reading the log file");
    assert!(
        logged.contains("DEBUG") || logged.contains(":DEBUG:"),
        "the logger PUT at level Debug wrote no debug line:\n{logged}"
    );
}
