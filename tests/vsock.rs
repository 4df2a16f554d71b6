//! virtio-vsock through the probe guest's polling driver and Firecracker's host-side contract:
//! host processes connect to the `uds` socket and say `CONNECT <port>`, guest connections to
//! host port P reach `<uds>_<P>`. 1 MiB echoes both ways, several streams at once, resets for
//! ports nobody listens on, half-closes in both directions, hostile packets, bad settings
//! refused before boot, and the API's `PUT /vsock`.

mod common;

#[path = "vsock/host.rs"]
mod host;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api::ApiMote;
use common::{mote_bin, probe_kernel, require_kvm, run_mote};
use host::{connect, echo_through, fnv, half_close_echo_server, noise, pattern, WAIT};

const MIB: usize = 1 << 20;

/// A fresh directory for one test's sockets.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("vsock")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `mote run` with the probe and a vsock device, its console watched while the test talks to
/// the sockets; killed when dropped.
struct Guest {
    child: Option<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn collect(pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut text = into.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
}

impl Guest {
    fn boot(steps: &str, uds: &Path) -> Self {
        let probe = probe_kernel();
        let mut child = Command::new(mote_bin())
            .args(["run", "--kernel", probe.to_str().unwrap(), "--append"])
            .arg(format!("probe.run={steps}"))
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", uds.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start mote");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().unwrap(), stdout.clone());
        collect(child.stderr.take().unwrap(), stderr.clone());
        Self {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.stdout.lock().unwrap().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {WAIT:?}\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for the probe to finish its steps and the monitor to exit 0; the console.
    fn finish(mut self) -> String {
        self.wait_for("probe: done");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "mote did not exit\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(status.code(), Some(0), "{}", self.output());
        let out = self.stdout.lock().unwrap().clone();
        assert!(!out.contains("error") && !out.contains("panic"), "{out}");
        out
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn host_streams_echo_a_mebibyte_each_four_at_once() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("host-echo");
    let uds = dir.join("v.sock");
    let guest = Guest::boot("vsock-init,vsock-echo-listen:5000:4", &uds);
    guest.wait_for("probe: vsock: listening port=5000");
    let streams: Vec<_> = (0..4)
        .map(|seed| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let data = noise(MIB, seed);
                let echo = echo_through(&uds, 5000, data.clone());
                assert_eq!(echo.len(), data.len(), "stream {seed}");
                assert!(echo == data, "stream {seed}: the echo differs");
            })
        })
        .collect();
    for stream in streams {
        stream.join().unwrap();
    }
    let out = guest.finish();
    assert!(out.contains("probe: vsock-init cid=3\n"), "{out}");
    assert!(
        out.contains(&format!(
            "probe: vsock-echo-listen conns=4 bytes={}\n",
            4 * MIB
        )),
        "{out}"
    );
    // The device removed its socket when mote exited.
    assert!(!uds.exists());
}

#[test]
fn a_guest_stream_reaches_the_hosts_port_socket_and_half_closes() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("guest-echo");
    let uds = dir.join("v.sock");
    let server = half_close_echo_server(&dir.join("v.sock_6000"));
    let guest = Guest::boot("vsock-init,vsock-connect-echo:6000:1048576", &uds);
    let received = server.join().unwrap();
    let expected: Vec<u8> = (0..MIB as u64).map(pattern).collect();
    assert_eq!(received.len(), MIB);
    assert!(
        received == expected,
        "the host got other bytes than the pattern"
    );
    let out = guest.finish();
    // The guest shut down its sending side first and still received the whole echo.
    assert!(
        out.contains(&format!(
            "probe: vsock-connect-echo bytes={MIB} match=yes checksum={:#018x}\n",
            fnv(&expected)
        )),
        "{out}"
    );
}

#[test]
fn ports_nobody_listens_on_are_reset_both_ways() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("reset");
    let uds = dir.join("v.sock");
    // Guest side: host port 6001 has no `<uds>_6001` listener.
    let guest = Guest::boot(
        "vsock-init,vsock-connect-echo:6001:100,vsock-echo-listen:5000:1",
        &uds,
    );
    guest.wait_for("probe: vsock: listening port=5000");
    // Host side: the guest listens on 5000 only; 7777 is refused without an OK.
    let (_, answer) = connect(&uds, 7777);
    assert_eq!(
        answer, None,
        "a refused stream must close without an answer"
    );
    // Not a vsock client at all: closed too, and the device goes on.
    let mut bogus = UnixStream::connect(&uds).unwrap();
    bogus.write_all(b"HELLO 5000\n").unwrap();
    let mut rest = Vec::new();
    bogus.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(bogus.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(
        echo_through(&uds, 5000, b"still here".to_vec()),
        b"still here"
    );
    let out = guest.finish();
    assert!(out.contains("probe: vsock-connect-echo rst\n"), "{out}");
    assert!(
        out.contains("probe: vsock-echo-listen conns=1 bytes=10\n"),
        "{out}"
    );
}

#[test]
fn hostile_packets_are_dropped_or_reset_and_the_device_goes_on() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("hostile");
    let uds = dir.join("v.sock");
    let server = half_close_echo_server(&dir.join("v.sock_6000"));
    let cases = ["short", "oob", "len", "cid", "unknown", "type", "op"];
    let steps: Vec<String> = cases.iter().map(|c| format!("vsock-hostile:{c}")).collect();
    let guest = Guest::boot(
        &format!(
            "vsock-init,{},vsock-connect-echo:6000:65536",
            steps.join(",")
        ),
        &uds,
    );
    server.join().unwrap();
    let out = guest.finish();
    // Malformed packets are dropped; well-formed ones for no stream get an RST.
    for (case, rst) in [
        ("short", "no"),
        ("oob", "no"),
        ("len", "no"),
        ("cid", "no"),
        ("unknown", "yes"),
        ("type", "yes"),
        ("op", "yes"),
    ] {
        let line = format!("probe: vsock-hostile {case} rst={rst} needs_reset=no\n");
        assert!(out.contains(&line), "want {line:?} in\n{out}");
    }
    assert!(
        out.contains("probe: vsock-connect-echo bytes=65536 match=yes"),
        "{out}"
    );
}

#[test]
fn bad_vsock_settings_are_refused_before_boot() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("bad");
    let probe = probe_kernel();
    let taken = dir.join("taken.sock");
    std::fs::write(&taken, b"").unwrap();
    let long = format!("{}/{}", dir.display(), "s".repeat(120));
    let cases = [
        (
            format!("cid=2,uds={}", dir.join("unused.sock").display()),
            "guest_cid 2 is out of range",
        ),
        (format!("cid=3,uds={long}"), "more than the 107"),
        (format!("cid=3,uds={}", taken.display()), "already exists"),
    ];
    for (spec, message) in cases {
        let run = run_mote(
            &[
                "run",
                "--kernel",
                probe.to_str().unwrap(),
                "--append",
                "probe.run=hello",
                "--vsock",
                &spec,
            ],
            None,
            WAIT,
        );
        assert_eq!(run.status.code(), Some(1), "{spec}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{spec}: {}", run.stderr);
        assert!(!run.stdout.contains("probe:"), "{spec}: the guest ran");
    }
    // The file that was in the way is left alone.
    assert!(taken.is_file());
}

#[test]
fn put_vsock_before_boot_serves_the_guest_and_counts_in_the_metrics() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("vsock", &[]);
    let uds = mote.dir.join("v.sock");
    let metrics = mote.dir.join("metrics.json");
    mote.ok(
        "PUT",
        "/metrics",
        &serde_json::json!({ "metrics_path": metrics }).to_string(),
    );
    mote.ok(
        "PUT",
        "/boot-source",
        &serde_json::json!({
            "kernel_image_path": probe_kernel(),
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off \
                          probe.run=vsock-init,vsock-echo-listen:5000:1,hello,spin",
        })
        .to_string(),
    );
    let fault = mote
        .request(
            "PUT",
            "/vsock",
            &serde_json::json!({"guest_cid": 1, "uds_path": uds}).to_string(),
        )
        .fault();
    assert!(fault.contains("guest_cid 1 is out of range"), "{fault}");
    mote.ok(
        "PUT",
        "/vsock",
        &serde_json::json!({"vsock_id": "vsock0", "guest_cid": 7, "uds_path": uds}).to_string(),
    );
    let config = mote.request("GET", "/vm/config", "").json();
    assert_eq!(
        config["vsock"],
        serde_json::json!({"guest_cid": 7, "uds_path": uds}),
        "{config}"
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote.wait_for_stdout("probe: vsock-init cid=7", WAIT);
    mote.wait_for_stdout("probe: vsock: listening port=5000", WAIT);
    let data = noise(256 * 1024, 9);
    assert!(echo_through(&uds, 5000, data.clone()) == data);
    mote.wait_for_stdout("probe: hello", WAIT);
    let fault = mote
        .request(
            "PUT",
            "/vsock",
            &serde_json::json!({"guest_cid": 8, "uds_path": mote.dir.join("w.sock")}).to_string(),
        )
        .fault();
    assert!(fault.contains("not supported after starting"), "{fault}");

    mote.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let vsock = &line["vsock"];
    assert_eq!(vsock["conns_added"], 1, "{line}");
    assert_eq!(vsock["conns_removed"], 1, "{line}");
    assert_eq!(vsock["tx_bytes_count"], 256 * 1024, "{line}");
    assert_eq!(vsock["rx_bytes_count"], 256 * 1024, "{line}");
    assert_eq!(vsock["invalid_packets"], 0, "{line}");
    assert_eq!(line["put_api_requests"]["vsock_count"], 3, "{line}");
    assert_eq!(line["put_api_requests"]["vsock_fails"], 2, "{line}");
}

/// The host socket listens from `PUT /vsock` on, as Firecracker's does: a client waiting for
/// the file finds it before boot; a second `PUT` on another path moves it, on the same path
/// keeps it; a monitor that ends before boot leaves none behind.
#[test]
fn the_vsock_socket_listens_from_the_put_on() {
    let mote = ApiMote::spawn("vsock-early", &[]);
    let (first, second) = (mote.dir.join("first.sock"), mote.dir.join("second.sock"));
    let put = |uds: &Path, cid: u32| {
        mote.ok(
            "PUT",
            "/vsock",
            &serde_json::json!({"guest_cid": cid, "uds_path": uds}).to_string(),
        )
    };
    put(&first, 3);
    assert!(first.exists(), "no socket after PUT /vsock");
    // It takes connections at once (the guest will answer them once it runs).
    UnixStream::connect(&first).expect("the socket does not listen");
    put(&second, 3);
    assert!(
        second.exists() && !first.exists(),
        "the socket did not move"
    );
    put(&second, 4);
    assert!(second.exists(), "the same path was given up");
    let config = mote.request("GET", "/vm/config", "").json();
    assert_eq!(config["vsock"]["guest_cid"], 4, "{config}");
    let pid = mote.pid();
    common::send_signal(pid, libc::SIGTERM);
    let run = mote.wait(WAIT);
    assert_eq!(
        run.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        run.stderr
    );
    assert!(!second.exists(), "the socket outlived the monitor");
}
