//! The working-set file: the pages a guest restored lazily faulted in its first moments, in
//! the order it faulted them (REAP, FaaSnap), kept beside the snapshot's state file as
//! `STATE.ws`. A later lazy restore of that snapshot brings them in before the vCPUs run.
//!
//! `MAGIC (8) | version (u32 LE) | page size (u32 LE) | state file length (u64 LE) |
//! state file CRC-64 (u64 LE) | memory pages (u64 LE) | count (u64 LE) | count × page (u32 LE)
//! | CRC-64 of every byte before`. The state file's length and checksum name the snapshot
//! it belongs to: a snapshot taken again under the same name gets a new state file, and its
//! old working set is then refused, not used for pages it may not describe.

use std::io::Write;
use std::path::{Path, PathBuf};

use crc::{Crc, CRC_64_ECMA_182};

use super::source::PAGE_SIZE;
use crate::snapshot::NewFile;

const MAGIC: [u8; 8] = *b"MOTEWSET";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8 + 8 + 8;
const CRC64: Crc<u64> = Crc::<u64>::new(&CRC_64_ECMA_182);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkingSetError {
    #[error("cannot read it: {0}")]
    Read(String),
    #[error("not a working-set file (wrong magic)")]
    BadMagic,
    #[error("it is cut short or too long: {len} bytes")]
    Length { len: usize },
    #[error("its CRC-64 does not match its contents")]
    BadCrc,
    #[error("format version {0}, this mote writes {VERSION}")]
    Version(u32),
    #[error("it was recorded for {0} byte pages")]
    PageSize(u32),
    #[error("it belongs to another snapshot (another state file: {found_len} bytes, CRC-64 {found_crc:#018x}; this one has {len} bytes, {crc:#018x})")]
    OtherSnapshot {
        found_len: u64,
        found_crc: u64,
        len: u64,
        crc: u64,
    },
    #[error("it was recorded for {found} pages of memory; this snapshot has {pages}")]
    OtherMemory { found: u64, pages: u64 },
    #[error("it names page {page}, beyond the snapshot's {pages}")]
    PageOutside { page: u64, pages: u64 },
}

/// Which snapshot a working set is for: its state file's length and CRC-64, and its memory's
/// size in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotId {
    pub state_len: u64,
    pub state_crc: u64,
    pub pages: u64,
}

impl SnapshotId {
    /// The identity of the snapshot whose state file holds `state` and whose memory has
    /// `pages` pages.
    pub fn of(state: &[u8], pages: u64) -> Self {
        Self {
            state_len: state.len() as u64,
            state_crc: CRC64.checksum(state),
            pages,
        }
    }
}

/// The working-set file of the snapshot whose state file is `state_path`.
pub fn path_for(state_path: &Path) -> PathBuf {
    let mut name = state_path.as_os_str().to_os_string();
    name.push(".ws");
    PathBuf::from(name)
}

/// The file's bytes for `pages` of snapshot `id`.
pub fn encode(id: SnapshotId, pages: &[u32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + pages.len() * 4 + 8);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    bytes.extend_from_slice(&id.state_len.to_le_bytes());
    bytes.extend_from_slice(&id.state_crc.to_le_bytes());
    bytes.extend_from_slice(&id.pages.to_le_bytes());
    bytes.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for page in pages {
        bytes.extend_from_slice(&page.to_le_bytes());
    }
    let crc = CRC64.checksum(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// The pages a working-set file's `bytes` name, in the order they were faulted, if it is
/// whole and belongs to snapshot `id`.
pub fn decode(bytes: &[u8], id: SnapshotId) -> Result<Vec<u32>, WorkingSetError> {
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(WorkingSetError::BadMagic);
    }
    let length = WorkingSetError::Length { len: bytes.len() };
    if bytes.len() < HEADER_LEN + 8 {
        return Err(length);
    }
    let (body, crc) = bytes.split_at(bytes.len() - 8);
    if CRC64.checksum(body) != u64_at(crc, 0) {
        return Err(WorkingSetError::BadCrc);
    }
    let version = u32::from_le_bytes([body[8], body[9], body[10], body[11]]);
    if version != VERSION {
        return Err(WorkingSetError::Version(version));
    }
    let page_size = u32::from_le_bytes([body[12], body[13], body[14], body[15]]);
    if u64::from(page_size) != PAGE_SIZE {
        return Err(WorkingSetError::PageSize(page_size));
    }
    let (found_len, found_crc) = (u64_at(body, 16), u64_at(body, 24));
    if (found_len, found_crc) != (id.state_len, id.state_crc) {
        return Err(WorkingSetError::OtherSnapshot {
            found_len,
            found_crc,
            len: id.state_len,
            crc: id.state_crc,
        });
    }
    let found = u64_at(body, 32);
    if found != id.pages {
        return Err(WorkingSetError::OtherMemory {
            found,
            pages: id.pages,
        });
    }
    let count = u64_at(body, 40);
    if Some(body.len() as u64) != count.checked_mul(4).map(|n| n + HEADER_LEN as u64) {
        return Err(length);
    }
    body[HEADER_LEN..]
        .chunks_exact(4)
        .map(|page| {
            let page = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
            if u64::from(page) >= id.pages {
                return Err(WorkingSetError::PageOutside {
                    page: page.into(),
                    pages: id.pages,
                });
            }
            Ok(page)
        })
        .collect()
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Reads the working-set file at `path`: None when there is none, else its pages or why it
/// cannot be used.
pub fn read(path: &Path, id: SnapshotId) -> Option<Result<Vec<u32>, WorkingSetError>> {
    match std::fs::read(path) {
        Ok(bytes) => Some(decode(&bytes, id)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => Some(Err(WorkingSetError::Read(err.to_string()))),
    }
}

/// Writes `pages` as the working set of snapshot `id` at `path`: under a new name first, then
/// renamed over whatever was there, so a reader finds the old file or the new, whole.
pub fn write(path: &Path, id: SnapshotId, pages: &[u32]) -> std::io::Result<()> {
    let file = NewFile::create(path)?;
    file.file().write_all(&encode(id, pages))?;
    file.commit()
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    const ID: SnapshotId = SnapshotId {
        state_len: 1234,
        state_crc: 0xfeed,
        pages: 100,
    };

    #[test]
    fn a_working_set_round_trips_in_fault_order() {
        let dir = TempDir::new().unwrap();
        let path = path_for(&dir.as_path().join("vm.snap"));
        assert!(path.ends_with("vm.snap.ws"));
        assert_eq!(read(&path, ID), None);
        write(&path, ID, &[7, 3, 99, 0]).unwrap();
        assert_eq!(read(&path, ID), Some(Ok(vec![7, 3, 99, 0])));
        // Nothing else is left in the directory (the new name was renamed away).
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 1);
    }

    #[test]
    fn another_snapshots_or_a_damaged_working_set_is_refused_with_the_reason() {
        let bytes = encode(ID, &[1, 2, 3]);
        let other = SnapshotId {
            state_crc: 0xbeef,
            ..ID
        };
        assert!(matches!(
            decode(&bytes, other),
            Err(WorkingSetError::OtherSnapshot { .. })
        ));
        let bigger = SnapshotId { pages: 200, ..ID };
        assert!(matches!(
            decode(&bytes, bigger),
            Err(WorkingSetError::OtherMemory { .. })
        ));
        assert_eq!(
            decode(&bytes[..bytes.len() - 3], ID),
            Err(WorkingSetError::BadCrc)
        );
        assert_eq!(
            decode(&bytes[..20], ID),
            Err(WorkingSetError::Length { len: 20 })
        );
        assert_eq!(
            decode(b"garbage!garbage!", ID),
            Err(WorkingSetError::BadMagic)
        );
        let mut flipped = bytes.clone();
        flipped[HEADER_LEN] ^= 1;
        assert_eq!(decode(&flipped, ID), Err(WorkingSetError::BadCrc));
        let small = SnapshotId { pages: 3, ..ID };
        let outside = encode(small, &[1, 3]);
        assert_eq!(
            decode(&outside, small),
            Err(WorkingSetError::PageOutside { page: 3, pages: 3 })
        );
    }
}
