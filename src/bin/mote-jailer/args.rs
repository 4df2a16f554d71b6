//! The jailer's command line: Firecracker's jailer flags with their meaning, checked before
//! anything is created so that bad input leaves nothing behind.

use std::path::PathBuf;

use clap::Parser;

/// Where jails go when no --chroot-base-dir is given (Firecracker's default).
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";

#[derive(Debug, Parser)]
#[command(
    name = "mote-jailer",
    version,
    about = "Runs mote in a jail: its own root, mount and network namespaces, cgroup, limits, \
             and an unprivileged uid and gid"
)]
pub struct JailerArgs {
    /// The microVM's id: 1 to 64 characters, each a letter, a digit or '-'. Names the jail and the cgroup, and is
    /// passed to mote as --id.
    #[arg(long, value_parser = parse_id)]
    pub id: String,
    /// The monitor binary to copy into the jail and run.
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// The uid the monitor runs as; 0 (root) only with --allow-root-uid.
    #[arg(long, value_parser = parse_uid)]
    pub uid: u32,
    /// The gid the monitor runs as.
    #[arg(long, value_parser = parse_gid)]
    pub gid: u32,
    /// Let --uid be 0: the monitor then runs as root inside the jail, which the jail exists to
    /// avoid. Only for when that is really meant.
    #[arg(long)]
    pub allow_root_uid: bool,
    /// Jails are made at <BASE>/<exec file name>/<id>/root.
    #[arg(long, value_name = "BASE", default_value = DEFAULT_CHROOT_BASE)]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (a path such as /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// The cgroup version; only 2 is supported.
    #[arg(long, default_value_t = 2, value_parser = parse_cgroup_version)]
    pub cgroup_version: u8,
    /// A cgroup file to write, FILE=VALUE (e.g. pids.max=64, memory.max=256M); may repeat.
    #[arg(long = "cgroup", value_name = "FILE=VALUE", value_parser = parse_cgroup)]
    pub cgroups: Vec<CgroupSetting>,
    /// The cgroup (under the cgroup2 mount) the jail's own cgroup <id> is made in; default:
    /// the exec file's name.
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<PathBuf>,
    /// A resource limit, fsize=N or no-file=N; may repeat. no-file defaults to 2048.
    #[arg(long = "resource-limit", value_name = "RESOURCE=N", value_parser = parse_rlimit)]
    pub resource_limits: Vec<ResourceLimit>,
    /// Detach: a new session, the standard streams on /dev/null, and the jailer's own process
    /// returns once the monitor has started.
    #[arg(long)]
    pub daemonize: bool,
    /// Run the monitor as pid 1 of a new pid namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// The monitor's arguments, after `--`.
    #[arg(last = true, value_name = "MOTE ARGS")]
    pub exec_args: Vec<String>,
}

/// One `--cgroup FILE=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The file's name in the cgroup, e.g. `pids.max`.
    pub file: String,
    /// The controller it belongs to (`pids`), which the parent cgroups must delegate; None for
    /// the core `cgroup.*` files.
    pub controller: Option<String>,
    pub value: String,
}

/// One `--resource-limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimit {
    pub resource: Resource,
    pub value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// RLIMIT_FSIZE: the largest file the monitor may write.
    FileSize,
    /// RLIMIT_NOFILE: how many descriptors it may hold.
    OpenFiles,
}

/// What Firecracker's jailer allows in an id, the monitor's own rule (it is passed on as
/// `--id`): 1 to 64 bytes, each character alphanumeric or '-'.
pub fn parse_id(id: &str) -> Result<String, String> {
    mote::cli::parse_instance_id(id)
}

/// (uid_t) -1 and (gid_t) -1: to setresuid, setresgid and chown they mean "leave as it is",
/// so a monitor "dropped" to them would keep the jailer's root.
const NO_CHANGE_ID: u32 = u32::MAX;

fn parse_uid(uid: &str) -> Result<u32, String> {
    parse_id_number("uid", uid)
}

fn parse_gid(gid: &str) -> Result<u32, String> {
    parse_id_number("gid", gid)
}

fn parse_id_number(kind: &str, value: &str) -> Result<u32, String> {
    let id: u32 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a {kind} (0 to {})", NO_CHANGE_ID - 1))?;
    if id == NO_CHANGE_ID {
        return Err(format!(
            "{kind} {id} is ({kind}_t) -1, which the kernel takes as \"no change\": give a real {kind}"
        ));
    }
    Ok(id)
}

fn parse_cgroup_version(version: &str) -> Result<u8, String> {
    match version {
        "2" => Ok(2),
        "1" => Err("cgroup v1 is not supported: use --cgroup-version 2".to_string()),
        _ => Err(format!("unknown cgroup version {version:?}")),
    }
}

fn parse_cgroup(spec: &str) -> Result<CgroupSetting, String> {
    let (file, value) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?} is not FILE=VALUE"))?;
    // A file name only: a path would let the setting escape the jail's cgroup.
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '_';
    let (controller, _) = file
        .split_once('.')
        .filter(|(c, rest)| !c.is_empty() && !rest.is_empty() && file.chars().all(valid))
        .ok_or_else(|| format!("{file:?} is not a cgroup file name such as pids.max"))?;
    Ok(CgroupSetting {
        file: file.to_string(),
        controller: (controller != "cgroup").then(|| controller.to_string()),
        value: value.to_string(),
    })
}

fn parse_rlimit(spec: &str) -> Result<ResourceLimit, String> {
    let (name, value) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?} is not RESOURCE=N"))?;
    let resource = match name {
        "fsize" => Resource::FileSize,
        "no-file" => Resource::OpenFiles,
        _ => return Err(format!("unknown resource {name:?} (fsize or no-file)")),
    };
    let value = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    Ok(ResourceLimit { resource, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(parse_id("vm-1").is_ok());
        assert!(parse_id(&"a".repeat(64)).is_ok());
        assert!(parse_id(&"a".repeat(65)).is_err());
        assert!(parse_id("").is_err());
        assert!(parse_id("../x").is_err());
        assert!(parse_id("a_b").is_err());
        // Firecracker's rule is Unicode's alphanumerics, as the monitor's.
        assert!(parse_id("vm-é").is_ok());
    }

    #[test]
    fn cgroup_settings_name_a_file_of_the_jail() {
        let pids = parse_cgroup("pids.max=64").unwrap();
        assert_eq!(pids.controller.as_deref(), Some("pids"));
        assert_eq!(pids.value, "64");
        assert_eq!(
            parse_cgroup("cgroup.max.descendants=0").unwrap().controller,
            None
        );
        assert!(parse_cgroup("../pids.max=1").is_err());
        assert!(parse_cgroup("pids=1").is_err());
        assert!(parse_cgroup("pids.max").is_err());
    }

    #[test]
    fn the_no_change_ids_are_refused() {
        assert_eq!(parse_uid("12345"), Ok(12345));
        assert!(parse_uid("4294967295")
            .unwrap_err()
            .contains("uid 4294967295"));
        assert!(parse_gid("4294967295")
            .unwrap_err()
            .contains("gid 4294967295"));
        assert!(parse_uid("-1").is_err());
    }

    #[test]
    fn resource_limits_parse() {
        assert_eq!(
            parse_rlimit("no-file=128"),
            Ok(ResourceLimit {
                resource: Resource::OpenFiles,
                value: 128
            })
        );
        assert!(parse_rlimit("cpu=1").is_err());
        assert!(parse_rlimit("fsize=x").is_err());
    }

    #[test]
    fn mote_arguments_follow_the_double_dash() {
        let args = JailerArgs::try_parse_from([
            "mote-jailer",
            "--id",
            "a",
            "--exec-file",
            "/m",
            "--uid",
            "1",
            "--gid",
            "2",
            "--cgroup",
            "pids.max=5",
            "--",
            "--api-sock",
            "/api.sock",
        ])
        .unwrap();
        assert_eq!(args.exec_args, ["--api-sock", "/api.sock"]);
        assert_eq!(args.cgroup_version, 2);
        assert!(JailerArgs::try_parse_from([
            "mote-jailer",
            "--id",
            "a",
            "--exec-file",
            "/m",
            "--uid",
            "1",
            "--gid",
            "2",
            "--cgroup-version",
            "1",
        ])
        .is_err());
    }
}
