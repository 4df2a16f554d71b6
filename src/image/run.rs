//! `mote run --image`: the files one container run needs (its root's writable copy, the
//! control drive, the initramfs with mote-init), the VM resources that use them, and the
//! program's exit status read back at the end.

use std::io::Read;
use std::path::{Path, PathBuf};

use log::info;

use super::init_config::{self, InitConfig, Volume, EXIT_PREFIX, SECTOR};
use super::store::{Store, StoredImage};
use super::{cpio, ImageError};
use crate::config::{DriveConfig, VmResources};

/// Docker's PATH for an image whose environment has none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// What the program's exit status is when it could not be started (the shell's and Docker's
/// "command not found").
pub const EXIT_NOT_FOUND: u8 = 127;
/// The environment variable that names mote-init, where it is not beside mote.
const INIT_ENV: &str = "MOTE_INIT";
const INIT_NAME: &str = "mote-init";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    #[error("image {image} has no entrypoint and no command, and none was given: put the command after the image")]
    NoCommand { image: String },
    #[error("cannot find mote-init (the guest's init) at {path}: {source}; build it with mote (tools/build) or name it in MOTE_INIT")]
    NoInit {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is dynamically linked, but the guest has no C library for it: use the static build of mote-init (tools/build)")]
    DynamicInit { path: PathBuf },
    #[error("cannot copy the image's root file system for this run: {0}")]
    Copy(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--keep {path}: it exists already")]
    KeepExists { path: PathBuf },
    #[error("--volume {spec}: {reason}")]
    Volume { spec: String, reason: &'static str },
    #[error("image {image} is for {image_arch}, this host runs {host_arch} guests (it was imported with --platform)")]
    WrongArch {
        image: String,
        image_arch: String,
        host_arch: &'static str,
    },
}

/// A volume as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

/// `HOST_IMG:GUEST_PATH[:ro]`.
pub fn parse_volume(spec: &str) -> Result<VolumeSpec, String> {
    let (rest, read_only) = match spec.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (spec.strip_suffix(":rw").unwrap_or(spec), false),
    };
    let (host, guest) = rest
        .split_once(':')
        .ok_or_else(|| format!("{spec:?} is not HOST_IMG:GUEST_PATH[:ro]"))?;
    if host.is_empty() {
        return Err(format!("{spec:?}: no host image"));
    }
    if !guest.starts_with('/') || guest == "/" || guest.split('/').any(|c| c == "..") {
        return Err(format!(
            "{spec:?}: the guest path must be absolute, not / and without `..`"
        ));
    }
    Ok(VolumeSpec {
        host: PathBuf::from(host),
        guest: guest.to_string(),
        read_only,
    })
}

/// What the person asked of the container, over what the image says.
#[derive(Debug, Clone, Default)]
pub struct ImageRunOptions {
    pub store: Option<PathBuf>,
    /// A path to import, or a name or id in the store.
    pub image: String,
    /// Replace the image's Cmd (or follow --entrypoint).
    pub args: Vec<String>,
    /// `NAME=VALUE`, or `NAME` for this process's value.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Option<String>,
    pub hostname: Option<String>,
    pub volumes: Vec<VolumeSpec>,
    pub keep: Option<PathBuf>,
    /// Whether the VM has a network interface: then the guest gets a resolv.conf.
    pub net: bool,
    /// `--dns`: the nameservers instead of the host's.
    pub dns: Vec<std::net::IpAddr>,
}

/// The image a reference means: a path is imported (at once when the store has it already),
/// anything else is looked up in the store. An image for another architecture is refused.
pub fn resolve_image(store: &Store, reference: &str) -> Result<StoredImage, RunError> {
    let image = find_or_import(store, reference)?;
    match &image.architecture {
        Some(arch) if arch != crate::arch::OCI_ARCH => Err(RunError::WrongArch {
            image: reference.to_string(),
            image_arch: arch.clone(),
            host_arch: crate::arch::OCI_ARCH,
        }),
        _ => Ok(image),
    }
}

fn find_or_import(store: &Store, reference: &str) -> Result<StoredImage, RunError> {
    let path = Path::new(reference);
    if path.exists() {
        let started = std::time::Instant::now();
        let (image, cached) = store.import(path, None, super::Platform::HOST)?;
        info!(
            "image {} ({}) {} in {} ms",
            image.id.short(),
            image.names.join(", "),
            if cached {
                "was in the store"
            } else {
                "imported"
            },
            started.elapsed().as_millis()
        );
        return Ok(image);
    }
    Ok(store.find(reference)?)
}

/// The container's configuration: the image's, overridden as Docker overrides it.
pub fn init_config(image: &StoredImage, options: &ImageRunOptions) -> Result<InitConfig, RunError> {
    let config = &image.config;
    // --entrypoint replaces the image's and drops its Cmd; arguments replace the Cmd.
    let (entrypoint, default_cmd) = match &options.entrypoint {
        Some(entrypoint) => (vec![entrypoint.clone()], Vec::new()),
        None => (
            config.entrypoint.clone().unwrap_or_default(),
            config.cmd.clone().unwrap_or_default(),
        ),
    };
    let cmd = if options.args.is_empty() {
        default_cmd
    } else {
        options.args.clone()
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(RunError::NoCommand {
            image: image
                .names
                .first()
                .cloned()
                .unwrap_or_else(|| image.id.short().to_string()),
        });
    }
    let mut env = config.env.clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    for given in &options.env {
        let entry = match given.split_once('=') {
            Some(_) => given.clone(),
            None => match std::env::var(given) {
                Ok(value) => format!("{given}={value}"),
                Err(_) => continue,
            },
        };
        let key = entry.split('=').next().unwrap_or_default().to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(entry);
    }
    Ok(InitConfig {
        args,
        env,
        workdir: options
            .workdir
            .clone()
            .or_else(|| config.working_dir.clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".to_string()),
        user: options
            .user
            .clone()
            .or_else(|| config.user.clone())
            .unwrap_or_default(),
        hostname: options
            .hostname
            .clone()
            .unwrap_or_else(|| image.id.short().to_string()),
        volumes: options
            .volumes
            .iter()
            .enumerate()
            .map(|(index, volume)| Volume {
                // After the root (vda) and the control drive (vdb).
                device: init_config::drive_device(index + 2),
                path: volume.guest.clone(),
                read_only: volume.read_only,
            })
            .collect(),
        // Docker's way: a container with a network resolves names as its host does.
        resolv_conf: options.net.then(|| {
            super::resolv::container_resolv_conf(
                super::resolv::host_resolv_conf().as_deref(),
                &options.dns,
            )
        }),
    })
}

/// The files of one run, removed when it ends (but the root's copy when it was made at
/// --keep's path). Files, not a directory: by then the main thread's seccomp filter allows
/// `unlink` and `open` for reading, but not listing or removing a directory.
pub struct PreparedRun {
    files: Vec<PathBuf>,
    control: PathBuf,
}

/// Where mote-init is: `MOTE_INIT`, else beside this program.
fn init_path() -> PathBuf {
    if let Some(path) = std::env::var_os(INIT_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(INIT_NAME)))
        .unwrap_or_else(|| PathBuf::from(INIT_NAME))
}

/// True when an ELF names a program interpreter (is dynamically linked).
fn is_dynamic_elf(elf: &[u8]) -> bool {
    let word = |at: usize, len: usize| -> Option<u64> {
        let bytes = elf.get(at..at + len)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0, |acc, b| (acc << 8) | u64::from(*b)),
        )
    };
    const PT_INTERP: u64 = 3;
    let (Some(phoff), Some(phentsize), Some(phnum)) = (word(0x20, 8), word(0x36, 2), word(0x38, 2))
    else {
        return false;
    };
    (0..phnum).any(|i| {
        usize::try_from(phoff + i * phentsize)
            .ok()
            .and_then(|at| word(at, 4))
            == Some(PT_INTERP)
    })
}

/// The initramfs: mote-init as /init.
fn initramfs() -> Result<Vec<u8>, RunError> {
    let path = init_path();
    let init = std::fs::read(&path).map_err(|source| RunError::NoInit {
        path: path.clone(),
        source,
    })?;
    if is_dynamic_elf(&init) {
        return Err(RunError::DynamicInit { path });
    }
    Ok(cpio::archive(&[
        cpio::Member::Dir("dev"),
        // The kernel opens it as init's stdin, stdout and stderr.
        cpio::Member::CharDevice("dev/console", 5, 1),
        cpio::Member::Dir("root"),
        cpio::Member::File("init", &init),
    ]))
}

/// The control drive: an empty report sector and signal slot, then the configuration.
fn control_drive(config: &InitConfig) -> Vec<u8> {
    let mut bytes = vec![0u8; init_config::CONFIG_OFFSET];
    // Serialising a struct of strings cannot fail.
    bytes.extend(serde_json::to_vec(config).unwrap_or_default());
    bytes.push(0);
    bytes.resize(bytes.len().next_multiple_of(SECTOR), 0);
    bytes
}

/// Makes the run's files and points `resources` at them: the root's copy as the first drive
/// (vda), the control drive (vdb), then the volumes; mote-init as the initramfs.
pub fn prepare(
    options: &ImageRunOptions,
    resources: &mut VmResources,
) -> Result<PreparedRun, RunError> {
    if let Some(keep) = &options.keep {
        if keep.exists() {
            return Err(RunError::KeepExists { path: keep.clone() });
        }
    }
    let store = Store::open(options.store.as_deref())?;
    let image = resolve_image(&store, &options.image)?;
    let config = init_config(&image, options)?;
    let initrd = initramfs()?;
    let prefix = store.run_prefix();
    let with_suffix = |suffix: &str| {
        let mut path = prefix.clone().into_os_string();
        path.push(suffix);
        PathBuf::from(path)
    };
    let rootfs = options
        .keep
        .clone()
        .unwrap_or_else(|| with_suffix(".rootfs.ext4"));
    let control = with_suffix(".control");
    let initrd_path = with_suffix(".init.cpio");
    let mut run = PreparedRun {
        files: vec![control.clone(), initrd_path.clone()],
        control: control.clone(),
    };
    if options.keep.is_none() {
        run.files.push(rootfs.clone());
    }
    // A sparse copy, sharing blocks with the stored one where the file system can.
    super::copy::sparse_copy(&store.rootfs(&image), &rootfs)
        .map_err(|err| RunError::Copy(err.to_string()))?;
    let write = |path: &Path, bytes: &[u8]| {
        std::fs::write(path, bytes).map_err(|source| RunError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    write(&control, &control_drive(&config))?;
    write(&initrd_path, &initrd)?;

    if let Some(boot) = resources.boot_source.as_mut() {
        boot.initrd_path = Some(initrd_path);
    }
    let drive = |id: &str, path: &Path, read_only: bool| DriveConfig {
        drive_id: id.to_string(),
        path_on_host: path.to_path_buf(),
        is_root_device: false,
        is_read_only: read_only,
        partuuid: None,
        cache_type: Default::default(),
        io_engine: Default::default(),
        rate_limiter: None,
    };
    let mut drives = vec![
        drive("rootfs", &rootfs, false),
        drive("control", &control, false),
    ];
    drives.extend(
        options
            .volumes
            .iter()
            .enumerate()
            .map(|(index, v)| drive(&format!("volume{}", index + 1), &v.host, v.read_only)),
    );
    drives.append(&mut resources.drives);
    resources.drives = drives;
    Ok(run)
}

impl PreparedRun {
    /// The program's exit status as the guest's init reported it, if it did.
    pub fn exit_status(&self) -> Option<u8> {
        let mut file = std::fs::File::open(&self.control).ok()?;
        let mut sector = vec![0u8; SECTOR];
        file.read_exact(&mut sector).ok()?;
        init_config::parse_report(&sector)
    }

    /// Writes signals for the program where mote-init reads them. Opened now: once the guest
    /// runs, the main thread's seccomp filter opens no file to write.
    pub fn signal_forwarder(&self) -> Result<SignalForwarder, RunError> {
        let control = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.control)
            .map_err(|source| RunError::Write {
                path: self.control.clone(),
                source,
            })?;
        Ok(SignalForwarder {
            control,
            sequence: 0,
        })
    }

    /// Ends the run: its files go (the root's copy stays where --keep put it).
    pub fn finish(self) {
        drop(self);
    }
}

impl Drop for PreparedRun {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Puts signals in the control drive's signal slot.
pub struct SignalForwarder {
    control: std::fs::File,
    sequence: u64,
}

impl SignalForwarder {
    /// Writes `signal` as the next one; false when it cannot.
    pub fn write(&mut self, signal: libc::c_int) -> bool {
        use std::os::unix::fs::FileExt;
        self.sequence += 1;
        let slot = init_config::signal_slot(self.sequence, signal);
        match self.control.write_all_at(&slot, init_config::SIGNAL_OFFSET) {
            Ok(()) => true,
            Err(err) => {
                log::warn!("cannot pass signal {signal} to the guest: {err}");
                false
            }
        }
    }
}

/// The line the guest's init writes for `status` (tests and documentation).
pub fn report_line(status: u8) -> String {
    format!("{EXIT_PREFIX}{status}\n")
}

#[cfg(test)]
#[path = "run_tests.rs"]
mod tests;
