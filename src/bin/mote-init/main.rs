//! mote-init: the guest's init for `mote run --image`, PID 1 in the microVM. From the
//! initramfs mote gives it, it reads the container's configuration from the control drive,
//! mounts the image's root (and the volumes in it), switches to it, mounts /proc, /sys, /dev,
//! /dev/pts, /dev/shm and /tmp, sets the host name, and runs the program as its child with
//! the console as its controlling terminal, the image's environment, working directory and
//! user. It passes on the signals it gets, and those mote leaves in the control drive, to the
//! program, reaps every orphan, and when the program ends writes its exit status to the
//! control drive and ends the VM (a reboot, which ends mote); mote then exits with that status.

#[path = "../../image/init_config.rs"]
#[allow(dead_code)]
mod init_config;
mod signal;
mod sys;
mod user;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use init_config::{InitConfig, CONFIG_OFFSET, CONTROL_DEVICE, EXIT_PREFIX, ROOT_DEVICE, SECTOR};

/// Where the root is mounted before init moves itself into it.
const NEW_ROOT: &str = "/newroot";
/// The resolver's configuration, which mote gives a container with a network.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// The console when the kernel does not say which terminal it is.
const DEFAULT_CONSOLE: &str = "ttyS0";
/// The program could not be found or started (a shell's statuses).
const EXIT_NOT_FOUND: u8 = 127;
const EXIT_CANNOT_RUN: u8 = 126;

fn say(message: &str) {
    let _ = writeln!(io::stderr(), "mote-init: {message}");
}

fn main() {
    // Whatever happens, PID 1 must not return: that panics the kernel.
    std::panic::set_hook(Box::new(|info| {
        say(&format!("{info}"));
        sys::sync();
        sys::power_off();
    }));
    let control = match open_control() {
        Ok(control) => control,
        Err(err) => {
            say(&err);
            sys::power_off();
        }
    };
    match run(&control) {
        Ok(status) => report(&control, status),
        Err(err) => say(&err),
    }
    sys::sync();
    sys::power_off();
}

fn open_control() -> Result<File, String> {
    // The initramfs has /dev but no nodes for the drives: devtmpfs gives them.
    sys::mount(
        Some("devtmpfs"),
        Path::new("/dev"),
        Some("devtmpfs"),
        0,
        None,
    )
    .map_err(|err| format!("cannot mount devtmpfs on /dev: {err}"))?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL_DEVICE)
        .map_err(|err| format!("cannot open the control drive {CONTROL_DEVICE}: {err}"))
}

fn read_config(mut control: &File) -> Result<InitConfig, String> {
    let mut bytes = Vec::new();
    control
        .read_to_end(&mut bytes)
        .map_err(|err| format!("cannot read the control drive: {err}"))?;
    let json = bytes.get(CONFIG_OFFSET..).unwrap_or_default();
    let end = json.iter().position(|b| *b == 0).unwrap_or(json.len());
    serde_json::from_slice(&json[..end])
        .map_err(|err| format!("invalid configuration on the control drive: {err}"))
}

/// Writes the program's exit status where mote reads it, and makes sure it is on the disk.
fn report(control: &File, status: u8) {
    let mut sector = format!("{EXIT_PREFIX}{status}\n").into_bytes();
    sector.resize(SECTOR, 0);
    if let Err(err) = control
        .write_all_at(&sector, 0)
        .and_then(|()| control.sync_all())
    {
        say(&format!("cannot report the exit status: {err}"));
    }
}

fn run(control: &File) -> Result<u8, String> {
    let config = read_config(control)?;
    mount_root(&config)?;
    mount_basics();
    if let Some(text) = &config.resolv_conf {
        if let Err(err) = write_resolv_conf(Path::new(RESOLV_CONF), text) {
            say(&format!("cannot write {RESOLV_CONF}: {err}"));
        }
    }
    if let Err(err) = sys::set_hostname(&config.hostname) {
        say(&format!("cannot set the host name: {err}"));
    }
    // The loopback interface, as every container has it, and every interface --net gave
    // (eth0, …) up even without an address, as a container's are: the kernel's `ip=` (from
    // --ip) has configured eth0 and brought it up already; without it, the program (a DHCP
    // client, say) configures an interface that is up.
    for interface in network_interfaces() {
        if let Err(err) = sys::link_up(&interface) {
            say(&format!("cannot bring up {interface}: {err}"));
        }
    }
    let signals = sys::all_signals();
    sys::block(&signals).map_err(|err| format!("cannot block signals: {err}"))?;
    // Ctrl-Alt-Del is how mote says a signal waits in the control drive: the kernel sends
    // init SIGINT for it instead of rebooting.
    let mut slot = signal::SignalSlot::open();
    if let Err(err) = sys::ctrl_alt_del_to_init() {
        say(&format!(
            "cannot take Ctrl-Alt-Del: {err}; signals to mote will stop the VM"
        ));
    }
    let child = match spawn(&config) {
        Ok(child) => child,
        Err((status, message)) => {
            say(&message);
            return Ok(status);
        }
    };
    let pid = i32::try_from(child.id()).map_err(|_| "the program's pid is out of range")?;
    let status = supervise(pid, &signals, &mut slot);
    // What the program left running goes with it, as a container's processes do.
    sys::kill(-1, libc::SIGKILL);
    while sys::reap_one().is_some() {}
    Ok(status)
}

/// The image's root (and the volumes) mounted, and init moved into it.
fn mount_root(config: &InitConfig) -> Result<(), String> {
    let new_root = Path::new(NEW_ROOT);
    std::fs::create_dir_all(new_root).map_err(|err| format!("cannot make {NEW_ROOT}: {err}"))?;
    sys::mount(Some(ROOT_DEVICE), new_root, Some("ext4"), 0, None)
        .map_err(|err| format!("cannot mount the root {ROOT_DEVICE}: {err}"))?;
    for volume in &config.volumes {
        let target = new_root.join(volume.path.trim_start_matches('/'));
        std::fs::create_dir_all(&target).map_err(|err| {
            format!(
                "cannot make the volume's mount point {}: {err}",
                volume.path
            )
        })?;
        let flags = if volume.read_only { libc::MS_RDONLY } else { 0 };
        sys::mount(Some(&volume.device), &target, Some("ext4"), flags, None).map_err(|err| {
            format!(
                "cannot mount the volume {} on {} (an ext4 image is needed): {err}",
                volume.device, volume.path
            )
        })?;
    }
    // switch_root's way: the new root over /, then chroot into it.
    std::env::set_current_dir(new_root).map_err(|err| format!("cannot enter the root: {err}"))?;
    sys::mount(Some("."), Path::new("/"), None, libc::MS_MOVE, None)
        .map_err(|err| format!("cannot move the root to /: {err}"))?;
    sys::chroot(Path::new(".")).map_err(|err| format!("cannot chroot into the root: {err}"))?;
    std::env::set_current_dir("/").map_err(|err| format!("cannot enter /: {err}"))
}

/// The file systems every container has. One that cannot be mounted is said and skipped.
fn mount_basics() {
    let mounts: [(&str, &str, &str, libc::c_ulong, Option<&str>); 6] = [
        (
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        ),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, None),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("ptmxmode=0666,mode=0620,gid=5"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        let target = Path::new(target);
        let _ = std::fs::create_dir_all(target);
        if let Err(err) = sys::mount(Some(source), target, Some(fstype), flags, data) {
            say(&format!(
                "cannot mount {fstype} on {}: {err}",
                target.display()
            ));
        }
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, link);
    }
}

/// The guest's network interfaces, lo first.
fn network_interfaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name != "lo")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.insert(0, "lo".to_string());
    names
}

/// Puts `text` at `path` as a file of its own: an image's symlink there (to a systemd
/// resolver's file, say) is replaced, not followed, as Docker's bind mount hides it.
fn write_resolv_conf(path: &Path, text: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_file() => std::fs::remove_file(path)?,
        _ => {}
    }
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

/// The console's terminal device: the last one the kernel lists as its console.
fn console_tty() -> String {
    let active = std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
    let name = active.split_whitespace().last().unwrap_or(DEFAULT_CONSOLE);
    format!("/dev/{name}")
}

/// Starts the program; on failure the status and the line to show (127: not found).
fn spawn(config: &InitConfig) -> Result<std::process::Child, (u8, String)> {
    let fail = |status, message: String| (status, message);
    let credentials =
        user::resolve_in_root(&config.user).map_err(|err| fail(EXIT_CANNOT_RUN, err))?;
    let mut env: Vec<(String, String)> = config
        .env
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (e.clone(), String::new()),
        })
        .collect();
    for (key, value) in [
        ("HOME", credentials.home.as_str()),
        ("HOSTNAME", &config.hostname),
    ] {
        if !env.iter().any(|(k, _)| k == key) {
            env.push((key.to_string(), value.to_string()));
        }
    }
    // Docker makes a missing working directory.
    let _ = std::fs::create_dir_all(&config.workdir);
    let tty_path = console_tty();
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&tty_path)
        .map_err(|err| {
            fail(
                EXIT_CANNOT_RUN,
                format!("cannot open the console {tty_path}: {err}"),
            )
        })?;
    let stdio = |file: &File| file.try_clone().map(Stdio::from);
    let (stdin, stdout, stderr) =
        (|| Ok::<_, io::Error>((stdio(&tty)?, stdio(&tty)?, stdio(&tty)?)))()
            .map_err(|err| fail(EXIT_CANNOT_RUN, format!("cannot share the console: {err}")))?;
    let (program, args) = config
        .args
        .split_first()
        .ok_or_else(|| fail(EXIT_CANNOT_RUN, "no program to run".to_string()))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(env)
        .current_dir(&config.workdir)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    let (uid, gid, groups) = (credentials.uid, credentials.gid, credentials.groups.clone());
    // SAFETY: the closure runs in the forked child before exec and makes only system calls
    // (no allocation, no locks: `groups` was made before the fork).
    unsafe {
        command.pre_exec(move || sys::become_program(uid, gid, &groups));
    }
    command.spawn().map_err(|err| {
        let status = if err.kind() == io::ErrorKind::NotFound {
            EXIT_NOT_FOUND
        } else {
            EXIT_CANNOT_RUN
        };
        fail(status, format!("cannot run {program}: {err}"))
    })
}

/// How often the signal slot is read when nothing else happens: the most a signal to mote
/// waits before the program gets it, for a small read from the control drive a time.
const SIGNAL_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Until the program ends: signals for it are passed on (those mote wrote in the control
/// drive too), orphans reaped. Gives its status.
fn supervise(pid: libc::pid_t, signals: &libc::sigset_t, slot: &mut signal::SignalSlot) -> u8 {
    loop {
        // Ctrl-Alt-Del (SIGINT here) says at once that mote wrote a signal where the guest
        // has a keyboard; the slot is read every SIGNAL_POLL anyway, for where none is.
        let signal = sys::wait_signal(signals, SIGNAL_POLL);
        if let Some(forwarded) = slot.take() {
            sys::kill(pid, forwarded);
        }
        let Some(signal) = signal else {
            continue;
        };
        // Where the slot can be read, SIGINT is only mote's doorbell: the signal it stands for
        // is in the slot, which an earlier poll may have taken already. Passing the doorbell
        // on as well would interrupt the program (a shell's TERM trap ended by SIGINT, 130).
        if signal == libc::SIGINT && slot.readable() {
            continue;
        }
        if signal != libc::SIGCHLD {
            sys::kill(pid, signal);
            continue;
        }
        while let Some((reaped, status)) = sys::reap_one() {
            if reaped == pid {
                return sys::exit_status(status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_replaces_a_symlink_and_makes_etc() {
        let dir = std::env::temp_dir().join(format!("mote-init-resolv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("elsewhere");
        std::fs::write(&target, "nameserver 127.0.0.53\n").unwrap();
        let etc = dir.join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::os::unix::fs::symlink(&target, etc.join("resolv.conf")).unwrap();
        write_resolv_conf(&etc.join("resolv.conf"), "nameserver 10.0.2.3\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(etc.join("resolv.conf")).unwrap(),
            "nameserver 10.0.2.3\n"
        );
        assert!(std::fs::symlink_metadata(etc.join("resolv.conf"))
            .unwrap()
            .is_file());
        // What the link pointed at is untouched.
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "nameserver 127.0.0.53\n"
        );
        let fresh = dir.join("no-etc/etc/resolv.conf");
        write_resolv_conf(&fresh, "nameserver 192.0.2.1\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&fresh).unwrap(),
            "nameserver 192.0.2.1\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
