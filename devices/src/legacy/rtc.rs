//! The PL031 real-time clock (vm-superio's model) on MMIO: an arm64 guest reads the wall-clock
//! time from it at boot. Its alarm interrupt is not emulated (vm-superio's model has none).

use serde::{Deserialize, Serialize};
use vm_superio::rtc_pl031::{NoEvents, RtcState};
use vm_superio::Rtc;

use crate::bus::BusDevice;

/// The PL031's registers are 32 bits wide; other accesses read as zero and are ignored.
const REGISTER_BYTES: usize = 4;

pub struct RtcDevice {
    rtc: Rtc<NoEvents>,
}

/// What a snapshot keeps of the RTC: its load register and offset from the host's clock, so
/// the guest's clock carries on from the host's time, as on real hardware after a suspend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcDeviceState {
    pub lr: u32,
    pub offset: i64,
    pub mr: u32,
    pub imsc: u32,
    pub ris: u32,
}

impl RtcDevice {
    pub fn new() -> Self {
        Self { rtc: Rtc::new() }
    }

    pub fn from_state(state: &RtcDeviceState) -> Self {
        let state = RtcState {
            lr: state.lr,
            offset: state.offset,
            mr: state.mr,
            imsc: state.imsc,
            ris: state.ris,
        };
        Self {
            rtc: Rtc::from_state(&state, NoEvents),
        }
    }

    pub fn state(&self) -> RtcDeviceState {
        let state = self.rtc.state();
        RtcDeviceState {
            lr: state.lr,
            offset: state.offset,
            mr: state.mr,
            imsc: state.imsc,
            ris: state.ris,
        }
    }
}

impl Default for RtcDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for RtcDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (
            <&mut [u8; REGISTER_BYTES]>::try_from(&mut *data),
            u16::try_from(offset),
        ) {
            (Ok(word), Ok(offset)) => self.rtc.read(offset, word),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Ok(word), Ok(offset)) = (
            <&[u8; REGISTER_BYTES]>::try_from(data),
            u16::try_from(offset),
        ) {
            self.rtc.write(offset, word);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_reads_the_host_time_and_survives_a_snapshot() {
        let mut rtc = RtcDevice::new();
        let mut word = [0u8; 4];
        rtc.read(0, 0, &mut word); // RTCDR
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as u32;
        assert!(u32::from_le_bytes(word).abs_diff(now) <= 2);
        // The guest sets the clock back a day: a restored RTC keeps that offset.
        rtc.write(0, 8, &(now - 86_400).to_le_bytes()); // RTCLR
        let mut restored = RtcDevice::from_state(&rtc.state());
        restored.read(0, 0, &mut word);
        assert!(u32::from_le_bytes(word).abs_diff(now - 86_400) <= 2);
        // The PrimeCell ID the Linux driver probes for: 0x31 0x10 0x14 0x00.
        restored.read(0, 0xfe0, &mut word);
        assert_eq!(word[0], 0x31);
        // A byte access is not a register access.
        let mut byte = [0xffu8; 1];
        restored.read(0, 0, &mut byte);
        assert_eq!(byte, [0]);
    }
}
