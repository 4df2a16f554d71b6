//! The jail's directory: `<base>/<exec name>/<id>/root` with the monitor's binary and the
//! device nodes it needs, owned by the jailed uid and gid. Until [`Jail::keep`], dropping it
//! removes everything it made.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sys;
use crate::JailError;

/// A device node the monitor opens: its path in the jail and its numbers.
struct DeviceNode {
    path: &'static str,
    major: u32,
    minor: u32,
    /// Firecracker's jailer warns and goes on where it cannot make the node.
    optional: bool,
}

/// /dev/kvm, the TAP clone device and the random source (the numbers are fixed by Linux);
/// /dev/userfaultfd is added where the host has it ([`host_userfaultfd`]).
const DEVICE_NODES: [DeviceNode; 3] = [
    DeviceNode {
        path: "dev/kvm",
        major: 10,
        minor: 232,
        optional: false,
    },
    DeviceNode {
        path: "dev/net/tun",
        major: 10,
        minor: 200,
        optional: false,
    },
    DeviceNode {
        path: "dev/urandom",
        major: 1,
        minor: 9,
        optional: true,
    },
];

/// /dev/userfaultfd as the host has it (Linux 6.1 on), for a monitor restoring a snapshot
/// through a page-fault handler (the `Uffd` memory backend): opening it needs no capability,
/// where the userfaultfd system call would need CAP_SYS_PTRACE. As Firecracker's jailer, made
/// when the host has it; its minor number is the kernel's choice, so it is read from the host.
fn host_userfaultfd() -> Option<DeviceNode> {
    use std::os::unix::fs::FileTypeExt;
    let metadata = std::fs::metadata("/dev/userfaultfd").ok()?;
    if !metadata.file_type().is_char_device() {
        return None;
    }
    let rdev = metadata.rdev();
    Some(DeviceNode {
        path: "dev/userfaultfd",
        major: libc::major(rdev),
        minor: libc::minor(rdev),
        optional: true,
    })
}

/// Execute permission for the owner, the group and others.
const EXEC_OWNER: u32 = 0o100;
const EXEC_GROUP: u32 = 0o010;
const EXEC_OTHER: u32 = 0o001;

/// Whether the jailed uid and gid may run the binary. The jail's copy or link stays root's,
/// so the owner's bit counts only for a root monitor; the group's when the file's group is
/// the jailed gid (a link keeps it; a copy is the jailer's, which is then stricter).
fn executable_by(metadata: &std::fs::Metadata, uid: u32, gid: u32) -> bool {
    let mode = metadata.permissions().mode();
    mode & EXEC_OTHER != 0
        || (uid == 0 && mode & (EXEC_OWNER | EXEC_GROUP) != 0)
        || (metadata.gid() == gid && mode & EXEC_GROUP != 0)
}

/// Read and write for the owner only: the jailed uid.
const DEVICE_MODE: u32 = 0o600;

pub struct Jail {
    /// `<base>/<exec name>/<id>/root`.
    pub root: PathBuf,
    /// The binary's name, also its path in the jail (`/<exec name>`).
    pub exec_name: OsString,
    /// What this jailer made (directories and files), in order, removed on failure: a jail
    /// made beforehand keeps what it held.
    made: Vec<PathBuf>,
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// ELF program header type of the dynamic loader's path.
const PT_INTERP: u32 = 3;

/// The jail holds the binary alone, so it must be a statically linked ELF: a dynamic one
/// would fail in the jail with a bare "No such file or directory" for its loader.
fn check_static(exec_file: &Path) -> Result<(), JailError> {
    let not_static = |reason: &str| JailError::ExecNotStatic {
        path: exec_file.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut file = File::open(exec_file).map_err(io_error("open", exec_file))?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header)
        .map_err(|_| not_static("too short for an ELF file"))?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 {
        return Err(not_static("not a 64-bit ELF executable"));
    }
    let u16_at = |bytes: &[u8], at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let phoff = u64::from_le_bytes(header[0x20..0x28].try_into().unwrap_or_default());
    let phentsize = usize::from(u16_at(&header, 0x36));
    let phnum = usize::from(u16_at(&header, 0x38));
    if phentsize < 4 {
        return Err(not_static("no program headers"));
    }
    let mut headers = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut headers))
        .map_err(|_| not_static("its program headers are cut short"))?;
    let dynamic = headers
        .chunks_exact(phentsize)
        .any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP);
    if dynamic {
        return Err(not_static(
            "it is dynamically linked (tools/build makes a static mote: for the musl target, or \
             for glibc with RUSTFLAGS=\"-C target-feature=+crt-static\" and an explicit --target)",
        ));
    }
    Ok(())
}

impl Jail {
    pub fn create(
        base: &Path,
        exec_file: &Path,
        id: &str,
        uid: u32,
        gid: u32,
    ) -> Result<Self, JailError> {
        if !base.is_absolute() {
            return Err(JailError::RelativeBase(base.to_path_buf()));
        }
        // The jail's paths are made under the base as given; a link would put the jail, and
        // everything removed on failure, somewhere the caller did not name.
        if base
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(JailError::BaseIsSymlink {
                base: base.to_path_buf(),
                target: std::fs::read_link(base).unwrap_or_default(),
            });
        }
        let exec_err = |source| JailError::ExecFile {
            path: exec_file.to_path_buf(),
            source,
        };
        // A symbolic link would itself be hard-linked into the jail, where its target is out
        // of reach: the jail gets the file it names. The name stays the one given.
        let resolved = std::fs::canonicalize(exec_file).map_err(exec_err)?;
        let metadata = std::fs::metadata(&resolved).map_err(exec_err)?;
        let exec_name = match exec_file.file_name() {
            Some(name) if metadata.is_file() => name.to_os_string(),
            _ => return Err(JailError::ExecNotAFile(exec_file.to_path_buf())),
        };
        if !executable_by(&metadata, uid, gid) {
            return Err(JailError::ExecNotExecutable {
                path: exec_file.to_path_buf(),
                mode: metadata.permissions().mode() & 0o7777,
                uid,
                gid,
            });
        }
        check_static(&resolved)?;
        let exec_file = resolved.as_path();
        let root = base.join(&exec_name).join(id).join("root");
        check_reusable(&root, &exec_name)?;
        let mut jail = Jail {
            root,
            exec_name,
            made: Vec::new(),
        };
        jail.make_dirs(&jail.root.clone())?;
        jail.install_binary(exec_file, &metadata)?;
        jail.make_device_nodes(uid, gid)?;
        // The monitor makes its API socket (and any file it is told to) in its root.
        chown(&jail.root, Some(uid), Some(gid)).map_err(io_error("chown", &jail.root))?;
        Ok(jail)
    }

    /// Makes `dir` and its missing parents, noting each to remove on failure.
    fn make_dirs(&mut self, dir: &Path) -> Result<(), JailError> {
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|dir| dir.symlink_metadata().is_err())
            .map(Path::to_path_buf)
            .collect();
        for dir in missing.into_iter().rev() {
            match std::fs::create_dir(&dir) {
                Ok(()) => self.made.push(dir),
                // Made meanwhile by another jailer: it is not ours to remove.
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(err) => return Err(io_error("create", &dir)(err)),
            }
        }
        Ok(())
    }

    /// A hard link when the binary is on the jail's file system (no copy of megabytes per
    /// start), a copy otherwise. Either way it stays root's: the monitor cannot change it.
    fn install_binary(
        &mut self,
        exec_file: &Path,
        metadata: &std::fs::Metadata,
    ) -> Result<(), JailError> {
        let target = self.root.join(&self.exec_name);
        // A jail made beforehand may hold an older binary: it is replaced, as Firecracker's
        // jailer copies over it. Removed first, so that neither the link nor the copy follows
        // a symbolic link out of the jail, nor writes through a hard link into the original.
        if target.symlink_metadata().is_ok() {
            std::fs::remove_file(&target).map_err(io_error("replace", &target))?;
        }
        self.made.push(target.clone());
        let root_dev = std::fs::metadata(&self.root)
            .map_err(io_error("stat", &self.root))?
            .dev();
        if metadata.dev() == root_dev
            && metadata.uid() == 0
            && std::fs::hard_link(exec_file, &target).is_ok()
        {
            return Ok(());
        }
        std::fs::copy(exec_file, &target).map_err(io_error("copy the exec file to", &target))?;
        Ok(())
    }

    fn make_device_nodes(&mut self, uid: u32, gid: u32) -> Result<(), JailError> {
        let userfaultfd = host_userfaultfd();
        for node in DEVICE_NODES.iter().chain(userfaultfd.as_ref()) {
            let path = self.root.join(node.path);
            if let Some(dir) = path.parent() {
                self.make_dirs(dir)?;
            }
            if let Err(err) = sys::mknod_char(&path, DEVICE_MODE, node.major, node.minor) {
                if node.optional {
                    // As Firecracker's jailer: without it the monitor still runs.
                    eprintln!(
                        "mote-jailer: warning: cannot make the device node {}: {err}",
                        path.display()
                    );
                    continue;
                }
                return Err(io_error("make the device node", &path)(err));
            }
            self.made.push(path.clone());
            chown(&path, Some(uid), Some(gid)).map_err(io_error("chown", &path))?;
        }
        Ok(())
    }

    /// The jail stays: the monitor is about to run in it.
    pub fn keep(mut self) {
        self.made.clear();
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        // Newest first: what a directory this jailer made holds goes before it.
        for path in self.made.iter().rev() {
            match path.symlink_metadata() {
                Ok(meta) if meta.is_dir() => {
                    let _ = std::fs::remove_dir_all(path);
                }
                Ok(_) => {
                    let _ = std::fs::remove_file(path);
                }
                Err(_) => {}
            }
        }
    }
}

/// What the monitor's root holds once it ran: the jailer cannot start it there again.
const OLD_ROOT_DIR: &str = "old_root";

/// Firecracker's jailer makes the root with create_dir_all: a jail made beforehand (its test
/// framework makes it, to put the kernel and drives in) is used as it is, and an older binary
/// in it is replaced. It refuses a jail a monitor was started in: making /dev/net/tun or
/// /dev/kvm fails where they exist, as does writing the pid file. Checked here, before
/// anything changes, so that a refused jail is left as it was. Unlike Firecracker's jailer
/// (which makes the nodes after pivot_root), this one makes them from outside the jail: a
/// directory on the way that is a symbolic link would put them outside it, so it is refused.
fn check_reusable(root: &Path, exec_name: &OsString) -> Result<(), JailError> {
    let id_dir = root.parent().unwrap_or(root);
    let exec_dir = id_dir.parent().unwrap_or(id_dir);
    for dir in [
        exec_dir.to_path_buf(),
        id_dir.to_path_buf(),
        root.to_path_buf(),
        root.join("dev"),
        root.join("dev/net"),
    ] {
        match dir.symlink_metadata() {
            Ok(meta) if !meta.is_dir() => return Err(JailError::JailPathNotADirectory(dir)),
            _ => {}
        }
    }
    let pid_file = Path::new(exec_name).with_extension("pid");
    let used = DEVICE_NODES
        .iter()
        .filter(|node| !node.optional)
        .map(|node| Path::new(node.path))
        .chain([pid_file.as_path(), Path::new(OLD_ROOT_DIR)])
        .find(|path| root.join(path).symlink_metadata().is_ok());
    if let Some(found) = used {
        return Err(JailError::JailUsed {
            root: root.to_path_buf(),
            found: found.to_path_buf(),
        });
    }
    Ok(())
}
