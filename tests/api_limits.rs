//! What the API's HTTP server does with clients that ask too much of it, driven over the
//! socket of a real `mote --api-sock`: a Content-Length that can be read two ways is refused.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::api::{read_answer, ApiMote};

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
