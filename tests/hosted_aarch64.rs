//! The emulated-host tier on aarch64: `tools/emulated-host --arch aarch64` (QEMU's full
//! emulation of an arm64 machine with EL2 and a GICv3, whose built-in KVM runs guests), on this
//! x86_64 machine, with mote, the test guest and the tests' program cross-built for aarch64
//! (harness: `Hosted::for_arch(Arch::Aarch64)`). Each test is one emulated-host boot, about
//! three times slower than on x86_64. Names start with `hosted_aarch64_`; they run one at a
//! time, in the same group as tests/hosted.rs (.config/nextest.toml). Each test first calls
//! `require_emulated_host(Arch::Aarch64)`, which skips it, saying why, where the aarch64 musl
//! target or QEMU for arm cannot be had.

mod common;

#[path = "hosted/harness.rs"]
mod harness;

#[path = "hosted/cases.rs"]
mod cases;

use harness::{guest_dir_of, hosted_tool_of, require_emulated_host, Arch, Hosted};

/// The plumbing: the emulated aarch64 host boots, has KVM (/dev/kvm a character device), runs
/// a program cross-built here (hosted-tool, static, echoing over a Unix socket), and the guest
/// artifacts for aarch64 are there to be given to a monitor.
#[test]
fn hosted_aarch64_emulated_host_has_kvm() {
    if !require_emulated_host(Arch::Aarch64) {
        return;
    }
    let guest = guest_dir_of(Arch::Aarch64);
    let run = Hosted::bare(Arch::Aarch64)
        .file(hosted_tool_of(Arch::Aarch64), "hosted-tool")
        .file(&guest.join("Image"), "Image")
        .run(
            r#"
ls -l /dev/kvm
[ -c /dev/kvm ] || fail "/dev/kvm is not a character device"
echo "machine=$(uname -m)"
./hosted-tool unix-listen /tmp/echo.sock --echo 2>/dev/null &
i=0
while [ ! -S /tmp/echo.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "echoed=$(echo hello | ./hosted-tool unix-connect /tmp/echo.sock)"
echo "image-bytes=$(wc -c < Image)"
"#,
        );
    run.assert_ok();
    let kvm = run
        .output
        .lines()
        .find(|line| line.ends_with("/dev/kvm"))
        .unwrap_or_else(|| panic!("no ls line for /dev/kvm in:\n{}", run.output));
    assert!(
        kvm.starts_with('c'),
        "/dev/kvm is not a character device: {kvm}"
    );
    assert_eq!(run.value("machine="), "aarch64", "{}", run.output);
    assert_eq!(run.value("echoed="), "hello", "{}", run.output);
    let image = std::fs::metadata(guest.join("Image")).expect("the guest's Image");
    assert_eq!(run.value("image-bytes="), image.len().to_string());
}

#[test]
fn hosted_aarch64_console_is_an_interactive_shell() {
    cases::console_is_an_interactive_shell(Arch::Aarch64);
}

#[test]
fn hosted_aarch64_guest_sees_its_vcpus_memory_and_exit_status() {
    cases::guest_sees_its_vcpus_memory_and_exit_status(Arch::Aarch64);
}

#[test]
fn hosted_aarch64_guest_writes_reach_the_disk_and_a_read_only_drive_refuses_them() {
    cases::guest_writes_reach_the_disk_and_a_read_only_drive_refuses_them(Arch::Aarch64);
}

#[test]
fn hosted_aarch64_sigkill_right_after_a_guest_sync_loses_nothing() {
    cases::sigkill_right_after_a_guest_sync_loses_nothing(Arch::Aarch64);
}

#[test]
fn hosted_aarch64_guest_programs_talk_tcp_over_virtio_net() {
    cases::guest_programs_talk_tcp_over_virtio_net(Arch::Aarch64);
}

#[test]
fn hosted_aarch64_guest_programs_talk_vsock_both_ways_at_once() {
    cases::guest_programs_talk_vsock_both_ways_at_once(Arch::Aarch64);
}

#[test]
fn hosted_aarch64_restored_guest_programs_carry_on() {
    cases::restored_guest_programs_carry_on(Arch::Aarch64);
}
