//! A polling virtio-balloon driver: it gives the device ranges of the probe's own memory by
//! 4 KiB frame number (inflate), takes them back (deflate), follows the host's target, reports
//! free ranges, posts one statistics buffer, and can act as a hostile driver.

use core::ptr::addr_of_mut;

use crate::port::{read_phys, write_phys};
use crate::virtio::{self, Descriptor, QueueMemory, Ring, VirtioError, DESC_F_WRITE, F_VERSION_1};

const TYPE_BALLOON: u32 = 5;
const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_REPORTING: u64 = 1 << 5;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Frame numbers per descriptor: the most the device takes in one.
const PFNS_PER_DESC: usize = 1 << 16;
/// Configuration space: num_pages, then actual.
const CONFIG_NUM_PAGES: u64 = 0;
const CONFIG_ACTUAL: u64 = 4;
/// Statistics tags: free and total memory.
const STAT_MEMFREE: u16 = 4;
const STAT_MEMTOT: u16 = 5;
/// Polls of a used ring before a request counts as lost.
const POLLS: u64 = 400_000_000;
/// A page the hostile cases must leave as it is: at 40 MiB, below what the tests inflate.
const SENTINEL: u64 = 40 * MIB;

#[repr(C, align(4096))]
struct Pfns([u32; PFNS_PER_DESC]);

#[repr(C, align(16))]
struct Stats([u8; 20]);

static mut PFNS: Pfns = Pfns([0; PFNS_PER_DESC]);
static mut STATS: Stats = Stats([0; 20]);
static mut INFLATE_QUEUE: QueueMemory = QueueMemory::new();
static mut DEFLATE_QUEUE: QueueMemory = QueueMemory::new();
static mut STATS_QUEUE: QueueMemory = QueueMemory::new();
static mut REPORTING_QUEUE: QueueMemory = QueueMemory::new();

pub struct Balloon {
    base: u64,
    features: u64,
    inflate: Ring,
    deflate: Ring,
    reporting: Option<Ring>,
    /// Pages in the balloon, as the probe told the device.
    actual: u32,
}

/// Starts the balloon in `slot` with every feature it offers, and posts a statistics buffer
/// (total memory `ram_bytes`, free memory half of it) when it has the queue.
pub fn start(slot: u64, ram_bytes: u64) -> Result<Balloon, VirtioError> {
    let wanted = F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING;
    let (base, features) = virtio::negotiate(slot, TYPE_BALLOON, wanted)?;
    // SAFETY: the probe is single-threaded and starts the balloon at most once; each queue's
    // memory goes to exactly one Ring.
    let (inflate, deflate, stats, reporting) = unsafe {
        (
            &mut *addr_of_mut!(INFLATE_QUEUE),
            &mut *addr_of_mut!(DEFLATE_QUEUE),
            &mut *addr_of_mut!(STATS_QUEUE),
            &mut *addr_of_mut!(REPORTING_QUEUE),
        )
    };
    let inflate = Ring::set_up(base, 0, inflate)?;
    let deflate = Ring::set_up(base, 1, deflate)?;
    // The queues a driver has are numbered densely.
    let mut next = 2;
    let mut stats_ring = None;
    if features & F_STATS_VQ != 0 {
        stats_ring = Some(Ring::set_up(base, next, stats)?);
        next += 1;
    }
    let reporting = match features & F_REPORTING {
        0 => None,
        _ => Some(Ring::set_up(base, next, reporting)?),
    };
    virtio::driver_ok(base)?;
    if let Some(mut ring) = stats_ring {
        let buffer = addr_of_mut!(STATS) as u64;
        for (i, (tag, value)) in [(STAT_MEMTOT, ram_bytes), (STAT_MEMFREE, ram_bytes / 2)]
            .into_iter()
            .enumerate()
        {
            let at = buffer + i as u64 * 10;
            write_phys(at, tag);
            write_phys(at + 2, value.to_le_bytes());
        }
        // Held by the device: returned at each poll, and the probe does not post it again.
        ring.set_descriptor(
            0,
            Descriptor {
                addr: buffer,
                len: 20,
                flags: 0,
                next: 0,
            },
        );
        ring.publish(0);
        ring.kick(base);
    }
    Ok(Balloon {
        base,
        features,
        inflate,
        deflate,
        reporting,
        actual: 0,
    })
}

/// Writes every page of `[at, at + len)` so that the host backs it.
pub fn touch(at: u64, len: u64) {
    let mut addr = at;
    while addr < at + len {
        write_phys(addr, addr | 1);
        addr += PAGE;
    }
}

/// Sends one descriptor on `ring` and waits for the device to return it.
fn send(ring: &mut Ring, base: u64, desc: Descriptor) -> Result<(), VirtioError> {
    ring.set_descriptor(0, desc);
    ring.publish(0);
    ring.kick(base);
    for _ in 0..POLLS {
        if ring.poll_used().is_some() {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(VirtioError::Timeout)
}

impl Balloon {
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn target(&self) -> u32 {
        virtio::read_config_stable(self.base, CONFIG_NUM_PAGES)
    }

    pub fn actual(&self) -> u32 {
        self.actual
    }

    fn set_actual(&mut self, pages: u32) {
        self.actual = pages;
        write_phys(self.base + virtio::REG_CONFIG + CONFIG_ACTUAL, pages);
    }

    /// Gives the device the frame numbers of `[at, at + len)` (inflate) or takes them back
    /// (deflate), as many to a descriptor as the device takes; returns the pages.
    pub fn pages(&mut self, inflate: bool, at: u64, len: u64) -> Result<u32, VirtioError> {
        let first = (at / PAGE) as u32;
        let count = (len / PAGE) as u32;
        let pfns = addr_of_mut!(PFNS) as u64;
        let mut done = 0;
        while done < count {
            let n = (count - done).min(PFNS_PER_DESC as u32);
            for i in 0..n {
                write_phys(pfns + u64::from(i) * 4, first + done + i);
            }
            let desc = Descriptor {
                addr: pfns,
                len: n * 4,
                flags: 0,
                next: 0,
            };
            match inflate {
                true => send(&mut self.inflate, self.base, desc)?,
                false => send(&mut self.deflate, self.base, desc)?,
            }
            done += n;
        }
        let actual = match inflate {
            true => self.actual.saturating_add(count),
            false => self.actual.saturating_sub(count),
        };
        self.set_actual(actual);
        Ok(count)
    }

    /// Reports `[at, at + len)` as free memory (one device-writable descriptor, as Linux does).
    pub fn report(&mut self, at: u64, len: u64) -> Result<(), VirtioError> {
        let base = self.base;
        let ring = self
            .reporting
            .as_mut()
            .ok_or(VirtioError::FeaturesRefused)?;
        let desc = Descriptor {
            addr: at,
            len: len as u32,
            flags: DESC_F_WRITE,
            next: 0,
        };
        send(ring, base, desc)
    }

    /// Forgets configuration changes so far; returns the generation to wait past.
    pub fn settle(&self) -> u32 {
        virtio::ack_config_change(self.base);
        virtio::config_generation(self.base)
    }

    /// Waits (up to `polls` polls) for the host to change the target past `generation`, then
    /// inflates or deflates pages from `at` up so that the balloon holds the target; returns it.
    pub fn follow(&mut self, at: u64, generation: u32, polls: u64) -> Result<u32, VirtioError> {
        virtio::wait_config_change(self.base, generation, polls)?;
        let target = self.target();
        let actual = u64::from(self.actual);
        let wanted = u64::from(target);
        if wanted > actual {
            self.pages(true, at + actual * PAGE, (wanted - actual) * PAGE)?;
        } else if wanted < actual {
            self.pages(false, at + wanted * PAGE, (actual - wanted) * PAGE)?;
        }
        Ok(target)
    }

    /// One malformed inflate request (`beyond`: frame numbers past the end of RAM at `top`;
    /// `twice`: one page listed many times; `huge`: a descriptor claiming almost 4 GiB;
    /// `oob`: a descriptor outside memory); returns whether the sentinel page is intact.
    pub fn hostile(&mut self, case: &[u8], top: u64) -> Option<Result<bool, VirtioError>> {
        let pfns = addr_of_mut!(PFNS) as u64;
        let top_pfn = (top / PAGE) as u32;
        let (addr, len) = match case {
            b"beyond" => {
                for (i, pfn) in [top_pfn, top_pfn + 1, top_pfn + 4096, u32::MAX]
                    .into_iter()
                    .enumerate()
                {
                    write_phys(pfns + i as u64 * 4, pfn);
                }
                (pfns, 16)
            }
            b"twice" => {
                // The page after the sentinel, a thousand times.
                for i in 0..1000u64 {
                    write_phys(pfns + i * 4, (SENTINEL / PAGE + 1) as u32);
                }
                (pfns, 4000)
            }
            b"huge" => (pfns, 0xffff_fffc),
            b"oob" => (top + 16 * MIB, 4096),
            _ => return None,
        };
        let desc = Descriptor {
            addr,
            len,
            flags: 0,
            next: 0,
        };
        Some(send(&mut self.inflate, self.base, desc).map(|()| sentinel_intact()))
    }
}

/// Fills the sentinel page with its pattern.
pub fn write_sentinel() {
    for i in 0..PAGE / 8 {
        write_phys(SENTINEL + i * 8, 0x5a5a_0000_0000_0000 | i);
    }
}

fn sentinel_intact() -> bool {
    (0..PAGE / 8).all(|i| read_phys::<u64>(SENTINEL + i * 8) == 0x5a5a_0000_0000_0000 | i)
}
