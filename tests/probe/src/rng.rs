//! A polling virtio-rng driver: two reads of up to a page, reported as their used lengths and
//! whether the bytes look random (not all one value, and the two reads differ).

use core::ptr::addr_of_mut;

use crate::port::read_phys;
use crate::virtio::{Descriptor, Device, QueueMemory, VirtioError, DESC_F_WRITE, F_VERSION_1};

const TYPE_RNG: u32 = 4;
/// The most one read asks for.
pub const READ_MAX: usize = 4096;

#[repr(C, align(4096))]
struct Buffers([[u8; READ_MAX]; 2]);

static mut QUEUE: QueueMemory = QueueMemory::new();
static mut BUFFERS: Buffers = Buffers([[0; READ_MAX]; 2]);

/// Where the device writes: the two read buffers and the used ring (`rng-where`).
pub fn addresses() -> (u64, u64) {
    // Only the addresses are taken: no reference to the statics is made.
    let used = addr_of_mut!(QUEUE) as u64 + core::mem::offset_of!(QueueMemory, used) as u64;
    (addr_of_mut!(BUFFERS) as u64, used)
}

/// What two reads of `len` bytes got.
pub struct Reads {
    pub used: [u32; 2],
    pub varied: bool,
    pub differ: bool,
}

/// Starts the rng device in `slot`.
fn start(slot: u64) -> Result<Device, VirtioError> {
    // SAFETY: the probe is single-threaded and starts the rng device at most once per step
    // sequence; the queue memory is handed to exactly one Device.
    let queue = unsafe { &mut *addr_of_mut!(QUEUE) };
    Ok(Device::start(slot, TYPE_RNG, F_VERSION_1, queue)?.0)
}

/// Starts the device in `slot` and reads `len` bytes twice into two buffers.
pub fn read_twice(slot: u64, len: usize) -> Result<Reads, VirtioError> {
    let len = len.clamp(1, READ_MAX);
    let mut device = start(slot)?;
    // Only the address is taken: no reference to the static is made.
    let base = addr_of_mut!(BUFFERS) as u64;
    let mut used = [0u32; 2];
    for (i, used) in used.iter_mut().enumerate() {
        let mut chain = [Descriptor {
            addr: base + (i * READ_MAX) as u64,
            len: len as u32,
            flags: DESC_F_WRITE,
            next: 0,
        }];
        device.submit(&mut chain);
        *used = device.wait_used()?;
    }
    let byte = |buffer: usize, at: usize| read_phys::<u8>(base + (buffer * READ_MAX + at) as u64);
    let first = byte(0, 0);
    let varied = (0..len).any(|at| byte(0, at) != first);
    let differ = (0..len).any(|at| byte(0, at) != byte(1, at));
    Ok(Reads {
        used,
        varied,
        differ,
    })
}

/// The benchmark: starts the device in `slot`, makes `warm` requests of `len` bytes, calls
/// `started`, then makes `count` more one after another (each waited for); the bytes the
/// device gave those.
pub fn bench(
    slot: u64,
    len: usize,
    count: u64,
    warm: u64,
    started: impl FnOnce(),
) -> Result<u64, VirtioError> {
    let len = len.clamp(1, READ_MAX);
    let mut device = start(slot)?;
    let base = addr_of_mut!(BUFFERS) as u64;
    let mut request = || {
        let mut chain = [Descriptor {
            addr: base,
            len: len as u32,
            flags: DESC_F_WRITE,
            next: 0,
        }];
        device.submit(&mut chain);
        device.wait_used()
    };
    for _ in 0..warm {
        request()?;
    }
    started();
    let mut bytes = 0u64;
    for _ in 0..count {
        bytes += u64::from(request()?);
    }
    Ok(bytes)
}
