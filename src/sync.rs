//! Locking shared devices and state.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking the value even if a thread panicked while holding it. A panic
/// aborts the release build (`panic = "abort"`), so poisoning is only seen in debug builds and
/// tests, where the device's state is still the best there is to go on with.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
