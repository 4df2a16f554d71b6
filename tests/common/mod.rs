//! Shared by the integration tests: build the probe guest, run the monitor with a timeout,
//! and skip (loudly) where there is no KVM.

#![allow(dead_code)]

pub mod api;

/// The pattern pages of the lazy-restore tests' probe ([`api::ApiMote::pattern_probe_snapshot`],
/// tests/lazy.rs and tests/uffd.rs): 16 pages, one every 64, from 40 MiB (of 64 MiB of guest
/// memory), written before the snapshot and read back after the restore.
pub mod pattern {
    pub const AT_KIB: u64 = 40 << 10;
    pub const PAGES: u64 = 16;
    pub const STRIDE: u64 = 64;
}

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Environment an outer cargo or nextest sets that would change how the probe is built.
const CARGO_ENV_TO_CLEAR: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_MAKEFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_DIR",
    "CARGO_PKG_NAME",
];

/// The cargo that runs the tests, without the outer build's environment: for the crates the
/// tests build themselves (the probe guest, tests/hosted-tool).
pub fn clean_cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    clear_cargo_env(&mut command);
    command
}

/// Removes from `command` the outer build's environment that would change what a cargo it
/// runs builds (a script that runs cargo, such as tools/build).
pub fn clear_cargo_env(command: &mut Command) -> &mut Command {
    for var in CARGO_ENV_TO_CLEAR {
        command.env_remove(var);
    }
    command
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds a crate of the tests' own (`tests/<name>`) in release mode into `target/<name>`, with
/// `args` added (a target), and returns the target directory. Cargo's lock serialises the
/// parallel test processes that build it at once.
pub fn build_test_crate(name: &str, args: &[&str]) -> PathBuf {
    let target_dir = repo().join("target").join(name);
    let output = clean_cargo()
        .current_dir(repo().join("tests").join(name))
        .args(["build", "--release", "--quiet"])
        .args(args)
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build tests/{name}: {e}"));
    assert!(
        output.status.success(),
        "building tests/{name} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    target_dir
}

/// A resource limit a test sets for the monitor it starts.
#[derive(Clone, Copy)]
pub enum Limit {
    /// RLIMIT_FSIZE: the largest file the process may write, in bytes.
    FileSize,
    /// RLIMIT_NPROC: how many tasks the process's user may have.
    Processes,
}

/// Sets `limit` (soft and hard) to `value` in the child `command` starts, before it execs.
pub fn limit_in_child(command: &mut Command, limit: Limit, value: u64) {
    use std::os::unix::process::CommandExt;
    // The constants' type differs between glibc and musl; match picks each one's own.
    let resource = match limit {
        Limit::FileSize => libc::RLIMIT_FSIZE,
        Limit::Processes => libc::RLIMIT_NPROC,
    };
    // SAFETY: setrlimit is async-signal-safe and touches only the child, between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The probe guest's ELF, built on first use.
pub fn probe_kernel() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE
        .get_or_init(|| build_test_crate("probe", &[]).join("release/probe"))
        .clone()
}

/// The mote binary; `MOTE_TEST_BIN` puts a wrapper in its place (`tools/seccomp-trace` runs
/// the suite with one that records mote's system calls).
pub fn mote_bin() -> PathBuf {
    std::env::var_os("MOTE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mote")))
}

/// True when /dev/kvm can be used; otherwise says why this test is skipped, on both streams.
pub fn require_kvm() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(err) => {
            let test = std::thread::current()
                .name()
                .unwrap_or("this test")
                .to_string();
            println!("SKIPPED: {test} needs /dev/kvm: {err}");
            eprintln!("SKIPPED: {test} needs /dev/kvm: {err}");
            false
        }
    }
}

/// What a monitor run printed and how it ended.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = pipe.read_to_end(&mut out);
        out
    })
}

/// Runs `mote ARGS` with no input to its end, for what should end at once (a refusal).
pub fn mote(args: &[&str]) -> std::process::Output {
    Command::new(mote_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `mote ARGS`, feeding `stdin` (or /dev/null), and kills it after `timeout`.
pub fn run_mote(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Run {
    let started = Instant::now();
    let mut child = Command::new(mote_bin())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start mote");
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mote {args:?} did not end within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout.join().unwrap()),
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Run {
        status,
        stdout: String::from_utf8_lossy(&stdout.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&stderr.join().unwrap()).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// Boots the probe with `probe.run=STEPS` added to the default command line.
pub fn probe_run(steps: &str, extra_args: &[&str]) -> Run {
    let probe = probe_kernel();
    let steps = format!("probe.run={steps}");
    let mut args = vec![
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--append",
        &steps,
    ];
    args.extend_from_slice(extra_args);
    run_mote(&args, None, Duration::from_secs(20))
}

/// Sends `signal` to the child process `pid` that the test spawned.
pub fn send_signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill only sends a signal; the pid is a child this test spawned and still owns.
    let ret = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(ret, 0, "kill: {}", std::io::Error::last_os_error());
}

/// Reads `pipe` (a monitor's console) until what came holds `text` `count` times, and returns
/// it. Fails the test when the pipe closes first, or when `timeout` has passed by the time a
/// read returns.
pub fn read_until(pipe: &mut impl Read, text: &str, count: usize, timeout: Duration) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + timeout;
    while seen.matches(text).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {text:?} within {timeout:?}: {seen}"
        );
        let mut buf = [0u8; 256];
        let n = pipe.read(&mut buf).unwrap();
        assert!(n > 0, "the console closed before {text:?}: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    seen
}
