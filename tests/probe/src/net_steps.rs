//! The `net-…` steps: start the device, answer ping, bulk transfers both ways, the benchmark,
//! and malformed transmit chains.

use crate::net::{
    answer, bulk_byte, bulk_header, parse_bulk, rdtsc, Answer, Checksum, Net, NetError, BULK_HLEN,
    ETH_HLEN, FRAME_MAX, HDR_LEN, KIND_CREDIT, KIND_DATA, RX_COUNT,
};
use crate::report;
use crate::virtio::Descriptor;

/// Time stamp counter ticks per second, as an upper bound (no host is faster than 4 GHz), so a
/// limit in seconds lasts at least that long.
const TSC_PER_SEC: u64 = 4_000_000_000;
/// Frames between two credit frames in `net-recv`.
const CREDIT_EVERY: u32 = 32;
/// An address no guest of these tests has memory at.
const NOWHERE: u64 = 0xdead_0000_0000;

fn deadline(seconds: u64) -> u64 {
    rdtsc().saturating_add(seconds.saturating_mul(TSC_PER_SEC))
}

pub fn parse_ip(text: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = text.split(|b| *b == b'.');
    for byte in &mut ip {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        *byte = part
            .iter()
            .fold(0u32, |n, b| n * 10 + u32::from(b - b'0'))
            .try_into()
            .ok()?;
    }
    parts.next().is_none().then_some(ip)
}

struct Mac<'a>(&'a [u8; 6]);

impl core::fmt::Display for Mac<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d, e, g] = *self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

pub fn init(slot: u64) -> Option<Net> {
    match Net::start(slot) {
        Ok(net) => {
            report!(
                "net-init mac={} link={} features={:#x}",
                Mac(&net.mac),
                if net.link_up { "up" } else { "down" },
                net.features
            );
            Some(net)
        }
        Err(err) => {
            report!("net-init error {err:?}");
            None
        }
    }
}

/// Runs one `net-…` step other than `net-init`.
pub fn step<'a>(net: &mut Net, name: &str, args: &mut impl Iterator<Item = &'a [u8]>) {
    let mut num = |default: u64| crate::steps::parse_u64(args.next()).unwrap_or(default);
    let result = match name {
        "net-serve" => {
            // IP comes first and is not a number: parse it before the rest.
            return serve_step(net, args);
        }
        "net-send" => {
            let count = num(1) as u32;
            let batch = num(1).max(1) as u32;
            let len = (num(FRAME_MAX as u64) as usize).clamp(ETH_HLEN + BULK_HLEN, FRAME_MAX);
            send(net, count, batch, len, true)
        }
        "net-recv" => {
            let count = num(1) as u32;
            let seconds = num(60);
            recv(net, count, seconds)
        }
        "net-bench" => {
            let direction = args.next().unwrap_or_default();
            let count = crate::steps::parse_u64(args.next()).unwrap_or(1000) as u32;
            let batch = crate::steps::parse_u64(args.next()).unwrap_or(1).max(1) as u32;
            match direction {
                b"tx" => send(net, count, batch, FRAME_MAX, false),
                b"rx" => bench_rx(net, count, batch),
                _ => {
                    report!("error net-bench needs tx or rx");
                    Ok(())
                }
            }
        }
        "net-hostile" => {
            let case = args.next().unwrap_or_default();
            hostile(net, case)
        }
        _ => {
            report!("error unknown step {name}");
            Ok(())
        }
    };
    if let Err(err) = result {
        report!("{name} error {err:?}");
    }
}

fn serve_step<'a>(net: &mut Net, args: &mut impl Iterator<Item = &'a [u8]>) {
    let Some(ip) = args.next().and_then(parse_ip) else {
        report!("error net-serve needs an IPv4 address");
        return;
    };
    let want = crate::steps::parse_u64(args.next()).unwrap_or(1);
    let seconds = crate::steps::parse_u64(args.next()).unwrap_or(60);
    if let Err(err) = serve(net, ip, want, seconds) {
        report!("net-serve error {err:?}");
    }
}

/// `net-serve:IP:N[:SECONDS]`: answers ARP and ICMP echo for IP until N echo requests were
/// answered or SECONDS passed.
fn serve(net: &mut Net, ip: [u8; 4], want: u64, seconds: u64) -> Result<(), NetError> {
    let [a, b, c, d] = ip;
    report!("net-serve ready ip={a}.{b}.{c}.{d}");
    let end = deadline(seconds);
    let (mut echoes, mut arps) = (0u64, 0u64);
    let mut reply = [0u8; FRAME_MAX];
    while echoes < want {
        let Some(received) = net.poll_rx() else {
            if rdtsc() > end {
                report!("net-serve timeout answered={echoes} arp={arps}");
                return Ok(());
            }
            core::hint::spin_loop();
            continue;
        };
        let mac = net.mac;
        let (what, len) = answer(received.frame(), &mac, ip, &mut reply);
        net.repost(received, true);
        match what {
            Answer::Arp => arps += 1,
            Answer::Echo => echoes += 1,
            Answer::Ignored => continue,
        }
        net.send(true, |buf| {
            buf[..len].copy_from_slice(&reply[..len]);
            len
        })?;
    }
    net.drain_tx()?;
    report!("net-serve answered={echoes} arp={arps}");
    Ok(())
}

/// `net-send:COUNT:BATCH[:LEN]` and `net-bench:tx:COUNT:BATCH`: COUNT bulk frames of LEN bytes,
/// a notification every BATCH frames. With `checked`, every payload byte follows the pattern
/// and goes into the checksum; the benchmark only numbers its frames.
fn send(net: &mut Net, count: u32, batch: u32, len: usize, checked: bool) -> Result<(), NetError> {
    let tag = if checked { "net-send" } else { "net-bench" };
    report!("{tag} start");
    let mut sum = Checksum::new();
    let src = net.mac;
    let payload = len - ETH_HLEN - BULK_HLEN;
    for seq in 0..count {
        let kick = (seq + 1) % batch == 0 || seq + 1 == count;
        net.send(kick, |buf| {
            bulk_header(buf, &src, KIND_DATA, seq, count);
            if checked {
                let data = &mut buf[ETH_HLEN + BULK_HLEN..len];
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = bulk_byte(seq, i);
                }
                sum.add(data);
            }
            len
        })?;
    }
    net.drain_tx()?;
    report!(
        "{tag} done frames={count} bytes={} sum={:#018x}",
        u64::from(count) * payload as u64,
        sum.0
    );
    Ok(())
}

/// Sends a credit frame: the host may send up to `received` + its window.
fn credit(net: &mut Net, received: u32) -> Result<(), NetError> {
    let src = net.mac;
    net.send(true, |buf| {
        bulk_header(buf, &src, KIND_CREDIT, received, 0);
        ETH_HLEN + BULK_HLEN
    })
}

/// `net-recv:COUNT[:SECONDS]`: takes COUNT bulk data frames, checking their order and summing
/// their payloads, and grants the host credit as it goes.
fn recv(net: &mut Net, count: u32, seconds: u64) -> Result<(), NetError> {
    report!("net-recv ready");
    credit(net, 0)?;
    let end = deadline(seconds);
    // The host may send twice as many frames as the guest has buffers: take none until the
    // device has filled every one and met the empty ring with the next frame in hand, so that
    // it must wait for the guest (the test checks the device counted that and dropped nothing).
    if count as usize > RX_COUNT && !net.wait_rx_exhausted(end) {
        report!("net-recv timeout frames=0");
        return Ok(());
    }
    let mut sum = Checksum::new();
    let (mut received, mut bytes, mut out_of_order, mut bad) = (0u32, 0u64, 0u32, 0u32);
    let mut last_credit = rdtsc();
    while received < count {
        let Some(frame) = net.poll_rx() else {
            let now = rdtsc();
            if now > end {
                report!("net-recv timeout frames={received}");
                return Ok(());
            }
            // A lost credit frame must not stall the transfer: repeat it now and then.
            if now - last_credit > TSC_PER_SEC / 10 {
                credit(net, received)?;
                last_credit = now;
            }
            core::hint::spin_loop();
            continue;
        };
        let data = frame.frame();
        if let Some((KIND_DATA, seq)) = parse_bulk(data) {
            if seq != received {
                out_of_order += 1;
            }
            let payload = &data[ETH_HLEN + BULK_HLEN..];
            if payload
                .iter()
                .enumerate()
                .any(|(i, byte)| *byte != bulk_byte(seq, i))
            {
                bad += 1;
            }
            sum.add(payload);
            bytes += payload.len() as u64;
            received += 1;
        }
        net.repost(frame, true);
        if received % CREDIT_EVERY == 0 {
            credit(net, received)?;
            last_credit = rdtsc();
        }
    }
    net.drain_tx()?;
    report!(
        "net-recv done frames={received} bytes={bytes} sum={:#018x} out_of_order={out_of_order} bad={bad}",
        sum.0
    );
    Ok(())
}

/// `net-bench:rx:COUNT:BATCH`: takes COUNT bulk data frames as fast as they come, giving
/// buffers back to the device BATCH at a time (one notification per batch, when it asks).
fn bench_rx(net: &mut Net, count: u32, batch: u32) -> Result<(), NetError> {
    report!("net-bench start");
    let end = deadline(120);
    let (mut received, mut since_kick) = (0u32, 0u32);
    while received < count {
        let Some(frame) = net.poll_rx() else {
            if since_kick > 0 {
                // Nothing more is coming for now: hand back what we hold.
                net.kick_rx();
                since_kick = 0;
            }
            if rdtsc() > end {
                report!("net-bench timeout frames={received}");
                return Ok(());
            }
            core::hint::spin_loop();
            continue;
        };
        if let Some((KIND_DATA, _)) = parse_bulk(frame.frame()) {
            received += 1;
        }
        since_kick += 1;
        let kick = since_kick == batch;
        net.repost(frame, kick);
        if kick {
            since_kick = 0;
        }
    }
    report!("net-bench done frames={received}");
    Ok(())
}

/// `net-hostile:CASE`: one malformed transmit chain, then a good bulk frame (sequence 1) to
/// show the device still serves.
fn hostile(net: &mut Net, case: &[u8]) -> Result<(), NetError> {
    let src = net.mac;
    let mut chain = [0u8; FRAME_MAX];
    bulk_header(&mut chain, &src, KIND_DATA, 0, 1);
    let len = ETH_HLEN + BULK_HLEN;
    let raw = match case {
        // A frame buffer where the guest has no memory.
        b"oob" => Some(Descriptor {
            addr: NOWHERE,
            len: 64,
            flags: 0,
            next: 0,
        }),
        // A transmit buffer marked device-writable.
        b"writable" => Some(Descriptor {
            addr: 0x10_0000,
            len: 64,
            flags: crate::virtio::DESC_F_WRITE,
            next: 0,
        }),
        // Shorter than the virtio-net header.
        b"short-header" => Some(Descriptor {
            addr: 0x10_0000,
            len: (HDR_LEN - 4) as u32,
            flags: 0,
            next: 0,
        }),
        // More than 64 KiB (the guest's first MiB is there to point at).
        b"oversized" => Some(Descriptor {
            addr: 0x1000,
            len: 70_000,
            flags: 0,
            next: 0,
        }),
        _ => None,
    };
    match (case, raw) {
        (_, Some(desc)) => net.send_raw(desc)?,
        (b"bad-gso", None) => {
            // TSO that was never negotiated (and no checksum offload either).
            net.send_with_header([0, 1, 54, 0, 0, 0, 34, 0, 16, 0, 1, 0], |buf| {
                buf[..len].copy_from_slice(&chain[..len]);
                len
            })?
        }
        _ => {
            report!(
                "error unknown hostile case {}",
                core::str::from_utf8(case).unwrap_or("?")
            );
            return Ok(());
        }
    }
    net.drain_tx()?;
    report!(
        "net-hostile {} returned",
        core::str::from_utf8(case).unwrap_or("?")
    );
    net.send(true, |buf| {
        bulk_header(buf, &src, KIND_DATA, 1, 1);
        for (i, byte) in buf[len..len + 64].iter_mut().enumerate() {
            *byte = bulk_byte(1, i);
        }
        len + 64
    })?;
    net.drain_tx()?;
    report!("net-alive");
    Ok(())
}
