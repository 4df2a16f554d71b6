//! The one place the monitor spawns threads, so that every worker is named, runs its work
//! only under its seccomp filter, and has a panic reported to the monitor instead of
//! vanishing with the thread.

use std::any::Any;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::{Builder, JoinHandle};

use crate::seccomp::ThreadFilter;

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".to_string())
}

/// Spawns `work` on a thread called `name` that first installs `filter`; if it panics, or the
/// filter cannot be installed (then the work never runs), `on_panic` gets the message.
///
/// The caller does not wait for the filter: installing one costs about 100 us of kernel time
/// (see resources/seccomp/README.md), which the new thread spends while its spawner goes on.
pub fn spawn_named<F, P>(
    name: String,
    filter: ThreadFilter,
    work: F,
    on_panic: P,
) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
    P: FnOnce(String) + Send + 'static,
{
    Builder::new().name(name).spawn(move || {
        if let Err(err) = filter.apply() {
            on_panic(err.to_string());
            return;
        }
        if let Err(payload) = catch_unwind(AssertUnwindSafe(work)) {
            on_panic(panic_message(payload.as_ref()));
        }
    })
}
