//! The bzImage path at probe speed: the probe's ELF segments wrapped in a minimal bzImage
//! (a setup header, then a protected-mode payload whose 64-bit entry at +0x200 jumps to the
//! probe's entry), booted through the Linux 64-bit boot protocol.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{probe_kernel, require_kvm, run_mote};

const PT_LOAD: u32 = 1;
const SETUP_SECTS: u8 = 1;
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Wraps a static x86_64 ELF into a bzImage that the Linux boot protocol loads and enters.
fn wrap_in_bzimage(elf: &[u8]) -> Vec<u8> {
    let entry = u64_at(elf, 0x18);
    let (phoff, phentsize, phnum) = (
        u64_at(elf, 0x20) as usize,
        u16_at(elf, 0x36) as usize,
        u16_at(elf, 0x38) as usize,
    );
    let segments: Vec<(u64, usize, usize, u64)> = (0..phnum)
        .map(|i| &elf[phoff + i * phentsize..])
        .filter(|ph| u32_at(ph, 0) == PT_LOAD)
        .map(|ph| {
            // (physical address, file offset, file size, memory size)
            (
                u64_at(ph, 24),
                u64_at(ph, 8) as usize,
                u64_at(ph, 32) as usize,
                u64_at(ph, 40),
            )
        })
        .collect();
    let low = segments.iter().map(|s| s.0).min().unwrap() & !0xfff;
    let high = segments.iter().map(|s| s.0 + s.3).max().unwrap();
    // One page in front of the image holds the 64-bit entry stub.
    let payload_start = low - 0x1000;
    let mut payload = vec![0u8; (high - payload_start) as usize];
    for (paddr, offset, filesz, _) in &segments {
        let at = (paddr - payload_start) as usize;
        payload[at..at + filesz].copy_from_slice(&elf[*offset..offset + filesz]);
    }
    let stub = BZIMAGE_64BIT_ENTRY as usize;
    let rel = entry as i64 - (payload_start + BZIMAGE_64BIT_ENTRY + 5) as i64;
    payload[stub] = 0xe9; // jmp rel32
    payload[stub + 1..stub + 5].copy_from_slice(&(rel as i32).to_le_bytes());

    let mut setup = vec![0u8; (usize::from(SETUP_SECTS) + 1) * 512];
    setup[0x1f1] = SETUP_SECTS;
    setup[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    setup[0x202..0x206].copy_from_slice(b"HdrS");
    setup[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    setup[0x211] = 1; // LOADED_HIGH
    setup[0x214..0x218].copy_from_slice(&(payload_start as u32).to_le_bytes());
    setup[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    setup.extend_from_slice(&payload);
    setup
}

fn probe_bzimage() -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("probe.bzImage");
    let elf = fs::read(probe_kernel()).unwrap();
    fs::write(&path, wrap_in_bzimage(&elf)).unwrap();
    path
}

#[test]
fn bzimage_kernel_boots_through_its_64_bit_entry() {
    if !require_kvm() {
        return;
    }
    let image = probe_bzimage();
    let run = run_mote(
        &[
            "run",
            "--kernel",
            image.to_str().unwrap(),
            "--vcpus",
            "2",
            "--append",
            "probe.run=hello,cpus,mem,cmdline",
        ],
        None,
        Duration::from_secs(20),
    );
    assert!(
        run.stdout.contains("probe: hello\n"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.contains("probe: cpus=2\n"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("probe: mem ram_kib=130687 top=0x8000000\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("probe.run=hello,cpus,mem,cmdline"),
        "{}",
        run.stdout
    );
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
}

#[test]
fn bzimage_without_a_64_bit_entry_is_refused() {
    if !require_kvm() {
        return;
    }
    let mut image = wrap_in_bzimage(&fs::read(probe_kernel()).unwrap());
    image[0x236] = 0; // clear XLF_KERNEL_64
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("probe32.bzImage");
    fs::write(&path, image).unwrap();
    let run = run_mote(
        &["run", "--kernel", path.to_str().unwrap()],
        None,
        Duration::from_secs(20),
    );
    assert_eq!(run.status.code(), Some(1));
    assert!(
        run.stderr.contains("the bzImage has no 64-bit entry point"),
        "{}",
        run.stderr
    );
}
