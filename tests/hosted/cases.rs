//! The emulated-host tier's test cases, each for an [`Arch`]: tests/hosted.rs runs them in the
//! emulated x86_64 host and tests/hosted_aarch64.rs in the emulated aarch64 host, so that both
//! arches are held to the same observations. The scripts are busybox sh inside the emulated
//! host, with the helpers of tests/hosted/lib.sh (`$KERNEL` is the guest kernel of its arch).

use std::process::Command;

use crate::harness::{
    read_ext4_file, require_emulated_host, scratch_rootfs_of, Arch, Hosted, HostedRun,
};

/// sha256 of `data`, as sha256sum prints it.
fn sha256(data: &[u8]) -> String {
    let path = std::env::temp_dir().join(format!("mote-hosted-sha.{}", std::process::id()));
    std::fs::write(&path, data).expect("cannot write a scratch file");
    let out = Command::new("sha256sum")
        .arg(&path)
        .output()
        .expect("cannot run sha256sum");
    let _ = std::fs::remove_file(&path);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// What `tools/run-guest` gives a person: the guest's shell on the console. Lines typed on
/// mote's stdin reach the shell and its answers come back on stdout.
pub fn console_is_an_interactive_shell(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).run(
        r#"
mkfifo console-in
./mote run --kernel "$KERNEL" --initrd guest.cpio.gz --append "$GUEST_ARGS" <console-in >console.out 2>&1 &
mote=$!
exec 3>console-in
wait_for console.out 'microvm-init: up' 120 || fail "the guest never reached its init"
wait_for console.out '^/ # ' 30 || fail "no shell prompt"
echo 'echo answer-$((6 * 7)); uname -s' >&3
wait_for console.out '^answer-42' 30 || fail "the shell did not answer"
echo 'exit' >&3
wait $mote
echo "mote-status=$?"
cat console.out
"#,
    );
    run.assert_ok();
    // The typed line is echoed as "echo answer-$((6 * 7))"; only the shell prints answer-42.
    run.assert_line("answer-42").assert_line("Linux");
    assert_eq!(run.value("mote-status="), "0", "{}", run.output);
}

/// `microvm.cmd` runs in the guest's shell; what it sees of its machine is what mote was told
/// (vCPUs, memory, an entropy device that becomes its hardware RNG), and its exit status
/// reaches the console.
pub fn guest_sees_its_vcpus_memory_and_exit_status(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).smp(2).run(
        r#"
for vm in "1 128 3" "2 256 0 --entropy"; do
  set -- $vm
  ./mote run --kernel "$KERNEL" --initrd guest.cpio.gz --vcpus $1 --memory $2 ${4:-} \
    --append "$GUEST_ARGS $(guest_cmd "echo cpus=\$(nproc); grep MemTotal /proc/meminfo; echo rng-current=\$(cat /sys/class/misc/hw_random/rng_current); echo hwrng-bytes=\$(head -c 64 /dev/hwrng | wc -c); exit $3")" \
    >out-$1 2>&1
  echo "vm$1-mote-status=$?"
  grep -E 'cpus=|MemTotal|microvm-exit|rng-current=|hwrng-bytes=' out-$1 | sed "s/^/vm$1-/"
done
"#,
    );
    run.assert_ok();
    for (vm, cpus, mib, exit) in [("vm1-", 1, 128, 3), ("vm2-", 2, 256, 0)] {
        assert_eq!(run.value(&format!("{vm}cpus=")), cpus.to_string());
        assert_eq!(run.value(&format!("{vm}microvm-exit: ")), exit.to_string());
        assert_eq!(run.value(&format!("{vm}mote-status=")), "0");
        let total_kib: u64 = run
            .value(&format!("{vm}MemTotal:"))
            .trim_end_matches("kB")
            .trim()
            .parse()
            .expect("MemTotal in kB");
        // The kernel keeps some for itself, never less than 80 % at these sizes.
        assert!(
            total_kib <= mib * 1024 && total_kib >= mib * 1024 * 8 / 10,
            "{vm}: MemTotal {total_kib} kB for {mib} MiB:\n{}",
            run.output
        );
    }
    // The second VM has an entropy device, which Linux takes as its hardware RNG.
    assert_eq!(run.value("vm2-rng-current="), "virtio_rng.0");
    assert_eq!(run.value("vm2-hwrng-bytes="), "64");
}

/// A file the guest writes and syncs on its ext4 root is in the disk image afterwards (read
/// here, outside both machines), and a read-only drive refuses the guest's writes.
pub fn guest_writes_reach_the_disk_and_a_read_only_drive_refuses_them(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let disk = scratch_rootfs_of(arch, "write");
    let run = Hosted::for_arch(arch).disk(&disk).run(
        r#"
before=$(sha256sum rootfs.ext4 | cut -d' ' -f1)
./mote run --kernel "$KERNEL" --rootfs /dev/vda --drive rootfs.ext4,ro --append "$GUEST_ARGS $(guest_cmd '
echo written-by-the-guest > /hello.txt
sync
if echo x | dd of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then echo ro-write=accepted; else echo ro-write=refused; fi
')" >out 2>&1
echo "mote-status=$?"
after=$(sha256sum rootfs.ext4 | cut -d' ' -f1)
[ "$before" = "$after" ] && echo ro-image=unchanged || echo ro-image=changed
cat out
"#,
    );
    run.assert_ok();
    assert_eq!(run.value("mote-status="), "0");
    assert_eq!(run.value("ro-write="), "refused");
    assert_eq!(run.value("ro-image="), "unchanged");
    assert_eq!(
        String::from_utf8_lossy(&read_ext4_file(&disk, "/hello.txt")),
        "written-by-the-guest\n"
    );
    let _ = std::fs::remove_file(disk);
}

/// A write the guest flushed is on the disk even when mote is killed right after the flush
/// and the emulated host then powers off without writing back its own page cache: so mote
/// must have passed the flush down (fdatasync) before completing it. Ignoring flushes fails
/// this test, unlike a SIGKILL test on an ordinary host, where the page cache survives.
/// `engine` is the drive's: `sync`, or `async` (the io_uring engine, whose flush must wait for
/// the writes before it).
pub fn sigkill_right_after_a_guest_sync_loses_nothing(arch: Arch, engine: &str) {
    if !require_emulated_host(arch) {
        return;
    }
    let disk = scratch_rootfs_of(arch, &format!("sigkill-{engine}"));
    let run = Hosted::for_arch(arch).disk(&disk).run(&format!(
        r#"
./mote run --kernel "$KERNEL" --rootfs /dev/vda,engine={engine} --append "$GUEST_ARGS $(guest_cmd '
head -c 4194304 /dev/urandom > /data.bin
echo guest-sha=$(sha256sum /data.bin | cut -d" " -f1)
sync
echo synced
sleep 600
')" >out 2>&1 &
wait_for out '^synced' 120 || fail "the guest never synced"
[ {engine} = async ] && echo io-uring-fds=$(ls -l /proc/$!/fd | grep -c io_uring)
kill -9 $!
cat out
"#
    ));
    run.assert_ok();
    if engine == "async" {
        // The drive really went through an io_uring (one ring per Async drive).
        assert_eq!(run.value("io-uring-fds="), "1");
    }
    let guest_sha = run.value("guest-sha=");
    let data = read_ext4_file(&disk, "/data.bin");
    assert_eq!(data.len(), 4 << 20, "the synced file is not all there");
    assert_eq!(
        sha256(&data),
        guest_sha,
        "the synced file differs on the disk"
    );
    let _ = std::fs::remove_file(disk);
}

/// The network part of a script: a namespace of its own (unshare), a TAP in it at 172.31.0.1
/// for a guest at 172.31.0.2. The addresses exist only inside the emulated host.
const NETNS_SETUP: &str = r#"
ip link set lo up
tunctl -t tap0 >/dev/null || fail "cannot make tap0"
ip addr add 172.31.0.1/24 dev tap0
ip link set tap0 up
GUEST_NET="ip=172.31.0.2::172.31.0.1:255.255.255.0::eth0:off"
"#;

/// Runs `body` inside a network namespace of its own in the emulated host.
fn in_netns(body: &str) -> String {
    format!(
        "cat > netns.sh <<'NETNS'\n. ./lib.sh\n{NETNS_SETUP}\n{body}\nNETNS\nunshare -n sh netns.sh"
    )
}

/// virtio-net with programs on both ends, on a 4000-byte MTU (the guest's driver takes it from
/// the device): the host pings the guest, also with packets no 1500-byte MTU passes whole,
/// sends it 2 MiB over TCP that a guest program echoes back, and receives 1 MiB that another
/// guest program sends; the checksums match.
pub fn guest_programs_talk_tcp_over_virtio_net(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).run(&in_netns(
        r#"
head -c 2097152 /dev/urandom > to-guest.bin
hosted-tool tcp-listen 7001 </dev/null >from-guest.bin 2>/dev/null &
listener=$!
ip link set tap0 mtu 4000
./mote run --kernel "$KERNEL" --initrd guest.cpio.gz --net tap=tap0,mtu=4000 --append "$GUEST_ARGS $GUEST_NET $(guest_cmd '
echo guest-mtu=$(cat /sys/class/net/eth0/mtu)
hosted-tool tcp-listen 7000 --echo &
head -c 1048576 /dev/urandom > /tmp/out.bin
echo guest-sent-sha=$(sha256sum /tmp/out.bin | cut -d" " -f1)
hosted-tool tcp-connect 172.31.0.1:7001 </tmp/out.bin >/dev/null && echo guest-send=done
sleep 600
')" >out 2>&1 &
mote=$!
wait_for out '^ready' 120 || fail "the guest's TCP server never started"
ping -c 3 -W 5 172.31.0.2 | grep -E 'packets (transmitted|received)'
ping -c 2 -W 5 -s 3900 172.31.0.2 | grep -E 'packets (transmitted|received)' | sed 's/^/large: /'
hosted-tool tcp-connect 172.31.0.2:7000 <to-guest.bin >echoed.bin || fail "tcp-connect failed"
echo echo-sent=$(sha256sum to-guest.bin | cut -d' ' -f1)
echo echo-back=$(sha256sum echoed.bin | cut -d' ' -f1)
wait_for out '^guest-send=done' 60 || fail "the guest could not send"
wait $listener
echo host-received-sha=$(sha256sum from-guest.bin | cut -d' ' -f1)
kill $mote
cat out
"#,
    ));
    run.assert_ok();
    run.assert_line("3 packets transmitted, 3 packets received");
    assert_eq!(run.value("guest-mtu="), "4000", "{}", run.output);
    assert!(
        run.value("large: ")
            .starts_with("2 packets transmitted, 2 packets received"),
        "{}",
        run.output
    );
    assert_eq!(run.value("echo-sent="), run.value("echo-back="));
    assert_eq!(
        run.value("guest-sent-sha="),
        run.value("host-received-sha=")
    );
}

/// vsock from guest programs, three streams at once each way: the guest accepts host
/// connections (Firecracker's `CONNECT <port>` on mote's socket) and connects to a host
/// listener on `<uds>_<port>`; 1 MiB echoed on each stream, checksums compared.
pub fn guest_programs_talk_vsock_both_ways_at_once(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).run(
        r#"
hosted-tool unix-listen /tmp/v.sock_6000 --echo 2>/dev/null &
echoer=$!
./mote run --kernel "$KERNEL" --initrd guest.cpio.gz --vsock cid=3,uds=/tmp/v.sock --append "$GUEST_ARGS $(guest_cmd '
hosted-tool vsock-listen 5000 --echo &
pids=""
for i in 1 2 3; do
  (head -c 1048576 /dev/urandom > /tmp/g$i
   sent=$(sha256sum < /tmp/g$i | cut -d" " -f1)
   back=$(hosted-tool vsock-connect 2 6000 < /tmp/g$i | sha256sum | cut -d" " -f1)
   [ "$sent" = "$back" ] && echo guest-stream-$i=ok || echo guest-stream-$i=bad) &
  pids="$pids $!"
done
wait $pids
sleep 600
')" >out 2>&1 &
mote=$!
wait_for out '^ready' 120 || fail "the guest's vsock listener never started"
pids=""
for i in 1 2 3; do
  (head -c 1048576 /dev/urandom > h$i.bin
   { printf 'CONNECT 5000\n'; cat h$i.bin; } | hosted-tool unix-connect /tmp/v.sock > back$i
   head -n1 back$i | sed "s/^/host-stream-$i-answer=/"
   tail -c +$(( $(head -n1 back$i | wc -c) + 1 )) back$i > back$i.bin
   [ "$(sha256sum < h$i.bin)" = "$(sha256sum < back$i.bin)" ] && echo host-stream-$i=ok || echo host-stream-$i=bad) &
  pids="$pids $!"
done
wait $pids
for i in 1 2 3; do wait_for out "^guest-stream-$i=" 60 || fail "guest stream $i never ended"; done
kill $mote $echoer
cat out
"#,
    );
    run.assert_ok();
    for i in 1..=3 {
        assert_eq!(
            run.value(&format!("host-stream-{i}=")),
            "ok",
            "{}",
            run.output
        );
        assert!(run
            .value(&format!("host-stream-{i}-answer="))
            .starts_with("OK "));
        assert_eq!(
            run.value(&format!("guest-stream-{i}=")),
            "ok",
            "{}",
            run.output
        );
    }
}

/// A guest whose user-space loop counts, writes each count to a data disk and syncs it, and
/// serves TCP and vsock, is paused, snapshotted and killed; a fresh mote restores it and the
/// loop carries on from where it was, while its disk, network and vsock still work.
pub fn restored_guest_programs_carry_on(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let disk = scratch_rootfs_of(arch, "snapshot");
    let run = Hosted::for_arch(arch).disk(&disk).run(&in_netns(
        r#"
cmd=$(guest_cmd '
for d in /sys/bus/virtio/devices/*; do echo features-$(cat $d/device)=$(cut -c30 $d/features); done
mount /dev/vda /mnt || exit 1
hosted-tool vsock-listen 5000 --echo &
hosted-tool tcp-listen 7000 --echo &
i=0
while :; do i=$((i + 1)); echo tick-$i; echo tick-$i >> /mnt/ticks; sync; sleep 0.2; done
')
cat > vm.json <<JSON
{"boot-source": {"kernel_image_path": "$KERNEL", "initrd_path": "guest.cpio.gz",
                 "boot_args": "console=ttyS0 reboot=k panic=1 pci=off $GUEST_ARGS $GUEST_NET $cmd"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
 "drives": [{"drive_id": "data", "path_on_host": "/dev/vda", "is_root_device": false, "is_read_only": false}],
 "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
 "vsock": {"guest_cid": 3, "uds_path": "/tmp/v1.sock"}}
JSON
./mote --api-sock /tmp/api1.sock --config-file vm.json --log-path out1.log >out1 2>&1 &
first=$!
wait_count out1 tick- 5 120 || fail "the guest's loop never ran"
hosted-tool api /tmp/api1.sock PATCH /vm '{"state": "Paused"}' || fail "pause"
hosted-tool api /tmp/api1.sock PUT /snapshot/create \
  '{"snapshot_type": "Full", "snapshot_path": "/tmp/vm.state", "mem_file_path": "/tmp/vm.mem"}' || fail "snapshot"
last=$(latest out1 tick-)
echo last-before-snapshot=$last
grep '^features-' out1
kill -9 $first
wait $first
./mote run --restore /tmp/vm.state --mem-file /tmp/vm.mem --vsock-override /tmp/v2.sock >out2 2>&1 &
second=$!
wait_count out2 tick- $((last + 5)) 60 || fail "the loop did not carry on"
echo first-after-restore=$(grep -o 'tick-[0-9]*' out2 | head -n1 | cut -d- -f2)
ping -c 2 -W 5 172.31.0.2 | grep -E 'packets (transmitted|received)'
echo tcp-answer=$(echo hello-tcp | hosted-tool tcp-connect 172.31.0.2:7000)
printf 'CONNECT 5000\nhello-vsock\n' | hosted-tool unix-connect /tmp/v2.sock | tr '\n' ' ' | sed 's/^/vsock-answer=/'
echo
# The loop syncs every count: what it wrote after the restore must be on the disk.
wait_count out2 tick- $((last + 10)) 60 || fail "the loop stopped"
kill -9 $second
echo last-after-restore=$(latest out2 tick-)
grep -v '^tick-' out2
"#,
    ));
    run.assert_ok();
    // Linux took VIRTIO_RING_F_EVENT_IDX (feature bit 29) from each device (blk, net,
    // vsock), so the used_event / avail_event rule is what this guest ran with.
    for device in ["0x0002", "0x0001", "0x0013"] {
        assert_eq!(
            run.value(&format!("features-{device}=")),
            "1",
            "virtio device {device} did not negotiate EVENT_IDX:\n{}",
            run.output
        );
    }
    let last: u64 = run.value("last-before-snapshot=").parse().expect("a count");
    let first_after: u64 = run.value("first-after-restore=").parse().expect("a count");
    assert_eq!(
        first_after,
        last + 1,
        "the loop did not resume where it was paused"
    );
    run.assert_line("2 packets transmitted, 2 packets received");
    assert_eq!(run.value("tcp-answer="), "hello-tcp");
    assert!(
        run.value("vsock-answer=").starts_with("OK ")
            && run.value("vsock-answer=").ends_with("hello-vsock"),
        "{}",
        run.output
    );
    // Every count, before the snapshot and after the restore, is on the disk once, in order.
    let after: u64 = run.value("last-after-restore=").parse().expect("a count");
    let ticks = String::from_utf8_lossy(&read_ext4_file(&disk, "/ticks")).into_owned();
    let counts: Vec<u64> = ticks
        .lines()
        .map(|l| l.trim_start_matches("tick-").parse().expect("a tick line"))
        .collect();
    assert!(counts.len() as u64 >= after - 1, "ticks lost: {ticks}");
    assert!(
        counts.iter().enumerate().all(|(i, n)| *n == i as u64 + 1),
        "the disk's counts are not 1, 2, 3, ...: {ticks}"
    );
    let _ = std::fs::remove_file(disk);
}

/// A guest program counts on across a Full snapshot, then a Diff snapshot of what changed
/// since (`track_dirty_pages`); the Diff's memory file, laid over the Full one with
/// `mote snapshot rebase`, restores the guest, and the program carries on from where the Diff
/// left it. Any page the Diff missed would be the Full snapshot's old one in a running kernel.
pub fn a_diff_snapshot_rebased_onto_its_base_restores_a_running_program(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).run(
        r#"
cmd=$(guest_cmd '
i=0
while :; do i=$((i + 1)); echo tick-$i; sleep 0.2; done
')
cat > vm.json <<JSON
{"boot-source": {"kernel_image_path": "$KERNEL", "initrd_path": "guest.cpio.gz",
                 "boot_args": "console=ttyS0 reboot=k panic=1 pci=off $GUEST_ARGS $cmd"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true}}
JSON
api() { hosted-tool api /tmp/api1.sock "$@"; }
./mote --api-sock /tmp/api1.sock --config-file vm.json --log-path out1.log >out1 2>&1 &
first=$!
wait_count out1 tick- 3 120 || fail "the guest's loop never ran"
api PATCH /vm '{"state": "Paused"}' || fail "pause"
api PUT /snapshot/create \
  '{"snapshot_type": "Full", "snapshot_path": "/tmp/full.state", "mem_file_path": "/tmp/full.mem"}' || fail "full snapshot"
api PATCH /vm '{"state": "Resumed"}' || fail "resume"
at_full=$(latest out1 tick-)
wait_count out1 tick- $((at_full + 5)) 60 || fail "the loop stopped after the Full snapshot"
api PATCH /vm '{"state": "Paused"}' || fail "pause again"
api PUT /snapshot/create \
  '{"snapshot_type": "Diff", "snapshot_path": "/tmp/diff.state", "mem_file_path": "/tmp/diff.mem"}' || fail "diff snapshot"
last=$(latest out1 tick-)
echo last-before-snapshot=$last
kill -9 $first
wait $first
echo full-kib=$(du -k /tmp/full.mem | cut -f1)
echo diff-kib=$(du -k /tmp/diff.mem | cut -f1)
./mote snapshot rebase --base-file /tmp/full.mem --diff-file /tmp/diff.mem || fail "rebase"
./mote run --restore /tmp/diff.state --mem-file /tmp/full.mem >out2 2>&1 &
second=$!
wait_count out2 tick- $((last + 5)) 60 || fail "the loop did not carry on"
echo first-after-restore=$(grep -o 'tick-[0-9]*' out2 | head -n1 | cut -d- -f2)
kill -9 $second
grep -v '^tick-' out2
"#,
    );
    run.assert_ok();
    let last: u64 = run.value("last-before-snapshot=").parse().expect("a count");
    let first_after: u64 = run.value("first-after-restore=").parse().expect("a count");
    assert_eq!(first_after, last + 1, "{}", run.output);
    let full: u64 = run.value("full-kib=").parse().expect("a size");
    let diff: u64 = run.value("diff-kib=").parse().expect("a size");
    assert!(
        diff * 2 < full,
        "a second of a shell loop dirtied {diff} KiB of a {full} KiB guest:\n{}",
        run.output
    );
}

/// A guest program counts on across a snapshot restored through the `Uffd` memory backend:
/// `hosted-tool uffd-handler` (tests/common/uffd_handler.rs) serves every page the restored
/// Linux guest and mote touch from the memory file, and the loop goes on from the next count.
pub fn a_running_program_restored_through_a_uffd_handler_carries_on(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).run(
        r#"
cmd=$(guest_cmd '
i=0
while :; do i=$((i + 1)); echo tick-$i; sleep 0.2; done
')
cat > vm.json <<JSON
{"boot-source": {"kernel_image_path": "$KERNEL", "initrd_path": "guest.cpio.gz",
                 "boot_args": "console=ttyS0 reboot=k panic=1 pci=off $GUEST_ARGS $cmd"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}
JSON
./mote --api-sock /tmp/api1.sock --config-file vm.json --log-path out1.log >out1 2>&1 &
first=$!
wait_count out1 tick- 3 120 || fail "the guest's loop never ran"
hosted-tool api /tmp/api1.sock PATCH /vm '{"state": "Paused"}' >/dev/null || fail "pause"
hosted-tool api /tmp/api1.sock PUT /snapshot/create \
  '{"snapshot_type": "Full", "snapshot_path": "/tmp/vm.state", "mem_file_path": "/tmp/vm.mem"}' >/dev/null || fail "snapshot"
last=$(latest out1 tick-)
echo last-before-snapshot=$last
kill -9 $first
wait $first
hosted-tool uffd-handler /tmp/uffd.sock /tmp/vm.mem >handler.out 2>handler.err &
handler=$!
wait_for handler.err ready 30 || fail "the handler did not start"
./mote --api-sock /tmp/api2.sock --log-path out2.log >out2 2>&1 &
second=$!
wait_for out2.log "API server started" 30 || fail "the second mote did not start"
hosted-tool api /tmp/api2.sock PUT /snapshot/load \
  '{"snapshot_path": "/tmp/vm.state", "mem_backend": {"backend_type": "Uffd", "backend_path": "/tmp/uffd.sock"}, "resume_vm": true}' \
  || { cat out2.log; fail "load through the handler"; }
wait_count out2 tick- $((last + 5)) 60 || { cat out2.log; fail "the loop did not carry on"; }
echo first-after-restore=$(grep -o 'tick-[0-9]*' out2 | head -n1 | cut -d- -f2)
kill -9 $second
wait $handler
cat handler.out
"#,
    );
    run.assert_ok();
    let last: u64 = run.value("last-before-snapshot=").parse().expect("a count");
    let first_after: u64 = run.value("first-after-restore=").parse().expect("a count");
    assert_eq!(first_after, last + 1, "{}", run.output);
    let faults: u64 = run
        .value("uffd-handler: faults=")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("the handler's count");
    assert!(faults > 0, "{}", run.output);
}

/// A guest program counts on across a snapshot restored twice through mote's own pager (the
/// `Lazy` memory backend): the first restore serves the running Linux guest's faults from the
/// memory file and records its working set, the second copies that in before the vCPUs run;
/// both go on from the next count, and the `lazy_restore` metrics say where the pages came from.
pub fn a_running_program_restored_by_the_lazy_pager_carries_on_with_and_without_a_working_set(
    arch: Arch,
) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).run(
        r#"
cmd=$(guest_cmd '
i=0
while :; do i=$((i + 1)); echo tick-$i; sleep 0.2; done
')
cat > vm.json <<JSON
{"boot-source": {"kernel_image_path": "$KERNEL", "initrd_path": "guest.cpio.gz",
                 "boot_args": "console=ttyS0 reboot=k panic=1 pci=off $GUEST_ARGS $cmd"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}
JSON
./mote --api-sock /tmp/api1.sock --config-file vm.json --log-path out1.log >out1 2>&1 &
first=$!
wait_count out1 tick- 3 120 || fail "the guest's loop never ran"
hosted-tool api /tmp/api1.sock PATCH /vm '{"state": "Paused"}' >/dev/null || fail "pause"
hosted-tool api /tmp/api1.sock PUT /snapshot/create \
  '{"snapshot_type": "Full", "snapshot_path": "/tmp/vm.state", "mem_file_path": "/tmp/vm.mem"}' >/dev/null || fail "snapshot"
last=$(latest out1 tick-)
echo last-before-snapshot=$last
kill -9 $first
wait $first
for n in 2 3; do
  ./mote --api-sock /tmp/api$n.sock --log-path out$n.log --metrics-path /tmp/m$n.json >out$n 2>&1 &
  pid=$!
  wait_for out$n.log "API server started" 30 || fail "mote $n did not start"
  hosted-tool api /tmp/api$n.sock PUT /snapshot/load \
    '{"snapshot_path": "/tmp/vm.state", "mem_backend": {"backend_type": "Lazy", "backend_path": "/tmp/vm.mem", "working_set_ms": 2000}, "resume_vm": true}' \
    || { cat out$n.log; fail "lazy load $n"; }
  wait_count out$n tick- $((last + 5)) 60 || { cat out$n.log; fail "the loop did not carry on ($n)"; }
  echo first-after-restore-$n=$(grep -o 'tick-[0-9]*' out$n | head -n1 | cut -d- -f2)
  wait_for out$n.log "fully resident" 120 || { cat out$n.log; fail "memory not resident ($n)"; }
  if [ $n = 2 ]; then
    wait_for out$n.log "working set of" 60 || { cat out$n.log; fail "no working set written"; }
  fi
  hosted-tool api /tmp/api$n.sock PUT /actions '{"action_type": "FlushMetrics"}' >/dev/null || fail "flush $n"
  echo metrics-$n=$(tr '\n' ' ' < /tmp/m$n.json)
  grep -E 'working set|resident|WARN|ERROR' out$n.log
  kill -9 $pid
  wait $pid || true
done
"#,
    );
    run.assert_ok();
    let last: u64 = run.value("last-before-snapshot=").parse().expect("a count");
    let lazy = |n: u32, name: &str| -> u64 {
        let text = run.value(&format!("metrics-{n}="));
        serde_json::Deserializer::from_str(&text)
            .into_iter::<serde_json::Value>()
            .map(|line| {
                line.expect("a metrics line")["lazy_restore"][name]
                    .as_u64()
                    .unwrap()
            })
            .sum()
    };
    for n in [2, 3] {
        let first_after: u64 = run
            .value(&format!("first-after-restore-{n}="))
            .parse()
            .expect("a count");
        assert_eq!(first_after, last + 1, "restore {n}:\n{}", run.output);
        // 128 MiB, every page once: on demand, by prefetch, or from the working set.
        let pages = lazy(n, "pages_on_demand")
            + lazy(n, "pages_prefetched")
            + lazy(n, "pages_from_working_set");
        assert_eq!(pages, (128 << 20) / 4096, "restore {n}:\n{}", run.output);
    }
    assert!(lazy(2, "pages_on_demand") > 0, "{}", run.output);
    assert_eq!(lazy(2, "pages_from_working_set"), 0, "{}", run.output);
    assert!(lazy(3, "pages_from_working_set") > 0, "{}", run.output);
}

/// Two clones of one snapshot do not share a random state, and each can take an identity of
/// its own: each restore writes a new VM generation ID and raises its interrupt, the guest's
/// `vmgenid` driver (found through ACPI on x86_64, the device tree on aarch64) has the kernel
/// reseed its RNG and log it, and the clones' `/dev/urandom` bytes and random UUIDs differ from
/// then on (without the reseed both would go on from the one RNG state the snapshot holds).
/// Each clone's restore also gives its interface a MAC of its own (`network_overrides` with
/// `guest_mac`), which the guest takes up when, on seeing the fork, it binds its virtio-net
/// driver again.
pub fn clones_reseed_their_rng_from_a_new_generation_id(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).run(&in_netns(
        r#"
for n in 1 2; do
  tunctl -t tap$n >/dev/null || fail "cannot make tap$n"
  ip link set tap$n up
done
cmd=$(guest_cmd '
echo vmgenid-bound=$(ls /sys/bus/acpi/drivers/vmgenid /sys/bus/platform/drivers/vmgenid 2>/dev/null | grep -ciE "vgid|[.]vmgenid")
nic=$(basename $(readlink /sys/class/net/eth0/device))
rebound=0
i=0
while :; do
  i=$((i + 1))
  fork=$(dmesg | grep -c "crng reseeded due to virtual machine fork")
  if [ $fork -ge 1 ] && [ $rebound = 0 ]; then
    echo $nic > /sys/bus/virtio/drivers/virtio_net/unbind
    echo $nic > /sys/bus/virtio/drivers/virtio_net/bind
    rebound=1
  fi
  echo tick-$i fork=$fork mac=$(cat /sys/class/net/eth*/address) rand=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n") uuid=$(cat /proc/sys/kernel/random/uuid)
  sleep 0.2
done')
cat > vm.json <<JSON
{"boot-source": {"kernel_image_path": "$KERNEL", "initrd_path": "guest.cpio.gz",
                 "boot_args": "console=ttyS0 reboot=k panic=1 pci=off $GUEST_ARGS $cmd"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
 "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:1f:00:02"}]}
JSON
./mote --api-sock /tmp/api0.sock --config-file vm.json --log-path out0.log >out0 2>&1 &
origin=$!
wait_count out0 tick- 5 120 || fail "the guest's loop never ran"
hosted-tool api /tmp/api0.sock PATCH /vm '{"state": "Paused"}' >/dev/null || fail "pause"
hosted-tool api /tmp/api0.sock PUT /snapshot/create \
  '{"snapshot_type": "Full", "snapshot_path": "/tmp/vm.state", "mem_file_path": "/tmp/vm.mem"}' >/dev/null || fail "snapshot"
kill -9 $origin
grep -m1 '^vmgenid-bound=' out0 | tr -d '\r'
whole_lines out0 | grep 'tick-' | tail -n1 | sed 's/^/origin-last: /'
for n in 1 2; do
  ./mote run --restore /tmp/vm.state --mem-file /tmp/vm.mem \
    --net-override eth0=tap$n,guest_mac=06:00:ac:1f:00:1$n >clone$n 2>&1 &
  eval clone_$n=$!
done
for n in 1 2; do
  # A whole line only (one ending in its 36-character uuid): the clone is still printing.
  # A clone reseeds within seconds; 30 (of wait_for's polls, longer on a loaded host) leave
  # time for both to say why before the emulated host's own limit (a CI run once hit that
  # limit here with nothing said).
  whole='fork=1 .* uuid=[0-9a-f-]{36}$'
  wait_for clone$n "$whole" 30 || { tail -n 5 clone$((3 - n)); fail "clone $n's kernel never reseeded"; }
  whole_lines clone$n | grep -m1 -E "$whole" | sed "s/^/clone$n-reseeded: /"
done
kill -9 $clone_1 $clone_2
"#,
    ));
    run.assert_ok();
    assert_eq!(run.value("vmgenid-bound="), "1", "{}", run.output);
    let field = |line: &str, name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_string()
    };
    let origin = run.value("origin-last: ");
    assert_eq!(
        field(&origin, "fork="),
        "0",
        "a freshly booted guest logged a fork:\n{}",
        run.output
    );
    assert_eq!(field(&origin, "mac="), "06:00:ac:1f:00:02");
    let clones: Vec<String> = (1..=2)
        .map(|n| run.value(&format!("clone{n}-reseeded: ")))
        .collect();
    for (n, line) in (1..=2).zip(&clones) {
        assert_eq!(field(line, "rand=").len(), 32, "{}", run.output);
        assert_eq!(field(line, "uuid=").len(), 36, "{}", run.output);
        assert_eq!(
            field(line, "mac="),
            format!("06:00:ac:1f:00:1{n}"),
            "{}",
            run.output
        );
    }
    for name in ["rand=", "uuid="] {
        assert_ne!(
            field(&clones[0], name),
            field(&clones[1], name),
            "{}",
            run.output
        );
    }
}

/// The start of a balloon case's script: a 256 MiB guest with `balloon` that touches nearly
/// all its memory and frees it again (so that the host backs its free pages), then prints
/// its meminfo every half second; mote serves the API on /tmp/api.sock. `host` goes on once
/// the guest's loop runs, with `rss` (mote's VmRSS in kB), `rss-touched=` and `guest-before=`
/// already printed.
fn balloon_guest_script(balloon: &str, host: &str) -> String {
    format!(
        r#"
cmd=$(guest_cmd '
n=$(awk "/MemFree/{{print int(\$2 / 1024) - 24}}" /proc/meminfo)
dd if=/dev/zero of=/fill bs=1M count=$n 2>/dev/null; rm /fill; echo touched=$n
while :; do awk "/MemTotal/{{t=\$2}} /MemFree/{{f=\$2}} END{{print \"meminfo total=\" t \" free=\" f}}" /proc/meminfo; sleep 0.5; done
')
cat > vm.json <<JSON
{{"boot-source": {{"kernel_image_path": "$KERNEL", "initrd_path": "guest.cpio.gz",
                 "boot_args": "console=ttyS0 reboot=k panic=1 pci=off $GUEST_ARGS $cmd"}},
 "machine-config": {{"vcpu_count": 1, "mem_size_mib": 256}},
 "balloon": {balloon}}}
JSON
./mote --api-sock /tmp/api.sock --config-file vm.json --log-path out.log >out 2>&1 &
pid=$!
rss() {{ awk '/VmRSS/{{print $2}}' /proc/$pid/status; }}
wait_for out 'meminfo total=' 120 || fail "the guest's loop never ran"
sleep 1
echo rss-touched=$(rss)
echo guest-before=$(whole_lines out | grep meminfo | tail -n1)
{host}"#
    )
}

/// mote's VmRSS printed after `after` is more than `bar_kib` below the one printed as
/// `rss-touched=` (by [`balloon_guest_script`]).
fn assert_rss_dropped(run: &HostedRun, arch: Arch, after: &str, bar_kib: u64) {
    let touched: u64 = run.value("rss-touched=").parse().expect("VmRSS in kB");
    let now: u64 = run.value(after).parse().expect("VmRSS in kB");
    assert!(
        touched > now + bar_kib,
        "VmRSS {touched} kB -> {now} kB ({after}):\n{}",
        run.output
    );
    eprintln!("{arch:?}: VmRSS {touched} kB touched, {now} kB at {after}");
}

/// A kB figure FIELD (`total=`, `free=`) of the meminfo line printed after KEY.
fn meminfo_kib(run: &HostedRun, key: &str, field: &str) -> u64 {
    run.value(key)
        .split_whitespace()
        .find_map(|word| word.strip_prefix(field))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {key}:\n{}", run.output))
}

/// Free page hinting with a Linux guest: after the guest touched nearly all its memory and
/// freed it again, a hinting run (`PATCH /balloon/hinting/start`) has its driver hand the free
/// memory over, and mote's resident set drops by most of it; the driver's STOP is acknowledged
/// at once, and the guest has its memory back afterwards.
pub fn balloon_free_page_hinting_gives_free_memory_back(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).run(&balloon_guest_script(
        r#"{"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true}"#,
        r#"
echo status-before=$(hosted-tool api /tmp/api.sock GET /balloon/hinting/status)
hosted-tool api /tmp/api.sock PATCH /balloon/hinting/start '{"acknowledge_on_stop": true}' || fail "start"
for i in $(seq 120); do
  s=$(hosted-tool api /tmp/api.sock GET /balloon/hinting/status)
  echo "$s" | grep -q '"host_cmd":1,"guest_cmd":0' && break
  sleep 0.5
done
echo status-after=$s
echo rss-hinted=$(rss)
sleep 2
echo guest-after=$(whole_lines out | grep meminfo | tail -n1)
kill $pid
"#,
    ));
    run.assert_ok();
    assert_eq!(
        run.value("status-before="),
        r#"200 {"host_cmd":0}"#,
        "{}",
        run.output
    );
    assert_eq!(
        run.value("status-after="),
        r#"200 {"host_cmd":1,"guest_cmd":0}"#,
        "{}",
        run.output
    );
    // The guest had about 200 MiB free, all of it touched once; half of that is the bar.
    assert_rss_dropped(&run, arch, "rss-hinted=", 96 * 1024);
    let free = |key: &str| meminfo_kib(&run, key, "free=");
    // DONE gave the guest its blocks back.
    assert!(
        free("guest-after=") + 16 * 1024 > free("guest-before="),
        "{}",
        run.output
    );
}

/// `clock_realtime` on a restore (x86_64): the guest's wall clock reads as if it had run on
/// while the snapshot sat on disk; without it the clock carries on from where it stood. aarch64
/// refuses it by name.
pub fn clock_realtime_restores_advance_the_guest_clock(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).run(
        r#"
cmd=$(guest_cmd 'i=0; while :; do i=$((i + 1)); echo tick-$i at=$(date +%s); sleep 0.2; done')
cat > vm.json <<JSON
{"boot-source": {"kernel_image_path": "$KERNEL", "initrd_path": "guest.cpio.gz",
                 "boot_args": "console=ttyS0 reboot=k panic=1 pci=off $GUEST_ARGS $cmd"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}
JSON
./mote --api-sock /tmp/api0.sock --config-file vm.json --log-path out0.log >out0 2>&1 &
origin=$!
wait_count out0 tick- 5 120 || fail "the guest's loop never ran"
hosted-tool api /tmp/api0.sock PATCH /vm '{"state": "Paused"}' >/dev/null || fail "pause"
hosted-tool api /tmp/api0.sock PUT /snapshot/create \
  '{"snapshot_type": "Full", "snapshot_path": "/tmp/vm.state", "mem_file_path": "/tmp/vm.mem"}' >/dev/null || fail "snapshot"
kill -9 $origin
# Whole times only: the pause may have cut the last line in the middle of its number.
echo guest-at-snapshot=$(tr -d '\r' <out0 | grep -o 'at=[0-9]\{10\}' | tail -n1 | cut -d= -f2)
sleep 8
for mode in plain realtime; do
  flag=""
  [ $mode = realtime ] && flag=--clock-realtime
  ./mote run --restore /tmp/vm.state --mem-file /tmp/vm.mem $flag >$mode 2>&1 &
  pid=$!
  # Until the guest ticks or mote ends (a refused restore), at most 30 s.
  for _ in $(seq 300); do
    grep -q tick- $mode && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
  done
  if grep -q tick- $mode; then
    echo $mode-first-at=$(tr -d '\r' <$mode | grep -o 'at=[0-9]*' | head -n1 | cut -d= -f2)
    kill -9 $pid
  else
    wait $pid
    echo $mode-status=$?
    tr -d '\r' <$mode | grep -m1 'clock_realtime' | sed "s/^/$mode-error: /"
  fi
done
"#,
    );
    run.assert_ok();
    let snapshot_at: i64 = run.value("guest-at-snapshot=").parse().expect("a time");
    let plain: i64 = run.value("plain-first-at=").parse().expect("a time");
    // Without clock_realtime the clock goes on from the snapshot (a second or two of its own
    // ticking and rounding), not from now, 8 s later.
    assert!(
        (snapshot_at..snapshot_at + 4).contains(&plain),
        "plain restore: {plain} after a snapshot at {snapshot_at}:\n{}",
        run.output
    );
    match arch {
        Arch::X86_64 => {
            let realtime: i64 = run.value("realtime-first-at=").parse().expect("a time");
            assert!(
                realtime >= snapshot_at + 8,
                "clock_realtime restore: {realtime} after a snapshot at {snapshot_at}:\n{}",
                run.output
            );
        }
        Arch::Aarch64 => {
            assert_ne!(run.value("realtime-status="), "0", "{}", run.output);
            assert!(
                run.value("realtime-error: ")
                    .contains("clock_realtime is not supported on aarch64"),
                "{}",
                run.output
            );
        }
    }
}

/// A Linux guest with a balloon: nearly all its memory touched and freed (so that the
/// balloon's pages are ones the host backs; free page reporting stays off here, or it would
/// give them back first), then an inflate to 128 MiB, takes about that
/// much out of mote's resident set and of the guest's MemTotal; the statistics the guest sends
/// every second agree with its /proc/meminfo; a deflate gives the memory back to the guest.
pub fn balloon_gives_memory_back(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).run(&balloon_guest_script(
        r#"{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#,
        r#"
# until the statistics say MIB
wait_actual() {
  for i in $(seq 120); do
    s=$(hosted-tool api /tmp/api.sock GET /balloon/statistics)
    echo "$s" | grep -q "\"actual_mib\":$1," && return 0
    sleep 0.5
  done
  echo "stats: $s"
  return 1
}
hosted-tool api /tmp/api.sock PATCH /balloon '{"amount_mib": 128}' || fail "inflate"
wait_actual 128 || fail "the balloon never reached 128 MiB"
sleep 2.5
echo rss-inflated=$(rss)
echo guest-inflated=$(whole_lines out | grep meminfo | tail -n1)
echo stats-inflated=$(hosted-tool api /tmp/api.sock GET /balloon/statistics)
hosted-tool api /tmp/api.sock PATCH /balloon '{"amount_mib": 0}' || fail "deflate"
wait_actual 0 || fail "the balloon never deflated"
sleep 1
echo guest-deflated=$(whole_lines out | grep meminfo | tail -n1)
kill $pid
"#,
    ));
    run.assert_ok();
    let kib = |key: &str, field: &str| meminfo_kib(&run, key, field);
    // 128 MiB given back, less the balloon pages the host had never backed (guest pages
    // nothing had touched) or that were touched again meanwhile: 95-106 MiB on x86_64 and
    // 115 on aarch64 so far. Half of it is the bar: a balloon that gives nothing back
    // drops nothing.
    assert_rss_dropped(&run, arch, "rss-inflated=", 64 * 1024);
    let total_before = kib("guest-before=", "total=");
    let total_inflated = kib("guest-inflated=", "total=");
    // Without deflate_on_oom, Linux takes the balloon's pages out of MemTotal.
    assert_eq!(total_before - total_inflated, 128 * 1024, "{}", run.output);
    assert_eq!(kib("guest-deflated=", "total="), total_before);
    let stats: serde_json::Value = serde_json::from_str(
        run.value("stats-inflated=")
            .strip_prefix("200 ")
            .expect("a 200 answer"),
    )
    .expect("statistics JSON");
    assert_eq!(stats["target_mib"], 128);
    assert_eq!(stats["actual_pages"], 32768);
    // The guest's own numbers, a second apart at most: the total exactly, the free memory
    // within 16 MiB.
    assert_eq!(
        stats["total_memory"].as_u64().expect("total_memory") / 1024,
        total_inflated,
        "{}",
        run.output
    );
    let free = stats["free_memory"].as_u64().expect("free_memory") / 1024;
    let guest_free = kib("guest-inflated=", "free=");
    assert!(
        free.abs_diff(guest_free) < 16 * 1024,
        "statistics free {free} kB, guest MemFree {guest_free} kB"
    );
}

/// MMDS from a Linux guest's own programs: busybox `wget` reads what the host PUT, from V1
/// as IMDS text and as JSON, and from V2 only with the token a PUT /latest/api/token gave
/// (busybox wget cannot PUT: hosted-tool sends that request). The guest reaches
/// 169.254.169.254 through its default route, as a guest without a route for it does.
pub fn guest_wget_reads_mmds_v1_and_v2(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let run = Hosted::for_arch(arch).run(&in_netns(
        r#"
url=http://169.254.169.254/latest/meta-data
v1=$(guest_cmd "
echo v1-id=\$(wget -q -O - $url/instance-id)
echo v1-list=\$(wget -q -O - $url/ | tr '\n' ' ')
echo v1-json=\$(wget -q -O - --header 'Accept: application/json' $url/)
")
v2=$(guest_cmd "
wget -q -O - $url/instance-id || echo v2-without-token=refused
tok=\$(printf 'PUT /latest/api/token HTTP/1.0\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n' | hosted-tool tcp-connect 169.254.169.254:80 | tail -n1)
echo v2-token-len=\${#tok}
wget -q -O - --header 'X-metadata-token: bogus' $url/instance-id || echo v2-bad-token=refused
echo v2-id=\$(wget -q -O - --header \"X-metadata-token: \$tok\" $url/instance-id)
")
for vm in "v1 V1 $v1" "v2 V2 $v2"; do
  set -- $vm
  ./mote --api-sock /tmp/$1.sock --log-path out-$1.log >out-$1 2>&1 &
  pid=$!
  for i in $(seq 50); do [ -S /tmp/$1.sock ] && break; sleep 0.1; done
  hosted-tool api /tmp/$1.sock PUT /boot-source "{\"kernel_image_path\": \"$KERNEL\", \"initrd_path\": \"guest.cpio.gz\", \"boot_args\": \"console=ttyS0 reboot=k panic=1 pci=off $GUEST_ARGS $GUEST_NET $3\"}" >/dev/null || fail "boot-source"
  hosted-tool api /tmp/$1.sock PUT /network-interfaces/eth0 '{"iface_id": "eth0", "host_dev_name": "tap0"}' >/dev/null || fail "eth0"
  hosted-tool api /tmp/$1.sock PUT /mmds/config "{\"version\": \"$2\", \"network_interfaces\": [\"eth0\"]}" >/dev/null || fail "mmds/config"
  hosted-tool api /tmp/$1.sock PUT /mmds "{\"latest\": {\"meta-data\": {\"instance-id\": \"i-hosted-$1\", \"zone\": \"z1\"}}}" >/dev/null || fail "mmds"
  hosted-tool api /tmp/$1.sock PUT /actions '{"action_type": "InstanceStart"}' >/dev/null || fail "start"
  wait $pid
  echo "$1-mote-status=$?"
  tr -d '\r' < out-$1 | grep -E '^v[12]-'
done
"#,
    ));
    run.assert_ok();
    assert_eq!(run.value("v1-id="), "i-hosted-v1");
    assert_eq!(run.value("v1-list="), "instance-id zone");
    assert_eq!(
        run.value("v1-json="),
        r#"{"instance-id":"i-hosted-v1","zone":"z1"}"#
    );
    assert_eq!(run.value("v2-without-token="), "refused");
    assert_eq!(run.value("v2-token-len="), "64");
    assert_eq!(run.value("v2-bad-token="), "refused");
    assert_eq!(run.value("v2-id="), "i-hosted-v2");
    assert_eq!(run.value("v1-mote-status="), "0");
    assert_eq!(run.value("v2-mote-status="), "0");
}
