//! Network namespaces for the virtio-net tests: one per test, with its TAPs, the monitor and
//! the host's end of the traffic (ping, a packet socket on the TAP) inside it, removed when the
//! test ends, on a panic too. Also the probe's bulk-frame format (tests/probe/src/net.rs).

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const ETH_HLEN: usize = 14;
pub const BULK_HLEN: usize = 10;
pub const ETHERTYPE_BULK: u16 = 0x88b5;
pub const KIND_DATA: u8 = 1;
pub const KIND_CREDIT: u8 = 2;

/// True when this process may make network namespaces and TAPs (root); otherwise says why the
/// test is skipped, on both streams.
pub fn require_root() -> bool {
    // SAFETY: geteuid only reads the process's effective user id.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    println!("SKIPPED: {test} needs root for a network namespace and a TAP");
    eprintln!("SKIPPED: {test} needs root for a network namespace and a TAP");
    false
}

/// A network namespace of this test's own, deleted on drop.
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(args)
        .output()
        .expect("cannot run ip (install iproute2)")
}

impl Netns {
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "mote-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let out = ip(&["netns", "add", &name]);
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        let out = ip(&full);
        assert!(
            out.status.success(),
            "ip {full:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A persistent TAP `name`, up, with `addr` (CIDR) when given.
    pub fn add_tap(&self, name: &str, addr: Option<&str>) {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        if let Some(addr) = addr {
            self.ip(&["addr", "add", addr, "dev", name]);
        }
        self.ip(&["link", "set", name, "up"]);
    }

    /// Waits until TAP `name` has its carrier, which comes when mote attaches to it (through
    /// the kernel's link watch, up to a second later): until then frames sent to it are dropped.
    pub fn wait_for_carrier(&self, name: &str) {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let out = ip(&["-n", &self.name, "link", "show", name]);
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("LOWER_UP") && text.contains("state UP") {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{name} never got its carrier");
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs `args` inside the namespace and waits for it.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("cannot run ip netns exec");
        Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        }
    }

    /// Starts `args` inside the namespace, in the background.
    pub fn spawn(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run ip netns exec")
    }

    /// Starts mote (`args`) inside the namespace, its output collected line by line.
    pub fn spawn_mote(&self, args: &[String]) -> Mote {
        let ns = File::open(self.path()).expect("cannot open the namespace");
        let mut command = Command::new(env!("CARGO_BIN_EXE_mote"));
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let fd = ns.as_raw_fd();
        // SAFETY: between fork and exec the child only calls setns, which is async-signal-safe;
        // `ns` stays open in the parent until spawn returns.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("cannot start mote");
        drop(ns);
        let (lines_tx, lines) = channel();
        let stdout = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                all.push_str(&line);
                all.push('\n');
                let _ = lines_tx.send(line);
            }
            all
        });
        let mut stderr_pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            let _ = stderr_pipe.read_to_string(&mut all);
            all
        });
        Mote {
            child,
            lines,
            stdout: Some(stdout),
            stderr: Some(stderr),
            started: Instant::now(),
        }
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens belong to it).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = File::open(path).expect("cannot open the namespace");
            // SAFETY: setns moves only this thread, which exists to run `f`, into the namespace.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its TAPs too.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
}

/// A running mote.
pub struct Mote {
    child: Child,
    lines: Receiver<String>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    started: Instant,
}

impl Mote {
    /// Waits for a line containing `text` on mote's stdout.
    pub fn wait_for_line(&self, text: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line with {text:?} from mote within {timeout:?}"),
            }
        }
    }

    /// Waits for mote to end (killing it after `timeout`) and returns what it printed.
    pub fn wait(mut self, timeout: Duration) -> super::common::Run {
        let end = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "mote did not end within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout.take().unwrap().join().unwrap(),
                    self.stderr.take().unwrap().join().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        super::common::Run {
            status,
            stdout: self.stdout.take().unwrap().join().unwrap(),
            stderr: self.stderr.take().unwrap().join().unwrap(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Mote {
    fn drop(&mut self) {
        // A test that failed before waiting must not leave mote running.
        if self.stdout.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A raw packet socket on a TAP inside a namespace: the host's end of the guest's link.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    pub fn open(ns: &Netns, ifname: &str) -> Self {
        let ifname = ifname.to_string();
        let fd = ns.within(move || {
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket takes no pointers; the fd is owned at once below.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
            assert!(
                raw >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `raw` is a new fd nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let name = std::ffi::CString::new(ifname.clone()).unwrap();
            // SAFETY: if_nametoindex reads the NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(index, 0, "no interface {ifname} in the namespace");
            // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = index as i32;
            // SAFETY: bind reads `size_of::<sockaddr_ll>()` bytes from `addr`.
            let ret = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
            // Room for a whole 10 MiB transfer, so the host never drops the guest's frames.
            let size: libc::c_int = 256 << 20;
            // SAFETY: setsockopt reads one int from `size`.
            let ret = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            assert_eq!(
                ret,
                0,
                "SO_RCVBUFFORCE: {}",
                std::io::Error::last_os_error()
            );
            fd
        });
        Self { fd }
    }

    /// One frame the TAP delivered or sent, waiting up to `timeout`.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> Option<usize> {
        let mut pollfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd it is given.
        let ready = unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as i32) };
        if ready <= 0 {
            return None;
        }
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
        let len = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (len > 0).then_some(len as usize)
    }

    /// Sends `frame` out of the TAP, to the guest.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: send reads `frame.len()` bytes from `frame`.
        let len = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            len,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Attaches to TAP `name` the way mote would, so that mote finds it busy.
pub fn attach_tap(ns: &Netns, name: &str) -> File {
    let name = name.to_string();
    ns.within(move || {
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("cannot open /dev/net/tun");
        // struct ifreq: the name, then the flags (IFF_TAP | IFF_NO_PI).
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        req[16..18].copy_from_slice(&(0x0002u16 | 0x1000).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes the 40-byte ifreq.
        let ret = unsafe { libc::ioctl(tun.as_raw_fd(), 0x4004_54ca, req.as_mut_ptr()) };
        assert_eq!(ret, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        tun
    })
}

/// Byte `i` of bulk frame `seq`'s payload (tests/probe/src/net.rs).
pub fn bulk_byte(seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(131) as usize ^ i.wrapping_mul(7) ^ (i >> 8)) as u8
}

/// Writes a bulk frame's Ethernet and bulk headers.
pub fn bulk_frame(buf: &mut [u8], dst: &[u8; 6], src: &[u8; 6], kind: u8, seq: u32, count: u32) {
    buf[0..6].copy_from_slice(dst);
    buf[6..12].copy_from_slice(src);
    buf[12..14].copy_from_slice(&ETHERTYPE_BULK.to_be_bytes());
    buf[14] = kind;
    buf[15] = 0;
    buf[16..20].copy_from_slice(&seq.to_le_bytes());
    buf[20..24].copy_from_slice(&count.to_le_bytes());
}

/// A bulk frame's kind and sequence number.
pub fn parse_bulk(frame: &[u8]) -> Option<(u8, u32)> {
    if frame.len() < ETH_HLEN + BULK_HLEN || frame[12..14] != ETHERTYPE_BULK.to_be_bytes() {
        return None;
    }
    Some((
        frame[14],
        u32::from_le_bytes([frame[16], frame[17], frame[18], frame[19]]),
    ))
}

/// The probe's checksum: FNV-1a over the payloads in sequence order.
pub mod fnv {
    pub fn new() -> u64 {
        0xcbf2_9ce4_8422_2325
    }

    pub fn add(sum: &mut u64, bytes: &[u8]) {
        for byte in bytes {
            *sum = (*sum ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The number after `name=` in a `probe: …` line.
pub fn parse_field(line: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&key))
        .and_then(|value| value.parse().ok())
}
