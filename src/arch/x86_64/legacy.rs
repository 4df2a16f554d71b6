//! The PC devices an x86_64 guest finds on the port-I/O bus: the 16550 UART at COM1 (the
//! console) and the i8042 (its reset line ends the VM; Ctrl-Alt-Del is typed on its keyboard).
//! vCPU exits for port I/O come here too, since only x86 has them.

use std::sync::{Arc, Mutex};

use devices::legacy::i8042::{I8042Error, I8042State, I8042};
use devices::legacy::serial::SerialDevice;
use devices::legacy::EventFdTrigger;
use devices::{Bus, BusError};
use kvm_ioctls::{VcpuExit, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::layout::{COM1_IRQ, COM1_PORT, COM1_PORT_LEN, I8042_IRQ, I8042_PORT, I8042_PORT_LEN};
use crate::metrics::METRICS;
use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
pub enum LegacyDeviceError {
    #[error("cannot create {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot route IRQ {irq} of {what} to an eventfd: {source}")]
    Irqfd {
        what: &'static str,
        irq: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot place {what} on the port-I/O bus: {source}")]
    Bus {
        what: &'static str,
        source: BusError,
    },
    #[error("i8042: {0}")]
    I8042(#[from] I8042Error),
}

/// What a snapshot keeps of this arch's own devices (the console's UART is common to every
/// arch and saved beside it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LegacyDevicesState {
    pub i8042: I8042State,
}

/// The port-I/O devices of a running VM.
pub struct LegacyDevices {
    pio_bus: Arc<Bus>,
    i8042: Arc<Mutex<I8042>>,
}

/// What a vCPU thread needs for the exits only this arch has: the port-I/O bus.
#[derive(Clone)]
pub struct VcpuIo {
    pio_bus: Arc<Bus>,
}

fn event(what: &'static str) -> Result<EventFd, LegacyDeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| LegacyDeviceError::Io { what, source })
}

fn irqfd(vm: &VmFd, evt: &EventFd, irq: u32, what: &'static str) -> Result<(), LegacyDeviceError> {
    vm.register_irqfd(evt, irq)
        .map_err(|source| LegacyDeviceError::Irqfd { what, irq, source })
}

impl LegacyDevices {
    /// Puts `serial` at COM1 (IRQ 4) and an i8042 whose reset line writes `reset_evt` at
    /// 0x60-0x64 (IRQ 1), both on a port-I/O bus of their own (nothing goes on `_mmio_bus`).
    pub fn create(
        vm: &VmFd,
        _mmio_bus: &mut Bus,
        serial: Arc<Mutex<SerialDevice>>,
        serial_irq: &EventFd,
        reset_evt: EventFd,
    ) -> Result<Self, LegacyDeviceError> {
        let bus = |what| move |source| LegacyDeviceError::Bus { what, source };
        let mut pio_bus = Bus::new();
        irqfd(vm, serial_irq, COM1_IRQ, "the serial port")?;
        pio_bus
            .insert(serial, COM1_PORT, COM1_PORT_LEN)
            .map_err(bus("the serial port"))?;
        let kbd_irq = event("the keyboard IRQ event")?;
        irqfd(vm, &kbd_irq, I8042_IRQ, "the i8042")?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            EventFdTrigger::new(reset_evt),
            EventFdTrigger::new(kbd_irq),
        )));
        pio_bus
            .insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)
            .map_err(bus("the i8042"))?;
        Ok(Self {
            pio_bus: Arc::new(pio_bus),
            i8042,
        })
    }

    /// What each vCPU thread needs of these devices.
    pub fn vcpu_io(&self) -> VcpuIo {
        VcpuIo {
            pio_bus: self.pio_bus.clone(),
        }
    }

    /// Types Ctrl-Alt-Del on the guest's keyboard (`SendCtrlAltDel`).
    pub fn send_ctrl_alt_del(&self) -> Result<(), LegacyDeviceError> {
        lock(&self.i8042).trigger_ctrl_alt_del()?;
        METRICS.i8042.ctrl_alt_del_count.inc();
        Ok(())
    }

    pub fn save_state(&self) -> LegacyDevicesState {
        LegacyDevicesState {
            i8042: lock(&self.i8042).state(),
        }
    }

    pub fn restore_state(&self, state: &LegacyDevicesState) -> Result<(), LegacyDeviceError> {
        Ok(lock(&self.i8042).restore(&state.i8042)?)
    }
}

/// Serves a vCPU exit that only x86 has (port I/O); gives any other exit back.
pub fn handle_exit<'a>(exit: VcpuExit<'a>, io: &VcpuIo) -> Option<VcpuExit<'a>> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            METRICS.vcpu.exit_io_in.inc();
            if !io.pio_bus.read(u64::from(port), data) {
                // Nothing decodes this port: the bus floats high, as on real hardware.
                data.fill(0xff);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            METRICS.vcpu.exit_io_out.inc();
            io.pio_bus.write(u64::from(port), data);
            None
        }
        other => Some(other),
    }
}
