//! A polling virtio-net driver: a receive and a transmit queue, 2 KiB buffers (a 12-byte
//! virtio-net header and one frame each), ARP and ICMP echo answers for an IPv4 address, and
//! a bulk mode of raw Ethernet frames (EtherType 0x88b5, local experimental) with sequence
//! numbers and a checksum, for transfers and the benchmark.

use core::ptr::addr_of_mut;
use core::sync::atomic::{fence, Ordering};

use crate::port::{read_phys, write_phys};
use crate::virtio::{
    slot_base, Descriptor, QueueMemory, DESC_F_WRITE, F_VERSION_1, QUEUE_SIZE, REG_CONFIG,
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};

const TYPE_NET: u32 = 1;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const S_LINK_UP: u16 = 1;
/// The MAC the probe uses when the device offers none.
const DEFAULT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

// virtio-mmio registers (virtio 1.2, 4.2.2) this driver needs beyond virtio.rs's.
const REG_MAGIC: u64 = 0x000;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u32 = 1;

pub const HDR_LEN: usize = 12;
const BUF_LEN: usize = 2048;
/// Receive and transmit buffers posted at once.
pub const RX_COUNT: usize = 128;
const TX_COUNT: usize = 128;
pub const ETH_HLEN: usize = 14;
/// The longest frame the probe sends or takes (no jumbo frames, no offloads).
pub const FRAME_MAX: usize = 1514;

pub const ETHERTYPE_BULK: u16 = 0x88b5;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
/// Bulk frame kinds (the byte after the EtherType).
pub const KIND_DATA: u8 = 1;
pub const KIND_CREDIT: u8 = 2;
/// Bulk header after the Ethernet header: kind, reserved, sequence (u32 LE), count (u32 LE).
pub const BULK_HLEN: usize = 10;

#[repr(C, align(4096))]
struct Buffers([[u8; BUF_LEN]; RX_COUNT + TX_COUNT]);

static mut RX_QUEUE: QueueMemory = QueueMemory::new();
static mut TX_QUEUE: QueueMemory = QueueMemory::new();
static mut BUFFERS: Buffers = Buffers([[0; BUF_LEN]; RX_COUNT + TX_COUNT]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetError {
    NoDevice,
    WrongDevice(u32),
    FeaturesRefused,
    QueueTooSmall(u32),
    NotStarted(u32),
    Timeout,
}

fn reg(base: u64, offset: u64) -> u32 {
    read_phys(base + offset)
}

fn set_reg(base: u64, offset: u64, value: u32) {
    write_phys(base + offset, value);
}

fn buffer_addr(index: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of_mut!(BUFFERS.0[index]) as u64 }
}

/// A time stamp counter read: CPL 3 may read it, and it never exits.
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc only reads the counter into two registers.
    unsafe { core::arch::asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack)) };
    u64::from(high) << 32 | u64::from(low)
}

/// One split queue, polled.
struct Ring {
    mem: &'static mut QueueMemory,
    index: u32,
    next_avail: u16,
    last_used: u16,
}

impl Ring {
    fn set_descriptor(&mut self, index: usize, desc: Descriptor) {
        write_phys(&self.mem.desc[index] as *const _ as u64, desc);
    }

    /// Makes chain `head` available (without telling the device).
    fn publish(&mut self, head: u16) {
        let slot = 2 + (self.next_avail % QUEUE_SIZE) as usize;
        write_phys(&self.mem.avail.0[slot] as *const u16 as u64, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        write_phys(&self.mem.avail.0[1] as *const u16 as u64, self.next_avail);
    }

    /// Whether the device asks to be told of new buffers (it clears VIRTQ_USED_F_NO_NOTIFY).
    fn device_wants_notification(&self) -> bool {
        let flags: u32 = read_phys(self.mem.used.0.as_ptr() as u64);
        flags & USED_F_NO_NOTIFY == 0
    }

    /// Tells the device of new buffers unless it said it is looking already.
    fn kick(&self, base: u64) {
        // The new index must be visible before the flags are read (see virtio.rs).
        fence(Ordering::SeqCst);
        if self.device_wants_notification() {
            set_reg(base, REG_QUEUE_NOTIFY, self.index);
        }
    }

    /// How many used elements wait to be taken.
    fn used_waiting(&self) -> u16 {
        let used_idx: u16 = read_phys(self.mem.used.0.as_ptr() as u64 + 2);
        used_idx.wrapping_sub(self.last_used)
    }

    /// The next used element (head, length), if the device returned one.
    fn poll_used(&mut self) -> Option<(u16, u32)> {
        if self.used_waiting() == 0 {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = (self.last_used % QUEUE_SIZE) as usize;
        let id: u32 = read_phys(&self.mem.used.0[1 + 2 * slot] as *const u32 as u64);
        let len: u32 = read_phys(&self.mem.used.0[2 + 2 * slot] as *const u32 as u64);
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    fn set_up(&mut self, base: u64) -> Result<(), NetError> {
        set_reg(base, REG_QUEUE_SEL, self.index);
        let max = reg(base, REG_QUEUE_NUM_MAX);
        if max < u32::from(QUEUE_SIZE) {
            return Err(NetError::QueueTooSmall(max));
        }
        self.mem.avail.0.fill(0);
        // The probe polls: no interrupts, please.
        self.mem.avail.0[0] = AVAIL_F_NO_INTERRUPT;
        self.mem.used.0.fill(0);
        set_reg(base, REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
        for (offset, addr) in [
            (REG_QUEUE_DESC_LOW, self.mem.desc.as_ptr() as u64),
            (REG_QUEUE_DRIVER_LOW, self.mem.avail.0.as_ptr() as u64),
            (REG_QUEUE_DEVICE_LOW, self.mem.used.0.as_ptr() as u64),
        ] {
            set_reg(base, offset, addr as u32);
            set_reg(base, offset + 4, (addr >> 32) as u32);
        }
        set_reg(base, REG_QUEUE_READY, 1);
        Ok(())
    }
}

pub struct Net {
    base: u64,
    rx: Ring,
    tx: Ring,
    pub mac: [u8; 6],
    pub link_up: bool,
    pub features: u64,
    /// Transmit buffers handed to the device and not yet returned.
    tx_in_flight: usize,
    tx_next: usize,
    /// Receive buffers taken back from the device and not yet reposted.
    rx_held: usize,
}

/// A received frame: the buffer it sits in and its length (without the header).
pub struct Received {
    id: u16,
    pub len: usize,
}

impl Received {
    /// The frame's bytes.
    pub fn frame(&self) -> &'static [u8] {
        let addr = buffer_addr(usize::from(self.id)) + HDR_LEN as u64;
        // SAFETY: the buffer is the probe's own static memory; the device has returned it and
        // will not write it again until it is reposted, which needs the `Received` back.
        unsafe { core::slice::from_raw_parts(addr as *const u8, self.len.min(BUF_LEN - HDR_LEN)) }
    }
}

impl Net {
    /// Finds the virtio-net device in `slot`, starts it and posts every receive buffer.
    pub fn start(slot: u64) -> Result<Self, NetError> {
        let base = slot_base(slot);
        if reg(base, REG_MAGIC) != 0x7472_6976 {
            return Err(NetError::NoDevice);
        }
        let id = reg(base, REG_DEVICE_ID);
        if id != TYPE_NET {
            return Err(NetError::WrongDevice(id));
        }
        set_reg(base, REG_STATUS, 0);
        set_reg(base, REG_STATUS, STATUS_ACKNOWLEDGE);
        set_reg(base, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        set_reg(base, REG_DEVICE_FEATURES_SEL, 0);
        let low = u64::from(reg(base, REG_DEVICE_FEATURES));
        set_reg(base, REG_DEVICE_FEATURES_SEL, 1);
        let offered = low | u64::from(reg(base, REG_DEVICE_FEATURES)) << 32;
        let features = offered & (F_VERSION_1 | F_MAC | F_STATUS);
        set_reg(base, REG_DRIVER_FEATURES_SEL, 0);
        set_reg(base, REG_DRIVER_FEATURES, features as u32);
        set_reg(base, REG_DRIVER_FEATURES_SEL, 1);
        set_reg(base, REG_DRIVER_FEATURES, (features >> 32) as u32);
        let up_to_features = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        set_reg(base, REG_STATUS, up_to_features);
        if reg(base, REG_STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(NetError::FeaturesRefused);
        }
        // SAFETY: the probe is single-threaded and starts one net device per step sequence;
        // each queue's memory goes to exactly one ring.
        let (rx_mem, tx_mem) =
            unsafe { (&mut *addr_of_mut!(RX_QUEUE), &mut *addr_of_mut!(TX_QUEUE)) };
        let mut rx = Ring {
            mem: rx_mem,
            index: 0,
            next_avail: 0,
            last_used: 0,
        };
        let mut tx = Ring {
            mem: tx_mem,
            index: 1,
            next_avail: 0,
            last_used: 0,
        };
        rx.set_up(base)?;
        tx.set_up(base)?;
        for i in 0..RX_COUNT {
            rx.set_descriptor(
                i,
                Descriptor {
                    addr: buffer_addr(i),
                    len: BUF_LEN as u32,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            );
            rx.publish(i as u16);
        }
        set_reg(base, REG_STATUS, up_to_features | STATUS_DRIVER_OK);
        let status = reg(base, REG_STATUS);
        if status & STATUS_DRIVER_OK == 0 {
            return Err(NetError::NotStarted(status));
        }
        let mac = if features & F_MAC != 0 {
            read_phys(base + REG_CONFIG)
        } else {
            DEFAULT_MAC
        };
        let link_up =
            features & F_STATUS == 0 || read_phys::<u16>(base + REG_CONFIG + 6) & S_LINK_UP != 0;
        Ok(Self {
            base,
            rx,
            tx,
            mac,
            link_up,
            features,
            tx_in_flight: 0,
            tx_next: 0,
            rx_held: 0,
        })
    }

    /// Takes back transmit buffers the device is done with.
    fn reap_tx(&mut self) {
        while self.tx.poll_used().is_some() {
            self.tx_in_flight -= 1;
        }
    }

    /// The next transmit slot, once the device has returned it.
    fn take_tx_slot(&mut self) -> Result<usize, NetError> {
        let mut polls = 0u64;
        while self.tx_in_flight == TX_COUNT {
            self.reap_tx();
            polls += 1;
            if polls > POLL_LIMIT {
                return Err(NetError::Timeout);
            }
            core::hint::spin_loop();
        }
        let index = self.tx_next;
        self.tx_next = (self.tx_next + 1) % TX_COUNT;
        Ok(index)
    }

    fn submit_tx(&mut self, index: usize, desc: Descriptor, kick: bool) {
        self.tx.set_descriptor(index, desc);
        self.tx.publish(index as u16);
        self.tx_in_flight += 1;
        if kick {
            self.tx.kick(self.base);
        }
    }

    /// Sends a frame that `fill` writes into the buffer it gets (at most FRAME_MAX bytes;
    /// returns the length). Tells the device when `kick` is set; otherwise a later send
    /// does. Waits for a free buffer if all are with the device.
    pub fn send(
        &mut self,
        kick: bool,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<(), NetError> {
        // A plain header: no offloads, one buffer.
        self.send_with_header_kick([0; HDR_LEN], kick, fill)
    }

    /// Sends a frame led by `header` (which may ask for anything), with a notification.
    pub fn send_with_header(
        &mut self,
        header: [u8; HDR_LEN],
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<(), NetError> {
        self.send_with_header_kick(header, true, fill)
    }

    fn send_with_header_kick(
        &mut self,
        header: [u8; HDR_LEN],
        kick: bool,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<(), NetError> {
        let index = self.take_tx_slot()?;
        let addr = buffer_addr(RX_COUNT + index);
        // SAFETY: the buffer is the probe's own; the device has returned it (in flight < all).
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, BUF_LEN) };
        buf[..HDR_LEN].copy_from_slice(&header);
        let len = fill(&mut buf[HDR_LEN..HDR_LEN + FRAME_MAX]).min(FRAME_MAX);
        let desc = Descriptor {
            addr,
            len: (HDR_LEN + len) as u32,
            flags: 0,
            next: 0,
        };
        self.submit_tx(index, desc, kick);
        Ok(())
    }

    /// Puts `desc` (anything the caller makes up) in the transmit queue as a chain of one.
    pub fn send_raw(&mut self, desc: Descriptor) -> Result<(), NetError> {
        let index = self.take_tx_slot()?;
        self.submit_tx(index, desc, true);
        Ok(())
    }

    /// Waits until the device has sent every frame.
    pub fn drain_tx(&mut self) -> Result<(), NetError> {
        let mut polls = 0u64;
        while self.tx_in_flight > 0 {
            self.reap_tx();
            polls += 1;
            if polls > POLL_LIMIT {
                return Err(NetError::Timeout);
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// A received frame, if one came.
    pub fn poll_rx(&mut self) -> Option<Received> {
        let (id, len) = self.rx.poll_used()?;
        self.rx_held += 1;
        Some(Received {
            id,
            len: (len as usize).saturating_sub(HDR_LEN),
        })
    }

    /// Waits, taking nothing, until the device has filled every receive buffer and then met the
    /// empty ring with a frame in hand, or the time stamp counter passes `until`; says whether
    /// it did. mote's device turns notifications off while it delivers and back on only when
    /// it holds a frame and finds no buffer, so a filled ring with notifications on is that.
    pub fn wait_rx_exhausted(&self, until: u64) -> bool {
        while usize::from(self.rx.used_waiting()) + self.rx_held < RX_COUNT
            || !self.rx.device_wants_notification()
        {
            if rdtsc() > until {
                return false;
            }
            core::hint::spin_loop();
        }
        true
    }

    /// Gives a receive buffer back to the device; tells it when `kick` is set.
    pub fn repost(&mut self, received: Received, kick: bool) {
        self.rx.publish(received.id);
        self.rx_held -= 1;
        if kick {
            self.rx.kick(self.base);
        }
    }

    /// Tells the device of reposted receive buffers.
    pub fn kick_rx(&self) {
        self.rx.kick(self.base);
    }
}

/// Polls of a ring before an operation counts as lost (seconds at native speed).
const POLL_LIMIT: u64 = 2_000_000_000;

/// The ones' complement sum of `bytes` (Internet checksum), folded and inverted.
pub fn inet_checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// What `answer` did with a frame.
pub enum Answer {
    Arp,
    Echo,
    Ignored,
}

/// Answers an ARP request for `ip` or an ICMP echo request to `ip`, writing the reply into
/// `out`; returns what it did and the reply's length.
pub fn answer(frame: &[u8], mac: &[u8; 6], ip: [u8; 4], out: &mut [u8]) -> (Answer, usize) {
    if frame.len() < ETH_HLEN {
        return (Answer::Ignored, 0);
    }
    match be16(frame, 12) {
        ETHERTYPE_ARP if frame.len() >= ETH_HLEN + 28 => {
            let arp = &frame[ETH_HLEN..];
            // Ethernet/IPv4 request for our address.
            if be16(arp, 0) != 1 || be16(arp, 2) != ETHERTYPE_IPV4 || be16(arp, 6) != 1 {
                return (Answer::Ignored, 0);
            }
            if arp[24..28] != ip {
                return (Answer::Ignored, 0);
            }
            let len = ETH_HLEN + 28;
            out[..len].copy_from_slice(&frame[..len]);
            out[0..6].copy_from_slice(&arp[8..14]);
            out[6..12].copy_from_slice(mac);
            let reply = &mut out[ETH_HLEN..len];
            reply[6..8].copy_from_slice(&2u16.to_be_bytes());
            reply[8..14].copy_from_slice(mac);
            reply[14..18].copy_from_slice(&ip);
            reply[18..24].copy_from_slice(&arp[8..14]);
            reply[24..28].copy_from_slice(&arp[14..18]);
            (Answer::Arp, len)
        }
        ETHERTYPE_IPV4 if frame.len() >= ETH_HLEN + 20 => {
            let ipv4 = &frame[ETH_HLEN..];
            let ihl = usize::from(ipv4[0] & 0xf) * 4;
            let total = usize::from(be16(ipv4, 2));
            if ipv4[0] >> 4 != 4 || ihl < 20 || total < ihl + 8 || total > ipv4.len() {
                return (Answer::Ignored, 0);
            }
            // ICMP echo request to us.
            if ipv4[9] != 1 || ipv4[16..20] != ip || ipv4[ihl] != 8 {
                return (Answer::Ignored, 0);
            }
            let len = ETH_HLEN + total;
            if len > out.len() {
                return (Answer::Ignored, 0);
            }
            out[..len].copy_from_slice(&frame[..len]);
            out[0..6].copy_from_slice(&frame[6..12]);
            out[6..12].copy_from_slice(mac);
            let reply = &mut out[ETH_HLEN..len];
            reply[12..16].copy_from_slice(&ipv4[16..20]);
            reply[16..20].copy_from_slice(&ipv4[12..16]);
            reply[8] = 64;
            reply[10..12].fill(0);
            let ip_sum = inet_checksum(&reply[..ihl]);
            reply[10..12].copy_from_slice(&ip_sum.to_be_bytes());
            let icmp = &mut reply[ihl..total];
            icmp[0] = 0;
            icmp[2..4].fill(0);
            let icmp_sum = inet_checksum(icmp);
            icmp[2..4].copy_from_slice(&icmp_sum.to_be_bytes());
            (Answer::Echo, len)
        }
        _ => (Answer::Ignored, 0),
    }
}

/// Byte `i` of bulk frame `seq`'s payload (the tests compute the same).
pub fn bulk_byte(seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(131) as usize ^ i.wrapping_mul(7) ^ (i >> 8)) as u8
}

/// FNV-1a over the payload bytes of every bulk frame, in sequence order.
pub struct Checksum(pub u64);

impl Checksum {
    pub const fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub fn add(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Writes the Ethernet and bulk headers of a frame from `src` to broadcast.
pub fn bulk_header(buf: &mut [u8], src: &[u8; 6], kind: u8, seq: u32, count: u32) {
    buf[0..6].fill(0xff);
    buf[6..12].copy_from_slice(src);
    buf[12..14].copy_from_slice(&ETHERTYPE_BULK.to_be_bytes());
    buf[14] = kind;
    buf[15] = 0;
    buf[16..20].copy_from_slice(&seq.to_le_bytes());
    buf[20..24].copy_from_slice(&count.to_le_bytes());
}

/// A bulk frame's kind and sequence number, if it is one.
pub fn parse_bulk(frame: &[u8]) -> Option<(u8, u32)> {
    if frame.len() < ETH_HLEN + BULK_HLEN || be16(frame, 12) != ETHERTYPE_BULK {
        return None;
    }
    let seq = u32::from_le_bytes([frame[16], frame[17], frame[18], frame[19]]);
    Some((frame[14], seq))
}
