//! What the server answers, rendered as HTTP/1.1.

/// What the handler answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// A JSON document, or nothing (204).
    pub body: Option<String>,
    /// The request used a form Firecracker deprecated: the answer carries its
    /// `Deprecation: true` header.
    pub deprecated: bool,
}

impl Response {
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
            deprecated: false,
        }
    }

    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            body: Some(body),
            deprecated: false,
        }
    }

    /// Firecracker's error shape: `{"fault_message": "..."}`.
    pub fn fault(status: u16, message: &str) -> Self {
        Self::json(
            status,
            serde_json::json!({ "fault_message": message }).to_string(),
        )
    }

    fn reason(&self) -> &'static str {
        match self.status {
            100 => "Continue",
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "",
        }
    }

    pub(super) fn render(&self, keep_alive: bool) -> Vec<u8> {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: mote API\r\nConnection: {connection}\r\n",
            self.status,
            self.reason()
        );
        if self.deprecated {
            out.push_str("Deprecation: true\r\n");
        }
        match &self.body {
            Some(body) => {
                out.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ));
            }
            None if self.status == 204 => out.push_str("\r\n"),
            None => out.push_str("Content-Length: 0\r\n\r\n"),
        }
        out.into_bytes()
    }
}
