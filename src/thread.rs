//! The one place the monitor spawns threads, so that every worker is named and runs its work
//! only under its seccomp filter (a helper its spawner joins, under the spawner's).
//!
//! mote has one panic model: a panic on any thread ends the process at once (the release
//! build has `panic = "abort"`, and the hook `main` installs aborts in every build after it
//! put the terminal back and printed the message), so no thread goes on with state a panic
//! left half-changed. Nothing here catches panics.

use std::io;
use std::thread::{Builder, JoinHandle};

use crate::seccomp::ThreadFilter;

/// Spawns `work` on a thread called `name` that first installs `filter`; if the filter cannot
/// be installed, the work never runs and `on_filter_error` gets the reason.
///
/// The caller does not wait for the filter: installing one costs about 100 us of kernel time
/// (see resources/seccomp/README.md), which the new thread spends while its spawner goes on.
pub fn spawn_named<F, E>(
    name: String,
    filter: ThreadFilter,
    work: F,
    on_filter_error: E,
) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
    E: FnOnce(String) + Send + 'static,
{
    Builder::new()
        .name(name)
        .spawn(move || match filter.apply() {
            Ok(()) => work(),
            Err(err) => on_filter_error(err.to_string()),
        })
}

/// Spawns `work` in `scope` on a thread called `name` that helps its spawner with part of the
/// spawner's own work, which it joins before it goes on (the working-set load's block reads).
/// It runs under the filter its spawner has, which every thread inherits at its start: a
/// filter of its own would cost as much as the help gains, and it does nothing the spawner
/// may not.
pub fn spawn_helper<'scope, 'env, T, F>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    name: &str,
    work: F,
) -> io::Result<std::thread::ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    Builder::new().name(name.into()).spawn_scoped(scope, work)
}
