//! mote-jailer: a jailed monitor runs with the uid, gid, root, cgroup, limits and network
//! namespace it was given, serves its API inside the jail and boots a guest there; bad input
//! leaves nothing behind; a jailed monitor restores a snapshot through a page-fault handler
//! (the Uffd backend) with the jail's /dev/userfaultfd. Needs root (it skips, saying so,
//! without).

mod common;
#[path = "common/uffd_handler.rs"]
mod uffd_handler;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::api::request;
use common::{probe_kernel, require_kvm};

const JAIL_UID: u32 = 12345;
const JAIL_GID: u32 = 12346;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn jailer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mote-jailer"))
}

/// A statically linked mote (a jail holds no libraries): the tests' own where they are built for
/// musl (as tools/test does), otherwise one linked statically against glibc, built on first use
/// into target/static with the filters and code of this tree.
fn static_mote() -> PathBuf {
    if cfg!(target_env = "musl") {
        return PathBuf::from(env!("CARGO_BIN_EXE_mote"));
    }
    static MOTE: OnceLock<PathBuf> = OnceLock::new();
    MOTE.get_or_init(|| {
        let target_dir = repo().join("target/static");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let output = Command::new(cargo)
            .current_dir(repo())
            .args([
                "build",
                "--quiet",
                "--bin",
                "mote",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .output()
            .expect("cannot run cargo to build a static mote");
        assert!(
            output.status.success(),
            "building a static mote failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        target_dir.join("x86_64-unknown-linux-gnu/debug/mote")
    })
    .clone()
}

fn require_root() -> bool {
    // SAFETY: geteuid only reads the caller's credentials.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    println!("SKIPPED: {test} needs root (the jailer makes nodes, namespaces and cgroups)");
    false
}

/// A fresh directory for one test's jails.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("jailer")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The cgroup2 mount, when there is one this process can make cgroups in.
fn cgroup2_mount() -> Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mount = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| PathBuf::from(f[1]))
        .ok_or("no cgroup2 file system is mounted")?;
    let probe = mount.join(format!("mote-jailer-probe-{}", std::process::id()));
    std::fs::create_dir(&probe)
        .map_err(|err| format!("cannot make a cgroup in {}: {err}", mount.display()))?;
    let _ = std::fs::remove_dir(&probe);
    Ok(mount)
}

fn controllers(mount: &Path) -> Vec<String> {
    std::fs::read_to_string(mount.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A network namespace made for the test, deleted when dropped.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .expect("cannot run ip");
        assert!(
            out.status.success(),
            "ip netns add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        NetNs {
            name: name.to_string(),
        }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The cgroups the jailer made for a test, removed (innermost first) when dropped.
struct CgroupCleanup(Vec<PathBuf>);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        // A cgroup can be removed once empty: mote's exit reaper and KVM's worker threads for
        // the VM leave it a little after mote itself.
        let deadline = Instant::now() + Duration::from_secs(10);
        for dir in &self.0 {
            while dir.exists() && std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Kills the jailed monitor (by pid) if the test ends early.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill only sends a signal; once the monitor was reaped it fails harmlessly.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
    }
}

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            panic!(
                "the jailer ended with {status} before {} appeared:\n{stderr}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {} after 20 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn limit(pid: u32, name: &str) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
    line[name.len()..]
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_jailed_monitor_runs_as_the_jail_says_and_boots_a_guest() {
    if !require_root() || !require_kvm() {
        return;
    }
    let base = scratch("running");
    let id = "jail-run-1";
    let netns = NetNs::new(&format!("mote-jail-{}", std::process::id()));
    let parent_cgroup = format!("mote-jailer-test-{}", std::process::id());
    let mut args: Vec<String> = vec![
        "--id".into(),
        id.into(),
        "--exec-file".into(),
        static_mote().display().to_string(),
        "--uid".into(),
        JAIL_UID.to_string(),
        "--gid".into(),
        JAIL_GID.to_string(),
        "--chroot-base-dir".into(),
        base.display().to_string(),
        "--netns".into(),
        netns.path().display().to_string(),
        "--resource-limit".into(),
        "no-file=128".into(),
        "--resource-limit".into(),
        "fsize=1073741824".into(),
    ];
    let mut expected_cgroup_files = Vec::new();
    let mut cleanup = CgroupCleanup(Vec::new());
    let cgroup_mount = match cgroup2_mount() {
        Ok(mount) => {
            args.extend(["--cgroup-version".into(), "2".into()]);
            args.extend(["--parent-cgroup".into(), parent_cgroup.clone()]);
            expected_cgroup_files.push(("cgroup.max.descendants", "3"));
            let available = controllers(&mount);
            for (controller, file, value) in [
                ("pids", "pids.max", "64"),
                ("memory", "memory.max", "536870912"),
                ("hugetlb", "hugetlb.2MB.max", "0"),
            ] {
                if available.iter().any(|c| c == controller) {
                    expected_cgroup_files.push((file, value));
                } else {
                    println!(
                        "SKIPPED part: no {controller} controller in the cgroup2 hierarchy here \
                         (it has: {available:?}), so no {file}"
                    );
                }
            }
            for (file, value) in &expected_cgroup_files {
                args.extend(["--cgroup".into(), format!("{file}={value}")]);
            }
            cleanup.0 = vec![
                mount.join(&parent_cgroup).join(id),
                mount.join(&parent_cgroup),
            ];
            Some(mount)
        }
        Err(reason) => {
            println!("SKIPPED part: the cgroup checks: {reason}");
            None
        }
    };
    args.extend(["--".into(), "--api-sock".into(), "/api.sock".into()]);

    // A descriptor the jailer inherits without close-on-exec: it must not reach mote.
    let leak = base.join("leaked-descriptor");
    std::fs::write(&leak, "secret").unwrap();
    let leaked = std::fs::File::open(&leak).unwrap();
    let leaked_fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    let mut command = Command::new(jailer_bin());
    command
        .args(&args)
        .env("MOTE_JAILER_TEST_SECRET", "must not reach the monitor")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls dup2, which is async-signal-safe, on a descriptor that
    // stays open in the parent until spawn returns.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(leaked_fd, 50) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("cannot start mote-jailer");
    let pid = child.id();
    // Declared after the cgroup cleanup, so dropped before it: a failing check kills mote
    // before its cgroup is removed.
    let _kill_on_failure = KillOnDrop(pid);
    let root = base.join("mote").join(id).join("root");
    let socket = root.join("api.sock");
    wait_for(&socket, &mut child);

    // Told its start as Firecracker's jailer tells it, before the arguments after `--`.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let flags: Vec<&str> = argv[1..].iter().step_by(2).map(String::as_str).collect();
    assert_eq!(
        flags[..5],
        [
            "--id",
            "--start-time-us",
            "--start-time-cpu-us",
            "--parent-cpu-time-us",
            "--api-sock"
        ],
        "{argv:?}"
    );
    for value in [&argv[4], &argv[6], &argv[8]] {
        assert!(value.parse::<u64>().is_ok(), "{argv:?}");
    }
    assert_eq!(argv[2], id);

    assert_eq!(
        status_field(pid, "Uid:"),
        format!("{JAIL_UID} {JAIL_UID} {JAIL_UID} {JAIL_UID}")
    );
    assert_eq!(
        status_field(pid, "Gid:"),
        format!("{JAIL_GID} {JAIL_GID} {JAIL_GID} {JAIL_GID}")
    );
    assert_eq!(status_field(pid, "Groups:"), "");
    let its_root = std::fs::metadata(format!("/proc/{pid}/root")).unwrap();
    let jail_root = std::fs::metadata(&root).unwrap();
    assert_eq!(
        (its_root.dev(), its_root.ino()),
        (jail_root.dev(), jail_root.ino())
    );
    for node in ["dev/kvm", "dev/net/tun", "dev/urandom"] {
        let meta = std::fs::metadata(root.join(node)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (JAIL_UID, JAIL_GID, 0o600),
            "{node}"
        );
    }
    let its_netns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino();
    assert_eq!(its_netns, std::fs::metadata(netns.path()).unwrap().ino());
    assert_eq!(limit(pid, "Max open files"), "128 128");
    assert_eq!(limit(pid, "Max file size"), "1073741824 1073741824");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&environ)
    );
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
        assert!(
            !target.ends_with("leaked-descriptor"),
            "an inherited descriptor reached mote"
        );
    }
    if let Some(mount) = &cgroup_mount {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            cgroup
                .lines()
                .any(|l| l == format!("0::/{parent_cgroup}/{id}")),
            "{cgroup}"
        );
        for (file, value) in &expected_cgroup_files {
            let path = mount.join(&parent_cgroup).join(id).join(file);
            assert_eq!(
                std::fs::read_to_string(&path).unwrap().trim(),
                *value,
                "{file}"
            );
        }
    }

    // Its API, inside the jail, and a guest booted from a kernel in the jail.
    let answer = request(&socket, "GET", "/", "");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["id"], id);
    // Serving, so past start-up: under its seccomp filters in the jail too. (`GET /` is the
    // API thread's own answer before the start; `GET /machine-config` is the main thread's,
    // whose filter `/proc/PID/status` shows, so it is past its filter once that is answered.)
    let answer = request(&socket, "GET", "/machine-config", "");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(status_field(pid, "Seccomp:"), "2");
    std::fs::copy(probe_kernel(), root.join("probe")).unwrap();
    let ok = |method: &str, path: &str, body: &str| {
        let answer = request(&socket, method, path, body);
        assert_eq!(answer.status, 204, "{method} {path}: {answer:?}");
    };
    ok(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/probe", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=hello"}"#,
    );
    ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
    );
    ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let output = wait_with_timeout(child, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("probe: hello"),
        "{:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    drop(cleanup);
    let _ = std::fs::remove_dir_all(&base);
}

fn wait_with_timeout(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

/// Runs the jailer to its end (it must fail) and returns its stderr.
fn jailer_fails(args: &[&str]) -> String {
    let output = Command::new(jailer_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot start mote-jailer");
    assert!(!output.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    walk(dir, &mut Vec::new())
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Vec<PathBuf> {
    if let Ok(read) = std::fs::read_dir(dir) {
        for entry in read {
            let path = entry.unwrap().path();
            found.push(path.clone());
            if path.is_dir() {
                walk(&path, found);
            }
        }
    }
    found.clone()
}

#[test]
fn bad_input_is_refused_and_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let dir = scratch("bad-input");
    let base = dir.join("base");
    let base_arg = base.display().to_string();
    let mote = static_mote();
    let mote_arg = mote.display().to_string();
    let with = |id: &str, exec: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "--id",
            id,
            "--exec-file",
            exec,
            "--uid",
            "12345",
            "--gid",
            "12345",
            "--chroot-base-dir",
            &base_arg,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let fails = |args: Vec<String>, expect: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let stderr = jailer_fails(&args);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!base.exists(), "{args:?} left {:?}", entries(&base));
    };
    fails(
        with("bad_id!", &mote_arg, &[]),
        "'_' at position 3; an id is 1 to 64 characters, each a letter, a digit or '-'",
    );
    fails(with(&"x".repeat(65), &mote_arg, &[]), "1 to 64 characters");
    fails(
        with("ok", "/nonexistent/mote", &[]),
        "the exec file /nonexistent/mote cannot be used",
    );
    // A dynamically linked binary could not start in the jail: refused before anything is made.
    // Debian's coreutils are dynamically linked (mote itself may not be: see static_mote).
    fails(with("ok", "/bin/true", &[]), "dynamically linked");
    fails(
        with("ok", &mote_arg, &["--cgroup-version", "1"]),
        "cgroup v1 is not supported",
    );
    fails(
        with("ok", &mote_arg, &["--cgroup", "nosuch.max=1"]),
        "no `nosuch` controller",
    );
    match cgroup2_mount() {
        Ok(mount) => {
            // A file the cgroup does not have: the cgroup is made, the write fails, and both
            // the jail and the cgroups it made go.
            let parent = format!("mote-jailer-bad-{}", std::process::id());
            fails(
                with(
                    "ok",
                    &mote_arg,
                    &["--parent-cgroup", &parent, "--cgroup", "cgroup.nosuch=1"],
                ),
                "cannot write \"1\" to",
            );
            assert!(
                !mount.join(&parent).exists(),
                "the cgroup {parent} was left behind"
            );
        }
        Err(reason) => println!("SKIPPED part: the unwritable cgroup case: {reason}"),
    }
    // A jail a monitor was started in is refused, left as it was, and nothing is added to it.
    let used = base.join("mote").join("taken").join("root");
    std::fs::create_dir_all(used.join("dev")).unwrap();
    std::fs::write(used.join("dev/kvm"), "").unwrap();
    let before = entries(&base);
    let stderr = jailer_fails(
        &with("taken", &mote_arg, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        stderr.contains("was used already: it holds dev/kvm"),
        "{stderr}"
    );
    assert_eq!(entries(&base), before);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_daemonized_monitor_in_a_new_pid_namespace_leaves_a_pid_file() {
    if !require_root() || !require_kvm() {
        return;
    }
    let base = scratch("daemon");
    let id = "jail-daemon-1";
    let output = Command::new(jailer_bin())
        .args(["--id", id, "--exec-file", static_mote().to_str().unwrap()])
        .args([
            "--uid",
            &JAIL_UID.to_string(),
            "--gid",
            &JAIL_GID.to_string(),
        ])
        .args([
            "--chroot-base-dir",
            base.to_str().unwrap(),
            "--daemonize",
            "--new-pid-ns",
        ])
        .args(["--", "--api-sock", "/api.sock"])
        .stdin(Stdio::null())
        .output()
        .expect("cannot start mote-jailer");
    let root = base.join("mote").join(id).join("root");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pid: u32 = std::fs::read_to_string(root.join("mote.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    common::api::wait_for_socket(&root.join("api.sock"), Duration::from_secs(20), || {
        "in the jail".to_string()
    });
    // Pid 1 of its own namespace, in a session of its own, as the jail's uid.
    let nspid = status_field(pid, "NSpid:");
    let kill = || common::send_signal(pid, libc::SIGKILL);
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "NSpid: {nspid}");
    assert_eq!(
        status_field(pid, "Uid:").split_whitespace().next(),
        Some("12345")
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let session: u32 = stat
        .rsplit(") ")
        .next()
        .unwrap()
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap(),
        Path::new("/dev/null")
    );
    let answer = request(&root.join("api.sock"), "GET", "/", "");
    kill();
    assert_eq!(session, pid, "not a session leader");
    assert_eq!(answer.status, 200, "{answer:?}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn exec_files_that_cannot_run_bad_uids_and_linked_bases_leave_nothing_behind() {
    if !require_root() {
        return;
    }
    let dir = scratch("cannot-run");
    let base = dir.join("base");
    let base_arg = base.display().to_string();
    let mote = static_mote();
    let not_executable = dir.join("mote-noexec");
    std::fs::copy(&mote, &not_executable).unwrap();
    std::fs::set_permissions(
        &not_executable,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let args = |exec: &Path, uid: &str, base: &str| -> Vec<String> {
        [
            "--id",
            "vm",
            "--exec-file",
            exec.to_str().unwrap(),
            "--uid",
            uid,
            "--gid",
            "12345",
            "--chroot-base-dir",
            base,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let fails = |args: Vec<String>, expect: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let stderr = jailer_fails(&args);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!base.exists(), "{args:?} left {:?}", entries(&base));
    };
    fails(
        args(&not_executable, "12345", &base_arg),
        "is not executable",
    );
    fails(args(&mote, "4294967295", &base_arg), "uid 4294967295");
    fails(args(&mote, "0", &base_arg), "--allow-root-uid");
    let mut gid = args(&mote, "12345", &base_arg);
    gid[7] = "4294967295".into();
    fails(gid, "gid 4294967295");
    // A named pipe as the network namespace neither hangs the jailer nor leaves a jail.
    let fifo = dir.join("netns-fifo");
    let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path, which lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let mut netns = args(&mote, "12345", &base_arg);
    netns.extend(["--netns".to_string(), fifo.display().to_string()]);
    fails(netns, "join the network namespace");
    // A base that is a symbolic link is named as one.
    let real_base = dir.join("real-base");
    std::fs::create_dir(&real_base).unwrap();
    let linked_base = dir.join("linked-base");
    std::os::unix::fs::symlink(&real_base, &linked_base).unwrap();
    let stderr = jailer_fails(
        &args(&mote, "12345", linked_base.to_str().unwrap())
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(stderr.contains("is a symbolic link"), "{stderr}");
    assert!(entries(&real_base).is_empty(), "{:?}", entries(&real_base));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_symlinked_exec_file_runs_in_the_jail() {
    if !require_root() {
        return;
    }
    let dir = scratch("symlinked-exec");
    let base = dir.join("base");
    let link = dir.join("mote");
    std::os::unix::fs::symlink(static_mote(), &link).unwrap();
    let output = Command::new(jailer_bin())
        .args(["--id", "vm", "--exec-file"])
        .arg(&link)
        .args(["--uid", "12345", "--gid", "12345", "--chroot-base-dir"])
        .arg(&base)
        .args(["--", "--version"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("mote"),
        "{stderr}"
    );
    let installed = base.join("mote/vm/root/mote");
    assert!(
        installed.symlink_metadata().unwrap().file_type().is_file(),
        "the jail holds a link, not the binary"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ip -n NS ARGS`, which must succeed.
fn ip_in(netns: &NetNs, args: &[&str]) {
    let out = Command::new("ip")
        .args(["-n", &netns.name])
        .args(args)
        .output()
        .expect("cannot run ip");
    assert!(
        out.status.success(),
        "ip -n {} {args:?}: {}",
        netns.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_jailed_monitor_attaches_a_tap_and_its_guest_answers_pings() {
    if !require_root() || !require_kvm() {
        return;
    }
    let base = scratch("network");
    let id = "jail-net-1";
    // The TAP, the monitor and the pings all stay in this namespace; deleting it deletes the TAP.
    let netns = NetNs::new(&format!("mote-jail-net-{}", std::process::id()));
    ip_in(&netns, &["link", "set", "lo", "up"]);
    // The jailed monitor has no CAP_NET_ADMIN: the TAP must be its uid's to attach.
    let uid = JAIL_UID.to_string();
    ip_in(
        &netns,
        &["tuntap", "add", "dev", "tap0", "mode", "tap", "user", &uid],
    );
    ip_in(&netns, &["addr", "add", "10.0.0.1/24", "dev", "tap0"]);
    ip_in(&netns, &["link", "set", "tap0", "up"]);
    let mut child = Command::new(jailer_bin())
        .args(["--id", id, "--exec-file", static_mote().to_str().unwrap()])
        .args(["--uid", &uid, "--gid", &JAIL_GID.to_string()])
        .args(["--chroot-base-dir", base.to_str().unwrap()])
        .args(["--netns", netns.path().to_str().unwrap()])
        .args(["--", "--api-sock", "/api.sock"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start mote-jailer");
    let _kill_on_failure = KillOnDrop(child.id());
    let root = base.join("mote").join(id).join("root");
    let socket = root.join("api.sock");
    wait_for(&socket, &mut child);
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            all.push_str(&line);
            all.push('\n');
            let _ = lines_tx.send(line);
        }
        all
    });
    std::fs::copy(probe_kernel(), root.join("probe")).unwrap();
    let ok = |method: &str, path: &str, body: &str| {
        let answer = request(&socket, method, path, body);
        assert_eq!(answer.status, 204, "{method} {path}: {answer:?}");
    };
    ok(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/probe", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=net-init,net-serve:10.0.0.2:3:30"}"#,
    );
    ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
    );
    ok(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:0a:00:00:02"}"#,
    );
    ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("net-serve ready") => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let output = child.wait_with_output().unwrap();
                panic!(
                    "no net-serve ready from the jailed guest:\n{}\nstderr:\n{}",
                    reader.join().unwrap(),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
    let ping = Command::new("ip")
        .args(["netns", "exec", &netns.name])
        .args(["ping", "-c", "3", "-W", "1", "-i", "0.2", "10.0.0.2"])
        .output()
        .expect("cannot run ping");
    let ping_out = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && ping_out.contains("3 received"),
        "ping failed:\n{ping_out}"
    );
    let output = wait_with_timeout(child, Duration::from_secs(40));
    let stdout = reader.join().unwrap();
    assert!(
        output.status.success() && stdout.contains("net-serve answered=3"),
        "{:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn a_jail_made_beforehand_is_used_as_firecrackers_jailer_does_and_a_used_one_is_refused() {
    if !require_root() || !require_kvm() {
        return;
    }
    let dir = scratch("made-beforehand");
    let base = dir.join("base");
    let id = "jail-pre-1";
    let root = base.join("mote").join(id).join("root");
    // As Firecracker's test framework does: the jail first, with the kernel and the
    // configuration in it (and here an older binary, which the jailer replaces).
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(probe_kernel(), root.join("probe")).unwrap();
    let config = r#"{"boot-source": {"kernel_image_path": "/probe", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=hello"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 32}}"#;
    std::fs::write(root.join("config.json"), config).unwrap();
    std::fs::write(root.join("mote"), "an older binary").unwrap();
    let jailer = |id: &str| {
        let mut command = Command::new(jailer_bin());
        command
            .args(["--id", id, "--exec-file", static_mote().to_str().unwrap()])
            .args([
                "--uid",
                &JAIL_UID.to_string(),
                "--gid",
                &JAIL_GID.to_string(),
            ])
            .args(["--chroot-base-dir", base.to_str().unwrap()])
            .args(["--", "--no-api", "--config-file", "/config.json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };
    let child = jailer(id).spawn().expect("cannot start mote-jailer");
    let _kill_on_failure = KillOnDrop(child.id());
    let output = wait_with_timeout(child, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("probe: hello"),
        "{:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        std::fs::metadata(root.join("mote")).unwrap().len(),
        std::fs::metadata(static_mote()).unwrap().len(),
        "the older binary was not replaced"
    );
    assert!(root.join("probe").exists() && root.join("config.json").exists());

    // The jail the monitor ran in holds its device nodes: a second start there is refused and
    // changes nothing.
    let before = entries(&base);
    let output = jailer(id).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("was used already: it holds dev/"),
        "{stderr}"
    );
    assert_eq!(entries(&base), before);

    // A directory of the jail that is a link would put the device nodes outside it.
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let linked_root = base.join("mote").join("jail-pre-2").join("root");
    std::fs::create_dir_all(&linked_root).unwrap();
    std::os::unix::fs::symlink(&outside, linked_root.join("dev")).unwrap();
    let before = entries(&base);
    let output = jailer("jail-pre-2").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not a directory"), "{stderr}");
    assert_eq!(entries(&base), before);
    assert!(entries(&outside).is_empty(), "{:?}", entries(&outside));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A jailed monitor (another uid, no capability) restores a snapshot through a page-fault
/// handler whose socket is in the jail: it makes its userfaultfd through the jail's
/// /dev/userfaultfd, which the jailer copied from the host.
#[test]
fn a_jailed_monitor_restores_through_a_page_fault_handler() {
    if !require_root() || !require_kvm() {
        return;
    }
    if !Path::new("/dev/userfaultfd").exists() {
        println!("SKIPPED: this host has no /dev/userfaultfd (Linux 6.1 on)");
        return;
    }
    // The snapshot, by a monitor outside the jail: a probe waiting for a key, then greeting.
    let source = common::api::ApiMote::spawn("jail-uffd-source", &[]);
    let boot_source = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=poke:32768:4:9,kbd:8,peek:32768:4:9,hello,spin",
    });
    source.ok("PUT", "/boot-source", &boot_source.to_string());
    source.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
    );
    source.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    source.wait_for_stdout("probe: kbd: waiting", Duration::from_secs(20));
    let (state, mem) = source.pause_and_snapshot();
    drop(source);

    let base = scratch("uffd");
    let id = "jail-uffd-1";
    let root = base.join("mote").join(id).join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(&state, root.join("state")).unwrap();
    let handler_socket = root.join("handler.sock");
    let (control, _handler) = uffd_handler::spawn(&handler_socket, &mem);
    // The jailed uid connects to it.
    std::os::unix::fs::chown(&handler_socket, Some(JAIL_UID), Some(JAIL_GID)).unwrap();
    let mut child = Command::new(jailer_bin())
        .args(["--id", id, "--exec-file", static_mote().to_str().unwrap()])
        .args([
            "--uid",
            &JAIL_UID.to_string(),
            "--gid",
            &JAIL_GID.to_string(),
        ])
        .args(["--chroot-base-dir", base.to_str().unwrap()])
        .args(["--", "--api-sock", "/api.sock"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start mote-jailer");
    let _kill_on_failure = KillOnDrop(child.id());
    let api = root.join("api.sock");
    wait_for(&api, &mut child);
    let load = serde_json::json!({
        "snapshot_path": "/state",
        "mem_backend": {"backend_type": "Uffd", "backend_path": "/handler.sock"},
        "resume_vm": true,
    });
    let answer = request(&api, "PUT", "/snapshot/load", &load.to_string());
    assert_eq!(answer.status, 204, "{answer:?}");
    let answer = request(
        &api,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(answer.status, 204, "{answer:?}");
    let mut stdout = child.stdout.take().unwrap();
    let out = common::read_until(&mut stdout, "probe: hello", 1, Duration::from_secs(20));
    assert!(out.contains("peek at=0x2000000 pages=4 match=yes"), "{out}");
    assert!(control.faults.load(std::sync::atomic::Ordering::SeqCst) > 0);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&base);
}
