//! COM1 by polling: transmit when the holding register is empty, receive when data is ready.

use crate::port::{inb, outb};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 1;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// Polls of LSR before writing anyway: a monitor's UART may never report busy.
const TX_SPINS: u32 = 100_000;

pub struct Serial;

impl Serial {
    pub fn write_byte(&mut self, byte: u8) {
        for _ in 0..TX_SPINS {
            if inb(LSR) & LSR_THR_EMPTY != 0 {
                break;
            }
        }
        outb(COM1, byte);
    }

    /// Waits for one received byte.
    pub fn read_byte(&mut self) -> u8 {
        while inb(LSR) & LSR_DATA_READY == 0 {
            core::hint::spin_loop();
        }
        inb(COM1)
    }
}

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for byte in s.bytes() {
            self.write_byte(byte);
        }
        Ok(())
    }
}

/// Prints one `probe: …` line.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut serial = $crate::serial::Serial;
        let _ = serial.write_str("probe: ");
        let _ = core::write!(serial, $($arg)*);
        let _ = serial.write_str("\n");
    }};
}
