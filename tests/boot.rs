//! Probe-guest tests of the core monitor: console, exit status, what the guest sees of its
//! machine, the boot timer, serial input and stopping by signal.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{mote_bin, probe_kernel, probe_run, require_kvm};

/// RAM the e820 map gives a guest of `mib` MiB: below the EBDA, then from 1 MiB, skipping the
/// [3 GiB, 4 GiB) MMIO gap.
fn expected_ram_kib(mib: u64) -> u64 {
    const EBDA_KIB: u64 = 0x9fc00 / 1024;
    EBDA_KIB + mib * 1024 - 1024
}

fn expected_ram_top(mib: u64) -> u64 {
    let bytes = mib << 20;
    if bytes <= 3 << 30 {
        bytes
    } else {
        bytes + (1 << 30)
    }
}

#[test]
fn probe_prints_on_the_console_and_a_reset_exits_zero() {
    if !require_kvm() {
        return;
    }
    let run = probe_run("hello", &[]);
    assert!(run.stdout.contains("probe: hello\n"), "{}", run.stdout);
    assert!(run.stdout.contains("probe: done\n"), "{}", run.stdout);
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
}

#[test]
fn guest_sees_every_vcpu() {
    if !require_kvm() {
        return;
    }
    for vcpus in [1, 2, 5, 32] {
        let count = vcpus.to_string();
        let run = probe_run("cpus", &["--vcpus", &count]);
        assert!(
            run.stdout.contains(&format!("probe: cpus={vcpus}\n")),
            "{vcpus} vCPUs: {}",
            run.stdout
        );
        assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
    }
}

#[test]
fn guest_sees_exactly_its_memory() {
    if !require_kvm() {
        return;
    }
    // 4096 MiB runs past the 32-bit MMIO gap, so its last GiB lives above 4 GiB.
    for mib in [32u64, 128, 3072, 4096] {
        let run = probe_run("mem", &["--memory", &mib.to_string()]);
        let expected = format!(
            "probe: mem ram_kib={} top={:#x}\n",
            expected_ram_kib(mib),
            expected_ram_top(mib)
        );
        assert!(
            run.stdout.contains(&expected),
            "{mib} MiB: want {expected:?}, got {}",
            run.stdout
        );
        assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
    }
}

#[test]
fn boot_timer_logs_the_guest_boot_time() {
    if !require_kvm() {
        return;
    }
    let run = probe_run("boot", &["--boot-timer"]);
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
    let line = run
        .stderr
        .lines()
        .find(|line| line.contains("Guest-boot-time ="))
        .unwrap_or_else(|| panic!("no boot-time line in: {}", run.stderr));
    let micros: u64 = line
        .split("Guest-boot-time =")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"));
    assert!(micros > 0 && micros < 10_000_000, "{line}");
}

#[test]
fn without_boot_timer_the_signal_is_ignored() {
    if !require_kvm() {
        return;
    }
    let run = probe_run("boot,hello", &[]);
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
    assert!(run.stdout.contains("probe: hello"), "{}", run.stdout);
    assert!(!run.stderr.contains("Guest-boot-time"), "{}", run.stderr);
}

#[test]
fn append_adds_to_the_default_command_line_and_cmdline_replaces_it() {
    if !require_kvm() {
        return;
    }
    let run = probe_run("cmdline", &["--append", "extra=1"]);
    assert!(
        run.stdout.contains(
            "probe: cmdline=console=ttyS0 reboot=k panic=1 pci=off probe.run=cmdline extra=1\n"
        ),
        "{}",
        run.stdout
    );
    let probe = probe_kernel();
    let run = common::run_mote(
        &[
            "run",
            "--kernel",
            probe.to_str().unwrap(),
            "--cmdline",
            "probe.run=cmdline",
        ],
        None,
        Duration::from_secs(20),
    );
    assert!(
        run.stdout.contains("probe: cmdline=probe.run=cmdline\n"),
        "{}",
        run.stdout
    );
    assert_eq!(run.status.code(), Some(0));
}

#[test]
fn triple_fault_exits_non_zero_with_the_reason() {
    if !require_kvm() {
        return;
    }
    let run = probe_run("hello,triple", &[]);
    assert!(run.stdout.contains("probe: hello"), "{}", run.stdout);
    assert_eq!(run.status.code(), Some(1), "stderr: {}", run.stderr);
    let last = run.stderr.lines().last().unwrap_or_default();
    assert_eq!(last, "mote: the guest triple-faulted (vCPU 0 shut down)");
}

#[test]
fn stdin_reaches_the_guest_through_the_serial_port() {
    if !require_kvm() {
        return;
    }
    // More than the UART's 64-byte FIFO, so the input must wait for the guest to drain it.
    let line = "x".repeat(150);
    let input = format!("{line}\n");
    let run = probe_run_with_stdin("read", input.as_bytes());
    assert!(
        run.stdout.contains(&format!("probe: read={line}\n")),
        "{}",
        run.stdout
    );
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
}

fn probe_run_with_stdin(steps: &str, stdin: &[u8]) -> common::Run {
    let probe = probe_kernel();
    let steps = format!("probe.run={steps}");
    common::run_mote(
        &[
            "run",
            "--kernel",
            probe.to_str().unwrap(),
            "--append",
            &steps,
        ],
        Some(stdin),
        Duration::from_secs(20),
    )
}

/// `mote run` with the probe saying hello and spinning, returned once it said hello (stdout
/// read up to the hello, stderr piped).
fn spawn_spinning_probe() -> std::process::Child {
    let probe = probe_kernel();
    let mut child = Command::new(mote_bin())
        .args(["run", "--kernel", probe.to_str().unwrap()])
        .args(["--append", "probe.run=hello,spin"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    common::read_until(&mut stdout, "probe: hello", 1, Duration::from_secs(20));
    // Kept open: a monitor whose console reader went away would get EPIPE on its next write.
    child.stdout = Some(stdout);
    child
}

#[test]
fn sigterm_stops_a_running_guest_in_order() {
    if !require_kvm() {
        return;
    }
    // Wait until the guest runs, then ask the monitor to stop.
    let mut child = spawn_spinning_probe();
    common::send_signal(child.id(), libc::SIGTERM);
    let started = Instant::now();
    let status = child.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "slow to stop");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr: {stderr}");
    assert!(stderr.contains("mote: stopped by SIGTERM"), "{stderr}");
}

/// Runs the probe to its reset with RLIMIT_NPROC at `nproc` (when given), as a child of this
/// process made a subreaper, and returns how many other processes (teardown reapers, which
/// mote leaves behind when it exits) this process then collected within two seconds.
fn reapers_left_behind(nproc: Option<u64>) -> usize {
    let probe = probe_kernel();
    let mut command = Command::new(mote_bin());
    command
        .args(["run", "--kernel", probe.to_str().unwrap()])
        .args(["--append", "probe.run=boot"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(limit) = nproc {
        common::limit_in_child(&mut command, common::Limit::Processes, limit);
    }
    let status = command.status().expect("cannot run mote");
    assert_eq!(status.code(), Some(0));
    // A loaded host can take seconds to tear a VM down; the loop ends as soon as no child is
    // left, so a long deadline costs nothing when the reaper is quick or absent.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut collected = 0;
    while Instant::now() < deadline {
        // SAFETY: waitpid with WNOHANG only collects an exited child of this process.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        match pid {
            0 => std::thread::sleep(Duration::from_millis(1)),
            -1 => break, // no children left
            _ => collected += 1,
        }
    }
    collected
}

/// mote hands its VM's teardown to a reaper and exits at once (src/teardown.rs). A supervisor
/// that is a child subreaper inherits that reaper and collects it; and where the host is near
/// its task limit, no reaper is made, so reapers can never be why a new monitor cannot start.
#[test]
fn the_teardown_reaper_goes_to_a_subreaper_and_is_skipped_near_the_process_limit() {
    if !require_kvm() {
        return;
    }
    // SAFETY: prctl only sets a flag of this test process (nextest runs one test a process).
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
    assert_eq!(reapers_left_behind(None), 1, "no reaper with room for one");
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap();
    let tasks: u64 = loadavg
        .split_whitespace()
        .nth(3)
        .unwrap()
        .split_once('/')
        .unwrap()
        .1
        .parse()
        .unwrap();
    // A limit of the tasks running now, plus a little room for mote's own threads where the
    // test does not run as root: mote would need the host's task count to more than halve
    // before its exit to see room for a reaper, so other tests ending meanwhile cannot make
    // one appear.
    assert_eq!(
        reapers_left_behind(Some(tasks + 64)),
        0,
        "a reaper near the limit"
    );
}

/// Rss and size (KiB) of the read-only mappings of `pid`'s own executable (its text, read-only
/// data and headers), from /proc/PID/smaps.
fn read_only_image_kib(pid: u32) -> (u64, u64) {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut rss, mut size, mut in_image) = (0, 0, false);
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|first| first.contains('-')) && fields.len() >= 5 {
            // A mapping's first line: range, perms, offset, device, inode[, path].
            in_image = !fields[1].contains('w') && fields.get(5) == Some(&exe.to_str().unwrap());
        } else if in_image && fields.first() == Some(&"Size:") {
            size += fields[1].parse::<u64>().unwrap();
        } else if in_image && fields.first() == Some(&"Rss:") {
            rss += fields[1].parse::<u64>().unwrap();
        }
    }
    (rss, size)
}

/// Once the VM runs, the monitor gives back its mappings of the start-up code (argument
/// parsing, the build): fault-around had mapped most of the executable's text and read-only
/// data by then, three quarters of it, and a spinning guest's monitor faults back well under
/// two thirds. (Measured: release build 75 % → 42 %, debug build 77 % → 52 %.)
#[test]
fn a_running_monitor_keeps_little_of_its_start_up_code_mapped() {
    if !require_kvm() {
        return;
    }
    let mut child = spawn_spinning_probe();
    std::thread::sleep(Duration::from_millis(200));
    let (rss, size) = read_only_image_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(size > 0, "no read-only mapping of mote's executable");
    assert!(
        rss * 3 < size * 2,
        "{rss} KiB of mote's {size} KiB of text and read-only data are still mapped"
    );
}

/// Two seconds after its VM started, the monitor gives back the code of its guest's boot too
/// (device set-up, the first exits and log lines): an idle monitor keeps mapped little more
/// than its event loop. (Measured, the probe spinning: release build 1344 → 336 KiB of
/// 2660, debug build 4976 → 1736 of 10488.)
#[test]
fn an_idle_monitor_gives_back_the_code_of_its_guests_boot() {
    if !require_kvm() {
        return;
    }
    let mut child = spawn_spinning_probe();
    std::thread::sleep(Duration::from_millis(1000));
    let (booting, size) = read_only_image_kib(child.id());
    std::thread::sleep(Duration::from_millis(2000));
    let (idle, _) = read_only_image_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(size > 0, "no read-only mapping of mote's executable");
    assert!(
        idle * 4 < size && idle * 2 < booting,
        "{idle} KiB of mote's {size} KiB of text and read-only data are still mapped when \
         idle ({booting} KiB one second after the start)"
    );
}
