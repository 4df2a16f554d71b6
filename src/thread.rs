//! The one place the monitor spawns threads, so that every worker is named and a panic in one
//! is reported to the monitor instead of vanishing with the thread.

use std::any::Any;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::{Builder, JoinHandle};

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".to_string())
}

/// Spawns `work` on a thread called `name`; if it panics, `on_panic` gets the message.
pub fn spawn_named<F, P>(name: String, work: F, on_panic: P) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
    P: FnOnce(String) + Send + 'static,
{
    Builder::new().name(name).spawn(move || {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(work)) {
            on_panic(panic_message(payload.as_ref()));
        }
    })
}
