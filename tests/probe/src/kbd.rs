//! The i8042 keyboard by polling: enable the keyboard port as Linux does, then read the bytes
//! the keyboard delivers (Ctrl-Alt-Del from the monitor's API) as the status register shows
//! them. Interrupts stay off (IF is clear at CPL 3), so IRQ 1 is raised but never taken.

use crate::port::{inb, outb};

const DATA: u16 = 0x60;
const STATUS: u16 = 0x64;
const COMMAND: u16 = 0x64;
const STATUS_OBF: u8 = 0x01;
const STATUS_IBF: u8 = 0x02;
const CMD_READ_CONTROL: u8 = 0x20;
const CMD_WRITE_CONTROL: u8 = 0x60;
const CONTROL_KBD_INT: u8 = 0x01;
const CONTROL_KBD_DISABLE: u8 = 0x10;
/// Polls of the status register while the controller answers a command.
const COMMAND_POLLS: u32 = 100_000;
/// The most bytes one step collects.
pub const MAX_BYTES: usize = 64;

/// Why the keyboard could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KbdError {
    /// The controller never took a command byte (input buffer stayed full).
    Busy,
    /// The controller did not answer a read of its control byte.
    NoAnswer,
}

fn wait_writable() -> Result<(), KbdError> {
    for _ in 0..COMMAND_POLLS {
        if inb(STATUS) & STATUS_IBF == 0 {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(KbdError::Busy)
}

fn wait_readable() -> Result<u8, KbdError> {
    for _ in 0..COMMAND_POLLS {
        if inb(STATUS) & STATUS_OBF != 0 {
            return Ok(inb(DATA));
        }
        core::hint::spin_loop();
    }
    Err(KbdError::NoAnswer)
}

/// Reads the control byte and writes it back with the keyboard enabled and its interrupt on,
/// as Linux's i8042 driver does when it enables the keyboard port; returns the byte written.
pub fn enable() -> Result<u8, KbdError> {
    wait_writable()?;
    outb(COMMAND, CMD_READ_CONTROL);
    let control = wait_readable()?;
    let control = (control & !CONTROL_KBD_DISABLE) | CONTROL_KBD_INT;
    wait_writable()?;
    outb(COMMAND, CMD_WRITE_CONTROL);
    wait_writable()?;
    outb(DATA, control);
    Ok(control)
}

/// Reads bytes into `bytes` as they arrive, polling the status register up to `polls` times
/// (with a short pause between polls, to leave the host some room); returns how many came.
pub fn read_bytes(bytes: &mut [u8], polls: u64) -> usize {
    let mut got = 0;
    for _ in 0..polls {
        if got == bytes.len() {
            break;
        }
        if inb(STATUS) & STATUS_OBF != 0 {
            bytes[got] = inb(DATA);
            got += 1;
            continue;
        }
        for _ in 0..100 {
            core::hint::spin_loop();
        }
    }
    got
}

/// Bytes shown as space-separated two-digit hex.
pub struct Hex<'a>(pub &'a [u8]);

impl core::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}
