//! The jail's directory: `<base>/<exec name>/<id>/root` with the monitor's binary and the
//! device nodes it needs, owned by the jailed uid and gid. Until [`Jail::keep`], dropping it
//! removes every directory it made.

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
}

/// /dev/kvm, the TAP clone device and the random source (the numbers are fixed by Linux).
const DEVICE_NODES: [DeviceNode; 3] = [
    DeviceNode {
        path: "dev/kvm",
        major: 10,
        minor: 232,
    },
    DeviceNode {
        path: "dev/net/tun",
        major: 10,
        minor: 200,
    },
    DeviceNode {
        path: "dev/urandom",
        major: 1,
        minor: 9,
    },
];

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
    /// The outermost directory this jailer made, removed with all inside on failure.
    created: Option<PathBuf>,
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
        let id_dir = base.join(&exec_name).join(id);
        if id_dir.symlink_metadata().is_ok() {
            return Err(JailError::JailExists(id_dir));
        }
        let mut jail = Jail {
            root: id_dir.join("root"),
            exec_name,
            created: None,
        };
        // Note the outermost missing directory before making any, to remove exactly those.
        jail.created = id_dir
            .ancestors()
            .take_while(|dir| dir.symlink_metadata().is_err())
            .last()
            .map(Path::to_path_buf);
        let exec_dir = base.join(&jail.exec_name);
        std::fs::create_dir_all(&exec_dir).map_err(io_error("create", &exec_dir))?;
        // create_dir, not create_dir_all: another jailer making the same jail loses here.
        std::fs::create_dir(&id_dir).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                JailError::JailExists(id_dir.clone())
            } else {
                JailError::Io {
                    what: "create",
                    path: id_dir.clone(),
                    source,
                }
            }
        })?;
        std::fs::create_dir(&jail.root).map_err(io_error("create", &jail.root))?;
        jail.install_binary(exec_file, &metadata)?;
        jail.make_device_nodes(uid, gid)?;
        // The monitor makes its API socket (and any file it is told to) in its root.
        chown(&jail.root, Some(uid), Some(gid)).map_err(io_error("chown", &jail.root))?;
        Ok(jail)
    }

    /// A hard link when the binary is on the jail's file system (no copy of megabytes per
    /// start), a copy otherwise. Either way it stays root's: the monitor cannot change it.
    fn install_binary(
        &self,
        exec_file: &Path,
        metadata: &std::fs::Metadata,
    ) -> Result<(), JailError> {
        let target = self.root.join(&self.exec_name);
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

    fn make_device_nodes(&self, uid: u32, gid: u32) -> Result<(), JailError> {
        for node in &DEVICE_NODES {
            let path = self.root.join(node.path);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
            }
            sys::mknod_char(&path, DEVICE_MODE, node.major, node.minor)
                .map_err(io_error("make the device node", &path))?;
            chown(&path, Some(uid), Some(gid)).map_err(io_error("chown", &path))?;
        }
        Ok(())
    }

    /// The jail stays: the monitor is about to run in it.
    pub fn keep(mut self) {
        self.created = None;
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        if let Some(dir) = &self.created {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
