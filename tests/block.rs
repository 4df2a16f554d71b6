//! virtio-blk through the probe guest's polling driver: data reaches the host file and back,
//! read-only drives stay unchanged, a flushed write survives SIGKILL, hostile chains leave the
//! device serving, and bad host files are refused before boot.

mod common;

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{mote_bin, probe_kernel, require_kvm, run_mote, Run};

const SECTOR: usize = 512;

/// The probe's test pattern (tests/probe/src/blk.rs).
fn pattern(sector: u64, offset: usize, seed: u64) -> u8 {
    (sector.wrapping_mul(31) ^ (offset as u64).wrapping_mul(7) ^ seed) as u8
}

fn pattern_sectors(first: u64, count: u64, seed: u64) -> Vec<u8> {
    (first..first + count)
        .flat_map(|s| (0..SECTOR).map(move |i| pattern(s, i, seed)))
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("block")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A disk image of `sectors` sectors filled with byte `fill`.
fn disk(dir: &Path, name: &str, sectors: usize, fill: u8) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, vec![fill; sectors * SECTOR]).unwrap();
    path
}

fn read_sectors(path: &Path, first: u64, count: u64) -> Vec<u8> {
    let mut buf = vec![0u8; count as usize * SECTOR];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, first * SECTOR as u64)
        .unwrap();
    buf
}

fn probe_with(steps: &str, drive_args: &[&str]) -> Run {
    let probe = probe_kernel();
    let steps = format!("probe.run={steps}");
    let mut args = vec![
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--append",
        &steps,
    ];
    args.extend_from_slice(drive_args);
    run_mote(&args, None, Duration::from_secs(30))
}

fn assert_ok(run: &Run) {
    assert_eq!(
        run.status.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(!run.stdout.contains("error"), "{}", run.stdout);
}

#[test]
fn guest_write_then_flush_is_in_the_host_file() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("write");
    let image = disk(&dir, "disk.img", 64, 0);
    let run = probe_with(
        "blk-init,blk-write:3:4:9,blk-flush",
        &["--drive", image.to_str().unwrap()],
    );
    assert_ok(&run);
    assert!(
        run.stdout
            .contains("probe: blk-init capacity=64 ro=false\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("probe: blk-write status=0\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("probe: blk-flush status=0\n"),
        "{}",
        run.stdout
    );
    assert_eq!(read_sectors(&image, 3, 4), pattern_sectors(3, 4, 9));
    assert_eq!(
        read_sectors(&image, 2, 1),
        vec![0; SECTOR],
        "sector before untouched"
    );
    assert_eq!(
        read_sectors(&image, 7, 1),
        vec![0; SECTOR],
        "sector after untouched"
    );
}

#[test]
fn guest_reads_what_the_host_wrote() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("read");
    let image = disk(&dir, "disk.img", 64, 0);
    File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .write_all_at(&pattern_sectors(10, 2, 5), 10 * SECTOR as u64)
        .unwrap();
    let run = probe_with(
        "blk-init,blk-read:10:2:5,blk-read:10:2:6",
        &["--drive", image.to_str().unwrap()],
    );
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("probe: blk-read status=0 match=yes\n"),
        "{}",
        run.stdout
    );
    // The same sectors checked against another seed must not match: the check can fail.
    assert!(
        run.stdout.contains("probe: blk-read status=0 match=no\n"),
        "{}",
        run.stdout
    );
}

#[test]
fn read_only_drive_refuses_writes_and_the_file_is_unchanged() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("readonly");
    let image = disk(&dir, "disk.img", 64, 0x5a);
    let drive = format!("{},ro", image.display());
    let run = probe_with(
        "blk-init,blk-write:0:8:1,blk-flush,blk-read:0:1:0",
        &["--drive", &drive],
    );
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("probe: blk-init capacity=64 ro=true\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("probe: blk-write status=1\n"),
        "{}",
        run.stdout
    );
    assert_eq!(fs::read(&image).unwrap(), vec![0x5a; 64 * SECTOR]);
}

/// `mote run` of the probe with `steps` and the drive `drive` (a path and its options), its
/// console piped, for a test that reads it and kills the monitor.
fn spawn_probe(drive: &str, steps: &str) -> std::process::Child {
    let probe = probe_kernel();
    Command::new(mote_bin())
        .args(["run", "--kernel", probe.to_str().unwrap(), "--drive", drive])
        .arg("--append")
        .arg(format!("probe.run={steps}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_flushed_write_survives_sigkill() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("sigkill");
    let image = disk(&dir, "disk.img", 256, 0);
    let mut child = spawn_probe(
        image.to_str().unwrap(),
        "blk-init,blk-write:100:128:3,blk-flush,spin",
    );
    let mut stdout = child.stdout.take().unwrap();
    common::read_until(
        &mut stdout,
        "probe: blk-flush status=0\n",
        1,
        Duration::from_secs(20),
    );
    common::send_signal(child.id(), libc::SIGKILL);
    child.wait().unwrap();
    assert_eq!(read_sectors(&image, 100, 128), pattern_sectors(100, 128, 3));
}

/// The Async engine (io_uring): the guest's writes, a flush and reads at depth 1, then 32
/// writes and reads in flight at once, all complete with the right data; a write flushed
/// through it is in the file when mote is killed; and the drive really has a ring.
#[test]
fn the_async_engine_serves_requests_in_flight_together_and_keeps_flushed_writes() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("async");
    let image = disk(&dir, "disk.img", 2048, 0);
    // Sectors the guest reads first, out of the host's page cache: such a read completes
    // through the kernel's task work on mote's event loop thread, not on an io_uring worker.
    let file = File::options().write(true).open(&image).unwrap();
    file.write_all_at(&pattern_sectors(1500, 8, 5), 1500 * SECTOR as u64)
        .unwrap();
    file.sync_all().unwrap();
    // SAFETY: advice about a file this test owns; no memory is involved.
    let dropped = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(dropped, 0);
    let drive = format!("{},engine=async", image.display());
    let mut child = spawn_probe(
        &drive,
        "blk-init,blk-read:1500:8:5,blk-write:100:128:3,blk-flush,blk-read:100:128:3,\
         blk-bench:write:8:1:32,blk-bench:read:8:2:32,blk-write:1000:8:4,blk-flush,spin",
    );
    let mut stdout = child.stdout.take().unwrap();
    let seen = common::read_until(
        &mut stdout,
        "probe: blk-flush status=0\n",
        2,
        Duration::from_secs(30),
    );
    let rings = fs::read_dir(format!("/proc/{}/fd", child.id()))
        .unwrap()
        .filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("io_uring"))
        .count();
    common::send_signal(child.id(), libc::SIGKILL);
    child.wait().unwrap();
    assert_eq!(rings, 1, "one io_uring for the one Async drive");
    assert!(
        seen.contains("probe: blk-read status=0 match=yes\n"),
        "{seen}"
    );
    // 1 MiB and 2 MiB in 4 KiB requests, 32 at a time.
    assert!(
        seen.contains("probe: blk-bench done requests=256 errors=0\n"),
        "{seen}"
    );
    assert!(
        seen.contains("probe: blk-bench done requests=512 errors=0\n"),
        "{seen}"
    );
    assert_eq!(read_sectors(&image, 1000, 8), pattern_sectors(1000, 8, 4));
}

#[test]
fn get_id_returns_the_drive_id_and_drives_come_in_order() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("order");
    let root = disk(&dir, "root.img", 8, 0);
    let second = disk(&dir, "second.img", 16, 0);
    let third = disk(&dir, "third.img", 24, 0);
    let named = format!("{},id=scratch_3", third.display());
    let args = [
        "--rootfs",
        root.to_str().unwrap(),
        "--drive",
        second.to_str().unwrap(),
        "--drive",
        &named,
    ];
    let run = probe_with(
        "blk-init:0,blk-id,blk-init:1,blk-id,blk-init:2,blk-id,cmdline",
        &args,
    );
    assert_ok(&run);
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("probe: blk-"))
        .collect();
    assert_eq!(
        lines,
        [
            "probe: blk-init capacity=8 ro=false",
            "probe: blk-id status=0 id=rootfs",
            "probe: blk-init capacity=16 ro=false",
            "probe: blk-id status=0 id=drive1",
            "probe: blk-init capacity=24 ro=false",
            "probe: blk-id status=0 id=scratch_3",
        ]
    );
    // The devices are described where the arch's guests look: on x86_64 in the ACPI tables
    // (as Firecracker does), not on the command line.
    let cmdline = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("probe: cmdline="))
        .expect("the probe's command line");
    assert!(cmdline.ends_with("root=/dev/vda rw"), "{cmdline}");
    assert!(!cmdline.contains("virtio_mmio.device="), "{cmdline}");
}

/// A guest told `acpi=off` finds its virtio-mmio devices on the command line instead, in
/// order.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_guest_without_acpi_gets_its_devices_on_the_command_line() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("noacpi");
    let root = disk(&dir, "root.img", 8, 0);
    let second = disk(&dir, "second.img", 16, 0);
    let run = probe_with(
        "blk-init:1,cmdline acpi=off",
        &[
            "--rootfs",
            root.to_str().unwrap(),
            "--drive",
            second.to_str().unwrap(),
        ],
    );
    assert_ok(&run);
    assert!(
        run.stdout.contains("probe: blk-init capacity=16 ro=false"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("acpi=off root=/dev/vda rw virtio_mmio.device=4K@0xc0001000:5 virtio_mmio.device=4K@0xc0002000:6"),
        "{}",
        run.stdout
    );
}

#[test]
fn capacity_ignores_a_trailing_partial_sector() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("partial");
    let image = dir.join("odd.img");
    fs::write(&image, vec![0u8; 10 * SECTOR + 100]).unwrap();
    let run = probe_with(
        "blk-init,blk-read:9:1:0,blk-read:10:1:0",
        &["--drive", image.to_str().unwrap()],
    );
    assert!(
        run.stdout
            .contains("probe: blk-init capacity=10 ro=false\n"),
        "{}",
        run.stdout
    );
    // Sector 9 is the last whole one; sector 10 is beyond the disk.
    assert!(
        run.stdout.contains("probe: blk-read status=0 match=no\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("probe: blk-read status=1 match=no\n"),
        "{}",
        run.stdout
    );
}

#[test]
fn hostile_chains_fail_and_the_device_keeps_serving() {
    hostile_chains_fail("sync");
}

#[test]
fn hostile_chains_fail_and_the_async_engine_keeps_serving() {
    hostile_chains_fail("async");
}

fn hostile_chains_fail(engine: &str) {
    if !require_kvm() {
        return;
    }
    let dir = scratch(&format!("hostile-{engine}"));
    let image = disk(&dir, "disk.img", 64, 0x77);
    let drive = format!("{},engine={engine}", image.display());
    let cases = [
        "oob",
        "direction",
        "huge",
        "zero-status",
        "readonly-status",
        "loop",
        "next-out-of-range",
    ];
    let steps: Vec<String> = cases.iter().map(|c| format!("blk-hostile:{c}")).collect();
    let run = probe_with(
        &format!("blk-init,{}", steps.join(",")),
        &["--drive", &drive],
    );
    assert_eq!(run.status.code(), Some(0), "{}\n{}", run.stdout, run.stderr);
    for case in cases {
        let line = run
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("probe: blk-hostile {case} ")))
            .unwrap_or_else(|| panic!("no result for {case}: {}", run.stdout));
        // Either an IOERR status, or (nowhere to put a status) nothing written at all.
        assert!(
            line.ends_with("status=1 used_len=1") || line.ends_with("status=255 used_len=0"),
            "{line}"
        );
    }
    assert_eq!(
        run.stdout.matches("probe: blk-alive status=0\n").count(),
        cases.len(),
        "{}",
        run.stdout
    );
    assert_eq!(
        fs::read(&image).unwrap(),
        vec![0x77; 64 * SECTOR],
        "the file changed"
    );
}

fn mote_fails_before_boot(drive_args: &[&str], expected: &str) {
    let run = probe_with("hello", drive_args);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        !run.stdout.contains("probe:"),
        "the guest ran: {}",
        run.stdout
    );
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("mote: "))
        .unwrap_or_default();
    assert!(line.contains(expected), "want {expected:?} in {line:?}");
}

#[test]
fn bad_drive_files_are_refused_before_boot() {
    let dir = scratch("bad");
    mote_fails_before_boot(
        &["--drive", "/nonexistent/disk.img"],
        "cannot open drive drive1's file /nonexistent/disk.img: No such file or directory",
    );
    mote_fails_before_boot(
        &["--rootfs", dir.to_str().unwrap()],
        "cannot open drive rootfs's file",
    );
    let image = disk(&dir, "disk.img", 8, 0);
    mote_fails_before_boot(
        &[
            "--drive",
            image.to_str().unwrap(),
            "--drive",
            image.to_str().unwrap(),
        ],
        "drives drive1 and drive2 both use",
    );
    let ro = format!("{},ro", image.display());
    mote_fails_before_boot(
        &["--drive", &ro, "--drive", image.to_str().unwrap()],
        "and one of them writes it",
    );
    mote_fails_before_boot(
        &["--drive", "/dev/null"],
        "is not a regular file or block device",
    );
    mote_fails_before_boot(
        &["--drive", "a,id=bad id"],
        "drive_id \"bad id\" is invalid",
    );
    mote_fails_before_boot(
        &[
            "--drive",
            &format!("{},id=x", image.display()),
            "--drive",
            &format!("{},id=x", image.display()),
        ],
        "drive_id \"x\" is given twice",
    );
}

#[test]
fn the_same_file_twice_read_only_is_fine() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("shared_ro");
    let image = disk(&dir, "disk.img", 8, 0);
    let ro = format!("{},ro", image.display());
    let run = probe_with("blk-init:0,blk-init:1", &["--drive", &ro, "--drive", &ro]);
    assert_ok(&run);
    assert_eq!(
        run.stdout.matches("capacity=8 ro=true").count(),
        2,
        "{}",
        run.stdout
    );
}

#[test]
fn a_drive_without_permission_is_refused() {
    let dir = scratch("permission");
    let image = disk(&dir, "disk.img", 8, 0);
    fs::set_permissions(&image, fs::Permissions::from_mode(0o444)).unwrap();
    let probe = dir.join("probe");
    fs::copy(probe_kernel(), &probe).unwrap();
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o644)).unwrap();
    // Root may write anything: as nobody, a read-only file cannot back a writable drive.
    let output = Command::new(mote_bin())
        .args([
            "run",
            "--kernel",
            probe.to_str().unwrap(),
            "--drive",
            image.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot open drive drive1's file {}: Permission denied",
            image.display()
        )),
        "{stderr}"
    );
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn discard_gives_space_back_and_write_zeroes_zeroes() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("discard");
    // 1 MiB of 0xaa: every block allocated.
    let image = disk(&dir, "disk.img", 2048, 0xaa);
    let allocated = allocated_bytes(&image);
    let run = probe_with(
        "blk-init,blk-discard:0:1024,blk-zeroes:1024:8,blk-zeroes:1032:8:1,blk-flush",
        &["--drive", image.to_str().unwrap()],
    );
    assert_ok(&run);
    for line in [
        "probe: blk-discard status=0\n",
        "probe: blk-zeroes status=0\n",
    ] {
        assert!(run.stdout.contains(line), "{}", run.stdout);
    }
    assert_eq!(read_sectors(&image, 0, 1040), vec![0; 1040 * SECTOR]);
    assert_eq!(read_sectors(&image, 1040, 1), vec![0xaa; SECTOR]);
    let after = allocated_bytes(&image);
    assert!(
        after + (512 << 10) <= allocated,
        "the discarded half MiB is still allocated: {allocated} -> {after} bytes"
    );
    assert_eq!(fs::metadata(&image).unwrap().len(), 2048 * SECTOR as u64);
}

#[test]
fn a_read_only_drive_refuses_discard_and_write_zeroes() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("discard-ro");
    let image = disk(&dir, "disk.img", 64, 0x55);
    let drive = format!("{},ro", image.display());
    let run = probe_with(
        "blk-init,blk-discard:0:8,blk-zeroes:8:8",
        &["--drive", &drive],
    );
    // VIRTIO_BLK_S_IOERR: the device did not offer the features, and refuses the requests.
    assert!(
        run.stdout.contains("probe: blk-discard status=1\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("probe: blk-zeroes status=1\n"),
        "{}",
        run.stdout
    );
    assert_eq!(read_sectors(&image, 0, 64), vec![0x55; 64 * SECTOR]);
}

/// A write past RLIMIT_FSIZE (what `mote-jailer --resource-limit fsize=N` sets) raised
/// SIGXFSZ, which killed the monitor without a word. It is an I/O error for the guest and a
/// log line; the monitor goes on, and writes below the limit still reach the file.
#[test]
fn a_write_past_the_file_size_limit_is_an_io_error_and_mote_goes_on() {
    if !require_kvm() {
        return;
    }
    /// Sector 32 is the first the limit refuses.
    const LIMIT: u64 = 32 * SECTOR as u64;
    let dir = scratch("fsize");
    let image = disk(&dir, "disk.img", 64, 0);
    let probe = probe_kernel();
    let mut command = Command::new(mote_bin());
    command
        .arg("run")
        .arg("--kernel")
        .arg(&probe)
        .arg("--append")
        // Across the limit (the first sector is written, the second refused), wholly past
        // it, then below it.
        .arg("probe.run=blk-init,blk-write:31:2:1,blk-write:40:1:1,blk-write:0:2:2,blk-flush")
        .arg("--drive")
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    common::limit_in_child(&mut command, common::Limit::FileSize, LIMIT);
    let mut child = command.spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let statuses: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("probe: blk-write") || l.starts_with("probe: blk-flush"))
        .collect();
    assert_eq!(
        statuses,
        [
            "probe: blk-write status=1",
            "probe: blk-write status=1",
            "probe: blk-write status=0",
            "probe: blk-flush status=0",
        ],
        "{stdout}"
    );
    assert!(
        stderr.contains("virtio-blk") && stderr.contains("File too large"),
        "{stderr}"
    );
    assert_eq!(read_sectors(&image, 0, 2), pattern_sectors(0, 2, 2));
    assert_eq!(read_sectors(&image, 40, 1), vec![0; SECTOR]);
}

/// Boots the probe through the API with drives `a` and `b` (both writable), counting slowly so
/// that the guest runs while the test acts.
fn boot_with_two_drives(name: &str, a: &Path, b: &Path) -> common::api::ApiMote {
    let mote = common::api::ApiMote::spawn(name, &[]);
    let boot_source = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=count:200:3000000",
    });
    mote.ok("PUT", "/boot-source", &boot_source.to_string());
    for (id, path) in [("a", a), ("b", b)] {
        let drive = serde_json::json!({
            "drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": false,
        });
        mote.ok("PUT", &format!("/drives/{id}"), &drive.to_string());
    }
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote.wait_for_stdout("probe: count=1\n", Duration::from_secs(20));
    mote
}

#[test]
fn patch_drives_refuses_a_file_another_drive_writes() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("patch_shared");
    let a = disk(&dir, "a.img", 8, 0);
    let b = disk(&dir, "b.img", 8, 0);
    let c = disk(&dir, "c.img", 8, 0);
    let mote = boot_with_two_drives("patch-shared", &a, &b);
    let patch =
        |path: &Path| serde_json::json!({"drive_id": "b", "path_on_host": path}).to_string();
    let answer = mote.request("PATCH", "/drives/b", &patch(&a));
    assert!(
        answer.fault().contains("drives a and b both use"),
        "{answer:?}"
    );
    // Another file is fine, and the configuration shows the drive's file as it is.
    mote.ok("PATCH", "/drives/b", &patch(&c));
    let config = mote.request("GET", "/vm/config", "").json();
    assert_eq!(config["drives"][1]["path_on_host"], c.to_str().unwrap());
    // The file the drive has already (to announce a new size) is not refused by its own lock.
    mote.ok("PATCH", "/drives/b", &patch(&c));
    // The lock went with the old file and came with the new one.
    assert_ok(&probe_with("blk-init", &["--drive", b.to_str().unwrap()]));
    mote_fails_before_boot(
        &["--drive", c.to_str().unwrap()],
        "is locked by another process",
    );
}

#[test]
fn two_monitors_cannot_write_one_image() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("two_writers");
    let a = disk(&dir, "a.img", 8, 0);
    let b = disk(&dir, "b.img", 8, 0);
    let first = boot_with_two_drives("two-writers", &a, &b);
    let image = a.to_str().unwrap();
    let ro = format!("{image},ro");
    for drive in [image, ro.as_str()] {
        mote_fails_before_boot(
            &["--drive", drive],
            &format!("drive drive1's file {image} is locked by another process"),
        );
    }
    // Once the first monitor has gone, the image is free again.
    drop(first);
    let run = probe_with("blk-init", &["--drive", image]);
    assert_ok(&run);
}

#[test]
fn two_monitors_can_read_one_image() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("two_readers");
    let image = disk(&dir, "disk.img", 8, 0);
    let ro = format!("{},ro", image.display());
    let mote = common::api::ApiMote::spawn("two-readers", &[]);
    let boot_source = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=count:200:3000000",
    });
    mote.ok("PUT", "/boot-source", &boot_source.to_string());
    let drive = serde_json::json!({
        "drive_id": "a", "path_on_host": image, "is_root_device": false, "is_read_only": true,
    });
    mote.ok("PUT", "/drives/a", &drive.to_string());
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote.wait_for_stdout("probe: count=1\n", Duration::from_secs(20));
    let run = probe_with("blk-init", &["--drive", &ro]);
    assert_ok(&run);
    // A writer must wait for the readers.
    mote_fails_before_boot(
        &["--drive", image.to_str().unwrap()],
        "is locked by another process",
    );
}

/// A read the driver made available (and notified) before it set DRIVER_OK is served once the
/// device starts, by the event loop: the vCPU thread that starts the device may do no device
/// I/O (its seccomp filter kills the monitor on a `pread64`), which a hostile driver could
/// otherwise use to end its monitor.
#[test]
fn a_request_made_before_driver_ok_is_served_once_the_device_starts() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("early");
    let image = disk(&dir, "disk.img", 16, 0x5a);
    let run = probe_with(
        "blk-init-early:0:2:4,blk-write:8:1:3,blk-flush",
        &["--drive", image.to_str().unwrap()],
    );
    assert_ok(&run);
    // 4 sectors of data and the status byte.
    assert!(
        run.stdout.contains(&format!(
            "probe: blk-init-early status=0 used={}",
            4 * SECTOR + 1
        )),
        "{}",
        run.stdout
    );
    assert_eq!(read_sectors(&image, 8, 1), pattern_sectors(8, 1, 3));
}
