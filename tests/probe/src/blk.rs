//! A polling virtio-blk driver: read, write, flush, get-id, and a hostile mode that hands the
//! device malformed chains and then checks it still serves (or asks for a reset).

use core::ptr::addr_of_mut;

use crate::port::{read_phys, write_phys};
use crate::virtio::{
    Descriptor, Device, QueueMemory, VirtioError, DESC_F_NEXT, DESC_F_WRITE, F_VERSION_1,
    QUEUE_SIZE, STATUS_NEEDS_RESET,
};

const TYPE_BLOCK: u32 = 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
pub const SECTOR: usize = 512;
/// The largest transfer one request makes.
pub const DATA_MAX: usize = 1 << 20;
/// An address no guest of these tests has memory at.
const NOWHERE: u64 = 0xdead_0000_0000;

#[repr(C, align(4096))]
struct Buffers {
    header: [u32; 4],
    status: u8,
    _pad: [u8; 4096 - 17],
    data: [u8; DATA_MAX],
}

static mut QUEUE: QueueMemory = QueueMemory::new();

static mut BUFFERS: Buffers = Buffers {
    header: [0; 4],
    status: 0,
    _pad: [0; 4096 - 17],
    data: [0; DATA_MAX],
};

fn buffers() -> *mut Buffers {
    addr_of_mut!(BUFFERS)
}

/// Byte `offset` of `sector` in the test pattern for `seed` (the tests compute the same).
pub fn pattern(sector: u64, offset: usize, seed: u64) -> u8 {
    (sector.wrapping_mul(31) ^ (offset as u64).wrapping_mul(7) ^ seed) as u8
}

pub struct Blk {
    device: Device,
    pub capacity: u64,
    pub read_only: bool,
}

/// A request's outcome: the status byte and the used length the device reported.
pub struct Done {
    pub status: u8,
    pub used_len: u32,
}

impl Blk {
    pub fn start(slot: u64) -> Result<Self, VirtioError> {
        // SAFETY: the probe is single-threaded and starts the block device once per step
        // sequence; the queue memory is handed to exactly one Device at a time.
        let queue = unsafe { &mut *addr_of_mut!(QUEUE) };
        let (device, features) = Device::start(
            slot,
            TYPE_BLOCK,
            F_VERSION_1 | F_FLUSH | F_RO | F_DISCARD | F_WRITE_ZEROES,
            queue,
        )?;
        let capacity = device.config::<u64>(0);
        Ok(Self {
            device,
            capacity,
            read_only: features & F_RO != 0,
        })
    }

    /// Sets the device up, makes a read of `sectors` sectors at `sector` available and
    /// notifies *before* DRIVER_OK, then starts the device and waits for the read: the device
    /// must serve what was made available before it was started.
    pub fn start_with_early_read(
        slot: u64,
        sector: u64,
        sectors: usize,
    ) -> Result<(Self, Done), VirtioError> {
        // SAFETY: as in `start`: one Device at a time owns the queue memory.
        let queue = unsafe { &mut *addr_of_mut!(QUEUE) };
        let (device, features) = Device::set_up(slot, TYPE_BLOCK, F_VERSION_1 | F_RO, queue)?;
        let capacity = device.config::<u64>(0);
        let mut blk = Self {
            device,
            capacity,
            read_only: features & F_RO != 0,
        };
        let len = (sectors * SECTOR).min(DATA_MAX) as u32;
        Self::set_header(T_IN, sector);
        let mut chain = [
            Self::header_desc(),
            Descriptor {
                addr: Self::data_addr(),
                len,
                flags: DESC_F_WRITE,
                next: 0,
            },
            Self::status_desc(),
        ];
        blk.device.submit(&mut chain);
        crate::virtio::driver_ok(blk.device.base)?;
        let done = blk.finish()?;
        Ok((blk, done))
    }

    fn header_addr() -> u64 {
        // SAFETY: only the address is taken.
        unsafe { addr_of_mut!((*buffers()).header) as u64 }
    }

    fn status_addr() -> u64 {
        // SAFETY: only the address is taken.
        unsafe { addr_of_mut!((*buffers()).status) as u64 }
    }

    pub fn data_addr() -> u64 {
        // SAFETY: only the address is taken.
        unsafe { addr_of_mut!((*buffers()).data) as u64 }
    }

    fn set_header(request_type: u32, sector: u64) {
        let header = Self::header_addr();
        write_phys(header, request_type);
        write_phys(header + 4, 0u32);
        write_phys(header + 8, sector);
        write_phys(Self::status_addr(), 0xffu8);
    }

    fn finish(&mut self) -> Result<Done, VirtioError> {
        let used_len = self.device.wait_used()?;
        Ok(Done {
            status: read_phys(Self::status_addr()),
            used_len,
        })
    }

    fn header_desc() -> Descriptor {
        Descriptor {
            addr: Self::header_addr(),
            len: 16,
            flags: 0,
            next: 0,
        }
    }

    fn status_desc() -> Descriptor {
        Descriptor {
            addr: Self::status_addr(),
            len: 1,
            flags: DESC_F_WRITE,
            next: 0,
        }
    }

    /// Reads or writes `sectors` sectors at `sector` through the data buffer.
    pub fn transfer(
        &mut self,
        write: bool,
        sector: u64,
        sectors: usize,
    ) -> Result<Done, VirtioError> {
        let len = (sectors * SECTOR).min(DATA_MAX) as u32;
        Self::set_header(if write { T_OUT } else { T_IN }, sector);
        let data_flags = if write { 0 } else { DESC_F_WRITE };
        let mut chain = [
            Self::header_desc(),
            Descriptor {
                addr: Self::data_addr(),
                len,
                flags: data_flags,
                next: 0,
            },
            Self::status_desc(),
        ];
        self.device.submit(&mut chain);
        self.finish()
    }

    /// Discards, or writes zeros over (with `unmap`: may free the space), `sectors` sectors at
    /// `sector`: one segment in the data buffer.
    pub fn discard_or_zero(
        &mut self,
        discard: bool,
        sector: u64,
        sectors: u32,
        unmap: bool,
    ) -> Result<Done, VirtioError> {
        Self::set_header(if discard { T_DISCARD } else { T_WRITE_ZEROES }, 0);
        let segment = Self::data_addr();
        write_phys(segment, sector);
        write_phys(segment + 8, sectors);
        write_phys(segment + 12, u32::from(unmap));
        let mut chain = [
            Self::header_desc(),
            Descriptor {
                addr: segment,
                len: 16,
                flags: 0,
                next: 0,
            },
            Self::status_desc(),
        ];
        self.device.submit(&mut chain);
        self.finish()
    }

    pub fn flush(&mut self) -> Result<Done, VirtioError> {
        Self::set_header(T_FLUSH, 0);
        let mut chain = [Self::header_desc(), Self::status_desc()];
        self.device.submit(&mut chain);
        self.finish()
    }

    pub fn get_id(&mut self) -> Result<(Done, [u8; 20]), VirtioError> {
        Self::set_header(T_GET_ID, 0);
        let mut chain = [
            Self::header_desc(),
            Descriptor {
                addr: Self::data_addr(),
                len: 20,
                flags: DESC_F_WRITE,
                next: 0,
            },
            Self::status_desc(),
        ];
        self.device.submit(&mut chain);
        let done = self.finish()?;
        let id: [u8; 20] = read_phys(Self::data_addr());
        Ok((done, id))
    }

    pub fn fill_pattern(sector: u64, sectors: usize, seed: u64) {
        let base = Self::data_addr();
        for s in 0..sectors.min(DATA_MAX / SECTOR) {
            for i in 0..SECTOR {
                write_phys(
                    base + (s * SECTOR + i) as u64,
                    pattern(sector + s as u64, i, seed),
                );
            }
        }
    }

    /// The first offset in the data buffer that differs from the pattern.
    pub fn check_pattern(sector: u64, sectors: usize, seed: u64) -> Option<usize> {
        let base = Self::data_addr();
        (0..sectors.min(DATA_MAX / SECTOR) * SECTOR).find(|&at| {
            read_phys::<u8>(base + at as u64)
                != pattern(sector + (at / SECTOR) as u64, at % SECTOR, seed)
        })
    }

    /// The device's registers, for waiting on configuration changes.
    pub fn base(&self) -> u64 {
        self.device.base
    }

    pub fn needs_reset(&self) -> bool {
        self.device.status() & STATUS_NEEDS_RESET != 0
    }

    /// Submits the malformed request `case`; None for an unknown case.
    pub fn hostile(&mut self, case: &[u8]) -> Option<Result<Done, VirtioError>> {
        Self::set_header(T_IN, 0);
        let data = Self::data_addr();
        let head = self.device.next_desc_index();
        let link = |i: u16| (head + i) % QUEUE_SIZE;
        let mut chain = match case {
            // A data buffer where the guest has no memory.
            b"oob" => [
                Self::header_desc(),
                Descriptor {
                    addr: NOWHERE,
                    len: 512,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
                Self::status_desc(),
            ],
            // A read into a buffer the device may only read.
            b"direction" => [
                Self::header_desc(),
                Descriptor {
                    addr: data,
                    len: 512,
                    flags: 0,
                    next: 0,
                },
                Self::status_desc(),
            ],
            // A length no guest has memory for.
            b"huge" => [
                Self::header_desc(),
                Descriptor {
                    addr: data,
                    len: 0xffff_fe00,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
                Self::status_desc(),
            ],
            // A status byte of length zero.
            b"zero-status" => [
                Self::header_desc(),
                Descriptor {
                    addr: data,
                    len: 512,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
                Descriptor {
                    len: 0,
                    ..Self::status_desc()
                },
            ],
            // A status byte the device may not write.
            b"readonly-status" => [
                Self::header_desc(),
                Descriptor {
                    addr: data,
                    len: 512,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
                Descriptor {
                    flags: 0,
                    ..Self::status_desc()
                },
            ],
            // Three descriptors that point at each other forever.
            b"loop" => {
                let chain = [
                    Descriptor {
                        next: link(1),
                        flags: DESC_F_NEXT,
                        ..Self::header_desc()
                    },
                    Descriptor {
                        addr: data,
                        len: 512,
                        flags: DESC_F_WRITE | DESC_F_NEXT,
                        next: link(2),
                    },
                    Descriptor {
                        next: link(0),
                        flags: DESC_F_WRITE | DESC_F_NEXT,
                        ..Self::status_desc()
                    },
                ];
                self.device.submit_raw(&chain);
                return Some(self.finish());
            }
            // A next index beyond the queue.
            b"next-out-of-range" => {
                let chain = [Descriptor {
                    next: 200,
                    flags: DESC_F_NEXT,
                    ..Self::header_desc()
                }];
                self.device.submit_raw(&chain);
                return Some(self.finish());
            }
            _ => return None,
        };
        self.device.submit(&mut chain);
        Some(self.finish())
    }
}

/// Requests the bench keeps in flight at most (three descriptors each).
pub const BENCH_DEPTH_MAX: usize = 64;

#[repr(C, align(4096))]
struct BenchSlots {
    headers: [[u64; 2]; BENCH_DEPTH_MAX],
    status: [u8; BENCH_DEPTH_MAX],
}

static mut BENCH_SLOTS: BenchSlots = BenchSlots {
    headers: [[0; 2]; BENCH_DEPTH_MAX],
    status: [0; BENCH_DEPTH_MAX],
};

/// What a bench run did.
pub struct BenchResult {
    pub requests: u64,
    pub errors: u64,
}

impl Blk {
    /// Moves `total_bytes` through the device in requests of `request_sectors`, sequentially
    /// over the disk, keeping up to `depth` requests in flight (one notification each).
    pub fn bench(
        &mut self,
        write: bool,
        request_sectors: usize,
        total_bytes: u64,
        depth: usize,
    ) -> Result<BenchResult, VirtioError> {
        let request_len = (request_sectors * SECTOR).clamp(SECTOR, DATA_MAX);
        let request_sectors = request_len / SECTOR;
        let depth = depth.clamp(1, BENCH_DEPTH_MAX).min(DATA_MAX / request_len);
        let total = total_bytes / request_len as u64;
        let span = self.capacity.saturating_sub(request_sectors as u64).max(1);
        // SAFETY: only addresses are taken; the probe is single-threaded.
        let (headers, statuses) = unsafe {
            let slots = addr_of_mut!(BENCH_SLOTS);
            (
                addr_of_mut!((*slots).headers) as u64,
                addr_of_mut!((*slots).status) as u64,
            )
        };
        let request_type = if write { T_OUT } else { T_IN };
        let data_flags = if write { 0 } else { DESC_F_WRITE };
        for slot in 0..depth {
            let first = (slot * 3) as u16;
            let header = headers + (slot * 16) as u64;
            write_phys(header, u64::from(request_type));
            self.device.set_descriptor(
                first,
                Descriptor {
                    addr: header,
                    len: 16,
                    flags: DESC_F_NEXT,
                    next: first + 1,
                },
            );
            self.device.set_descriptor(
                first + 1,
                Descriptor {
                    addr: Self::data_addr() + (slot * request_len) as u64,
                    len: request_len as u32,
                    flags: data_flags | DESC_F_NEXT,
                    next: first + 2,
                },
            );
            self.device.set_descriptor(
                first + 2,
                Descriptor {
                    addr: statuses + slot as u64,
                    len: 1,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            );
        }
        let mut next_sector = 0u64;
        let mut submit = |device: &mut Device, slot: usize| {
            write_phys(headers + (slot * 16) as u64 + 8, next_sector);
            next_sector = (next_sector + request_sectors as u64) % span;
            device.make_available((slot * 3) as u16);
            device.notify();
        };
        let mut submitted = 0u64;
        for slot in 0..depth.min(total as usize) {
            submit(&mut self.device, slot);
            submitted += 1;
        }
        let mut result = BenchResult {
            requests: 0,
            errors: 0,
        };
        while result.requests < total {
            let (head, _) = self.device.wait_used_element()?;
            let slot = usize::from(head) / 3;
            result.requests += 1;
            if read_phys::<u8>(statuses + slot as u64) != 0 {
                result.errors += 1;
            }
            if submitted < total {
                submit(&mut self.device, slot);
                submitted += 1;
            }
        }
        Ok(result)
    }
}
