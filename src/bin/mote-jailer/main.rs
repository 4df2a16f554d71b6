//! mote-jailer: starts mote in a jail, with Firecracker's jailer contract. It makes
//! `<base>/<exec name>/<id>/root` with the binary and the device nodes in it, a cgroup v2 with
//! the given limits, and resource limits; then joins the network namespace, enters a new mount
//! namespace rooted at the jail (pivot_root), drops to the given uid and gid and execs the
//! monitor with a clean environment and no inherited descriptors. Input that cannot work is
//! refused before anything is made, and a failure while making the jail removes what was made.

mod args;
mod cgroup;
mod jail;
mod sys;

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use args::{JailerArgs, Resource};
use cgroup::Cgroup;
use jail::Jail;

/// Firecracker's default for the descriptors a jailed monitor may hold.
const DEFAULT_NO_FILE: u64 = 2048;
/// Where the old root is put during pivot_root, inside the new one; removed right after.
const OLD_ROOT: &str = "old_root";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the exec file {path} cannot be used: {source}")]
    ExecFile { path: PathBuf, source: io::Error },
    #[error("the exec file {0} is not a regular file")]
    ExecNotAFile(PathBuf),
    #[error("the exec file {path} is not executable by uid {uid} gid {gid} (mode {mode:o})")]
    ExecNotExecutable {
        path: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    #[error("--uid 0 would run the monitor as root in the jail: give another uid, or pass --allow-root-uid if that is meant")]
    RootUid,
    #[error(
        "--chroot-base-dir {base} is a symbolic link (to {target}): give the directory itself"
    )]
    BaseIsSymlink { base: PathBuf, target: PathBuf },
    #[error("the exec file {path} cannot run alone in a jail: {reason}")]
    ExecNotStatic { path: PathBuf, reason: String },
    #[error("--chroot-base-dir {0} is not an absolute path")]
    RelativeBase(PathBuf),
    #[error("the jail {root} was used already: it holds {found}")]
    JailUsed { root: PathBuf, found: PathBuf },
    #[error("{0} is not a directory (a jail's own directories cannot be links)")]
    JailPathNotADirectory(PathBuf),
    #[error("no cgroup2 file system is mounted (see /proc/self/mounts)")]
    NoCgroup2,
    #[error("--parent-cgroup {0} must be a relative path without '..'")]
    BadParentCgroup(PathBuf),
    #[error(
        "the cgroup2 hierarchy at {mount} has no `{controller}` controller (it has: {available})"
    )]
    NoController {
        controller: String,
        mount: PathBuf,
        available: String,
    },
    #[error("the cgroup {0} exists already")]
    CgroupExists(PathBuf),
    #[error("cannot write {value:?} to {path}: {source}")]
    CgroupWrite {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot {what}: {source}")]
    Sys {
        what: &'static str,
        source: io::Error,
    },
    #[error("an argument holds a NUL byte")]
    NulInArgument,
}

fn sys_error(what: &'static str) -> impl FnOnce(io::Error) -> JailError {
    move |source| JailError::Sys { what, source }
}

fn main() -> ExitCode {
    // Nothing the caller left open may reach the jail; done before the jailer opens anything.
    if let Err(err) = sys::close_from(3) {
        eprintln!("mote-jailer: cannot close inherited descriptors: {err}");
        return ExitCode::FAILURE;
    }
    let start = Start {
        time_us: sys::clock_us(libc::CLOCK_MONOTONIC),
        cpu_time_us: sys::clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
    };
    let args = JailerArgs::parse();
    match run(&args, start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mote-jailer: {err}");
            ExitCode::FAILURE
        }
    }
}

/// When the jailer started, for the monitor's startup metrics (Firecracker's contract).
#[derive(Debug, Clone, Copy)]
struct Start {
    /// CLOCK_MONOTONIC, µs.
    time_us: u64,
    /// The process's CPU time, µs.
    cpu_time_us: u64,
}

/// Returns only on failure, or in the parent of a daemonized or pid-namespaced monitor.
fn run(args: &JailerArgs, start: Start) -> Result<(), JailError> {
    if args.uid == 0 && !args.allow_root_uid {
        return Err(JailError::RootUid);
    }
    // Checked before anything is made; the timed flags are added just before the exec.
    monitor_arguments(args, &StartTimes::default())?;
    let netns = args
        .netns
        .as_ref()
        .map(|path| {
            // Non-blocking: a named pipe given by mistake would otherwise hang the jailer here
            // (setns then refuses what is not a namespace).
            File::options()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(|source| JailError::Io {
                    what: "open the network namespace",
                    path: path.clone(),
                    source,
                })
        })
        .transpose()?;
    let jail = Jail::create(
        &args.chroot_base_dir,
        &args.exec_file,
        &args.id,
        args.uid,
        args.gid,
    )?;
    let parent_cgroup = args
        .parent_cgroup
        .clone()
        .unwrap_or_else(|| PathBuf::from(&jail.exec_name));
    // Without settings there is nothing to limit, and no cgroup is made.
    let cgroup = if args.cgroups.is_empty() {
        None
    } else {
        Some(Cgroup::create(&parent_cgroup, &args.id, &args.cgroups)?)
    };
    set_resource_limits(args)?;
    let dev_null = if args.daemonize {
        Some(
            File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|source| JailError::Io {
                    what: "open",
                    path: "/dev/null".into(),
                    source,
                })?,
        )
    } else {
        None
    };
    if let Some(netns) = &netns {
        sys::setns(netns, libc::CLONE_NEWNET).map_err(sys_error("join the network namespace"))?;
    }
    drop(netns);
    // Children (and so the monitor, forked or not) start in the jail's cgroup.
    if let Some(cgroup) = &cgroup {
        cgroup.join(std::process::id())?;
    }
    if args.new_pid_ns {
        sys::unshare(libc::CLONE_NEWPID).map_err(sys_error("make a pid namespace"))?;
    }
    // From here on the monitor runs in the jail, or the jail is left as it is for inspection.
    let root = jail.root.clone();
    let exec_name = jail.exec_name.clone();
    if let Some(cgroup) = cgroup {
        cgroup.keep();
    }
    jail.keep();
    // The jailer's own CPU time, counted before a fork leaves it in another process.
    let parent_cpu_time_us =
        sys::clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(start.cpu_time_us);
    if args.daemonize || args.new_pid_ns {
        // A new pid namespace takes effect for children only; a daemon leaves its caller.
        if let sys::Forked::Parent(pid) = sys::fork().map_err(sys_error("fork"))? {
            let pid_file = root.join(Path::new(&exec_name).with_extension("pid"));
            // create_new, as Firecracker's jailer: never written through a link left in the jail.
            let write = |path: &Path| {
                use std::io::Write;
                File::options()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .and_then(|mut file| file.write_all(pid.to_string().as_bytes()))
            };
            return write(&pid_file).map_err(|source| JailError::Io {
                what: "write",
                path: pid_file,
                source,
            });
        }
    }
    if let Some(dev_null) = &dev_null {
        sys::setsid().map_err(sys_error("start a new session"))?;
        sys::redirect_stdio(dev_null).map_err(sys_error("redirect the standard streams"))?;
    }
    drop(dev_null);
    enter_root(&root)?;
    sys::drop_privileges(args.uid, args.gid)
        .map_err(sys_error("drop to the jail's uid and gid"))?;
    let program = cstring(Path::new("/").join(&exec_name).as_os_str())?;
    let argv0 = cstring(&exec_name)?;
    let times = StartTimes {
        start_time_us: start.time_us,
        // This process's CPU time from here on is the monitor's (the clock goes on across the
        // exec); what the jailer spent is passed apart, as Firecracker's jailer does.
        start_time_cpu_us: sys::clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
        parent_cpu_time_us,
    };
    let argv = monitor_arguments(args, &times)?;
    Err(sys_error("exec the monitor")(sys::exec_clean(
        &program, &argv0, &argv,
    )))
}

fn cstring(s: &OsStr) -> Result<CString, JailError> {
    CString::new(s.as_bytes()).map_err(|_| JailError::NulInArgument)
}

/// What the monitor is told of its start, in microseconds.
#[derive(Debug, Default, Clone, Copy)]
struct StartTimes {
    /// When the jailer started (CLOCK_MONOTONIC).
    start_time_us: u64,
    /// The process's CPU time at the exec.
    start_time_cpu_us: u64,
    /// The CPU time the jailer spent.
    parent_cpu_time_us: u64,
}

/// The monitor's arguments in the order Firecracker's jailer gives them: `--id ID
/// --start-time-us T --start-time-cpu-us C --parent-cpu-time-us P`, then those after `--`.
fn monitor_arguments(args: &JailerArgs, times: &StartTimes) -> Result<Vec<CString>, JailError> {
    let own = [
        ("--id", args.id.clone()),
        ("--start-time-us", times.start_time_us.to_string()),
        ("--start-time-cpu-us", times.start_time_cpu_us.to_string()),
        ("--parent-cpu-time-us", times.parent_cpu_time_us.to_string()),
    ];
    own.into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .chain(args.exec_args.iter().cloned())
        .map(|arg| cstring(OsStr::new(&arg)))
        .collect()
}

fn set_resource_limits(args: &JailerArgs) -> Result<(), JailError> {
    let mut no_file = DEFAULT_NO_FILE;
    for limit in &args.resource_limits {
        match limit.resource {
            Resource::OpenFiles => no_file = limit.value,
            Resource::FileSize => sys::set_rlimit(libc::RLIMIT_FSIZE, limit.value)
                .map_err(sys_error("set the file size limit"))?,
        }
    }
    sys::set_rlimit(libc::RLIMIT_NOFILE, no_file).map_err(sys_error("set the open files limit"))
}

/// A new mount namespace whose root is the jail: the host's file systems are out of reach.
fn enter_root(root: &Path) -> Result<(), JailError> {
    sys::unshare(libc::CLONE_NEWNS).map_err(sys_error("make a mount namespace"))?;
    let slash = c"/";
    // Mounts made here must not propagate back to the host.
    sys::mount(None, slash, None, libc::MS_SLAVE | libc::MS_REC)
        .map_err(sys_error("make the mounts private"))?;
    let root_c = cstring(root.as_os_str())?;
    // pivot_root needs the new root to be a mount point.
    sys::mount(Some(&root_c), &root_c, None, libc::MS_BIND | libc::MS_REC)
        .map_err(sys_error("bind-mount the jail root"))?;
    std::env::set_current_dir(root).map_err(sys_error("enter the jail root"))?;
    std::fs::create_dir(OLD_ROOT).map_err(sys_error("make the old root's mount point"))?;
    let old_root = cstring(OsStr::new(OLD_ROOT))?;
    sys::pivot_root(c".", &old_root).map_err(sys_error("pivot_root into the jail"))?;
    std::env::set_current_dir("/").map_err(sys_error("enter the new root"))?;
    let old_root_abs = cstring(OsStr::new("/old_root"))?;
    sys::umount_detach(&old_root_abs).map_err(sys_error("unmount the old root"))?;
    std::fs::remove_dir("/old_root").map_err(sys_error("remove the old root's mount point"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monitor_gets_the_id_and_start_times_first_as_from_firecrackers_jailer() {
        let args = JailerArgs::try_parse_from([
            "mote-jailer",
            "--id",
            "vm-1",
            "--exec-file",
            "/mote",
            "--uid",
            "100",
            "--gid",
            "100",
            "--",
            "--api-sock",
            "/api.sock",
        ])
        .unwrap();
        let times = StartTimes {
            start_time_us: 11,
            start_time_cpu_us: 22,
            parent_cpu_time_us: 33,
        };
        let argv: Vec<String> = monitor_arguments(&args, &times)
            .unwrap()
            .into_iter()
            .map(|arg| arg.into_string().unwrap())
            .collect();
        assert_eq!(
            argv,
            [
                "--id",
                "vm-1",
                "--start-time-us",
                "11",
                "--start-time-cpu-us",
                "22",
                "--parent-cpu-time-us",
                "33",
                "--api-sock",
                "/api.sock"
            ]
        );
    }
}
