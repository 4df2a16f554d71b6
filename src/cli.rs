//! The command line: `mote run …` for people; without `run`, Firecracker's process model
//! (`mote --api-sock PATH [--config-file PATH] …`), with its flags and their meaning.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use log::LevelFilter;

use crate::arch::DEFAULT_BOOT_ARGS;
use crate::config::{
    BootSourceConfig, DriveConfig, EntropyConfig, IoEngine, MacAddr, MachineConfig,
    NetworkInterfaceConfig, VmResources, VsockConfig,
};
use crate::config::{LoadSnapshotParams, NetworkOverride, VsockOverride};
use crate::logger::parse_level;
use crate::seccomp::SeccompConfig;

mod firecracker_flags;
mod mem_backend;

pub use self::mem_backend::MemBackendArg;

#[derive(Debug, Parser)]
#[command(name = "mote", version, about = "A KVM microVM monitor")]
pub struct Cli {
    #[command(flatten)]
    pub top: TopArgs,
    /// Without a command, mote serves the API (Firecracker's way).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The flags before (or without) a command: the global ones and Firecracker's.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long, global = true, default_value = "Info", value_parser = parse_level)]
    pub level: LevelFilter,
    /// The microVM's id, used in log lines: 1 to 64 characters, each alphanumeric or '-'
    /// (Firecracker's rule).
    #[arg(long, global = true, default_value = "anonymous-instance", value_parser = parse_instance_id)]
    pub id: String,
    /// Run without seccomp filters (for debugging; never in production).
    #[arg(long, global = true, conflicts_with = "seccomp_filter")]
    pub no_seccomp: bool,
    /// Seccomp filters to use instead of the built-in ones: JSON in seccompiler's format with
    /// `build`, `vmm`, `api` and `vcpu` filters (see resources/seccomp/), or a compiled file.
    #[arg(long, global = true, value_name = "PATH")]
    pub seccomp_filter: Option<PathBuf>,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Print the snapshot state file format version this mote writes and reads, and exit.
    #[arg(long)]
    pub snapshot_version: bool,
    /// Print the format version of this snapshot state file, and exit.
    #[arg(long, value_name = "PATH", conflicts_with = "snapshot_version")]
    pub describe_snapshot: Option<PathBuf>,
}

/// Firecracker's exit status for arguments it cannot parse (`ArgParsing`).
pub const EXIT_ARG_PARSING: u8 = 153;

/// The snapshot state file format version this mote writes and reads (`--snapshot-version`).
pub const SNAPSHOT_VERSION: u32 = crate::snapshot::SNAPSHOT_VERSION;

/// The format version in the header of the snapshot state file `path`
/// (`--describe-snapshot`); the error is the one line to show.
pub fn snapshot_format_version(path: &std::path::Path) -> Result<u32, String> {
    crate::snapshot::read_format_version(path).map_err(|err| snapshot_error_line(path, err))
}

/// What the snapshot state file `path` holds (`mote snapshot describe`); the error is the one
/// line to show.
pub fn describe_snapshot(path: &std::path::Path) -> Result<String, String> {
    crate::snapshot::describe::describe_file(path).map_err(|err| snapshot_error_line(path, err))
}

/// `mote snapshot rebase`: the line to print, or the error's.
pub fn rebase_snapshot(
    base: &std::path::Path,
    diff: &std::path::Path,
    output: Option<&std::path::Path>,
) -> Result<String, String> {
    let done =
        crate::snapshot::rebase::rebase(base, diff, output).map_err(|err| err.to_string())?;
    Ok(format!(
        "{}: {} bytes in {} extents laid over {}",
        diff.display(),
        done.bytes,
        done.extents,
        output.unwrap_or(base).display()
    ))
}

/// A snapshot error as one line that names the file.
fn snapshot_error_line(path: &std::path::Path, err: crate::snapshot::SnapshotError) -> String {
    match err {
        // Opening and reading errors name the file already.
        crate::snapshot::SnapshotError::Read(_) => err.to_string(),
        _ => format!("{}: {err}", path.display()),
    }
}

/// The longest `--id` Firecracker accepts, in bytes.
pub const MAX_INSTANCE_ID_LEN: usize = 64;

/// Firecracker's rule for an instance id: 1 to 64 bytes, each character alphanumeric or '-'.
/// The jailer applies the same rule, since it passes its `--id` on.
pub fn parse_instance_id(id: &str) -> Result<String, String> {
    const RULE: &str = "an id is 1 to 64 characters, each a letter, a digit or '-'";
    if id.is_empty() || id.len() > MAX_INSTANCE_ID_LEN {
        return Err(format!("{} bytes long; {RULE}", id.len()));
    }
    if let Some((position, bad)) = id
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_alphanumeric() || *c == '-'))
    {
        return Err(format!("{bad:?} at position {position}; {RULE}"));
    }
    Ok(id.to_string())
}

/// Firecracker flags mote knows but cannot honour: refused, naming what is missing, rather
/// than accepted and ignored.
fn refusal(api: &ApiArgs) -> Option<&'static str> {
    if api.enable_pci {
        return Some(
            "--enable-pci: mote has no PCI transport yet; its virtio devices are on \
             virtio-mmio only",
        );
    }
    None
}

impl Cli {
    /// Parses `args` (the program's name first), refusing the flags mote cannot honour with
    /// the same kind of error, and exit status, as any other bad flag.
    pub fn try_parse_checked<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let (mut cli, api_sock_given) = match firecracker_flags::parse(&args) {
            Some(parsed) => parsed,
            None => {
                let matches =
                    <Cli as clap::CommandFactory>::command().try_get_matches_from(&args)?;
                let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
                let defaulted = matches.value_source("api_sock")
                    == Some(clap::parser::ValueSource::DefaultValue);
                (cli, !defaulted)
            }
        };
        let invoked_as = args.first().map(Path::new).and_then(Path::file_name);
        if invoked_as == Some(std::ffi::OsStr::new(FIRECRACKER_NAME)) && !api_sock_given {
            cli.top.api.api_sock = PathBuf::from(FIRECRACKER_API_SOCK);
        }
        let restore = match &cli.command {
            Some(Command::Run(run)) if run.restore.is_some() => run.restore_memory().err(),
            _ => None,
        };
        match restore.or_else(|| refusal(&cli.top.api).map(String::from)) {
            Some(message) => Err(<Cli as clap::CommandFactory>::command()
                .error(clap::error::ErrorKind::ArgumentConflict, message)),
            None => Ok(cli),
        }
    }

    /// [`Cli::try_parse_checked`] on the process's arguments; on failure prints the error and
    /// exits with Firecracker's status for bad arguments (`ArgParsing`, 153), where clap's own
    /// would be 2; `--help` and `--version` print and exit with 0, as clap does.
    pub fn parse_checked() -> Cli {
        Cli::try_parse_checked(std::env::args_os()).unwrap_or_else(|err| {
            if err.use_stderr() {
                let _ = err.print();
                std::process::exit(EXIT_ARG_PARSING.into());
            }
            err.exit()
        })
    }
}

impl Cli {
    /// Which seccomp filters the threads install.
    pub fn seccomp(&self) -> SeccompConfig {
        match (&self.top.seccomp_filter, self.top.no_seccomp) {
            (_, true) => SeccompConfig::Disabled,
            (Some(path), false) => SeccompConfig::Custom(path.clone()),
            (None, false) => SeccompConfig::BuiltIn,
        }
    }
}

/// Firecracker's flags for a monitor driven through its API or a config file.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The Unix socket the REST API listens on (must not exist).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_API_SOCK)]
    pub api_sock: PathBuf,
    /// Boot at once from this JSON configuration (the `GET /vm/config` form).
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// No API socket; needs --config-file.
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    /// Log the time from the monitor's start to the guest's boot-complete signal.
    #[arg(long)]
    pub boot_timer: bool,
    /// Write log lines to this file or named pipe instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// With --log-path: show each line's level.
    #[arg(long)]
    pub show_level: bool,
    /// With --log-path: show each line's source file and line.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Log only lines from this module path (for example `mote::api`), as Firecracker's
    /// `--module`.
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,
    /// Write metrics (JSON lines) to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// The largest request body the API accepts, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = crate::api::http::DEFAULT_MAX_PAYLOAD)]
    pub http_api_max_payload_size: usize,
    /// When the process was started (CLOCK_MONOTONIC, µs), as Firecracker's jailer passes it:
    /// the metrics' `api_server.process_startup_time_us` counts from it.
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,
    /// The process's CPU time (µs) when it was started, as Firecracker's jailer passes it: the
    /// metrics' `api_server.process_startup_time_cpu_us` counts from it.
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,
    /// CPU time (µs) the starting parent (the jailer) spent, added to
    /// `process_startup_time_cpu_us`.
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,
    /// Refused: mote has no PCI transport yet (Firecracker: put devices on PCIe).
    #[arg(long)]
    pub enable_pci: bool,
    /// The largest MMDS data store, in bytes of JSON (default: the API's payload limit, as
    /// Firecracker's).
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,
}

impl ApiArgs {
    /// What the starter said about the process's start, for the startup metrics.
    pub fn startup_times(&self) -> crate::api::StartupTimes {
        crate::api::StartupTimes {
            start_time_us: self.start_time_us,
            start_time_cpu_us: self.start_time_cpu_us,
            parent_cpu_time_us: self.parent_cpu_time_us,
        }
    }
}

/// Where the API listens when no --api-sock is given (Firecracker: /run/firecracker.socket).
pub const DEFAULT_API_SOCK: &str = "/run/mote.socket";
/// The name a drop-in for Firecracker is run under: a jailer copies the binary into the jail
/// under its file name, and tools built for Firecracker run `firecracker` and look for its
/// socket at its default path.
const FIRECRACKER_NAME: &str = "firecracker";
/// Firecracker's default API socket, mote's default when it runs as `firecracker`.
pub const FIRECRACKER_API_SOCK: &str = "/run/firecracker.socket";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest with its serial console on this terminal.
    Run(Box<RunArgs>),
    /// Look into snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Manage the local store of container images (`mote run --image`).
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import an OCI image layout directory, or an OCI or `docker save` tar archive, into the
    /// store (built once: an image already there is only named).
    Import {
        /// The layout directory or archive.
        #[arg(value_name = "PATH")]
        path: PathBuf,
        /// The name to give it (default: the name in the image, else the file's name).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Import the image for another host's architecture, `linux/amd64` or `linux/arm64`
        /// (default: this host's), to fill a store that host will use; this host refuses to
        /// run it.
        #[arg(
            long,
            value_name = "OS/ARCH",
            value_parser = crate::image::Platform::parse
        )]
        platform: Option<crate::image::Platform>,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List the stored images.
    Ls {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Remove stored images, each named by a name or an id (or a prefix of one).
    Rm {
        #[arg(value_name = "REF", required = true)]
        references: Vec<String>,
        #[command(flatten)]
        store: StoreArg,
    },
}

/// Where the image store is.
#[derive(Debug, Args)]
pub struct StoreArg {
    /// The image store's directory (default: $XDG_DATA_HOME/mote, else ~/.local/share/mote).
    #[arg(long, value_name = "PATH")]
    pub store: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Print what a snapshot state file holds: its format version, the machine, its devices
    /// with the host files and TAPs a restore reopens, and its memory file's size.
    Describe {
        /// The state file (any format version this mote reads).
        #[arg(value_name = "STATE_FILE")]
        path: PathBuf,
    },
    /// Lay a Diff snapshot's memory file over the memory file of the snapshot before it
    /// (Firecracker's rebase-snap), so that the Diff's state file loads with the result. The
    /// result replaces the base (or goes to --output) once whole: the base is never left
    /// half-written, and VMs restored from it keep the memory they map.
    Rebase {
        /// The memory file of the snapshot the diff was taken after (Full, or rebased).
        #[arg(long = "base-file", visible_alias = "base", value_name = "BASE_MEM")]
        base: PathBuf,
        /// The Diff snapshot's memory file.
        #[arg(long = "diff-file", visible_alias = "diff", value_name = "DIFF_MEM")]
        diff: PathBuf,
        /// Where the result goes (the base file itself by default).
        #[arg(long, value_name = "PATH")]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest kernel: an ELF vmlinux (PVH entry when it has one) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "restore")]
    pub kernel: Option<PathBuf>,
    /// Restore this snapshot state file (its memory from --mem-file, or --uffd-sock) and run
    /// it, instead of booting.
    #[arg(
        long,
        value_name = "SNAPSHOT",
        requires = "restore_memory",
        conflicts_with = "kernel"
    )]
    pub restore: Option<PathBuf>,
    /// With --restore: where guest memory comes from (the API's mem_backend): the memory
    /// file mapped (file), served on demand by mote (lazy), or by a page-fault handler (uffd,
    /// with --uffd-sock).
    /// `file` when not given.
    #[arg(long, value_name = "BACKEND", value_enum, requires = "restore")]
    pub mem_backend: Option<MemBackendArg>,
    /// The snapshot's memory file, for --restore with --mem-backend file or lazy.
    #[arg(
        long,
        value_name = "PATH",
        requires = "restore",
        group = "restore_memory"
    )]
    pub mem_file: Option<PathBuf>,
    /// The Unix socket a page-fault handler listens on, for --restore with --mem-backend uffd.
    #[arg(
        long,
        value_name = "PATH",
        requires = "restore",
        group = "restore_memory"
    )]
    pub uffd_sock: Option<PathBuf>,
    /// With --restore: also serve the API for the restored guest on this Unix socket.
    #[arg(long, value_name = "PATH", requires = "restore")]
    pub api_sock: Option<PathBuf>,
    /// With --restore: the restored interface IFACE_ID uses the host TAP named TAP instead of
    /// the one it had, and the MAC given (the API's `network_overrides`). Once per interface.
    #[arg(
        long = "net-override",
        value_name = "IFACE_ID=TAP[,guest_mac=MAC]",
        requires = "restore",
        value_parser = parse_net_override
    )]
    pub net_overrides: Vec<NetworkOverride>,
    /// With --restore: the restored vsock device's host socket (the API's `vsock_override`);
    /// a clone of a snapshot cannot share its original's.
    #[arg(long, value_name = "PATH", requires = "restore")]
    pub vsock_override: Option<PathBuf>,
    /// With --restore: the guest's clock advances by the real time since the snapshot (the
    /// API's `clock_realtime`; x86_64).
    #[arg(long, requires = "restore")]
    pub clock_realtime: bool,
    /// Initial RAM disk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// The whole kernel command line, instead of the defaults.
    #[arg(
        long,
        value_name = "ARGS",
        conflicts_with = "append",
        allow_hyphen_values = true
    )]
    pub cmdline: Option<String>,
    /// Arguments added after the default kernel command line (may repeat).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub append: Vec<String>,
    /// Number of vCPUs (1 to 32).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u64,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    pub memory: u64,
    /// Log the time from the monitor's start to the guest's boot-complete signal.
    #[arg(long)]
    pub boot_timer: bool,
    /// Root file system image: the first drive (/dev/vda), mounted as root.
    /// `PATH[,ro][,engine=sync|async]`.
    #[arg(long, value_name = "PATH[,ro][,engine=sync|async]", value_parser = parse_rootfs)]
    pub rootfs: Option<DriveSpec>,
    /// Another drive (vdb, vdc, … in order). `PATH[,ro][,id=ID][,engine=sync|async]`; may
    /// repeat. `engine=async` serves the drive through an io_uring (Firecracker's Async).
    #[arg(long = "drive", value_name = "PATH[,ro][,id=ID][,engine=sync|async]", value_parser = parse_drive)]
    pub drives: Vec<DriveSpec>,
    /// A network interface (eth0, eth1, … in order) on an existing TAP device.
    /// `tap=NAME[,mac=MAC][,mtu=N]`; may repeat.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC][,mtu=N]", value_parser = parse_net)]
    pub nets: Vec<NetSpec>,
    /// A vsock device: the guest's CID (3 or more) and the host Unix socket (which must not
    /// exist) where host processes connect. `cid=N,uds=PATH`.
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,
    /// An entropy device (virtio-rng, /dev/hwrng in the guest) fed from the host's getrandom.
    #[arg(long)]
    pub entropy: bool,
    /// Run a container image with mote's own init: an OCI image layout directory, an OCI or
    /// `docker save` tar archive (imported into the store first, at once when it is there),
    /// or a name or id in the image store. Arguments after it replace the image's command.
    #[arg(
        long,
        value_name = "REF",
        conflicts_with_all = ["restore", "rootfs", "initrd", "cmdline"]
    )]
    pub image: Option<String>,
    /// The image store's directory (default: $XDG_DATA_HOME/mote, else ~/.local/share/mote).
    #[arg(long, value_name = "PATH", requires = "image")]
    pub store: Option<PathBuf>,
    /// With --image: an environment variable for the program, `NAME=VALUE` (or `NAME`: this
    /// process's value); may repeat.
    #[arg(
        long = "env",
        short = 'e',
        value_name = "NAME=VALUE",
        requires = "image"
    )]
    pub env: Vec<String>,
    /// With --image: the program's working directory, instead of the image's.
    #[arg(long, value_name = "DIR", requires = "image")]
    pub workdir: Option<String>,
    /// With --image: the user the program runs as, `user[:group]` (names or numbers).
    #[arg(long, value_name = "USER[:GROUP]", requires = "image")]
    pub user: Option<String>,
    /// With --image: the program to run instead of the image's entrypoint (the image's
    /// command is dropped too; arguments after the image follow it).
    #[arg(long, value_name = "PROGRAM", requires = "image")]
    pub entrypoint: Option<String>,
    /// With --image: the guest's host name (default: the image id's first 12 digits).
    #[arg(long, value_name = "NAME", requires = "image")]
    pub hostname: Option<String>,
    /// With --image: an ext4 disk image mounted at GUEST_PATH (an extra drive);
    /// `HOST_IMG:GUEST_PATH[:ro]`; may repeat.
    #[arg(
        long = "volume",
        short = 'v',
        value_name = "HOST_IMG:GUEST_PATH[:ro]",
        value_parser = crate::image::run::parse_volume,
        requires = "image"
    )]
    pub volumes: Vec<crate::image::run::VolumeSpec>,
    /// With --image and --net: eth0's address, its prefix length and the gateway,
    /// `ADDRESS/PREFIX[,gw=GATEWAY]` (the kernel's `ip=` is made of it).
    #[arg(long, value_name = "ADDRESS/PREFIX[,gw=GATEWAY]", value_parser = parse_ip, requires = "image")]
    pub ip: Option<IpSpec>,
    /// With --image and --net: a nameserver for the guest's /etc/resolv.conf, instead of the
    /// host's (which it gets otherwise, without loopback ones); may repeat.
    #[arg(long, value_name = "ADDRESS", requires_all = ["image", "nets"])]
    pub dns: Vec<std::net::IpAddr>,
    /// With --image: throw the container's writable root away after the run (the default).
    #[arg(long, requires = "image", conflicts_with = "keep")]
    pub rm: bool,
    /// With --image: keep the container's root file system (an ext4 image) at PATH after the
    /// run, instead of throwing it away; PATH must not exist.
    #[arg(long, value_name = "PATH", requires = "image")]
    pub keep: Option<PathBuf>,
    /// With --image: the command and its arguments, replacing the image's Cmd.
    #[arg(
        value_name = "ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        requires = "image"
    )]
    pub args: Vec<String>,
}

/// `cid=N,uds=PATH`; the values are checked when the VM is built.
fn parse_vsock(spec: &str) -> Result<VsockConfig, String> {
    let mut cid = None;
    let mut uds = None;
    for option in spec.split(',') {
        match option.split_once('=') {
            Some(("cid", n)) => {
                cid = Some(
                    n.parse::<u64>()
                        .map_err(|_| format!("invalid vsock cid {n:?}"))?,
                )
            }
            Some(("uds", path)) if !path.is_empty() => uds = Some(PathBuf::from(path)),
            _ => return Err(format!("unknown vsock option {option:?}")),
        }
    }
    Ok(VsockConfig {
        vsock_id: None,
        guest_cid: cid.ok_or("no guest CID given (cid=N)")?,
        uds_path: uds.ok_or("no socket path given (uds=PATH)")?,
    })
}

/// eth0's address for a container (`--ip`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSpec {
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
}

impl IpSpec {
    /// The kernel's `ip=` argument that configures eth0 before init runs.
    pub fn kernel_arg(&self) -> String {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        let gateway = self.gateway.map(|g| g.to_string()).unwrap_or_default();
        format!(
            "ip={}::{gateway}:{}::eth0:off",
            self.address,
            std::net::Ipv4Addr::from(mask)
        )
    }
}

fn parse_ip(spec: &str) -> Result<IpSpec, String> {
    let (cidr, gateway) = match spec.split_once(",gw=") {
        Some((cidr, gateway)) => (
            cidr,
            Some(
                gateway
                    .parse()
                    .map_err(|_| format!("gateway {gateway:?} is not an IPv4 address"))?,
            ),
        ),
        None => (spec, None),
    };
    let (address, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| format!("{spec:?} is not ADDRESS/PREFIX[,gw=GATEWAY]"))?;
    let address = address
        .parse()
        .map_err(|_| format!("{address:?} is not an IPv4 address"))?;
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| format!("prefix {prefix:?} is not 1 to 32"))?;
    Ok(IpSpec {
        address,
        prefix,
        gateway,
    })
}

/// A network interface as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u16>,
}

fn parse_net(spec: &str) -> Result<NetSpec, String> {
    let mut tap = None;
    let mut mac = None;
    let mut mtu = None;
    for option in spec.split(',') {
        match option.split_once('=') {
            Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
            Some(("mac", text)) => mac = Some(text.parse::<MacAddr>()?),
            Some(("mtu", text)) => {
                mtu = Some(
                    text.parse::<u16>()
                        .map_err(|err| format!("mtu {text:?}: {err}"))?,
                )
            }
            _ => return Err(format!("unknown network option {option:?}")),
        }
    }
    Ok(NetSpec {
        tap: tap.ok_or("no TAP given (tap=NAME)")?,
        mac,
        mtu,
    })
}

/// A drive as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSpec {
    pub path: PathBuf,
    pub read_only: bool,
    pub id: Option<String>,
    /// `engine=sync|async`: Firecracker's io_engine.
    pub io_engine: IoEngine,
}

fn parse_drive_spec(spec: &str, allow_id: bool) -> Result<DriveSpec, String> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("no path given")?;
    let mut drive = DriveSpec {
        path: PathBuf::from(path),
        read_only: false,
        id: None,
        io_engine: IoEngine::Sync,
    };
    for option in parts {
        match option.split_once('=') {
            None if option == "ro" => drive.read_only = true,
            None if option == "rw" => drive.read_only = false,
            Some(("id", id)) if allow_id => drive.id = Some(id.to_string()),
            Some(("engine", "sync")) => drive.io_engine = IoEngine::Sync,
            Some(("engine", "async")) => drive.io_engine = IoEngine::Async,
            _ => return Err(format!("unknown drive option {option:?}")),
        }
    }
    Ok(drive)
}

fn parse_net_override(spec: &str) -> Result<NetworkOverride, String> {
    let (target, mac) = match spec.split_once(",guest_mac=") {
        Some((target, mac)) => (
            target,
            Some(mac.parse().map_err(|err| format!("{spec:?}: {err}"))?),
        ),
        None => (spec, None),
    };
    match target.split_once('=') {
        Some((iface_id, tap)) if !iface_id.is_empty() && !tap.is_empty() => Ok(NetworkOverride {
            iface_id: iface_id.to_string(),
            host_dev_name: tap.to_string(),
            guest_mac: mac,
        }),
        _ => Err(format!(
            "{spec:?} is not IFACE_ID=TAP[,guest_mac=MAC] (the interface's id in the snapshot, \
             the host TAP, and the clone's own MAC if it gets one)"
        )),
    }
}

fn parse_rootfs(spec: &str) -> Result<DriveSpec, String> {
    parse_drive_spec(spec, false)
}

fn parse_drive(spec: &str) -> Result<DriveSpec, String> {
    parse_drive_spec(spec, true)
}

impl RunArgs {
    /// What `--restore` asks for, when it is given: the snapshot, its memory file and the
    /// overrides, resumed at once.
    pub fn restore_params(&self) -> Option<LoadSnapshotParams> {
        let snapshot = self.restore.as_ref()?;
        // Checked when the command line was parsed (Cli::try_parse_checked).
        let mem_backend = self.restore_memory().ok()?;
        Some(LoadSnapshotParams {
            snapshot_path: snapshot.clone(),
            mem_backend: Some(mem_backend),
            mem_file_path: None,
            enable_diff_snapshots: false,
            track_dirty_pages: false,
            resume_vm: true,
            clock_realtime: self.clock_realtime,
            network_overrides: self.net_overrides.clone(),
            vsock_override: self
                .vsock_override
                .clone()
                .map(|uds_path| VsockOverride { uds_path }),
            mmds_data: None,
        })
    }

    /// Where `--restore` takes guest memory from, or why the flags given do not say.
    fn restore_memory(&self) -> Result<crate::config::MemBackend, String> {
        mem_backend::mem_backend(
            self.mem_backend.unwrap_or_default(),
            self.mem_file.as_deref(),
            self.uffd_sock.as_deref(),
        )
    }

    fn boot_args(&self) -> String {
        // A container's console is the program's: the kernel says only what is grave.
        let quiet = self.image.as_ref().map(|_| "quiet loglevel=1".to_string());
        let ip = self.ip.as_ref().map(IpSpec::kernel_arg);
        match &self.cmdline {
            Some(cmdline) => cmdline.clone(),
            None => std::iter::once(DEFAULT_BOOT_ARGS)
                .chain(quiet.as_deref())
                .chain(ip.as_deref())
                .chain(self.append.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// What `--image` asks for, when it is given.
    pub fn image_options(&self) -> Option<crate::image::run::ImageRunOptions> {
        let image = self.image.clone()?;
        Some(crate::image::run::ImageRunOptions {
            store: self.store.clone(),
            image,
            args: self.args.clone(),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            user: self.user.clone(),
            entrypoint: self.entrypoint.clone(),
            hostname: self.hostname.clone(),
            volumes: self.volumes.clone(),
            keep: self.keep.clone(),
            net: !self.nets.is_empty(),
            dns: self.dns.clone(),
        })
    }

    pub fn resources(&self) -> VmResources {
        VmResources {
            boot_source: Some(BootSourceConfig {
                kernel_image_path: self.kernel.clone().unwrap_or_default(),
                initrd_path: self.initrd.clone(),
                boot_args: Some(self.boot_args()),
            }),
            machine_config: MachineConfig {
                vcpu_count: self.vcpus,
                mem_size_mib: self.memory,
                ..Default::default()
            },
            boot_timer: self.boot_timer,
            drives: self.drive_configs(),
            network_interfaces: self.network_interfaces(),
            vsock: self.vsock.clone(),
            entropy: self.entropy.then(EntropyConfig::default),
            ..Default::default()
        }
    }

    fn network_interfaces(&self) -> Vec<NetworkInterfaceConfig> {
        self.nets
            .iter()
            .enumerate()
            .map(|(index, spec)| NetworkInterfaceConfig {
                iface_id: format!("eth{index}"),
                host_dev_name: spec.tap.clone(),
                guest_mac: spec.mac,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
                mtu: spec.mtu,
            })
            .collect()
    }

    fn drive_configs(&self) -> Vec<DriveConfig> {
        let root = self.rootfs.iter().map(|spec| DriveConfig {
            drive_id: "rootfs".to_string(),
            path_on_host: spec.path.clone(),
            is_root_device: true,
            is_read_only: spec.read_only,
            partuuid: None,
            cache_type: Default::default(),
            io_engine: spec.io_engine,
            rate_limiter: None,
        });
        let others = self
            .drives
            .iter()
            .enumerate()
            .map(|(index, spec)| DriveConfig {
                drive_id: spec
                    .id
                    .clone()
                    .unwrap_or_else(|| format!("drive{}", index + 1)),
                path_on_host: spec.path.clone(),
                is_root_device: false,
                is_read_only: spec.read_only,
                partuuid: None,
                cache_type: Default::default(),
                io_engine: spec.io_engine,
                rate_limiter: None,
            });
        root.chain(others).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mote").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).unwrap().command {
            Some(Command::Run(run)) => *run,
            other => panic!("not a run command: {other:?}"),
        }
    }

    #[test]
    fn snapshot_describe_takes_one_state_file() {
        match parse(&["snapshot", "describe", "/s"]).unwrap().command {
            Some(Command::Snapshot(SnapshotCommand::Describe { path })) => {
                assert_eq!(path, PathBuf::from("/s"))
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["snapshot", "describe"]).is_err());
        for flags in [["--base-file", "--diff-file"], ["--base", "--diff"]] {
            let args = ["snapshot", "rebase", flags[0], "/b", flags[1], "/d"];
            match parse(&args).unwrap().command {
                Some(Command::Snapshot(SnapshotCommand::Rebase { base, diff, output })) => {
                    assert_eq!((base, diff, output), ("/b".into(), "/d".into(), None));
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(parse(&["snapshot", "rebase", "--base-file", "/b"]).is_err());
    }

    #[test]
    fn restore_takes_overrides_for_interfaces_and_the_vsock_socket() {
        let run = run_args(&[
            "run",
            "--restore",
            "state",
            "--mem-file",
            "mem",
            "--net-override",
            "eth0=tap1",
            "--net-override",
            "eth1=tap2,guest_mac=06:00:ac:10:00:09",
            "--vsock-override",
            "/v.sock",
        ]);
        let params = run.restore_params().unwrap();
        assert_eq!(params.snapshot_path, PathBuf::from("state"));
        let memory = params.mem_backend.as_ref().unwrap();
        assert_eq!(
            (memory.backend_type, memory.backend_path.as_path()),
            (crate::config::MemBackendType::File, Path::new("mem"))
        );
        assert!(params.resume_vm);
        let overrides: Vec<_> = params
            .network_overrides
            .iter()
            .map(|o| (o.iface_id.as_str(), o.host_dev_name.as_str()))
            .collect();
        assert_eq!(overrides, [("eth0", "tap1"), ("eth1", "tap2")]);
        let macs: Vec<_> = params
            .network_overrides
            .iter()
            .map(|o| o.guest_mac)
            .collect();
        assert_eq!(macs, [None, Some(MacAddr([6, 0, 0xac, 0x10, 0, 9]))]);
        assert_eq!(
            params.vsock_override,
            Some(VsockOverride {
                uds_path: "/v.sock".into()
            })
        );
        assert!(run_args(&["run", "--kernel", "k"])
            .restore_params()
            .is_none());
    }

    #[test]
    fn bad_overrides_are_refused() {
        let err = parse(&[
            "run",
            "--restore",
            "s",
            "--mem-file",
            "m",
            "--net-override",
            "eth0",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains(r#""eth0" is not IFACE_ID=TAP"#), "{err}");
        let err = parse(&[
            "run",
            "--restore",
            "s",
            "--mem-file",
            "m",
            "--net-override",
            "eth0=tap1,guest_mac=06:00",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("06:00"), "{err}");
        for args in [
            &["run", "--kernel", "k", "--net-override", "eth0=tap1"][..],
            &["run", "--kernel", "k", "--vsock-override", "/v.sock"][..],
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains("--restore"), "{args:?}: {err}");
        }
    }

    #[test]
    fn append_adds_to_the_defaults() {
        let run = run_args(&["run", "--kernel", "k", "--append", "a=1", "--append", "b"]);
        assert_eq!(run.boot_args(), format!("{DEFAULT_BOOT_ARGS} a=1 b"));
    }

    #[test]
    fn cmdline_replaces_the_defaults() {
        let run = run_args(&["run", "--kernel", "k", "--cmdline", "console=ttyS0"]);
        assert_eq!(run.boot_args(), "console=ttyS0");
    }

    #[test]
    fn cmdline_and_append_conflict() {
        assert!(parse(&["run", "--kernel", "k", "--cmdline", "a", "--append", "b"]).is_err());
    }

    #[test]
    fn rootfs_comes_first_and_drives_follow_in_order() {
        let run = run_args(&[
            "run",
            "--kernel",
            "k",
            "--drive",
            "/b,ro",
            "--rootfs",
            "/r",
            "--drive",
            "/c,id=data",
        ]);
        let drives = run.resources().drives;
        let ids: Vec<&str> = drives.iter().map(|d| d.drive_id.as_str()).collect();
        assert_eq!(ids, ["rootfs", "drive1", "data"]);
        assert!(drives[0].is_root_device && !drives[0].is_read_only);
        assert!(drives[1].is_read_only);
    }

    #[test]
    fn drive_options_are_checked() {
        assert!(parse(&["run", "--kernel", "k", "--drive", "/b,fast"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--rootfs", "/r,id=x"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--drive", ",ro"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--drive", "/b,engine=Async"]).is_err());
        assert_eq!(
            parse_drive("/b,ro,id=x"),
            Ok(DriveSpec {
                path: "/b".into(),
                read_only: true,
                id: Some("x".into()),
                io_engine: IoEngine::Sync,
            })
        );
        assert_eq!(
            parse_rootfs("/r,engine=async").map(|drive| drive.io_engine),
            Ok(IoEngine::Async)
        );
    }

    #[test]
    fn nets_become_eth0_eth1_in_order() {
        let run = run_args(&[
            "run",
            "--kernel",
            "k",
            "--net",
            "tap=tap0,mac=06:00:00:00:00:02",
            "--net",
            "tap=tap1",
        ]);
        let ifaces = run.resources().network_interfaces;
        assert_eq!(ifaces.len(), 2);
        assert_eq!(
            (
                ifaces[0].iface_id.as_str(),
                ifaces[0].host_dev_name.as_str()
            ),
            ("eth0", "tap0")
        );
        assert_eq!(ifaces[0].guest_mac.unwrap().0, [6, 0, 0, 0, 0, 2]);
        assert_eq!(
            (ifaces[1].iface_id.as_str(), ifaces[1].guest_mac),
            ("eth1", None)
        );
        assert!(parse(&["run", "--kernel", "k", "--net", "mac=06:00:00:00:00:02"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--net", "tap=t,mac=06:00"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--net", "tap=t,fast"]).is_err());
    }

    #[test]
    fn firecrackers_flags_parse_without_a_command() {
        let cli = parse(&[
            "--api-sock",
            "/tmp/a.sock",
            "--id",
            "vm1",
            "--level",
            "Debug",
            "--boot-timer",
            "--metrics-path",
            "/tmp/m",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.top.api.api_sock, PathBuf::from("/tmp/a.sock"));
        assert_eq!(cli.top.id, "vm1");
        assert!(cli.top.api.boot_timer);
        assert!(
            parse(&["--no-api"]).is_err(),
            "--no-api needs --config-file"
        );
        assert!(parse(&["--no-api", "--config-file", "/c.json"]).is_ok());
    }

    fn refusal_of(args: &[&str]) -> String {
        let args = std::iter::once("mote").chain(args.iter().copied());
        let err = Cli::try_parse_checked(args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "as any other bad flag");
        err.to_string()
    }

    #[test]
    fn run_as_firecracker_the_default_socket_is_firecrackers() {
        let socket = |args: &[&str]| parse(args).unwrap().top.api.api_sock;
        assert_eq!(socket(&[]), PathBuf::from(DEFAULT_API_SOCK));
        let as_firecracker = |rest: &[&str]| {
            let args = [&["/srv/jail/firecracker/x/root/firecracker"], rest].concat();
            Cli::try_parse_checked(args).unwrap().top.api.api_sock
        };
        assert_eq!(as_firecracker(&[]), PathBuf::from(FIRECRACKER_API_SOCK));
        // A socket given is the socket, whatever the name.
        assert_eq!(
            as_firecracker(&["--api-sock", "/tmp/a.sock"]),
            PathBuf::from("/tmp/a.sock")
        );
    }

    #[test]
    fn restore_memory_flags_for_another_backend_are_refused_as_bad_flags() {
        let err = refusal_of(&[
            "run",
            "--restore",
            "s",
            "--mem-backend",
            "uffd",
            "--mem-file",
            "m",
        ]);
        assert!(
            err.contains("--mem-backend uffd takes no --mem-file"),
            "{err}"
        );
        // Neither path: clap names both.
        let err = parse(&["run", "--restore", "s"]).unwrap_err().to_string();
        assert!(
            err.contains("<--mem-file <PATH>|--uffd-sock <PATH>>"),
            "{err}"
        );
        let run = run_args(&[
            "run",
            "--restore",
            "s",
            "--mem-backend",
            "lazy",
            "--mem-file",
            "m",
        ]);
        let memory = run.restore_params().unwrap().mem_backend.unwrap();
        assert_eq!(memory.backend_type, crate::config::MemBackendType::Lazy);
        assert!(parse(&["run", "--kernel", "k", "--mem-backend", "lazy"]).is_err());
    }

    #[test]
    fn enable_pci_is_refused_naming_the_missing_transport() {
        let err = refusal_of(&["--api-sock", "/a", "--enable-pci"]);
        assert!(
            err.contains("--enable-pci: mote has no PCI transport yet"),
            "{err}"
        );
        assert!(Cli::try_parse_checked(["mote", "--api-sock", "/a"]).is_ok());
    }

    #[test]
    fn mmds_size_limit_is_taken_as_a_byte_count() {
        assert_eq!(
            parse(&["--mmds-size-limit", "51200"])
                .unwrap()
                .top
                .api
                .mmds_size_limit,
            Some(51200)
        );
        assert!(parse(&["--mmds-size-limit", "lots"]).is_err());
    }

    #[test]
    fn ids_follow_firecrackers_rule() {
        let longest = "a".repeat(MAX_INSTANCE_ID_LEN);
        for good in ["a", "vm-1", "Ünïcode-2", longest.as_str()] {
            assert_eq!(parse(&["--id", good]).unwrap().top.id, good);
        }
        let too_long = "a".repeat(MAX_INSTANCE_ID_LEN + 1);
        for (bad, why) in [
            ("", "0 bytes long"),
            (too_long.as_str(), "65 bytes long"),
            ("vm_1", "'_' at position 2"),
            ("a/b", "'/' at position 1"),
            ("a b", "' ' at position 1"),
        ] {
            let err = parse(&["--id", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            let err = err.to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.contains("1 to 64 characters"), "{bad:?}: {err}");
        }
        // The rule holds for `mote run` too.
        assert!(parse(&["run", "--kernel", "k", "--id", "a:b"]).is_err());
        assert_eq!(parse(&[]).unwrap().top.id, "anonymous-instance");
    }

    #[test]
    fn the_jailers_start_times_are_taken() {
        let cli = parse(&[
            "--start-time-us",
            "10",
            "--start-time-cpu-us",
            "20",
            "--parent-cpu-time-us",
            "30",
        ])
        .unwrap();
        assert_eq!(
            cli.top.api.startup_times(),
            crate::api::StartupTimes {
                start_time_us: Some(10),
                start_time_cpu_us: Some(20),
                parent_cpu_time_us: Some(30),
            }
        );
        assert_eq!(
            parse(&[]).unwrap().top.api.startup_times(),
            Default::default()
        );
        assert!(parse(&["--start-time-us", "-1"]).is_err());
    }

    /// Every command line the hand parser takes, it takes as clap does; the ones it leaves
    /// (commands, help, the version, errors) go to clap.
    #[test]
    fn firecrackers_flags_alone_parse_by_hand_as_clap_parses_them() {
        let argv = |args: &[&str]| -> Vec<std::ffi::OsString> {
            std::iter::once("mote")
                .chain(args.iter().copied())
                .map(Into::into)
                .collect()
        };
        let by_hand = |args: &[&str]| firecracker_flags::parse(&argv(args));
        let taken: &[&[&str]] = &[
            &[
                "--api-sock",
                "/a",
                "--id",
                "vm1",
                "--level",
                "Debug",
                "--boot-timer",
            ],
            &[],
            &["--no-api", "--config-file", "/c.json"],
            &[
                "--seccomp-filter",
                "/f",
                "--metrics-path",
                "/m",
                "--show-level",
            ],
            &["--describe-snapshot", "/s"],
            &["--snapshot-version"],
            &["--no-seccomp", "--show-log-origin", "--module", "mote::api"],
            &["--level=warning", "--id=a-b-c", "--api-sock=/run/x.sock"],
            &[
                "--http-api-max-payload-size",
                "65536",
                "--mmds-size-limit",
                "1024",
            ],
            // The jailer's.
            &[
                "--id",
                "jailed",
                "--start-time-us",
                "123456789",
                "--start-time-cpu-us",
                "42",
                "--parent-cpu-time-us",
                "7",
                "--api-sock",
                "/run/firecracker.socket",
            ],
            &["--log-path", "/l", "--level", "Off", "--enable-pci"],
        ];
        for args in taken {
            let (fast, api_sock_given) = by_hand(args).unwrap_or_else(|| panic!("{args:?}"));
            let full = parse(args).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{full:?}"), "{args:?}");
            assert_eq!(
                api_sock_given,
                args.iter().any(|a| a.starts_with("--api-sock"))
            );
        }
        // Left to clap: commands, help, the version, and what clap refuses or reads its own
        // way (its error names the problem, with the usage).
        let left: &[&[&str]] = &[
            &["run", "--kernel", "/k"],
            &["--level", "Debug", "image", "ls"],
            &["--help"],
            &["-h"],
            &["-V"],
            &["--version"],
            &["--no-such-flag"],
            &["--no-api"],
            &["--no-seccomp", "--seccomp-filter", "/f"],
            &["--snapshot-version", "--describe-snapshot", "/s"],
            &["--id", "a", "--id", "b"],
            &["--boot-timer", "--boot-timer"],
            &["--boot-timer=true"],
            &["--api-sock"],
            &["--api-sock", ""],
            &["--api-sock", "--boot-timer"],
            &["--level", "loud"],
            &["--id", "bad id"],
            &["--start-time-us", "-1"],
            &["--start-time-us", "+1"],
            &["--start-time-us", "99999999999999999999999"],
            &["--mmds-size-limit", "1k"],
            &["--", "--api-sock", "/a"],
            &["stray"],
        ];
        for args in left {
            assert!(by_hand(args).is_none(), "{args:?}");
        }
        // Whatever clap makes of those, the checked parse does too.
        for args in taken.iter().chain(left) {
            let checked = Cli::try_parse_checked(argv(args)).map(|cli| format!("{cli:?}"));
            let full = parse(args).map(|cli| format!("{cli:?}"));
            match (&checked, &full) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{args:?}"),
                (Err(_), Err(_)) => {}
                // The one flag clap takes and mote refuses.
                (Err(err), Ok(_)) => assert!(err.to_string().contains("--enable-pci"), "{err}"),
                (Ok(_), Err(err)) => panic!("{args:?}: clap says {err}"),
            }
        }
    }

    #[test]
    fn snapshot_questions_parse() {
        let cli = parse(&["--describe-snapshot", "/s"]).unwrap();
        assert_eq!(cli.top.describe_snapshot, Some(PathBuf::from("/s")));
        assert!(parse(&["--snapshot-version"]).unwrap().top.snapshot_version);
    }

    #[test]
    fn seccomp_flags_work_before_and_after_run() {
        let cli = parse(&["run", "--kernel", "k", "--no-seccomp"]).unwrap();
        assert_eq!(cli.seccomp(), SeccompConfig::Disabled);
        let cli = parse(&["--seccomp-filter", "/f.json", "run", "--kernel", "k"]).unwrap();
        assert_eq!(cli.seccomp(), SeccompConfig::Custom("/f.json".into()));
        let cli = parse(&["--api-sock", "/a", "--seccomp-filter", "/f.json"]).unwrap();
        assert_eq!(cli.seccomp(), SeccompConfig::Custom("/f.json".into()));
        assert_eq!(
            parse(&["--api-sock", "/a"]).unwrap().seccomp(),
            SeccompConfig::BuiltIn
        );
        assert!(parse(&["--no-seccomp", "--seccomp-filter", "/f.json"]).is_err());
    }

    #[test]
    fn defaults_are_one_vcpu_and_128_mib() {
        let resources = run_args(&["run", "--kernel", "k"]).resources();
        assert_eq!(resources.machine_config, MachineConfig::default());
        assert!(!resources.boot_timer);
    }

    #[test]
    fn vsock_takes_a_cid_and_a_socket_path() {
        let vsock = run_args(&["run", "--kernel", "k", "--vsock", "cid=3,uds=/tmp/v.sock"])
            .resources()
            .vsock
            .unwrap();
        assert_eq!((vsock.guest_cid, vsock.uds_path), (3, "/tmp/v.sock".into()));
        assert!(parse(&["run", "--kernel", "k", "--vsock", "cid=3"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--vsock", "uds=/v"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--vsock", "cid=x,uds=/v"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--vsock", "cid=3,uds=/v,port=1"]).is_err());
    }

    #[test]
    fn image_takes_its_command_after_it_and_container_flags() {
        let run = run_args(&[
            "run",
            "--kernel",
            "k",
            "--image",
            "busybox",
            "-e",
            "A=1",
            "--workdir",
            "/w",
            "--user",
            "1:2",
            "--volume",
            "/v.ext4:/data:ro",
            "--",
            "echo",
            "-n",
            "hi",
        ]);
        let options = run.image_options().unwrap();
        assert_eq!(options.image, "busybox");
        assert_eq!(options.args, ["echo", "-n", "hi"]);
        assert_eq!(options.env, ["A=1"]);
        assert_eq!(options.volumes[0].guest, "/data");
        assert!(options.volumes[0].read_only);
        assert!(run.boot_args().contains(" quiet"));
        let run = run_args(&["run", "--kernel", "k", "--image", "b", "sh", "-c", "exit 3"]);
        assert_eq!(run.image_options().unwrap().args, ["sh", "-c", "exit 3"]);
        assert!(run_args(&["run", "--kernel", "k"])
            .image_options()
            .is_none());
        let options = run_args(&[
            "run",
            "--kernel",
            "k",
            "--image",
            "b",
            "--net",
            "tap=t0",
            "--dns",
            "192.0.2.53",
            "--dns",
            "2001:db8::53",
        ])
        .image_options()
        .unwrap();
        assert!(options.net);
        assert_eq!(
            options.dns,
            [
                "192.0.2.53".parse::<std::net::IpAddr>().unwrap(),
                "2001:db8::53".parse().unwrap()
            ]
        );
        assert!(!run.image_options().unwrap().net);
    }

    #[test]
    fn container_flags_need_an_image() {
        assert!(parse(&["run", "--kernel", "k", "--env", "A=1"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--keep", "/k"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--ip", "10.0.0.2/24"]).is_err());
        // --dns is for a container's network.
        assert!(parse(&["run", "--kernel", "k", "--dns", "192.0.2.53"]).is_err());
        assert!(parse(&[
            "run",
            "--kernel",
            "k",
            "--image",
            "b",
            "--dns",
            "192.0.2.53"
        ])
        .is_err());
        assert!(parse(&["run", "--kernel", "k", "--image", "b", "--dns", "x.y"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--image", "b", "--rootfs", "/r"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--image", "b", "--rm", "--keep", "/k"]).is_err());
    }

    #[test]
    fn ip_becomes_the_kernels_ip_argument() {
        let run = run_args(&[
            "run",
            "--kernel",
            "k",
            "--image",
            "b",
            "--net",
            "tap=t",
            "--ip",
            "172.31.0.2/24,gw=172.31.0.1",
        ]);
        assert!(
            run.boot_args()
                .contains(" ip=172.31.0.2::172.31.0.1:255.255.255.0::eth0:off"),
            "{}",
            run.boot_args()
        );
        let plain = parse_ip("10.1.2.3/8").unwrap();
        assert_eq!(plain.kernel_arg(), "ip=10.1.2.3:::255.0.0.0::eth0:off");
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "10.0.0.1/0",
            "x/24",
            "10.0.0.1/24,gw=y",
        ] {
            assert!(parse_ip(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_commands_parse() {
        match parse(&["image", "import", "/x.tar", "--name", "n", "--store", "/s"])
            .unwrap()
            .command
        {
            Some(Command::Image(ImageCommand::Import {
                path,
                name,
                store,
                platform,
            })) => {
                assert_eq!(path, PathBuf::from("/x.tar"));
                assert_eq!(name.as_deref(), Some("n"));
                assert_eq!(store.store, Some(PathBuf::from("/s")));
                assert_eq!(platform, None);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["image", "import", "/x", "--platform", "linux/arm64"])
            .unwrap()
            .command
        {
            Some(Command::Image(ImageCommand::Import { platform, .. })) => {
                assert_eq!(platform.map(|p| p.arch), Some("arm64"));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["image", "import", "/x", "--platform", "linux/s390x"]).is_err());
        assert!(parse(&["image", "ls"]).is_ok());
        assert!(parse(&["image", "rm"]).is_err(), "rm needs a reference");
    }

    #[test]
    fn entropy_adds_the_device() {
        let with = run_args(&["run", "--kernel", "k", "--entropy"]).resources();
        assert_eq!(with.entropy, Some(EntropyConfig::default()));
        let without = run_args(&["run", "--kernel", "k"]).resources();
        assert_eq!(without.entropy, None);
    }
}
