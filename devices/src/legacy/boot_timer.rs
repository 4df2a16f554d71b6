//! Firecracker's boot timer: the guest writes the byte 123 at the start of this MMIO page when
//! it has booted, and the monitor logs how long that took since the monitor process started.

use std::time::Instant;

use log::info;

use crate::bus::BusDevice;

/// The value a guest writes to say "booted" (Firecracker's `MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE`).
pub const BOOT_COMPLETE_SIGNAL: u8 = 123;

/// Logs `Guest-boot-time = N us …` when the guest signals boot completion.
pub struct BootTimer {
    start: Instant,
    start_cpu_us: u64,
}

impl BootTimer {
    /// `start` is when the monitor process started; `start_cpu_us` its CPU time then.
    pub fn new(start: Instant, start_cpu_us: u64) -> Self {
        Self {
            start,
            start_cpu_us,
        }
    }
}

/// The process's CPU time (user + system), in microseconds.
pub fn process_cpu_time_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass, which outlives the call.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if ret != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

impl BusDevice for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_COMPLETE_SIGNAL) {
            let wall_us = self.start.elapsed().as_micros();
            let cpu_us = process_cpu_time_us().saturating_sub(self.start_cpu_us);
            info!(
                "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
                wall_us,
                wall_us / 1000,
                cpu_us,
                cpu_us / 1000
            );
        }
    }
}
