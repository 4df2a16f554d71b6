//! Linux guests: boot the test kernel (ELF vmlinux through PVH, and bzImage) with the test
//! initramfs and watch what the kernel itself prints. Slow where KVM emulates guest kernel
//! code (30-80 s each): the names start with `linux_` so the test runner can limit how many
//! run at once.

mod common;
#[path = "vsock/host.rs"]
mod host;
#[path = "net/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::{require_kvm, run_mote};

/// What the kernel needs on hosts whose KVM emulates privileged guest code (a "PVM" host):
/// without these CPUID bits hidden it runs into instructions the emulator lacks.
const PVM_CLEARCPUID: &str = "clearcpuid=xsave,cx16,popcnt,smap,smep,umip,avx,avx2,avx512f,erms,fsrm,fsgsbase,rdpid,movbe,bmi1,bmi2,rdrand,rdseed";
const LINUX_TIMEOUT: Duration = Duration::from_secs(600);
/// A bzImage decompresses itself in guest kernel code first: minutes where that is emulated.
const BZIMAGE_TIMEOUT: Duration = Duration::from_secs(900);

fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// vmlinux, bzImage and initramfs.cpio.gz, made by `tools/guest-artifacts` on first use.
fn artifacts() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("target/guest");
        let status = Command::new("bash")
            .arg(root.join("tools/guest-artifacts"))
            .arg(&dir)
            .status()
            .expect("cannot run tools/guest-artifacts");
        assert!(status.success(), "tools/guest-artifacts failed");
        dir
    })
}

fn boot_linux(kernel: &str, vcpus: u32, extra_args: &str) -> common::Run {
    let initrd = artifacts().join("initramfs.cpio.gz");
    boot_linux_with(
        kernel,
        vcpus,
        extra_args,
        &["--initrd", initrd.to_str().unwrap()],
    )
}

fn boot_linux_with(kernel: &str, vcpus: u32, extra_args: &str, more: &[&str]) -> common::Run {
    let kernel = artifacts().join(kernel);
    let mut append = String::from(extra_args);
    if is_pvm_host() {
        append = format!("{PVM_CLEARCPUID} {append}");
    }
    let vcpus = vcpus.to_string();
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--vcpus",
        &vcpus,
        "--memory",
        "256",
        "--append",
        append.trim(),
    ];
    args.extend_from_slice(more);
    let timeout = if kernel.ends_with("bzImage") {
        BZIMAGE_TIMEOUT
    } else {
        LINUX_TIMEOUT
    };
    run_mote(&args, None, timeout)
}

/// Checks the boot reached init on `vcpus` CPUs and ended with the guest's own reset.
fn assert_reached_init(run: &common::Run, vcpus: u32) {
    let console = &run.stdout;
    assert!(
        console.contains("Run /init as init process"),
        "no init in:\n{console}\nstderr: {}",
        run.stderr
    );
    let cpus = if vcpus == 1 { "CPU" } else { "CPUs" };
    assert!(
        console.contains(&format!("smp: Brought up 1 node, {vcpus} {cpus}")),
        "not every vCPU came up:\n{console}"
    );
    // Here init either powers off (hardware KVM) or faults and the kernel panics and reboots
    // (panic=1, reboot=k): both end through the i8042 reset with status 0.
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
}

#[test]
fn linux_vmlinux_pvh_boots_to_init_on_2_vcpus() {
    if !require_kvm() {
        return;
    }
    let run = boot_linux("vmlinux", 2, "microvm.poweroff");
    assert_reached_init(&run, 2);
}

/// Boots with an initramfs: a vmlinux on 2 vCPUs and a bzImage on 1 (1 vCPU with a vmlinux is
/// the root-on-virtio-blk test below). Every Linux boot costs minutes where KVM emulates guest
/// kernel code, a bzImage most (its in-guest gzip decompression), so each case boots once.
#[test]
fn linux_bzimage_boots_to_init_on_1_vcpu() {
    if !require_kvm() {
        return;
    }
    let run = boot_linux("bzImage", 1, "microvm.poweroff");
    assert_reached_init(&run, 1);
}

#[test]
fn linux_init_runs_a_command_and_powers_off() {
    if !require_kvm() {
        return;
    }
    if is_pvm_host() {
        let reason = "linux_init_runs_a_command_and_powers_off needs Linux user space, which \
                      cannot run on this PVM host (/sys/module/kvm_pvm); it runs on hardware \
                      KVM, and the emulated-host tier runs the same and more here \
                      (tests/hosted.rs: hosted_guest_sees_its_vcpus_memory_and_exit_status)";
        println!("SKIPPED: {reason}");
        eprintln!("SKIPPED: {reason}");
        return;
    }
    // microvm.cmd=BASE64("echo hello-from-init") runs in the guest's shell.
    let run = boot_linux("vmlinux", 1, "microvm.cmd=ZWNobyBoZWxsby1mcm9tLWluaXQ=");
    assert!(run.stdout.contains("microvm-init: up"), "{}", run.stdout);
    assert!(run.stdout.contains("hello-from-init"), "{}", run.stdout);
    assert!(run.stdout.contains("microvm-exit: 0"), "{}", run.stdout);
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
}

/// A Linux guest paused early in its boot, snapshotted and killed, goes on booting in a fresh
/// monitor that restores it: the kernel's clocks, interrupts and console survive the move.
#[test]
fn linux_snapshot_during_boot_reaches_init() {
    if !require_kvm() {
        return;
    }
    let mut append = String::from("console=ttyS0 reboot=k panic=1 pci=off microvm.poweroff");
    if is_pvm_host() {
        append = format!("{append} {PVM_CLEARCPUID}");
    }
    let source = serde_json::json!({
        "kernel_image_path": artifacts().join("vmlinux"),
        "initrd_path": artifacts().join("initramfs.cpio.gz"),
        "boot_args": append,
    });
    let mote = common::api::ApiMote::spawn("linux-snapshot", &[]);
    mote.ok("PUT", "/boot-source", &source.to_string());
    mote.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 256}"#,
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    // Early in the boot: the memory map is set up, timers and interrupts are not yet.
    mote.wait_for_stdout("Memory:", LINUX_TIMEOUT);
    let (state, mem) = mote.pause_and_snapshot();
    let before = mote.stdout();
    drop(mote);
    assert!(!before.contains("Run /init"), "{before}");

    let restored = common::api::ApiMote::spawn("linux-restored", &[]);
    let load = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    });
    restored.ok("PUT", "/snapshot/load", &load.to_string());
    let run = restored.wait(LINUX_TIMEOUT);
    assert_went_on_after_a_restore(&run, &["Run /init as init process"]);
}

/// A restored kernel printed each of `expected`, did not boot again, and ended in order.
fn assert_went_on_after_a_restore(run: &common::Run, expected: &[&str]) {
    for expected in expected {
        assert!(
            run.stdout.contains(expected),
            "no {expected:?} after the restore:\n{}\nstderr: {}",
            run.stdout,
            run.stderr
        );
    }
    assert!(
        !run.stdout.contains("Linux version"),
        "the kernel booted again"
    );
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
}

/// How many frames from `mac` wait on the packet socket.
fn frames_from(socket: &netns::PacketSocket, mac: &[u8; 6]) -> usize {
    let mut buf = vec![0u8; 65536];
    let mut frames = 0;
    while let Some(len) = socket.recv(&mut buf, Duration::from_millis(200)) {
        if len >= 12 && buf[6..12] == mac[..] {
            frames += 1;
        }
    }
    frames
}

/// A Linux guest snapshotted once its virtio-net and virtio-vsock drivers have set their devices
/// up, and restored in a fresh monitor with another TAP and another vsock socket (the
/// overrides): the kernel goes on to bring eth0 up and reach init, answers the host through the
/// new TAP, and refuses through the restored vsock device a host connection to a port nobody
/// listens on (its reset is a packet from the guest). All of it kernel code: no user space.
#[test]
fn linux_snapshot_with_net_and_vsock_up_goes_on_after_a_restore() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    const GUEST_MAC: [u8; 6] = [0x06, 0, 0x0a, 0, 0, 0x02];
    let ns = netns::Netns::new();
    ns.add_tap("tap0", Some("10.0.0.1/24"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(&ns.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut append = String::from(
        "console=ttyS0 reboot=k panic=1 pci=off microvm.poweroff \
         ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off",
    );
    if is_pvm_host() {
        append = format!("{append} {PVM_CLEARCPUID}");
    }
    let api = dir.join("api.sock");
    let mote = ns.spawn_mote(&["--api-sock".into(), api.display().to_string()]);
    common::api::wait_for_socket(&api, host::WAIT, String::new);
    let put =
        |path: &str, body: serde_json::Value| common::api::ok(&api, "PUT", path, &body.to_string());
    put(
        "/boot-source",
        serde_json::json!({
            "kernel_image_path": artifacts().join("vmlinux"),
            "initrd_path": artifacts().join("initramfs.cpio.gz"),
            "boot_args": append,
        }),
    );
    put(
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 256}),
    );
    put(
        "/network-interfaces/eth0",
        serde_json::json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:0a:00:00:02"}),
    );
    put(
        "/vsock",
        serde_json::json!({"guest_cid": 3, "uds_path": dir.join("v.sock")}),
    );
    put(
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    // A late initcall: every driver has probed its device (DRIVER_OK, queues set up), and the
    // kernel has not configured eth0 yet.
    mote.wait_for_line("IPI shorthand broadcast", LINUX_TIMEOUT);
    let (state, mem) = common::api::pause_and_snapshot(&api, &dir);
    drop(mote);
    ns.ip(&["link", "del", "tap0"]);
    ns.add_tap("tap1", Some("10.0.0.1/24"));
    let socket = netns::PacketSocket::open(&ns, "tap1");

    let api = dir.join("api-restored.sock");
    let restored = ns.spawn_mote(&["--api-sock".into(), api.display().to_string()]);
    common::api::wait_for_socket(&api, host::WAIT, String::new);
    let metrics = dir.join("metrics.json");
    common::api::ok(
        &api,
        "PUT",
        "/metrics",
        &serde_json::json!({ "metrics_path": metrics }).to_string(),
    );
    let uds = dir.join("v-restored.sock");
    let load = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}],
        "vsock_override": {"uds_path": uds},
    });
    common::api::ok(&api, "PUT", "/snapshot/load", &load.to_string());
    // The guest's kernel answers ARP once eth0 has its address.
    let mut ping = ns.spawn(&["ping", "-i", "0.5", "-W", "1", "10.0.0.2"]);
    let (_stream, answer) = host::connect(&uds, 4321);
    assert_eq!(
        answer, None,
        "the guest accepted a connection nobody listens for"
    );
    let run = restored.wait(LINUX_TIMEOUT);
    let _ = ping.kill();
    let _ = ping.wait();
    assert_went_on_after_a_restore(&run, &["IP-Config: Complete", "Run /init as init process"]);
    assert!(
        frames_from(&socket, &GUEST_MAC) > 0,
        "no frame from the guest reached tap1"
    );
    // Metrics lines hold what happened since the line before: add them up.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let from_guest_vsock: u64 = text
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .map(|line| line["vsock"]["tx_packets_count"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        from_guest_vsock > 0,
        "no vsock packet from the guest: {text}"
    );
}

/// `ip=` on the kernel command line brings eth0 up on virtio-net, inside a network namespace of
/// the test's own: the kernel says so, and the TAP sees frames from the guest's MAC (its IPv6
/// announcements, or its ARP answers to the host's pings).
/// One boot for every device a Linux guest drives here (each boot costs minutes on a PVM host):
/// its root file system on virtio-blk (`vda`) with a second, read-only drive (`vdb`), and eth0
/// on a TAP in a network namespace, brought up by the kernel's own `ip=`.
#[test]
fn linux_mounts_its_root_from_virtio_blk_and_brings_eth0_up() {
    if !require_kvm() || !netns::require_root() {
        return;
    }
    const GUEST_MAC: [u8; 6] = [0x06, 0, 0x0a, 0, 0, 0x02];
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux_devices");
    std::fs::create_dir_all(&dir).unwrap();
    // Copies: the guest mounts its root read-write.
    let root = dir.join("rootfs.ext4");
    std::fs::copy(artifacts().join("rootfs.ext4"), &root).unwrap();
    let data = dir.join("data.img");
    std::fs::write(&data, vec![0u8; 4 << 20]).unwrap();
    let data_arg = format!("{},ro", data.display());

    let ns = netns::Netns::new();
    ns.add_tap("tap0", Some("10.0.0.1/24"));
    let socket = netns::PacketSocket::open(&ns, "tap0");
    let kernel = artifacts().join("vmlinux");
    let mut append = String::from("ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off microvm.poweroff");
    if is_pvm_host() {
        append = format!("{PVM_CLEARCPUID} {append}");
    }
    let args: Vec<String> = [
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "256",
        "--append",
        &append,
        "--rootfs",
        root.to_str().unwrap(),
        "--drive",
        &data_arg,
        "--net",
        "tap=tap0,mac=06:00:0a:00:00:02",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mote = ns.spawn_mote(&args);
    // The guest's kernel answers ARP once eth0 has its address.
    let mut ping = ns.spawn(&["ping", "-i", "0.5", "-W", "1", "10.0.0.2"]);
    let run = mote.wait(LINUX_TIMEOUT);
    let _ = ping.kill();
    let _ = ping.wait();
    let console = &run.stdout;
    for expected in [
        "smp: Brought up 1 node, 1 CPU",
        "[vda] 65536 512-byte logical blocks",
        "[vdb] 8192 512-byte logical blocks",
        "VFS: Mounted root (ext4 filesystem) on device 254:0",
        "IP-Config: Complete",
        // From a root disk the kernel starts /sbin/init (a link to the test init).
        "Run /sbin/init as init process",
    ] {
        assert!(
            console.contains(expected),
            "no {expected:?} in:\n{console}\nstderr: {}",
            run.stderr
        );
    }
    assert!(
        frames_from(&socket, &GUEST_MAC) > 0,
        "no frame from the guest reached the TAP"
    );
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
}
