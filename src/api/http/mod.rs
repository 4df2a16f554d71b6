//! HTTP/1.1 over a Unix socket, as much of it as Firecracker's clients use: requests with
//! Content-Length bodies, keep-alive, `Expect: 100-continue`, several clients at once on one
//! epoll set. Each complete request goes to a handler; its response is written back in order.
//!
//! What a client sends can never stall the others or end the server: a malformed request is
//! answered with 400 and its connection closed, an oversized body is refused from its headers
//! alone, and a client that disconnects mid-request is forgotten.

mod request;
mod response;

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use request::{parse_request, Parsed};
pub use request::{Request, DEFAULT_MAX_PAYLOAD};
pub use response::Response;

/// More clients than this at once are turned away (each costs buffers and an fd).
const MAX_CONNECTIONS: usize = 64;
const READ_CHUNK: usize = 4096;
/// Epoll data of the listening socket; connections use their fd.
const LISTENER_DATA: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "the API socket path {path} is {len} bytes; a Unix socket path holds at most {max}",
        max = devices::unix_socket::MAX_SOCKET_PATH
    )]
    PathTooLong { path: String, len: usize },
    #[error("cannot bind the API socket {path}: {source}")]
    Bind { path: String, source: io::Error },
    #[error("the API socket's epoll set failed: {0}")]
    Epoll(io::Error),
}

/// One client.
struct Connection {
    stream: UnixStream,
    received: Vec<u8>,
    /// Response bytes not yet written.
    pending: Vec<u8>,
    /// 100 Continue was already sent for the request being received.
    continued: bool,
    /// Close once `pending` is written.
    closing: bool,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            received: Vec::new(),
            pending: Vec::new(),
            continued: false,
            closing: false,
        }
    }

    /// Reads what is there. Ok(false) when the client has gone.
    fn receive(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => self.received.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// Writes what it can of `pending`. Ok(true) when all of it is out.
    fn flush(&mut self) -> io::Result<bool> {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(true)
    }
}

/// The API's HTTP server: owns the listening socket and its clients.
pub struct HttpServer {
    listener: UnixListener,
    epoll: Epoll,
    connections: HashMap<RawFd, Connection>,
    max_payload: usize,
}

impl HttpServer {
    /// Binds `path`, which must not exist (a stale socket is the caller's to remove).
    pub fn bind(path: &Path, max_payload: usize) -> Result<Self, HttpError> {
        // Refused here with its own words: a longer path cannot be connected to.
        let len = path.as_os_str().len();
        if len > devices::unix_socket::MAX_SOCKET_PATH {
            return Err(HttpError::PathTooLong {
                path: path.display().to_string(),
                len,
            });
        }
        let bind_err = |source| HttpError::Bind {
            path: path.display().to_string(),
            source,
        };
        let listener = devices::unix_socket::bind_listening(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(HttpError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_DATA),
            )
            .map_err(HttpError::Epoll)?;
        Ok(Self {
            listener,
            epoll,
            connections: HashMap::new(),
            max_payload,
        })
    }

    /// Serves clients until the epoll set fails; `handler` answers each request in turn.
    pub fn serve(&mut self, handler: &mut dyn FnMut(Request) -> Response) -> HttpError {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let ready = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return HttpError::Epoll(err),
            };
            for event in &events[..ready] {
                if event.data() == LISTENER_DATA {
                    self.accept();
                } else {
                    self.service(event.data() as RawFd, event.event_set(), handler);
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    // Out of fds, for example: the client is dropped, the server goes on.
                    warn!("API: cannot accept a client: {err}");
                    return;
                }
            };
            if self.connections.len() >= MAX_CONNECTIONS {
                warn!("API: more than {MAX_CONNECTIONS} clients at once; turning one away");
                continue;
            }
            let fd = stream.as_raw_fd();
            let registered = stream.set_nonblocking(true).and_then(|()| {
                self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, fd as u64),
                )
            });
            match registered {
                Ok(()) => {
                    self.connections.insert(fd, Connection::new(stream));
                }
                Err(err) => warn!("API: cannot watch a client: {err}"),
            }
        }
    }

    fn close(&mut self, fd: RawFd) {
        if let Some(connection) = self.connections.remove(&fd) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            drop(connection);
        }
    }

    fn service(
        &mut self,
        fd: RawFd,
        events: EventSet,
        handler: &mut dyn FnMut(Request) -> Response,
    ) {
        let alive = match self.progress(fd, events, handler) {
            Ok(alive) => alive,
            Err(err) => {
                debug!("API: client dropped: {err}");
                false
            }
        };
        if !alive {
            self.close(fd);
        }
    }

    /// Reads, answers every complete request, writes. Ok(false) when the connection is done.
    fn progress(
        &mut self,
        fd: RawFd,
        events: EventSet,
        handler: &mut dyn FnMut(Request) -> Response,
    ) -> io::Result<bool> {
        let max_payload = self.max_payload;
        let Some(connection) = self.connections.get_mut(&fd) else {
            return Ok(false);
        };
        let mut open = true;
        if events.contains(EventSet::IN) && !connection.closing {
            open = connection.receive()?;
        }
        while !connection.closing {
            match parse_request(&connection.received, max_payload) {
                Parsed::Incomplete { continue_100 } => {
                    if continue_100 && !connection.continued {
                        connection.continued = true;
                        connection
                            .pending
                            .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    break;
                }
                Parsed::Complete {
                    request,
                    consumed,
                    keep_alive,
                } => {
                    connection.received.drain(..consumed);
                    connection.continued = false;
                    let response = handler(request);
                    connection.pending.extend(response.render(keep_alive));
                    connection.closing = !keep_alive;
                }
                Parsed::Refused(response) => {
                    connection.received.clear();
                    connection.pending.extend(response.render(false));
                    connection.closing = true;
                }
            }
        }
        let written = connection.flush()?;
        if written && (connection.closing || !open) {
            return Ok(false);
        }
        if !open && !written {
            // The client stopped sending but may still read: finish writing, then close.
            connection.closing = true;
        }
        let mut wanted = EventSet::READ_HANG_UP;
        if !connection.closing {
            wanted |= EventSet::IN;
        }
        if !written {
            wanted |= EventSet::OUT;
        }
        self.epoll
            .ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(wanted, fd as u64),
            )
            .map(|()| true)
    }
}

#[cfg(test)]
mod tests;
