//! One stream between a guest port and a host Unix socket: its handshake state, the credit the
//! two sides give each other (virtio 1.2, 5.10.6.3), and the bounded buffer of guest data the
//! host socket has not taken yet.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::packet::{
    Header, HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV,
    SHUTDOWN_SEND, TYPE_STREAM,
};

/// Bytes of guest data the device holds per connection for a host socket that is slow to read
/// (the `buf_alloc` it advertises): the guest may never have more than this in flight.
pub const TX_BUF_SIZE: u32 = 256 * 1024;
/// Tell the guest about forwarded bytes once this many went unreported, so it never stalls on
/// stale credit while the host reads.
const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUF_SIZE / 4;
/// Room for the `OK <port>\n` line, which goes to the host ahead of guest data.
const CONTROL_MAX: usize = 32;

/// Where the handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host asked for a guest port; REQUEST is sent or pending, no RESPONSE yet.
    LocalInit,
    /// Both sides agreed; data flows.
    Established,
}

/// Control packets waiting for an RX buffer.
const PENDING_REQUEST: u8 = 1;
const PENDING_RESPONSE: u8 = 2;
const PENDING_SHUTDOWN: u8 = 4;
const PENDING_CREDIT_UPDATE: u8 = 8;

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("the guest sent {0} bytes beyond the credit it was given")]
    CreditOverrun(usize),
    #[error("packet op {0} is not valid in this state")]
    UnexpectedOp(u16),
    #[error("cannot write to the host socket: {0}")]
    HostWrite(std::io::Error),
    #[error("cannot read from the host socket: {0}")]
    HostRead(std::io::Error),
}

/// What filling one RX buffer produced.
pub enum RxFill {
    /// A packet of `HDR_LEN + payload` bytes is in the buffer.
    Packet(Header),
    /// Nothing to send after all (the host socket had no data yet).
    Nothing,
}

pub struct Connection {
    pub stream: UnixStream,
    /// The host side's port (the `OK` number for host-initiated streams).
    pub local_port: u32,
    pub peer_port: u32,
    guest_cid: u64,
    pub state: State,
    pending: u8,
    /// Bytes of guest data written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes for the host socket, oldest first: `control_len` bytes of our own, then guest data.
    tx_buf: VecDeque<u8>,
    control_len: usize,
    /// epoll said the host socket has data (or EOF) that we have not read yet.
    pub host_readable: bool,
    /// The host socket reached EOF: the host will send nothing more.
    host_eof: bool,
    /// The guest heard of `host_eof` (our SHUTDOWN went out).
    eof_sent: bool,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    host_write_shut: bool,
}

impl Connection {
    fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        state: State,
    ) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state,
            pending: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_buf: VecDeque::new(),
            control_len: 0,
            host_readable: false,
            host_eof: false,
            eof_sent: false,
            peer_shutdown: 0,
            host_write_shut: false,
        }
    }

    /// A stream the host opened to guest port `peer_port`: a REQUEST goes to the guest.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
    ) -> Self {
        let mut conn = Self::new(stream, local_port, peer_port, guest_cid, State::LocalInit);
        conn.pending = PENDING_REQUEST;
        conn
    }

    /// A stream the guest asked for with `request`, connected to a host listener: a RESPONSE
    /// goes to the guest.
    pub fn guest_initiated(stream: UnixStream, request: &Header) -> Self {
        let mut conn = Self::new(
            stream,
            request.dst_port,
            request.src_port,
            request.src_cid,
            State::Established,
        );
        conn.pending = PENDING_RESPONSE;
        conn.update_peer_credit(request);
        conn
    }

    /// The guest has heard of this stream (our REQUEST went out, or it asked itself): only
    /// then does ending it need an RST.
    pub fn guest_knows(&self) -> bool {
        self.pending & PENDING_REQUEST == 0
    }

    pub fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest that claims to have forwarded more than it got is treated as full.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_host_data(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Something for the guest is waiting for an RX buffer.
    pub fn has_rx(&self) -> bool {
        self.pending != 0 || (self.host_readable && self.wants_host_data())
    }

    /// What to watch the host socket for. LocalInit streams are watched with no events, so a
    /// host that hangs up before the guest answers is still noticed (epoll always reports
    /// hang-ups); None: do not watch it (nothing can be done until the guest acts).
    pub fn interest(&self) -> Option<EventSet> {
        let mut set = EventSet::empty();
        if !self.host_readable && self.wants_host_data() {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        if set.is_empty() && self.state != State::LocalInit {
            None
        } else {
            Some(set)
        }
    }

    /// The guest answered our REQUEST: tell the host its port.
    pub fn establish(&mut self) -> Result<(), ConnError> {
        if self.state != State::LocalInit {
            return Err(ConnError::UnexpectedOp(OP_RESPONSE));
        }
        self.state = State::Established;
        let line = format!("OK {}\n", self.local_port);
        self.tx_buf.extend(line.as_bytes());
        self.control_len = line.len().min(CONTROL_MAX);
        self.flush()
    }

    /// Guest data for the host, held until [`Connection::flush`]: the muxer flushes once per
    /// burst of TX packets, so a burst costs the host socket one write (and its reader one
    /// wake-up) instead of one per packet.
    pub fn send_to_host(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.state != State::Established || self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Err(ConnError::UnexpectedOp(OP_RW));
        }
        let held = self.tx_buf.len() - self.control_len + data.len();
        if held > TX_BUF_SIZE as usize {
            return Err(ConnError::CreditOverrun(held - TX_BUF_SIZE as usize));
        }
        if self.tx_buf.capacity() == 0 {
            // Once, and exactly: the credit the guest got bounds what is ever held.
            self.tx_buf
                .reserve_exact(TX_BUF_SIZE as usize + CONTROL_MAX);
        }
        self.tx_buf.extend(data);
        Ok(())
    }

    /// Writes what the host socket takes of the held bytes.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let (front, back) = self.tx_buf.as_slices();
            match self
                .stream
                .write_vectored(&[IoSlice::new(front), IoSlice::new(back)])
            {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let control = n.min(self.control_len);
                    self.control_len -= control;
                    self.fwd_cnt += Wrapping((n - control) as u32);
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) => return Err(ConnError::HostWrite(err)),
            }
        }
        self.note_forwarded();
        self.shut_host_write_if_done()
    }

    fn note_forwarded(&mut self) {
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= PENDING_CREDIT_UPDATE;
        }
    }

    fn shut_host_write_if_done(&mut self) -> Result<(), ConnError> {
        if self.peer_shutdown & SHUTDOWN_SEND != 0
            && self.tx_buf.is_empty()
            && !self.host_write_shut
        {
            self.host_write_shut = true;
            // The host may have closed already; its end of the stream is gone either way.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    pub fn credit_requested(&mut self) {
        self.pending |= PENDING_CREDIT_UPDATE;
    }

    /// The guest's SHUTDOWN: after what is held reaches the host, the host sees EOF.
    pub fn peer_shutdown(&mut self, flags: u32) -> Result<(), ConnError> {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        self.shut_host_write_if_done()
    }

    /// Both directions are finished and nothing is left to deliver: the stream can close with
    /// an RST to the guest, as the last of the two peers to shut down does.
    pub fn is_done(&self) -> bool {
        let guest_done = self.peer_shutdown & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty();
        let guest_closed = self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND;
        guest_done && (self.eof_sent || guest_closed)
    }

    fn header(&self, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, its payload read from the host socket into
    /// `payload[..max_len]` (an RX buffer's worth).
    pub fn fill_rx(&mut self, payload: &mut [u8]) -> Result<RxFill, ConnError> {
        let header = if self.pending & PENDING_REQUEST != 0 {
            self.pending &= !PENDING_REQUEST;
            self.header(OP_REQUEST, 0, 0)
        } else if self.pending & PENDING_RESPONSE != 0 {
            self.pending &= !PENDING_RESPONSE;
            self.header(OP_RESPONSE, 0, 0)
        } else if self.host_readable && self.wants_host_data() {
            let max = payload.len().min(self.peer_credit() as usize);
            match self.stream.read(&mut payload[..max]) {
                Ok(0) => {
                    self.host_readable = false;
                    self.host_eof = true;
                    self.pending |= PENDING_SHUTDOWN;
                    return Ok(RxFill::Nothing);
                }
                Ok(n) => {
                    // A short read most likely emptied the socket: let epoll say when there is
                    // more rather than trying again at once.
                    self.host_readable = n == max;
                    self.rx_cnt += Wrapping(n as u32);
                    self.header(OP_RW, n as u32, 0)
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return Ok(RxFill::Nothing);
                }
                Err(err) => return Err(ConnError::HostRead(err)),
            }
        } else if self.pending & PENDING_SHUTDOWN != 0 {
            self.pending &= !PENDING_SHUTDOWN;
            self.eof_sent = true;
            // The host stream cannot tell a half close from a full one: the host will send
            // nothing more, and the guest may still send until it shuts down too.
            self.header(OP_SHUTDOWN, 0, SHUTDOWN_SEND)
        } else if self.pending & PENDING_CREDIT_UPDATE != 0 {
            self.header(OP_CREDIT_UPDATE, 0, 0)
        } else {
            return Ok(RxFill::Nothing);
        };
        // Every packet carries our credit.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !PENDING_CREDIT_UPDATE;
        Ok(RxFill::Packet(header))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::packet::OP_RST;

    fn pair() -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let request = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 52,
            kind: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: 1000,
            ..Default::default()
        };
        (Connection::guest_initiated(ours, &request), host)
    }

    fn next(conn: &mut Connection, room: usize) -> Option<(Header, Vec<u8>)> {
        let mut payload = vec![0u8; room];
        match conn.fill_rx(&mut payload).unwrap() {
            RxFill::Packet(h) => Some((h, payload[..h.len as usize].to_vec())),
            RxFill::Nothing => None,
        }
    }

    #[test]
    fn a_guest_request_is_answered_and_data_flows_within_credit() {
        let (mut conn, mut host) = pair();
        let (h, _) = next(&mut conn, 4096).unwrap();
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.buf_alloc),
            (OP_RESPONSE, 52, 1024, TX_BUF_SIZE)
        );
        host.write_all(&[7u8; 3000]).unwrap();
        conn.host_readable = true;
        // The guest gave 1000 bytes of credit.
        let (h, data) = next(&mut conn, 4096).unwrap();
        assert_eq!((h.op, data.len()), (OP_RW, 1000));
        assert!(!conn.has_rx(), "no credit left");
        assert_eq!(conn.interest(), None);
        conn.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 1000,
            ..Default::default()
        });
        assert!(conn.has_rx());
        assert_eq!(next(&mut conn, 4096).unwrap().1.len(), 1000);
    }

    #[test]
    fn guest_data_beyond_its_credit_resets_the_stream() {
        let (mut conn, host) = pair();
        // Nobody reads `host`: the socket fills, then the buffer, then the guest overruns.
        let chunk = vec![1u8; 64 * 1024];
        let mut result = Ok(());
        for _ in 0..64 {
            result = conn.send_to_host(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(ConnError::CreditOverrun(_))));
        assert!(conn.tx_buf.len() <= TX_BUF_SIZE as usize);
        // Held bytes wait for the host socket to drain.
        assert!(conn.interest().unwrap().contains(EventSet::OUT));
        drop(host);
    }

    #[test]
    fn host_eof_becomes_a_shutdown_and_the_stream_ends_when_the_guest_is_done() {
        let (mut conn, host) = pair();
        next(&mut conn, 64).unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        conn.host_readable = true;
        assert!(next(&mut conn, 64).is_none(), "EOF itself sends nothing");
        let (h, _) = next(&mut conn, 64).unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert!(!conn.is_done());
        conn.send_to_host(b"late data").unwrap();
        conn.peer_shutdown(SHUTDOWN_SEND).unwrap();
        assert!(!conn.is_done(), "held data must reach the host first");
        conn.flush().unwrap();
        assert!(conn.is_done());
        let mut got = Vec::new();
        (&host).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"late data");
        assert_ne!(h.op, OP_RST);
    }

    #[test]
    fn forwarded_bytes_are_reported_to_the_guest() {
        let (mut conn, host) = pair();
        next(&mut conn, 64).unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            (&host).read_to_end(&mut all).unwrap();
            all.len()
        });
        conn.send_to_host(&vec![0u8; CREDIT_UPDATE_THRESHOLD as usize])
            .unwrap();
        while !conn.tx_buf.is_empty() {
            conn.flush().unwrap();
        }
        let (h, _) = next(&mut conn, 64).unwrap();
        assert_eq!(
            (h.op, h.fwd_cnt),
            (OP_CREDIT_UPDATE, CREDIT_UPDATE_THRESHOLD)
        );
        drop(conn);
        assert_eq!(reader.join().unwrap(), CREDIT_UPDATE_THRESHOLD as usize);
    }
}
