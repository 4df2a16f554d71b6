//! Locking shared devices and state: the devices crate's helper, so the whole tree has one.

pub use devices::sync::lock;
