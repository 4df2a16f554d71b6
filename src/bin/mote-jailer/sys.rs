//! Small safe wrappers over the system calls the jailer makes, each returning io::Result.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
}

/// Makes a character device node `path` with `mode` (permission bits) for major:minor.
pub fn mknod_char(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let path = cstring(path)?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mknod(
            path.as_ptr(),
            libc::S_IFCHR | mode,
            libc::makedev(major, minor),
        )
    })?;
    Ok(())
}

pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare only changes this process's namespaces; it touches no memory of ours.
    check(unsafe { libc::unshare(flags) })?;
    Ok(())
}

/// Joins the namespace behind `fd` (of kind `nstype`).
pub fn setns(fd: &impl AsRawFd, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: the descriptor is open for the whole call; setns touches no memory of ours.
    check(unsafe { libc::setns(fd.as_raw_fd(), nstype) })?;
    Ok(())
}

pub fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every string is NUL-terminated and outlives the call, or null where the kernel
    // accepts null; no data argument is passed.
    check(unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

pub fn pivot_root(new_root: &CStr, put_old: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check(ret as libc::c_int)?;
    Ok(())
}

pub fn umount_detach(target: &CStr) -> io::Result<()> {
    // SAFETY: `target` is NUL-terminated and outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) })?;
    Ok(())
}

/// The type of setrlimit's resource argument: glibc has its own, musl takes an int.
#[cfg(target_env = "gnu")]
pub type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
pub type RlimitResource = libc::c_int;

pub fn set_rlimit(resource: RlimitResource, value: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    check(unsafe { libc::setrlimit(resource, &limit) })?;
    Ok(())
}

/// Closes every descriptor from `first` up, so nothing the caller held leaks into the jail.
pub fn close_from(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; the jailer holds no Rust object owning one
    // at or above `first` when it calls this (it runs first thing in main).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    // Kernels before 5.9: close what /proc lists.
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= first)
        .collect();
    for fd in fds {
        // SAFETY: as above; closing the read_dir's own (already closed) descriptor is harmless.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Leaves every supplementary group, then takes `gid` and `uid` for good.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups with a zero count reads no memory; setgid/setuid take plain ids.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: as above.
    check(unsafe { libc::setgid(gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::setuid(uid) })?;
    Ok(())
}

pub enum Forked {
    Parent(libc::pid_t),
    Child,
}

pub fn fork() -> io::Result<Forked> {
    // SAFETY: the jailer is single-threaded, so the child may go on running Rust code.
    let pid = check(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent(pid)
    })
}

pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() })?;
    Ok(())
}

/// Points descriptors 0, 1 and 2 at `fd`.
pub fn redirect_stdio(fd: &impl AsRawFd) -> io::Result<()> {
    for target in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which the Rust runtime does not own.
        check(unsafe { libc::dup2(fd.as_raw_fd(), target) })?;
    }
    Ok(())
}

/// The clock `clock` now, in microseconds (0 if it cannot be read).
pub fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass, which outlives the call.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// Replaces this process with `program`, with `args` (argv[1..]) and an empty environment.
pub fn exec_clean(program: &CStr, argv0: &CStr, args: &[CString]) -> io::Error {
    let mut argv: Vec<*const libc::c_char> = vec![argv0.as_ptr()];
    argv.extend(args.iter().map(|a| a.as_ptr()));
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: argv and envp are null-terminated arrays of pointers to NUL-terminated strings
    // that outlive the call; execve returns only on failure.
    unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}
