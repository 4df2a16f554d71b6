//! A hand-built ARP, TCP and HTTP client for the metadata service at 169.254.169.254 (or the
//! address `mmds-init` names); the `mmds-…` steps that use it, and hostile traffic, are in
//! `steps.rs`.
//!
//! TCP here is the least that talks to a real stack: a SYN with an MSS option, data sent a
//! segment at a time waiting for each ACK, data received in order and ACKed at once, and a
//! FIN (or an RST) to end. Every wait has a deadline by the TSC.

use crate::net::{inet_checksum, rdtsc, Net, NetError, ETH_HLEN, FRAME_MAX};
use crate::report;
use crate::steps::parse_u64;

const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
/// The probe's own address on the link (MMDS answers whatever address asks).
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const MMDS_PORT: u16 = 80;
const TSC_PER_SEC: u64 = 4_000_000_000;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_FIN: u8 = 0x01;
/// Data per segment the probe sends.
const SEGMENT: usize = 1000;
/// The most of an answer kept.
const ANSWER_MAX: usize = 64 * 1024;
/// A session token (64 hex digits from mote; room for more).
const TOKEN_MAX: usize = 128;

static mut ANSWER: [u8; ANSWER_MAX] = [0; ANSWER_MAX];

/// Read through `Debug` when a step reports its error.
#[allow(dead_code)]
#[derive(Debug)]
pub enum MmdsError {
    Net(NetError),
    /// No answer in time.
    Timeout(&'static str),
    /// The connection was reset.
    Reset,
}

impl From<NetError> for MmdsError {
    fn from(err: NetError) -> Self {
        Self::Net(err)
    }
}

/// What the steps share: the addresses, the MAC the MMDS answered ARP with, the last token.
pub struct Mmds {
    ip: [u8; 4],
    mac: Option<[u8; 6]>,
    token: [u8; TOKEN_MAX],
    token_len: usize,
    next_port: u16,
    iss: u32,
}

struct Conn {
    port: u16,
    /// Next sequence number to send, and the next one expected from MMDS.
    snd_nxt: u32,
    rcv_nxt: u32,
    fin_seen: bool,
}

/// A parsed TCP segment from MMDS.
struct Segment<'a> {
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &'a [u8],
}

fn deadline(seconds: u64) -> u64 {
    rdtsc().saturating_add(seconds * TSC_PER_SEC)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Mmds {
    pub fn new(ip: [u8; 4]) -> Self {
        Self {
            ip,
            mac: None,
            token: [0; TOKEN_MAX],
            token_len: 0,
            next_port: 30000,
            iss: (rdtsc() as u32) & 0x0fff_ffff,
        }
    }

    /// The MMDS's MAC, asked by ARP the first time.
    fn mac(&mut self, net: &mut Net) -> Result<[u8; 6], MmdsError> {
        if let Some(mac) = self.mac {
            return Ok(mac);
        }
        let (src, ip) = (net.mac, self.ip);
        net.send(true, |buf| {
            buf[..6].fill(0xff);
            buf[6..12].copy_from_slice(&src);
            buf[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
            let arp = &mut buf[ETH_HLEN..ETH_HLEN + 28];
            arp[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
            arp[8..14].copy_from_slice(&src);
            arp[14..18].copy_from_slice(&GUEST_IP);
            arp[18..24].fill(0);
            arp[24..28].copy_from_slice(&ip);
            ETH_HLEN + 28
        })?;
        let end = deadline(5);
        while rdtsc() < end {
            let Some(received) = net.poll_rx() else {
                core::hint::spin_loop();
                continue;
            };
            let f = received.frame();
            let reply = f.len() >= ETH_HLEN + 28
                && be16(f, 12) == ETHERTYPE_ARP
                && be16(f, ETH_HLEN + 6) == 2
                && f[ETH_HLEN + 14..ETH_HLEN + 18] == ip;
            let mut mac = [0u8; 6];
            if reply {
                mac.copy_from_slice(&f[ETH_HLEN + 8..ETH_HLEN + 14]);
            }
            net.repost(received, true);
            if reply {
                self.mac = Some(mac);
                return Ok(mac);
            }
        }
        Err(MmdsError::Timeout("arp"))
    }

    /// Sends one TCP segment from `port` to MMDS.
    #[allow(clippy::too_many_arguments)]
    fn segment(
        &mut self,
        net: &mut Net,
        port: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
    ) -> Result<(), MmdsError> {
        let dst = self.mac(net)?;
        let (src, ip) = (net.mac, self.ip);
        net.send(true, |buf| {
            write_tcp(buf, &src, &dst, ip, port, seq, ack, flags, payload)
        })?;
        Ok(())
    }

    /// Opens a connection: SYN, SYN-ACK, ACK.
    fn connect(&mut self, net: &mut Net) -> Result<Conn, MmdsError> {
        self.next_port = self.next_port.wrapping_add(1).max(30000);
        self.iss = self.iss.wrapping_add(100_000);
        let (port, iss) = (self.next_port, self.iss);
        self.segment(net, port, iss, 0, TCP_SYN, &[])?;
        let end = deadline(5);
        loop {
            let mut answer = None;
            let got = self.receive(net, port, end, |s| {
                if s.flags & TCP_RST != 0 {
                    answer = Some(Err(MmdsError::Reset));
                } else if s.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
                    && s.ack == iss.wrapping_add(1)
                {
                    answer = Some(Ok(s.seq.wrapping_add(1)));
                }
            })?;
            if !got {
                return Err(MmdsError::Timeout("syn-ack"));
            }
            match answer {
                Some(Ok(rcv_nxt)) => {
                    let conn = Conn {
                        port,
                        snd_nxt: iss.wrapping_add(1),
                        rcv_nxt,
                        fin_seen: false,
                    };
                    self.segment(net, port, conn.snd_nxt, rcv_nxt, TCP_ACK, &[])?;
                    return Ok(conn);
                }
                Some(Err(err)) => return Err(err),
                None => {}
            }
        }
    }

    /// Waits for the next segment from MMDS to `port` and hands it to `f`; false when none
    /// came before `end`. Other frames are dropped.
    fn receive(
        &mut self,
        net: &mut Net,
        port: u16,
        end: u64,
        f: impl FnOnce(&Segment),
    ) -> Result<bool, MmdsError> {
        while rdtsc() < end {
            let Some(received) = net.poll_rx() else {
                core::hint::spin_loop();
                continue;
            };
            let parsed = parse_tcp(received.frame(), self.ip).filter(|s| s.dst_port == port);
            if let Some(segment) = parsed {
                f(&segment);
                net.repost(received, true);
                return Ok(true);
            }
            net.repost(received, true);
        }
        Ok(false)
    }

    /// Sends `data` a segment at a time, each once the previous one is ACKed; data MMDS sends
    /// meanwhile (an early answer) goes into the answer buffer. Returns its length.
    fn send_data(
        &mut self,
        net: &mut Net,
        conn: &mut Conn,
        data: &[u8],
    ) -> Result<usize, MmdsError> {
        let mut answered = 0usize;
        for chunk in data.chunks(SEGMENT) {
            let flags = TCP_ACK | TCP_PSH;
            self.segment(net, conn.port, conn.snd_nxt, conn.rcv_nxt, flags, chunk)?;
            conn.snd_nxt = conn.snd_nxt.wrapping_add(chunk.len() as u32);
            let end = deadline(5);
            loop {
                let mut acked = false;
                let mut reset = false;
                let got = self.receive(net, conn.port, end, |s| {
                    reset = s.flags & TCP_RST != 0;
                    acked = s.flags & TCP_ACK != 0 && s.ack == conn.snd_nxt;
                    answered += take_data(conn, s);
                })?;
                if !got {
                    return Err(MmdsError::Timeout("ack"));
                }
                if reset {
                    // MMDS answered and closed (a refused request): what came is the answer.
                    return Ok(answered);
                }
                if answered > 0 || conn.fin_seen {
                    let (port, seq, ack) = (conn.port, conn.snd_nxt, conn.rcv_nxt);
                    self.segment(net, port, seq, ack, TCP_ACK, &[])?;
                }
                if acked {
                    break;
                }
                if conn.fin_seen {
                    return Ok(answered);
                }
            }
        }
        Ok(answered)
    }

    /// Reads an HTTP answer whose first `have` bytes came already; returns its length.
    fn read_answer(
        &mut self,
        net: &mut Net,
        conn: &mut Conn,
        mut have: usize,
    ) -> Result<usize, MmdsError> {
        let end = deadline(5);
        while !answer_complete(have) && !conn.fin_seen {
            let mut reset = false;
            let mut got_data = 0;
            let got = self.receive(net, conn.port, end, |s| {
                reset = s.flags & TCP_RST != 0;
                got_data = take_data_at(conn, s, have);
            })?;
            if !got {
                return Err(MmdsError::Timeout("answer"));
            }
            if reset {
                return Err(MmdsError::Reset);
            }
            have += got_data;
            let (port, seq, ack) = (conn.port, conn.snd_nxt, conn.rcv_nxt);
            self.segment(net, port, seq, ack, TCP_ACK, &[])?;
        }
        Ok(have)
    }

    /// Ends a connection: a FIN, then MMDS's FIN (if it did not send it already) is ACKed.
    fn close(&mut self, net: &mut Net, conn: &mut Conn) -> Result<(), MmdsError> {
        let (port, seq) = (conn.port, conn.snd_nxt);
        self.segment(net, port, seq, conn.rcv_nxt, TCP_FIN | TCP_ACK, &[])?;
        conn.snd_nxt = conn.snd_nxt.wrapping_add(1);
        let end = deadline(2);
        while !conn.fin_seen {
            let got = self.receive(net, port, end, |s| {
                take_data(conn, s);
            })?;
            if !got {
                break;
            }
        }
        let (seq, ack) = (conn.snd_nxt, conn.rcv_nxt);
        self.segment(net, port, seq, ack, TCP_ACK, &[])
    }

    /// One request on `conn`; returns the answer's length (in ANSWER).
    fn request(&mut self, net: &mut Net, conn: &mut Conn, text: &[u8]) -> Result<usize, MmdsError> {
        let early = self.send_data(net, conn, text)?;
        self.read_answer(net, conn, early)
    }

    /// One request on a fresh connection, closed afterwards.
    fn request_once(&mut self, net: &mut Net, text: &[u8]) -> Result<usize, MmdsError> {
        let mut conn = self.connect(net)?;
        let len = self.request(net, &mut conn, text)?;
        self.close(net, &mut conn)?;
        Ok(len)
    }
}

/// Takes a segment's in-order data into ANSWER from its start; returns how much.
fn take_data(conn: &mut Conn, s: &Segment) -> usize {
    take_data_at(conn, s, 0)
}

/// Takes a segment's in-order data into ANSWER at `at`; returns how much.
fn take_data_at(conn: &mut Conn, s: &Segment, at: usize) -> usize {
    let mut taken = 0;
    if s.seq == conn.rcv_nxt && !s.payload.is_empty() {
        // SAFETY: the probe is single-threaded; ANSWER is only used by these steps.
        let answer = unsafe { &mut *core::ptr::addr_of_mut!(ANSWER) };
        let n = s.payload.len().min(ANSWER_MAX.saturating_sub(at));
        answer[at..at + n].copy_from_slice(&s.payload[..n]);
        conn.rcv_nxt = conn.rcv_nxt.wrapping_add(s.payload.len() as u32);
        taken = n;
    }
    if s.flags & TCP_FIN != 0 && s.seq.wrapping_add(s.payload.len() as u32) == conn.rcv_nxt {
        conn.rcv_nxt = conn.rcv_nxt.wrapping_add(1);
        conn.fin_seen = true;
    }
    taken
}

fn answer_bytes(len: usize) -> &'static [u8] {
    // SAFETY: as in take_data_at; read only after the writes.
    let answer = unsafe { &*core::ptr::addr_of!(ANSWER) };
    &answer[..len.min(ANSWER_MAX)]
}

/// Where an answer's body starts and how long it is (by Content-Length), once the head came.
fn answer_parts(len: usize) -> Option<(usize, usize)> {
    let bytes = answer_bytes(len);
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = &bytes[..head_end];
    let mut body_len = 0;
    for line in head.split(|b| *b == b'\n') {
        if line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:") {
            body_len = parse_u64(Some(line[15..].trim_ascii())).unwrap_or(0) as usize;
        }
    }
    Some((head_end, body_len))
}

fn answer_complete(len: usize) -> bool {
    answer_parts(len).is_some_and(|(start, body)| len >= start + body)
}

/// The status code of the answer in ANSWER.
fn status(len: usize) -> u64 {
    let bytes = answer_bytes(len);
    bytes
        .get(9..12)
        .and_then(|code| parse_u64(Some(code)))
        .unwrap_or(0)
}

fn body(len: usize) -> &'static [u8] {
    match answer_parts(len) {
        Some((start, body_len)) => &answer_bytes(len)[start..(start + body_len).min(len)],
        None => &[],
    }
}

/// Writes an Ethernet/IPv4/TCP frame from the guest to MMDS; returns its length.
#[allow(clippy::too_many_arguments)]
fn write_tcp(
    buf: &mut [u8],
    src: &[u8; 6],
    dst: &[u8; 6],
    ip: [u8; 4],
    port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> usize {
    // A SYN carries the MSS option (1460).
    let options: &[u8] = if flags & TCP_SYN != 0 {
        &[2, 4, 0x05, 0xb4]
    } else {
        &[]
    };
    let tcp_len = 20 + options.len() + payload.len();
    let total = 20 + tcp_len;
    let len = ETH_HLEN + total;
    if len > FRAME_MAX {
        return 0;
    }
    buf[..6].copy_from_slice(dst);
    buf[6..12].copy_from_slice(src);
    buf[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let ipv4 = &mut buf[ETH_HLEN..len];
    ipv4[..12].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    ipv4[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ipv4[12..16].copy_from_slice(&GUEST_IP);
    ipv4[16..20].copy_from_slice(&ip);
    let sum = inet_checksum(&ipv4[..20]);
    ipv4[10..12].copy_from_slice(&sum.to_be_bytes());
    let tcp = &mut ipv4[20..];
    tcp[0..2].copy_from_slice(&port.to_be_bytes());
    tcp[2..4].copy_from_slice(&MMDS_PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = (((20 + options.len()) / 4) as u8) << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    tcp[16..20].fill(0);
    tcp[20..20 + options.len()].copy_from_slice(options);
    tcp[20 + options.len()..tcp_len].copy_from_slice(payload);
    // The pseudo-header's sum, then the segment's.
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&GUEST_IP);
    pseudo[4..8].copy_from_slice(&ip);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    let sum = fold(!inet_checksum(&pseudo) as u32 + !inet_checksum(&tcp[..tcp_len]) as u32);
    tcp[16..18].copy_from_slice(&(!sum).to_be_bytes());
    len
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A TCP segment from `from` to the probe, if `frame` is one.
fn parse_tcp(frame: &[u8], from: [u8; 4]) -> Option<Segment<'_>> {
    if frame.len() < ETH_HLEN + 40 || be16(frame, 12) != ETHERTYPE_IPV4 {
        return None;
    }
    let ipv4 = &frame[ETH_HLEN..];
    let ihl = usize::from(ipv4[0] & 0xf) * 4;
    let total = usize::from(be16(ipv4, 2)).min(ipv4.len());
    if ipv4[9] != 6 || ipv4[12..16] != from || ihl < 20 || total < ihl + 20 {
        return None;
    }
    let tcp = &ipv4[ihl..total];
    let data_at = usize::from(tcp[12] >> 4) * 4;
    if data_at < 20 || data_at > tcp.len() {
        return None;
    }
    Some(Segment {
        dst_port: be16(tcp, 2),
        seq: be32(tcp, 4),
        ack: be32(tcp, 8),
        flags: tcp[13],
        payload: &tcp[data_at..],
    })
}

mod steps;
pub use steps::step;
