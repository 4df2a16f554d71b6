//! Bad input never panics: every case gets one clear line naming the input, and exit status 1.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{mote, mote_bin, probe_kernel, require_kvm};

/// A scratch directory for this test, readable by everyone (some cases run as `nobody`).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("bad_input")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Checks the one-line error and the status, and returns the line.
fn assert_clean_failure(output: &Output, expected: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("mote: ")).collect();
    assert_eq!(lines.len(), 1, "want one error line: {stderr}");
    assert!(
        lines[0].contains(expected),
        "want {expected:?} in {:?}",
        lines[0]
    );
    lines[0].to_string()
}

fn run_kernel(kernel: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["run", "--kernel", kernel.to_str().unwrap()];
    args.extend_from_slice(extra);
    mote(&args)
}

#[test]
fn missing_kernel() {
    let output = run_kernel(Path::new("/nonexistent/vmlinux"), &[]);
    assert_clean_failure(
        &output,
        "cannot open kernel image /nonexistent/vmlinux: No such file or directory",
    );
}

#[test]
fn directory_as_kernel() {
    let dir = scratch("directory");
    let output = run_kernel(&dir, &[]);
    assert_clean_failure(
        &output,
        &format!("kernel image {} is not a regular file", dir.display()),
    );
}

#[test]
fn unreadable_kernel() {
    let dir = scratch("unreadable");
    let kernel = dir.join("vmlinux");
    fs::write(&kernel, b"\x7fELF").unwrap();
    fs::set_permissions(&kernel, fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads anything: drop to nobody for this one.
    let output = Command::new(mote_bin())
        .args(["run", "--kernel", kernel.to_str().unwrap()])
        .stdin(Stdio::null())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_clean_failure(
        &output,
        &format!(
            "cannot open kernel image {}: Permission denied",
            kernel.display()
        ),
    );
}

#[test]
fn empty_kernel() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("empty");
    let kernel = dir.join("vmlinux");
    fs::write(&kernel, b"").unwrap();
    let output = run_kernel(&kernel, &[]);
    assert_clean_failure(&output, "cannot read the kernel image header");
}

#[test]
fn truncated_kernel() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("truncated");
    let kernel = dir.join("vmlinux");
    let image = fs::read(probe_kernel()).unwrap();
    fs::write(&kernel, &image[..100]).unwrap();
    let output = run_kernel(&kernel, &[]);
    let line = assert_clean_failure(
        &output,
        &format!("cannot load kernel image {}", kernel.display()),
    );
    assert!(line.contains("not an ELF vmlinux"), "{line}");
}

#[test]
fn not_a_kernel() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("text");
    let kernel = dir.join("notes.txt");
    fs::write(&kernel, "this is not a kernel\n".repeat(100)).unwrap();
    let output = run_kernel(&kernel, &[]);
    assert_clean_failure(&output, "not an ELF vmlinux nor a bzImage");
}

#[test]
fn initrd_that_does_not_fit() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("initrd");
    let initrd = dir.join("initrd");
    // Sparse: 100 MiB of nothing, for a 64 MiB guest.
    fs::File::create(&initrd)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let output = run_kernel(
        &probe_kernel(),
        &["--memory", "64", "--initrd", initrd.to_str().unwrap()],
    );
    let line = assert_clean_failure(&output, &format!("cannot load initrd {}", initrd.display()));
    assert!(line.contains("does not fit"), "{line}");
}

#[test]
fn missing_initrd() {
    let output = run_kernel(&probe_kernel(), &["--initrd", "/nonexistent/initrd"]);
    assert_clean_failure(&output, "cannot open initrd /nonexistent/initrd");
}

#[test]
fn zero_memory() {
    let output = run_kernel(&probe_kernel(), &["--memory", "0"]);
    assert_clean_failure(&output, "mem_size_mib 0 is out of range");
}

#[test]
fn more_memory_than_the_host_has() {
    let output = run_kernel(&probe_kernel(), &["--memory", "10000000"]);
    assert_clean_failure(
        &output,
        "guest memory of 10000000 MiB is more than this host's",
    );
    // Beyond what any guest can address: refused by the configuration check, before the host's.
    let output = run_kernel(&probe_kernel(), &["--memory", "100000000"]);
    assert_clean_failure(&output, "mem_size_mib 100000000 is out of range");
}

#[test]
fn vcpu_count_out_of_range() {
    for count in ["0", "33", "4096"] {
        let output = run_kernel(&probe_kernel(), &["--vcpus", count]);
        assert_clean_failure(&output, &format!("vcpu_count {count} is out of range"));
    }
}

#[test]
fn command_line_too_long() {
    let args = "a".repeat(2100);
    let output = run_kernel(&probe_kernel(), &["--cmdline", &args]);
    assert_clean_failure(
        &output,
        "the kernel command line is 2100 bytes, more than the 2047 the guest accepts",
    );
}

#[test]
fn no_permission_on_dev_kvm() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("kvm_permission");
    let kernel = dir.join("probe");
    fs::copy(probe_kernel(), &kernel).unwrap();
    fs::set_permissions(&kernel, fs::Permissions::from_mode(0o644)).unwrap();
    let output = Command::new(mote_bin())
        .args(["run", "--kernel", kernel.to_str().unwrap()])
        .stdin(Stdio::null())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_clean_failure(&output, "cannot open /dev/kvm: Permission denied");
}

#[test]
fn no_dev_kvm_at_all() {
    // A private mount namespace with an empty /dev hides /dev/kvm from the monitor only.
    let probe = probe_kernel();
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {}",
        mote_bin().display(),
        probe.display()
    );
    let output = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("unshare failed") || stderr.contains("mount:") {
        println!("SKIPPED: no_dev_kvm_at_all needs mount namespaces: {stderr}");
        eprintln!("SKIPPED: no_dev_kvm_at_all needs mount namespaces: {stderr}");
        return;
    }
    assert_clean_failure(&output, "cannot open /dev/kvm: No such file or directory");
}

/// Runs `mote ARGS` and kills it after `timeout`: a monitor that took bad input for good
/// would otherwise serve forever.
fn mote_within(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(mote_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() && started.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// A `sockaddr_un` holds 107 bytes of path: a longer `--api-sock` could be bound under a
/// shorter name and linked, and then nobody could connect to it.
#[test]
fn api_socket_path_longer_than_a_socket_address_holds() {
    let dir = scratch("long-api-sock");
    let long = dir.join("s".repeat(110));
    let long = long.to_str().unwrap();
    let expected = format!("the API socket path {long} is {} bytes", long.len());
    for args in [
        vec!["--api-sock", long],
        vec![
            "run",
            "--restore",
            "/nonexistent/state",
            "--mem-file",
            "/nonexistent/mem",
            "--api-sock",
            long,
        ],
    ] {
        let output = mote_within(&args, Duration::from_secs(10));
        let line = assert_clean_failure(&output, &expected);
        assert!(line.contains("at most 107"), "{line}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "a file was left");
    }
}

#[test]
fn too_little_memory_for_the_kernel() {
    if !require_kvm() {
        return;
    }
    for mib in ["1", "2"] {
        let output = run_kernel(&probe_kernel(), &["--memory", mib]);
        let line = assert_clean_failure(&output, &format!("the guest's {mib} MiB of memory"));
        assert!(!line.contains("Unable to read"), "{line}");
    }
}

#[test]
fn a_32_bit_elf_kernel_is_refused() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("elf32");
    let kernel = dir.join("vmlinux");
    let mut image = fs::read(probe_kernel()).unwrap();
    // EI_CLASS: 1 is ELFCLASS32.
    image[4] = 1;
    fs::write(&kernel, image).unwrap();
    let output = run_kernel(&kernel, &[]);
    assert_clean_failure(&output, "32-bit ELF kernels are not supported");
}

/// Makes a named pipe at `path`.
fn mkfifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path, which lives across the call.
    let ret = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
    assert_eq!(ret, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

/// Runs mote with a time limit (a blocking open would hang it) and checks its one error line.
/// Firecracker's exit status for a config file it cannot use.
const BAD_CONFIGURATION: i32 = 152;

/// Checks that mote ends at once with `status` and one `mote:` line containing `expected`.
fn fails_at_once_with(status: i32, args: &[&str], expected: &str) {
    let run = common::run_mote(args, None, std::time::Duration::from_secs(5));
    assert_eq!(run.status.code(), Some(status), "{args:?}: {}", run.stderr);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("mote: "))
        .collect();
    assert_eq!(lines.len(), 1, "{args:?}: {}", run.stderr);
    assert!(
        lines[0].contains(expected),
        "{args:?}: want {expected:?} in {:?}",
        lines[0]
    );
}

#[test]
fn pipes_and_endless_devices_are_refused_at_once() {
    let dir = scratch("fifo");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap();
    let probe = probe_kernel();
    let probe = probe.to_str().unwrap();
    fails_at_once_with(
        1,
        &["run", "--kernel", fifo],
        &format!("kernel image {fifo} is not a regular file (a named pipe)"),
    );
    fails_at_once_with(
        1,
        &["run", "--kernel", probe, "--initrd", fifo],
        &format!("initrd {fifo} is not a regular file (a named pipe)"),
    );
    fails_at_once_with(
        BAD_CONFIGURATION,
        &["--no-api", "--config-file", fifo],
        &format!("config file {fifo} is not a regular file (a named pipe)"),
    );
    fails_at_once_with(
        BAD_CONFIGURATION,
        &["--no-api", "--config-file", "/dev/zero"],
        "config file /dev/zero is not a regular file (a character device)",
    );
    fails_at_once_with(
        1,
        &["run", "--restore", "/dev/zero", "--mem-file", "/dev/zero"],
        "/dev/zero is not a regular file (a character device)",
    );
    fails_at_once_with(
        1,
        &["--seccomp-filter", fifo, "run", "--kernel", probe],
        &format!("the seccomp filter file {fifo} is not a regular file (a named pipe)"),
    );
}

#[test]
fn an_oversized_config_file_is_refused() {
    let dir = scratch("big_config");
    let config = dir.join("config.json");
    // Sparse: the size alone says it is no configuration.
    fs::File::create(&config).unwrap().set_len(1 << 30).unwrap();
    fails_at_once_with(
        BAD_CONFIGURATION,
        &["--no-api", "--config-file", config.to_str().unwrap()],
        "is larger than the",
    );
}

#[test]
fn a_config_file_with_one_drive_id_twice_is_refused() {
    let dir = scratch("twice");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    fs::write(&a, vec![0u8; 4096]).unwrap();
    fs::write(&b, vec![0u8; 4096]).unwrap();
    let config = dir.join("config.json");
    let drive = |path: &Path| serde_json::json!({"drive_id": "data", "path_on_host": path, "is_root_device": false});
    let body = serde_json::json!({
        "boot-source": {"kernel_image_path": probe_kernel(),
                        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=hello"},
        "drives": [drive(&a), drive(&b)],
    });
    fs::write(&config, body.to_string()).unwrap();
    fails_at_once_with(
        BAD_CONFIGURATION,
        &["--no-api", "--config-file", config.to_str().unwrap()],
        "drive_id \"data\" is given twice",
    );
}

#[test]
fn a_pipe_as_kernel_or_initrd_through_the_api_is_refused_and_the_api_goes_on() {
    let dir = scratch("api_fifo");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let mote = common::api::ApiMote::spawn("bad-input-fifo", &[]);
    let sources = [
        serde_json::json!({"kernel_image_path": fifo}),
        serde_json::json!({"kernel_image_path": probe_kernel(), "initrd_path": fifo}),
    ];
    for (source, what) in sources.iter().zip(["kernel image", "initrd"]) {
        // Refused when the request arrives, as Firecracker opens the files then.
        let answer = mote.request("PUT", "/boot-source", &source.to_string());
        let expected = format!(
            "{what} {} is not a regular file (a named pipe)",
            fifo.display()
        );
        assert!(answer.fault().contains(&expected), "{answer:?}");
        assert_eq!(mote.request("GET", "/", "").json()["state"], "Not started");
    }
    // The monitor still answers its stop signals.
    common::send_signal(mote.pid(), libc::SIGTERM);
    let run = mote.wait(std::time::Duration::from_secs(5));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&run.status)
            .or(run.status.code().map(|c| c - 128)),
        Some(libc::SIGTERM),
        "{}",
        run.stderr
    );
}
