//! One client: what it sent and what it is owed, both bounded, and how long it has been in its
//! current state, so that the server can time it out.
//!
//! A connection reads only while it has room: its input holds at most one request (the
//! header limit plus the body limit), and it stops serving requests, and so stops reading, while
//! more than [`MAX_PENDING_OUTPUT`] of answers wait for a client that does not read them. It
//! reads on once its output drains. What it refuses to read waits in the socket, whose kernel
//! buffer is bounded, and the client's writes block.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::request::{max_request_len, parse_request, Parsed, Request};
use super::response::Response;

/// Above this much unwritten output no further request is served (one more answer may go over).
pub(super) const MAX_PENDING_OUTPUT: usize = 16 * 1024;
const READ_CHUNK: usize = 8 * 1024;
/// Buffers that grew past this are given back once empty, so that 64 quiet clients cost little.
const KEEP_CAPACITY: usize = 2 * READ_CHUNK;
/// Read-serve-write rounds in one turn; a client that keeps all three busy then waits for the
/// others' turns.
const ROUNDS_PER_TURN: usize = 8;

/// Requests handed to the handler whose answers have not yet been offered to their sockets.
/// A monitor whose guest ends at once (a probe that resets right after `InstanceStart`) would
/// otherwise exit between its main thread's reply and this thread's write, and the client that
/// started the guest would see the connection close without an answer.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Waits, at most `limit`, until every request handed to the handler has had its answer
/// offered to its socket. For the very end of the process: it yields rather than sleeps.
pub fn wait_for_answers(limit: Duration) {
    let deadline = Instant::now() + limit;
    while IN_FLIGHT.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::yield_now();
    }
}

/// How long a connection may stay in each state before the server closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Between requests, with nothing owed (keep-alive).
    pub idle: Duration,
    /// From the first byte of a request to its last.
    pub request: Duration,
    /// Without a byte of owed output taken by the client.
    pub output: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(30),
            request: Duration::from_secs(5),
            output: Duration::from_secs(10),
        }
    }
}

/// How a turn ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Turn {
    /// Still open; `more` when it stopped with work left that no event will announce.
    Open { more: bool },
    /// Finished: close it.
    Done,
}

pub(super) struct Connection {
    stream: UnixStream,
    received: Vec<u8>,
    /// Response bytes not yet written.
    pending: Vec<u8>,
    /// 100 Continue was already sent for the request being received.
    continued: bool,
    /// No further request is served: the last one ended the connection or was refused.
    closing: bool,
    /// The client shut down its sending side.
    eof: bool,
    /// When the connection last became idle (or was accepted).
    idle_since: Instant,
    /// When the first byte of the request being received came.
    request_since: Option<Instant>,
    /// When owed output was last taken by the client, or first owed.
    output_since: Option<Instant>,
    /// The events the epoll set watches for it.
    pub(super) interest: EventSet,
}

impl Connection {
    pub(super) fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            received: Vec::new(),
            pending: Vec::new(),
            continued: false,
            closing: false,
            eof: false,
            idle_since: Instant::now(),
            request_since: None,
            output_since: None,
            interest: EventSet::IN | EventSet::READ_HANG_UP,
        }
    }

    pub(super) fn stream_nonblocking(&self) -> io::Result<()> {
        self.stream.set_nonblocking(true)
    }

    /// Between requests with nothing owed: the connection to close first when the server is
    /// full.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        let idle = self.received.is_empty() && self.pending.is_empty() && !self.closing;
        idle.then_some(self.idle_since)
    }

    /// When the connection times out in its current state.
    pub(super) fn deadline(&self, timeouts: &Timeouts) -> Instant {
        match (self.output_since, self.request_since) {
            (Some(since), _) => since + timeouts.output,
            (None, Some(since)) => since + timeouts.request,
            (None, None) => self.idle_since + timeouts.idle,
        }
    }

    /// The events to watch: input only while there is room for it (read hang-ups with it: a
    /// half-closed client would otherwise wake the loop until the output drains), output while
    /// some is owed.
    pub(super) fn wanted(&self, max_payload: usize) -> EventSet {
        let mut wanted = EventSet::empty();
        if self.wants_input(max_request_len(max_payload)) {
            wanted |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !self.pending.is_empty() {
            wanted |= EventSet::OUT;
        }
        wanted
    }

    fn wants_input(&self, max_input: usize) -> bool {
        !self.closing
            && !self.eof
            && self.pending.len() < MAX_PENDING_OUTPUT
            && self.received.len() < max_input
    }

    /// Reads, answers every complete request there is room for, writes; a few rounds of that.
    pub(super) fn serve(
        &mut self,
        handler: &mut dyn FnMut(Request) -> Response,
        max_payload: usize,
    ) -> io::Result<Turn> {
        let max_input = max_request_len(max_payload);
        for _ in 0..ROUNDS_PER_TURN {
            let (mut moved, answered) = self.answer(handler, max_payload);
            let io = self.receive_and_flush(max_input);
            IN_FLIGHT.fetch_sub(answered, Ordering::SeqCst);
            moved |= io?;
            if moved && self.received.is_empty() && self.pending.is_empty() {
                self.idle_since = Instant::now();
            }
            if !moved {
                // With room to answer and nothing answered, no complete request is left.
                if self.pending.is_empty() && (self.closing || self.eof) {
                    return Ok(Turn::Done);
                }
                return Ok(Turn::Open { more: false });
            }
        }
        Ok(Turn::Open { more: true })
    }

    /// Reads what it has room for, then writes what the socket takes. Ok(true) when either moved.
    fn receive_and_flush(&mut self, max_input: usize) -> io::Result<bool> {
        let mut moved = false;
        if self.wants_input(max_input) {
            moved |= self.receive(max_input)?;
        }
        Ok(self.flush()? || moved)
    }

    /// Answers the complete requests at the front of the input while the output has room:
    /// whether anything moved, and how many requests the handler answered (counted in
    /// [`IN_FLIGHT`] until the caller has offered them to the socket).
    fn answer(
        &mut self,
        handler: &mut dyn FnMut(Request) -> Response,
        max_payload: usize,
    ) -> (bool, usize) {
        let mut moved = false;
        let mut answered = 0;
        while !self.closing && self.pending.len() < MAX_PENDING_OUTPUT {
            match parse_request(&self.received, max_payload) {
                Parsed::Incomplete { continue_100 } => {
                    if continue_100 && !self.continued {
                        self.continued = true;
                        self.owe(b"HTTP/1.1 100 Continue\r\n\r\n");
                        moved = true;
                    }
                    break;
                }
                Parsed::Complete {
                    request,
                    consumed,
                    keep_alive,
                } => {
                    self.received.drain(..consumed);
                    self.continued = false;
                    // A pipelined request's clock starts when the one before it is done.
                    self.request_since = (!self.received.is_empty()).then(Instant::now);
                    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
                    answered += 1;
                    let response = handler(request);
                    self.owe(&response.render(keep_alive));
                    self.closing = !keep_alive;
                    moved = true;
                }
                Parsed::Refused(response) => {
                    self.received.clear();
                    self.request_since = None;
                    self.owe(&response.render(false));
                    self.closing = true;
                    moved = true;
                }
            }
        }
        if self.received.is_empty() && self.received.capacity() > KEEP_CAPACITY {
            self.received = Vec::new();
        }
        (moved, answered)
    }

    fn owe(&mut self, bytes: &[u8]) {
        if self.pending.is_empty() {
            self.output_since = Some(Instant::now());
        }
        self.pending.extend_from_slice(bytes);
    }

    /// Reads until the socket is empty or the input is full. Ok(true) when it read something
    /// or found the client's end.
    fn receive(&mut self, max_input: usize) -> io::Result<bool> {
        let mut chunk = [0u8; READ_CHUNK];
        let mut moved = false;
        while self.received.len() < max_input {
            let room = (max_input - self.received.len()).min(READ_CHUNK);
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(true);
                }
                Ok(n) => {
                    if self.received.is_empty() {
                        self.request_since = Some(Instant::now());
                    }
                    self.received.extend_from_slice(&chunk[..n]);
                    moved = true;
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(moved)
    }

    /// Writes what the socket takes of the owed output. Ok(true) when it wrote something.
    fn flush(&mut self) -> io::Result<bool> {
        let mut written = 0;
        while written < self.pending.len() {
            match self.stream.write(&self.pending[written..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        if written == 0 {
            return Ok(false);
        }
        self.pending.drain(..written);
        if self.pending.is_empty() {
            self.output_since = None;
            if self.pending.capacity() > KEEP_CAPACITY {
                self.pending = Vec::new();
            }
        } else {
            self.output_since = Some(Instant::now());
        }
        Ok(true)
    }
}
