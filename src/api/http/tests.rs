use super::request::{parse_request, Parsed, MAX_HEADER_BYTES};
use super::*;
use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

fn complete(buf: &[u8]) -> (Request, usize, bool) {
    match parse_request(buf, DEFAULT_MAX_PAYLOAD) {
        Parsed::Complete {
            request,
            consumed,
            keep_alive,
        } => (request, consumed, keep_alive),
        other => panic!("{other:?}"),
    }
}

fn refused(buf: &[u8], max: usize) -> String {
    match parse_request(buf, max) {
        Parsed::Refused(response) => {
            assert_eq!(response.status, 400);
            response.body.unwrap()
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_request_with_a_body_parses_and_keeps_the_connection() {
    let raw = b"PUT /machine-config?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\n{}\r\nGET";
    let (request, consumed, keep_alive) = complete(raw);
    assert_eq!(request.method, "PUT");
    assert_eq!(request.path, "/machine-config");
    assert_eq!(request.body, b"{}\r\n");
    assert_eq!(consumed, raw.len() - 3);
    assert!(keep_alive);
}

#[test]
fn partial_requests_wait_for_more() {
    assert_eq!(
        parse_request(b"GET / HTTP/1.1\r\nHost:", DEFAULT_MAX_PAYLOAD),
        Parsed::Incomplete {
            continue_100: false
        }
    );
    let raw = b"PUT /drives/a HTTP/1.1\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n{";
    assert_eq!(
        parse_request(raw, DEFAULT_MAX_PAYLOAD),
        Parsed::Incomplete { continue_100: true }
    );
}

#[test]
fn connection_close_and_http_10_end_the_connection() {
    let (_, _, keep_alive) = complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(!keep_alive);
    let (_, _, keep_alive) = complete(b"GET / HTTP/1.0\r\n\r\n");
    assert!(!keep_alive);
}

#[test]
fn oversized_bodies_are_refused_from_the_headers() {
    let body = refused(b"PUT / HTTP/1.1\r\nContent-Length: 51201\r\n\r\n", 51_200);
    assert!(body.contains("larger than the limit of 51200"), "{body}");
}

#[test]
fn garbage_and_unsupported_framing_are_refused() {
    assert!(refused(b"\x00\x01garbage\r\n\r\n", 100).contains("malformed"));
    assert!(
        refused(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 100)
            .contains("Transfer-Encoding")
    );
    assert!(
        refused(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 100).contains("Content-Length")
    );
    let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEADER_BYTES));
    assert!(refused(long.as_bytes(), 100).contains("headers are longer"));
}

#[test]
fn responses_render_with_their_length() {
    let out = Response::fault(400, "bad \"x\"").render(true);
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("Connection: keep-alive\r\n"));
    assert!(text.ends_with("\r\n\r\n{\"fault_message\":\"bad \\\"x\\\"\"}"));
    assert!(text.contains("Content-Length: 29\r\n"), "{text}");
    let text = String::from_utf8(Response::no_content().render(false)).unwrap();
    assert_eq!(
        text,
        "HTTP/1.1 204 No Content\r\nServer: mote API\r\nConnection: close\r\n\r\n"
    );
}

/// The socket file appears listening, under its own name only, and never replaces a file.
#[test]
fn the_socket_file_appears_listening_and_never_replaces_a_file() {
    let dir = std::env::temp_dir().join(format!("mote-http-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    let server = HttpServer::bind(&path, 64).unwrap();
    UnixStream::connect(&path).expect("the file exists, so it must answer");
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(names, ["api.sock"]);
    drop(server);

    let taken = dir.join("taken");
    std::fs::write(&taken, b"keep me").unwrap();
    let err = HttpServer::bind(&taken, 64).err().unwrap().to_string();
    assert!(err.contains("taken") && err.contains("in use"), "{err}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A whole exchange over a real socket: keep-alive, a pipelined pair, a client that leaves
/// mid-request, and one that sends garbage, while another is served.
#[test]
fn serves_clients_over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("mote-http-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("api.sock");
    let _ = std::fs::remove_file(&path);
    let mut server = HttpServer::bind(&path, 64).unwrap();
    std::thread::spawn(move || {
        server
            .serve(&mut |request| Response::json(200, format!("{{\"path\":\"{}\"}}", request.path)))
    });
    let read_response = |stream: &mut UnixStream| {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        while !String::from_utf8_lossy(&buf).contains('}') {
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8(buf).unwrap()
    };
    let mut idle = UnixStream::connect(&path).unwrap();
    idle.write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        .unwrap();
    {
        let mut gone = UnixStream::connect(&path).unwrap();
        gone.write_all(b"PUT /y HTTP/1.1\r\nContent-Le").unwrap();
    }
    let mut garbage = UnixStream::connect(&path).unwrap();
    garbage.write_all(b"\x16\x03\x01 not http\r\n\r\n").unwrap();
    let answer = read_response(&mut garbage);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let mut client = UnixStream::connect(&path).unwrap();
    client
        .write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut both = read_response(&mut client);
    if !both.contains("/b") {
        both += &read_response(&mut client);
    }
    assert!(both.contains("{\"path\":\"/a\"}") && both.contains("{\"path\":\"/b\"}"));
    client.write_all(b"GET /c HTTP/1.1\r\n\r\n").unwrap();
    assert!(read_response(&mut client).contains("/c"));
    drop(idle);
    let _ = std::fs::remove_dir_all(&dir);
}

fn body_len(headers: &str) -> Result<usize, String> {
    let raw = format!("PUT / HTTP/1.1\r\n{headers}\r\n{}", "x".repeat(64));
    match parse_request(raw.as_bytes(), 1024) {
        Parsed::Complete { request, .. } => Ok(request.body.len()),
        Parsed::Refused(response) => Err(response.body.unwrap()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn content_length_is_digits_and_several_must_agree() {
    assert_eq!(body_len("Content-Length: 37\r\n"), Ok(37));
    assert_eq!(body_len("Content-Length:\t 37 \r\n"), Ok(37));
    assert_eq!(
        body_len("content-length: 5\r\nContent-Length: 5\r\n"),
        Ok(5)
    );
    assert_eq!(body_len("Content-Length: 5, 5\r\n"), Ok(5));
    assert_eq!(body_len("Content-Length: 007\r\n"), Ok(7));
    assert_eq!(body_len(""), Ok(0));
    for conflicting in [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5, 6\r\n",
        "Content-Length: 0\r\nContent-Length: 37\r\n",
    ] {
        let fault = body_len(conflicting).unwrap_err();
        assert!(fault.contains("conflicting Content-Length"), "{fault}");
    }
    for malformed in [
        "+37",
        "-1",
        "3 7",
        "0x25",
        "37a",
        "",
        "5,",
        ",5",
        "1e3",
        "٣",
        "99999999999999999999999",
    ] {
        let fault = body_len(&format!("Content-Length: {malformed}\r\n")).unwrap_err();
        assert!(
            fault.contains("invalid Content-Length"),
            "{malformed:?}: {fault}"
        );
    }
}

#[test]
fn headers_over_the_limit_are_refused_even_when_they_come_whole() {
    let raw = format!(
        "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(MAX_HEADER_BYTES)
    );
    assert!(refused(raw.as_bytes(), 100).contains("headers are longer"));
}

/// A server on its own thread with `timeouts`; its socket path.
fn serve_with(name: &str, timeouts: Timeouts) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mote-http-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    let mut server = HttpServer::bind(&path, 1024)
        .unwrap()
        .with_timeouts(timeouts);
    std::thread::spawn(move || server.serve(&mut |_| Response::json(200, "{}".into())));
    path
}

/// How long until the server closes `stream` (read returns 0 or a reset).
fn time_to_close(stream: &mut UnixStream) -> Duration {
    let started = std::time::Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(err) if err.kind() == ErrorKind::ConnectionReset => return started.elapsed(),
            Err(err) => panic!("not closed: {err}"),
        }
    }
}

const SHORT: Duration = Duration::from_millis(300);

#[test]
fn an_idle_keep_alive_connection_is_closed_after_its_time_out() {
    let path = serve_with(
        "idle",
        Timeouts {
            idle: SHORT,
            ..Timeouts::default()
        },
    );
    let mut client = UnixStream::connect(&path).unwrap();
    // Requests closer together than the time-out keep it open.
    for _ in 0..4 {
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = [0u8; 256];
        assert!(client.read(&mut answer).unwrap() > 0);
        std::thread::sleep(SHORT / 2);
    }
    let waited = time_to_close(&mut client);
    assert!(waited < SHORT + Duration::from_millis(200), "{waited:?}");
}

#[test]
fn a_request_stalled_midway_is_closed_after_its_time_out() {
    let path = serve_with(
        "stalled",
        Timeouts {
            request: SHORT,
            ..Timeouts::default()
        },
    );
    let mut client = UnixStream::connect(&path).unwrap();
    client
        .write_all(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        .unwrap();
    // Bytes that trickle in do not extend it: the whole request has the time-out.
    std::thread::sleep(SHORT / 2);
    client.write_all(b"\"a").unwrap();
    let waited = time_to_close(&mut client);
    assert!(waited < SHORT, "{waited:?}");
}

#[test]
fn a_client_that_does_not_take_its_answers_is_closed_after_its_time_out() {
    let path = serve_with(
        "unread",
        Timeouts {
            output: SHORT,
            ..Timeouts::default()
        },
    );
    let mut client = UnixStream::connect(&path).unwrap();
    client.set_nonblocking(true).unwrap();
    let requests = b"GET / HTTP/1.1\r\n\r\n".repeat(20_000);
    let mut sent = 0;
    let started = std::time::Instant::now();
    // Writing stops working once the server stops reading, and fails once it has closed.
    loop {
        match client.write(&requests[sent % requests.len()..]) {
            Ok(n) => sent += n,
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => break,
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still open after {sent} bytes"
        );
    }
    assert!(started.elapsed() >= SHORT, "{:?}", started.elapsed());
}
