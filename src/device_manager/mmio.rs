//! MMIO slots and interrupt lines for virtio-mmio devices, handed out in order from the arch's
//! window: the order is what guests see (`vda` before `eth0`), so it never depends on anything
//! but the order of attaching.

use crate::arch::{MmioDeviceInfo, IRQ_BASE, IRQ_MAX, MMIO_SLOT_SIZE, VIRTIO_MMIO_START};

use super::DeviceError;

#[derive(Debug, Default)]
pub struct MmioSlots {
    taken: Vec<MmioDeviceInfo>,
}

impl MmioSlots {
    /// The next free slot and its IRQ line.
    pub fn allocate(&mut self) -> Result<MmioDeviceInfo, DeviceError> {
        let index = self.taken.len() as u32;
        let irq = IRQ_BASE + index;
        if irq > IRQ_MAX {
            return Err(DeviceError::OutOfIrqs {
                max: IRQ_MAX - IRQ_BASE + 1,
            });
        }
        let slot = MmioDeviceInfo {
            addr: VIRTIO_MMIO_START + u64::from(index) * MMIO_SLOT_SIZE,
            len: MMIO_SLOT_SIZE,
            irq,
        };
        self.taken.push(slot);
        Ok(slot)
    }

    /// Every slot handed out, in order.
    pub fn taken(&self) -> &[MmioDeviceInfo] {
        &self.taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_each_other_until_the_irqs_run_out() {
        let mut slots = MmioSlots::default();
        let first = slots.allocate().unwrap();
        let second = slots.allocate().unwrap();
        assert_eq!(first.addr, VIRTIO_MMIO_START);
        assert_eq!(second.addr, VIRTIO_MMIO_START + MMIO_SLOT_SIZE);
        assert_eq!((first.irq, second.irq), (IRQ_BASE, IRQ_BASE + 1));
        while slots.taken().len() <= (IRQ_MAX - IRQ_BASE) as usize {
            slots.allocate().unwrap();
        }
        assert!(matches!(
            slots.allocate(),
            Err(DeviceError::OutOfIrqs { .. })
        ));
    }
}
