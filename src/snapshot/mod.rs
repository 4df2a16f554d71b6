//! Full snapshots: a state file (everything but guest RAM) and a memory file (guest RAM, written
//! once, mapped MAP_PRIVATE on restore so that restoring does not read it and clones of one
//! snapshot share its clean pages).
//!
//! The state file is `MAGIC (8) | version (u32 LE) | arch (u32 LE) | body length (u64 LE) |
//! body | CRC-64`, the arch being the ELF machine number of the guest's architecture, the body
//! [`MicrovmState`] in bincode and the CRC-64/ECMA-182 covering every byte before it. A file
//! is refused, with the reason, when it is truncated, is not a mote snapshot, fails its
//! checksum, has another format version or belongs to another architecture.

pub mod actions;
pub mod describe;
pub mod diff;
pub mod failure;
pub mod lazy;
mod legacy;
pub mod memory;
pub mod rebase;
mod replace;
pub mod uffd;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crc::{Crc, CRC_64_ECMA_182};
use serde::{Deserialize, Serialize};

use crate::arch::{arch_name, VcpuState, VmState, SNAPSHOT_ARCH};
use crate::config::VmConfigFile;
pub use crate::device_manager::DevicesState;
use crate::host_file::{self, FileKind, HostFileError};
pub use diff::MemoryFileKind;
pub use memory::MemoryRegionState;
pub use replace::NewFile;

/// The first bytes of every state file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"MOTESNAP";
/// The state file's format version; a file of another version is refused, not misread.
/// (2: the header names the architecture; 3: the devices' rate limiters; 4: the VM
/// generation ID; 5: whether the memory file is Full or Diff.)
pub const SNAPSHOT_VERSION: u32 = 5;
const VERSION_AT: usize = SNAPSHOT_MAGIC.len();
const ARCH_AT: usize = VERSION_AT + 4;
const BODY_LEN_AT: usize = ARCH_AT + 4;
const HEADER_LEN: usize = BODY_LEN_AT + 8;
const CRC_LEN: usize = 8;
const CRC64: Crc<u64> = Crc::<u64>::new(&CRC_64_ECMA_182);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Read(#[from] HostFileError),
    #[error("cannot write {what} {path}: {source}")]
    Write {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the snapshot state file is truncated: {len} bytes, {expected} expected")]
    Truncated { len: usize, expected: usize },
    #[error("not a mote snapshot state file (wrong magic)")]
    BadMagic,
    #[error("the snapshot state file is corrupted: its CRC-64 is {stored:#018x}, its contents give {computed:#018x}")]
    BadCrc { stored: u64, computed: u64 },
    #[error("the snapshot state file has format version {found}; this mote reads versions 1 to {SNAPSHOT_VERSION}")]
    Version { found: u32 },
    #[error("the snapshot was taken of an {} guest; this mote runs {} guests", arch_name(*.found), arch_name(SNAPSHOT_ARCH))]
    Arch { found: u16 },
    #[error("cannot encode the snapshot state: {0}")]
    Encode(bincode::Error),
    #[error("cannot decode the snapshot state: its body ends early (cut short, or written by another build of mote)")]
    EndsEarly,
    #[error("cannot decode the snapshot state: {0}")]
    Decode(String),
    #[error(transparent)]
    Memory(#[from] memory::MemoryFileError),
}

/// Everything a snapshot holds but guest RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The machine's configuration in the config-file form (`GET /vm/config`): it names every
    /// backing (drive files, TAP devices, vsock socket) the restore reopens.
    #[serde(with = "config_as_json")]
    pub config: VmConfigFile,
    /// Guest RAM regions, in the order the memory file holds them.
    pub memory: Vec<MemoryRegionState>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
    /// Whether the memory file holds all of guest RAM or only what changed since the
    /// snapshot before.
    pub memory_file: MemoryFileKind,
}

/// The configuration is kept in the state file as its JSON text: its types leave out unset
/// optional fields when serialized (`skip_serializing_if`, for Firecracker's JSON shapes),
/// which bincode, having no field names, cannot read back.
mod config_as_json {
    use serde::{de::Error as _, ser::Error as _, Deserialize, Deserializer, Serializer};

    use crate::config::VmConfigFile;

    pub fn serialize<S: Serializer>(config: &VmConfigFile, out: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(config).map_err(S::Error::custom)?;
        out.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<VmConfigFile, D::Error> {
        let text = String::deserialize(input)?;
        serde_json::from_str(&text)
            .map_err(|err| D::Error::custom(format!("its configuration: {err}")))
    }
}

/// The state file's bytes for `state`.
pub fn encode(state: &MicrovmState) -> Result<Vec<u8>, SnapshotError> {
    let body = bincode::serialize(state).map_err(SnapshotError::Encode)?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len() + CRC_LEN);
    bytes.extend_from_slice(&SNAPSHOT_MAGIC);
    bytes.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&u32::from(SNAPSHOT_ARCH).to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&body);
    let crc = CRC64.checksum(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// The format version of the state file at `path`, from its header alone: the file may be of
/// another version, whose body this mote could not decode.
pub fn read_format_version(path: &Path) -> Result<u32, SnapshotError> {
    const WHAT: &str = "the snapshot state file";
    let mut file = host_file::open(WHAT, path, FileKind::Regular, false)?;
    let mut header = [0u8; ARCH_AT];
    let mut len = 0;
    while len < header.len() {
        match file.read(&mut header[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(SnapshotError::Read(HostFileError::Read {
                    what: WHAT.to_string(),
                    path: path.to_path_buf(),
                    source,
                }))
            }
        }
    }
    // A short file that does not even start as a snapshot is not one.
    let magic_len = len.min(SNAPSHOT_MAGIC.len());
    if header[..magic_len] != SNAPSHOT_MAGIC[..magic_len] {
        return Err(SnapshotError::BadMagic);
    }
    if len < header.len() {
        return Err(SnapshotError::Truncated {
            len,
            expected: header.len(),
        });
    }
    let version: [u8; 4] = header[VERSION_AT..]
        .try_into()
        .expect("the header ends with the 4-byte version");
    Ok(u32::from_le_bytes(version))
}

/// The header's layout in a format version: where the body's length is, how long the header
/// is, and the arch (read from the header, or implied by the version).
struct Layout {
    body_len_at: usize,
    header_len: usize,
    arch_at: Option<usize>,
}

/// Version 1 (before aarch64) had no arch field; its body is version 2's. Versions 3 (rate
/// limiters in the devices' state), 4 (the VM generation ID) and 5 (the memory file's kind)
/// have version 2's header: the older bodies are read by [`legacy`].
const V1_LAYOUT: Layout = Layout {
    body_len_at: VERSION_AT + 4,
    header_len: VERSION_AT + 4 + 8,
    arch_at: None,
};
const V2_LAYOUT: Layout = Layout {
    body_len_at: BODY_LEN_AT,
    header_len: HEADER_LEN,
    arch_at: Some(ARCH_AT),
};
/// The ELF machine number of the only arch version 1 was written for (x86_64).
const V1_ARCH: u64 = 62;

/// Checks and decodes a state file's bytes.
pub fn decode(bytes: &[u8]) -> Result<MicrovmState, SnapshotError> {
    let magic_len = bytes.len().min(SNAPSHOT_MAGIC.len());
    if bytes[..magic_len] != SNAPSHOT_MAGIC[..magic_len] {
        return Err(SnapshotError::BadMagic);
    }
    if bytes.len() < VERSION_AT + 4 {
        return Err(SnapshotError::Truncated {
            len: bytes.len(),
            expected: HEADER_LEN + CRC_LEN,
        });
    }
    let field = |at: usize, len: usize| {
        let mut buf = [0u8; 8];
        buf[..len].copy_from_slice(&bytes[at..at + len]);
        u64::from_le_bytes(buf)
    };
    // A file of another version may have another header: its version is all that is read
    // before it is refused.
    let found = field(VERSION_AT, 4) as u32;
    let layout = match found {
        1 => V1_LAYOUT,
        2..=SNAPSHOT_VERSION => V2_LAYOUT,
        _ => return Err(SnapshotError::Version { found }),
    };
    let min = layout.header_len + CRC_LEN;
    if bytes.len() < min {
        return Err(SnapshotError::Truncated {
            len: bytes.len(),
            expected: min,
        });
    }
    let body_len = field(layout.body_len_at, 8);
    let expected = usize::try_from(body_len)
        .ok()
        .and_then(|len| len.checked_add(min))
        .unwrap_or(usize::MAX);
    if bytes.len() != expected {
        return Err(SnapshotError::Truncated {
            len: bytes.len(),
            expected,
        });
    }
    let covered = &bytes[..bytes.len() - CRC_LEN];
    let stored = field(covered.len(), CRC_LEN);
    let computed = CRC64.checksum(covered);
    if stored != computed {
        return Err(SnapshotError::BadCrc { stored, computed });
    }
    let arch = layout.arch_at.map_or(V1_ARCH, |at| field(at, 4));
    if arch != u64::from(SNAPSHOT_ARCH) {
        return Err(SnapshotError::Arch {
            found: u16::try_from(arch).unwrap_or(u16::MAX),
        });
    }
    let body = &covered[layout.header_len..];
    let decoded = match found {
        1 | 2 => bincode::deserialize::<legacy::MicrovmStateV2>(body).map(MicrovmState::from),
        3 => bincode::deserialize::<legacy::MicrovmStateV3>(body).map(MicrovmState::from),
        4 => bincode::deserialize::<legacy::MicrovmStateV4>(body).map(MicrovmState::from),
        _ => bincode::deserialize(body),
    };
    decoded.map_err(|err| decode_error(&err))
}

/// bincode reports a body that ends early as an I/O error with an empty message.
fn decode_error(err: &bincode::ErrorKind) -> SnapshotError {
    match err {
        bincode::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            SnapshotError::EndsEarly
        }
        other => SnapshotError::Decode(other.to_string()),
    }
}

/// The largest state file read. A 32-vCPU guest with every device saves well under 1 MiB;
/// anything much larger is not a state file, and is refused before it is read into memory.
const STATE_FILE_MAX_BYTES: u64 = 16 << 20;

/// Reads and checks a state file.
pub fn read_state_file(path: &Path) -> Result<MicrovmState, SnapshotError> {
    let bytes = host_file::read_capped("the snapshot state file", path, STATE_FILE_MAX_BYTES)?;
    decode(&bytes)
}

/// Writes `state` into a new file that will be the state file `path` once committed.
pub fn write_state_file(path: &Path, state: &MicrovmState) -> Result<NewFile, SnapshotError> {
    let bytes = encode(state)?;
    let write_err = |source| SnapshotError::Write {
        what: "the snapshot state file",
        path: path.to_path_buf(),
        source,
    };
    let new = NewFile::create(path).map_err(write_err)?;
    new.file().write_all(&bytes).map_err(write_err)?;
    Ok(new)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn state() -> MicrovmState {
        MicrovmState {
            config: serde_json::from_str(
                r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}"#,
            )
            .unwrap(),
            memory: vec![MemoryRegionState {
                guest_addr: 0,
                size: 128 << 20,
            }],
            vm: VmState::default(),
            vcpus: Vec::new(),
            devices: DevicesState {
                serial: vm_superio::serial::SerialState {
                    scratch: 0x5a,
                    ..Default::default()
                }
                .into(),
                legacy: Default::default(),
                virtio: Vec::new(),
                vmgenid: Some(devices::vmgenid::VmGenIdState {
                    addr: 0xe_0040,
                    irq: 23,
                }),
            },
            memory_file: MemoryFileKind::Diff {
                base_pages: vec![diff::BasePage {
                    guest_addr: 0x7000,
                    crc64: 0x1234,
                }],
            },
        }
    }

    #[test]
    fn the_format_version_is_read_from_the_header_alone() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        let mut bytes = encode(&state()).unwrap();
        // A version this mote cannot decode is still described.
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_format_version(&path).unwrap(), 7);
        for (contents, want) in [
            (&b"#!/bin/sh\necho hello\n"[..], "not a mote snapshot"),
            (&bytes[..10], "truncated: 10 bytes, 12 expected"),
            (&b""[..], "truncated: 0 bytes"),
        ] {
            std::fs::write(&path, contents).unwrap();
            let err = read_format_version(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let fifo = dir.as_path().join("fifo");
        let fifo_c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, which outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0);
        let err = read_format_version(&fifo).unwrap_err().to_string();
        assert!(
            err.contains("is not a regular file (a named pipe)"),
            "{err}"
        );
    }

    #[test]
    fn a_state_file_round_trips() {
        let bytes = encode(&state()).unwrap();
        assert_eq!(&bytes[..8], b"MOTESNAP");
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.config, state().config);
        assert_eq!(decoded.memory, state().memory);
        assert_eq!(decoded.devices.serial.scratch, 0x5a);
        assert_eq!(decoded.devices.vmgenid, state().devices.vmgenid);
        assert_eq!(decoded.memory_file, state().memory_file);
    }

    #[test]
    fn truncation_corruption_and_other_versions_are_refused() {
        let bytes = encode(&state()).unwrap();
        for len in [0, 10, bytes.len() - 1] {
            let err = decode(&bytes[..len]).unwrap_err();
            assert!(matches!(err, SnapshotError::Truncated { .. }), "{err}");
        }
        let mut flipped = bytes.clone();
        flipped[HEADER_LEN + 3] ^= 1;
        assert!(matches!(
            decode(&flipped).unwrap_err(),
            SnapshotError::BadCrc { .. }
        ));
        let mut other = bytes.clone();
        other[0] = b'X';
        assert!(matches!(
            decode(&other).unwrap_err(),
            SnapshotError::BadMagic
        ));
        let mut newer = bytes.clone();
        newer[VERSION_AT..VERSION_AT + 4].copy_from_slice(&6u32.to_le_bytes());
        let err = decode(&rechecksummed(newer)).unwrap_err();
        assert!(matches!(err, SnapshotError::Version { found: 6 }), "{err}");
    }

    /// A version-1 file: the same body under the header without the arch field.
    fn as_version_1(v2: &[u8]) -> Vec<u8> {
        let mut bytes = v2[..VERSION_AT].to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&v2[BODY_LEN_AT..v2.len() - CRC_LEN]);
        let crc = CRC64.checksum(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn version_1_and_2_files_are_read_through_their_own_layout() {
        // Without virtio devices, the bodies of versions 1 to 3 are the same: under an older
        // header they read back whole (legacy.rs's tests read devices' older state).
        let mut v2 = encode(&state()).unwrap();
        v2[VERSION_AT..VERSION_AT + 4].copy_from_slice(&2u32.to_le_bytes());
        let v2 = rechecksummed(v2);
        let v1 = as_version_1(&v2);
        for (old, version) in [(&v2, 2), (&v1, 1)] {
            match decode(old) {
                Ok(decoded) => assert_eq!(decoded.devices.serial.scratch, 0x5a),
                // Version 1 was only ever x86_64's.
                Err(err) => assert!(
                    version == 1 && SNAPSHOT_ARCH != 62,
                    "version {version}: {err}"
                ),
            }
        }
        assert!(matches!(
            decode(&v1[..v1.len() - 1]).unwrap_err(),
            SnapshotError::Truncated { .. }
        ));
    }

    fn rechecksummed(mut bytes: Vec<u8>) -> Vec<u8> {
        let end = bytes.len() - CRC_LEN;
        let crc = CRC64.checksum(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn another_architectures_snapshot_is_refused_by_name() {
        let mut bytes = encode(&state()).unwrap();
        let other: u32 = if SNAPSHOT_ARCH == 62 { 183 } else { 62 };
        bytes[ARCH_AT..ARCH_AT + 4].copy_from_slice(&other.to_le_bytes());
        let err = decode(&rechecksummed(bytes)).unwrap_err().to_string();
        let (theirs, ours) = if other == 62 {
            ("x86_64", "aarch64")
        } else {
            ("aarch64", "x86_64")
        };
        assert_eq!(
            err,
            format!("the snapshot was taken of an {theirs} guest; this mote runs {ours} guests")
        );
    }

    /// A body cut short but framed and checksummed as whole: only the decoder can tell.
    fn with_body(body: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&u32::from(SNAPSHOT_ARCH).to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(body);
        let crc = CRC64.checksum(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn a_body_that_ends_early_says_so() {
        let whole = encode(&state()).unwrap();
        let body = &whole[HEADER_LEN..whole.len() - CRC_LEN];
        let err = decode(&with_body(&body[..body.len() / 2])).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("ends early"), "{message}");
        assert!(!message.trim_end().ends_with(':'), "{message}");
    }
}
