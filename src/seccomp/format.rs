//! The compiled form of a set of seccomp filters: what `build.rs` writes from the JSON in
//! `resources/seccomp/` and what mote reads at start-up, so that start-up does not parse JSON.
//! Shared with `build.rs` (through `#[path]`), so it depends on nothing but std and seccompiler.
//!
//! Layout, all integers little-endian: the 8-byte [`MAGIC`]; a u32 count of filters; per
//! filter a u32 name length, the UTF-8 name, a u32 instruction count and the instructions,
//! 8 bytes each (`code` u16, `jt` u8, `jf` u8, `k` u32, as in `struct sock_filter`).

use std::collections::BTreeMap;

use seccompiler::sock_filter;

/// The first bytes of a compiled filter file; anything else is taken for JSON.
pub const MAGIC: &[u8; 8] = b"MOTEBPF\x01";

/// Filters by name, each a BPF program.
pub type FilterMap = BTreeMap<String, Vec<sock_filter>>;

/// Why a compiled filter file could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    BadMagic,
    Truncated,
    BadName,
    DuplicateName(String),
    TrailingBytes,
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormatError::BadMagic => write!(f, "not a compiled mote filter file"),
            FormatError::Truncated => write!(f, "the file ends early"),
            FormatError::BadName => write!(f, "a filter name is not UTF-8"),
            FormatError::DuplicateName(name) => write!(f, "filter `{name}` appears twice"),
            FormatError::TrailingBytes => write!(f, "bytes after the last filter"),
        }
    }
}

impl std::error::Error for FormatError {}

/// Writes `filters` in the compiled form.
pub fn serialize(filters: &FilterMap) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(filters.len() as u32).to_le_bytes());
    for (name, program) in filters {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(program.len() as u32).to_le_bytes());
        for insn in program {
            out.extend_from_slice(&insn.code.to_le_bytes());
            out.push(insn.jt);
            out.push(insn.jf);
            out.extend_from_slice(&insn.k.to_le_bytes());
        }
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], FormatError> {
        if self.bytes.len() < len {
            return Err(FormatError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

/// Reads the compiled form.
pub fn deserialize(bytes: &[u8]) -> Result<FilterMap, FormatError> {
    let mut reader = Reader { bytes };
    if reader
        .take(MAGIC.len())
        .map_err(|_| FormatError::BadMagic)?
        != MAGIC
    {
        return Err(FormatError::BadMagic);
    }
    let count = reader.u32()?;
    let mut filters = FilterMap::new();
    for _ in 0..count {
        let name_len = reader.u32()? as usize;
        let name = std::str::from_utf8(reader.take(name_len)?)
            .map_err(|_| FormatError::BadName)?
            .to_string();
        let insn_count = reader.u32()? as usize;
        // Each instruction is 8 bytes: checking the length first keeps a corrupt count from
        // reserving memory the file cannot fill.
        let raw = reader.take(insn_count.checked_mul(8).ok_or(FormatError::Truncated)?)?;
        let program = raw
            .chunks_exact(8)
            .map(|insn| sock_filter {
                code: u16::from_le_bytes([insn[0], insn[1]]),
                jt: insn[2],
                jf: insn[3],
                k: u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]),
            })
            .collect();
        if filters.insert(name.clone(), program).is_some() {
            return Err(FormatError::DuplicateName(name));
        }
    }
    if !reader.bytes.is_empty() {
        return Err(FormatError::TrailingBytes);
    }
    Ok(filters)
}
