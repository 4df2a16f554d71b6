//! DISCARD and WRITE_ZEROES requests: the guest gives back or zeroes a range of sectors, and the
//! host file follows with `fallocate` (a punched hole frees the space and reads back as zeros).
//! One segment per request (the configuration space says so), checked like any other request.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::Bytes;

use super::request::{Disk, RequestError, SECTOR_SHIFT};

/// `struct virtio_blk_discard_write_zeroes`: sector (u64), num_sectors (u32), flags (u32).
const SEGMENT_SIZE: u32 = 16;
/// The most sectors one request may cover (2 GiB), announced in the configuration space.
pub const MAX_SECTORS: u32 = 1 << 22;
/// Segments per request, announced in the configuration space.
pub const MAX_SEGMENTS: u32 = 1;
/// Sectors a discard should be aligned to (4 KiB pages: Linux's discard granularity).
pub const SECTOR_ALIGNMENT: u32 = 8;
/// A buffer of zeros for files that cannot zero a range in place.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Carries out a DISCARD (`request_type` VIRTIO_BLK_T_DISCARD) or WRITE_ZEROES request whose
/// data descriptors are `data`.
pub fn discard_or_zero(
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    disk: &Disk,
    request_type: u32,
) -> Result<(), RequestError> {
    if disk.read_only {
        return Err(RequestError::ReadOnly);
    }
    let [segment] = data else {
        return Err(RequestError::ChainTooShort);
    };
    if segment.is_write_only() {
        return Err(RequestError::WrongDirection);
    }
    if segment.len() != SEGMENT_SIZE {
        return Err(RequestError::BadSegment(segment.len()));
    }
    let bad_address = |_| RequestError::BadGuestAddress(segment.addr().0);
    let raw: [u8; SEGMENT_SIZE as usize] = mem.read_obj(segment.addr()).map_err(bad_address)?;
    let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
    let sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
    let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    // DISCARD has no flags; WRITE_ZEROES only UNMAP (virtio 1.2, 5.2.6.2).
    let allowed = match request_type {
        VIRTIO_BLK_T_DISCARD => 0,
        _ => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    };
    if flags & !allowed != 0 {
        return Err(RequestError::Unsupported(request_type));
    }
    if sectors > MAX_SECTORS
        || sector
            .checked_add(u64::from(sectors))
            .is_none_or(|end| end > disk.capacity_sectors)
    {
        return Err(RequestError::OutOfRange {
            sector,
            len: u64::from(sectors),
            capacity: disk.capacity_sectors,
        });
    }
    let offset = sector << SECTOR_SHIFT;
    let len = u64::from(sectors) << SECTOR_SHIFT;
    if len == 0 {
        return Ok(());
    }
    match request_type {
        VIRTIO_BLK_T_DISCARD => {
            // Discarding is a hint: a file that cannot punch holes keeps its data, and the
            // guest, which was not promised zeros, cannot tell.
            match punch_hole(disk.file, offset, len) {
                Ok(()) => Ok(()),
                Err(errno) if errno == libc::EOPNOTSUPP => Ok(()),
                Err(errno) => Err(RequestError::Io(errno)),
            }
        }
        VIRTIO_BLK_T_WRITE_ZEROES => {
            // Reads must return zeros afterwards whichever way is taken; a hole is preferred
            // when the guest allows it, as it also gives the space back.
            let first = if unmap {
                punch_hole(disk.file, offset, len)
            } else {
                zero_range(disk.file, offset, len)
            };
            match first {
                Ok(()) => Ok(()),
                Err(errno) if errno == libc::EOPNOTSUPP => write_zeros(disk.file, offset, len),
                Err(errno) => Err(RequestError::Io(errno)),
            }
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> Result<(), i32> {
    loop {
        // SAFETY: fallocate only acts on the file behind the descriptor, which `file` keeps
        // open for the duration of the call; offset and length were range-checked by the caller.
        let ret = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if ret == 0 {
            return Ok(());
        }
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if errno != libc::EINTR {
            return Err(errno);
        }
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> Result<(), i32> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

fn zero_range(file: &File, offset: u64, len: u64) -> Result<(), i32> {
    fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Writes zeros over the range: for files whose file system zeroes nothing in place.
fn write_zeros(file: &File, mut offset: u64, len: u64) -> Result<(), RequestError> {
    use std::os::unix::fs::FileExt;
    let end = offset + len;
    while offset < end {
        let chunk = (end - offset).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..chunk], offset)
            .map_err(|err| RequestError::Io(err.raw_os_error().unwrap_or(libc::EIO)))?;
        offset += chunk as u64;
    }
    Ok(())
}
