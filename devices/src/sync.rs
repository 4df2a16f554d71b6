//! Locking shared devices: the one helper the monitor and its devices use.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, carrying on with the value when another thread panicked while holding it: a
/// device is plain data, and a poisoned lock must not take every other vCPU down too. (mote
/// aborts on a panic, so poisoning is only seen in tests.)
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
