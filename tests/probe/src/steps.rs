//! The probe's command language: `probe.run=STEP[,STEP…]`, each step optionally with
//! arguments after colons (`count:5:1000`).

use crate::bootparams::ZeroPage;
use crate::mptable;
use crate::port::{outb, write_phys};
use crate::serial::Serial;

const RUN_KEY: &[u8] = b"probe.run=";
/// Firecracker's boot timer and the value that means "booted".
const BOOT_TIMER: u64 = 0xc000_0000;
const BOOT_COMPLETE: u8 = 123;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
const READ_MAX: usize = 256;

/// The value of `key` (e.g. `probe.run=`) on the command line.
fn cmdline_value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline
        .split(|b| *b == b' ')
        .find_map(|token| token.strip_prefix(key))
}

fn as_str(bytes: &[u8]) -> &str {
    core::str::from_utf8(bytes).unwrap_or("<not utf-8>")
}

fn parse_u64(bytes: Option<&[u8]>) -> Option<u64> {
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
            b"read" => read_line(),
            b"spin" => loop {
                core::hint::spin_loop();
            },
            b"triple" => triple_fault(),
            b"panic" => panic!("requested on the command line"),
            other => report!("error unknown step {}", as_str(other)),
        }
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
