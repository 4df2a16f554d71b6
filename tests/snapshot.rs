//! Snapshots with the probe guest: a paused guest is saved, its monitor killed, and a fresh
//! monitor goes on exactly where it stopped (the count continues, the TSC never goes back, the
//! disk keeps working, the network interface answers through another TAP, vsock takes new
//! streams after dropping the old ones); clones of one snapshot run side by side; bad snapshots
//! and requests in the wrong state are refused with a reason and harm nothing.

mod common;

#[path = "vsock/host.rs"]
mod host;
#[path = "net/netns.rs"]
mod netns;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api::ApiMote;
use common::{mote_bin, probe_kernel, require_kvm};
use netns::Netns;

const WAIT: Duration = Duration::from_secs(20);
/// `pause`s between two probe lines: tens of milliseconds each, so a test can pause mid-run.
const SPINS: u64 = 3_000_000;

fn boot_source(steps: &str) -> String {
    serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
    })
    .to_string()
}

/// Boots the probe through the API with `steps`, optionally with a drive.
fn boot(name: &str, steps: &str, drive: Option<&Path>) -> ApiMote {
    boot_with_engine(name, steps, drive, "Sync")
}

/// `boot`, the drive served by the I/O engine `engine` (Firecracker's `Sync` or `Async`).
fn boot_with_engine(name: &str, steps: &str, drive: Option<&Path>, engine: &str) -> ApiMote {
    let mote = ApiMote::spawn(name, &[]);
    mote.ok("PUT", "/boot-source", &boot_source(steps));
    if let Some(path) = drive {
        let drive = serde_json::json!({
            "drive_id": "data", "path_on_host": path, "is_root_device": false, "is_read_only": false,
            "io_engine": engine,
        });
        mote.ok("PUT", "/drives/data", &drive.to_string());
    }
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote
}

/// Pauses `mote` once its console shows `after`, snapshots it into its directory, and kills
/// it; returns (state file, memory file, what the console showed).
fn snapshot_and_kill(mote: ApiMote, after: &str) -> (PathBuf, PathBuf, String) {
    mote.wait_for_stdout(after, WAIT);
    let (state, mem) = mote.pause_and_snapshot();
    // Nothing more comes from a paused guest.
    std::thread::sleep(Duration::from_millis(50));
    let out = mote.stdout();
    drop(mote);
    (state, mem, out)
}

fn load_body(state: &Path, mem: &Path, resume: bool) -> String {
    serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": resume,
    })
    .to_string()
}

/// The `probe: NAME=N` numbers in `out`, in order.
fn numbers(out: &str, name: &str) -> Vec<u64> {
    let prefix = format!("probe: {name}=");
    out.lines()
        .filter_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
        .collect()
}

/// `mote run --restore STATE --mem-file MEM [EXTRA...]`, its console collected.
struct Restored {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
}

impl Restored {
    fn spawn(state: &Path, mem: &Path) -> Self {
        Self::spawn_with(state, mem, &[])
    }

    fn spawn_with(state: &Path, mem: &Path, extra: &[&std::ffi::OsStr]) -> Self {
        let mut child = Command::new(mote_bin())
            .arg("run")
            .arg("--restore")
            .arg(state)
            .arg("--mem-file")
            .arg(mem)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start mote");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stdout.take().unwrap();
        let sink = stdout.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Self { child, stdout }
    }

    /// Waits for the monitor to end; its console and whether it succeeded.
    fn wait(mut self) -> (String, bool, String) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the restored guest never ended");
            std::thread::sleep(Duration::from_millis(5));
        };
        std::thread::sleep(Duration::from_millis(20));
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        let out = String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned();
        (out, status.success(), stderr)
    }
}

#[test]
fn a_guest_restored_in_a_fresh_process_counts_on_from_the_next_number() {
    if !require_kvm() {
        return;
    }
    let mote = boot("continue", &format!("count:40:{SPINS}"), None);
    let (state, mem, before) = snapshot_and_kill(mote, "probe: count=3\n");
    let (after, ok, stderr) = Restored::spawn(&state, &mem).wait();
    assert!(ok, "the restored guest failed: {stderr}");
    // A line cut by the pause is finished by the restored guest: join the two consoles.
    let whole = format!("{before}{after}");
    assert_eq!(
        numbers(&whole, "count"),
        (1..=40).collect::<Vec<_>>(),
        "before:\n{before}\nafter:\n{after}"
    );
    assert!(!numbers(&after, "count").is_empty(), "{after}");
    assert!(after.contains("probe: done"), "{after}");
}

#[test]
fn the_guest_clock_does_not_go_backwards_across_a_restore() {
    if !require_kvm() {
        return;
    }
    let mote = boot("tsc", &format!("tsc:30:{SPINS}"), None);
    let (state, mem, before) = snapshot_and_kill(mote, "probe: tsc=");
    let (after, ok, stderr) = Restored::spawn(&state, &mem).wait();
    assert!(ok, "{stderr}");
    let values = numbers(&format!("{before}{after}"), "tsc");
    assert_eq!(values.len(), 30, "before:\n{before}\nafter:\n{after}");
    assert!(
        values.windows(2).all(|pair| pair[0] < pair[1]),
        "the TSC went back: {values:?}"
    );
}

#[test]
fn two_clones_of_one_snapshot_run_at_once_and_leave_it_unchanged() {
    if !require_kvm() {
        return;
    }
    let mote = boot("clones", &format!("count:30:{SPINS}"), None);
    let (state, mem, before) = snapshot_and_kill(mote, "probe: count=2\n");
    let mem_before = fs::read(&mem).unwrap();
    let last = *numbers(&before, "count").last().unwrap();
    let clones: Vec<ApiMote> = (0..2)
        .map(|i| {
            let clone = ApiMote::spawn(&format!("clone{i}"), &[]);
            clone.ok("PUT", "/snapshot/load", &load_body(&state, &mem, true));
            clone
        })
        .collect();
    for clone in &clones {
        let info = clone.request("GET", "/", "");
        assert!(info.body.contains("Running"), "{info:?}");
    }
    for clone in clones {
        let run = clone.wait(WAIT);
        assert!(run.status.success(), "{}", run.stderr);
        let whole = format!("{before}{}", run.stdout);
        assert_eq!(numbers(&whole, "count"), (1..=30).collect::<Vec<_>>());
        assert!(numbers(&run.stdout, "count")[0] <= last + 1);
    }
    assert!(
        fs::read(&mem).unwrap() == mem_before,
        "a clone wrote the memory file"
    );
}

/// The probe's disk test pattern (tests/probe/src/blk.rs).
fn pattern(sector: u64, offset: usize, seed: u64) -> u8 {
    (sector.wrapping_mul(31) ^ (offset as u64).wrapping_mul(7) ^ seed) as u8
}

#[test]
fn the_disk_keeps_working_after_a_restore() {
    if !require_kvm() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("snapshot-disk");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    fs::write(&disk, vec![0u8; 64 * 512]).unwrap();
    let steps = format!(
        "blk-init,blk-write:0:8:7,count:10:{SPINS},blk-read:0:8:7,blk-write:16:8:9,blk-read:16:8:9"
    );
    let mote = boot("disk", &steps, Some(&disk));
    let (state, mem, before) = snapshot_and_kill(mote, "probe: count=2\n");
    assert!(before.contains("blk-write status=0"), "{before}");
    let (after, ok, stderr) = Restored::spawn(&state, &mem).wait();
    assert!(ok, "{stderr}");
    assert_eq!(
        after.matches("blk-read status=0 match=yes").count(),
        2,
        "{after}"
    );
    assert!(after.contains("blk-write status=0"), "{after}");
    let mut written = vec![0u8; 8 * 512];
    fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut written, 16 * 512)
        .unwrap();
    let expected: Vec<u8> = (16..24)
        .flat_map(|s| (0..512).map(move |i| pattern(s, i, 9)))
        .collect();
    assert!(
        written == expected,
        "the restored guest's write is not in the file"
    );
}

/// A snapshot taken while the guest keeps 32 writes in flight on an Async drive (io_uring)
/// holds each of them either untouched in the available ring or used: the restored guest's
/// bench completes every request. A request lost in between (taken from the ring, never used)
/// would leave the guest waiting for it forever.
#[test]
fn an_async_drive_snapshotted_with_requests_in_flight_loses_none() {
    if !require_kvm() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("snapshot-async-disk");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    // 256 MiB in 4 KiB writes: 65536 requests, far more than the snapshot's few milliseconds.
    let mote = boot_with_engine(
        "async-disk",
        "blk-init,blk-bench:write:8:256:32",
        Some(&disk),
        "Async",
    );
    let config: serde_json::Value =
        serde_json::from_str(&mote.request("GET", "/vm/config", "").body).unwrap();
    assert_eq!(config["drives"][0]["io_engine"], "Async");
    let (state, mem, before) = snapshot_and_kill(mote, "probe: blk-bench start\n");
    assert!(
        !before.contains("blk-bench done"),
        "the bench ended before the snapshot: {before}"
    );
    let (after, ok, stderr) = Restored::spawn(&state, &mem).wait();
    assert!(ok, "{after}\n{stderr}");
    assert!(
        after.contains("probe: blk-bench done requests=65536 errors=0\n"),
        "{after}"
    );
}

/// The CRC-64/ECMA-182 of the state file format.
fn crc64(bytes: &[u8]) -> u64 {
    crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182).checksum(bytes)
}

/// A copy of the state file with `change` applied to its bytes.
fn altered(state: &Path, name: &str, change: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = fs::read(state).unwrap();
    change(&mut bytes);
    let path = state.with_file_name(name);
    fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn bad_snapshots_are_refused_and_leave_nothing_started() {
    if !require_kvm() {
        return;
    }
    let mote = boot("bad-source", &format!("count:20:{SPINS}"), None);
    let (state, mem, _) = snapshot_and_kill(mote, "probe: count=2\n");
    let len = fs::metadata(&state).unwrap().len() as usize;

    let truncated = altered(&state, "truncated", |b| b.truncate(len / 2));
    let corrupted = altered(&state, "corrupted", |b| b[len / 2] ^= 0x40);
    let not_ours = altered(&state, "not-ours", |b| b[0] = b'X');
    let new_version = altered(&state, "version", |b| {
        b[8..12].copy_from_slice(&99u32.to_le_bytes());
        let end = b.len() - 8;
        let crc = crc64(&b[..end]);
        b[end..].copy_from_slice(&crc.to_le_bytes());
    });
    let short_mem = state.with_file_name("short-mem");
    fs::copy(&mem, &short_mem).unwrap();
    fs::File::options()
        .write(true)
        .open(&short_mem)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();

    let cases = [
        (&truncated, &mem, "truncated"),
        (&corrupted, &mem, "corrupted"),
        (&not_ours, &mem, "not a mote snapshot"),
        (&new_version, &mem, "format version 99"),
        (&state, &short_mem, "has 67108864 bytes"),
        (
            &dir_missing(&state),
            &mem,
            "cannot open the snapshot state file",
        ),
    ];
    // A load that fails once the snapshot is being read gets its answer, and then the monitor
    // ends (status 1, its socket gone), as Firecracker's does: a half-loaded monitor is not
    // reused. A client starts a fresh one.
    for (index, (state_file, mem_file, reason)) in cases.into_iter().enumerate() {
        let mote = ApiMote::spawn(&format!("bad-target-{index}"), &[]);
        let answer = mote.request(
            "PUT",
            "/snapshot/load",
            &load_body(state_file, mem_file, true),
        );
        let fault = answer.fault();
        assert!(fault.contains(reason), "{reason}: {fault}");
        let socket = mote.socket.clone();
        let run = mote.wait(WAIT);
        assert_eq!(run.status.code(), Some(1), "{reason}: {}", run.stderr);
        assert!(
            run.stderr.contains("snapshot load failed"),
            "{}",
            run.stderr
        );
        assert!(!socket.exists(), "{reason}: the API socket stayed");
    }
    // A request refused before anything is read (here a Uffd handler's socket that is not
    // there) leaves the monitor as it was: the good snapshot then loads, paused.
    let mote = ApiMote::spawn("bad-target-shape", &[]);
    let answer = mote.request(
        "PUT",
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": state, "mem_backend": {"backend_type": "Uffd", "backend_path": "/x"}}).to_string(),
    );
    assert!(
        answer.fault().contains("backend_path /x: no such file"),
        "{answer:?}"
    );
    assert_eq!(mote.request("GET", "/", "").json()["state"], "Not started");
    mote.ok("PUT", "/snapshot/load", &load_body(&state, &mem, false));
    assert_eq!(mote.request("GET", "/", "").json()["state"], "Paused");
    let answer = mote.request("PUT", "/snapshot/load", &load_body(&state, &mem, true));
    assert!(answer.fault().contains("after starting"), "{answer:?}");
    mote.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let run = mote.wait(WAIT);
    assert!(run.stdout.contains("probe: done"), "{}", run.stdout);
}

fn dir_missing(state: &Path) -> PathBuf {
    state.with_file_name("no-such-state")
}

#[test]
fn snapshots_are_refused_unless_paused_and_the_guest_goes_on() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("refusals", &[]);
    let body = |kind: &str| {
        serde_json::json!({
            "snapshot_type": kind,
            "snapshot_path": mote.dir.join("state"),
            "mem_file_path": mote.dir.join("mem"),
        })
        .to_string()
    };
    let answer = mote.request("PUT", "/snapshot/create", &body("Full"));
    assert!(answer.fault().contains("before starting"), "{answer:?}");
    mote.ok(
        "PUT",
        "/boot-source",
        &boot_source(&format!("count:15:{SPINS}")),
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote.wait_for_stdout("probe: count=1\n", WAIT);
    let answer = mote.request("PUT", "/snapshot/create", &body("Full"));
    assert!(answer.fault().contains("must be paused"), "{answer:?}");
    assert!(!mote.dir.join("state").exists() && !mote.dir.join("mem").exists());
    mote.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let answer = mote.request("PUT", "/snapshot/create", &body("Diff"));
    assert!(
        answer
            .fault()
            .contains("Diff snapshots need dirty page tracking"),
        "{answer:?}"
    );
    let answer = mote.request(
        "PUT",
        "/snapshot/create",
        &serde_json::json!({"snapshot_path": "/nonexistent/dir/state", "mem_file_path": mote.dir.join("mem")}).to_string(),
    );
    assert!(answer.fault().contains("cannot write"), "{answer:?}");
    mote.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let run = mote.wait(WAIT);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(numbers(&run.stdout, "count"), (1..=15).collect::<Vec<_>>());
}

/// A crash in mote is reported as that crash. Here a real one: the memory file of a restored
/// guest is truncated under it (as another process may do), so the main thread's first read
/// of a page that was never copied, while it writes a new snapshot, raises SIGBUS. Rust's
/// handler resets the signal's action to re-raise it; the seccomp filters used to refuse that
/// call, and the crash looked like a filter violation (SIGSYS).
#[test]
fn a_sigbus_in_mote_is_reported_as_sigbus_not_as_a_seccomp_violation() {
    if !require_kvm() {
        return;
    }
    let mote = boot("sigbus-source", "hello,spin", None);
    let (state, mem, _) = snapshot_and_kill(mote, "probe: hello\n");
    let restored = ApiMote::spawn("sigbus", &[]);
    restored.ok("PUT", "/snapshot/load", &load_body(&state, &mem, false));
    fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(0)
        .unwrap();
    let body = serde_json::json!({
        "snapshot_type": "Full",
        "snapshot_path": restored.dir.join("state2"),
        "mem_file_path": restored.dir.join("mem2"),
    })
    .to_string();
    let mut stream = std::os::unix::net::UnixStream::connect(&restored.socket).unwrap();
    write!(
        stream,
        "PUT /snapshot/create HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let run = restored.wait(WAIT);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        run.status.signal(),
        Some(libc::SIGBUS),
        "{:?}\n{}",
        run.status,
        run.stderr
    );
}

/// The guest's MAC in the network tests.
const GUEST_MAC: &str = "06:00:0a:00:00:02";

/// Boots the probe in `ns` serving `answers` echo requests at 10.0.0.2 through tap0, pings it
/// `pings` times, snapshots it, kills it, and puts tap1 where tap0 was (so that only an override
/// can give the restored interface a TAP). Returns the test's directory, the state file and
/// the memory file.
fn snapshot_a_net_guest(ns: &Netns, answers: u32, pings: u32) -> (PathBuf, PathBuf, PathBuf) {
    ns.add_tap("tap0", Some("10.0.0.1/24"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(&ns.name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let api = dir.join("api.sock");
    let mote = ns.spawn_mote(&["--api-sock".into(), api.display().to_string()]);
    common::api::wait_for_socket(&api, WAIT, String::new);
    let steps = format!("net-init,net-serve:10.0.0.2:{answers}:60");
    common::api::ok(&api, "PUT", "/boot-source", &boot_source(&steps));
    let eth0 =
        serde_json::json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC});
    common::api::ok(&api, "PUT", "/network-interfaces/eth0", &eth0.to_string());
    common::api::ok(
        &api,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    mote.wait_for_line("net-serve ready", WAIT);
    let count = pings.to_string();
    let ping = ns.run(&["ping", "-c", &count, "-W", "2", "-i", "0.2", "10.0.0.2"]);
    assert!(
        ping.stdout.contains(&format!("{pings} received")),
        "{}",
        ping.stdout
    );
    let (state, mem) = common::api::pause_and_snapshot(&api, &dir);
    drop(mote);
    ns.ip(&["link", "del", "tap0"]);
    ns.add_tap("tap1", Some("10.0.0.1/24"));
    (dir, state, mem)
}

#[test]
fn a_restored_guest_answers_pings_through_the_tap_of_a_network_override() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    // The namespace (and the TAPs in it) goes when the test ends, on a failure too.
    let ns = Netns::new();
    // Six echo requests in all: two before the snapshot, four after the restore.
    let (dir, state, mem) = snapshot_a_net_guest(&ns, 6, 2);

    let api = dir.join("api-restored.sock");
    let restored = ns.spawn_mote(&["--api-sock".into(), api.display().to_string()]);
    common::api::wait_for_socket(&api, WAIT, String::new);
    let load = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}],
    });
    common::api::ok(&api, "PUT", "/snapshot/load", &load.to_string());
    ns.wait_for_carrier("tap1");
    let ping = ns.run(&["ping", "-c", "3", "-W", "2", "-i", "0.2", "10.0.0.2"]);
    assert!(ping.stdout.contains("3 received"), "{}", ping.stdout);
    // The guest answered ARP through tap1 with the MAC it had before the snapshot. (Asked
    // while the guest still serves: once it is done, mote exits, tap1 loses its carrier and
    // the kernel forgets its neighbours.)
    let neighbours = ns.run(&["ip", "neigh", "show", "dev", "tap1"]);
    assert!(
        neighbours.stdout.contains(&format!("lladdr {GUEST_MAC} ")),
        "{}",
        neighbours.stdout
    );
    let ping = ns.run(&["ping", "-c", "1", "-W", "2", "10.0.0.2"]);
    assert!(ping.stdout.contains("1 received"), "{}", ping.stdout);
    let run = restored.wait(WAIT);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.stdout.contains("probe: net-serve answered=6 "),
        "{}",
        run.stdout
    );
}

/// Boots the probe through the API with `steps` and a vsock device (CID 3) on `v.sock` in its
/// directory; returns the monitor and the socket's path.
fn boot_with_vsock(name: &str, steps: &str) -> (ApiMote, PathBuf) {
    let mote = ApiMote::spawn(name, &[]);
    let uds = mote.dir.join("v.sock");
    mote.ok("PUT", "/boot-source", &boot_source(steps));
    let vsock = serde_json::json!({"guest_cid": 3, "uds_path": uds});
    mote.ok("PUT", "/vsock", &vsock.to_string());
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    (mote, uds)
}

/// `mote run --restore` takes the API's overrides as flags: the restored vsock device serves
/// its guest on the socket `--vsock-override` names.
#[test]
fn mote_run_restore_serves_vsock_on_the_socket_of_its_override() {
    if !require_kvm() {
        return;
    }
    let (mote, _) = boot_with_vsock("snapshot-vsock-cli", "vsock-init,vsock-echo-listen:5001:1");
    let dir = mote.dir.clone();
    let (state, mem, _) = snapshot_and_kill(mote, "probe: vsock: listening port=5001");

    let new_uds = dir.join("v-restored.sock");
    let restored = Restored::spawn_with(
        &state,
        &mem,
        &["--vsock-override".as_ref(), new_uds.as_os_str()],
    );
    common::api::wait_for_socket(&new_uds, WAIT, String::new);
    let data = host::noise(64 * 1024, 3);
    assert!(
        host::echo_through(&new_uds, 5001, data.clone()) == data,
        "the echo differs"
    );
    let (out, ok, stderr) = restored.wait();
    assert!(ok, "{out}\n{stderr}");
    assert!(
        out.contains("probe: vsock-echo-listen conns=1 bytes=65536\n"),
        "{out}"
    );
}

/// `mote run --restore --net-override eth0=tap1`: the restored interface answers through tap1.
#[test]
fn mote_run_restore_attaches_the_tap_of_its_net_override() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    // Three echo requests in all: one before the snapshot, two after the restore.
    let (_dir, state, mem) = snapshot_a_net_guest(&ns, 3, 1);
    let restored = ns.spawn_mote(&[
        "run".into(),
        "--restore".into(),
        state.display().to_string(),
        "--mem-file".into(),
        mem.display().to_string(),
        "--net-override".into(),
        "eth0=tap1".into(),
    ]);
    ns.wait_for_carrier("tap1");
    let ping = ns.run(&["ping", "-c", "2", "-W", "2", "-i", "0.2", "10.0.0.2"]);
    assert!(ping.stdout.contains("2 received"), "{}", ping.stdout);
    let run = restored.wait(WAIT);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.stdout.contains("probe: net-serve answered=3 "),
        "{}",
        run.stdout
    );
}

#[test]
fn a_restored_guest_drops_its_vsock_streams_and_takes_new_ones_both_ways() {
    if !require_kvm() {
        return;
    }
    let steps = "vsock-init,vsock-echo-listen:5000:1,vsock-echo-listen:5001:1,\
                 vsock-connect-echo:6000:65536";
    let (mote, uds) = boot_with_vsock("snapshot-vsock", steps);
    mote.wait_for_stdout("probe: vsock: listening port=5000", WAIT);
    let data = host::noise(64 * 1024, 1);
    assert!(
        host::echo_through(&uds, 5000, data.clone()) == data,
        "the echo differs"
    );
    mote.wait_for_stdout("probe: vsock: listening port=5001", WAIT);
    // A stream still open when the snapshot is taken.
    let (mut open, answer) = host::connect(&uds, 5001);
    assert!(
        answer.as_deref().is_some_and(|a| a.starts_with("OK ")),
        "{answer:?}\n{}",
        mote.stdout()
    );
    open.write_all(b"before").unwrap();
    let mut echo = [0u8; 6];
    open.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"before");

    let (state, mem, _) = snapshot_and_kill(mote, "probe: vsock: listening port=5001");
    // The stream died with its monitor, whose socket file stays behind: a restored guest
    // needs a path of its own.
    let mut rest = Vec::new();
    let end = open.read_to_end(&mut rest);
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert!(uds.exists());

    let restored = ApiMote::spawn("snapshot-vsock-restored", &[]);
    let new_uds = restored.dir.join("v.sock");
    let server = host::half_close_echo_server(&restored.dir.join("v.sock_6000"));
    let load = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
        "vsock_override": {"uds_path": new_uds},
    });
    restored.ok("PUT", "/snapshot/load", &load.to_string());
    // The device told the driver its streams are gone; the guest dropped the open one.
    restored.wait_for_stdout("probe: vsock: transport reset dropped=1 cid=3\n", WAIT);
    let data = host::noise(256 * 1024, 2);
    assert!(
        host::echo_through(&new_uds, 5001, data.clone()) == data,
        "the echo differs:\n{}",
        restored.stdout()
    );
    let expected: Vec<u8> = (0..65536).map(host::pattern).collect();
    let received = server.join();
    assert!(
        received.is_ok_and(|got| got == expected),
        "the guest's stream did not arrive whole:\n{}",
        restored.stdout()
    );
    let run = restored.wait(WAIT);
    assert!(run.status.success(), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("probe: vsock-echo-listen conns=1 bytes=262144\n"),
        "{}",
        run.stdout
    );
    let checksum = format!("checksum={:#018x}", host::fnv(&expected));
    assert!(
        run.stdout.contains(&format!(
            "probe: vsock-connect-echo bytes=65536 match=yes {checksum}"
        )),
        "{}",
        run.stdout
    );
}

/// `PUT /snapshot/create` of the paused guest of `mote` to these paths.
fn create_body(state: &Path, mem: &Path) -> String {
    serde_json::json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem})
        .to_string()
}

#[test]
fn a_restored_guest_is_not_snapshotted_onto_the_memory_file_it_runs_from() {
    if !require_kvm() {
        return;
    }
    let mote = boot("own-mem-source", &format!("count:20:{SPINS}"), None);
    let (state, mem, _) = snapshot_and_kill(mote, "probe: count=2\n");
    let mem_before = fs::read(&mem).unwrap();
    // Another name for the same file: refused by what it is, not by how it is spelt.
    let alias = state.with_file_name("mem-alias");
    fs::hard_link(&mem, &alias).unwrap();

    let restored = ApiMote::spawn("own-mem", &[]);
    restored.ok("PUT", "/snapshot/load", &load_body(&state, &mem, false));
    let new_state = restored.dir.join("state2");
    for target in [&mem, &alias] {
        let answer = restored.request("PUT", "/snapshot/create", &create_body(&new_state, target));
        assert!(
            answer.fault().contains("was restored from"),
            "{target:?}: {answer:?}"
        );
    }
    // The state and the memory file may not be one file either.
    let same = restored.dir.join("both");
    let answer = restored.request("PUT", "/snapshot/create", &create_body(&same, &same));
    assert!(answer.fault().contains("the same file"), "{answer:?}");
    assert!(!same.exists() && !new_state.exists());
    assert!(
        fs::read(&mem).unwrap() == mem_before,
        "the memory file changed"
    );
    // The monitor lives on, and so does its guest.
    restored.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let run = restored.wait(WAIT);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(run.stdout.contains("probe: done"), "{}", run.stdout);
}

#[test]
fn a_new_snapshot_over_a_memory_file_that_clones_map_leaves_them_running() {
    if !require_kvm() {
        return;
    }
    let mote = boot("mapped-source", &format!("count:30:{SPINS}"), None);
    let (state, mem, before) = snapshot_and_kill(mote, "probe: count=2\n");
    let clones: Vec<ApiMote> = (0..2)
        .map(|i| {
            let clone = ApiMote::spawn(&format!("mapped-clone{i}"), &[]);
            clone.ok("PUT", "/snapshot/load", &load_body(&state, &mem, false));
            clone
        })
        .collect();
    // Another guest's snapshot goes to the path the clones map.
    let other = boot("mapped-other", &format!("count:5:{SPINS}"), None);
    other.wait_for_stdout("probe: count=1\n", WAIT);
    other.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let other_state = other.dir.join("state");
    other.ok("PUT", "/snapshot/create", &create_body(&other_state, &mem));
    drop(other);
    for clone in &clones {
        clone.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    }
    for clone in clones {
        let run = clone.wait(WAIT);
        assert!(run.status.success(), "{}", run.stderr);
        let whole = format!("{before}{}", run.stdout);
        assert_eq!(numbers(&whole, "count"), (1..=30).collect::<Vec<_>>());
    }
    // The new memory file is the other guest's: it restores and counts to its own end.
    let (after, ok, stderr) = Restored::spawn(&other_state, &mem).wait();
    assert!(ok, "{stderr}");
    assert!(numbers(&after, "count").last() == Some(&5), "{after}");
}

#[test]
fn a_failed_state_write_leaves_no_memory_file_behind() {
    if !require_kvm() {
        return;
    }
    let mote = boot("failed-state", &format!("count:10:{SPINS}"), None);
    mote.wait_for_stdout("probe: count=1\n", WAIT);
    mote.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let mem = mote.dir.join("mem");
    let answer = mote.request(
        "PUT",
        "/snapshot/create",
        &create_body(Path::new("/nonexistent/dir/state"), &mem),
    );
    assert!(answer.fault().contains("cannot write"), "{answer:?}");
    let left: Vec<_> = fs::read_dir(&mote.dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name != "api.sock")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A copy of the state file with its configuration and memory regions changed, the body
/// re-encoded (bincode: the config string, then the regions) and its checksum made right, so
/// only the checks of what it says can refuse it.
fn rewritten(
    state: &Path,
    name: &str,
    change: impl FnOnce(&mut String, &mut Vec<(u64, u64)>),
) -> PathBuf {
    // Magic, version, arch, then the body's length.
    const HEADER: usize = 24;
    let bytes = fs::read(state).unwrap();
    let body = &bytes[HEADER..bytes.len() - 8];
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
    let config_len = u64_at(0) as usize;
    let mut config = String::from_utf8(body[8..8 + config_len].to_vec()).unwrap();
    let count = u64_at(8 + config_len) as usize;
    let regions_at = 16 + config_len;
    let mut regions: Vec<(u64, u64)> = (0..count)
        .map(|i| (u64_at(regions_at + i * 16), u64_at(regions_at + i * 16 + 8)))
        .collect();
    let rest = &body[regions_at + count * 16..];
    change(&mut config, &mut regions);
    let mut new_body = Vec::new();
    new_body.extend_from_slice(&(config.len() as u64).to_le_bytes());
    new_body.extend_from_slice(config.as_bytes());
    new_body.extend_from_slice(&(regions.len() as u64).to_le_bytes());
    for (addr, size) in &regions {
        new_body.extend_from_slice(&addr.to_le_bytes());
        new_body.extend_from_slice(&size.to_le_bytes());
    }
    new_body.extend_from_slice(rest);
    let mut out = bytes[..16].to_vec();
    out.extend_from_slice(&(new_body.len() as u64).to_le_bytes());
    out.extend_from_slice(&new_body);
    let crc = crc64(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let path = state.with_file_name(name);
    fs::write(&path, out).unwrap();
    path
}

#[test]
fn a_state_file_whose_memory_does_not_fit_the_machine_is_refused() {
    if !require_kvm() {
        return;
    }
    let mote = boot("layout-source", &format!("count:20:{SPINS}"), None);
    let (state, mem, _) = snapshot_and_kill(mote, "probe: count=2\n");
    // The re-encoding alone changes nothing: this one loads.
    let same = rewritten(&state, "same", |_, _| {});
    // 2^44 + 128 MiB, which wraps to 128 MiB when shifted into bytes.
    let huge = rewritten(&state, "huge", |config, _| {
        *config = config.replace("\"mem_size_mib\":128", "\"mem_size_mib\":17592186044544");
    });
    // The same 128 MiB, moved so that it runs into the MMIO gap below 4 GiB.
    let in_gap = rewritten(&state, "in-gap", |_, regions| {
        regions[0].0 = 0xc000_0000 - (64 << 20);
    });
    for (index, (file, reason)) in [(&huge, "mem_size_mib"), (&in_gap, "layout")]
        .into_iter()
        .enumerate()
    {
        // A failed load ends its monitor (Firecracker's contract): one monitor each.
        let mote = ApiMote::spawn(&format!("layout-target-{index}"), &[]);
        let answer = mote.request("PUT", "/snapshot/load", &load_body(file, &mem, true));
        let fault = answer.fault();
        assert!(fault.contains(reason), "{file:?}: {fault}");
        assert_eq!(mote.wait(WAIT).status.code(), Some(1), "{file:?}");
    }
    let mote = ApiMote::spawn("layout-target", &[]);
    mote.ok("PUT", "/snapshot/load", &load_body(&same, &mem, true));
    let run = mote.wait(WAIT);
    assert!(run.stdout.contains("probe: done"), "{}", run.stdout);
}

/// Makes a named pipe at `path`.
fn mkfifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path, which lives across the call.
    let ret = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
    assert_eq!(ret, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

#[test]
fn pipes_and_devices_as_snapshot_files_are_refused_at_once() {
    if !require_kvm() {
        return;
    }
    let mote = boot("fifo-source", &format!("count:20:{SPINS}"), None);
    let (state, mem, _) = snapshot_and_kill(mote, "probe: count=2\n");
    let fifo = state.with_file_name("fifo");
    mkfifo(&fifo);
    let zero = Path::new("/dev/zero");
    let cases = [(&fifo, &mem), (&zero.to_path_buf(), &mem), (&state, &fifo)];
    for (index, (state_file, mem_file)) in cases.into_iter().enumerate() {
        // A failed load ends its monitor (Firecracker's contract): one monitor each.
        let mote = ApiMote::spawn(&format!("fifo-target-{index}"), &[]);
        let started = Instant::now();
        let answer = mote.request(
            "PUT",
            "/snapshot/load",
            &load_body(state_file, mem_file, true),
        );
        let fault = answer.fault();
        assert!(fault.contains("not a regular file"), "{fault}");
        assert!(started.elapsed() < Duration::from_secs(2), "{fault}");
        assert_eq!(mote.wait(WAIT).status.code(), Some(1), "{fault}");
    }
    // The command line's restore likewise.
    for (state_file, mem_file) in [(&fifo, &mem), (&state, &fifo)] {
        let run = common::run_mote(
            &[
                "run",
                "--restore",
                state_file.to_str().unwrap(),
                "--mem-file",
                mem_file.to_str().unwrap(),
            ],
            None,
            Duration::from_secs(5),
        );
        assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
        assert!(run.stderr.contains("not a regular file"), "{}", run.stderr);
    }
}

/// Snapshots written by earlier motes (each format version, checked in under
/// tests/data/snapshot-vN) restore with this one, and their guests carry on counting.
#[test]
fn snapshots_from_earlier_motes_restore_and_run() {
    if cfg!(not(target_arch = "x86_64")) || !require_kvm() {
        return;
    }
    for version in 1..=4 {
        restore_an_earlier_snapshot(version);
    }
}

/// tests/data/snapshot-v`version` (the probe, paused after `count=2`) restores here, is
/// described as that version, and counts on from 3.
fn restore_an_earlier_snapshot(version: u32) {
    let name = format!("snapshot-v{version}");
    let data = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(&name);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(&name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let mem = dir.join("mem");
    let unpacked = Command::new("sh")
        .arg("-c")
        .arg(r#"gzip -dc "$0" > "$1""#)
        .arg(data.join("mem.gz"))
        .arg(&mem)
        .status()
        .unwrap();
    assert!(unpacked.success(), "gzip -d failed");
    let described = common::mote(&["--describe-snapshot", data.join("state").to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&described.stdout),
        format!("v{version}\n")
    );
    let described = common::mote(&["snapshot", "describe", data.join("state").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&described.stdout);
    for line in [
        format!("format: v{version} (this mote writes v"),
        "vcpus: 1\n".to_string(),
        "memory file size: 33554432 bytes\n".to_string(),
        // Every snapshot before format 5 wrote all of guest memory.
        "memory file: Full\n".to_string(),
        "entropy: virtio-rng\n".to_string(),
    ] {
        assert!(text.contains(&line), "v{version}: {line:?} not in:\n{text}");
    }
    let mut child = Command::new(mote_bin())
        .args(["run", "--restore"])
        .arg(data.join("state"))
        .arg("--mem-file")
        .arg(&mem)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 256];
            while let Ok(n) = stdout.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        })
    };
    let started = Instant::now();
    while !seen.lock().unwrap().contains("probe: count=4\n") {
        if started.elapsed() > WAIT || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    let _ = reader.join();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.starts_with("probe: count=3\nprobe: count=4\n"),
        "the restored v{version} guest did not carry on from count=2: {seen:?}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
