//! The guest's HTTP requests to MMDS and their answers: requests parsed with `httparse`
//! (bounded: a request longer than [`MAX_REQUEST_LEN`] is answered 413 and its connection
//! closed), answered from the data store in Firecracker's codes and words, HTTP/1.1 with
//! keep-alive (HTTP/1.0 and `Connection: close` end the connection after the answer).

use std::time::Instant;

use super::store::{OutputFormat, StoreError};
use super::{Mmds, MmdsVersion};
use crate::metrics::MMDS_METRICS;

/// The longest request (head and body) a connection holds: metadata requests are a few
/// hundred bytes.
pub const MAX_REQUEST_LEN: usize = 4096;
const MAX_HEADERS: usize = 32;
/// Where a V2 session token is asked for.
pub const TOKEN_PATH: &str = "/latest/api/token";
/// The headers of a session, by Firecracker's names and EC2's.
const TOKEN_HEADERS: [&str; 2] = ["X-metadata-token", "X-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "X-metadata-token-ttl-seconds",
    "X-aws-ec2-metadata-token-ttl-seconds",
];
/// A token request through a proxy is refused (EC2's rule, and Firecracker's).
const REJECTED_HEADER: &str = "X-Forwarded-For";

/// What the bytes a connection received so far come to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet.
    Incomplete,
    /// The answer to the first request, the bytes it took, and whether the connection ends
    /// after the answer.
    Answer {
        response: Vec<u8>,
        consumed: usize,
        close: bool,
    },
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    allow: Option<&'static str>,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain",
            body: body.into(),
            allow: None,
        }
    }

    fn encode(&self, close: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            501 => "Not Implemented",
            _ => "Error",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nServer: mote\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        head.push_str(if close {
            "Connection: close\r\n\r\n"
        } else {
            "Connection: keep-alive\r\n\r\n"
        });
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

/// Answers the first request in `buf`, if it holds a whole one.
pub fn serve(mmds: &mut Mmds, buf: &[u8], now: Instant) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let refuse = |response: Response, consumed: usize| Parsed::Answer {
        response: response.encode(true),
        consumed,
        close: true,
    };
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_LEN => return Parsed::Incomplete,
        Ok(httparse::Status::Partial) => {
            return refuse(Response::text(413, "Request too large."), buf.len())
        }
        Err(err) => {
            return refuse(
                Response::text(400, format!("Invalid request: {err}.")),
                buf.len(),
            )
        }
    };
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if header("Transfer-Encoding").is_some() {
        return refuse(
            Response::text(400, "Invalid request: Transfer-Encoding is not supported."),
            buf.len(),
        );
    }
    let body_len = match header("Content-Length").map(|v| v.parse::<usize>()) {
        None => 0,
        Some(Ok(len)) => len,
        Some(Err(_)) => {
            return refuse(
                Response::text(400, "Invalid header: Content-Length."),
                buf.len(),
            )
        }
    };
    let consumed = match head_len.checked_add(body_len) {
        Some(len) if len <= MAX_REQUEST_LEN => len,
        _ => return refuse(Response::text(413, "Request too large."), buf.len()),
    };
    if buf.len() < consumed {
        return Parsed::Incomplete;
    }
    let connection = header("Connection").map(|v| v.to_ascii_lowercase());
    let close = match request.version {
        Some(1) => connection.as_deref() == Some("close"),
        _ => connection.as_deref() != Some("keep-alive"),
    };
    let method = request.method.unwrap_or("");
    let response = match request.path.and_then(abs_path) {
        None => Response::text(400, "Invalid URI."),
        Some(path) => answer(mmds, method, &path, &header, now),
    };
    Parsed::Answer {
        response: response.encode(close),
        consumed,
        close,
    }
}

/// The path of a request target (origin form, or absolute form `http://host/path`), without
/// query or fragment, with runs of `/` made one. None when there is no path.
fn abs_path(target: &str) -> Option<String> {
    let path = match target.strip_prefix("http://") {
        Some(rest) => &rest[rest.find('/')?..],
        None => target,
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return None;
    }
    let mut clean = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && clean.ends_with('/')) {
            clean.push(c);
        }
    }
    Some(clean)
}

fn answer(
    mmds: &mut Mmds,
    method: &str,
    path: &str,
    header: &dyn Fn(&str) -> Option<String>,
    now: Instant,
) -> Response {
    let first = |names: &[&str]| names.iter().find_map(|name| header(name));
    match (method, mmds.version) {
        ("GET", MmdsVersion::V1) => get(mmds, path, header),
        ("GET", MmdsVersion::V2) => match first(&TOKEN_HEADERS) {
            None => {
                MMDS_METRICS.rx_no_token.inc();
                Response::text(
                    401,
                    "No MMDS token provided. Use `X-metadata-token` header to specify the session token.",
                )
            }
            Some(token) if !mmds.tokens.is_valid(&token, now) => {
                MMDS_METRICS.rx_invalid_token.inc();
                Response::text(401, "MMDS token not valid.")
            }
            Some(_) => get(mmds, path, header),
        },
        // V1 gives tokens too (a V2 client works against it); it never asks for them.
        ("PUT", _) => {
            if header(REJECTED_HEADER).is_some() {
                return Response::text(
                    400,
                    format!(
                        "Invalid header. Reason: Unsupported header name. Key: {REJECTED_HEADER}"
                    ),
                );
            }
            if path != TOKEN_PATH {
                return Response::text(404, format!("Resource not found: {path}."));
            }
            let Some(ttl) = first(&TTL_HEADERS) else {
                return Response::text(
                    400,
                    "Token time to live value not found. Use `X-metadata-token-ttl-seconds` header to specify the token's lifetime.",
                );
            };
            let Ok(ttl) = ttl.parse::<u32>() else {
                return Response::text(
                    400,
                    format!(
                        "Invalid header. Reason: Invalid value. Key:{}; Value:{ttl}",
                        TTL_HEADERS[0]
                    ),
                );
            };
            match mmds.tokens.generate(ttl, now) {
                Ok(token) => Response::text(200, token),
                Err(err) => Response::text(400, err.to_string()),
            }
        }
        _ => Response {
            allow: Some("GET, PUT"),
            ..Response::text(405, "Not allowed HTTP method.")
        },
    }
}

fn get(mmds: &Mmds, path: &str, header: &dyn Fn(&str) -> Option<String>) -> Response {
    let wants_json = header("Accept").is_some_and(|accept| accept.contains("application/json"));
    let format = if wants_json && !mmds.imds_compat {
        OutputFormat::Json
    } else {
        OutputFormat::Imds
    };
    match mmds.store.get(path, format) {
        Ok(body) => Response {
            content_type: match format {
                OutputFormat::Json => "application/json",
                OutputFormat::Imds => "text/plain",
            },
            ..Response::text(200, body)
        },
        Err(StoreError::NotFound) => Response::text(404, format!("Resource not found: {path}.")),
        Err(err) => Response::text(501, err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mmds(version: MmdsVersion) -> Mmds {
        let mut mmds = Mmds::new(4096);
        mmds.set_options(version, false);
        mmds.store
            .put(json!({"latest": {"meta-data": {"id": "i-1", "n": 3}}}))
            .unwrap();
        mmds
    }

    fn ask(mmds: &mut Mmds, request: &str) -> (String, bool) {
        match serve(mmds, request.as_bytes(), Instant::now()) {
            Parsed::Answer {
                response,
                consumed,
                close,
            } => {
                assert_eq!(consumed, request.len());
                (String::from_utf8(response).unwrap(), close)
            }
            Parsed::Incomplete => panic!("incomplete: {request}"),
        }
    }

    fn body(response: &str) -> &str {
        response.split_once("\r\n\r\n").unwrap().1
    }

    #[test]
    fn v1_answers_get_as_json_or_imds_by_accept() {
        let mut mmds = mmds(MmdsVersion::V1);
        let (r, close) = ask(
            &mut mmds,
            "GET /latest/meta-data/id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: application/json"), "{r}");
        assert_eq!(body(&r), "\"i-1\"");
        assert!(!close);
        let (r, _) = ask(
            &mut mmds,
            "GET http://169.254.169.254//latest//meta-data/ HTTP/1.1\r\n\r\n",
        );
        assert_eq!(body(&r), "id\nn");
        assert!(r.contains("Content-Type: text/plain"), "{r}");
        let (r, close) = ask(&mut mmds, "GET /latest/meta-data/n HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 501"), "{r}");
        assert!(close);
        let (r, _) = ask(&mut mmds, "GET /nope?x=1 HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 404") && body(&r) == "Resource not found: /nope.",
            "{r}"
        );
        let (r, _) = ask(&mut mmds, "DELETE / HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 405") && r.contains("Allow: GET, PUT"),
            "{r}"
        );
        // imds_compat: text whatever the client accepts.
        mmds.set_options(MmdsVersion::V1, true);
        let (r, _) = ask(
            &mut mmds,
            "GET /latest/meta-data/id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        );
        assert_eq!(body(&r), "i-1");
    }

    #[test]
    fn v2_needs_a_valid_token() {
        let mut mmds = mmds(MmdsVersion::V2);
        let (r, _) = ask(&mut mmds, "GET /latest/meta-data/id HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 401") && body(&r).starts_with("No MMDS token"),
            "{r}"
        );
        let (r, _) = ask(
            &mut mmds,
            "GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: bogus\r\n\r\n",
        );
        assert_eq!(body(&r), "MMDS token not valid.");
        let (r, _) = ask(&mut mmds, "PUT /latest/api/token HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 400") && body(&r).starts_with("Token time to live"),
            "{r}"
        );
        let (r, _) = ask(
            &mut mmds,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n",
        );
        assert!(body(&r).contains("between 1 and 21600"), "{r}");
        let (r, _) = ask(
            &mut mmds,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let (r, _) = ask(
            &mut mmds,
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 2\r\n\r\nhi",
        );
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let token = body(&r).to_string();
        let (r, _) = ask(
            &mut mmds,
            &format!("GET /latest/meta-data/id HTTP/1.1\r\nx-metadata-token: {token}\r\n\r\n"),
        );
        assert_eq!(body(&r), "i-1");
    }

    #[test]
    fn partial_oversized_and_malformed_requests() {
        let mut mmds = mmds(MmdsVersion::V1);
        let now = Instant::now();
        assert_eq!(
            serve(&mut mmds, b"GET / HTTP/1.1\r\n", now),
            Parsed::Incomplete
        );
        assert_eq!(
            serve(
                &mut mmds,
                b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
                now
            ),
            Parsed::Incomplete
        );
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_LEN));
        let (r, close) = ask(&mut mmds, &long);
        assert!(r.starts_with("HTTP/1.1 413") && close, "{r}");
        let (r, close) = ask(&mut mmds, "GET / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 413") && close, "{r}");
        let (r, close) = ask(&mut mmds, "\x01\x02 garbage\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400") && close, "{r}");
        let (r, _) = ask(&mut mmds, "GET nopath HTTP/1.1\r\n\r\n");
        assert_eq!(body(&r), "Invalid URI.");
        // Two pipelined requests: the first is answered, the rest stays.
        let two = b"GET /latest HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        match serve(&mut mmds, two, now) {
            Parsed::Answer { consumed, .. } => assert_eq!(consumed, 24),
            other => panic!("{other:?}"),
        }
    }
}
