//! One HTTP/1.1 request from the front of what a client sent: the request line and headers
//! (httparse), the body's length from its Content-Length, and whether the connection stays
//! open after it. Anything that could be read two ways is refused, since two readings of one
//! request (ours and a proxy's) are how requests are smuggled.

use super::response::Response;

/// Firecracker's default limit on a request body (`--http-api-max-payload-size`).
pub const DEFAULT_MAX_PAYLOAD: usize = 51_200;
/// The most a request line and its headers may take.
pub(super) const MAX_HEADER_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without a query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// Where parsing the bytes received so far got to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed {
    /// More bytes are needed; `continue_100` asks the client to send its body.
    Incomplete { continue_100: bool },
    /// A whole request, `consumed` bytes long, and whether the connection stays open after it.
    Complete {
        request: Request,
        consumed: usize,
        keep_alive: bool,
    },
    /// Answer this and close the connection.
    Refused(Response),
}

/// The most bytes an incomplete request can take: a request that is still [`Parsed::Incomplete`]
/// is always shorter, so a connection never needs to hold more than this of its input.
pub(super) fn max_request_len(max_payload: usize) -> usize {
    MAX_HEADER_BYTES + max_payload
}

fn header_value<'a>(headers: &'a [httparse::Header], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The body's length (RFC 9110 §8.6: `Content-Length = 1*DIGIT`). Several headers, or a list
/// in one, are accepted only when every value is the same; a sign, an empty value or any other
/// character never (`+37` would otherwise parse as 37).
fn content_length(headers: &[httparse::Header]) -> Result<usize, &'static str> {
    let mut length = None;
    let values = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .flat_map(|h| h.value.split(|b| *b == b','));
    for value in values {
        let value = trim_ows(value);
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return Err("invalid Content-Length header: it must be decimal digits only");
        }
        let parsed = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or("invalid Content-Length header: the value is out of range")?;
        match length {
            Some(earlier) if earlier != parsed => {
                return Err("conflicting Content-Length headers: the body's length is ambiguous")
            }
            _ => length = Some(parsed),
        }
    }
    Ok(length.unwrap_or(0))
}

/// Strips optional white space (space and tab) from both ends of a header value's element.
fn trim_ows(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// Parses one request from the front of `buf`.
pub(super) fn parse_request(buf: &[u8], max_payload: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let too_long = || {
        Parsed::Refused(Response::fault(
            400,
            &format!("the request's headers are longer than {MAX_HEADER_BYTES} bytes"),
        ))
    };
    let header_len = match request.parse(buf) {
        // Also when they came whole: the limit is on what the server holds, not on reads.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEADER_BYTES => return too_long(),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEADER_BYTES => return too_long(),
        Ok(httparse::Status::Partial) => {
            return Parsed::Incomplete {
                continue_100: false,
            }
        }
        Err(err) => {
            return Parsed::Refused(Response::fault(
                400,
                &format!("malformed HTTP request: {err}"),
            ))
        }
    };
    let method = request.method.unwrap_or_default().to_string();
    let target = request.path.unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let headers = request.headers;

    if header_value(headers, "transfer-encoding").is_some() {
        return Parsed::Refused(Response::fault(
            400,
            "Transfer-Encoding is not supported: send a Content-Length",
        ));
    }
    let body_len = match content_length(headers) {
        Ok(len) => len,
        Err(reason) => return Parsed::Refused(Response::fault(400, reason)),
    };
    if body_len > max_payload {
        // Firecracker's wording; the body is never read.
        return Parsed::Refused(Response::fault(
            400,
            &format!(
                "Request payload with size {body_len} is larger than the limit of \
                 {max_payload} allowed by server."
            ),
        ));
    }
    if buf.len() - header_len < body_len {
        let expects_continue = header_value(headers, "expect")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
        return Parsed::Incomplete {
            continue_100: expects_continue,
        };
    }
    let http_10 = request.version == Some(0);
    let connection = header_value(headers, "connection");
    let keep_alive = match connection {
        Some(v) if v.eq_ignore_ascii_case(b"close") => false,
        Some(v) if v.eq_ignore_ascii_case(b"keep-alive") => true,
        _ => !http_10,
    };
    Parsed::Complete {
        request: Request {
            method,
            path,
            body: buf[header_len..header_len + body_len].to_vec(),
        },
        consumed: header_len + body_len,
        keep_alive,
    }
}
