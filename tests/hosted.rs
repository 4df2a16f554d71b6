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

#[path = "image/oci.rs"]
mod oci;

#[path = "hosted/image_cases.rs"]
mod image_cases;

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
fn hosted_a_diff_snapshot_rebased_onto_its_base_restores_a_running_program() {
    cases::a_diff_snapshot_rebased_onto_its_base_restores_a_running_program(Arch::X86_64);
}

#[test]
fn hosted_a_running_program_restored_through_a_uffd_handler_carries_on() {
    cases::a_running_program_restored_through_a_uffd_handler_carries_on(Arch::X86_64);
}

#[test]
fn hosted_a_running_program_restored_by_the_lazy_pager_carries_on_with_and_without_a_working_set() {
    cases::a_running_program_restored_by_the_lazy_pager_carries_on_with_and_without_a_working_set(
        Arch::X86_64,
    );
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

/// A custom CPU template under real KVM (a PVM guest reads the host's CPUID, TSC and TSC_AUX at
/// CPL 3, not its own, so the probe tier cannot see this): the probe guest, booted by mote in
/// the emulated host with and without a template, reports CPUID leaf 1, its TSC and its
/// TSC_AUX. The template clears ECX bits 3-25 and sets bit 2, sets bit 60 of the TSC MSR and
/// writes 0x5a into TSC_AUX; everything else stays as it was.
#[test]
fn hosted_a_custom_cpu_template_shapes_cpuid_and_msrs() {
    if !harness::require_emulated_host(Arch::X86_64) {
        return;
    }
    let probe = common::probe_kernel();
    let run = harness::Hosted::for_arch(Arch::X86_64)
        .file(&probe, "probe")
        .run(
            r#"
boot() {
  cat > $1.json <<JSON
{"boot-source": {"kernel_image_path": "probe", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=cpuid:1,tsc:1,tsc-aux"},
 "cpu-config": $2}
JSON
  ./mote --no-api --config-file $1.json --log-path /dev/stderr >$1.out 2>$1.err || { cat $1.err; fail "mote $1"; }
  sed -n "s/^probe: /$1-/p" $1.out
}
boot plain null
boot shaped '{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
   "modifiers": [{"register": "ecx", "bitmap": "0b000000000000000000000001xx"}]}],
 "msr_modifiers": [{"addr": "0x10", "bitmap": "0b1xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},
                   {"addr": "0xc0000103", "bitmap": "0b01011010"}]}'
"#,
        );
    run.assert_ok();
    let number = |text: &str| -> u64 {
        match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
            None => text.parse().unwrap(),
        }
    };
    let ecx = |line: &str| -> u64 {
        let words = run.value(line);
        number(
            words
                .split_whitespace()
                .find_map(|word| word.strip_prefix("ecx="))
                .unwrap_or_else(|| panic!("no ecx in {words}")),
        )
    };
    let (plain_ecx, shaped_ecx) = (ecx("plain-cpuid "), ecx("shaped-cpuid "));
    let bits_3_to_25 = ((1u64 << 26) - 1) & !0b111;
    assert_eq!(shaped_ecx, (plain_ecx & !bits_3_to_25) | 0b100);
    assert!(number(&run.value("plain-tsc=")) < 1 << 60);
    assert!(number(&run.value("shaped-tsc=")) >= 1 << 60);
    assert_eq!(run.value("shaped-tsc-aux="), "0x5a");
    assert_ne!(run.value("plain-tsc-aux="), "0x5a");
}

#[test]
fn hosted_image_runs_as_a_container() {
    image_cases::image_runs_as_a_container(Arch::X86_64);
}
