//! The emulated-host tier on x86_64: mote inside `tools/emulated-host` (QEMU's full emulation
//! of an x86_64 machine with AMD SVM, whose KVM runs Linux user space, which this machine's PVM
//! cannot), running the test guest's programs. Each test is one emulated-host boot (about
//! 10-20 s plus what the guests take) and asserts what a guest program, or a host program
//! talking to one, observed. Names start with `hosted_`; they run one at a time
//! (.config/nextest.toml). The cases are in tests/hosted/cases.rs, shared with the aarch64 tier
//! (tests/hosted_aarch64.rs).

mod common;

#[path = "hosted/harness.rs"]
mod harness;

#[path = "hosted/cases.rs"]
mod cases;

use harness::Arch;

#[test]
fn hosted_console_is_an_interactive_shell() {
    cases::console_is_an_interactive_shell(Arch::X86_64);
}

#[test]
fn hosted_guest_sees_its_vcpus_memory_and_exit_status() {
    cases::guest_sees_its_vcpus_memory_and_exit_status(Arch::X86_64);
}

#[test]
fn hosted_guest_writes_reach_the_disk_and_a_read_only_drive_refuses_them() {
    cases::guest_writes_reach_the_disk_and_a_read_only_drive_refuses_them(Arch::X86_64);
}

#[test]
fn hosted_sigkill_right_after_a_guest_sync_loses_nothing() {
    cases::sigkill_right_after_a_guest_sync_loses_nothing(Arch::X86_64, "sync");
}

#[test]
fn hosted_sigkill_right_after_a_guest_sync_loses_nothing_on_the_async_engine() {
    cases::sigkill_right_after_a_guest_sync_loses_nothing(Arch::X86_64, "async");
}

#[test]
fn hosted_guest_programs_talk_tcp_over_virtio_net() {
    cases::guest_programs_talk_tcp_over_virtio_net(Arch::X86_64);
}

#[test]
fn hosted_guest_programs_talk_vsock_both_ways_at_once() {
    cases::guest_programs_talk_vsock_both_ways_at_once(Arch::X86_64);
}

#[test]
fn hosted_restored_guest_programs_carry_on() {
    cases::restored_guest_programs_carry_on(Arch::X86_64);
}

#[test]
fn hosted_balloon_gives_memory_back() {
    cases::balloon_gives_memory_back(Arch::X86_64);
}

#[test]
fn hosted_clones_reseed_their_rng_from_a_new_generation_id() {
    cases::clones_reseed_their_rng_from_a_new_generation_id(Arch::X86_64);
}

#[test]
fn hosted_clock_realtime_restores_advance_the_guest_clock() {
    cases::clock_realtime_restores_advance_the_guest_clock(Arch::X86_64);
}

#[test]
fn hosted_balloon_free_page_hinting_gives_free_memory_back() {
    cases::balloon_free_page_hinting_gives_free_memory_back(Arch::X86_64);
}

#[test]
fn hosted_guest_wget_reads_mmds_v1_and_v2() {
    cases::guest_wget_reads_mmds_v1_and_v2(Arch::X86_64);
}
