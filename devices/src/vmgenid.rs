//! The VM Generation ID (Microsoft's "Virtual Machine Generation ID" specification, which
//! Linux's `vmgenid` driver and Firecracker follow): 16 random bytes in guest memory that
//! change whenever the VM is started again from a snapshot, plus an interrupt that tells the
//! guest they did. Linux then reseeds its RNG (`crng reseeded due to virtual machine fork`),
//! so that clones of one snapshot do not share one random state.
//!
//! The device has no registers: the arch tells the guest where the bytes are and which line
//! interrupts (ACPI on x86_64, the device tree on aarch64); the monitor writes a new ID at boot
//! and at every restore, and raises the line after a restore.

use crate::memory::GuestMemoryMmap;
use log::info;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::random::getrandom;

/// The generation ID's length: a 128-bit value.
pub const VMGENID_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("cannot create the VM generation ID's interrupt: {0}")]
    Interrupt(std::io::Error),
    #[error("the host has no randomness for a VM generation ID: {0}")]
    Random(std::io::Error),
    #[error("cannot write the VM generation ID at {addr:#x} in guest memory: {source}")]
    Write {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot notify the guest of its new generation ID: {0}")]
    Notify(std::io::Error),
}

/// Where the generation ID is and which line announces a change: all a snapshot keeps (the ID
/// itself is in guest memory, and a restore replaces it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGenIdState {
    /// Guest-physical address of the 16 bytes (8-byte aligned).
    pub addr: u64,
    /// The interrupt line, as the arch numbers its device lines.
    pub irq: u32,
}

pub struct VmGenId {
    state: VmGenIdState,
    /// Registered as the line's irqfd: a write is one edge.
    irq_evt: EventFd,
    generation: [u8; VMGENID_LEN],
}

impl VmGenId {
    /// A device at `state.addr` and `state.irq`, with a fresh generation ID written to guest
    /// memory.
    pub fn new(state: VmGenIdState, mem: &GuestMemoryMmap) -> Result<Self, VmGenIdError> {
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(VmGenIdError::Interrupt)?;
        let mut device = Self {
            state,
            irq_evt,
            generation: [0; VMGENID_LEN],
        };
        device.write_new_generation(mem)?;
        Ok(device)
    }

    /// Replaces the generation ID in guest memory with new random bytes.
    fn write_new_generation(&mut self, mem: &GuestMemoryMmap) -> Result<(), VmGenIdError> {
        let mut generation = [0u8; VMGENID_LEN];
        getrandom(&mut generation).map_err(VmGenIdError::Random)?;
        mem.write_slice(&generation, GuestAddress(self.state.addr))
            .map_err(|source| VmGenIdError::Write {
                addr: self.state.addr,
                source,
            })?;
        self.generation = generation;
        Ok(())
    }

    /// Tells the guest its generation changed (after a restore, once the VM's interrupt
    /// controllers hold their restored state: the edge waits there until a vCPU runs).
    pub fn notify_guest(&self) -> Result<(), VmGenIdError> {
        self.irq_evt.write(1).map_err(VmGenIdError::Notify)?;
        info!(
            "VM generation ID is now {}; the guest was told",
            hex(&self.generation)
        );
        Ok(())
    }

    pub fn state(&self) -> VmGenIdState {
        self.state
    }

    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    pub fn generation(&self) -> [u8; VMGENID_LEN] {
        self.generation
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn each_device_writes_its_own_random_id_where_it_was_told() {
        let mem = memory();
        let state = VmGenIdState {
            addr: 0xe_0040,
            irq: 23,
        };
        let first = VmGenId::new(state, &mem).unwrap();
        let mut in_memory = [0u8; VMGENID_LEN];
        mem.read_slice(&mut in_memory, GuestAddress(0xe_0040))
            .unwrap();
        assert_eq!(in_memory, first.generation());
        assert_ne!(in_memory, [0; VMGENID_LEN]);
        // A restore makes a new device over the same memory: a new ID replaces the old.
        let second = VmGenId::new(state, &mem).unwrap();
        mem.read_slice(&mut in_memory, GuestAddress(0xe_0040))
            .unwrap();
        assert_eq!(in_memory, second.generation());
        assert_ne!(first.generation(), second.generation());
        assert_eq!(second.state(), state);
    }

    #[test]
    fn a_notification_is_one_edge_on_the_line() {
        let device = VmGenId::new(
            VmGenIdState {
                addr: 0x1000,
                irq: 5,
            },
            &memory(),
        )
        .unwrap();
        device.notify_guest().unwrap();
        assert_eq!(device.irq_evt().read().unwrap(), 1);
    }

    #[test]
    fn an_address_outside_memory_is_named() {
        let err = VmGenId::new(
            VmGenIdState {
                addr: 0x20_0000,
                irq: 5,
            },
            &memory(),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("0x200000"), "{err}");
    }
}
