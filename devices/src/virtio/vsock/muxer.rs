//! Firecracker's host side of vsock: a listener on the `uds` path where host processes connect
//! and say `CONNECT <port>\n` (answered `OK <hostport>\n` once the guest accepts), and, for a
//! guest connecting to host port P, a connection to `<uds>_<P>`. Each stream is a
//! [`Connection`]; this module routes packets to them, decides which one fills the next RX
//! buffer, and keeps the event loop watching exactly the sockets that can make progress.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use log::{debug, warn};

use super::connection::{ConnError, Connection, RxFill, State};
use super::packet::{
    Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, TYPE_STREAM,
};
use crate::metrics::VsockMetrics;

/// Streams open at once (Firecracker's limit); more are refused.
pub const MAX_CONNECTIONS: usize = 1023;
/// Resets waiting for RX buffers. The TX queue stops while this many wait, so a guest that
/// sends faster than it takes answers cannot make the device buffer without bound.
pub const MAX_PENDING_RST: usize = 256;
/// Resets kept at most; beyond it (only a guest that takes no RX buffers while host streams
/// it knows of come and go gets here) a reset is dropped rather than held.
const RST_QUEUE_CAP: usize = MAX_PENDING_RST + MAX_CONNECTIONS;
/// Host ports for host-initiated streams come from [2^30, 2^31), as Firecracker's do.
const LOCAL_PORT_BASE: u32 = 1 << 30;
const LOCAL_PORT_END: u32 = 1 << 31;
/// `CONNECT 4294967295\n` is 19 bytes; anything longer is not a handshake.
const CONNECT_LINE_MAX: usize = 32;

/// A stream as the guest names it: our port and its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// What a watched fd belongs to.
#[derive(Debug, Clone, Copy)]
enum Watched {
    /// A host stream that has not finished its `CONNECT` line.
    Handshake,
    Conn(ConnKey),
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    connections: HashMap<ConnKey, Connection>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Every fd of ours the event loop watches, with the events asked for.
    watched: HashMap<RawFd, (Watched, EventSet)>,
    /// Connections with something for the guest, in the order they get RX buffers.
    rxq: VecDeque<ConnKey>,
    /// Resets for streams that no longer exist (or never did).
    rst_queue: VecDeque<Header>,
    /// Connections whose watched events may need to change.
    dirty: Vec<ConnKey>,
    /// Connections holding guest data from the current TX burst.
    to_flush: Vec<ConnKey>,
    /// Streams closed since the event loop last ran; unwatched before they are dropped.
    closed: Vec<UnixStream>,
    next_local_port: u32,
    metrics: Arc<VsockMetrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("the vsock socket path {0} already exists")]
    PathExists(PathBuf),
    #[error("cannot listen on the vsock socket path {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Muxer {
    /// Listens on `uds_path`, which must not exist yet.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, MuxerError> {
        if uds_path.symlink_metadata().is_ok() {
            return Err(MuxerError::PathExists(uds_path.to_path_buf()));
        }
        let bind_err = |source| MuxerError::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        // Listening before its file appears: a client that waits for the file must not be refused.
        let listener = crate::unix_socket::bind_listening(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            connections: HashMap::new(),
            handshakes: HashMap::new(),
            watched: HashMap::new(),
            rxq: VecDeque::new(),
            rst_queue: VecDeque::new(),
            dirty: Vec::new(),
            to_flush: Vec::new(),
            closed: Vec::new(),
            next_local_port: LOCAL_PORT_BASE,
            metrics,
        })
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The guest's answers are backed up: stop taking TX packets until RX buffers drain them.
    pub fn rx_backlog_full(&self) -> bool {
        self.rst_queue.len() >= MAX_PENDING_RST
    }

    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rxq.is_empty()
    }

    fn schedule(&mut self, key: ConnKey) {
        self.dirty.push(key);
        if let Some(conn) = self.connections.get(&key) {
            if conn.has_rx() && !self.rxq.contains(&key) {
                self.rxq.push_back(key);
            }
        }
    }

    fn queue_rst(&mut self, header: Header) {
        if self.rst_queue.len() >= RST_QUEUE_CAP {
            warn!("vsock: {RST_QUEUE_CAP} resets wait for the guest; dropping one");
            return;
        }
        self.rst_queue.push_back(header);
    }

    fn rst_for(&self, key: ConnKey) -> Header {
        Header {
            src_cid: super::packet::HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        }
    }

    /// Forgets a stream and closes its host socket; true if the guest knew of it.
    fn remove(&mut self, key: ConnKey) -> bool {
        match self.connections.remove(&key) {
            Some(conn) => {
                self.rxq.retain(|k| *k != key);
                let guest_knows = conn.guest_knows();
                self.closed.push(conn.stream);
                guest_knows
            }
            None => false,
        }
    }

    /// Resets a stream: the host socket is closed and the guest, if it knew of it, gets an RST.
    fn kill(&mut self, key: ConnKey, why: &ConnError) {
        debug!("vsock: resetting {key:?}: {why}");
        self.metrics.conns_killed.inc();
        if self.remove(key) {
            self.queue_rst(self.rst_for(key));
        }
    }

    /// Ends a stream both sides finished: an RST tells the guest it is gone.
    fn finish(&mut self, key: ConnKey) {
        self.metrics.conns_removed.inc();
        if self.remove(key) {
            self.queue_rst(self.rst_for(key));
        }
    }

    /// Applies `result` of acting on `key`'s connection: reset on error, close when done.
    fn settle(&mut self, key: ConnKey, result: Result<(), ConnError>) {
        match result {
            Err(err) => self.kill(key, &err),
            Ok(()) if self.connections.get(&key).is_some_and(Connection::is_done) => {
                self.finish(key)
            }
            Ok(()) => self.schedule(key),
        }
    }

    /// Hands a packet from the guest to its stream.
    pub fn send_to_host(&mut self, header: &Header, payload: &[u8]) {
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if header.kind != TYPE_STREAM {
            self.metrics.dropped_packets.inc();
            if header.op != OP_RST {
                self.queue_rst(Header::rst_reply(header));
            }
            return;
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            match header.op {
                OP_REQUEST => self.guest_connect(key, header),
                // A reset for a stream that is gone already: nothing to answer.
                OP_RST => {}
                _ => {
                    self.metrics.dropped_packets.inc();
                    self.queue_rst(Header::rst_reply(header));
                }
            }
            return;
        };
        conn.update_peer_credit(header);
        let result = match header.op {
            OP_RESPONSE => conn.establish(),
            OP_RW => {
                if !self.to_flush.contains(&key) {
                    self.to_flush.push(key);
                }
                conn.send_to_host(payload)
            }
            OP_CREDIT_UPDATE => Ok(()),
            OP_CREDIT_REQUEST => {
                conn.credit_requested();
                Ok(())
            }
            OP_SHUTDOWN => conn.peer_shutdown(header.flags),
            OP_RST => {
                // The guest refused or dropped the stream: the host sees it closed (for a
                // CONNECT, closed without an OK).
                self.metrics.conns_killed.inc();
                self.remove(key);
                return;
            }
            op => Err(ConnError::UnexpectedOp(op)),
        };
        if let Err(ConnError::UnexpectedOp(_)) = &result {
            self.metrics.dropped_packets.inc();
        }
        self.settle(key, result);
    }

    /// Writes the guest data of the TX burst just taken to the host sockets.
    pub fn flush_burst(&mut self) {
        for key in std::mem::take(&mut self.to_flush) {
            if let Some(conn) = self.connections.get_mut(&key) {
                let result = conn.flush();
                self.settle(key, result);
            }
        }
    }

    /// The guest connects to host port `key.local_port`: bridge it to `<uds>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, request: &Header) {
        if self.connections.len() >= MAX_CONNECTIONS {
            warn!(
                "vsock: {MAX_CONNECTIONS} streams open; refusing guest port {}",
                key.peer_port
            );
            self.queue_rst(Header::rst_reply(request));
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        // A Unix socket connect completes or fails at once; it only waits when the listener's
        // backlog is full, and then it is refused here rather than blocking the event loop.
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(err) => {
                debug!(
                    "vsock: guest connect to {}: {err}",
                    Path::new(&path).display()
                );
                self.queue_rst(Header::rst_reply(request));
                return;
            }
        };
        self.metrics.conns_added.inc();
        self.connections
            .insert(key, Connection::guest_initiated(stream, request));
        self.schedule(key);
    }

    /// Takes every host connection waiting on the listener.
    pub fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) => {
                    warn!("vsock: cannot accept a host connection: {err}");
                    return;
                }
            };
            if self.connections.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                warn!("vsock: {MAX_CONNECTIONS} streams open; closing a new host connection");
                continue;
            }
            if let Err(err) = stream.set_nonblocking(true) {
                warn!("vsock: cannot set up a host connection: {err}");
                continue;
            }
            self.handshakes.insert(
                stream.as_raw_fd(),
                Handshake {
                    stream,
                    line: Vec::new(),
                },
            );
        }
    }

    /// Reads a handshake's `CONNECT <port>\n` a byte at a time (so no data after it is taken
    /// early) and turns it into a stream to that guest port.
    fn read_handshake(&mut self, fd: RawFd) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match handshake.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&handshake.line),
                Ok(1) if handshake.line.len() < CONNECT_LINE_MAX => handshake.line.push(byte[0]),
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                // EOF, an error or an overlong line: not a vsock client.
                _ => break None,
            }
        };
        let Some(handshake) = self.handshakes.remove(&fd) else {
            return;
        };
        let Some(peer_port) = port else {
            debug!(
                "vsock: bad handshake {:?}",
                String::from_utf8_lossy(&handshake.line)
            );
            self.closed.push(handshake.stream);
            return;
        };
        let local_port = self.allocate_local_port();
        let key = ConnKey {
            local_port,
            peer_port,
        };
        self.metrics.conns_added.inc();
        self.connections.insert(
            key,
            Connection::host_initiated(handshake.stream, local_port, peer_port, self.guest_cid),
        );
        self.schedule(key);
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = match self.next_local_port + 1 {
                LOCAL_PORT_END => LOCAL_PORT_BASE,
                next => next,
            };
            if !self.connections.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }

    /// An event on one of the host sockets.
    pub fn handle_event(&mut self, fd: RawFd, set: EventSet) {
        match self.watched.get(&fd).map(|(watched, _)| *watched) {
            Some(Watched::Handshake) => self.read_handshake(fd),
            Some(Watched::Conn(key)) => self.conn_event(key, set),
            None => debug!("vsock: event {set:?} on unknown fd {fd}"),
        }
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        let hung_up = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if conn.state == State::LocalInit {
            if hung_up {
                // The host gave up before the guest answered.
                self.kill(
                    key,
                    &ConnError::HostRead(ErrorKind::ConnectionAborted.into()),
                );
            }
            return;
        }
        let mut result = Ok(());
        if set.contains(EventSet::OUT) || hung_up {
            result = conn.flush();
        }
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP) || hung_up {
            // Read when an RX buffer is there to take it; with many streams, in turn.
            conn.host_readable = true;
        }
        self.settle(key, result);
    }

    /// Fills one RX buffer: `payload` is where the data goes (as long as the buffer has room
    /// for). None when no packet came of it.
    pub fn fill_rx(&mut self, payload: &mut [u8]) -> Option<Header> {
        if let Some(rst) = self.rst_queue.pop_front() {
            return Some(rst);
        }
        let key = self.rxq.pop_front()?;
        let conn = self.connections.get_mut(&key)?;
        let result = conn.fill_rx(payload);
        let header = match &result {
            Ok(RxFill::Packet(header)) => Some(*header),
            _ => None,
        };
        self.settle(key, result.map(|_| ()));
        header
    }

    /// Brings the event loop's watch list in line with what each socket can do now.
    pub fn sync_interest(&mut self, ops: &mut EventOps) {
        for stream in self.closed.drain(..) {
            let fd = stream.as_raw_fd();
            if self.watched.remove(&fd).is_some() {
                let _ = ops.remove(Events::new_raw(fd, EventSet::empty()));
            }
        }
        for (fd, handshake) in &self.handshakes {
            if !self.watched.contains_key(fd) {
                match ops.add(Events::new(&handshake.stream, EventSet::IN)) {
                    Ok(()) => {
                        self.watched.insert(*fd, (Watched::Handshake, EventSet::IN));
                    }
                    Err(err) => warn!("vsock: cannot watch a host connection: {err}"),
                }
            }
        }
        for key in std::mem::take(&mut self.dirty) {
            let Some(conn) = self.connections.get(&key) else {
                continue;
            };
            let fd = conn.stream.as_raw_fd();
            let want = conn.interest();
            let have = self.watched.get(&fd).map(|(_, set)| *set);
            let result = match (have, want) {
                (None, None) => continue,
                (Some(have), Some(want)) if have == want && !self.is_handshake(fd) => continue,
                (Some(_), None) => {
                    self.watched.remove(&fd);
                    ops.remove(Events::new_raw(fd, EventSet::empty()))
                }
                (Some(_), Some(want)) => {
                    self.watched.insert(fd, (Watched::Conn(key), want));
                    ops.modify(Events::new_raw(fd, want))
                }
                (None, Some(want)) => {
                    self.watched.insert(fd, (Watched::Conn(key), want));
                    ops.add(Events::new_raw(fd, want))
                }
            };
            if let Err(err) = result {
                warn!("vsock: cannot change what is watched on a host socket: {err}");
            }
        }
    }

    fn is_handshake(&self, fd: RawFd) -> bool {
        matches!(self.watched.get(&fd), Some((Watched::Handshake, _)))
    }

    /// Closes every stream (the driver reset the device): hosts see their sockets close.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.connections.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.rst_queue.clear();
        self.rxq.clear();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The path was ours: leave no stale socket behind for the next monitor.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// The port of a `CONNECT <port>` line.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    port.parse().ok()
}

/// Connects to the Unix socket at `path` without waiting: a listener with a full backlog
/// refuses (EAGAIN) instead of stalling the caller.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() only creates a new fd, which is checked and then owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives the call, and `fd`
    // is a socket the stream owns.
    let ret = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    }
}
