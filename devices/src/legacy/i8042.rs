//! The i8042 keyboard controller, reduced to what a microVM guest uses: the CPU reset line
//! (`reboot=k`: the guest writes 0xfe to port 0x64).

use log::warn;
use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// The i8042's two ports, 0x60 (data) and 0x64 (command/status), as one bus range from 0x60.
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// `reset_evt` is written when the guest asks for a CPU reset.
    pub fn new(reset_evt: EventFdTrigger) -> Self {
        Self {
            inner: I8042Device::new(reset_evt),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.inner.read(offset);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(err) = self.inner.write(offset, *byte) {
                warn!("i8042: cannot signal the guest's reset request: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    #[test]
    fn reset_command_signals_the_reset_event() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut i8042 = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        i8042.write(0x60, 4, &[0x20]);
        assert!(evt.read().is_err(), "only 0xfe is a reset");
        i8042.write(0x60, 4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
