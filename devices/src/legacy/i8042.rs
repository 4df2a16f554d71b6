//! The i8042 PS/2 controller, reduced to what a microVM guest uses: the CPU reset line
//! (`reboot=k`: the guest writes 0xfe to port 0x64), the control byte a driver reads and
//! writes, and a keyboard that types one thing: Ctrl-Alt-Del (the API's `SendCtrlAltDel`).
//!
//! The device sits on the port bus at 0x60 with two ports: data at offset 0 (0x60) and
//! status/command at offset 4 (0x64). Keyboard bytes reach the guest through a small output
//! buffer; each byte the guest can read raises IRQ 1 when the control byte enables it.

use log::{debug, warn};

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// Offsets of the two ports from the device's base (0x60).
const DATA_PORT: u64 = 0;
const COMMAND_PORT: u64 = 4;

/// Controller commands, written to port 0x64.
const CMD_READ_CONTROL: u8 = 0x20;
const CMD_WRITE_CONTROL: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

/// Answers to the self tests: the controller and the keyboard interface are fine.
const SELF_TEST_OK: u8 = 0x55;
const KBD_TEST_OK: u8 = 0x00;
/// What the keyboard answers to any command sent to it on port 0x60.
const KBD_ACK: u8 = 0xfa;

/// Status register bits (port 0x64, read).
/// Output buffer full: a byte waits at port 0x60.
pub const STATUS_OBF: u8 = 0x01;
/// System flag: the controller passed its power-on self test.
pub const STATUS_SYS: u8 = 0x04;
/// The last byte written went to the command port (0x64) rather than the data port.
pub const STATUS_COMMAND: u8 = 0x08;
/// The keyboard is not inhibited (no key lock).
pub const STATUS_KBD_UNLOCKED: u8 = 0x10;

/// Control byte bits (read with 0x20, written with 0x60).
/// Raise IRQ 1 when a keyboard byte is in the output buffer.
pub const CONTROL_KBD_INT: u8 = 0x01;
/// Mirrors the status register's system flag.
pub const CONTROL_SYS: u8 = 0x04;
/// The keyboard's clock is disabled.
pub const CONTROL_KBD_DISABLE: u8 = 0x10;

/// Scan-code set 2 (untranslated, as Firecracker's controller delivers them): Left Ctrl,
/// Left Alt and Delete (an extended key, 0xe0-prefixed) pressed, then released in reverse
/// order (0xf0 marks a release). The releases are ours: Firecracker sends only the presses,
/// which leaves the keys held in the guest's view, so Linux ignores a second Ctrl-Alt-Del.
pub const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // presses
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, // releases
];

/// Bytes the output buffer holds; room for the whole Ctrl-Alt-Del sequence.
const BUFFER_SIZE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("the keyboard buffer has room for {free} bytes, the key sequence needs {needed}")]
    BufferFull { free: usize, needed: usize },
    #[error("cannot raise the keyboard interrupt: {0}")]
    Interrupt(std::io::Error),
}

/// A bounded FIFO of bytes waiting at port 0x60.
#[derive(Default)]
struct OutputBuffer {
    bytes: [u8; BUFFER_SIZE],
    head: usize,
    len: usize,
}

impl OutputBuffer {
    fn free(&self) -> usize {
        BUFFER_SIZE - self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `bytes` whole, or nothing: half a key sequence would confuse the guest more
    /// than none.
    fn push(&mut self, bytes: &[u8]) -> Result<(), I8042Error> {
        if bytes.len() > self.free() {
            return Err(I8042Error::BufferFull {
                free: self.free(),
                needed: bytes.len(),
            });
        }
        for byte in bytes {
            self.bytes[(self.head + self.len) % BUFFER_SIZE] = *byte;
            self.len += 1;
        }
        Ok(())
    }

    fn pop(&mut self) -> Option<u8> {
        if self.is_empty() {
            return None;
        }
        let byte = self.bytes[self.head];
        self.head = (self.head + 1) % BUFFER_SIZE;
        self.len -= 1;
        Some(byte)
    }

    fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }
}

/// The controller's registers and waiting bytes, for a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub control: u8,
    pub output_port: u8,
    pub pending_command: Option<u8>,
    /// The bytes waiting at port 0x60, oldest first.
    pub output: Vec<u8>,
}

/// The i8042's two ports, 0x60 (data) and 0x64 (command/status), as one bus range from 0x60.
pub struct I8042 {
    reset_evt: EventFdTrigger,
    kbd_irq: EventFdTrigger,
    /// Status bits other than OBF, which follows the output buffer.
    status: u8,
    control: u8,
    output_port: u8,
    /// A command waiting for its parameter byte on port 0x60.
    pending_command: Option<u8>,
    output: OutputBuffer,
}

impl I8042 {
    /// `reset_evt` is written when the guest asks for a CPU reset; `kbd_irq` (the irqfd of
    /// IRQ 1) when a keyboard byte is ready for the guest.
    pub fn new(reset_evt: EventFdTrigger, kbd_irq: EventFdTrigger) -> Self {
        Self {
            reset_evt,
            kbd_irq,
            // As after the firmware's POST: self test passed, keyboard unlocked.
            status: STATUS_SYS | STATUS_KBD_UNLOCKED,
            control: CONTROL_KBD_INT | CONTROL_SYS,
            // Bit 0 deasserts the reset line, bit 1 enables the A20 gate.
            output_port: 0x03,
            pending_command: None,
            output: OutputBuffer::default(),
        }
    }

    /// The controller's state, for a snapshot.
    pub fn state(&self) -> I8042State {
        let output = (0..self.output.len)
            .map(|i| self.output.bytes[(self.output.head + i) % BUFFER_SIZE])
            .collect();
        I8042State {
            status: self.status,
            control: self.control,
            output_port: self.output_port,
            pending_command: self.pending_command,
            output,
        }
    }

    /// Takes the state a snapshot saved.
    pub fn restore(&mut self, state: &I8042State) -> Result<(), I8042Error> {
        self.status = state.status;
        self.control = state.control;
        self.output_port = state.output_port;
        self.pending_command = state.pending_command;
        self.output.clear();
        self.output.push(&state.output)
    }

    /// Types Ctrl-Alt-Del on the keyboard: the guest decides what it means (Linux calls
    /// `ctrl_alt_del()`, which reboots or signals init).
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        self.output.push(&CTRL_ALT_DEL)?;
        self.raise_kbd_irq().map_err(I8042Error::Interrupt)
    }

    /// Pulses IRQ 1 if the guest enabled it and a byte waits. The line is edge-triggered
    /// and the guest's handler reads one byte per interrupt, so every byte needs its own.
    fn raise_kbd_irq(&self) -> std::io::Result<()> {
        if self.control & CONTROL_KBD_INT == 0 || self.output.is_empty() {
            return Ok(());
        }
        self.kbd_irq.write(1)
    }

    fn status(&self) -> u8 {
        let obf = if self.output.is_empty() {
            0
        } else {
            STATUS_OBF
        };
        self.status | obf
    }

    /// A controller's answer replaces whatever the keyboard had queued, so that the driver
    /// reads exactly the answer next. It raises no interrupt: drivers poll for answers.
    fn answer(&mut self, byte: u8) {
        self.output.clear();
        // The buffer is empty: one byte always fits.
        let _ = self.output.push(&[byte]);
    }

    fn read_data(&mut self) -> u8 {
        // An empty buffer reads as 0, like a controller whose latch holds nothing new.
        let byte = self.output.pop().unwrap_or(0);
        if let Err(err) = self.raise_kbd_irq() {
            warn!("i8042: cannot raise the keyboard interrupt: {err}");
        }
        byte
    }

    fn write_command(&mut self, command: u8) {
        self.status |= STATUS_COMMAND;
        self.pending_command = None;
        match command {
            CMD_RESET_CPU => {
                if let Err(err) = self.reset_evt.write(1) {
                    warn!("i8042: cannot signal the guest's reset request: {err}");
                }
            }
            CMD_READ_CONTROL => self.answer(self.control),
            CMD_READ_OUTPUT_PORT => self.answer(self.output_port),
            CMD_WRITE_CONTROL | CMD_WRITE_OUTPUT_PORT => self.pending_command = Some(command),
            CMD_SELF_TEST => self.answer(SELF_TEST_OK),
            CMD_KBD_TEST => self.answer(KBD_TEST_OK),
            CMD_KBD_DISABLE => self.control |= CONTROL_KBD_DISABLE,
            CMD_KBD_ENABLE => self.control &= !CONTROL_KBD_DISABLE,
            other => debug!("i8042: ignored command {other:#04x}"),
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.status &= !STATUS_COMMAND;
        match self.pending_command.take() {
            Some(CMD_WRITE_CONTROL) => {
                // The system flag is the controller's, not the driver's, to change.
                self.control = (byte & !CONTROL_SYS) | (self.control & CONTROL_SYS);
                if let Err(err) = self.raise_kbd_irq() {
                    warn!("i8042: cannot raise the keyboard interrupt: {err}");
                }
            }
            Some(_) => self.output_port = byte,
            None => {
                // A command for the keyboard itself (LEDs, typematic rate, scan-code set…):
                // a keyboard with nothing to configure acknowledges them all.
                self.output.clear();
                let _ = self.output.push(&[KBD_ACK]);
                if let Err(err) = self.raise_kbd_irq() {
                    warn!("i8042: cannot raise the keyboard interrupt: {err}");
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        // Both ports are a byte wide; wider accesses read as nothing.
        let [byte] = data else {
            data.fill(0xff);
            return;
        };
        *byte = match offset {
            DATA_PORT => self.read_data(),
            COMMAND_PORT => self.status(),
            _ => 0xff,
        };
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let [byte] = data else {
            debug!("i8042: ignored {}-byte write at {offset:#x}", data.len());
            return;
        };
        match offset {
            DATA_PORT => self.write_data(*byte),
            COMMAND_PORT => self.write_command(*byte),
            _ => debug!("i8042: ignored write of {byte:#04x} at {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    struct Fixture {
        i8042: I8042,
        reset: EventFd,
        irq: EventFd,
    }

    fn fixture() -> Fixture {
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let i8042 = I8042::new(
            EventFdTrigger::new(reset.try_clone().unwrap()),
            EventFdTrigger::new(irq.try_clone().unwrap()),
        );
        Fixture { i8042, reset, irq }
    }

    impl Fixture {
        fn inb(&mut self, offset: u64) -> u8 {
            let mut data = [0u8];
            self.i8042.read(0x60, offset, &mut data);
            data[0]
        }

        fn outb(&mut self, offset: u64, value: u8) {
            self.i8042.write(0x60, offset, &[value]);
        }

        /// How many times IRQ 1 was pulsed since the last call.
        fn irqs(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }

        /// Reads port 0x60 while the status register says a byte waits.
        fn drain(&mut self) -> Vec<u8> {
            let mut bytes = Vec::new();
            while self.inb(COMMAND_PORT) & STATUS_OBF != 0 {
                bytes.push(self.inb(DATA_PORT));
                assert!(bytes.len() <= BUFFER_SIZE, "OBF never cleared");
            }
            bytes
        }
    }

    #[test]
    fn reset_command_signals_the_reset_event() {
        let mut f = fixture();
        f.outb(COMMAND_PORT, CMD_READ_CONTROL);
        assert!(f.reset.read().is_err(), "only 0xfe is a reset");
        f.outb(COMMAND_PORT, CMD_RESET_CPU);
        assert_eq!(f.reset.read().unwrap(), 1);
        // On the data port 0xfe is a keyboard command, not a reset.
        f.outb(DATA_PORT, CMD_RESET_CPU);
        assert!(f.reset.read().is_err());
    }

    #[test]
    fn control_byte_round_trips_and_keeps_the_system_flag() {
        let mut f = fixture();
        f.outb(COMMAND_PORT, CMD_READ_CONTROL);
        assert_eq!(f.inb(COMMAND_PORT) & STATUS_OBF, STATUS_OBF);
        assert_eq!(f.inb(DATA_PORT), CONTROL_KBD_INT | CONTROL_SYS);
        assert_eq!(f.inb(COMMAND_PORT) & STATUS_OBF, 0);

        f.outb(COMMAND_PORT, CMD_WRITE_CONTROL);
        assert_ne!(f.inb(COMMAND_PORT) & STATUS_COMMAND, 0);
        f.outb(DATA_PORT, 0x40 | CONTROL_KBD_DISABLE);
        assert_eq!(f.inb(COMMAND_PORT) & STATUS_COMMAND, 0);
        f.outb(COMMAND_PORT, CMD_READ_CONTROL);
        assert_eq!(f.inb(DATA_PORT), 0x40 | CONTROL_KBD_DISABLE | CONTROL_SYS);
        // The parameter was taken: the next data byte is a keyboard command again.
        f.outb(DATA_PORT, 0xed);
        assert_eq!(f.inb(DATA_PORT), KBD_ACK);
        assert_ne!(f.inb(COMMAND_PORT) & STATUS_SYS, 0);
    }

    #[test]
    fn self_tests_pass_and_keyboard_enable_clears_the_disable_bit() {
        let mut f = fixture();
        f.outb(COMMAND_PORT, CMD_SELF_TEST);
        assert_eq!(f.inb(DATA_PORT), SELF_TEST_OK);
        f.outb(COMMAND_PORT, CMD_KBD_TEST);
        assert_eq!(f.inb(DATA_PORT), KBD_TEST_OK);
        f.outb(COMMAND_PORT, CMD_KBD_DISABLE);
        f.outb(COMMAND_PORT, CMD_READ_CONTROL);
        assert_ne!(f.inb(DATA_PORT) & CONTROL_KBD_DISABLE, 0);
        f.outb(COMMAND_PORT, CMD_KBD_ENABLE);
        f.outb(COMMAND_PORT, CMD_READ_CONTROL);
        assert_eq!(f.inb(DATA_PORT) & CONTROL_KBD_DISABLE, 0);
    }

    #[test]
    fn ctrl_alt_del_reads_back_in_order_with_an_interrupt_per_byte() {
        let mut f = fixture();
        assert_eq!(f.inb(COMMAND_PORT) & STATUS_OBF, 0);
        f.i8042.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.irqs(), 1);
        let mut bytes = Vec::new();
        let mut irqs = 0;
        while f.inb(COMMAND_PORT) & STATUS_OBF != 0 {
            bytes.push(f.inb(DATA_PORT));
            irqs += f.irqs();
        }
        assert_eq!(
            bytes,
            [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
        // One more pulse for every byte still waiting after a read.
        assert_eq!(irqs, CTRL_ALT_DEL.len() as u64 - 1);
        assert_eq!(f.inb(DATA_PORT), 0, "an empty buffer reads as 0");
        assert_eq!(f.irqs(), 0);
    }

    #[test]
    fn ctrl_alt_del_without_interrupts_enabled_is_still_readable() {
        let mut f = fixture();
        f.outb(COMMAND_PORT, CMD_WRITE_CONTROL);
        f.outb(DATA_PORT, 0);
        f.i8042.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.irqs(), 0);
        assert_eq!(f.drain(), CTRL_ALT_DEL);
        assert_eq!(f.irqs(), 0);
        // Enabling interrupts with bytes waiting raises one at once.
        f.i8042.trigger_ctrl_alt_del().unwrap();
        f.outb(COMMAND_PORT, CMD_WRITE_CONTROL);
        f.outb(DATA_PORT, CONTROL_KBD_INT);
        assert_eq!(f.irqs(), 1);
    }

    #[test]
    fn a_full_buffer_refuses_the_whole_sequence() {
        let mut f = fixture();
        f.i8042.trigger_ctrl_alt_del().unwrap();
        match f.i8042.trigger_ctrl_alt_del() {
            Err(I8042Error::BufferFull { free, needed }) => {
                assert_eq!((free, needed), (BUFFER_SIZE - CTRL_ALT_DEL.len(), 11));
            }
            other => panic!("{other:?}"),
        }
        // Nothing of the refused sequence was queued; once read, another one fits.
        assert_eq!(f.drain(), CTRL_ALT_DEL);
        f.i8042.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.drain(), CTRL_ALT_DEL);
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let mut f = fixture();
        f.i8042.write(0x60, COMMAND_PORT, &[CMD_RESET_CPU, 0]);
        assert!(f.reset.read().is_err());
        let mut data = [0u8; 2];
        f.i8042.read(0x60, COMMAND_PORT, &mut data);
        assert_eq!(data, [0xff, 0xff]);
    }
}
