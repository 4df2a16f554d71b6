//! Linux guests: boot the test kernel (ELF vmlinux through PVH, and bzImage) with the test
//! initramfs and watch what the kernel itself prints. Slow where KVM emulates guest kernel
//! code (30-80 s each): the names start with `linux_` so the test runner can limit how many
//! run at once.

mod common;

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
fn linux_vmlinux_pvh_boots_to_init_on_1_vcpu() {
    if !require_kvm() {
        return;
    }
    let run = boot_linux("vmlinux", 1, "microvm.poweroff");
    assert_reached_init(&run, 1);
}

#[test]
fn linux_vmlinux_pvh_boots_to_init_on_2_vcpus() {
    if !require_kvm() {
        return;
    }
    let run = boot_linux("vmlinux", 2, "microvm.poweroff");
    assert_reached_init(&run, 2);
}

/// One bzImage boot: where KVM emulates guest kernel code its in-guest gzip decompression alone
/// takes minutes, and the vmlinux tests above cover both vCPU counts.
#[test]
fn linux_bzimage_boots_to_init_on_1_vcpu() {
    if !require_kvm() {
        return;
    }
    let run = boot_linux("bzImage", 1, "microvm.poweroff");
    assert_reached_init(&run, 1);
}

#[test]
fn linux_mounts_its_root_from_virtio_blk_and_sees_a_second_drive() {
    if !require_kvm() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux_blk");
    std::fs::create_dir_all(&dir).unwrap();
    // Copies: the guest mounts its root read-write.
    let root = dir.join("rootfs.ext4");
    std::fs::copy(artifacts().join("rootfs.ext4"), &root).unwrap();
    let data = dir.join("data.img");
    std::fs::write(&data, vec![0u8; 4 << 20]).unwrap();
    let data_arg = format!("{},ro", data.display());
    let run = boot_linux_with(
        "vmlinux",
        1,
        "microvm.poweroff",
        &["--rootfs", root.to_str().unwrap(), "--drive", &data_arg],
    );
    let console = &run.stdout;
    assert!(
        console.contains("[vda] 65536 512-byte logical blocks"),
        "{console}"
    );
    assert!(
        console.contains("[vdb] 8192 512-byte logical blocks"),
        "{console}"
    );
    assert!(
        console.contains("VFS: Mounted root (ext4 filesystem) on device 254:0"),
        "{console}"
    );
    // From a root disk the kernel starts /sbin/init (a link to the test init).
    assert!(
        console.contains("Run /sbin/init as init process"),
        "{console}"
    );
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
}

#[test]
fn linux_init_runs_a_command_and_powers_off() {
    if !require_kvm() {
        return;
    }
    if is_pvm_host() {
        let reason = "linux_init_runs_a_command_and_powers_off needs Linux user space, which \
                      cannot run on this PVM host (/sys/module/kvm_pvm); it runs on hardware KVM";
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
