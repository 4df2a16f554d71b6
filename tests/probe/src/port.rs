//! Port I/O and MMIO from CPL 3 (IOPL 3 allows `in`/`out`; MMIO pages are user-accessible).

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; IOPL 3 permits it at CPL 3.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags))
    };
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags))
    };
    value
}

/// Reads `T` at a guest-physical address (identity-mapped).
pub fn read_phys<T: Copy>(addr: u64) -> T {
    // SAFETY: the probe's page tables identity-map the first 4 GiB, user-accessible; callers
    // pass addresses the monitor's boot protocol defines.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// Writes `T` at a guest-physical address (identity-mapped).
pub fn write_phys<T: Copy>(addr: u64, value: T) {
    // SAFETY: as for `read_phys`.
    unsafe { core::ptr::write_volatile(addr as *mut T, value) }
}
