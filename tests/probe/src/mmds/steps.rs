//! The `mmds-…` steps: requests and tokens through the client of `mod.rs`, the benchmark, and
//! hostile traffic for the MMDS address.

use super::*;

/// Prints `bytes` with newlines as `\n`, cut at 200 bytes.
struct Escaped<'a>(&'a [u8]);

impl core::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for &b in self.0.iter().take(200) {
            match b {
                b'\n' => f.write_str("\\n")?,
                b'\r' => f.write_str("\\r")?,
                0x20..=0x7e => core::fmt::Write::write_char(f, b as char)?,
                _ => f.write_str("?")?,
            }
        }
        Ok(())
    }
}

/// Writes a request for `path` into `out`; returns its length. FLAGS: `j` asks for JSON, `t`
/// shows the last token, `b` a bad one, `c` asks to close.
fn get_request(mmds: &Mmds, path: &[u8], flags: &[u8], out: &mut [u8]) -> usize {
    let mut w = Writer { buf: out, len: 0 };
    w.put(b"GET ");
    w.put(path);
    w.put(b" HTTP/1.1\r\nHost: 169.254.169.254\r\n");
    if flags.contains(&b'j') {
        w.put(b"Accept: application/json\r\n");
    }
    if flags.contains(&b't') {
        w.put(b"X-metadata-token: ");
        w.put(&mmds.token[..mmds.token_len]);
        w.put(b"\r\n");
    }
    if flags.contains(&b'b') {
        w.put(b"X-metadata-token: 0123456789abcdef0123456789abcdef\r\n");
    }
    if flags.contains(&b'c') {
        w.put(b"Connection: close\r\n");
    }
    w.put(b"\r\n");
    w.len
}

struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }
}

/// Writes a frame into the buffer it gets; returns the length.
type FrameWriter<'a> = dyn Fn(&mut [u8]) -> usize + 'a;

/// Runs one `mmds-…` step.
pub fn step<'a>(
    net: &mut Net,
    mmds: &mut Mmds,
    name: &str,
    args: &mut impl Iterator<Item = &'a [u8]>,
) {
    let result = match name {
        "mmds-arp" => mmds.mac(net).map(|mac| {
            let [a, b, c, d, e, f] = mac;
            report!("mmds-arp mac={a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}");
        }),
        "mmds-get" => {
            let path = args.next().unwrap_or(b"/");
            let flags = args.next().unwrap_or_default();
            let mut request = [0u8; 512];
            let len = get_request(mmds, path, flags, &mut request);
            mmds.request_once(net, &request[..len]).map(|len| {
                report!(
                    "mmds-get status={} body={}",
                    status(len),
                    Escaped(body(len))
                );
            })
        }
        "mmds-token" => {
            let ttl = parse_u64(args.next()).unwrap_or(60);
            let mut request = [0u8; 256];
            let mut w = Writer {
                buf: &mut request,
                len: 0,
            };
            w.put(b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: ");
            let mut digits = [0u8; 20];
            let text = decimal(ttl, &mut digits);
            w.put(text);
            w.put(b"\r\n\r\n");
            let len = w.len;
            mmds.request_once(net, &request[..len]).map(|len| {
                let token = body(len);
                let n = token.len().min(TOKEN_MAX);
                mmds.token[..n].copy_from_slice(&token[..n]);
                mmds.token_len = n;
                report!("mmds-token status={} len={}", status(len), token.len());
            })
        }
        "mmds-wait" => {
            let ms = parse_u64(args.next()).unwrap_or(1000);
            let end = rdtsc().saturating_add(ms * (TSC_PER_SEC / 1000));
            while rdtsc() < end {
                core::hint::spin_loop();
            }
            report!("mmds-wait ms={ms}");
            Ok(())
        }
        "mmds-hostile" => hostile(net, mmds, args.next().unwrap_or_default()),
        "mmds-bench" => {
            let count = parse_u64(args.next()).unwrap_or(100);
            let fresh = args.next() == Some(b"fresh");
            bench(net, mmds, count, fresh)
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

fn decimal(mut n: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut at = out.len();
    loop {
        at -= 1;
        out[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &out[at..]
}

/// `mmds-bench:COUNT:keep|fresh`: COUNT GETs of `/` on one connection, or each on a new one.
fn bench(net: &mut Net, mmds: &mut Mmds, count: u64, fresh: bool) -> Result<(), MmdsError> {
    let request = b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n";
    mmds.mac(net)?;
    report!("mmds-bench start");
    let mut ok = 0u64;
    if fresh {
        for _ in 0..count {
            let len = mmds.request_once(net, request)?;
            ok += u64::from(status(len) == 200);
        }
    } else {
        let mut conn = mmds.connect(net)?;
        for _ in 0..count {
            let len = mmds.request(net, &mut conn, request)?;
            ok += u64::from(status(len) == 200);
        }
        mmds.close(net, &mut conn)?;
    }
    report!("mmds-bench done requests={count} ok={ok}");
    Ok(())
}

/// `mmds-hostile:CASE`: `window` (segments outside the window, then a request on the same
/// connection), `synflood` (200 SYNs never completed), `big` (a request over the limit),
/// `junk` (non-TCP and malformed packets to the MMDS address).
fn hostile(net: &mut Net, mmds: &mut Mmds, case: &[u8]) -> Result<(), MmdsError> {
    let request = b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n";
    match case {
        b"window" => {
            let mut conn = mmds.connect(net)?;
            let port = conn.port;
            let junk: [(u32, &[u8]); 3] = [
                (1_000_000, b"GET /junk1 HTTP/1.1\r\n\r\n"),
                (0x8000_0000, b"GET /junk2 HTTP/1.1\r\n\r\n"),
                (0u32.wrapping_sub(100_000), b"GET /junk3 HTTP/1.1\r\n\r\n"),
            ];
            for (offset, data) in junk {
                let seq = conn.snd_nxt.wrapping_add(offset);
                mmds.segment(net, port, seq, conn.rcv_nxt, TCP_ACK | TCP_PSH, data)?;
            }
            // A bogus ACK number and an RST outside the window.
            mmds.segment(
                net,
                port,
                conn.snd_nxt,
                conn.rcv_nxt.wrapping_add(99_999),
                TCP_ACK,
                &[],
            )?;
            mmds.segment(
                net,
                port,
                conn.snd_nxt.wrapping_add(500_000),
                0,
                TCP_RST,
                &[],
            )?;
            // Drain the challenge ACKs.
            let end = deadline(1);
            while mmds.receive(net, port, end, |_| {})? {}
            let len = mmds.request(net, &mut conn, request)?;
            mmds.close(net, &mut conn)?;
            report!(
                "mmds-hostile window status={} body={}",
                status(len),
                Escaped(body(len))
            );
        }
        b"synflood" => {
            let dst = mmds.mac(net)?;
            let (src, ip) = (net.mac, mmds.ip);
            for i in 0..200u16 {
                net.send(true, |buf| {
                    write_tcp(
                        buf,
                        &src,
                        &dst,
                        ip,
                        20000 + i,
                        u32::from(i) * 7919,
                        0,
                        TCP_SYN,
                        &[],
                    )
                })?;
                // Take what comes back, so the receive ring never fills.
                while let Some(received) = net.poll_rx() {
                    net.repost(received, true);
                }
            }
            let end = deadline(1);
            while rdtsc() < end {
                if let Some(received) = net.poll_rx() {
                    net.repost(received, true);
                }
            }
            report!("mmds-hostile synflood sent=200");
        }
        b"big" => {
            let mut conn = mmds.connect(net)?;
            let mut big = [b'a'; 6000];
            big[..5].copy_from_slice(b"GET /");
            let early = mmds.send_data(net, &mut conn, &big)?;
            let len = if answer_complete(early) {
                early
            } else {
                mmds.read_answer(net, &mut conn, early)?
            };
            report!(
                "mmds-hostile big status={} closed={}",
                status(len),
                if conn.fin_seen { "yes" } else { "no" }
            );
        }
        b"junk" => {
            let dst = mmds.mac(net)?;
            let (src, ip) = (net.mac, mmds.ip);
            // UDP, a truncated IPv4 header, a TCP header with a bad data offset, a bare ACK to
            // a connection that does not exist, and an ARP of another hardware type.
            let frames: [&FrameWriter<'_>; 5] = [
                &|buf| {
                    let len = write_tcp(buf, &src, &dst, ip, 40000, 1, 0, TCP_ACK, b"junk");
                    buf[ETH_HLEN + 9] = 17;
                    len
                },
                &|buf| {
                    write_tcp(buf, &src, &dst, ip, 40001, 1, 0, TCP_SYN, &[]);
                    ETH_HLEN + 19
                },
                &|buf| {
                    let len = write_tcp(buf, &src, &dst, ip, 40002, 1, 0, TCP_SYN, &[]);
                    buf[ETH_HLEN + 20 + 12] = 0xf0;
                    len
                },
                &|buf| write_tcp(buf, &src, &dst, ip, 40003, 1, 77, TCP_ACK, b"data"),
                &|buf| {
                    buf[..6].fill(0xff);
                    buf[6..12].copy_from_slice(&src);
                    buf[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
                    let arp = &mut buf[ETH_HLEN..ETH_HLEN + 28];
                    arp[..8].copy_from_slice(&[0, 9, 8, 0, 6, 4, 0, 1]);
                    arp[24..28].copy_from_slice(&ip);
                    ETH_HLEN + 28
                },
            ];
            for fill in frames {
                net.send(true, fill)?;
            }
            let end = deadline(1);
            while rdtsc() < end {
                if let Some(received) = net.poll_rx() {
                    net.repost(received, true);
                }
            }
            report!("mmds-hostile junk sent=5");
        }
        _ => report!("error mmds-hostile needs window, synflood, big or junk"),
    }
    Ok(())
}
