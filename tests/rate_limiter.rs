//! Rate limiters, measured with the probe guest: a drive limited to B bytes/s moves data at B
//! (reads and writes), an ops limit caps the requests a second, PATCH changes the rate of a
//! transfer under way without losing a request, a limiter survives a snapshot, the entropy
//! device is limited too, and bad buckets are refused with what was wrong. virtio-net's limiters
//! are measured on frames through a TAP, in a network namespace of the test's own (`netns`,
//! shared with `tests/net.rs`): what the guest sends at the host's end of the TAP, what the
//! host sends by when the guest acknowledges it.

mod common;

#[path = "net/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::ApiMote;
use common::{probe_kernel, require_kvm};
use netns::{Netns, PacketSocket};

const MIB: u64 = 1 << 20;

fn disk(dir: &Path, mib: u64) -> PathBuf {
    let path = dir.join("disk.img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(mib * MIB).unwrap();
    path
}

/// Boots the probe through the API with a writable drive `d` of 32 MiB limited by `limiter`.
fn boot(name: &str, steps: &str, limiter: serde_json::Value) -> ApiMote {
    let mote = ApiMote::spawn(name, &[]);
    let boot_source = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
    });
    mote.ok("PUT", "/boot-source", &boot_source.to_string());
    let drive = serde_json::json!({
        "drive_id": "d", "path_on_host": disk(&mote.dir, 32), "is_root_device": false,
        "rate_limiter": limiter,
    });
    mote.ok("PUT", "/drives/d", &drive.to_string());
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote
}

/// When the console shows its `n`th (from 1) line starting with `line`.
fn when_line(mote: &ApiMote, line: &str, n: usize, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        let out = mote.stdout();
        if out.lines().filter(|l| l.starts_with(line)).count() >= n {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "no {line:?} #{n} within {timeout:?}:\n{out}\nstderr:\n{}",
            mote.stderr()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn assert_within(what: &str, measured: f64, expected: f64, tolerance: f64) {
    eprintln!("{what}: {measured:.0} (configured {expected:.0})");
    assert!(
        (measured - expected).abs() <= expected * tolerance,
        "{what}: measured {measured:.0}, configured {expected:.0}"
    );
}

fn bucket(size: u64, refill_ms: u64) -> serde_json::Value {
    serde_json::json!({"size": size, "refill_time": refill_ms})
}

const START: &str = "probe: blk-bench start";
const DONE: &str = "probe: blk-bench done";

#[test]
fn a_drive_limited_to_b_bytes_a_second_reads_and_writes_at_b() {
    if !require_kvm() {
        return;
    }
    // 4 MiB/s in a bucket of a tenth of a second, so the first burst is small.
    let rate = 4 * MIB;
    let size = rate / 10;
    let total = 10 * MIB;
    let steps = "blk-init,blk-bench:read:8:10:1,blk-bench:write:8:10:1";
    let mote = boot(
        "rl-bandwidth",
        steps,
        serde_json::json!({"bandwidth": bucket(size, 100)}),
    );
    let timeout = Duration::from_secs(20);
    let read_start = when_line(&mote, START, 1, timeout);
    let write_start = when_line(&mote, START, 2, timeout);
    let write_end = when_line(&mote, DONE, 2, timeout);
    let run = mote.wait(Duration::from_secs(30));
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert!(
        run.stdout
            .matches(&format!(
                "blk-bench done requests={} errors=0",
                total / 4096
            ))
            .count()
            == 2,
        "{}",
        run.stdout
    );
    // The read began with a full bucket; the write found it empty.
    let read = (total - size) as f64 / (write_start - read_start).as_secs_f64();
    let write = total as f64 / (write_end - write_start).as_secs_f64();
    assert_within("read bytes/s", read, rate as f64, 0.1);
    assert_within("write bytes/s", write, rate as f64, 0.1);
}

#[test]
fn an_ops_limit_caps_the_requests_a_second() {
    if !require_kvm() {
        return;
    }
    let iops = 400;
    let requests = 1024;
    let mote = boot(
        "rl-ops",
        "blk-init,blk-bench:read:1:0:1,blk-bench:read:8:4:1",
        serde_json::json!({"ops": bucket(iops / 10, 100)}),
    );
    // A first tiny step (0 MiB) empties nothing: the second starts with a full bucket.
    let start = when_line(&mote, START, 2, Duration::from_secs(20));
    let end = when_line(&mote, DONE, 2, Duration::from_secs(20));
    let run = mote.wait(Duration::from_secs(30));
    let elapsed = (end - start).as_secs_f64();
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert!(
        run.stdout
            .contains(&format!("blk-bench done requests={requests} errors=0")),
        "{}",
        run.stdout
    );
    let measured = (requests - iops / 10) as f64 / elapsed;
    assert_within("requests/s", measured, iops as f64, 0.1);
}

#[test]
fn patch_changes_the_rate_of_a_transfer_under_way_and_loses_nothing() {
    if !require_kvm() {
        return;
    }
    let slow = 2 * MIB;
    let fast = 32 * MIB;
    let total = 8 * MIB;
    let mote = boot(
        "rl-patch",
        "blk-init,blk-bench:read:8:8:1",
        serde_json::json!({"bandwidth": bucket(slow / 10, 100), "ops": bucket(100_000, 1000)}),
    );
    let start = when_line(&mote, START, 1, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1000));
    // Only the bandwidth bucket changes; the ops bucket stays.
    mote.ok(
        "PATCH",
        "/drives/d",
        &serde_json::json!({"drive_id": "d", "rate_limiter": {"bandwidth": bucket(fast / 10, 100)}})
            .to_string(),
    );
    let patched = start.elapsed().as_secs_f64();
    let config = mote.request("GET", "/vm/config", "").json();
    assert_eq!(
        config["drives"][0]["rate_limiter"],
        serde_json::json!({"bandwidth": bucket(fast / 10, 100), "ops": bucket(100_000, 1000)})
    );
    // Timed to the guest's line, not to the monitor's exit, which a loaded host delays.
    let elapsed = (when_line(&mote, DONE, 1, Duration::from_secs(20)) - start).as_secs_f64();
    let run = mote.wait(Duration::from_secs(30));
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains(&format!(
            "blk-bench done requests={} errors=0",
            total / 4096
        )),
        "{}",
        run.stdout
    );
    // At the slow rate the whole transfer would take about 3.9 s: the PATCH must bring it to
    // the fast rate's time. Not much sooner (no free burst), and late by at most what a
    // loaded host's scheduling adds (the figure was 1.21-1.28 s for 1.19 s alone, 1.44 s with
    // a whole CI run beside it, timed to the exit).
    let moved_slowly = (slow / 10) as f64 + slow as f64 * patched;
    let expected = patched + (total as f64 - moved_slowly) / fast as f64;
    eprintln!("patched after {patched:.2} s; done after {elapsed:.2} s, expected {expected:.2} s");
    assert!(
        elapsed > expected - 0.25 && elapsed < expected + 0.6,
        "done after {elapsed:.2} s, expected {expected:.2} s"
    );
}

#[test]
fn bad_buckets_are_refused_with_what_was_wrong() {
    let mote = ApiMote::spawn("rl-bad", &[]);
    let path = disk(&mote.dir, 1);
    let put = |limiter: serde_json::Value| {
        let drive = serde_json::json!({
            "drive_id": "d", "path_on_host": path, "is_root_device": false,
            "rate_limiter": limiter,
        });
        mote.request("PUT", "/drives/d", &drive.to_string())
    };
    let answer = put(serde_json::json!({"bandwidth": bucket(1000, 0)}));
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.fault(),
        "drive d rate_limiter: bandwidth: refill_time is 0 for a bucket of size 1000: a bucket \
         that never refills would stop the device for good"
    );
    let answer = put(serde_json::json!({"ops": {"size": -1, "refill_time": 10}}));
    assert_eq!(answer.status, 400);
    assert!(
        answer.fault().contains("rate_limiter.ops.size") && answer.fault().contains("-1"),
        "{}",
        answer.fault()
    );
    let answer = put(serde_json::json!({"ops": bucket(1, u64::MAX)}));
    assert_eq!(answer.status, 400);
    assert!(answer.fault().contains("is too long"), "{}", answer.fault());
    let answer = mote.request(
        "PUT",
        "/entropy",
        r#"{"rate_limiter": {"ops": {"size": 1, "refill_time": 0}}}"#,
    );
    assert_eq!(answer.status, 400);
    assert!(
        answer
            .fault()
            .contains("entropy rate_limiter: ops: refill_time is 0"),
        "{}",
        answer.fault()
    );
    // Size 0 is Firecracker's "no limit".
    assert_eq!(put(serde_json::json!({"ops": bucket(0, 0)})).status, 204);
    // PATCH is for a running guest.
    let answer = mote.request(
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#,
    );
    assert_eq!(answer.status, 400);
    assert!(answer.fault().contains("not supported before starting"));
}

#[test]
fn a_snapshot_with_a_limiter_restores_with_it() {
    if !require_kvm() {
        return;
    }
    let rate = 4 * MIB;
    let limiter = serde_json::json!({"bandwidth": bucket(rate / 10, 100)});
    let mote = boot(
        "rl-snapshot",
        "blk-init,blk-bench:read:8:16:1",
        limiter.clone(),
    );
    when_line(&mote, START, 1, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1000));
    let (state, mem) = mote.pause_and_snapshot();
    drop(mote);
    let clone = ApiMote::spawn("rl-snapshot-clone", &[]);
    let body = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    });
    let restored = Instant::now();
    clone.ok("PUT", "/snapshot/load", &body.to_string());
    let config = clone.request("GET", "/vm/config", "").json();
    assert_eq!(config["drives"][0]["rate_limiter"], limiter);
    let run = clone.wait(Duration::from_secs(30));
    let elapsed = restored.elapsed().as_secs_f64();
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("blk-bench done requests=4096 errors=0"),
        "{}",
        run.stdout
    );
    // About 12 MiB were left at 4 MiB/s; unlimited they would take milliseconds.
    assert!(
        (2.5..3.8).contains(&elapsed),
        "the restored guest finished after {elapsed:.2} s"
    );
}

#[test]
fn the_entropy_device_is_limited_too() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("rl-entropy", &[]);
    let boot_source = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=rng-read:0:4096,rng-read:0:4096",
    });
    mote.ok("PUT", "/boot-source", &boot_source.to_string());
    // 4 KiB a second: each read is two 4 KiB requests, and the first one has the full bucket.
    mote.ok(
        "PUT",
        "/entropy",
        r#"{"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 1000}}}"#,
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let first = when_line(&mote, "probe: rng-read used=", 1, Duration::from_secs(20));
    let second = when_line(&mote, "probe: rng-read used=", 2, Duration::from_secs(20));
    let run = mote.wait(Duration::from_secs(30));
    let elapsed = (second - first).as_secs_f64();
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout.matches("probe: rng-read used=4096,4096").count(),
        2,
        "{}",
        run.stdout
    );
    // Four requests of 4 KiB: the first had the full bucket, the others waited a second each,
    // so the second read ends two seconds after the first.
    assert!((1.9..2.3).contains(&elapsed), "took {elapsed:.2} s");
}

// virtio-net. The bulk frames of the probe (tests/probe/src/net.rs): a sequence number, then a
// payload byte pattern the receiver checks, so a lost, reordered or damaged frame shows.

const GUEST_MAC: [u8; 6] = [0x06, 0, 0x0a, 0, 0, 0x02];
const GUEST_MAC_ARG: &str = "06:00:0a:00:00:02";
const HOST_MAC: [u8; 6] = [0x06, 0, 0x0a, 0, 0, 0x01];
const BIG_FRAME: usize = 1514;
/// Small enough that the 12-byte virtio-net header, were it counted, would be 19 % more bytes:
/// a limiter counting it would measure outside the tolerance.
const SMALL_FRAME: usize = 64;
/// Data frames the host may send beyond the guest's last credit (as in tests/net.rs): more
/// than the probe's 128 receive buffers, less than the TAP's queue.
const WINDOW: u32 = 256;
/// The probe's `net-recv` grants credit every this many frames.
const CREDIT_EVERY: u32 = 32;

/// Starts mote inside `ns` with the probe running `steps` and interface eth0 on tap0 with the
/// rate limiters in `limiters` (the interface's `rx_rate_limiter`/`tx_rate_limiter` fields),
/// from a config file; returns it and its API socket.
fn boot_net(ns: &Netns, steps: &str, limiters: serde_json::Value) -> (netns::Mote, PathBuf) {
    let mut eth0 = serde_json::json!({
        "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC_ARG,
    });
    let fields = eth0.as_object_mut().unwrap();
    fields.extend(limiters.as_object().unwrap().clone());
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": probe_kernel(),
            "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
        },
        "network-interfaces": [eth0],
    });
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(&ns.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let socket = dir.join("api.sock");
    let args = [
        "--api-sock".to_string(),
        socket.display().to_string(),
        "--config-file".to_string(),
        config_path.display().to_string(),
    ];
    (ns.spawn_mote(&args), socket)
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
    assert!(!run.stdout.contains("timeout"), "{}", run.stdout);
}

/// A bulk data frame from the guest, as the host's end of the TAP saw it.
struct Arrival {
    at: Instant,
    len: usize,
}

/// Takes the guest's bulk data frames off `socket`: `counts[i]` frames numbered from 0 for its
/// `i`th `net-send` step, each in order and with every payload byte as the probe wrote it.
fn receive_sent(socket: &PacketSocket, counts: &[u32], timeout: Duration) -> Vec<Vec<Arrival>> {
    let end = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    let mut steps = Vec::new();
    for &count in counts {
        let mut arrivals = Vec::with_capacity(count as usize);
        while arrivals.len() < count as usize {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "step {}: {} of {count} frames reached the host within {timeout:?}",
                steps.len(),
                arrivals.len()
            );
            let Some(len) = socket.recv(&mut buf, left) else {
                continue;
            };
            let at = Instant::now();
            let frame = &buf[..len];
            let Some((netns::KIND_DATA, seq)) = netns::parse_bulk(frame) else {
                continue; // the host's own IPv6 chatter, for one
            };
            assert_eq!(&frame[6..12], &GUEST_MAC, "bulk frame from elsewhere");
            assert_eq!(
                seq as usize,
                arrivals.len(),
                "step {}: a frame was lost or reordered",
                steps.len()
            );
            let payload = &frame[netns::ETH_HLEN + netns::BULK_HLEN..];
            assert!(
                payload
                    .iter()
                    .enumerate()
                    .all(|(i, byte)| *byte == netns::bulk_byte(seq, i)),
                "step {}: frame {seq} arrived damaged",
                steps.len()
            );
            arrivals.push(Arrival { at, len });
        }
        steps.push(arrivals);
    }
    steps
}

/// Bytes (or, with `frames`, frames) a second from the arrival of `arrivals[from]` to that of
/// the last: what came after the first over the time between them.
fn rate_from(arrivals: &[Arrival], from: usize, frames: bool) -> f64 {
    let after = &arrivals[from + 1..];
    let amount = if frames {
        after.len()
    } else {
        after.iter().map(|a| a.len).sum()
    };
    let elapsed = arrivals.last().unwrap().at - arrivals[from].at;
    amount as f64 / elapsed.as_secs_f64()
}

#[test]
fn net_tx_rate_limit_sends_b_bytes_a_second_counting_frames_without_their_header() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", None);
    let socket = PacketSocket::open(&ns, "tap0");
    // 512 KiB/s in a bucket of a tenth of a second: about 3 s of 1514-byte frames, then 2 s
    // of 64-byte ones.
    let rate = 512 * 1024;
    let counts = [1024, 16384];
    let steps = format!(
        "net-init,net-send:{}:1:{BIG_FRAME},net-send:{}:1:{SMALL_FRAME}",
        counts[0], counts[1]
    );
    let limiter = serde_json::json!({"bandwidth": bucket(rate / 10, 100)});
    let (mote, _) = boot_net(
        &ns,
        &steps,
        serde_json::json!({ "tx_rate_limiter": limiter }),
    );
    let steps = receive_sent(&socket, &counts, Duration::from_secs(30));
    let run = mote.wait(Duration::from_secs(20));
    assert_clean(&run);
    assert_eq!(run.stdout.matches("net-send done").count(), 2);
    // The first step begins with the full bucket: measure from a quarter in. The second
    // begins with the bucket as empty as the first left it.
    let big = rate_from(&steps[0], steps[0].len() / 4, false);
    let small = rate_from(&steps[1], steps[1].len() / 10, false);
    assert_within("1514-byte frames, bytes/s", big, rate as f64, 0.1);
    assert_within("64-byte frames, bytes/s", small, rate as f64, 0.1);
}

#[test]
fn net_tx_rate_limit_of_ops_caps_the_frames_a_second() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", None);
    let socket = PacketSocket::open(&ns, "tap0");
    let fps = 1000;
    let count = 4000;
    let steps = format!("net-init,net-send:{count}:1:{SMALL_FRAME}");
    let limiter = serde_json::json!({"ops": bucket(fps / 10, 100)});
    let (mote, _) = boot_net(
        &ns,
        &steps,
        serde_json::json!({ "tx_rate_limiter": limiter }),
    );
    let steps = receive_sent(&socket, &[count], Duration::from_secs(30));
    let run = mote.wait(Duration::from_secs(20));
    assert_clean(&run);
    let measured = rate_from(&steps[0], steps[0].len() / 5, true);
    assert_within("frames/s", measured, fps as f64, 0.1);
}

#[test]
fn net_rx_rate_limit_delivers_b_bytes_a_second_to_the_guest() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", None);
    let socket = PacketSocket::open(&ns, "tap0");
    // 512 KiB/s: 768 frames of 1514 bytes (about 2.2 s), then 8192 of 64 (1 s).
    let rate = 512 * 1024;
    let big_count = 768u32;
    let count = big_count + 8192;
    let frame_len = |seq: u32| {
        if seq < big_count {
            BIG_FRAME
        } else {
            SMALL_FRAME
        }
    };
    let steps = format!("net-init,net-recv:{count}:60");
    let limiter = serde_json::json!({"bandwidth": bucket(rate / 10, 100)});
    let (mote, _) = boot_net(
        &ns,
        &steps,
        serde_json::json!({ "rx_rate_limiter": limiter }),
    );
    ns.wait_for_carrier("tap0");

    // The guest sends a credit every 32 frames it took: when credit k first arrives, frame k-1
    // has reached it.
    let mut credited = Vec::new();
    let mut frame = vec![0u8; BIG_FRAME];
    let mut buf = vec![0u8; 65536];
    let (mut sent, mut granted) = (0u32, 0u32);
    let started = Instant::now();
    while credited.last().map(|(k, _)| *k) != Some(count) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "sent {sent} of {count}, credit up to {granted}"
        );
        // Take every credit waiting; block briefly only when the window is closed.
        let wait = if sent < granted.min(count) {
            Duration::ZERO
        } else {
            Duration::from_millis(5)
        };
        if let Some(len) = socket.recv(&mut buf, wait) {
            if let Some((netns::KIND_CREDIT, received)) = netns::parse_bulk(&buf[..len]) {
                if credited.last().is_none_or(|(k, _)| received > *k) {
                    credited.push((received, Instant::now()));
                }
                granted = granted.max(received.saturating_add(WINDOW));
            }
            continue;
        }
        while sent < granted.min(count) {
            let frame = &mut frame[..frame_len(sent)];
            netns::bulk_frame(frame, &GUEST_MAC, &HOST_MAC, netns::KIND_DATA, sent, count);
            let payload = &mut frame[netns::ETH_HLEN + netns::BULK_HLEN..];
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte = netns::bulk_byte(sent, i);
            }
            socket.send(frame);
            sent += 1;
        }
    }
    let run = mote.wait(Duration::from_secs(20));
    assert_clean(&run);
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("net-recv done"))
        .unwrap_or_else(|| panic!("no net-recv done in:\n{}", run.stdout));
    assert!(
        line.contains(&format!("frames={count} ")) && line.contains("out_of_order=0 bad=0"),
        "{line}"
    );
    // Bytes a second between credits `from` and `to` (multiples of 32): the frames between
    // them over the time between their arrivals.
    let when = |k: u32| {
        credited
            .iter()
            .find(|(received, _)| *received == k)
            .unwrap_or_else(|| {
                panic!(
                    "no credit {k} in {:?}",
                    credited.iter().map(|c| c.0).collect::<Vec<_>>()
                )
            })
            .1
    };
    let rate_between = |from: u32, to: u32| {
        let bytes: usize = (from..to).map(frame_len).sum();
        bytes as f64 / (when(to) - when(from)).as_secs_f64()
    };
    // The first 128 frames fill the guest's buffers before it takes any (net-recv waits for
    // that): measure the big frames from 256 on, the small ones from a second's worth in.
    assert_eq!(big_count % CREDIT_EVERY, 0);
    // Where the credits came slowest once the guest took frames as they came, to tell a
    // stall from a slow rate.
    let gaps = credited
        .windows(2)
        .filter(|w| w[0].0 >= 128)
        .map(|w| (w[1].1 - w[0].1, w[0].0, w[1].0));
    if let Some((gap, from, to)) = gaps.max() {
        eprintln!("longest between credits: {gap:?}, from {from} to {to}");
    }
    let big = rate_between(256, big_count);
    let small = rate_between(big_count + 1024, count);
    assert_within("1514-byte frames, bytes/s", big, rate as f64, 0.1);
    assert_within("64-byte frames, bytes/s", small, rate as f64, 0.1);
}

#[test]
fn net_tx_rate_limit_patched_mid_stream_changes_the_rate_and_loses_nothing() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0", None);
    let socket = PacketSocket::open(&ns, "tap0");
    let slow = 256 * 1024;
    let fast = 1024 * 1024;
    // About 1.5 s slow (400 KB), then about 2 s fast.
    let count = 1600;
    let steps = format!("net-init,net-send:{count}:1:{BIG_FRAME}");
    let ops = bucket(100_000, 1000);
    let limiter = serde_json::json!({"bandwidth": bucket(slow / 10, 100), "ops": ops});
    let (mote, api) = boot_net(
        &ns,
        &steps,
        serde_json::json!({ "tx_rate_limiter": limiter }),
    );
    let receiver =
        std::thread::spawn(move || receive_sent(&socket, &[count], Duration::from_secs(30)));
    mote.wait_for_line("net-send start", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    // Only the bandwidth bucket changes; the ops bucket stays.
    let patch_sent = Instant::now();
    common::api::ok(
        &api,
        "PATCH",
        "/network-interfaces/eth0",
        &serde_json::json!({"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": bucket(fast / 10, 100)}})
            .to_string(),
    );
    let patched = Instant::now();
    let config = common::api::request(&api, "GET", "/vm/config", "").json();
    assert_eq!(
        config["network-interfaces"][0]["tx_rate_limiter"],
        serde_json::json!({"bandwidth": bucket(fast / 10, 100), "ops": ops})
    );
    let arrivals = receiver.join().expect("the receiver panicked").remove(0);
    let run = mote.wait(Duration::from_secs(20));
    assert_clean(&run);
    // Slow: from 0.3 s in (past the first full bucket) to the PATCH. Fast: from the answer on.
    let first = arrivals[0].at;
    let slow_from = arrivals
        .iter()
        .position(|a| a.at >= first + Duration::from_millis(300))
        .unwrap();
    let before: Vec<_> = arrivals.iter().take_while(|a| a.at < patch_sent).collect();
    let after = arrivals.iter().position(|a| a.at > patched).unwrap();
    assert!(
        before.len() > slow_from + 100 && arrivals.len() - after > 100,
        "{} frames before the PATCH, {} after",
        before.len(),
        arrivals.len() - after
    );
    let slow_window = &arrivals[..before.len()];
    let measured_slow = rate_from(slow_window, slow_from, false);
    let measured_fast = rate_from(&arrivals, after, false);
    assert_within("before the PATCH, bytes/s", measured_slow, slow as f64, 0.1);
    assert_within("after the PATCH, bytes/s", measured_fast, fast as f64, 0.1);
}
