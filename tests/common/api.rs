//! A monitor driven through its API: spawns `mote --api-sock …`, talks HTTP/1.1 to the socket,
//! and watches the guest's console as it runs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{mote_bin, Run};

/// One HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The status line and the headers, as sent.
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {:?}", self.body))
    }

    /// The fault message of a 400.
    pub fn fault(&self) -> String {
        assert_eq!(self.status, 400, "expected a 400, got {self:?}");
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {:?}", self.body))
            .to_string()
    }
}

/// Reads one HTTP response (status line, headers, Content-Length body) from `stream`.
pub fn read_answer(stream: &mut UnixStream) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line: {head:?}"));
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).expect("reading the answer");
                assert!(n > 0, "the API closed mid-answer: {head:?}");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).to_string();
            return Answer { status, head, body };
        }
        let n = stream.read(&mut chunk).expect("reading the answer");
        assert!(n > 0, "the API closed without answering");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends one request on a new connection and reads the answer.
pub fn request(socket: &Path, method: &str, path: &str, body: &str) -> Answer {
    let mut stream = UnixStream::connect(socket).expect("connecting to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(raw.as_bytes()).unwrap();
    read_answer(&mut stream)
}

/// Waits up to `timeout` for the API socket at `path` (it appears once it accepts connections);
/// on failure the message ends with `context()`.
pub fn wait_for_socket(path: &Path, timeout: Duration, context: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "no API socket at {} after {timeout:?}; {}",
            path.display(),
            context()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends a request that must succeed with 204.
pub fn ok(socket: &Path, method: &str, path: &str, body: &str) {
    let answer = request(socket, method, path, body);
    assert_eq!(answer.status, 204, "{method} {path} {body}: {answer:?}");
}

/// Pauses the guest of the monitor at `socket` and writes a full snapshot of it into `dir`;
/// returns (state file, memory file).
pub fn pause_and_snapshot(socket: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    ok(socket, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    let body = serde_json::json!({
        "snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem,
    });
    ok(socket, "PUT", "/snapshot/create", &body.to_string());
    (state, mem)
}

/// A running `mote --api-sock` process; killed when dropped.
pub struct ApiMote {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    started: Instant,
}

fn collect(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
}

impl ApiMote {
    /// Starts `mote --api-sock DIR/api.sock EXTRA…` in a fresh scratch directory `name`, and
    /// waits until the socket exists. Its log goes to stderr (`--log-path /dev/stderr`, levels
    /// and origins shown) unless `extra` names a log path: Firecracker's default, stdout, would
    /// mix it into the console these tests read.
    pub fn spawn(name: &str, extra: &[&str]) -> Self {
        let log_to_stderr: &[&str] = if extra.contains(&"--log-path") {
            &[]
        } else {
            &[
                "--log-path",
                "/dev/stderr",
                "--show-level",
                "--show-log-origin",
            ]
        };
        Self::spawn_command(name, |socket| {
            let mut command = Command::new(mote_bin());
            command
                .arg("--api-sock")
                .arg(socket)
                .args(log_to_stderr)
                .args(extra);
            command
        })
    }

    /// Starts `mote run ARGS… --api-sock DIR/api.sock` (a restore, `args` naming the
    /// snapshot) in a fresh scratch directory `name`, and waits until the socket exists; its
    /// log goes to stderr, as `mote run`'s does.
    pub fn spawn_run(name: &str, args: &[&std::ffi::OsStr]) -> Self {
        Self::spawn_command(name, |socket| {
            let mut command = Command::new(mote_bin());
            command.arg("run").args(args).arg("--api-sock").arg(socket);
            command
        })
    }

    fn spawn_command(name: &str, command: impl FnOnce(&Path) -> Command) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("api")
            .join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let mut child = command(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start mote");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().unwrap(), stdout.clone());
        collect(child.stderr.take().unwrap(), stderr.clone());
        let mote = Self {
            dir,
            socket,
            child: Some(child),
            stdout,
            stderr,
            started: Instant::now(),
        };
        wait_for_socket(&mote.socket, Duration::from_secs(10), || {
            format!("stderr:\n{}", mote.stderr())
        });
        mote
    }

    pub fn request(&self, method: &str, path: &str, body: &str) -> Answer {
        request(&self.socket, method, path, body)
    }

    /// Sends a request that must succeed with 204.
    pub fn ok(&self, method: &str, path: &str, body: &str) {
        let answer = self.request(method, path, body);
        assert_eq!(
            answer.status,
            204,
            "{method} {path} {body}: {answer:?}\nstderr:\n{}",
            self.stderr()
        );
    }

    /// Pauses the guest and snapshots it into the scratch directory: (state file, memory file).
    pub fn pause_and_snapshot(&self) -> (PathBuf, PathBuf) {
        pause_and_snapshot(&self.socket, &self.dir)
    }

    /// Boots the probe with `steps` in `mem_mib` MiB and one vCPU, with a balloon (0 MiB,
    /// deflate on OOM) when `balloon`.
    pub fn boot_probe(&self, steps: &str, mem_mib: u32, balloon: bool) {
        let boot_source = serde_json::json!({
            "kernel_image_path": super::probe_kernel(),
            "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
        });
        self.ok("PUT", "/boot-source", &boot_source.to_string());
        let machine = serde_json::json!({"vcpu_count": 1, "mem_size_mib": mem_mib});
        self.ok("PUT", "/machine-config", &machine.to_string());
        if balloon {
            self.ok(
                "PUT",
                "/balloon",
                r#"{"amount_mib": 0, "deflate_on_oom": true}"#,
            );
        }
        self.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    }

    /// Boots the probe with `steps` in 256 MiB with a balloon (0 MiB, deflate on OOM), waits
    /// for the probe's first `balloon: waiting target=0`, and snapshots it: the state and
    /// memory files, in this monitor's directory.
    pub fn ballooned_probe_snapshot(&self, steps: &str) -> (PathBuf, PathBuf) {
        self.boot_probe(steps, 256, true);
        self.wait_for_stdout(
            "probe: balloon: waiting target=0 actual=0",
            Duration::from_secs(60),
        );
        self.pause_and_snapshot()
    }

    /// Boots the pattern probe of the lazy-restore tests ([`super::pattern`]) in 64 MiB: it
    /// writes its patterns from `seed`, waits for a key, then reads them back one page at a
    /// time, says hello and spins. Snapshotted at the key wait: the state and memory files, in
    /// this monitor's directory.
    pub fn pattern_probe_snapshot(&self, seed: u64) -> (PathBuf, PathBuf) {
        use super::pattern::{AT_KIB, PAGES, STRIDE};
        let peeks: Vec<String> = (0..PAGES)
            .map(|page| format!("peek:{}:1:{seed}", AT_KIB + page * STRIDE * 4))
            .collect();
        let steps = format!(
            "poke:{AT_KIB}:{PAGES}:{seed}:{STRIDE},kbd:8,{},hello,spin",
            peeks.join(",")
        );
        self.boot_probe(&steps, 64, false);
        self.wait_for_stdout("probe: kbd: waiting", Duration::from_secs(20));
        self.pause_and_snapshot()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until the console shows `text`.
    pub fn wait_for_stdout(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout();
            if out.contains(text) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} on the console within {timeout:?}:\n{out}\nstderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Waits for the process to end by itself.
    pub fn wait(mut self, timeout: Duration) -> Run {
        let mut child = self.child.take().unwrap();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if self.started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "mote did not end within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        // The pipes close with the process; give the readers a moment to take the rest.
        std::thread::sleep(Duration::from_millis(20));
        Run {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for ApiMote {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A failing test shows what the monitor said, whichever assertion failed.
            if std::thread::panicking() {
                eprintln!(
                    "mote's exit: {:?}\nmote's stderr:\n{}",
                    child.try_wait(),
                    self.stderr()
                );
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
