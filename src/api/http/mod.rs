//! HTTP/1.1 over a Unix socket, as much of it as Firecracker's clients use: requests with
//! Content-Length bodies, keep-alive, `Expect: 100-continue`, several clients at once on one
//! epoll set. Each complete request goes to a handler; its response is written back in order.
//!
//! What a client sends, or does not read, can never stall the others, grow the server without
//! bound, or end it: a malformed request is answered with 400 and its connection closed, an
//! oversized body is refused from its headers alone, a client that does not read its answers
//! is not read from either (`connection.rs`), a connection idle or stalled too long is closed,
//! and when all [`MAX_CONNECTIONS`] are taken the one idle the longest makes room for a new
//! client, or else the new client gets 503.

mod connection;
mod request;
mod response;

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use devices::log_limit::{held_back_note, LogLimiter};
use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub use connection::{wait_for_answers, Timeouts};
use connection::{Connection, Turn};
pub use request::{Request, DEFAULT_MAX_PAYLOAD};
pub use response::Response;

/// More clients than this at once cost buffers and fds; when all are busy, a new one gets 503.
pub const MAX_CONNECTIONS: usize = 64;
/// Epoll data of the listening socket; connections use their fd.
const LISTENER_DATA: u64 = u64::MAX;
/// At most one line per this long about clients turned away or failed accepts: a connect flood
/// must not become a log flood.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

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

/// The API's HTTP server: owns the listening socket and its clients.
pub struct HttpServer {
    listener: UnixListener,
    epoll: Epoll,
    connections: HashMap<RawFd, Connection>,
    max_payload: usize,
    timeouts: Timeouts,
    /// Connections whose last turn ended with work left, served again before the next wait.
    again: Vec<RawFd>,
    refusal_log: LogLimiter,
    accept_error_log: LogLimiter,
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
            timeouts: Timeouts::default(),
            again: Vec::new(),
            refusal_log: LogLimiter::new(REFUSAL_LOG_INTERVAL),
            accept_error_log: LogLimiter::new(REFUSAL_LOG_INTERVAL),
        })
    }

    /// Other time-outs than the defaults (the tests' short ones).
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Serves clients until the epoll set fails; `handler` answers each request in turn.
    pub fn serve(&mut self, handler: &mut dyn FnMut(Request) -> Response) -> HttpError {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let ready = match self.epoll.wait(self.wait_ms(), &mut events) {
                Ok(n) => n,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return HttpError::Epoll(err),
            };
            for event in &events[..ready] {
                if event.data() == LISTENER_DATA {
                    self.accept(handler);
                } else {
                    self.service(event.data() as RawFd, handler);
                }
            }
            for fd in std::mem::take(&mut self.again) {
                self.service(fd, handler);
            }
            self.expire(handler);
        }
    }

    /// How long the next wait may take: until the first connection's time-out.
    fn wait_ms(&self) -> i32 {
        if !self.again.is_empty() {
            return 0;
        }
        let Some(first) = self
            .connections
            .values()
            .map(|c| c.deadline(&self.timeouts))
            .min()
        else {
            return -1;
        };
        let wait = first.saturating_duration_since(Instant::now());
        // Rounded up, so that the loop wakes after the deadline rather than just before it.
        i32::try_from(wait.as_millis() + 1).unwrap_or(i32::MAX)
    }

    fn accept(&mut self, handler: &mut dyn FnMut(Request) -> Response) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    // Out of fds, for example: the client is dropped, the server goes on.
                    if let Some(held_back) = self.accept_error_log.allow() {
                        warn!(
                            "API: cannot accept a client: {err}{}",
                            held_back_note(held_back)
                        );
                    }
                    return;
                }
            };
            if self.connections.len() >= MAX_CONNECTIONS && !self.evict_idle(handler) {
                self.refuse(stream);
                continue;
            }
            let fd = stream.as_raw_fd();
            let connection = Connection::new(stream);
            let registered = connection.stream_nonblocking().and_then(|()| {
                self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(connection.interest, fd as u64),
                )
            });
            match registered {
                Ok(()) => {
                    self.connections.insert(fd, connection);
                }
                Err(err) => warn!("API: cannot watch a client: {err}"),
            }
        }
    }

    /// Closes the connection idle the longest to make room for a new client; false when none
    /// is idle. Each candidate is served first: one whose request has just come is not idle.
    fn evict_idle(&mut self, handler: &mut dyn FnMut(Request) -> Response) -> bool {
        let mut idle: Vec<(Instant, RawFd)> = self
            .connections
            .iter()
            .filter_map(|(fd, c)| Some((c.idle_since()?, *fd)))
            .collect();
        idle.sort_unstable();
        for (_, fd) in idle {
            self.service(fd, handler);
            match self.connections.get(&fd) {
                None => return true,
                Some(connection) if connection.idle_since().is_some() => {
                    debug!(
                        "API: all {MAX_CONNECTIONS} connections taken; closing the longest idle"
                    );
                    self.close(fd);
                    return true;
                }
                Some(_) => {}
            }
        }
        false
    }

    /// Answers a client the server has no room for with 503 and closes it.
    fn refuse(&mut self, stream: UnixStream) {
        let answer = Response::fault(
            503,
            &format!(
                "the API serves at most {MAX_CONNECTIONS} clients at once and none is idle; \
                 try again later"
            ),
        );
        if stream.set_nonblocking(true).is_ok() {
            // What the client has sent is read (and dropped) first: a socket closed with
            // unread input resets its peer, which may then miss the answer.
            let mut sent = [0u8; 1024];
            let _ = (&stream).read(&mut sent);
            // A fresh socket's buffer takes the whole answer in one write.
            let _ = (&stream).write(&answer.render(false));
        }
        if let Some(held_back) = self.refusal_log.allow() {
            warn!(
                "API: {MAX_CONNECTIONS} clients at once, none idle: answered a new one 503{}",
                held_back_note(held_back)
            );
        }
    }

    /// Closes the connections whose time-out passed, each served once more first: the loop
    /// may have been busy (a long request) while it had something to read or write.
    fn expire(&mut self, handler: &mut dyn FnMut(Request) -> Response) {
        let now = Instant::now();
        let expired: Vec<RawFd> = self
            .connections
            .iter()
            .filter(|(_, c)| c.deadline(&self.timeouts) <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in expired {
            self.service(fd, handler);
            let timeouts = &self.timeouts;
            if let Some(connection) = self.connections.get(&fd) {
                if connection.deadline(timeouts) <= Instant::now() {
                    debug!("API: closing a client that was idle or stalled too long");
                    self.close(fd);
                }
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

    /// Gives a connection a turn, then watches it for what it waits for, or closes it.
    fn service(&mut self, fd: RawFd, handler: &mut dyn FnMut(Request) -> Response) {
        let max_payload = self.max_payload;
        let Some(connection) = self.connections.get_mut(&fd) else {
            return;
        };
        let turn = match connection.serve(handler, max_payload) {
            Ok(turn) => turn,
            Err(err) => {
                debug!("API: client dropped: {err}");
                Turn::Done
            }
        };
        match turn {
            Turn::Done => self.close(fd),
            Turn::Open { more } => {
                if more {
                    self.again.push(fd);
                }
                let wanted = connection.wanted(max_payload);
                if wanted != connection.interest {
                    let watched = self.epoll.ctl(
                        ControlOperation::Modify,
                        fd,
                        EpollEvent::new(wanted, fd as u64),
                    );
                    connection.interest = wanted;
                    if let Err(err) = watched {
                        debug!("API: cannot watch a client: {err}");
                        self.close(fd);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
