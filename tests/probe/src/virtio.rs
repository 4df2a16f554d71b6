//! A polling virtio-mmio driver core: register access, feature negotiation one status bit at a
//! time, and one split queue in the probe's own memory (identity-mapped, so its addresses are
//! guest-physical). No interrupts: the probe polls the used ring from CPL 3.

use crate::port::{read_phys, write_phys};

/// First virtio-mmio slot and the distance between slots (the monitor's layout).
pub const MMIO_BASE: u64 = 0xc000_1000;
pub const MMIO_SLOT: u64 = 0x1000;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

/// InterruptStatus bit: the configuration space changed.
pub const INTERRUPT_CONFIG: u32 = 2;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const F_VERSION_1: u64 = 1 << 32;

/// The driver polls: the device need not interrupt (VRING_AVAIL_F_NO_INTERRUPT).
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// The device is busy with the ring and will look again (VRING_USED_F_NO_NOTIFY).
const USED_F_NO_NOTIFY: u32 = 1;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// Entries in the probe's queue: room for 85 three-descriptor requests in flight.
pub const QUEUE_SIZE: u16 = 256;
/// Polls of the used ring before a request counts as lost (a few seconds at native speed).
const POLL_LIMIT: u64 = 200_000_000;

#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// The three parts of a split queue, each on its own pages.
#[repr(C, align(4096))]
pub struct QueueMemory {
    pub desc: [Descriptor; QUEUE_SIZE as usize],
    /// flags, idx, ring[QUEUE_SIZE], used_event
    pub avail: AvailRing,
    /// flags (u16) idx (u16), then {id u32, len u32} elements, then avail_event.
    pub used: UsedRing,
}

#[repr(C, align(4096))]
pub struct AvailRing(pub [u16; 3 + QUEUE_SIZE as usize]);

#[repr(C, align(4096))]
pub struct UsedRing(pub [u32; 2 + 2 * QUEUE_SIZE as usize]);

impl QueueMemory {
    pub const fn new() -> Self {
        Self {
            desc: [Descriptor {
                addr: 0,
                len: 0,
                flags: 0,
                next: 0,
            }; QUEUE_SIZE as usize],
            avail: AvailRing([0; 3 + QUEUE_SIZE as usize]),
            used: UsedRing([0; 2 + 2 * QUEUE_SIZE as usize]),
        }
    }
}

/// Why a device could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioError {
    NoDevice,
    WrongDevice(u32),
    FeaturesRefused,
    QueueTooSmall,
    NotStarted(u32),
    Timeout,
}

pub struct Device {
    pub base: u64,
    queue: &'static mut QueueMemory,
    next_avail: u16,
    last_used: u16,
    next_desc: u16,
}

fn reg(base: u64, offset: u64) -> u32 {
    read_phys(base + offset)
}

fn set_reg(base: u64, offset: u64, value: u32) {
    write_phys(base + offset, value);
}

/// The registers of the device in `slot`.
pub fn slot_base(slot: u64) -> u64 {
    MMIO_BASE + slot * MMIO_SLOT
}

pub fn config_generation(base: u64) -> u32 {
    reg(base, REG_CONFIG_GENERATION)
}

/// Reads `T` from the configuration space, again if the device changed it meanwhile (the
/// generation differs after the read), so the value is never half old and half new.
pub fn read_config_stable<T: Copy>(base: u64, offset: u64) -> T {
    loop {
        let before = config_generation(base);
        let value = read_phys(base + REG_CONFIG + offset);
        if config_generation(base) == before {
            return value;
        }
    }
}

/// Forgets a configuration change already signalled, so that waiting sees only a new one.
pub fn ack_config_change(base: u64) {
    set_reg(base, REG_INTERRUPT_ACK, INTERRUPT_CONFIG);
}

/// Waits until the device's configuration differs from `generation` or it raises the
/// configuration-change interrupt (polled up to `polls` times), and acknowledges that.
pub fn wait_config_change(base: u64, generation: u32, polls: u64) -> Result<(), VirtioError> {
    for _ in 0..polls {
        let changed = reg(base, REG_INTERRUPT_STATUS) & INTERRUPT_CONFIG != 0
            || config_generation(base) != generation;
        if changed {
            ack_config_change(base);
            return Ok(());
        }
        // Each poll is an exit to the monitor: leave it some room between them.
        for _ in 0..100 {
            core::hint::spin_loop();
        }
    }
    Err(VirtioError::Timeout)
}

impl Device {
    /// Finds a device of `device_type` in `slot` and brings it up with `features`, one status
    /// bit at a time.
    pub fn start(
        slot: u64,
        device_type: u32,
        wanted_features: u64,
        queue: &'static mut QueueMemory,
    ) -> Result<(Self, u64), VirtioError> {
        let (device, features) = Self::set_up(slot, device_type, wanted_features, queue)?;
        driver_ok(device.base)?;
        Ok((device, features))
    }

    /// [`Device::start`] short of DRIVER_OK: the queue is set up and ready, the device not yet
    /// started (a driver may make requests available before it says DRIVER_OK).
    pub fn set_up(
        slot: u64,
        device_type: u32,
        wanted_features: u64,
        queue: &'static mut QueueMemory,
    ) -> Result<(Self, u64), VirtioError> {
        let (base, features) = negotiate(slot, device_type, wanted_features)?;
        set_reg(base, REG_QUEUE_SEL, 0);
        if reg(base, REG_QUEUE_NUM_MAX) < u32::from(QUEUE_SIZE) {
            return Err(VirtioError::QueueTooSmall);
        }
        queue.avail.0.fill(0);
        queue.avail.0[0] = AVAIL_F_NO_INTERRUPT;
        queue.used.0.fill(0);
        let desc = queue.desc.as_ptr() as u64;
        let avail = queue.avail.0.as_ptr() as u64;
        let used = queue.used.0.as_ptr() as u64;
        set_reg(base, REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
        set_reg(base, REG_QUEUE_DESC_LOW, desc as u32);
        set_reg(base, REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        set_reg(base, REG_QUEUE_DRIVER_LOW, avail as u32);
        set_reg(base, REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        set_reg(base, REG_QUEUE_DEVICE_LOW, used as u32);
        set_reg(base, REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        set_reg(base, REG_QUEUE_READY, 1);
        let device = Self {
            base,
            queue,
            next_avail: 0,
            last_used: 0,
            next_desc: 0,
        };
        Ok((device, features))
    }

    pub fn status(&self) -> u32 {
        reg(self.base, REG_STATUS)
    }

    pub fn config<T: Copy>(&self, offset: u64) -> T {
        read_phys(self.base + REG_CONFIG + offset)
    }

    /// Puts `chain` (descriptors linked in order unless a descriptor says otherwise with
    /// `next` set explicitly by the caller) in the table and makes its head available.
    pub fn submit_raw(&mut self, chain: &[Descriptor]) {
        let head = self.next_desc;
        for (i, desc) in chain.iter().enumerate() {
            let index = (head as usize + i) % QUEUE_SIZE as usize;
            write_phys(&self.queue.desc[index] as *const _ as u64, *desc);
        }
        self.next_desc = (head + chain.len() as u16) % QUEUE_SIZE;
        self.make_available(head);
        self.notify();
    }

    /// Puts a chain whose descriptors are already in the table in the available ring.
    pub fn make_available(&mut self, head: u16) {
        let slot = 2 + (self.next_avail % QUEUE_SIZE) as usize;
        write_phys(&self.queue.avail.0[slot] as *const u16 as u64, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        write_phys(&self.queue.avail.0[1] as *const u16 as u64, self.next_avail);
    }

    /// Tells the device about new buffers, unless it said it is already looking.
    pub fn notify(&self) {
        // The new available index must be visible before the flags are read, or the device
        // could clear NO_NOTIFY, miss the new buffers and never hear of them (x86 reorders a
        // later load before an earlier store).
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        let used_flags: u32 = read_phys(self.queue.used.0.as_ptr() as u64);
        if used_flags & USED_F_NO_NOTIFY == 0 {
            set_reg(self.base, REG_QUEUE_NOTIFY, 0);
        }
    }

    /// Writes descriptor `index` of the table.
    pub fn set_descriptor(&mut self, index: u16, desc: Descriptor) {
        write_phys(&self.queue.desc[index as usize] as *const _ as u64, desc);
    }

    /// Links `chain` in order (NEXT flags and indexes) and submits it.
    pub fn submit(&mut self, chain: &mut [Descriptor]) {
        let head = self.next_desc;
        let last = chain.len() - 1;
        for (i, desc) in chain.iter_mut().enumerate() {
            if i < last {
                desc.flags |= DESC_F_NEXT;
                desc.next = (head + i as u16 + 1) % QUEUE_SIZE;
            } else {
                desc.flags &= !DESC_F_NEXT;
            }
        }
        self.submit_raw(chain);
    }

    /// The index of the next chain's head, for callers that link chains themselves.
    pub fn next_desc_index(&self) -> u16 {
        self.next_desc
    }

    /// Waits for the device to use one more chain; returns its used length.
    pub fn wait_used(&mut self) -> Result<u32, VirtioError> {
        self.wait_used_element().map(|(_, len)| len)
    }

    /// Waits for the device to use one more chain; returns its head and used length.
    pub fn wait_used_element(&mut self) -> Result<(u16, u32), VirtioError> {
        let idx_addr = self.queue.used.0.as_ptr() as u64 + 2;
        for _ in 0..POLL_LIMIT {
            let used_idx: u16 = read_phys(idx_addr);
            if used_idx != self.last_used {
                let slot = (self.last_used % QUEUE_SIZE) as usize;
                let id: u32 = read_phys(&self.queue.used.0[1 + 2 * slot] as *const u32 as u64);
                let len: u32 = read_phys(&self.queue.used.0[2 + 2 * slot] as *const u32 as u64);
                self.last_used = self.last_used.wrapping_add(1);
                return Ok((id as u16, len));
            }
            core::hint::spin_loop();
        }
        Err(VirtioError::Timeout)
    }
}

/// One split queue of a device with several queues, driven by polling. Drivers that need one
/// queue use [`Device`]; those with more bring the device up with [`negotiate`], set up a
/// `Ring` per queue, and finish with [`driver_ok`].
pub struct Ring {
    mem: &'static mut QueueMemory,
    index: u32,
    next_avail: u16,
    last_used: u16,
}

impl Ring {
    /// Queue `index` of the device at `base`, in `mem`, registered with the device.
    pub fn set_up(
        base: u64,
        index: u32,
        mem: &'static mut QueueMemory,
    ) -> Result<Self, VirtioError> {
        set_reg(base, REG_QUEUE_SEL, index);
        if reg(base, REG_QUEUE_NUM_MAX) < u32::from(QUEUE_SIZE) {
            return Err(VirtioError::QueueTooSmall);
        }
        mem.avail.0.fill(0);
        mem.avail.0[0] = AVAIL_F_NO_INTERRUPT;
        mem.used.0.fill(0);
        set_reg(base, REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
        for (low, addr) in [
            (REG_QUEUE_DESC_LOW, mem.desc.as_ptr() as u64),
            (REG_QUEUE_DRIVER_LOW, mem.avail.0.as_ptr() as u64),
            (REG_QUEUE_DEVICE_LOW, mem.used.0.as_ptr() as u64),
        ] {
            set_reg(base, low, addr as u32);
            set_reg(base, low + 4, (addr >> 32) as u32);
        }
        set_reg(base, REG_QUEUE_READY, 1);
        Ok(Self {
            mem,
            index,
            next_avail: 0,
            last_used: 0,
        })
    }

    pub fn set_descriptor(&mut self, index: u16, desc: Descriptor) {
        write_phys(&self.mem.desc[usize::from(index)] as *const _ as u64, desc);
    }

    /// Makes chain `head` available, without telling the device (see [`Ring::kick`]).
    pub fn publish(&mut self, head: u16) {
        let slot = 2 + (self.next_avail % QUEUE_SIZE) as usize;
        write_phys(&self.mem.avail.0[slot] as *const u16 as u64, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        // The ring entry must be visible before the index that publishes it.
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        write_phys(&self.mem.avail.0[1] as *const u16 as u64, self.next_avail);
    }

    /// Tells the device at `base` of new buffers, unless it said it is looking already.
    pub fn kick(&self, base: u64) {
        // As in `Device::notify`: the index must be visible before the flags are read.
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        let used_flags: u32 = read_phys(self.mem.used.0.as_ptr() as u64);
        if used_flags & USED_F_NO_NOTIFY == 0 {
            set_reg(base, REG_QUEUE_NOTIFY, self.index);
        }
    }

    /// The next chain the device returned (head, used length), if any.
    pub fn poll_used(&mut self) -> Option<(u16, u32)> {
        let used_idx: u16 = read_phys(self.mem.used.0.as_ptr() as u64 + 2);
        if used_idx == self.last_used {
            return None;
        }
        // The element is read only after the index said it is there.
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        let slot = (self.last_used % QUEUE_SIZE) as usize;
        let id: u32 = read_phys(&self.mem.used.0[1 + 2 * slot] as *const u32 as u64);
        let len: u32 = read_phys(&self.mem.used.0[2 + 2 * slot] as *const u32 as u64);
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }
}

/// Finds a device of `device_type` in `slot`, resets it and negotiates `wanted_features`, one
/// status bit at a time up to FEATURES_OK; returns its registers' base and the features.
pub fn negotiate(
    slot: u64,
    device_type: u32,
    wanted_features: u64,
) -> Result<(u64, u64), VirtioError> {
    let base = slot_base(slot);
    if reg(base, REG_MAGIC) != 0x7472_6976 || reg(base, REG_VERSION) != 2 {
        return Err(VirtioError::NoDevice);
    }
    let id = reg(base, REG_DEVICE_ID);
    if id != device_type {
        return Err(VirtioError::WrongDevice(id));
    }
    set_reg(base, REG_STATUS, 0);
    set_reg(base, REG_STATUS, STATUS_ACKNOWLEDGE);
    set_reg(base, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    set_reg(base, REG_DEVICE_FEATURES_SEL, 0);
    let low = u64::from(reg(base, REG_DEVICE_FEATURES));
    set_reg(base, REG_DEVICE_FEATURES_SEL, 1);
    let offered = low | u64::from(reg(base, REG_DEVICE_FEATURES)) << 32;
    let features = offered & wanted_features;
    set_reg(base, REG_DRIVER_FEATURES_SEL, 0);
    set_reg(base, REG_DRIVER_FEATURES, features as u32);
    set_reg(base, REG_DRIVER_FEATURES_SEL, 1);
    set_reg(base, REG_DRIVER_FEATURES, (features >> 32) as u32);
    set_reg(
        base,
        REG_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    if reg(base, REG_STATUS) & STATUS_FEATURES_OK == 0 {
        return Err(VirtioError::FeaturesRefused);
    }
    Ok((base, features))
}

/// Sets DRIVER_OK once the queues are set up: the device starts serving them.
pub fn driver_ok(base: u64) -> Result<(), VirtioError> {
    let up_to_features = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    set_reg(base, REG_STATUS, up_to_features | STATUS_DRIVER_OK);
    let status = reg(base, REG_STATUS);
    if status & STATUS_DRIVER_OK == 0 {
        return Err(VirtioError::NotStarted(status));
    }
    Ok(())
}
