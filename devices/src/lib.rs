//! Device models for mote.
//!
//! This crate never depends on the monitor core: a device sees guest memory through
//! vm-memory's traits, raises interrupts through an [`EventFd`](vmm_sys_util::eventfd::EventFd)
//! (a KVM irqfd underneath) and is reached by the vCPUs through a [`Bus`].

pub mod bus;
pub mod legacy;
pub mod log_limit;
pub mod memory;
pub mod metrics;
pub mod mmds;
pub mod random;
pub mod rate_limiter;
pub mod sync;
pub mod unix_socket;
pub mod virtio;
pub mod vmgenid;

pub use bus::{Bus, BusDevice, BusError};
