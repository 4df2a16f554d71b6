//! The devices an aarch64 guest finds besides virtio: the console's 16550-compatible UART and
//! the PL031 RTC, both on the MMIO bus where the device tree says. There is no port I/O and
//! no i8042: the guest powers off and resets through PSCI, which KVM turns into system-event
//! exits, and `SendCtrlAltDel` has no keyboard to type on.

use std::sync::{Arc, Mutex};

use devices::legacy::rtc::{RtcDevice, RtcDeviceState};
use devices::legacy::serial::SerialDevice;
use devices::{Bus, BusError};
use kvm_ioctls::{VcpuExit, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::layout::{RTC_SIZE, RTC_START, SERIAL_IRQ, SERIAL_SIZE, SERIAL_START};
use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
pub enum LegacyDeviceError {
    #[error("cannot route IRQ {irq} of {what} to an eventfd: {source}")]
    Irqfd {
        what: &'static str,
        irq: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot place {what} on the MMIO bus: {source}")]
    Bus {
        what: &'static str,
        source: BusError,
    },
    #[error("SendCtrlAltDel does not exist on aarch64: the guest has no i8042 keyboard controller (stop it with PSCI SYSTEM_OFF from inside, or end the monitor)")]
    NoKeyboard,
}

/// What a snapshot keeps of this arch's own devices (the console's UART is common to every
/// arch and saved beside it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LegacyDevicesState {
    pub rtc: RtcDeviceState,
}

pub struct LegacyDevices {
    rtc: Arc<Mutex<RtcDevice>>,
}

/// What a vCPU thread needs for exits only this arch has: none (everything is MMIO).
#[derive(Clone)]
pub struct VcpuIo;

impl LegacyDevices {
    /// Puts `serial` and the RTC on `mmio_bus`. The guest's reset requests come as PSCI
    /// system events, not through a device, so `_reset_evt` has nothing to do here.
    pub fn create(
        vm: &VmFd,
        mmio_bus: &mut Bus,
        serial: Arc<Mutex<SerialDevice>>,
        serial_irq: &EventFd,
        _reset_evt: EventFd,
    ) -> Result<Self, LegacyDeviceError> {
        let bus = |what| move |source| LegacyDeviceError::Bus { what, source };
        vm.register_irqfd(serial_irq, SERIAL_IRQ)
            .map_err(|source| LegacyDeviceError::Irqfd {
                what: "the serial port",
                irq: SERIAL_IRQ,
                source,
            })?;
        mmio_bus
            .insert(serial, SERIAL_START, SERIAL_SIZE)
            .map_err(bus("the serial port"))?;
        let rtc = Arc::new(Mutex::new(RtcDevice::new()));
        mmio_bus
            .insert(rtc.clone(), RTC_START, RTC_SIZE)
            .map_err(bus("the RTC"))?;
        Ok(Self { rtc })
    }

    pub fn vcpu_io(&self) -> VcpuIo {
        VcpuIo
    }

    /// Refused: see [`LegacyDeviceError::NoKeyboard`].
    pub fn send_ctrl_alt_del(&self) -> Result<(), LegacyDeviceError> {
        Err(LegacyDeviceError::NoKeyboard)
    }

    pub fn save_state(&self) -> LegacyDevicesState {
        LegacyDevicesState {
            rtc: lock(&self.rtc).state(),
        }
    }

    pub fn restore_state(&self, state: &LegacyDevicesState) -> Result<(), LegacyDeviceError> {
        *lock(&self.rtc) = RtcDevice::from_state(&state.rtc);
        Ok(())
    }
}

/// Every exit an aarch64 vCPU makes is common to all arches: give it back.
pub fn handle_exit<'a>(exit: VcpuExit<'a>, _io: &VcpuIo) -> Option<VcpuExit<'a>> {
    Some(exit)
}
