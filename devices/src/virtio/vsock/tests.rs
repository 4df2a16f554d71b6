//! The device on mock queues and a real event loop: the driver's side is written into guest
//! memory as a guest would, the host's side is ordinary Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::memory::GuestMemoryMmap;
use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::muxer::MAX_PENDING_RST;
use super::packet::*;
use super::*;
use crate::virtio::state::VirtioDeviceState;
use crate::virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

const QUEUE_LEN: u16 = 16;
const GUEST_CID: u64 = 3;
const RX_BUFS: u64 = 0x10_0000;
const RX_BUF_LEN: u32 = (HDR_LEN + MAX_PAYLOAD) as u32;
const TX_BUFS: u64 = 0x80_0000;
const EVENT_BUFS: u64 = 0xf0_0000;

type Subscriber = Arc<Mutex<Vsock>>;

/// A split queue as the driver lays it out: the descriptor table at `base`, the available
/// ring 0x100 and the used ring 0x200 above it.
struct Ring {
    base: u64,
}

impl Ring {
    fn avail(&self) -> GuestAddress {
        GuestAddress(self.base + 0x100)
    }

    fn used(&self) -> GuestAddress {
        GuestAddress(self.base + 0x200)
    }

    fn queue(&self) -> Queue {
        let mut queue = Queue::new(QUEUE_LEN).unwrap();
        queue.set_size(QUEUE_LEN);
        queue.set_desc_table_address(Some(self.base as u32), Some(0));
        queue.set_avail_ring_address(Some(self.avail().0 as u32), Some(0));
        queue.set_used_ring_address(Some(self.used().0 as u32), Some(0));
        queue.set_ready(true);
        queue
    }

    /// Puts a one-descriptor chain in table slot `index` and makes it available.
    fn make_available(&self, mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16) {
        let desc = GuestAddress(self.base + 16 * u64::from(index));
        mem.write_obj(addr, desc).unwrap();
        mem.write_obj(len, desc.unchecked_add(8)).unwrap();
        mem.write_obj(flags, desc.unchecked_add(12)).unwrap();
        mem.write_obj(0u16, desc.unchecked_add(14)).unwrap();
        let idx: u16 = mem.read_obj(self.avail().unchecked_add(2)).unwrap();
        let slot = self
            .avail()
            .unchecked_add(4 + 2 * u64::from(idx % QUEUE_LEN));
        mem.write_obj(index, slot).unwrap();
        mem.write_obj(idx.wrapping_add(1), self.avail().unchecked_add(2))
            .unwrap();
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(self.used().unchecked_add(2)).unwrap()
    }

    /// The (id, len) of used element `n`.
    fn used_elem(&self, mem: &GuestMemoryMmap, n: u16) -> (u32, u32) {
        let elem = self.used().unchecked_add(4 + 8 * u64::from(n % QUEUE_LEN));
        (
            mem.read_obj(elem).unwrap(),
            mem.read_obj(elem.unchecked_add(4)).unwrap(),
        )
    }
}

struct Fixture {
    mem: &'static GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    event: Ring,
    device: Subscriber,
    manager: EventManager<Subscriber>,
    uds: PathBuf,
    /// Removed, with the sockets in it, when the test ends.
    _dir: TempDir,
    next_rx_desc: u16,
    next_tx_desc: u16,
    rx_seen: u16,
}

fn scratch() -> TempDir {
    TempDir::new_with_prefix(std::env::temp_dir().join("mote-vsock-")).unwrap()
}

fn fixture() -> Fixture {
    fixture_with(VIRTIO_F_VERSION_1)
}

/// A device whose driver accepted `features`.
fn fixture_with(features: u64) -> Fixture {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
    ));
    let dir = scratch();
    let uds = dir.as_path().join("v.sock");
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut vsock = Vsock::new(GUEST_CID, &uds, irq).unwrap();
    vsock.set_acked_features(features);
    let rx = Ring { base: 0 };
    let tx = Ring { base: 0x1_0000 };
    let event = Ring { base: 0x2_0000 };
    let queues = [&rx, &tx, &event].iter().map(|q| q.queue()).collect();
    vsock.activate(mem.clone(), queues).unwrap();
    let device = Arc::new(Mutex::new(vsock));
    let mut manager = EventManager::<Subscriber>::new().unwrap();
    manager.add_subscriber(device.clone());
    let mut f = Fixture {
        mem,
        rx,
        tx,
        event,
        device,
        manager,
        uds,
        _dir: dir,
        next_rx_desc: 0,
        next_tx_desc: 0,
        rx_seen: 0,
    };
    f.settle();
    f
}

impl Fixture {
    /// Runs the event loop until it has been idle for a little while.
    fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut quiet = 0;
        while quiet < 2 && Instant::now() < deadline {
            match self.manager.run_with_timeout(1).unwrap() {
                0 => quiet += 1,
                _ => quiet = 0,
            }
        }
    }

    fn kick(&self, queue: usize) {
        self.device.lock().unwrap().queue_events()[queue]
            .write(1)
            .unwrap();
    }

    fn metrics(&self) -> Arc<VsockMetrics> {
        self.device.lock().unwrap().metrics().clone()
    }

    /// Posts `count` RX buffers of `len` bytes.
    fn post_rx(&mut self, count: u16, len: u32) {
        for _ in 0..count {
            let index = self.next_rx_desc;
            let addr = RX_BUFS + u64::from(index % QUEUE_LEN) * u64::from(RX_BUF_LEN);
            self.rx.make_available(
                self.mem,
                index % QUEUE_LEN,
                addr,
                len,
                VRING_DESC_F_WRITE as u16,
            );
            self.next_rx_desc = index.wrapping_add(1);
        }
        self.kick(RX);
        self.settle();
    }

    /// Makes one TX chain of `len` bytes at `addr` available.
    fn send_raw(&mut self, addr: u64, len: u32) {
        let index = self.next_tx_desc % QUEUE_LEN;
        self.tx.make_available(self.mem, index, addr, len, 0);
        self.next_tx_desc = self.next_tx_desc.wrapping_add(1);
        self.kick(TX);
        self.settle();
    }

    fn send(&mut self, header: Header, payload: &[u8]) {
        let addr = TX_BUFS + u64::from(self.next_tx_desc % QUEUE_LEN) * 0x1_1000;
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        self.send_raw(addr, (HDR_LEN + payload.len()) as u32);
    }

    /// The packets the device delivered since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut packets = Vec::new();
        let used = self.rx.used_idx(self.mem);
        while self.rx_seen != used {
            let (id, len) = self.rx.used_elem(self.mem, self.rx_seen);
            let addr = RX_BUFS + u64::from(id) * u64::from(RX_BUF_LEN);
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            if bytes.len() >= HDR_LEN {
                let header = Header::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
                packets.push((header, bytes[HDR_LEN..].to_vec()));
            }
            self.rx_seen = self.rx_seen.wrapping_add(1);
        }
        packets
    }

    fn tx_used(&self) -> u16 {
        self.tx.used_idx(self.mem)
    }

    /// Posts event buffer `index` (8 bytes, as Linux's) and notifies the event queue.
    fn post_event(&mut self, index: u16) {
        let addr = EVENT_BUFS + 8 * u64::from(index);
        self.mem.write_obj(u64::MAX, GuestAddress(addr)).unwrap();
        self.event
            .make_available(self.mem, index, addr, 8, VRING_DESC_F_WRITE as u16);
        self.kick(EVENT);
        self.settle();
    }

    /// The (id, len) of used event buffer `n` and its 8 bytes, if the device used it.
    fn event_used(&self, n: u16) -> Option<(u32, u32, u64)> {
        if self.event.used_idx(self.mem) <= n {
            return None;
        }
        let (id, len) = self.event.used_elem(self.mem, n);
        let addr = GuestAddress(EVENT_BUFS + 8 * u64::from(id));
        Some((id, len, self.mem.read_obj(addr).unwrap()))
    }

    /// Saves the device and restores the state into a new one listening on `uds`, as a
    /// snapshot restore in a fresh monitor does (the old device and its socket are gone).
    fn restore_into(mut self, uds: PathBuf) -> (Fixture, VirtioDeviceState) {
        let saved = self.device.lock().unwrap().save_state().unwrap();
        // A new event loop and device on a new socket path; the old ones go when replaced.
        self.manager = EventManager::<Subscriber>::new().unwrap();
        let mut vsock = Vsock::new(GUEST_CID, &uds, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
        vsock.restore_state(self.mem.clone(), &saved).unwrap();
        assert_eq!(
            vsock.save_state().as_ref(),
            Some(&saved),
            "the state round-trips"
        );
        self.device = Arc::new(Mutex::new(vsock));
        self.manager.add_subscriber(self.device.clone());
        self.uds = uds;
        self.settle();
        (self, saved)
    }
}

fn guest_packet(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

#[test]
fn config_space_holds_the_guest_cid_and_reserved_cids_are_refused() {
    let f = fixture();
    let mut cid = [0u8; 8];
    f.device.lock().unwrap().read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    assert!(matches!(
        Vsock::new(2, &scratch().as_path().join("v.sock"), irq),
        Err(VsockError::ReservedCid(2))
    ));
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    assert!(matches!(
        Vsock::new(3, &f.uds, irq),
        Err(VsockError::Muxer(MuxerError::PathExists(_)))
    ));
}

#[test]
fn a_guest_stream_to_a_host_listener_carries_data_both_ways() {
    let mut f = fixture();
    let listener = UnixListener::bind(format!("{}_1234", f.uds.display())).unwrap();
    f.post_rx(8, RX_BUF_LEN);
    f.send(guest_packet(OP_REQUEST, 5000, 1234, 0), &[]);
    let (mut host, _) = listener.accept().unwrap();
    let packets = f.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, OP_RESPONSE);
    assert_eq!((packets[0].0.src_port, packets[0].0.dst_port), (1234, 5000));

    exchange_hello_world(&mut f, &mut host, 5000, 1234);
    assert_eq!(f.metrics().conns_added.total(), 1);
}

#[test]
fn host_data_never_exceeds_the_guests_credit() {
    let mut f = fixture();
    let listener = UnixListener::bind(format!("{}_7", f.uds.display())).unwrap();
    f.post_rx(8, RX_BUF_LEN);
    let mut request = guest_packet(OP_REQUEST, 5000, 7, 0);
    request.buf_alloc = 1000;
    f.send(request, &[]);
    let (mut host, _) = listener.accept().unwrap();
    f.received();
    host.write_all(&[1u8; 5000]).unwrap();
    f.settle();
    let delivered: usize = f.received().iter().map(|(_, data)| data.len()).sum();
    assert_eq!(delivered, 1000);
    // The guest consumed it all: 1000 more may come.
    let mut update = guest_packet(OP_CREDIT_UPDATE, 5000, 7, 0);
    update.buf_alloc = 1000;
    update.fwd_cnt = 1000;
    f.send(update, &[]);
    let delivered: usize = f.received().iter().map(|(_, data)| data.len()).sum();
    assert_eq!(delivered, 1000);
}

#[test]
fn packets_for_no_stream_are_reset_and_malformed_ones_dropped() {
    let mut f = fixture();
    f.post_rx(8, RX_BUF_LEN);
    // Data for a stream that does not exist, and a connection to a port nobody serves.
    f.send(guest_packet(OP_RW, 5000, 99, 3), b"abc");
    f.send(guest_packet(OP_REQUEST, 5001, 98, 0), &[]);
    let packets = f.received();
    assert_eq!(packets.len(), 2);
    assert!(packets.iter().all(|(h, _)| h.op == OP_RST));
    assert_eq!(packets[1].0.dst_port, 5001);

    let used = f.tx_used();
    // Outside memory, shorter than a header, lying about its length, from another CID.
    f.send_raw(0xdead_0000_0000, 64);
    f.send_raw(TX_BUFS, 10);
    f.send(guest_packet(OP_RW, 5000, 99, 1000), b"short");
    let mut stranger = guest_packet(OP_REQUEST, 5000, 99, 0);
    stranger.src_cid = GUEST_CID + 1;
    f.send(stranger, &[]);
    assert_eq!(f.tx_used(), used.wrapping_add(4), "every chain is returned");
    assert!(f.received().is_empty());
    assert_eq!(f.metrics().invalid_packets.total(), 4);
    assert!(!f.device.lock().unwrap().interrupt().needs_reset());
}

#[test]
fn rx_buffers_too_small_or_outside_memory_are_returned_unused() {
    let mut f = fixture();
    f.post_rx(1, 10);
    f.send(guest_packet(OP_RW, 5000, 99, 0), &[]);
    let used = f.rx.used_idx(f.mem);
    assert_eq!(used, 1);
    assert_eq!(f.metrics().rx_invalid_buffers.total(), 1);
    // The RST still goes out, in the next good buffer.
    f.post_rx(1, RX_BUF_LEN);
    let packets = f.received();
    assert_eq!(packets.last().map(|(h, _)| h.op), Some(OP_RST));
}

#[test]
fn resets_back_up_to_a_limit_and_then_tx_waits_for_rx_buffers() {
    let mut f = fixture();
    // No RX buffers: answers cannot go out. Fill the TX ring again and again with packets
    // that each earn an RST.
    let mut sent = 0;
    while sent - usize::from(f.tx_used()) < usize::from(QUEUE_LEN) {
        f.send(guest_packet(OP_RW, 5000, 99, 0), &[]);
        sent += 1;
    }
    assert_eq!(
        f.tx_used() as usize,
        MAX_PENDING_RST,
        "TX stopped at the backlog limit"
    );
    // Buffers drain the backlog and the TX queue moves again.
    for _ in 0..(sent / usize::from(QUEUE_LEN) + 2) {
        f.post_rx(QUEUE_LEN, RX_BUF_LEN);
        f.received();
    }
    assert_eq!(f.tx_used() as usize, sent);
}

#[test]
fn a_host_connect_is_answered_once_the_guest_accepts() {
    let mut f = fixture();
    f.post_rx(4, RX_BUF_LEN);
    let mut host = UnixStream::connect(&f.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    f.settle();
    let packets = f.received();
    assert_eq!(packets.len(), 1);
    let request = packets[0].0;
    assert_eq!(
        (request.op, request.dst_port, request.dst_cid),
        (OP_REQUEST, 52, GUEST_CID)
    );
    let mut response = guest_packet(OP_RESPONSE, 52, request.src_port, 0);
    response.buf_alloc = 4096;
    f.send(response, &[]);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = [0u8; 14];
    host.read_exact(&mut line).unwrap();
    assert_eq!(&line, format!("OK {}\n", request.src_port).as_bytes());
    // The guest's reset closes the host's stream.
    f.send(guest_packet(OP_RST, 52, request.src_port, 0), &[]);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn a_host_stream_gone_before_the_guest_heard_of_it_leaves_no_trace() {
    let mut f = fixture();
    // No RX buffers yet: the REQUEST cannot go out.
    let mut host = UnixStream::connect(&f.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    f.settle();
    drop(host);
    f.settle();
    f.post_rx(4, RX_BUF_LEN);
    assert!(f.received().is_empty(), "no REQUEST and no RST for it");
    assert_eq!(f.metrics().conns_killed.total(), 1);
}

/// Opens a host stream to guest port `port` through `f`'s socket and plays the guest's side of
/// the handshake; the stream, with its `OK` line read, and the guest's view of its ports.
/// Over an established stream between guest port `guest_port` and `host_port`: "hello" from
/// the guest reaches `host`, and "world" from `host` reaches the guest as exactly one RW packet.
fn exchange_hello_world(f: &mut Fixture, host: &mut UnixStream, guest_port: u32, host_port: u32) {
    f.send(guest_packet(OP_RW, guest_port, host_port, 5), b"hello");
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    host.write_all(b"world").unwrap();
    f.settle();
    let packets = f.received();
    assert_eq!(
        packets
            .iter()
            .map(|(h, data)| (h.op, data.as_slice()))
            .collect::<Vec<_>>(),
        vec![(OP_RW, &b"world"[..])]
    );
}

fn host_stream(f: &mut Fixture, port: u32) -> (UnixStream, Header) {
    let mut host = UnixStream::connect(&f.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    f.settle();
    let packets = f.received();
    assert_eq!(packets.len(), 1, "{packets:?}");
    let request = packets[0].0;
    assert_eq!((request.op, request.dst_port), (OP_REQUEST, port));
    let mut response = guest_packet(OP_RESPONSE, port, request.src_port, 0);
    response.buf_alloc = 4096;
    f.send(response, &[]);
    let mut line = vec![0u8; format!("OK {}\n", request.src_port).len()];
    host.read_exact(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", request.src_port).as_bytes());
    (host, request)
}

#[test]
fn a_restored_device_resets_the_transport_and_takes_new_streams() {
    let mut f = fixture();
    f.post_rx(8, RX_BUF_LEN);
    // As Linux does, the driver posted an event buffer when it started the device.
    f.post_event(0);
    assert_eq!(f.event_used(0), None, "no event before a restore");
    let (mut old_stream, _) = host_stream(&mut f, 52);

    let new_uds = f._dir.as_path().join("restored.sock");
    let (mut f, saved) = f.restore_into(new_uds);
    assert_eq!(
        saved.specific,
        DeviceSpecificState::Vsock {
            guest_cid: GUEST_CID
        }
    );
    assert_eq!(saved.queues.as_ref().map(Vec::len), Some(3));
    // The driver hears that its streams are gone: TRANSPORT_RESET (id 0) in the buffer's
    // first 4 bytes, the rest untouched.
    assert_eq!(f.event_used(0), Some((0, 4, 0xffff_ffff_0000_0000)));
    assert!(f.received().is_empty(), "nothing else goes to the guest");
    // The old monitor's stream is closed (its device is gone).
    let mut rest = Vec::new();
    assert_eq!(old_stream.read_to_end(&mut rest).unwrap_or(0), 0);

    // A new host stream, on the new socket, carries data both ways.
    let (mut host, request) = host_stream(&mut f, 52);
    exchange_hello_world(&mut f, &mut host, 52, request.src_port);
    // And so does a guest stream to a host listener.
    let listener = UnixListener::bind(format!("{}_1234", f.uds.display())).unwrap();
    f.send(guest_packet(OP_REQUEST, 5000, 1234, 0), &[]);
    let _accepted = listener.accept().unwrap();
    assert_eq!(f.received()[0].0.op, OP_RESPONSE);
    // Only one reset, however often the loop runs.
    f.post_event(1);
    assert_eq!(f.event_used(1), None);
}

#[test]
fn the_transport_reset_waits_for_an_event_buffer_and_goes_before_new_streams() {
    let f = fixture();
    let new_uds = f._dir.as_path().join("restored.sock");
    let (mut f, _) = f.restore_into(new_uds);
    assert_eq!(f.event_used(0), None);
    // A host stream before the driver heard of the reset: its REQUEST waits.
    f.post_rx(4, RX_BUF_LEN);
    let mut host = UnixStream::connect(&f.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    f.settle();
    assert!(f.received().is_empty());
    f.post_event(0);
    let packets = f.received();
    assert_eq!(packets.len(), 1);
    assert_eq!((packets[0].0.op, packets[0].0.dst_port), (OP_REQUEST, 52));
    assert_eq!(
        f.event_used(0),
        Some((0, 4, 0xffff_ffff_0000_0000)),
        "the event goes out once the driver posts a buffer"
    );
}

#[test]
fn a_snapshot_of_another_cid_or_device_is_refused() {
    let f = fixture();
    let saved = f.device.lock().unwrap().save_state().unwrap();
    let dir = scratch();
    let restore = |cid: u64, state: &VirtioDeviceState| {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let uds = dir.as_path().join(format!("v{cid}.sock"));
        let mut vsock = Vsock::new(cid, &uds, irq).unwrap();
        let result = vsock.restore_state(f.mem.clone(), state);
        assert!(
            vsock.common.active().is_none(),
            "a refused state leaves the device stopped"
        );
        assert!(!vsock.transport_reset_pending);
        result
    };
    match restore(GUEST_CID + 1, &saved) {
        Err(DeviceStateError::Mismatch { what, saved, built }) => {
            assert_eq!(what, "vsock guest CID");
            assert_eq!((saved.as_str(), built.as_str()), ("3", "4"));
        }
        other => panic!("{other:?}"),
    }
    let mut two_queues = saved.clone();
    two_queues.queues.as_mut().unwrap().pop();
    assert!(matches!(
        restore(GUEST_CID, &two_queues),
        Err(DeviceStateError::QueueCount { saved: 2, built: 3 })
    ));
    let mut net = saved.clone();
    net.device_type = crate::virtio::TYPE_NET;
    net.specific = DeviceSpecificState::Net {
        iface_id: "eth0".into(),
        mac: None,
        rx_rate_limiter: Default::default(),
        tx_rate_limiter: Default::default(),
    };
    assert!(matches!(
        restore(GUEST_CID, &net),
        Err(DeviceStateError::TypeMismatch { .. })
    ));
    // A device the driver had not started comes back not started, with no reset to send.
    let mut idle = saved.clone();
    idle.queues = None;
    assert!(restore(GUEST_CID, &idle).is_ok());
}

#[test]
fn with_event_idx_a_device_out_of_rx_buffers_asks_to_hear_of_the_next() {
    let mut f = fixture_with(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    // The driver only notifies when its available index passes the device's avail_event.
    let avail_event = f.rx.used().unchecked_add(4 + 8 * u64::from(QUEUE_LEN));
    f.post_rx(1, RX_BUF_LEN);
    let mut first = UnixStream::connect(&f.uds).unwrap();
    first.write_all(b"CONNECT 52\n").unwrap();
    f.settle();
    assert_eq!(
        f.received().len(),
        1,
        "the first REQUEST took the one buffer"
    );
    // The second REQUEST finds no buffer: the device must ask for the next one, the one at
    // available index 1, or it waits for a notification the driver never sends.
    let mut second = UnixStream::connect(&f.uds).unwrap();
    second.write_all(b"CONNECT 53\n").unwrap();
    f.settle();
    assert_eq!(f.mem.read_obj::<u16>(avail_event).unwrap(), 1);
    f.post_rx(1, RX_BUF_LEN);
    let packets = f.received();
    assert_eq!(packets.len(), 1);
    assert_eq!((packets[0].0.op, packets[0].0.dst_port), (OP_REQUEST, 53));
}
