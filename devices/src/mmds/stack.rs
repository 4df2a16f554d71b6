//! One interface's MMDS endpoint: the frames the guest sends to the MMDS address go in
//! ([`MmdsStack::receive`]), smoltcp answers ARP and runs TCP on port 80, the HTTP layer
//! ([`super::http`]) answers each request, and the frames for the guest come out
//! ([`MmdsStack::next_frame`]) for the device to put on its receive queue.
//!
//! Everything is bounded: at most [`MAX_CONNECTIONS`] connections (a SYN when all are taken
//! replaces the oldest half-open one, else the one idle longest, so a flood cannot lock the
//! guest out), socket buffers of [`SOCKET_BUFFER_LEN`] each way, a request of at most
//! [`MAX_REQUEST_LEN`], and [`MAX_QUEUED_FRAMES`] frames queued each way (more are dropped,
//! and TCP sends them again).

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use log::warn;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as NetDuration, Instant as NetInstant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpEndpoint};

use super::http::{self, Parsed, MAX_REQUEST_LEN};
use super::SharedMmds;
use crate::metrics::MMDS_METRICS;
use crate::rate_limiter::timer::Timer;
use crate::sync::lock;

/// The MMDS's own MAC address (Firecracker's).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// The MMDS address when none is configured.
pub const DEFAULT_IPV4_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const MMDS_TCP_PORT: u16 = 80;
/// Connections open at once (Firecracker's default).
pub const MAX_CONNECTIONS: usize = 30;
/// Each connection's TCP buffers, each way.
pub const SOCKET_BUFFER_LEN: usize = 8192;
/// Frames waiting each way.
pub const MAX_QUEUED_FRAMES: usize = 64;
/// A standard Ethernet frame: the guest's requests are small, and the answers are cut to it.
const MTU: usize = 1514;
/// A connection whose peer stops answering is dropped after this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How often smoltcp is told again where the guest is (its neighbor cache forgets after 60 s).
const PEER_REFRESH: Duration = Duration::from_secs(20);

const ETH_HEADER_LEN: usize = 14;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
/// Where ARP's target protocol address, and IPv4's destination, sit in an Ethernet frame.
const ARP_TPA_AT: usize = ETH_HEADER_LEN + 24;
const IPV4_DST_AT: usize = ETH_HEADER_LEN + 16;
const IPV4_PROTOCOL_AT: usize = ETH_HEADER_LEN + 9;
const PROTOCOL_TCP: u8 = 6;

/// Whether `frame` (Ethernet, no virtio-net header) is for the MMDS at `addr`: an ARP
/// packet about it or an IPv4 packet to it. Only these bytes are looked at, so anything that
/// carries the address there, however malformed otherwise, is kept from the TAP.
pub fn is_mmds_frame(frame: &[u8], addr: Ipv4Addr) -> bool {
    let Some(ethertype) = frame.get(12..14) else {
        return false;
    };
    let at = match u16::from_be_bytes([ethertype[0], ethertype[1]]) {
        ETHERTYPE_ARP => ARP_TPA_AT,
        ETHERTYPE_IPV4 => IPV4_DST_AT,
        _ => return false,
    };
    frame.get(at..at + 4) == Some(&addr.octets()[..])
}

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("cannot create the MMDS timer: {0}")]
    Timer(std::io::Error),
}

/// The frames between the device and smoltcp.
#[derive(Default)]
struct Frames {
    from_guest: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
    /// smoltcp had something to send and the queue to the guest was full.
    stalled: bool,
}

struct RxFrame(Vec<u8>);
struct TxFrame<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxFrame {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxFrame<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let result = f(&mut frame);
        if self.0.len() < MAX_QUEUED_FRAMES {
            MMDS_METRICS.tx_count.inc();
            self.0.push_back(frame);
        } else {
            // A reply to a received frame comes with its own token: TCP sends it again.
            MMDS_METRICS.tx_errors.inc();
        }
        result
    }
}

impl phy::Device for Frames {
    type RxToken<'a> = RxFrame;
    type TxToken<'a> = TxFrame<'a>;

    fn receive(&mut self, _now: NetInstant) -> Option<(RxFrame, TxFrame<'_>)> {
        let frame = self.from_guest.pop_front()?;
        Some((RxFrame(frame), TxFrame(&mut self.to_guest)))
    }

    fn transmit(&mut self, _now: NetInstant) -> Option<TxFrame<'_>> {
        if self.to_guest.len() >= MAX_QUEUED_FRAMES {
            self.stalled = true;
            return None;
        }
        Some(TxFrame(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        // The guest may leave its checksums to the device (VIRTIO_NET_F_CSUM): they are not
        // checked on the way in, and always filled in on the way out.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.icmpv4 = Checksum::Tx;
        caps
    }
}

/// A TCP connection's HTTP side.
struct Connection {
    handle: SocketHandle,
    /// What the peer sent that is not answered yet.
    request: Vec<u8>,
    /// The answer being sent, and how much of it went.
    response: Vec<u8>,
    sent: usize,
    /// The connection ends once the answer is out.
    close_after: bool,
    /// Counted as created (it left LISTEN).
    open: bool,
    /// When it last did something, in [`MmdsStack::clock`] ticks.
    last_active: u64,
}

impl Connection {
    fn answered(&self) -> bool {
        self.sent >= self.response.len()
    }

    fn reset(&mut self) {
        self.request = Vec::new();
        self.response = Vec::new();
        self.sent = 0;
        self.close_after = false;
        self.open = false;
    }
}

pub struct MmdsStack {
    addr: Ipv4Addr,
    iface: Interface,
    sockets: SocketSet<'static>,
    frames: Frames,
    connections: Vec<Connection>,
    mmds: SharedMmds,
    epoch: Instant,
    clock: u64,
    /// Wakes the device when TCP has something to do (a retransmission, a timeout).
    timer: Timer,
    /// The guest's last MAC and address, and when smoltcp was told of them.
    peer: Option<([u8; 6], [u8; 4], Instant)>,
}

impl MmdsStack {
    /// The endpoint at `addr`, answering from `mmds`.
    pub fn new(addr: Ipv4Addr, mmds: SharedMmds) -> Result<Self, StackError> {
        let mut frames = Frames::default();
        let epoch = Instant::now();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(MMDS_MAC)));
        config.random_seed = epoch.elapsed().as_nanos() as u64 ^ u64::from(addr.to_bits());
        let mut iface = Interface::new(config, &mut frames, NetInstant::from_micros(0));
        iface.update_ip_addrs(|addrs| {
            // Prefix 0: every guest address is on the link, so answers go straight back to
            // the MAC that asked, whatever the guest's own address and routes are.
            let _ = addrs.push(IpCidr::new(addr.into(), 0));
        });
        Ok(Self {
            addr,
            iface,
            sockets: SocketSet::new(Vec::new()),
            frames,
            connections: Vec::new(),
            mmds,
            epoch,
            clock: 0,
            timer: Timer::new().map_err(StackError::Timer)?,
            peer: None,
        })
    }

    /// The MMDS address this endpoint answers for.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    fn now(&self) -> NetInstant {
        NetInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Takes a frame the guest sent to the MMDS (see [`is_mmds_frame`]) and answers what it
    /// can at once.
    pub fn receive(&mut self, frame: &[u8]) {
        MMDS_METRICS.rx_accepted.inc();
        if frame.len() < ETH_HEADER_LEN {
            MMDS_METRICS.rx_bad_eth.inc();
            return;
        }
        if frame.get(12..14) == Some(&ETHERTYPE_IPV4.to_be_bytes()[..]) {
            self.learn_peer(frame);
            if frame.get(IPV4_PROTOCOL_AT) == Some(&PROTOCOL_TCP) {
                MMDS_METRICS.rx_count.inc();
                if let Some(peer) = new_connection(frame) {
                    self.make_room(peer);
                }
            } else {
                MMDS_METRICS.rx_accepted_unusual.inc();
            }
        }
        if self.frames.from_guest.len() >= MAX_QUEUED_FRAMES {
            MMDS_METRICS.rx_accepted_err.inc();
            return;
        }
        let mut frame = frame.to_vec();
        if frame.get(12..14) == Some(&ETHERTYPE_IPV4.to_be_bytes()[..]) {
            // A guest that routes the MMDS address through its gateway sends to the gateway's
            // MAC; the address alone says the packet is MMDS's (smoltcp would drop it).
            frame[..6].copy_from_slice(&MMDS_MAC);
        }
        self.frames.from_guest.push_back(frame);
        self.poll();
    }

    /// Tells smoltcp where the guest that sent this IPv4 frame is, as an ARP request from it
    /// would (smoltcp learns neighbours from ARP only): a guest that knows the MMDS's MAC
    /// already (a restored one, or one past smoltcp's 60 s) does not ask again, and smoltcp
    /// would otherwise wait for the guest to answer its own ARP before it answers anything.
    /// The ARP reply smoltcp makes is not sent.
    fn learn_peer(&mut self, frame: &[u8]) {
        let (Some(mac), Some(ip)) = (
            frame.get(6..12),
            frame.get(ETH_HEADER_LEN + 12..ETH_HEADER_LEN + 16),
        ) else {
            return;
        };
        let (mut peer_mac, mut peer_ip) = ([0u8; 6], [0u8; 4]);
        peer_mac.copy_from_slice(mac);
        peer_ip.copy_from_slice(ip);
        let fresh = self.peer.is_some_and(|(known_mac, known_ip, when)| {
            known_mac == peer_mac && known_ip == peer_ip && when.elapsed() < PEER_REFRESH
        });
        // Only a unicast MAC can be a neighbour.
        if fresh || peer_mac[0] & 1 != 0 || self.frames.from_guest.len() >= MAX_QUEUED_FRAMES {
            return;
        }
        self.peer = Some((peer_mac, peer_ip, Instant::now()));
        let mut arp = vec![0u8; ETH_HEADER_LEN + 28];
        arp[..6].copy_from_slice(&MMDS_MAC);
        arp[6..12].copy_from_slice(&peer_mac);
        arp[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        arp[ETH_HEADER_LEN..ETH_HEADER_LEN + 8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp[ETH_HEADER_LEN + 8..ETH_HEADER_LEN + 14].copy_from_slice(&peer_mac);
        arp[ETH_HEADER_LEN + 14..ETH_HEADER_LEN + 18].copy_from_slice(&peer_ip);
        arp[ARP_TPA_AT..ARP_TPA_AT + 4].copy_from_slice(&self.addr.octets());
        let queued = self.frames.to_guest.len();
        self.frames.from_guest.push_back(arp);
        let now = self.now();
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
        let mut index = 0;
        self.frames.to_guest.retain(|frame| {
            index += 1;
            index <= queued || frame.get(12..14) != Some(&ETHERTYPE_ARP.to_be_bytes()[..])
        });
    }

    /// The next frame for the guest, if any.
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        if self.frames.to_guest.is_empty() && self.frames.stalled {
            self.frames.stalled = false;
            self.poll();
        }
        self.frames.to_guest.pop_front()
    }

    /// Whether a frame waits for the guest.
    pub fn has_frames(&self) -> bool {
        !self.frames.to_guest.is_empty() || self.frames.stalled
    }

    /// The timer fired: retransmissions and timeouts.
    pub fn on_timer(&mut self) {
        self.timer.acknowledge();
        self.poll();
    }

    /// Gives a listening socket for a SYN from `peer`: a new one while there is room, else
    /// the oldest half-open connection's or the longest idle one's.
    fn make_room(&mut self, peer: IpEndpoint) {
        let mut listening = false;
        for conn in &self.connections {
            let socket = self.sockets.get::<tcp::Socket>(conn.handle);
            if socket.remote_endpoint() == Some(peer) {
                // A SYN sent again: its connection takes it.
                return;
            }
            listening |= socket.state() == tcp::State::Listen;
        }
        if listening {
            return;
        }
        if self.connections.len() < MAX_CONNECTIONS {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER_LEN]),
                tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER_LEN]),
            );
            socket.set_timeout(Some(NetDuration::from_micros(
                CONNECTION_TIMEOUT.as_micros() as u64,
            )));
            socket.set_nagle_enabled(false);
            socket.set_ack_delay(None);
            if let Err(err) = socket.listen(MMDS_TCP_PORT) {
                warn!("mmds: cannot listen: {err}");
                return;
            }
            let handle = self.sockets.add(socket);
            self.connections.push(Connection {
                handle,
                request: Vec::new(),
                response: Vec::new(),
                sent: 0,
                close_after: false,
                open: false,
                last_active: self.clock,
            });
            return;
        }
        let sockets = &self.sockets;
        let victim = self.connections.iter_mut().min_by_key(|conn| {
            let state = sockets.get::<tcp::Socket>(conn.handle).state();
            (state != tcp::State::SynReceived, conn.last_active)
        });
        if let Some(conn) = victim {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            socket.abort();
            if socket.listen(MMDS_TCP_PORT).is_ok() {
                MMDS_METRICS.connections_destroyed.inc();
                conn.reset();
            }
        }
    }

    /// Runs TCP and serves the connections until nothing more happens, then sets the timer
    /// for what TCP waits for.
    fn poll(&mut self) {
        // smoltcp sends a socket's segments one a poll: go on while frames come out, up to
        // a full queue (then `next_frame` polls again as the guest takes them).
        for _ in 0..2 * MAX_QUEUED_FRAMES {
            let queued = self.frames.to_guest.len();
            let now = self.now();
            let changed =
                self.iface.poll(now, &mut self.frames, &mut self.sockets) != PollResult::None;
            let served = self.serve_connections();
            if !changed && !served && self.frames.to_guest.len() == queued {
                break;
            }
        }
        let now = self.now();
        let armed = match self.iface.poll_delay(now, &self.sockets) {
            Some(delay) => self.timer.arm(Duration::from_micros(delay.total_micros())),
            None => self.timer.disarm(),
        };
        if let Err(err) = armed {
            warn!("mmds: cannot set its timer: {err}");
        }
    }

    /// Moves requests in and answers out; true if anything moved.
    fn serve_connections(&mut self) -> bool {
        let mut progressed = false;
        self.clock += 1;
        let clock = self.clock;
        for conn in &mut self.connections {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            match socket.state() {
                tcp::State::Listen => continue,
                tcp::State::Closed | tcp::State::TimeWait => {
                    // Done: listen again at once (a closed connection's TIME-WAIT would hold
                    // a slot for nothing).
                    if conn.open {
                        MMDS_METRICS.connections_destroyed.inc();
                    }
                    conn.reset();
                    socket.abort();
                    if let Err(err) = socket.listen(MMDS_TCP_PORT) {
                        warn!("mmds: cannot listen again: {err}");
                    }
                    continue;
                }
                _ => {}
            }
            if !conn.open {
                conn.open = true;
                conn.last_active = clock;
                MMDS_METRICS.connections_created.inc();
            }
            while conn.answered() && !conn.close_after && socket.can_recv() {
                let room = MAX_REQUEST_LEN - conn.request.len();
                if room == 0 {
                    break;
                }
                let taken = socket.recv(|data| {
                    let n = data.len().min(room);
                    (n, data[..n].to_vec())
                });
                match taken {
                    Ok(data) if !data.is_empty() => {
                        conn.request.extend_from_slice(&data);
                        conn.last_active = clock;
                        progressed = true;
                    }
                    _ => break,
                }
            }
            if conn.answered() && !conn.close_after && !conn.request.is_empty() {
                let parsed = http::serve(&mut lock(&self.mmds), &conn.request, Instant::now());
                if let Parsed::Answer {
                    response,
                    consumed,
                    close,
                } = parsed
                {
                    conn.request.drain(..consumed.min(conn.request.len()));
                    conn.response = response;
                    conn.sent = 0;
                    conn.close_after = close;
                    progressed = true;
                }
            }
            if !conn.answered() && socket.can_send() {
                if let Ok(n) = socket.send_slice(&conn.response[conn.sent..]) {
                    conn.sent += n;
                    if n > 0 {
                        conn.last_active = clock;
                        progressed = true;
                    }
                }
            }
            if conn.answered() {
                if !conn.response.is_empty() {
                    conn.response = Vec::new();
                    conn.sent = 0;
                }
                let peer_done = !socket.may_recv() && conn.request.is_empty();
                if (conn.close_after || peer_done) && socket.may_send() {
                    socket.close();
                    progressed = true;
                }
            }
        }
        progressed
    }
}

/// The peer of a TCP SYN (without ACK) to the MMDS port in `frame`, if it is one.
fn new_connection(frame: &[u8]) -> Option<IpEndpoint> {
    let ip = frame.get(ETH_HEADER_LEN..)?;
    let header_len = usize::from(ip.first()? & 0x0f) * 4;
    let tcp = ip.get(header_len..header_len + 14)?;
    let dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
    let flags = tcp[13];
    let (syn, ack) = (flags & 0x02 != 0, flags & 0x10 != 0);
    if header_len < 20 || dst_port != MMDS_TCP_PORT || !syn || ack {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    Some(IpEndpoint::new(
        src.into(),
        u16::from_be_bytes([tcp[0], tcp[1]]),
    ))
}

impl AsRawFd for MmdsStack {
    /// The timer the event loop watches for this endpoint.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests;
