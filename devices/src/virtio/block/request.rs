//! One virtio-blk request: parse a descriptor chain (header, data buffers, status byte) and carry
//! it out on the backing file. Everything the guest wrote is checked: addresses inside guest
//! memory, directions, lengths, sectors inside the disk.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::discard::discard_or_zero;
use crate::metrics::BlockMetrics;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Type (u32), reserved (u32), sector (u64).
const HEADER_SIZE: u32 = 16;

/// Why a request failed; each becomes IOERR (or UNSUPP) in the status byte.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor chain too short")]
    ChainTooShort,
    #[error("the header descriptor is not readable or shorter than 16 bytes")]
    BadHeader,
    #[error("the status descriptor is not a writable byte")]
    BadStatus,
    #[error("a data descriptor points the wrong way for the request")]
    WrongDirection,
    #[error("data length {0} is not a whole number of sectors")]
    PartialSector(u64),
    #[error("sectors {sector}+{len} lie beyond the disk's {capacity}")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("the guest buffer at {0:#x} is not in guest memory")]
    BadGuestAddress(u64),
    #[error("the drive is read-only")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("a discard or write-zeroes segment is {0} bytes, not 16")]
    BadSegment(u32),
    #[error("host I/O failed: {}", std::io::Error::from_raw_os_error(*.0))]
    Io(i32),
}

/// The drive as requests see it.
pub struct Disk<'a> {
    pub file: &'a File,
    pub read_only: bool,
    pub capacity_sectors: u64,
    pub id: &'a [u8],
    pub metrics: &'a BlockMetrics,
}

/// Where the status byte goes and how many bytes the device wrote into the guest's buffers.
pub struct Completion {
    pub status_addr: Option<GuestAddress>,
    pub status: u8,
    /// Bytes written into device-writable buffers, the status byte included.
    pub used_len: u32,
    /// The host's I/O error (errno) behind an IOERR, which the device logs.
    pub host_error: Option<RequestError>,
}

fn status_of<T>(result: &Result<T, RequestError>) -> u8 {
    match result {
        Ok(_) => VIRTIO_BLK_S_OK as u8,
        Err(RequestError::Unsupported(_)) => VIRTIO_BLK_S_UNSUPP as u8,
        Err(_) => VIRTIO_BLK_S_IOERR as u8,
    }
}

/// What a read, a write or a flush does on the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// File to guest buffers.
    Read,
    /// Guest buffers to file.
    Write,
    /// fdatasync.
    Flush,
}

/// A checked read, write or flush, ready for an engine to carry out: sectors inside the disk,
/// buffers pointing the right way. Its buffers are checked against guest memory when the
/// engine maps them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoRequest {
    pub op: IoOp,
    /// Byte offset into the file.
    pub offset: u64,
    /// Guest buffers in order, (address, length).
    pub buffers: Vec<(GuestAddress, u32)>,
    pub status_addr: GuestAddress,
}

impl IoRequest {
    /// The data bytes the request moves.
    pub fn len(&self) -> u64 {
        self.buffers.iter().map(|&(_, len)| u64::from(len)).sum()
    }

    /// The part of the request still to do once `done` bytes have moved (an engine's short
    /// transfer).
    pub fn remainder(&self, done: u64) -> IoRequest {
        let mut skip = done;
        let mut buffers = Vec::with_capacity(self.buffers.len());
        for &(addr, len) in &self.buffers {
            let len64 = u64::from(len);
            if skip >= len64 {
                skip -= len64;
                continue;
            }
            buffers.push((GuestAddress(addr.0 + skip), (len64 - skip) as u32));
            skip = 0;
        }
        IoRequest {
            op: self.op,
            offset: self.offset + done,
            buffers,
            status_addr: self.status_addr,
        }
    }
}

/// A request after parsing: finished already, or I/O for the drive's engine.
pub enum Request {
    Done(Completion),
    Io(IoRequest),
}

/// Parses the request in `descriptors` (a whole chain, as the queue yielded it). Requests
/// that fail their checks, and those that need no I/O engine (GET_ID, discard, write zeroes),
/// are carried out here and come back done.
pub fn parse(mem: &GuestMemoryMmap, descriptors: &[Descriptor], disk: &Disk) -> Request {
    // A last descriptor that still points onwards means the chain was cut short: it loops or
    // is longer than the queue, and none of it is trusted.
    let status_desc = descriptors
        .last()
        .filter(|d| descriptors.len() >= 2 && !d.has_next() && d.is_write_only() && d.len() >= 1);
    let Some(status_desc) = status_desc else {
        // Nowhere to report: the request completes with nothing written.
        return Request::Done(Completion {
            status_addr: None,
            status: VIRTIO_BLK_S_IOERR as u8,
            used_len: 0,
            host_error: None,
        });
    };
    let status_addr = status_desc.addr();
    match run(mem, &descriptors[..descriptors.len() - 1], disk) {
        Ok(Step::Io {
            op,
            offset,
            buffers,
        }) => Request::Io(IoRequest {
            op,
            offset,
            buffers,
            status_addr,
        }),
        Ok(Step::Finished(data_len)) => {
            Request::Done(completion(status_addr, Ok(data_len), disk.metrics))
        }
        Err(err) => Request::Done(completion(status_addr, Err(err), disk.metrics)),
    }
}

/// The completion of an I/O request once its engine is done with it; counts it.
pub fn io_completion(
    io: &IoRequest,
    result: Result<(), RequestError>,
    metrics: &BlockMetrics,
) -> Completion {
    let result = result.map(|()| {
        let len = io.len();
        match io.op {
            IoOp::Read => {
                metrics.read_count.inc();
                metrics.read_bytes.add(len);
            }
            IoOp::Write => {
                metrics.write_count.inc();
                metrics.write_bytes.add(len);
            }
            IoOp::Flush => metrics.flush_count.inc(),
        }
        // Data bytes written into the guest's buffers: a read's. The used ring's length
        // field is a u32; a read larger than that (buffers of several GiB) says as much.
        if io.op == IoOp::Read {
            u32::try_from(len).unwrap_or(u32::MAX)
        } else {
            0
        }
    });
    completion(io.status_addr, result, metrics)
}

/// The status of a request that wrote `result`'s bytes into the guest's buffers, or failed.
fn completion(
    status_addr: GuestAddress,
    result: Result<u32, RequestError>,
    metrics: &BlockMetrics,
) -> Completion {
    match &result {
        Ok(_) => {}
        Err(RequestError::Io(_)) => metrics.io_errors.inc(),
        Err(_) => metrics.invalid_reqs_count.inc(),
    }
    let data_len = *result.as_ref().unwrap_or(&0);
    Completion {
        status_addr: Some(status_addr),
        status: status_of(&result),
        used_len: data_len + 1,
        host_error: result
            .err()
            .filter(|err| matches!(err, RequestError::Io(_))),
    }
}

/// What a request whose status descriptor is split off needs next.
enum Step {
    /// Done, with this many bytes written to the guest.
    Finished(u32),
    /// Checked I/O for the drive's engine.
    Io {
        op: IoOp,
        offset: u64,
        buffers: Vec<(GuestAddress, u32)>,
    },
}

/// Checks a request whose status descriptor is already split off, and carries it out unless
/// it is I/O for the engine.
fn run(
    mem: &GuestMemoryMmap,
    descriptors: &[Descriptor],
    disk: &Disk,
) -> Result<Step, RequestError> {
    let (header, data) = descriptors
        .split_first()
        .ok_or(RequestError::ChainTooShort)?;
    if header.is_write_only() || header.len() < HEADER_SIZE {
        return Err(RequestError::BadHeader);
    }
    let request_type: u32 = mem
        .read_obj(header.addr())
        .map_err(|_| RequestError::BadGuestAddress(header.addr().0))?;
    let sector: u64 = mem
        .read_obj(GuestAddress(header.addr().0.wrapping_add(8)))
        .map_err(|_| RequestError::BadGuestAddress(header.addr().0))?;
    match request_type {
        VIRTIO_BLK_T_IN => Ok(Step::Io {
            op: IoOp::Read,
            offset: check_transfer(data, disk, sector, IoOp::Read)?,
            buffers: buffers(data),
        }),
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            Ok(Step::Io {
                op: IoOp::Write,
                offset: check_transfer(data, disk, sector, IoOp::Write)?,
                buffers: buffers(data),
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Step::Io {
            op: IoOp::Flush,
            offset: 0,
            buffers: Vec::new(),
        }),
        VIRTIO_BLK_T_GET_ID => {
            let buffer = data.first().ok_or(RequestError::ChainTooShort)?;
            if !buffer.is_write_only() {
                return Err(RequestError::WrongDirection);
            }
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let n = disk.id.len().min(id.len());
            id[..n].copy_from_slice(&disk.id[..n]);
            let len = (buffer.len() as usize).min(id.len());
            mem.write_slice(&id[..len], buffer.addr())
                .map_err(|_| RequestError::BadGuestAddress(buffer.addr().0))?;
            disk.metrics.get_id_count.inc();
            Ok(Step::Finished(len as u32))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            discard_or_zero(mem, data, disk, request_type)?;
            if request_type == VIRTIO_BLK_T_DISCARD {
                disk.metrics.discard_count.inc();
            } else {
                disk.metrics.write_zeroes_count.inc();
            }
            Ok(Step::Finished(0))
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn buffers(data: &[Descriptor]) -> Vec<(GuestAddress, u32)> {
    data.iter().map(|d| (d.addr(), d.len())).collect()
}

/// Checks a read's or a write's data buffers against the disk; returns the byte offset.
fn check_transfer(
    data: &[Descriptor],
    disk: &Disk,
    sector: u64,
    op: IoOp,
) -> Result<u64, RequestError> {
    let want_write_only = op == IoOp::Read;
    if data.iter().any(|d| d.is_write_only() != want_write_only) {
        return Err(RequestError::WrongDirection);
    }
    let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    if !total.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::PartialSector(total));
    }
    let sectors = total >> SECTOR_SHIFT;
    if sector
        .checked_add(sectors)
        .is_none_or(|end| end > disk.capacity_sectors)
    {
        return Err(RequestError::OutOfRange {
            sector,
            len: sectors,
            capacity: disk.capacity_sectors,
        });
    }
    Ok(sector << SECTOR_SHIFT)
}

fn io_error(err: &std::io::Error) -> RequestError {
    RequestError::Io(err.raw_os_error().unwrap_or(libc::EIO))
}

/// The Sync engine: carries out `io` on `file` now, on the calling thread.
pub fn run_sync(mem: &GuestMemoryMmap, io: &IoRequest, file: &File) -> Result<(), RequestError> {
    if io.op == IoOp::Flush {
        return file.sync_data().map_err(|e| io_error(&e));
    }
    let mut offset = io.offset;
    for &(addr, len) in &io.buffers {
        let len = len as usize;
        let slice = mem
            .get_slice(addr, len)
            .map_err(|_| RequestError::BadGuestAddress(addr.0))?;
        if io.op == IoOp::Read {
            // The read below goes through a raw pointer, which vm-memory cannot see: mark the
            // pages for diff snapshots (all of them, even if the read fails part way).
            slice.bitmap().mark_dirty(0, len);
        }
        let mut done = 0usize;
        while done < len {
            let ptr = slice.ptr_guard_mut();
            // SAFETY: `ptr` points at `len` bytes of guest memory that vm-memory checked are
            // mapped; the kernel reads or writes at most `len - done` bytes from `done` on, and
            // the mapping outlives the call (we hold the guard).
            let n = unsafe {
                let at = ptr.as_ptr().add(done).cast::<libc::c_void>();
                let remaining = len - done;
                let file_offset = (offset + done as u64) as libc::off_t;
                match io.op {
                    IoOp::Read => libc::pread(file.as_raw_fd(), at, remaining, file_offset),
                    _ => libc::pwrite(file.as_raw_fd(), at, remaining, file_offset),
                }
            };
            match n {
                n if n > 0 => done += n as usize,
                // The file is shorter than its size said (truncated under us): fail, not spin.
                0 => return Err(RequestError::Io(libc::EIO)),
                _ => {
                    let err = std::io::Error::last_os_error();
                    if err.raw_os_error() != Some(libc::EINTR) {
                        return Err(io_error(&err));
                    }
                }
            }
        }
        offset += len as u64;
    }
    Ok(())
}

/// The bytes a request moves, for the rate limiter's bandwidth bucket: the data buffers of a
/// read or a write; 0 for other requests and for chains too malformed to say (they fail
/// without touching the disk).
pub fn data_bytes(mem: &GuestMemoryMmap, descriptors: &[Descriptor]) -> u64 {
    let [header, data @ .., _status] = descriptors else {
        return 0;
    };
    match mem.read_obj::<u32>(header.addr()) {
        Ok(VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT) => data.iter().map(|d| u64::from(d.len())).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an engine still has to do after a short transfer: the buffers past the bytes done,
    /// the first one cut, at the file offset those bytes reached.
    #[test]
    fn the_remainder_of_a_short_transfer_starts_where_it_stopped() {
        let io = IoRequest {
            op: IoOp::Read,
            offset: 4096,
            buffers: vec![(GuestAddress(0x1000), 512), (GuestAddress(0x8000), 1024)],
            status_addr: GuestAddress(0x9000),
        };
        assert_eq!(io.len(), 1536);
        let rest = io.remainder(700);
        assert_eq!(rest.offset, 4096 + 700);
        assert_eq!(rest.buffers, vec![(GuestAddress(0x8000 + 188), 836)]);
        assert_eq!(rest.len(), 836);
        assert_eq!(io.remainder(0), io);
        let cut_in_first = io.remainder(12);
        assert_eq!(
            cut_in_first.buffers,
            vec![
                (GuestAddress(0x1000 + 12), 500),
                (GuestAddress(0x8000), 1024)
            ]
        );
        assert!(io.remainder(1536).buffers.is_empty());
    }
}
