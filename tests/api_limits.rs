//! What the API's HTTP server does with clients that ask too much of it, driven over the
//! socket of a real `mote --api-sock`: a client that pipelines requests and never reads the
//! answers is not read either (the monitor does not grow), 64 idle or stalled clients do not
//! lock the others out (the longest idle makes room, stalled ones time out, a refused client
//! gets 503 and the log one line), and a Content-Length that can be read two ways is refused.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::api::{read_answer, ApiMote};

/// The server's limit on clients at once (src/api/http/mod.rs).
const MAX_CONNECTIONS: usize = 64;
/// Its time-out for a request that has started but not finished (src/api/http/connection.rs).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).expect("connecting to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Whether the server closed `stream` (read returns 0 or a reset) within its read time-out.
fn closed_by_server(stream: &mut UnixStream) -> bool {
    let mut buf = [0u8; 512];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => err.kind() == ErrorKind::ConnectionReset,
    }
}

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A client that pipelines requests and never reads the answers: the monitor stops reading
/// from it (its writes block) instead of buffering answers without bound, serves everyone
/// else meanwhile, and reads on, answering every request in order, once the client reads.
#[test]
fn a_client_that_does_not_read_its_answers_is_not_read_from_either() {
    let mote = ApiMote::spawn("pipelined-unread", &[]);
    let rss_before = resident_kib(mote.pid());
    let request = b"GET /version HTTP/1.1\r\n\r\n";
    const GIVE_UP: usize = 4 << 20;
    let requests = request.repeat(GIVE_UP / request.len());
    let mut greedy = connect(&mote.socket);
    greedy.set_nonblocking(true).unwrap();
    let mut sent = 0;
    let mut blocked_since: Option<Instant> = None;
    while sent < requests.len() {
        match greedy.write(&requests[sent..]) {
            Ok(n) => {
                sent += n;
                blocked_since = None;
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(err) => panic!("writing the requests: {err}"),
        }
    }
    assert!(
        sent < 1 << 20,
        "mote read {sent} bytes of requests whose answers nobody reads (resident: {} KiB, \
         {rss_before} KiB before)",
        resident_kib(mote.pid())
    );
    let rss_after = resident_kib(mote.pid());
    assert!(
        rss_after < rss_before + 4096,
        "resident {rss_before} KiB before, {rss_after} KiB after"
    );
    // Everyone else is served meanwhile.
    assert_eq!(mote.request("GET", "/", "").status, 200);

    // The client reads: every request it sent is answered, in order, the cut one too.
    greedy.set_nonblocking(false).unwrap();
    let expected = sent.div_ceil(request.len());
    let mut reader = greedy.try_clone().unwrap();
    let answers = std::thread::spawn(move || {
        let pattern = b"HTTP/1.1 200 OK\r\n";
        let (mut seen, mut window, mut chunk) = (0, Vec::new(), [0u8; 65536]);
        while seen < expected {
            let n = reader.read(&mut chunk).expect("reading the answers");
            assert!(n > 0, "closed after {seen} of {expected} answers");
            window.extend_from_slice(&chunk[..n]);
            seen += window
                .windows(pattern.len())
                .filter(|w| w == pattern)
                .count();
            let keep = window.len().min(pattern.len() - 1);
            window.drain(..window.len() - keep);
        }
        (seen, reader)
    });
    greedy
        .write_all(&requests[sent..expected * request.len()])
        .unwrap();
    let (seen, mut reader) = answers.join().unwrap();
    assert_eq!(seen, expected);
    greedy.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_answer(&mut reader).status, 200);
}

/// All 64 connections idle (a pool of keep-alive clients, or someone who connects and waits):
/// a new client still gets in, in place of the one idle the longest.
#[test]
fn when_every_connection_is_idle_the_longest_idle_makes_room() {
    let mote = ApiMote::spawn("all-idle", &[]);
    let mut idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| connect(&mote.socket))
        .collect();
    // Each of them has been served once, so the server has surely taken them all.
    for stream in &mut idle {
        stream.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_answer(stream).status, 200);
    }
    let answer = mote.request("GET", "/", "");
    assert_eq!(answer.status, 200, "{answer:?}\n{}", mote.stderr());
    assert!(closed_by_server(&mut idle[0]), "the oldest idle client");
    // The others are still served.
    idle[1].write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_answer(&mut idle[1]).status, 200);
}

/// All 64 connections stalled mid-request (slowloris): a new client gets 503 with a
/// fault_message, a flood of them costs one log line, and once the stalled requests time out
/// their connections are closed and clients are served again.
#[test]
fn when_every_connection_is_stalled_new_clients_get_503_until_the_stalled_time_out() {
    let mote = ApiMote::spawn("all-stalled", &[]);
    let mut stalled: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut stream = connect(&mote.socket);
            stream.write_all(b"GET / HTTP/1.1\r\nHost: x").unwrap();
            stream
        })
        .collect();
    let started = Instant::now();
    // The server has read them all once the last one is taken (they are accepted in order).
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..200 {
        let mut refused = connect(&mote.socket);
        let _ = refused.write_all(b"GET / HTTP/1.1\r\n\r\n");
        let answer = read_answer(&mut refused);
        assert_eq!(answer.status, 503, "{answer:?}");
        let fault = answer.json()["fault_message"].as_str().unwrap().to_string();
        assert!(fault.contains("64 clients"), "{fault}");
    }
    let refusals = mote
        .stderr()
        .lines()
        .filter(|l| l.contains("answered a new one 503"))
        .count();
    assert_eq!(refusals, 1, "{}", mote.stderr());

    // The stalled requests time out (with no answer: they never were requests).
    for stream in &mut stalled {
        assert!(
            closed_by_server(stream),
            "a stalled request outlived its time-out"
        );
    }
    let waited = started.elapsed();
    assert!(
        waited >= REQUEST_TIMEOUT - Duration::from_millis(500) && waited < REQUEST_TIMEOUT * 2,
        "closed after {waited:?}"
    );
    assert_eq!(mote.request("GET", "/", "").status, 200);
}

/// Sends `raw` on a new connection and returns the answer and whether the server then closed
/// the connection.
fn exchange(socket: &Path, raw: &[u8]) -> (common::api::Answer, bool) {
    let mut stream = connect(socket);
    stream.write_all(raw).unwrap();
    let answer = read_answer(&mut stream);
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let closed = closed_by_server(&mut stream);
    (answer, closed)
}

/// A body length that can be read two ways is how requests are smuggled past a proxy: two
/// Content-Length headers that disagree (the first used to win, and the rest of the body ran
/// as a second request) and a signed one are refused; identical ones are one length.
#[test]
fn conflicting_or_malformed_content_lengths_are_refused() {
    let mote = ApiMote::spawn("content-length", &[]);
    let smuggled = b"GET /version HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 31\r\n\r\n\
                     GET /machine-config HTTP/1.1\r\n\r\n";
    let (answer, closed) = exchange(&mote.socket, smuggled);
    assert!(
        answer.fault().contains("conflicting Content-Length"),
        "{answer:?}"
    );
    assert!(closed, "the smuggled request was served");

    let body = r#"{"vcpu_count": 2, "mem_size_mib": 64}"#;
    let put = |lengths: &[&str]| {
        let mut raw = String::from("PUT /machine-config HTTP/1.1\r\n");
        for length in lengths {
            raw.push_str(&format!("Content-Length: {length}\r\n"));
        }
        raw.push_str("\r\n");
        raw.push_str(body);
        exchange(&mote.socket, raw.as_bytes())
    };
    let len = body.len().to_string();
    for bad in [
        vec![format!("+{len}")],
        vec![format!("{len}"), format!("{}", body.len() - 1)],
        vec![format!("{len}, {}", body.len() + 1)],
        vec![format!("0x{:x}", body.len())],
        vec![String::new()],
    ] {
        let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
        let (answer, closed) = put(&bad);
        assert!(
            answer.fault().contains("Content-Length"),
            "{bad:?}: {answer:?}"
        );
        assert!(closed, "{bad:?}");
    }
    // The same length twice, or as a list, is one length (RFC 9110 §8.6).
    for same in [
        vec![len.as_str(), len.as_str()],
        vec![&*format!("{len}, {len}")],
    ] {
        let (answer, closed) = put(&same);
        assert_eq!(answer.status, 204, "{same:?}: {answer:?}");
        assert!(!closed, "{same:?}");
    }
}
