//! The host's side of Firecracker's vsock contract, for the tests that talk to a guest's
//! vsock device (tests/vsock.rs, tests/snapshot.rs): `CONNECT <port>` on the device's socket,
//! echoes through the probe, a listener for the guest's streams, the probe's pattern and
//! checksum.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// How long a host stream waits for the guest.
pub const WAIT: Duration = Duration::from_secs(30);

/// The probe's stream pattern (tests/probe/src/vsock/wire.rs).
pub fn pattern(offset: u64) -> u8 {
    ((offset as u32).wrapping_mul(2_654_435_761) >> 24) as u8 ^ (offset >> 16) as u8
}

/// The probe's checksum: FNV-1a, 64 bits.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Bytes that are not a simple pattern, different for each `seed`.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Connects to the device's socket and asks for guest port `port`: the stream and the answer
/// line (None when the stream closed without one).
pub fn connect(uds: &Path, port: u32) -> (UnixStream, Option<String>) {
    let mut stream = UnixStream::connect(uds).expect("connecting to the vsock socket");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return (stream, None),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(err) if err.kind() == ErrorKind::ConnectionReset => return (stream, None),
            Err(err) => panic!("reading the CONNECT answer: {err}"),
        }
    }
    (stream, Some(String::from_utf8(line).unwrap()))
}

/// Sends `data` on a stream to an echoing guest port, half-closes, and reads the echo to a
/// clean EOF.
pub fn echo_through(uds: &Path, port: u32, data: Vec<u8>) -> Vec<u8> {
    let (stream, answer) = connect(uds, port);
    let answer = answer.expect("the guest did not accept the stream");
    let host_port: u32 = answer
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad answer {answer:?}"));
    assert!(host_port >= 1 << 30, "{answer}");
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut echo = Vec::new();
    (&stream)
        .read_to_end(&mut echo)
        .expect("the echo ends in a clean EOF, not a reset");
    sender.join().unwrap();
    echo
}

/// Listens on `path` for one stream: reads all of it to EOF (the guest's half-close), then
/// sends it all back and closes. Returns what it received.
pub fn half_close_echo_server(path: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut all = Vec::new();
        stream.read_to_end(&mut all).unwrap();
        stream.write_all(&all).unwrap();
        all
    })
}
