//! The probe's command language: `probe.run=STEP[,STEP…]`, each step optionally with
//! arguments after colons (`count:5:1000`).

use crate::blk::Blk;
use crate::bootparams::ZeroPage;
use crate::kbd::{self, Hex};
use crate::port::{outb, write_phys};
use crate::serial::Serial;
use crate::{mptable, virtio};

const RUN_KEY: &[u8] = b"probe.run=";
/// Firecracker's boot timer and the value that means "booted".
const BOOT_TIMER: u64 = 0xc000_0000;
const BOOT_COMPLETE: u8 = 123;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
const READ_MAX: usize = 256;
/// Polls before `kbd` and `blk-wait-resize` give up: with a pause between polls, well over a
/// minute at native speed, time for a test to send its API request.
const WAIT_POLLS: u64 = 10_000_000;

/// The value of `key` (e.g. `probe.run=`) on the command line.
fn cmdline_value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline
        .split(|b| *b == b' ')
        .find_map(|token| token.strip_prefix(key))
}

fn as_str(bytes: &[u8]) -> &str {
    core::str::from_utf8(bytes).unwrap_or("<not utf-8>")
}

pub fn parse_u64(bytes: Option<&[u8]>) -> Option<u64> {
    let bytes = bytes?;
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |n, b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))?
    })
}

fn spin(iterations: u64) {
    for _ in 0..iterations {
        core::hint::spin_loop();
    }
}

pub fn run(zero_page: &ZeroPage) {
    let cmdline = zero_page.cmdline();
    let mut blk: Option<Blk> = None;
    let mut net: Option<crate::net::Net> = None;
    let mut mmds = crate::mmds::Mmds::new([169, 254, 169, 254]);
    let mut vsock: Option<crate::vsock::Vsock> = None;
    let mut balloon: Option<crate::balloon::Balloon> = None;
    let steps = cmdline_value(cmdline, RUN_KEY).unwrap_or(b"boot");
    for step in steps.split(|b| *b == b',').filter(|s| !s.is_empty()) {
        let mut parts = step.split(|b| *b == b':');
        let name = parts.next().unwrap_or_default();
        match name {
            b"boot" => write_phys(BOOT_TIMER, BOOT_COMPLETE),
            b"hello" => report!("hello"),
            b"cmdline" => report!("cmdline={}", as_str(cmdline)),
            b"mem" => {
                let (kib, top) = zero_page.ram();
                report!("mem ram_kib={kib} top={top:#x}");
            }
            b"e820" => {
                for e in zero_page.e820() {
                    report!("e820 addr={:#x} size={:#x} type={}", e.addr, e.size, e.kind);
                }
            }
            b"cpus" => match mptable::enabled_processors() {
                Some(n) => report!("cpus={n}"),
                None => report!("error no mp table"),
            },
            b"count" => {
                let n = parse_u64(parts.next()).unwrap_or(0);
                let delay = parse_u64(parts.next()).unwrap_or(0);
                for i in 1..=n {
                    report!("count={i}");
                    spin(delay);
                }
            }
            b"tsc" => {
                // tsc:N[:SPINS]: the guest's TSC, N times; a restored snapshot must go on
                // from where it was, never back.
                let n = parse_u64(parts.next()).unwrap_or(0);
                let delay = parse_u64(parts.next()).unwrap_or(0);
                for _ in 0..n {
                    report!("tsc={}", read_tsc());
                    spin(delay);
                }
            }
            b"cpuid" => {
                // cpuid:LEAF[:SUBLEAF], in decimal: what the CPU (KVM's CPUID, shaped by a
                // CPU template) says; CPUID works at CPL 3.
                let leaf = parse_u64(parts.next()).unwrap_or(0) as u32;
                let subleaf = parse_u64(parts.next()).unwrap_or(0) as u32;
                let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
                report!(
                    "cpuid leaf={leaf:#x} subleaf={subleaf:#x} eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
                    r.eax,
                    r.ebx,
                    r.ecx,
                    r.edx
                );
            }
            b"tsc-aux" => {
                // RDTSCP's ECX: the TSC_AUX MSR (0xc0000103), which KVM keeps per vCPU.
                let mut aux = 0u32;
                // SAFETY: RDTSCP only reads the TSC and TSC_AUX into registers.
                let _ = unsafe { core::arch::x86_64::__rdtscp(&mut aux) };
                report!("tsc-aux={aux:#x}");
            }
            b"read" => read_line(),
            b"spin" => loop {
                core::hint::spin_loop();
            },
            b"triple" => triple_fault(),
            b"blk-init" => {
                let slot = parse_u64(parts.next()).unwrap_or(0);
                match Blk::start(slot) {
                    Ok(device) => {
                        report!(
                            "blk-init capacity={} ro={}",
                            device.capacity,
                            device.read_only
                        );
                        blk = Some(device);
                    }
                    Err(err) => report!("blk-init error {err:?}"),
                }
            }
            b"blk-init-early" => {
                // blk-init-early:SLOT:SECTOR:COUNT: a read made available before DRIVER_OK.
                let slot = parse_u64(parts.next()).unwrap_or(0);
                let sector = parse_u64(parts.next()).unwrap_or(0);
                let count = parse_u64(parts.next()).unwrap_or(1) as usize;
                match Blk::start_with_early_read(slot, sector, count) {
                    Ok((device, done)) => {
                        report!(
                            "blk-init-early status={} used={}",
                            done.status,
                            done.used_len
                        );
                        blk = Some(device);
                    }
                    Err(err) => report!("blk-init-early error {err:?}"),
                }
            }
            b"rng-read" => {
                // rng-read:SLOT:LEN: two reads of LEN bytes from the virtio-rng device.
                let slot = parse_u64(parts.next()).unwrap_or(0);
                let len = parse_u64(parts.next()).unwrap_or(64) as usize;
                match crate::rng::read_twice(slot, len) {
                    Ok(reads) => report!(
                        "rng-read used={},{} varied={} differ={}",
                        reads.used[0],
                        reads.used[1],
                        reads.varied,
                        reads.differ
                    ),
                    Err(err) => report!("rng-read error {err:?}"),
                }
            }
            b"rng-bench" => {
                // rng-bench:SLOT:LEN:COUNT[:WARM]: WARM requests of LEN bytes, then COUNT
                // more timed by the host between the start and done lines.
                let slot = parse_u64(parts.next()).unwrap_or(0);
                let len = parse_u64(parts.next()).unwrap_or(4096) as usize;
                let count = parse_u64(parts.next()).unwrap_or(1000);
                let warm = parse_u64(parts.next()).unwrap_or(0);
                match crate::rng::bench(slot, len, count, warm, || report!("rng-bench start")) {
                    Ok(bytes) => report!("rng-bench done bytes={bytes}"),
                    Err(err) => report!("rng-bench error {err:?}"),
                }
            }
            b"rng-where" => {
                let (buffers, used) = crate::rng::addresses();
                report!("rng-where buffers={buffers:#x} used={used:#x}");
            }
            b"poke" | b"peek" => {
                // poke:AT_KIB:PAGES:SEED[:STRIDE], peek:AT_KIB:PAGES:SEED
                let at = parse_u64(parts.next()).unwrap_or(0) << 10;
                let pages = parse_u64(parts.next()).unwrap_or(1);
                let seed = parse_u64(parts.next()).unwrap_or(0);
                if name == b"poke" {
                    let stride = parse_u64(parts.next()).unwrap_or(1).max(1);
                    crate::pattern::poke(at, pages, seed, stride);
                    report!("poke at={at:#x} pages={pages}");
                } else {
                    match crate::pattern::peek(at, pages, seed) {
                        None => report!("peek at={at:#x} pages={pages} match=yes"),
                        Some(bad) => {
                            report!("peek at={at:#x} pages={pages} match=no first={bad:#x}")
                        }
                    }
                }
            }
            b"zeros" => {
                // zeros:AT_KIB:PAGES
                let at = parse_u64(parts.next()).unwrap_or(0) << 10;
                let pages = parse_u64(parts.next()).unwrap_or(1);
                match crate::pattern::nonzero(at, pages) {
                    (0, _) => report!("zeros at={at:#x} pages={pages} nonzero=0"),
                    (count, first) => report!(
                        "zeros at={at:#x} pages={pages} nonzero={count} first={:#x}",
                        first.unwrap_or(0)
                    ),
                }
            }
            b"kbd" => {
                let count = parse_u64(parts.next()).unwrap_or(1) as usize;
                let polls = parse_u64(parts.next()).unwrap_or(WAIT_POLLS);
                keyboard(count.min(kbd::MAX_BYTES), polls);
            }
            b"blk-wait-resize" => {
                let Some(device) = blk.as_mut() else {
                    report!("error blk-wait-resize before blk-init");
                    continue;
                };
                let base = parse_u64(parts.next()).map_or(device.base(), virtio::slot_base);
                let polls = parse_u64(parts.next()).unwrap_or(WAIT_POLLS);
                wait_resize(device, base, polls);
            }
            b"blk-write" | b"blk-read" | b"blk-flush" | b"blk-id" | b"blk-hostile"
            | b"blk-bench" | b"blk-discard" | b"blk-zeroes" => {
                let Some(device) = blk.as_mut() else {
                    report!("error {} before blk-init", as_str(name));
                    continue;
                };
                blk_step(device, name, &mut parts);
            }
            b"net-init" => {
                // Slots follow the monitor's order: drives, then network interfaces.
                net = crate::net_steps::init(parse_u64(parts.next()).unwrap_or(0));
            }
            b"net-serve" | b"net-send" | b"net-recv" | b"net-bench" | b"net-hostile" => {
                let Some(device) = net.as_mut() else {
                    report!("error {} before net-init", as_str(name));
                    continue;
                };
                crate::net_steps::step(device, as_str(name), &mut parts);
            }
            b"mmds-init" => {
                // Another MMDS address (`mmds-init:169.254.1.1`).
                match parts.next().and_then(crate::net_steps::parse_ip) {
                    Some(ip) => mmds = crate::mmds::Mmds::new(ip),
                    None => report!("error mmds-init needs an IPv4 address"),
                }
            }
            b"mmds-arp" | b"mmds-get" | b"mmds-token" | b"mmds-wait" | b"mmds-hostile"
            | b"mmds-bench" => {
                let Some(device) = net.as_mut() else {
                    report!("error {} before net-init", as_str(name));
                    continue;
                };
                crate::mmds::step(device, &mut mmds, as_str(name), &mut parts);
            }
            b"vsock-init" => {
                // Slots follow the monitor's order: drives, network interfaces, then vsock.
                vsock = crate::vsock::steps::init(parse_u64(parts.next()).unwrap_or(0));
            }
            b"vsock-echo-listen"
            | b"vsock-connect-echo"
            | b"vsock-bench-recv"
            | b"vsock-bench-send"
            | b"vsock-hostile" => {
                let Some(device) = vsock.as_mut() else {
                    report!("error {} before vsock-init", as_str(name));
                    continue;
                };
                crate::vsock::steps::step(device, as_str(name), &mut parts);
            }
            b"balloon-init" => {
                let slot = parse_u64(parts.next()).unwrap_or(0);
                let (kib, _) = zero_page.ram();
                crate::balloon::write_sentinel();
                match crate::balloon::start(slot, kib * 1024) {
                    Ok(device) => {
                        report!(
                            "balloon-init features={:#x} target={}",
                            device.features(),
                            device.target()
                        );
                        balloon = Some(device);
                    }
                    Err(err) => report!("balloon-init error {err:?}"),
                }
            }
            b"balloon-touch" => {
                // balloon-touch:AT_MIB:MIB
                let at = parse_u64(parts.next()).unwrap_or(64) << 20;
                let mib = parse_u64(parts.next()).unwrap_or(0);
                crate::balloon::touch(at, mib << 20);
                report!("balloon-touch mib={mib}");
            }
            b"balloon-inflate" | b"balloon-deflate" | b"balloon-report" | b"balloon-follow"
            | b"balloon-hostile" => {
                let Some(device) = balloon.as_mut() else {
                    report!("error {} before balloon-init", as_str(name));
                    continue;
                };
                balloon_step(device, name, &mut parts, zero_page.ram().1);
            }
            b"panic" => panic!("requested on the command line"),
            other => report!("error unknown step {}", as_str(other)),
        }
    }
}

/// `blk-write:SECTOR:COUNT:SEED`, `blk-read:SECTOR:COUNT:SEED`, `blk-flush`, `blk-id`,
/// `blk-hostile:CASE`.
fn blk_step<'a>(device: &mut Blk, name: &[u8], args: &mut impl Iterator<Item = &'a [u8]>) {
    let name = as_str(name);
    match name {
        "blk-write" | "blk-read" => {
            let sector = parse_u64(args.next()).unwrap_or(0);
            let count = parse_u64(args.next()).unwrap_or(1) as usize;
            let seed = parse_u64(args.next()).unwrap_or(0);
            let write = name == "blk-write";
            if write {
                Blk::fill_pattern(sector, count, seed);
            }
            match device.transfer(write, sector, count) {
                Ok(done) if write => report!("blk-write status={}", done.status),
                Ok(done) => {
                    let matches = Blk::check_pattern(sector, count, seed).is_none();
                    report!(
                        "blk-read status={} match={}",
                        done.status,
                        if matches { "yes" } else { "no" }
                    );
                }
                Err(err) => report!("{name} error {err:?}"),
            }
        }
        "blk-bench" => {
            // blk-bench:read|write:REQUEST_SECTORS:TOTAL_MIB:DEPTH
            let write = args.next() == Some(b"write");
            let sectors = parse_u64(args.next()).unwrap_or(8) as usize;
            let total = parse_u64(args.next()).unwrap_or(16) << 20;
            let depth = parse_u64(args.next()).unwrap_or(1) as usize;
            report!("blk-bench start");
            match device.bench(write, sectors, total, depth) {
                Ok(r) => report!("blk-bench done requests={} errors={}", r.requests, r.errors),
                Err(err) => report!("blk-bench error {err:?}"),
            }
        }
        "blk-discard" | "blk-zeroes" => {
            // blk-discard:SECTOR:COUNT, blk-zeroes:SECTOR:COUNT[:UNMAP]
            let sector = parse_u64(args.next()).unwrap_or(0);
            let count = parse_u64(args.next()).unwrap_or(1) as u32;
            let unmap = parse_u64(args.next()).unwrap_or(0) != 0;
            match device.discard_or_zero(name == "blk-discard", sector, count, unmap) {
                Ok(done) => report!("{name} status={}", done.status),
                Err(err) => report!("{name} error {err:?}"),
            }
        }
        "blk-flush" => match device.flush() {
            Ok(done) => report!("blk-flush status={}", done.status),
            Err(err) => report!("blk-flush error {err:?}"),
        },
        "blk-id" => match device.get_id() {
            Ok((done, id)) => {
                let len = id.iter().position(|b| *b == 0).unwrap_or(id.len());
                report!("blk-id status={} id={}", done.status, as_str(&id[..len]));
            }
            Err(err) => report!("blk-id error {err:?}"),
        },
        _ => {
            let case = args.next().unwrap_or_default();
            match device.hostile(case) {
                None => report!("error unknown hostile case {}", as_str(case)),
                Some(Ok(done)) => report!(
                    "blk-hostile {} status={} used_len={}",
                    as_str(case),
                    done.status,
                    done.used_len
                ),
                Some(Err(err)) => report!("blk-hostile {} error {err:?}", as_str(case)),
            }
            // Either the device still serves a good request, or it says it needs a reset.
            if device.needs_reset() {
                report!("blk-needs-reset");
            } else {
                match device.transfer(false, 0, 1) {
                    Ok(done) => report!("blk-alive status={}", done.status),
                    Err(err) => report!("blk-dead {err:?}"),
                }
            }
        }
    }
}

/// `balloon-inflate:AT_MIB:MIB`, `balloon-deflate:AT_MIB:MIB`, `balloon-report:AT_MIB:MIB`,
/// `balloon-follow:AT_MIB[:ROUNDS]`, `balloon-hostile:CASE`.
fn balloon_step<'a>(
    device: &mut crate::balloon::Balloon,
    name: &[u8],
    args: &mut impl Iterator<Item = &'a [u8]>,
    top: u64,
) {
    let name = as_str(name);
    match name {
        "balloon-inflate" | "balloon-deflate" | "balloon-report" => {
            let at = parse_u64(args.next()).unwrap_or(64) << 20;
            let len = parse_u64(args.next()).unwrap_or(0) << 20;
            let done = match name {
                "balloon-report" => device.report(at, len).map(|()| (len / 4096) as u32),
                _ => device.pages(name == "balloon-inflate", at, len),
            };
            match done {
                Ok(pages) => report!("{name} pages={pages} actual={}", device.actual()),
                Err(err) => report!("{name} error {err:?}"),
            }
        }
        "balloon-follow" => {
            let at = parse_u64(args.next()).unwrap_or(64) << 20;
            let rounds = parse_u64(args.next()).unwrap_or(1);
            for _ in 0..rounds {
                // A change signalled before now is already in the target read below.
                let generation = device.settle();
                report!(
                    "balloon: waiting target={} actual={}",
                    device.target(),
                    device.actual()
                );
                match device.follow(at, generation, WAIT_POLLS) {
                    Ok(target) => {
                        report!("balloon-follow target={target} actual={}", device.actual())
                    }
                    Err(err) => {
                        report!("balloon-follow error {err:?}");
                        return;
                    }
                }
            }
        }
        _ => {
            let case = args.next().unwrap_or_default();
            match device.hostile(case, top) {
                None => report!("error unknown hostile case {}", as_str(case)),
                Some(Ok(intact)) => report!(
                    "balloon-hostile {} returned intact={}",
                    as_str(case),
                    if intact { "yes" } else { "no" }
                ),
                Some(Err(err)) => report!("balloon-hostile {} error {err:?}", as_str(case)),
            }
        }
    }
}

/// `kbd:N[:POLLS]`: enables the keyboard, says it waits, and prints the first N bytes the
/// keyboard delivers.
fn keyboard(count: usize, polls: u64) {
    if let Err(err) = kbd::enable() {
        report!("kbd: error {err:?}");
        return;
    }
    report!("kbd: waiting");
    let mut bytes = [0u8; kbd::MAX_BYTES];
    let got = kbd::read_bytes(&mut bytes[..count], polls);
    if got == count {
        report!("kbd: {}", Hex(&bytes[..got]));
    } else if got == 0 {
        report!("kbd: timeout after 0 bytes");
    } else {
        report!("kbd: timeout after {got} bytes: {}", Hex(&bytes[..got]));
    }
}

/// `blk-wait-resize[:SLOT[:POLLS]]`: says it waits, then prints the block device's capacity
/// once its configuration changes (a new backing file).
fn wait_resize(device: &mut Blk, base: u64, polls: u64) {
    // A change signalled before now is already in the capacity read below.
    virtio::ack_config_change(base);
    let generation = virtio::config_generation(base);
    let before: u64 = virtio::read_config_stable(base, 0);
    report!("blk: waiting for resize");
    match virtio::wait_config_change(base, generation, polls) {
        Ok(()) => {
            let capacity: u64 = virtio::read_config_stable(base, 0);
            if base == device.base() {
                device.capacity = capacity;
            }
            report!("blk-capacity: {capacity}");
        }
        Err(_) => report!("blk-wait-resize timeout capacity={before}"),
    }
}

fn read_line() {
    let mut serial = Serial;
    let mut line = [0u8; READ_MAX];
    let mut len = 0;
    loop {
        let byte = serial.read_byte();
        if byte == b'\n' || byte == b'\r' {
            break;
        }
        if len < READ_MAX {
            line[len] = byte;
            len += 1;
        }
    }
    report!("read={}", as_str(&line[..len]));
}

/// The time-stamp counter; RDTSC is allowed at CPL 3 (the probe leaves CR4.TSD clear).
fn read_tsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDTSC only reads the counter into EDX:EAX.
    unsafe { core::arch::asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack)) };
    (u64::from(high) << 32) | u64::from(low)
}

/// With no usable IDT, an exception escalates to a double fault and then a triple fault.
fn triple_fault() -> ! {
    // SAFETY: deliberately raises #UD; nothing after it runs.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

/// Resets the machine through the i8042, as `reboot=k` does.
pub fn reset() -> ! {
    outb(I8042_COMMAND, I8042_RESET);
    loop {
        core::hint::spin_loop();
    }
}
