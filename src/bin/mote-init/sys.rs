//! The system calls mote-init makes, each behind a small safe function.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn c_string(text: &[u8]) -> io::Result<CString> {
    CString::new(text).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// mount(2); `source` and `fstype` may be None.
pub fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(|s| c_string(s.as_bytes())).transpose()?;
    let target = c_string(target.as_os_str().as_bytes())?;
    let fstype = fstype.map(|s| c_string(s.as_bytes())).transpose()?;
    let data = data.map(|s| c_string(s.as_bytes())).transpose()?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is NULL or a NUL-terminated string alive for the call.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
}

/// chroot(2).
pub fn chroot(path: &Path) -> io::Result<()> {
    let path = c_string(path.as_os_str().as_bytes())?;
    // SAFETY: `path` is a NUL-terminated string alive for the call.
    check(unsafe { libc::chroot(path.as_ptr()) })
}

/// sethostname(2).
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, alive for the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Flushes every file system to its disk.
pub fn sync() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// Ends the VM; never returns. A reboot, not a power-off: mote ends when its guest resets
/// (`reboot=k`: through the i8042 on x86_64; PSCI on aarch64), while a power-off only halts
/// the vCPUs of an x86_64 microVM, which has no ACPI power-off.
pub fn power_off() -> ! {
    loop {
        // SAFETY: reboot with RB_AUTOBOOT takes no pointers; as PID 1 it ends the machine.
        unsafe {
            libc::reboot(libc::RB_AUTOBOOT);
        }
    }
}

/// The signals init waits for rather than takes: every catchable one.
pub fn all_signals() -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is a valid value that sigfillset then fills.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        set
    }
}

/// Blocks `set` for this thread (the only one), so that its signals wait for sigwaitinfo.
/// Blocked signals reach PID 1 even without a handler.
pub fn block(set: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: `set` is a valid sigset_t; the old mask is not wanted (NULL).
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, set, std::ptr::null_mut()) })
}

/// Waits up to `timeout` for one of the blocked signals in `set`; gives its number, or None
/// when the time ran out.
pub fn wait_signal(set: &libc::sigset_t, timeout: std::time::Duration) -> Option<libc::c_int> {
    let timeout = libc::timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    // SAFETY: `set` and `timeout` are valid for the call; the siginfo is not wanted (NULL).
    let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    (signal > 0).then_some(signal)
}

/// A child that ended, and its wait status; None when none has (WNOHANG) or none is left.
pub fn reap_one() -> Option<(libc::pid_t, libc::c_int)> {
    let mut status = 0;
    // SAFETY: `status` is a valid int for waitpid to write.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    (pid > 0).then_some((pid, status))
}

/// Sends `signal` to `pid` (-1: every process but init).
pub fn kill(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill takes no pointers; a process that is gone is not an error worth telling.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// The exit status a shell gives a wait status: the code, or 128 + the signal.
pub fn exit_status(wait_status: libc::c_int) -> u8 {
    if libc::WIFEXITED(wait_status) {
        u8::try_from(libc::WEXITSTATUS(wait_status)).unwrap_or(255)
    } else if libc::WIFSIGNALED(wait_status) {
        u8::try_from(128 + libc::WTERMSIG(wait_status)).unwrap_or(255)
    } else {
        255
    }
}

/// In the child, before exec: a session of its own with the console as its controlling
/// terminal (stdin is the terminal by then), then the program's credentials.
pub fn become_program(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    // The program starts with no signal blocked (init blocks them all, and a mask is
    // inherited across exec) and SIGPIPE at its default (Rust's runtime ignores it).
    // SAFETY: a zeroed sigset_t is valid and sigemptyset makes it the empty set; the old
    // mask is not wanted (NULL); signal() with SIG_DFL takes no pointers.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check(libc::sigprocmask(
            libc::SIG_SETMASK,
            &empty,
            std::ptr::null_mut(),
        ))?;
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // SAFETY: setsid and ioctl(TIOCSCTTY) take no pointers; fd 0 is the terminal.
    check(unsafe { libc::setsid() })?;
    // SAFETY: as above.
    check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 1) })?;
    // SAFETY: the pointer and count describe `groups`, alive for the call.
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
    // SAFETY: setgid and setuid take no pointers.
    check(unsafe { libc::setgid(gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::setuid(uid) })
}

/// Ctrl-Alt-Del sends init SIGINT from now on, instead of rebooting.
pub fn ctrl_alt_del_to_init() -> io::Result<()> {
    // SAFETY: reboot with LINUX_REBOOT_CMD_CAD_OFF takes no pointers and only sets a flag.
    check(unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_CAD_OFF) })
}

/// Brings the network interface `name` up (IFF_UP), as `ip link set NAME up` does.
pub fn link_up(name: &str) -> io::Result<()> {
    // SAFETY: socket takes no pointers; the descriptor is closed below.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = (|| {
        // SAFETY: a zeroed ifreq is valid: a name of NULs and a zero union.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= request.ifr_name.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name too long",
            ));
        }
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *slot = byte as libc::c_char;
        }
        // SAFETY: `request` is a valid ifreq naming the interface; the kernel writes its
        // flags into it.
        check(unsafe { libc::ioctl(socket, libc::SIOCGIFFLAGS as _, &mut request) })?;
        // SAFETY: SIOCGIFFLAGS filled the union's flags member, which is read and set here.
        unsafe {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        }
        // SAFETY: as for SIOCGIFFLAGS; the kernel only reads the request.
        check(unsafe { libc::ioctl(socket, libc::SIOCSIFFLAGS as _, &request) })
    })();
    // SAFETY: `socket` is this function's own descriptor, closed once.
    unsafe {
        libc::close(socket);
    }
    result
}
