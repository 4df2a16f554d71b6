//! Legacy devices: the 16550 UART (on COM1 on x86_64, on MMIO on aarch64), the i8042 reset
//! line (x86_64), the PL031 real-time clock (aarch64), and the boot timer.

pub mod boot_timer;
pub mod i8042;
pub mod rtc;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// A vm-superio [`Trigger`](vm_superio::Trigger) that writes an [`EventFd`]: an irqfd for
/// interrupt lines, or an event the monitor's loop waits on (the i8042 reset).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl std::ops::Deref for EventFdTrigger {
    type Target = EventFd;

    fn deref(&self) -> &EventFd {
        &self.0
    }
}
