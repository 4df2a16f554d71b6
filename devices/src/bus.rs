//! Address-range dispatch for port I/O and MMIO exits.
//!
//! A vCPU thread that exits on an access looks the address up here and calls the device's
//! `read` or `write` with the offset into its range. The same type serves both the port-I/O
//! space and the MMIO space.

use std::collections::BTreeMap;

use crate::sync::lock;
use std::sync::{Arc, Mutex};

/// A device that answers guest accesses to a range of addresses.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` into the device's range starting at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` into the device's range starting at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range at {base:#x} with length {len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range at {base:#x} with length {len:#x} overlaps a device already there")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A map from non-overlapping address ranges to devices.
#[derive(Clone, Default)]
pub struct Bus {
    /// Keyed by the range's base address.
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_previous = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(prev_base, prev)| prev_base + prev.len > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64, access_len: usize) -> Option<(u64, u64, &Entry)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // An access that starts inside a device but runs past its end belongs to no device.
        let last = offset.checked_add(access_len.max(1) as u64 - 1)?;
        (last < entry.len).then_some((*base, offset, entry))
    }

    /// Dispatches a guest read; returns false when no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, offset, entry)) => {
                lock(&entry.device).read(base, offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write; returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, offset, entry)) => {
                lock(&entry.device).write(base, offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last_write = Some((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_offset_into_the_range() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(device.clone(), 0x3f8, 8).unwrap();
        let mut byte = [0u8; 1];
        assert!(bus.read(0x3fd, &mut byte));
        assert_eq!(byte, [5]);
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(device.lock().unwrap().last_write, Some((0x3f8, 1, vec![7])));
    }

    #[test]
    fn accesses_outside_or_across_a_range_miss() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x1000, 0x10)
            .unwrap();
        assert!(!bus.write(0xfff, &[0]));
        assert!(!bus.write(0x1010, &[0]));
        assert!(!bus.write(0x100e, &[0; 4]));
        assert!(bus.write(0x100c, &[0; 4]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x1000, 0x100).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x10ff, 1),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev(), 0xf00, 0x101),
            Err(BusError::Overlap {
                base: 0xf00,
                len: 0x101
            })
        );
        assert_eq!(
            bus.insert(dev(), 0x2000, 0),
            Err(BusError::InvalidRange {
                base: 0x2000,
                len: 0
            })
        );
        assert_eq!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        bus.insert(dev(), 0x1100, 0x100).unwrap();
        bus.insert(dev(), 0xf00, 0x100).unwrap();
    }
}
