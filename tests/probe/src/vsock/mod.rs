//! A polling virtio-vsock driver: RX, TX and event queues; stream connections in both
//! directions with credit-based flow control; an echo server, a client that checks its echo,
//! a sink and a source for throughput, and hostile packets. A transport reset (sent by a
//! restored device) drops every connection, as Linux's driver does.
//!
//! Each RX buffer is one descriptor: a 44-byte header and up to `RX_DATA` bytes of payload.
//! Each TX packet is one descriptor likewise. Connections live in a small table.

mod conn;
pub mod steps;
mod wire;

use core::ptr::addr_of_mut;

use self::conn::{receive, Conn, ECHO_BUF, IDLE_CONN};
pub use self::conn::{Outcome, Role};
use self::wire::*;
use crate::port::read_phys;
use crate::virtio::{
    driver_ok, negotiate, Descriptor, QueueMemory, Ring, VirtioError, DESC_F_WRITE, F_VERSION_1,
    REG_CONFIG, STATUS_NEEDS_RESET,
};

const RX_COUNT: usize = 64;
const RX_DATA: usize = 32 * 1024;
const TX_COUNT: usize = 32;
const TX_DATA: usize = 32 * 1024;
const EVENT_COUNT: usize = 4;
pub const MAX_CONNS: usize = 8;
/// Guest ports of connections the probe opens.
const FIRST_LOCAL_PORT: u32 = 49152;
/// Polls without progress before a step gives up (seconds at native speed; a test waits for
/// the probe to say it listens before it connects).
const IDLE_POLLS: u64 = 400_000_000;
/// An address no probe guest has memory at.
const NOWHERE: u64 = 0xdead_0000_0000;
/// The port hostile packets come from and go to.
const HOSTILE_PORT: u32 = 9;
/// The event id for "the device's streams are gone" (virtio 1.2, 5.10.6.7).
const EVENT_TRANSPORT_RESET: u32 = 0;

#[repr(C, align(4096))]
struct Buffers {
    rx: [[u8; HDR_LEN + RX_DATA]; RX_COUNT],
    tx: [[u8; HDR_LEN + TX_DATA]; TX_COUNT],
    events: [[u8; 8]; EVENT_COUNT],
    echo: [[u8; ECHO_BUF]; MAX_CONNS],
}

static mut RX_QUEUE: QueueMemory = QueueMemory::new();
static mut TX_QUEUE: QueueMemory = QueueMemory::new();
static mut EVENT_QUEUE: QueueMemory = QueueMemory::new();
static mut BUFFERS: Buffers = Buffers {
    rx: [[0; HDR_LEN + RX_DATA]; RX_COUNT],
    tx: [[0; HDR_LEN + TX_DATA]; TX_COUNT],
    events: [[0; 8]; EVENT_COUNT],
    echo: [[0; ECHO_BUF]; MAX_CONNS],
};

// SAFETY (for the four accessors below): the probe is single-threaded and one Vsock at a time
// uses the buffers; each accessor reaches a distinct buffer, the device touches a buffer only
// while it is posted, and the driver only while it is not.

fn rx_buf(index: usize) -> &'static [u8; HDR_LEN + RX_DATA] {
    // SAFETY: see above.
    unsafe { &*addr_of_mut!(BUFFERS.rx[index]) }
}

fn tx_buf(index: usize) -> &'static mut [u8; HDR_LEN + TX_DATA] {
    // SAFETY: see above.
    unsafe { &mut *addr_of_mut!(BUFFERS.tx[index]) }
}

pub(super) fn echo_buf(index: usize) -> &'static mut [u8; ECHO_BUF] {
    // SAFETY: see above.
    unsafe { &mut *addr_of_mut!(BUFFERS.echo[index]) }
}

fn event_buf_addr(index: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of_mut!(BUFFERS.events[index]) as u64 }
}

pub struct Vsock {
    base: u64,
    pub cid: u64,
    rx: Ring,
    tx: Ring,
    event: Ring,
    tx_free: [u16; TX_COUNT],
    tx_free_len: usize,
    conns: [Conn; MAX_CONNS],
    /// Resets owed to packets for connections the probe does not have.
    rst_owed: [(u32, u32); 8],
    rst_owed_len: usize,
    next_local_port: u32,
    /// The guest port that accepts connections, and their role.
    listen: Option<(u32, Role)>,
    /// Resets received for connections the probe does not have (answers to hostile packets).
    pub stray_rsts: u32,
}

impl Vsock {
    pub fn start(slot: u64) -> Result<Self, VirtioError> {
        let (base, _) = negotiate(slot, TYPE_VSOCK, F_VERSION_1)?;
        // SAFETY: the probe is single-threaded and starts one vsock device per step sequence;
        // each queue's memory goes to exactly one ring.
        let (rx_mem, tx_mem, event_mem) = unsafe {
            (
                &mut *addr_of_mut!(RX_QUEUE),
                &mut *addr_of_mut!(TX_QUEUE),
                &mut *addr_of_mut!(EVENT_QUEUE),
            )
        };
        let mut rx = Ring::set_up(base, 0, rx_mem)?;
        let tx = Ring::set_up(base, 1, tx_mem)?;
        let mut event = Ring::set_up(base, 2, event_mem)?;
        for i in 0..RX_COUNT {
            let buf = rx_buf(i);
            rx.set_descriptor(i as u16, writable(buf.as_ptr() as u64, buf.len()));
            rx.publish(i as u16);
        }
        for i in 0..EVENT_COUNT {
            event.set_descriptor(i as u16, writable(event_buf_addr(i), 8));
            event.publish(i as u16);
        }
        driver_ok(base)?;
        let mut tx_free = [0u16; TX_COUNT];
        for (i, slot) in tx_free.iter_mut().enumerate() {
            *slot = i as u16;
        }
        Ok(Self {
            base,
            cid: read_phys(base + REG_CONFIG),
            rx,
            tx,
            event,
            tx_free,
            tx_free_len: TX_COUNT,
            conns: [IDLE_CONN; MAX_CONNS],
            rst_owed: [(0, 0); 8],
            rst_owed_len: 0,
            next_local_port: FIRST_LOCAL_PORT,
            listen: None,
            stray_rsts: 0,
        })
    }

    pub fn needs_reset(&self) -> bool {
        read_phys::<u32>(self.base + 0x070) & STATUS_NEEDS_RESET != 0
    }

    pub fn listen(&mut self, port: u32, role: Role) {
        self.listen = Some((port, role));
    }

    /// Opens a connection to host port `port`; its index in the table.
    pub fn connect(&mut self, port: u32, role: Role) -> Option<usize> {
        let index = self.conns.iter().position(|c| !c.in_use)?;
        let local_port = self.next_local_port;
        self.next_local_port += 1;
        self.conns[index] = Conn {
            in_use: true,
            role,
            local_port,
            peer_port: port,
            ..IDLE_CONN
        };
        let header = self.header(&self.conns[index], OP_REQUEST, 0, 0);
        if !self.send(&header, &[]) {
            self.conns[index].in_use = false;
            return None;
        }
        self.kick_tx();
        Some(index)
    }

    fn header(&self, conn: &Conn, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: conn.local_port,
            dst_port: conn.peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: conn.window(),
            fwd_cnt: conn.fwd_cnt,
        }
    }

    /// Takes back TX buffers the device is done with.
    fn reap_tx(&mut self) -> bool {
        let mut any = false;
        while let Some((id, _)) = self.tx.poll_used() {
            if usize::from(id) < TX_COUNT && self.tx_free_len < TX_COUNT {
                self.tx_free[self.tx_free_len] = id;
                self.tx_free_len += 1;
            }
            any = true;
        }
        any
    }

    /// A free TX buffer's id, if the device returned one.
    fn take_tx(&mut self) -> Option<u16> {
        if self.tx_free_len == 0 {
            self.reap_tx();
        }
        if self.tx_free_len == 0 {
            return None;
        }
        self.tx_free_len -= 1;
        Some(self.tx_free[self.tx_free_len])
    }

    /// Makes TX buffer `id` available as the one-descriptor chain `desc`.
    /// Makes TX buffer `id` available; the device hears of it at the next [`Vsock::kick_tx`]
    /// (as Linux's driver does, one notification covers what was queued meanwhile).
    fn post_tx(&mut self, id: u16, desc: Descriptor) {
        self.tx.set_descriptor(id, desc);
        self.tx.publish(id);
    }

    fn kick_tx(&self) {
        self.tx.kick(self.base);
    }

    /// Sends `header` and `len` payload bytes that `fill` writes in place; false when no TX
    /// buffer is free.
    fn send_with(&mut self, header: &Header, len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        let Some(id) = self.take_tx() else {
            return false;
        };
        let buf = tx_buf(usize::from(id));
        let len = len.min(TX_DATA);
        header.write(&mut buf[..HDR_LEN]);
        fill(&mut buf[HDR_LEN..HDR_LEN + len]);
        let desc = Descriptor {
            addr: buf.as_ptr() as u64,
            len: (HDR_LEN + len) as u32,
            flags: 0,
            next: 0,
        };
        self.post_tx(id, desc);
        true
    }

    fn send(&mut self, header: &Header, payload: &[u8]) -> bool {
        self.send_with(header, payload.len(), |buf| buf.copy_from_slice(payload))
    }

    /// Sends the hostile packet `case`: a header written in a TX buffer, sent as a chain that
    /// lies about it. False for an unknown case or no free buffer.
    pub fn send_hostile(&mut self, case: &[u8]) -> bool {
        let cid = self.cid;
        // (op, source CID, type, header length, descriptor length)
        let (op, src_cid, kind, len, desc_len) = match case {
            // Shorter than a header.
            b"short" => (OP_RW, cid, TYPE_STREAM, 0, 20),
            // A buffer where the guest has no memory (header unused).
            b"oob" => (OP_RW, cid, TYPE_STREAM, 0, 64),
            // A header that claims more payload than the buffer holds.
            b"len" => (OP_RW, cid, TYPE_STREAM, 1000, HDR_LEN + 10),
            // Someone else's CID.
            b"cid" => (OP_REQUEST, cid + 1, TYPE_STREAM, 0, HDR_LEN),
            // Data for a stream that does not exist: an RST comes back.
            b"unknown" => (OP_RW, cid, TYPE_STREAM, 4, HDR_LEN + 4),
            // A socket type the device does not have: an RST comes back.
            b"type" => (OP_REQUEST, cid, 2, 0, HDR_LEN),
            // An op that does not exist, for a stream that does not: an RST comes back.
            b"op" => (99, cid, TYPE_STREAM, 0, HDR_LEN),
            _ => return false,
        };
        let Some(id) = self.take_tx() else {
            return false;
        };
        let buf = tx_buf(usize::from(id));
        let header = Header {
            src_cid,
            dst_cid: HOST_CID,
            src_port: HOSTILE_PORT,
            dst_port: HOSTILE_PORT,
            len,
            kind,
            op,
            ..Header::default()
        };
        header.write(&mut buf[..HDR_LEN]);
        let addr = if case == b"oob" {
            NOWHERE
        } else {
            buf.as_ptr() as u64
        };
        let desc = Descriptor {
            addr,
            len: desc_len as u32,
            flags: 0,
            next: 0,
        };
        self.post_tx(id, desc);
        self.kick_tx();
        true
    }

    /// Handles the device's events; true if any came. After a transport reset the streams
    /// are gone (the peer knows nothing of them) and the CID may be new; listening goes on.
    fn poll_events(&mut self) -> bool {
        let mut any = false;
        while let Some((id, len)) = self.event.poll_used() {
            any = true;
            let index = usize::from(id);
            if index >= EVENT_COUNT {
                continue;
            }
            let event: u32 = read_phys(event_buf_addr(index));
            if len >= 4 && event == EVENT_TRANSPORT_RESET {
                let dropped = self.conns.iter().filter(|c| c.in_use).count();
                self.conns = [IDLE_CONN; MAX_CONNS];
                self.rst_owed_len = 0;
                self.cid = read_phys(self.base + REG_CONFIG);
                report!("vsock: transport reset dropped={dropped} cid={}", self.cid);
            }
            self.event.publish(id);
        }
        if any {
            self.event.kick(self.base);
        }
        any
    }

    /// Handles what the device delivered; true if anything came.
    fn poll_rx(&mut self) -> bool {
        let mut any = false;
        while let Some((id, len)) = self.rx.poll_used() {
            any = true;
            // The device uses an event buffer before any RX buffer that follows it: an event
            // that came while this packet did is visible now, and a transport reset must drop
            // the old streams before this packet (a new stream's REQUEST) is taken.
            self.poll_events();
            let index = usize::from(id);
            if index >= RX_COUNT {
                continue;
            }
            let buf = rx_buf(index);
            let len = (len as usize).min(buf.len());
            if len >= HDR_LEN {
                let header = Header::read(&buf[..HDR_LEN]);
                let end = (HDR_LEN + header.len as usize).min(len);
                self.handle(&header, &buf[HDR_LEN..end]);
            }
            self.rx.publish(id);
        }
        if any {
            self.rx.kick(self.base);
        }
        any
    }

    fn find(&self, header: &Header) -> Option<usize> {
        self.conns.iter().position(|c| {
            c.in_use
                && !c.reset
                && c.local_port == header.dst_port
                && c.peer_port == header.src_port
        })
    }

    fn owe_rst(&mut self, header: &Header) {
        if self.rst_owed_len < self.rst_owed.len() {
            self.rst_owed[self.rst_owed_len] = (header.dst_port, header.src_port);
            self.rst_owed_len += 1;
        }
    }

    fn handle(&mut self, header: &Header, payload: &[u8]) {
        let Some(index) = self.find(header) else {
            match (header.op, self.listen) {
                (OP_REQUEST, Some((port, role))) if port == header.dst_port => {
                    match self.conns.iter().position(|c| !c.in_use) {
                        Some(index) => {
                            self.conns[index] = Conn {
                                in_use: true,
                                role,
                                local_port: port,
                                peer_port: header.src_port,
                                established: true,
                                need_response: true,
                                peer_buf_alloc: header.buf_alloc,
                                peer_fwd_cnt: header.fwd_cnt,
                                ..IDLE_CONN
                            };
                        }
                        None => self.owe_rst(header),
                    }
                }
                (OP_RST, _) => self.stray_rsts += 1,
                _ => self.owe_rst(header),
            }
            return;
        };
        let conn = &mut self.conns[index];
        conn.peer_buf_alloc = header.buf_alloc;
        conn.peer_fwd_cnt = header.fwd_cnt;
        match header.op {
            OP_RESPONSE => conn.established = true,
            OP_RST => conn.reset = true,
            OP_SHUTDOWN => conn.peer_shutdown |= header.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND),
            OP_CREDIT_REQUEST => conn.need_credit_update = true,
            OP_RW => receive(conn, index, payload),
            _ => {}
        }
    }

    /// Sends what each connection can: owed resets, responses, data within credit, credit
    /// updates, shutdowns. True if anything went.
    fn pump(&mut self) -> bool {
        let mut any = self.pump_resets();
        for index in 0..MAX_CONNS {
            any |= self.pump_conn(index);
        }
        if any {
            self.kick_tx();
        }
        any
    }

    /// Sends the resets owed; true if any went.
    fn pump_resets(&mut self) -> bool {
        let mut any = false;
        while self.rst_owed_len > 0 {
            let (local_port, peer_port) = self.rst_owed[self.rst_owed_len - 1];
            let conn = Conn {
                local_port,
                peer_port,
                ..IDLE_CONN
            };
            let header = self.header(&conn, OP_RST, 0, 0);
            if !self.send(&header, &[]) {
                return any;
            }
            self.rst_owed_len -= 1;
            any = true;
        }
        any
    }

    fn pump_conn(&mut self, index: usize) -> bool {
        let mut any = false;
        let conn = self.conns[index];
        if !conn.in_use || conn.reset {
            return false;
        }
        if conn.need_response {
            let header = self.header(&conn, OP_RESPONSE, 0, 0);
            if !self.send(&header, &[]) {
                return any;
            }
            self.conns[index].need_response = false;
            any = true;
        }
        if !conn.established {
            return any;
        }
        // Data, within the peer's credit and our TX buffers.
        loop {
            let conn = self.conns[index];
            let pending = match conn.role {
                Role::Echo => conn.echo_len.min(ECHO_BUF - conn.echo_head),
                Role::Check { total } | Role::Source { total } => {
                    (total - conn.sent).min(TX_DATA as u64) as usize
                }
                Role::Sink => 0,
            };
            let len = pending.min(conn.peer_credit() as usize).min(TX_DATA);
            if len == 0 || conn.shutdown_sent {
                break;
            }
            let header = self.header(&conn, OP_RW, len as u32, 0);
            let sent = match conn.role {
                Role::Echo => self.send(&header, &echo_buf(index)[conn.echo_head..][..len]),
                Role::Check { .. } => self.send_with(&header, len, |buf| {
                    for (i, b) in buf.iter_mut().enumerate() {
                        *b = pattern(conn.sent + i as u64);
                    }
                }),
                // Whatever the buffer holds: a source measures the device, not the probe.
                _ => self.send_with(&header, len, |_| {}),
            };
            if !sent {
                break;
            }
            let conn = &mut self.conns[index];
            conn.tx_cnt = conn.tx_cnt.wrapping_add(len as u32);
            conn.sent += len as u64;
            if conn.role == Role::Echo {
                conn.echo_head = (conn.echo_head + len) % ECHO_BUF;
                conn.echo_len -= len;
                conn.fwd_cnt = conn.fwd_cnt.wrapping_add(len as u32);
            }
            conn.last_fwd_cnt_sent = header.fwd_cnt;
            any = true;
        }
        let conn = self.conns[index];
        let unreported = conn.fwd_cnt.wrapping_sub(conn.last_fwd_cnt_sent);
        if conn.need_credit_update || unreported >= conn.window() / 2 {
            let header = self.header(&conn, OP_CREDIT_UPDATE, 0, 0);
            if self.send(&header, &[]) {
                self.conns[index].need_credit_update = false;
                self.conns[index].last_fwd_cnt_sent = conn.fwd_cnt;
                any = true;
            }
        }
        let done_sending = match conn.role {
            Role::Echo => conn.peer_shutdown & SHUTDOWN_SEND != 0 && conn.echo_len == 0,
            Role::Check { total } | Role::Source { total } => conn.sent == total,
            Role::Sink => conn.peer_shutdown & SHUTDOWN_SEND != 0,
        };
        if done_sending && !conn.shutdown_sent {
            let header = self.header(&conn, OP_SHUTDOWN, 0, SHUTDOWN_SEND);
            if self.send(&header, &[]) {
                self.conns[index].shutdown_sent = true;
                any = true;
            }
        }
        any
    }

    /// Runs the connections until `done` says so or nothing happens for a long while; false on
    /// the timeout.
    pub fn run_until(&mut self, done: impl FnMut(&Self) -> bool) -> bool {
        self.run_until_idle_for(IDLE_POLLS, done)
    }

    /// As [`Vsock::run_until`], giving up after `idle_polls` polls without progress.
    pub fn run_until_idle_for(
        &mut self,
        idle_polls: u64,
        mut done: impl FnMut(&Self) -> bool,
    ) -> bool {
        let mut idle = 0u64;
        loop {
            if done(self) {
                return true;
            }
            // Events first: a reset must drop the old streams before a new one reuses ports.
            let progress = self.poll_events() | self.reap_tx() | self.poll_rx() | self.pump();
            if progress {
                idle = 0;
            } else {
                idle += 1;
                if idle > idle_polls {
                    return false;
                }
                core::hint::spin_loop();
            }
        }
    }

    pub fn finished_count(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| c.in_use && c.finished())
            .count()
    }

    pub fn is_finished(&self, index: usize) -> bool {
        self.conns[index].finished()
    }

    pub fn outcome(&self, index: usize) -> Outcome {
        let conn = &self.conns[index];
        Outcome {
            received: conn.received,
            sent: conn.sent,
            matched: conn.mismatch.is_none(),
            checksum: conn.checksum,
            established: conn.established,
        }
    }

    pub fn total_received(&self) -> u64 {
        self.conns
            .iter()
            .filter(|c| c.in_use)
            .map(|c| c.received)
            .sum()
    }

    /// Frees every finished connection's slot.
    pub fn forget_finished(&mut self) {
        for conn in self.conns.iter_mut().filter(|c| c.finished()) {
            *conn = IDLE_CONN;
        }
    }
}

fn writable(addr: u64, len: usize) -> Descriptor {
    Descriptor {
        addr,
        len: len as u32,
        flags: DESC_F_WRITE,
        next: 0,
    }
}
