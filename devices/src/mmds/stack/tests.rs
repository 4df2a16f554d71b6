//! The endpoint against a guest made of smoltcp too: frames go between the two by hand.

use serde_json::json;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use super::*;
use crate::mmds::{Mmds, MmdsVersion};

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

struct Guest {
    iface: Interface,
    frames: Frames,
    sockets: SocketSet<'static>,
    epoch: Instant,
    next_port: u16,
}

impl Guest {
    fn new() -> Self {
        let mut frames = Frames::default();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        let mut iface = Interface::new(config, &mut frames, NetInstant::from_micros(0));
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::v4(10, 0, 0, 2), 0));
        });
        Self {
            iface,
            frames,
            sockets: SocketSet::new(Vec::new()),
            epoch: Instant::now(),
            next_port: 40000,
        }
    }

    fn connect(&mut self, addr: Ipv4Addr) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        self.next_port += 1;
        socket
            .connect(
                self.iface.context(),
                (IpAddress::from(addr), MMDS_TCP_PORT),
                self.next_port,
            )
            .unwrap();
        self.sockets.add(socket)
    }

    /// Runs both sides until neither has anything to say; returns the frames that went to
    /// the MMDS.
    fn exchange(&mut self, mmds: &mut MmdsStack) -> usize {
        let mut to_mmds = 0;
        for _ in 0..1000 {
            let now = NetInstant::from_micros(self.epoch.elapsed().as_micros() as i64);
            self.iface.poll(now, &mut self.frames, &mut self.sockets);
            let mut moved = false;
            while let Some(frame) = self.frames.to_guest.pop_front() {
                assert!(is_mmds_frame(&frame, mmds.addr()), "{frame:02x?}");
                mmds.receive(&frame);
                to_mmds += 1;
                moved = true;
            }
            while let Some(frame) = mmds.next_frame() {
                assert_eq!(&frame[..6], &GUEST_MAC);
                self.frames.from_guest.push_back(frame);
                moved = true;
            }
            if !moved {
                break;
            }
        }
        to_mmds
    }

    fn request(&mut self, mmds: &mut MmdsStack, handle: SocketHandle, text: &str) -> String {
        self.exchange(mmds);
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        socket.send_slice(text.as_bytes()).unwrap();
        self.exchange(mmds);
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        let mut buf = vec![0u8; 65536];
        let n = socket.recv_slice(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

fn service() -> SharedMmds {
    let mmds = Mmds::shared(1 << 20);
    lock(&mmds)
        .store
        .put(json!({"latest": {"meta-data": {"id": "i-1", "big": "x".repeat(20000)}}}))
        .unwrap();
    mmds
}

#[test]
fn frames_for_the_mmds_address_are_told_apart() {
    let addr = DEFAULT_IPV4_ADDR;
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp[ARP_TPA_AT..ARP_TPA_AT + 4].copy_from_slice(&addr.octets());
    assert!(is_mmds_frame(&arp, addr));
    assert!(!is_mmds_frame(&arp, Ipv4Addr::new(169, 254, 169, 253)));
    let mut ip = vec![0u8; 34];
    ip[12..14].copy_from_slice(&[0x08, 0x00]);
    ip[IPV4_DST_AT..IPV4_DST_AT + 4].copy_from_slice(&addr.octets());
    assert!(is_mmds_frame(&ip, addr));
    // Cut short before the address, or another EtherType: not MMDS's.
    assert!(!is_mmds_frame(&ip[..33], addr));
    ip[12] = 0x86;
    assert!(!is_mmds_frame(&ip, addr));
    assert!(!is_mmds_frame(&[], addr));
}

#[test]
fn a_guest_gets_answers_over_tcp_with_keep_alive() {
    let mmds = service();
    let mut stack = MmdsStack::new(DEFAULT_IPV4_ADDR, mmds.clone()).unwrap();
    let mut guest = Guest::new();
    let conn = guest.connect(DEFAULT_IPV4_ADDR);
    let answer = guest.request(
        &mut stack,
        conn,
        "GET /latest/meta-data/id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n\"i-1\""), "{answer}");
    // The same connection again, with an answer much longer than a segment.
    let answer = guest.request(
        &mut stack,
        conn,
        "GET /latest/meta-data/big HTTP/1.1\r\n\r\n",
    );
    assert!(answer.ends_with(&"x".repeat(20000)), "{}", answer.len());
    // V2 from now on: no token, no answer.
    lock(&mmds).set_options(MmdsVersion::V2, false);
    let answer = guest.request(
        &mut stack,
        conn,
        "GET /latest/meta-data/id HTTP/1.1\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let answer = guest.request(
        &mut stack,
        conn,
        "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n",
    );
    let token = answer.split("\r\n\r\n").nth(1).unwrap().to_string();
    let answer = guest.request(
        &mut stack,
        conn,
        &format!("GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: {token}\r\nConnection: close\r\n\r\n"),
    );
    assert!(answer.ends_with("\r\n\r\ni-1"), "{answer}");
    guest.exchange(&mut stack);
    assert!(!guest.sockets.get::<tcp::Socket>(conn).may_recv());
}

#[test]
fn a_flood_of_connections_leaves_room_for_a_new_one() {
    let mut stack = MmdsStack::new(DEFAULT_IPV4_ADDR, service()).unwrap();
    let mut guest = Guest::new();
    let flood: Vec<_> = (0..MAX_CONNECTIONS * 2)
        .map(|_| guest.connect(DEFAULT_IPV4_ADDR))
        .collect();
    guest.exchange(&mut stack);
    assert_eq!(stack.connections.len(), MAX_CONNECTIONS);
    let established = flood
        .iter()
        .filter(|h| guest.sockets.get::<tcp::Socket>(**h).state() == tcp::State::Established)
        .count();
    assert!(established <= MAX_CONNECTIONS * 2, "{established}");
    let conn = guest.connect(DEFAULT_IPV4_ADDR);
    let answer = guest.request(
        &mut stack,
        conn,
        "GET /latest/meta-data/id HTTP/1.1\r\n\r\n",
    );
    assert!(answer.ends_with("\r\n\r\ni-1"), "{answer}");
}

#[test]
fn an_oversized_request_is_refused_and_closed() {
    let mut stack = MmdsStack::new(DEFAULT_IPV4_ADDR, service()).unwrap();
    let mut guest = Guest::new();
    let conn = guest.connect(DEFAULT_IPV4_ADDR);
    let long = format!(
        "GET /{} HTTP/1.1\r\n\r\n",
        "a".repeat(MAX_REQUEST_LEN + 100)
    );
    let answer = guest.request(&mut stack, conn, &long);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    guest.exchange(&mut stack);
    assert!(!guest.sockets.get::<tcp::Socket>(conn).may_recv());
    // Garbage that is not even TCP is taken and dropped.
    let mut junk = vec![0u8; 60];
    junk[12..14].copy_from_slice(&[0x08, 0x00]);
    junk[IPV4_DST_AT..IPV4_DST_AT + 4].copy_from_slice(&DEFAULT_IPV4_ADDR.octets());
    stack.receive(&junk);
    stack.receive(&junk[..10]);
    assert!(stack.next_frame().is_none());
}

#[test]
fn a_guest_that_does_not_ask_arp_again_is_answered() {
    // A restored VM knows the MMDS's MAC; the new monitor's stack does not know the guest.
    let mmds = service();
    let mut guest = Guest::new();
    let mut first = MmdsStack::new(DEFAULT_IPV4_ADDR, mmds.clone()).unwrap();
    let conn = guest.connect(DEFAULT_IPV4_ADDR);
    guest.request(&mut first, conn, "GET / HTTP/1.1\r\n\r\n");
    let mut second = MmdsStack::new(DEFAULT_IPV4_ADDR, mmds).unwrap();
    let conn = guest.connect(DEFAULT_IPV4_ADDR);
    let answer = guest.request(
        &mut second,
        conn,
        "GET /latest/meta-data/id HTTP/1.1\r\n\r\n",
    );
    assert!(answer.ends_with("\r\n\r\ni-1"), "{answer}");
}

#[test]
fn a_guest_routing_through_its_gateway_is_answered() {
    // The guest sends to its gateway's MAC, as Linux does for an address off its subnet.
    let mut stack = MmdsStack::new(DEFAULT_IPV4_ADDR, service()).unwrap();
    let mut guest = Guest::new();
    let conn = guest.connect(DEFAULT_IPV4_ADDR);
    guest.exchange(&mut stack);
    let socket = guest.sockets.get_mut::<tcp::Socket>(conn);
    socket
        .send_slice(b"GET /latest/meta-data/id HTTP/1.1\r\n\r\n")
        .unwrap();
    let now = NetInstant::from_micros(guest.epoch.elapsed().as_micros() as i64);
    guest.iface.poll(now, &mut guest.frames, &mut guest.sockets);
    for mut frame in guest.frames.to_guest.drain(..).collect::<Vec<_>>() {
        frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        stack.receive(&frame);
    }
    while let Some(frame) = stack.next_frame() {
        guest.frames.from_guest.push_back(frame);
    }
    guest.exchange(&mut stack);
    let mut buf = vec![0u8; 4096];
    let n = guest
        .sockets
        .get_mut::<tcp::Socket>(conn)
        .recv_slice(&mut buf)
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.ends_with("\r\n\r\ni-1"), "{answer}");
}
