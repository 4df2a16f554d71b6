//! The device with a real TAP: each test moves its own thread into a new network namespace
//! (root only; skipped otherwise), makes a TAP there with `ip`, and plays the host's side with
//! a packet socket on it. Nothing leaves that namespace, which goes away with the thread.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use crate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::common::COMMON_FEATURES;
use crate::virtio::state::VirtioDeviceState;
use crate::virtio::VIRTIO_F_VERSION_1;

const W: u16 = VRING_DESC_F_WRITE as u16;
const QUEUE_LEN: u16 = 16;
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
const BUFFERS: u64 = 0x4_0000;

/// Moves this thread into a new network namespace with `tap0` up in it; false (and the test
/// is skipped, saying why) where that is not allowed.
fn private_tap() -> bool {
    // SAFETY: unshare takes no pointers; it only changes this thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "SKIPPED: needs CAP_SYS_ADMIN for a network namespace: {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    add_tap("tap0")
}

/// Makes TAP `name` in this thread's namespace and brings it up; false (skipped) if `ip` fails.
fn add_tap(name: &str) -> bool {
    // Commands started from this thread run in its namespace.
    let ip = |args: &[&str]| match Command::new("ip").args(args).status() {
        Ok(status) if status.success() => true,
        other => {
            eprintln!("SKIPPED: ip {args:?}: {other:?}");
            false
        }
    };
    if !ip(&["tuntap", "add", "dev", name, "mode", "tap"]) {
        return false;
    }
    // No IPv6 announcements from the namespace's stack: only the test's frames reach the TAP.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    ip(&["link", "set", name, "up"])
}

/// A packet socket on tap0: what it sends reaches the device's TAP fd.
fn host_socket() -> OwnedFd {
    host_socket_on(c"tap0")
}

/// A packet socket on TAP `name`.
fn host_socket_on(name: &std::ffi::CStr) -> OwnedFd {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket takes no pointers; the new fd is owned at once.
    let fd = unsafe {
        OwnedFd::from_raw_fd(libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(protocol),
        ))
    };
    // SAFETY: sockaddr_ll is plain data; zeroes are a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    // SAFETY: if_nametoindex reads the NUL-terminated name.
    addr.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
    // SAFETY: bind reads a sockaddr_ll of the size given.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    fd
}

fn host_send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: send reads `frame.len()` bytes of `frame`.
    let sent = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(sent, frame.len() as isize);
}

/// A frame of `len` bytes from the host, numbered `n`, with an EtherType nothing answers.
fn frame(n: u8, len: usize) -> Vec<u8> {
    let mut frame = vec![n; len];
    frame[..6].copy_from_slice(&[0x06, 0, 0, 0, 0, 2]);
    frame[6..12].copy_from_slice(&[0x06, 0, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    frame
}

/// Waits until TAP `name` has its carrier (which comes with the device's fd, through the
/// kernel's link watch, up to a second later): until then the host's frames are dropped.
fn wait_for_carrier(name: &str) {
    for _ in 0..300 {
        let out = Command::new("ip")
            .args(["link", "show", name])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("LOWER_UP") && text.contains("state UP") {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("{name} never got its carrier");
}

struct Fixture {
    mem: &'static GuestMemoryMmap,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    net: Net,
    next_desc: u16,
}

fn fixture() -> Fixture {
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
    ));
    let rx = MockSplitQueue::create(mem, GuestAddress(RX_RING), QUEUE_LEN);
    let tx = MockSplitQueue::create(mem, GuestAddress(TX_RING), QUEUE_LEN);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut net = Net::new(
        "eth0".into(),
        "tap0",
        Some([6, 0, 0, 0, 0, 2]),
        Default::default(),
        irq,
    )
    .unwrap();
    net.set_acked_features(VIRTIO_F_VERSION_1);
    let queues = vec![
        rx.create_queue::<Queue>().unwrap(),
        tx.create_queue::<Queue>().unwrap(),
    ];
    net.activate(mem.clone(), queues).unwrap();
    // Leak the TX mock's borrow: it only had to lay out the ring.
    std::mem::forget(tx);
    wait_for_carrier("tap0");
    Fixture {
        mem,
        rx,
        net,
        next_desc: 0,
    }
}

impl Fixture {
    /// Posts one receive buffer of `len` bytes at `addr` with `flags`.
    fn post(&mut self, addr: u64, len: u32, flags: u16) {
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0));
        self.rx.add_desc_chains(&[desc], self.next_desc).unwrap();
        self.next_desc += 1;
    }

    /// (id, len) of used entry `n`, and the used index.
    fn used(&self, n: u16) -> (u32, u32, u16) {
        let idx = self.rx.used().idx().load();
        let elem = self.rx.used().ring().ref_at(usize::from(n)).unwrap().load();
        (elem.id(), elem.len(), idx)
    }

    /// Lets the device read the TAP, as the event loop would on its events.
    fn serve(&mut self) {
        // The TAP needs a moment to hand a frame just sent to its reader.
        std::thread::sleep(std::time::Duration::from_millis(20));
        self.net.process_rx();
    }
}

#[test]
fn receive_waits_for_buffers_and_survives_bad_ones() {
    let result = std::thread::spawn(|| {
        if !private_tap() {
            return;
        }
        let host = host_socket();
        let mut f = fixture();
        // No buffer: the frame waits, none is lost.
        host_send(&host, &frame(1, 100));
        f.serve();
        assert_eq!(f.rx.used().idx().load(), 0);
        assert_eq!(f.net.metrics.no_rx_avail_buffer.total(), 1);

        // A buffer the device may not write is returned empty; the frame still waits.
        f.post(BUFFERS, 2048, 0);
        f.serve();
        assert_eq!(f.used(0), (0, 0, 1));
        assert_eq!(f.net.metrics.rx_bad_chain.total(), 1);
        // So is one outside guest memory.
        f.post(0xdead_0000, 2048, W);
        f.serve();
        assert_eq!(f.used(1), (1, 0, 2));

        // A good buffer gets the waiting frame, header first (num_buffers = 1).
        f.post(BUFFERS, 2048, W);
        f.serve();
        let (id, len, idx) = f.used(2);
        assert_eq!((id, len, idx), (2, (VNET_HDR_LEN + 100) as u32, 3));
        let mut got = vec![0u8; VNET_HDR_LEN + 100];
        f.mem.read_slice(&mut got, GuestAddress(BUFFERS)).unwrap();
        assert_eq!(&got[NUM_BUFFERS_OFFSET..VNET_HDR_LEN], &[1, 0]);
        assert_eq!(&got[VNET_HDR_LEN..], &frame(1, 100)[..]);

        // A frame too big for the buffer is dropped, and the buffer serves the next one.
        f.post(BUFFERS, 200, W);
        host_send(&host, &frame(2, 1000));
        host_send(&host, &frame(3, 150));
        f.serve();
        assert_eq!(f.net.metrics.rx_dropped_too_big.total(), 1);
        let (id, len, idx) = f.used(3);
        assert_eq!((id, len, idx), (3, (VNET_HDR_LEN + 150) as u32, 4));
        let mut got = vec![0u8; VNET_HDR_LEN + 150];
        f.mem.read_slice(&mut got, GuestAddress(BUFFERS)).unwrap();
        assert_eq!(&got[VNET_HDR_LEN..VNET_HDR_LEN + 150], &frame(3, 150)[..]);
        assert_eq!(f.net.metrics.rx_packets_count.total(), 2);
        assert!(!f.net.interrupt().needs_reset());
    })
    .join();
    result.unwrap();
}

#[test]
fn an_impossible_available_index_makes_the_device_need_a_reset() {
    std::thread::spawn(|| {
        if !private_tap() {
            return;
        }
        let host = host_socket();
        let mut f = fixture();
        f.rx.avail().idx().store(QUEUE_LEN * 4);
        host_send(&host, &frame(1, 60));
        f.serve();
        assert!(
            f.net.interrupt().needs_reset(),
            "{:?}",
            crate::metrics::Deltas::take_deltas(f.net.metrics.as_ref())
        );
        assert!(f.net.common.active().is_none());
    })
    .join()
    .unwrap();
}

/// The state saved from the fixture's device, which must be there.
fn saved(net: &Net) -> VirtioDeviceState {
    net.save_state().expect("virtio-net saves its state")
}

#[test]
fn a_restored_interface_goes_on_from_the_saved_positions_on_another_tap() {
    std::thread::spawn(|| {
        if !private_tap() || !add_tap("tap1") {
            return;
        }
        let host = host_socket();
        let mut f = fixture();
        f.post(BUFFERS, 2048, W);
        host_send(&host, &frame(1, 100));
        f.serve();
        assert_eq!(f.used(0), (0, (VNET_HDR_LEN + 100) as u32, 1));
        // No buffer for this one: the device holds it when the snapshot is taken.
        host_send(&host, &frame(2, 100));
        f.serve();
        assert!(f.net.rx_pending.is_some());

        let state = saved(&f.net);
        assert_eq!(
            state.specific,
            DeviceSpecificState::Net {
                iface_id: "eth0".into(),
                mac: Some([6, 0, 0, 0, 0, 2]),
                rx_rate_limiter: Default::default(),
                tx_rate_limiter: Default::default(),
            }
        );
        assert_eq!(state.acked_features, VIRTIO_F_VERSION_1);
        let queues = state
            .queues
            .clone()
            .expect("an active device saves its queues");
        assert_eq!(queues.len(), 2);
        assert_eq!((queues[0].next_avail, queues[0].next_used), (1, 1));

        // As a restore in a fresh process with a network override: the same interface on
        // another TAP, the old device gone.
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut restored = Net::new(
            "eth0".into(),
            "tap1",
            Some([6, 0, 0, 0, 0, 2]),
            Default::default(),
            irq,
        )
        .unwrap();
        restored.restore_state(f.mem.clone(), &state).unwrap();
        assert_eq!(saved(&restored), state, "the state round-trips");
        // The event loop is asked to serve both queues: the driver may have posted buffers
        // and frames since the snapshot's last notification.
        for event in restored.queue_events() {
            assert_eq!(event.read().unwrap(), 1);
        }
        f.net = restored;
        wait_for_carrier("tap1");

        // The held frame was lost with the old monitor; the next one from the new TAP fills
        // the next buffer of the ring.
        let host = host_socket_on(c"tap1");
        f.post(BUFFERS, 2048, W);
        host_send(&host, &frame(3, 120));
        f.serve();
        assert_eq!(f.used(1), (1, (VNET_HDR_LEN + 120) as u32, 2));
        let mut got = vec![0u8; 120];
        f.mem
            .read_slice(&mut got, GuestAddress(BUFFERS + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, frame(3, 120));
        assert!(!f.net.interrupt().needs_reset());
    })
    .join()
    .unwrap();
}

#[test]
fn a_snapshot_of_another_interface_mac_or_device_is_refused() {
    std::thread::spawn(|| {
        if !private_tap() || !add_tap("tap1") {
            return;
        }
        let f = fixture();
        let state = saved(&f.net);
        let restore = |id: &str, mac: Option<[u8; 6]>, state: &VirtioDeviceState| {
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            let mut net = Net::new(id.into(), "tap1", mac, Default::default(), irq).unwrap();
            let result = net.restore_state(f.mem.clone(), state);
            assert!(
                net.common.active().is_none(),
                "a refused state leaves the device stopped"
            );
            result
        };
        let mac = Some([6, 0, 0, 0, 0, 2]);
        match restore("eth0", Some([6, 0, 0, 0, 0, 9]), &state) {
            Err(DeviceStateError::Mismatch { what, saved, built }) => {
                assert_eq!(what, "MAC address");
                assert_eq!(
                    (saved.as_str(), built.as_str()),
                    ("06:00:00:00:00:02", "06:00:00:00:00:09")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            restore("eth0", None, &state),
            Err(DeviceStateError::Mismatch {
                what: "MAC address",
                ..
            })
        ));
        assert!(matches!(
            restore("eth1", mac, &state),
            Err(DeviceStateError::Mismatch {
                what: "network interface id",
                ..
            })
        ));
        let mut one_queue = state.clone();
        one_queue.queues.as_mut().unwrap().pop();
        assert!(matches!(
            restore("eth0", mac, &one_queue),
            Err(DeviceStateError::QueueCount { saved: 1, built: 2 })
        ));
        let mut block = state.clone();
        block.device_type = crate::virtio::TYPE_BLOCK;
        block.specific = DeviceSpecificState::Block {
            drive_id: "eth0".into(),
            config_generation: 0,
            rate_limiter: Default::default(),
        };
        assert!(matches!(
            restore("eth0", mac, &block),
            Err(DeviceStateError::TypeMismatch { .. })
        ));
        // A device the driver had not started comes back not started, serving nothing.
        let mut idle = state.clone();
        idle.queues = None;
        assert!(restore("eth0", mac, &idle).is_ok());
    })
    .join()
    .unwrap();
}

#[test]
fn the_interface_offers_event_idx() {
    std::thread::spawn(|| {
        if !private_tap() {
            return;
        }
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut net = Net::new("eth0".into(), "tap0", None, Default::default(), irq).unwrap();
        let offered = net.avail_features();
        assert_eq!(offered & COMMON_FEATURES, COMMON_FEATURES);
        assert_eq!(
            offered & 1 << VIRTIO_NET_F_MTU,
            0,
            "no MTU unless configured"
        );
        // An MTU: the feature, and the field after max_virtqueue_pairs (1).
        net.set_mtu(9000);
        assert_ne!(net.avail_features() & 1 << VIRTIO_NET_F_MTU, 0);
        let mut field = [0u8; 4];
        net.read_config(8, &mut field);
        assert_eq!(field, [1, 0, 0x28, 0x23]);
    })
    .join()
    .unwrap();
}

/// An ARP request from the guest for the MMDS address (the guest is 10.0.0.2).
fn mmds_arp_request() -> Vec<u8> {
    let mut arp = vec![0u8; 42];
    arp[..6].fill(0xff);
    arp[6..12].copy_from_slice(&[6, 0, 0, 0, 0, 2]);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp[22..28].copy_from_slice(&[6, 0, 0, 0, 0, 2]);
    arp[28..32].copy_from_slice(&[10, 0, 0, 2]);
    arp[38..42].copy_from_slice(&crate::mmds::DEFAULT_IPV4_ADDR.octets());
    arp
}

#[test]
fn mmds_answers_and_tap_frames_share_the_receive_queue_and_neither_is_lost() {
    std::thread::spawn(|| {
        if !private_tap() {
            return;
        }
        let host = host_socket();
        let mut f = fixture();
        let mmds = crate::mmds::Mmds::shared(1024);
        f.net
            .set_mmds(MmdsStack::new(crate::mmds::DEFAULT_IPV4_ADDR, mmds).unwrap());
        // A TAP frame waits for a buffer; MMDS's answer to an ARP comes meanwhile.
        host_send(&host, &frame(1, 100));
        f.serve();
        assert_eq!(f.rx.used().idx().load(), 0);
        if let Some(stack) = f.net.mmds.as_mut() {
            stack.receive(&mmds_arp_request());
        }
        // The frame held first, then MMDS's answer.
        f.post(BUFFERS, 2048, W);
        f.post(BUFFERS + 0x1000, 2048, W);
        f.serve();
        let (_, len, idx) = f.used(0);
        assert_eq!((len, idx), ((VNET_HDR_LEN + 100) as u32, 2));
        let (_, len, _) = f.used(1);
        assert_eq!(len, (VNET_HDR_LEN + 42) as u32);
        let mut reply = vec![0u8; 42];
        f.mem
            .read_slice(
                &mut reply,
                GuestAddress(BUFFERS + 0x1000 + VNET_HDR_LEN as u64),
            )
            .unwrap();
        assert_eq!(&reply[..6], &[6, 0, 0, 0, 0, 2], "to the guest");
        assert_eq!(&reply[6..12], &crate::mmds::stack::MMDS_MAC, "from MMDS");
        assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
        // Only the TAP's frame counts as the interface's.
        assert_eq!(f.net.metrics.rx_packets_count.total(), 1);
    })
    .join()
    .unwrap();
}
