//! The console on a real terminal: raw mode while the guest runs, the original settings back
//! when the monitor ends, whichever way it ends.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{mote_bin, probe_kernel, require_kvm};

struct Pty {
    master: File,
    slave: OwnedFd,
}

fn open_pty() -> Pty {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the integers we pass; the name, termios and
    // window-size arguments may be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned by nobody else.
    unsafe {
        Pty {
            master: File::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    }
}

fn local_flags(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: termios is plain data, filled by tcgetattr on success.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is a live terminal and `termios` outlives the call.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut termios) }, 0);
    termios.c_lflag
}

const COOKED: libc::tcflag_t = libc::ICANON | libc::ECHO | libc::ISIG;

fn spawn_on(pty: &Pty, steps: &str) -> Child {
    let probe = probe_kernel();
    Command::new(mote_bin())
        .args([
            "run",
            "--kernel",
            probe.to_str().unwrap(),
            "--append",
            steps,
        ])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for_raw_mode(pty: &Pty) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while local_flags(&pty.slave) & COOKED != 0 {
        assert!(Instant::now() < deadline, "the terminal never went raw");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn raw_while_running_and_restored_after_the_guest_exits() {
    if !require_kvm() {
        return;
    }
    let mut pty = open_pty();
    assert_eq!(local_flags(&pty.slave) & COOKED, COOKED);
    let mut child = spawn_on(&pty, "probe.run=read");
    wait_for_raw_mode(&pty);
    // In raw mode a key arrives at once, without waiting for a line discipline.
    pty.master.write_all(b"typed\r").unwrap();
    let status = child.wait().unwrap();
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("probe: read=typed\n"), "{stdout}");
    assert_eq!(
        local_flags(&pty.slave) & COOKED,
        COOKED,
        "terminal left raw"
    );
}

#[test]
fn restored_after_a_stop_signal() {
    if !require_kvm() {
        return;
    }
    let pty = open_pty();
    let mut child = spawn_on(&pty, "probe.run=spin");
    wait_for_raw_mode(&pty);
    common::send_signal(child.id(), libc::SIGTERM);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert_eq!(
        local_flags(&pty.slave) & COOKED,
        COOKED,
        "terminal left raw"
    );
}

#[test]
fn restored_after_a_guest_failure() {
    if !require_kvm() {
        return;
    }
    let mut pty = open_pty();
    let mut child = spawn_on(&pty, "probe.run=read,triple");
    wait_for_raw_mode(&pty);
    pty.master.write_all(b"go\r").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "a triple fault is a failure");
    assert_eq!(
        local_flags(&pty.slave) & COOKED,
        COOKED,
        "terminal left raw"
    );
}
