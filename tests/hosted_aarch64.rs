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

#[path = "image/oci.rs"]
mod oci;

#[path = "hosted/image_cases.rs"]
mod image_cases;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::ApiMote;
use common::{probe_kernel, require_kvm};
use harness::{
    guest_dir, guest_dir_of, hosted_tool_of, mote_of, require_emulated_host, Arch, Hosted,
};

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
    cases::sigkill_right_after_a_guest_sync_loses_nothing(Arch::Aarch64, "sync");
}

#[test]
fn hosted_aarch64_sigkill_right_after_a_guest_sync_loses_nothing_on_the_async_engine() {
    cases::sigkill_right_after_a_guest_sync_loses_nothing(Arch::Aarch64, "async");
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

#[test]
fn hosted_aarch64_a_diff_snapshot_rebased_onto_its_base_restores_a_running_program() {
    cases::a_diff_snapshot_rebased_onto_its_base_restores_a_running_program(Arch::Aarch64);
}

#[test]
fn hosted_aarch64_a_running_program_restored_through_a_uffd_handler_carries_on() {
    cases::a_running_program_restored_through_a_uffd_handler_carries_on(Arch::Aarch64);
}

#[test]
fn hosted_aarch64_a_running_program_restored_by_the_lazy_pager_carries_on_with_and_without_a_working_set(
) {
    cases::a_running_program_restored_by_the_lazy_pager_carries_on_with_and_without_a_working_set(
        Arch::Aarch64,
    );
}

#[test]
fn hosted_aarch64_balloon_gives_memory_back() {
    cases::balloon_gives_memory_back(Arch::Aarch64);
}

#[test]
fn hosted_aarch64_clones_reseed_their_rng_from_a_new_generation_id() {
    cases::clones_reseed_their_rng_from_a_new_generation_id(Arch::Aarch64);
}

/// A snapshot of an x86_64 guest, taken here by this machine's own mote (the probe guest runs
/// in milliseconds on any KVM); None where this machine has no KVM.
fn x86_64_snapshot() -> Option<(PathBuf, PathBuf)> {
    if !require_kvm() {
        return None;
    }
    let api = ApiMote::spawn("x86-64-snapshot-for-aarch64", &[]);
    let boot = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=hello,count:1000:3000000",
    });
    api.ok("PUT", "/boot-source", &boot.to_string());
    api.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    api.wait_for_stdout("probe: count=1\n", Duration::from_secs(20));
    Some(api.pause_and_snapshot())
}

/// What an aarch64 mote refuses, and how it says so: an x86_64 kernel (vmlinux and bzImage)
/// is not an arm64 Image; an x86_64 snapshot is named as one; `SendCtrlAltDel` is a 400 with
/// Firecracker's aarch64 words, before and after boot; and the guest's PSCI SYSTEM_OFF ends
/// mote with status 0, as a reset does.
#[test]
fn hosted_aarch64_refuses_what_is_not_its_own_and_powers_off_through_psci() {
    if !require_emulated_host(Arch::Aarch64) {
        return;
    }
    let x86 = guest_dir();
    let mut hosted = Hosted::for_arch(Arch::Aarch64)
        .file(&x86.join("vmlinux"), "x86-vmlinux")
        .file(&x86.join("bzImage"), "x86-bzImage");
    let snapshot = x86_64_snapshot();
    if let Some((state, _mem)) = &snapshot {
        hosted = hosted.file(state, "x86.state");
    }
    let run = hosted.run(
        r#"
for kernel in x86-vmlinux x86-bzImage; do
  ./mote run --kernel $kernel --initrd guest.cpio.gz >out-$kernel 2>&1
  echo "$kernel-status=$?"
  grep -o 'not an arm64 Image[^(]*' out-$kernel | head -n1 | sed "s/^/$kernel-error=/"
done
if [ -f x86.state ]; then
  head -c 4096 /dev/zero > x86.mem
  ./mote run --restore x86.state --mem-file x86.mem >out-snap 2>&1
  echo "snapshot-status=$?"
  grep -o 'the snapshot was taken of an [a-z0-9_]* guest; this mote runs [a-z0-9_]* guests' out-snap | sed 's/^/snapshot-error=/'
fi
./mote --api-sock /tmp/api.sock --log-path out-api.log >out-api 2>&1 &
api=$!
i=0; while [ ! -S /tmp/api.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "preboot-cad=$(hosted-tool api /tmp/api.sock PUT /actions '{"action_type": "SendCtrlAltDel"}')"
hosted-tool api /tmp/api.sock PUT /boot-source \
  "{\"kernel_image_path\": \"$KERNEL\", \"initrd_path\": \"guest.cpio.gz\", \"boot_args\": \"console=ttyS0 panic=1 $GUEST_ARGS microvm.wait\"}" >/dev/null
hosted-tool api /tmp/api.sock PUT /actions '{"action_type": "InstanceStart"}' >/dev/null
wait_for out-api 'microvm-init: waiting' 120 || fail "the API's guest never came up"
echo "running-cad=$(hosted-tool api /tmp/api.sock PUT /actions '{"action_type": "SendCtrlAltDel"}')"
kill $api
./mote run --kernel "$KERNEL" --initrd guest.cpio.gz --append "$GUEST_ARGS $(guest_cmd 'echo going-off; poweroff -f')" >out-off 2>&1
echo "poweroff-status=$?"
grep -E 'going-off|reboot: Power down' out-off | tr -d '\r'
"#,
    );
    run.assert_ok();
    for kernel in ["x86-vmlinux", "x86-bzImage"] {
        assert_eq!(
            run.value(&format!("{kernel}-status=")),
            "1",
            "{}",
            run.output
        );
        assert!(
            run.value(&format!("{kernel}-error="))
                .starts_with("not an arm64 Image: there is no \"ARM\\x64\" magic at byte 0x38"),
            "{}",
            run.output
        );
    }
    if snapshot.is_some() {
        assert_eq!(run.value("snapshot-status="), "1", "{}", run.output);
        assert_eq!(
            run.value("snapshot-error="),
            "the snapshot was taken of an x86_64 guest; this mote runs aarch64 guests"
        );
    }
    let refusal = r#"400 {"fault_message":"SendCtrlAltDel does not supported on aarch64."}"#;
    assert_eq!(run.value("preboot-cad="), refusal, "{}", run.output);
    assert_eq!(run.value("running-cad="), refusal, "{}", run.output);
    run.assert_line("going-off")
        .assert_line("reboot: Power down");
    assert_eq!(run.value("poweroff-status="), "0", "{}", run.output);
}

/// Two clones of one snapshot run at once, each carrying on the user-space loop it was
/// snapshotted in, with a vsock device of its own; the snapshot's files are unchanged.
#[test]
fn hosted_aarch64_two_clones_of_one_snapshot_carry_on_at_once() {
    if !require_emulated_host(Arch::Aarch64) {
        return;
    }
    let run = Hosted::for_arch(Arch::Aarch64).smp(2).run(
        r#"
cmd=$(guest_cmd 'hosted-tool vsock-listen 5000 --echo & i=0; while :; do i=$((i + 1)); echo tick-$i; sleep 0.2; done')
cat > vm.json <<JSON
{"boot-source": {"kernel_image_path": "$KERNEL", "initrd_path": "guest.cpio.gz",
                 "boot_args": "console=ttyS0 panic=1 $GUEST_ARGS $cmd"},
 "machine-config": {"vcpu_count": 2, "mem_size_mib": 128},
 "vsock": {"guest_cid": 3, "uds_path": "/tmp/v0.sock"}}
JSON
./mote --api-sock /tmp/api0.sock --config-file vm.json --log-path out0.log >out0 2>&1 &
origin=$!
wait_count out0 tick- 5 120 || fail "the guest's loop never ran"
hosted-tool api /tmp/api0.sock PATCH /vm '{"state": "Paused"}' >/dev/null || fail "pause"
hosted-tool api /tmp/api0.sock PUT /snapshot/create \
  '{"snapshot_type": "Full", "snapshot_path": "/tmp/vm.state", "mem_file_path": "/tmp/vm.mem"}' >/dev/null || fail "snapshot"
last=$(latest out0 tick-)
echo last-before-snapshot=$last
kill -9 $origin
sums_before=$(sha256sum /tmp/vm.state /tmp/vm.mem | cut -d' ' -f1 | tr '\n' ' ')
for n in 1 2; do
  ./mote run --restore /tmp/vm.state --mem-file /tmp/vm.mem --vsock-override /tmp/v$n.sock >clone$n 2>&1 &
  eval clone_$n=$!
done
for n in 1 2; do
  wait_count clone$n tick- $((last + 5)) 60 || fail "clone $n did not carry on"
  echo clone$n-first=$(grep -o 'tick-[0-9]*' clone$n | head -n1 | cut -d- -f2)
  printf 'CONNECT 5000\nhello-clone-%s\n' $n | hosted-tool unix-connect /tmp/v$n.sock | tr '\n' ' ' | sed "s/^/clone$n-vsock=/"
  echo
done
kill -9 $clone_1 $clone_2
sums_after=$(sha256sum /tmp/vm.state /tmp/vm.mem | cut -d' ' -f1 | tr '\n' ' ')
[ "$sums_before" = "$sums_after" ] && echo snapshot-files=unchanged || echo snapshot-files=changed
"#,
    );
    run.assert_ok();
    let last: u64 = run.value("last-before-snapshot=").parse().expect("a count");
    for n in 1..=2 {
        let first: u64 = run
            .value(&format!("clone{n}-first="))
            .parse()
            .expect("a count");
        assert_eq!(first, last + 1, "clone {n}:\n{}", run.output);
        let answer = run.value(&format!("clone{n}-vsock="));
        assert!(
            answer.starts_with("OK ") && answer.ends_with(&format!("hello-clone-{n}")),
            "{}",
            run.output
        );
    }
    assert_eq!(run.value("snapshot-files="), "unchanged");
}

/// The unit tests of the aarch64 build (the workspace's libraries and binaries, the device tree,
/// GIC and register code among them), cross-built here and run on the emulated arm64 host,
/// whose /dev/kvm is real.
#[test]
fn hosted_aarch64_unit_tests_pass_on_arm64() {
    if !require_emulated_host(Arch::Aarch64) {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = Arch::Aarch64.musl_target();
    let output = common::clean_cargo()
        .current_dir(repo)
        .args(["test", "--no-run", "--workspace", "--lib", "--bins"])
        .args(["--target", &target, "--message-format=json"])
        .args(["--config", &format!("target.{target}.linker=\"rust-lld\"")])
        .output()
        .expect("cannot run cargo");
    assert!(
        output.status.success(),
        "building the aarch64 unit tests failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let binaries: Vec<PathBuf> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["profile"]["test"] == true)
        .filter_map(|message| message["executable"].as_str().map(PathBuf::from))
        .collect();
    assert!(binaries.len() >= 3, "too few test binaries: {binaries:?}");
    let mut hosted = Hosted::bare(Arch::Aarch64);
    let mut script = String::new();
    for (index, binary) in binaries.iter().enumerate() {
        hosted = hosted.file(binary, &format!("unit-{index}"));
        script.push_str(&format!(
            "./unit-{index} --test-threads 1 >out-{index} 2>&1; echo unit-{index}-status=$?; \
             grep '^test result' out-{index} | sed 's/^/unit-{index}-/'; \
             grep -E '(FAILED|panicked)' out-{index} | head -n 20\n"
        ));
    }
    let run = hosted.run(&script);
    run.assert_ok();
    for (index, binary) in binaries.iter().enumerate() {
        assert_eq!(
            run.value(&format!("unit-{index}-status=")),
            "0",
            "{}:\n{}",
            binary.display(),
            run.output
        );
        assert!(
            run.value(&format!("unit-{index}-test result:"))
                .starts_with("ok."),
            "{}",
            run.output
        );
    }
}

/// `mote-jailer` for aarch64 jails the aarch64 mote as Firecracker's jailer does: in a chroot
/// with its own /dev/kvm, as the uid and gid it is given, in a cgroup of its own with the
/// limits given; the jailed monitor boots a guest through the API.
#[test]
fn hosted_aarch64_jailed_monitor_boots_a_guest() {
    if !require_emulated_host(Arch::Aarch64) {
        return;
    }
    // tools/build --arch aarch64 (run for mote) builds the jailer beside it.
    let mote = mote_of(Arch::Aarch64);
    let jailer = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(Arch::Aarch64.musl_target())
        .join("release/mote-jailer");
    assert!(
        jailer.is_file(),
        "no {} next to {}",
        jailer.display(),
        mote.display()
    );
    let run = Hosted::for_arch(Arch::Aarch64).file(&jailer, "mote-jailer").run(
        r#"
# The emulated host runs from its initramfs, on which pivot_root(2), as the jailer uses it, is
# refused (EINVAL): the jail is made from a tmpfs moved over / in a mount namespace of its own,
# as an init's switch_root does.
cat > jail.sh <<'JAIL'
. ./lib.sh
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup || fail "no cgroup2"
echo +pids > /sys/fs/cgroup/cgroup.subtree_control
./mote-jailer --id arm-jail --exec-file ./mote --uid 12345 --gid 12346 \
  --chroot-base-dir /srv/jail --cgroup-version 2 --parent-cgroup mote-test \
  --cgroup pids.max=64 -- --api-sock /api.sock >out 2>&1 &
jailer=$!
root=/srv/jail/mote/arm-jail/root
i=0; while [ ! -S $root/api.sock ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
[ -S $root/api.sock ] || { cat out; fail "the jailed monitor has no API socket"; }
cp "$KERNEL" guest.cpio.gz $root/
chown 12345:12346 $root/$KERNEL $root/guest.cpio.gz
pid=$(cat /sys/fs/cgroup/mote-test/arm-jail/cgroup.procs | head -n1)
echo "jailed-uid=$(grep '^Uid:' /proc/$pid/status | tr -s '\t ' ' ' | cut -d' ' -f2)"
# Its root, seen from here, is the jail: the API socket is at its top.
[ -S /proc/$pid/root/api.sock ] && [ ! -e /proc/$pid/root/work ] && echo jailed-root=the-jail
echo "pids-max=$(cat /sys/fs/cgroup/mote-test/arm-jail/pids.max)"
ls -l $root/dev/kvm | sed 's/^/jail-kvm=/'
hosted-tool api $root/api.sock PUT /boot-source \
  "{\"kernel_image_path\": \"/$KERNEL\", \"initrd_path\": \"/guest.cpio.gz\", \"boot_args\": \"console=ttyS0 panic=1 $GUEST_ARGS $(guest_cmd 'echo jailed-guest=$(uname -m)')\"}" || fail "boot-source"
hosted-tool api $root/api.sock PUT /actions '{"action_type": "InstanceStart"}' || fail "start"
wait $jailer
echo "jailer-status=$?"
tr -d '\r' < out | grep -E 'jailed-guest=|microvm-exit'
JAIL
mkdir -p /newroot && mount -t tmpfs tmpfs /newroot
for dir in bin sbin etc lib work root; do [ -e /$dir ] && cp -a /$dir /newroot/; done
mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/tmp /newroot/srv /newroot/newroot
unshare -m sh -c '
  mount --make-rprivate /
  mount --move /proc /newroot/proc; mount --move /sys /newroot/sys; mount --move /dev /newroot/dev
  cd /newroot && mount --move . / && exec chroot . sh -c "cd /work && sh jail.sh"'
"#,
    );
    run.assert_ok();
    assert_eq!(run.value("jailed-uid="), "12345", "{}", run.output);
    assert_eq!(run.value("jailed-root="), "the-jail", "{}", run.output);
    assert_eq!(run.value("pids-max="), "64");
    assert!(run.value("jail-kvm=").starts_with('c'), "{}", run.output);
    assert_eq!(run.value("jailed-guest="), "aarch64", "{}", run.output);
    assert_eq!(run.value("microvm-exit:"), "0");
    assert_eq!(run.value("jailer-status="), "0", "{}", run.output);
}

#[test]
fn hosted_aarch64_clock_realtime_restores_advance_the_guest_clock() {
    cases::clock_realtime_restores_advance_the_guest_clock(Arch::Aarch64);
}

#[test]
fn hosted_aarch64_balloon_free_page_hinting_gives_free_memory_back() {
    cases::balloon_free_page_hinting_gives_free_memory_back(Arch::Aarch64);
}

#[test]
fn hosted_aarch64_guest_wget_reads_mmds_v1_and_v2() {
    cases::guest_wget_reads_mmds_v1_and_v2(Arch::Aarch64);
}

/// A custom CPU template on aarch64: one that requires the pointer-authentication KVM
/// capabilities and clears those two vCPU features (bits 5 and 6 of word 0) boots a guest that
/// runs; one that requires a capability KVM lacks, or carries x86_64's CPUID modifiers, is
/// refused naming it. (The test kernel is built without CONFIG_ARM64_PTR_AUTH, so the guest
/// cannot tell whether it has pointer authentication.)
#[test]
fn hosted_aarch64_a_custom_cpu_template_boots_or_is_refused_by_name() {
    if !harness::require_emulated_host(Arch::Aarch64) {
        return;
    }
    let run = harness::Hosted::for_arch(Arch::Aarch64).run(
        r#"
boot() {
  cat > $1.json <<JSON
{"boot-source": {"kernel_image_path": "$KERNEL", "initrd_path": "guest.cpio.gz",
   "boot_args": "console=ttyS0 reboot=k panic=1 pci=off $GUEST_ARGS $(guest_cmd 'echo guest-ran=yes')"},
 "cpu-config": $2}
JSON
  ./mote --no-api --config-file $1.json --log-path /dev/stderr >$1.out 2>$1.err
  echo "$1-status=$?"
  sed -n "s/^guest-ran=/$1-ran=/p" $1.out
  sed -n "s/^mote: /$1-error: /p" $1.err
}
boot shaped '{"kvm_capabilities": ["171", "172"], "vcpu_features": [{"index": 0, "bitmap": "0b00xxxxx"}]}'
boot nocap '{"kvm_capabilities": ["99999"]}'
boot x86 '{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": []}]}'
"#,
    );
    run.assert_ok();
    assert_eq!(run.value("shaped-status="), "0", "{}", run.output);
    assert_eq!(run.value("shaped-ran="), "yes", "{}", run.output);
    assert_ne!(run.value("nocap-status="), "0", "{}", run.output);
    assert!(
        run.value("nocap-error:").contains("lacks capability 99999"),
        "{}",
        run.output
    );
    assert!(
        run.value("x86-error:")
            .contains("cpuid_modifiers are for x86_64; this is an aarch64 host"),
        "{}",
        run.output
    );
}

/// `mote run --image` with an aarch64 mote, mote-init and an arm64 busybox image: the same
/// observations as on x86_64 (tests/hosted/image_cases.rs).
#[test]
fn hosted_aarch64_image_runs_as_a_container() {
    image_cases::image_runs_as_a_container(Arch::Aarch64);
}
