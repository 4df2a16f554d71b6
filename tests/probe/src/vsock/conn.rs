//! The probe's side of one stream: what it does with the stream, its credit and its counts.

use super::echo_buf;
use super::wire::{pattern, Fnv};

/// Each connection's receive window: an echo connection keeps what it has not sent back.
pub const ECHO_BUF: usize = 64 * 1024;
/// The window a sink or a checking client advertises: it consumes data as it arrives.
const STREAM_WINDOW: u32 = 1 << 20;

/// What a connection does with its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends back everything it receives; shuts down once the peer did and all went back.
    Echo,
    /// Counts and drops what it receives.
    Sink,
    /// Sends `total` bytes of the pattern, then shuts down; checks that what comes back is the
    /// pattern too.
    Check { total: u64 },
    /// Sends `total` bytes (the pattern's first TX buffer, again and again) and drops replies.
    Source { total: u64 },
}

#[derive(Clone, Copy)]
pub struct Conn {
    pub(super) in_use: bool,
    pub(super) role: Role,
    pub(super) local_port: u32,
    pub(super) peer_port: u32,
    pub(super) established: bool,
    /// The peer reset the stream: it is over.
    pub(super) reset: bool,
    pub(super) peer_shutdown: u32,
    pub(super) shutdown_sent: bool,
    pub(super) need_response: bool,
    pub(super) need_credit_update: bool,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// Bytes sent and received, and received bytes consumed (sent back, dropped or checked).
    pub(super) tx_cnt: u32,
    pub(super) rx_cnt: u32,
    pub(super) fwd_cnt: u32,
    pub(super) last_fwd_cnt_sent: u32,
    /// Total bytes received, the first offset whose byte did not match, and their checksum.
    pub(super) received: u64,
    pub(super) mismatch: Option<u64>,
    pub(super) checksum: u64,
    pub(super) sent: u64,
    /// The echo ring: `echo_len` bytes from `echo_head`.
    pub(super) echo_head: usize,
    pub(super) echo_len: usize,
}

pub const IDLE_CONN: Conn = Conn {
    in_use: false,
    role: Role::Sink,
    local_port: 0,
    peer_port: 0,
    established: false,
    reset: false,
    peer_shutdown: 0,
    shutdown_sent: false,
    need_response: false,
    need_credit_update: false,
    peer_buf_alloc: 0,
    peer_fwd_cnt: 0,
    tx_cnt: 0,
    rx_cnt: 0,
    fwd_cnt: 0,
    last_fwd_cnt_sent: 0,
    received: 0,
    mismatch: None,
    checksum: Fnv::new().0,
    sent: 0,
    echo_head: 0,
    echo_len: 0,
};

impl Conn {
    pub fn window(&self) -> u32 {
        match self.role {
            Role::Echo => ECHO_BUF as u32,
            _ => STREAM_WINDOW,
        }
    }

    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Finished: reset by the peer (the host side resets a stream both sides shut down).
    pub fn finished(&self) -> bool {
        self.reset
    }
}

/// What a finished connection saw.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub received: u64,
    pub sent: u64,
    pub matched: bool,
    pub checksum: u64,
    pub established: bool,
}

/// Takes `payload` into connection `index`.
pub fn receive(conn: &mut Conn, index: usize, payload: &[u8]) {
    conn.rx_cnt = conn.rx_cnt.wrapping_add(payload.len() as u32);
    let offset = conn.received;
    conn.received += payload.len() as u64;
    match conn.role {
        Role::Echo => {
            // The host may not send beyond the window; what does not fit is dropped and the
            // echo will not match, which the test sees.
            let room = ECHO_BUF - conn.echo_len;
            let take = payload.len().min(room);
            let ring = echo_buf(index);
            for (i, b) in payload[..take].iter().enumerate() {
                ring[(conn.echo_head + conn.echo_len + i) % ECHO_BUF] = *b;
            }
            conn.echo_len += take;
            if take < payload.len() && conn.mismatch.is_none() {
                conn.mismatch = Some(offset + take as u64);
            }
        }
        Role::Check { .. } => {
            // Only a checking client reports a checksum: a sink must not be slowed by one.
            let mut fnv = Fnv(conn.checksum);
            fnv.update(payload);
            conn.checksum = fnv.0;
            if conn.mismatch.is_none() {
                if let Some(at) =
                    (0..payload.len()).find(|&i| payload[i] != pattern(offset + i as u64))
                {
                    conn.mismatch = Some(offset + at as u64);
                }
            }
            conn.fwd_cnt = conn.rx_cnt;
        }
        Role::Sink | Role::Source { .. } => conn.fwd_cnt = conn.rx_cnt,
    }
}
