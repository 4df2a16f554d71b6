//! mote: a KVM microVM monitor. See `docs/architecture.md` for how the pieces fit.

pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod logger;
pub mod signals;
pub mod terminal;
pub mod thread;
pub mod vmm;
pub mod vstate;

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use builder::{build_microvm, BuildError, Console};
use config::VmResources;
use vmm::{run_until_exit, Outcome, RunError};

#[derive(Debug, thiserror::Error)]
pub enum MoteError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("cannot set up the console: {0}")]
    Console(io::Error),
}

/// Boots the guest described by `resources` with its console on stdin/stdout, and runs it to
/// the end. `process_start` and `process_start_cpu_us` date the boot timer's measurement.
pub fn run_guest(
    resources: &VmResources,
    process_start: std::time::Instant,
    process_start_cpu_us: u64,
) -> Result<Outcome, MoteError> {
    // A raw fd, not io::Stdin: Stdin buffers, and bytes held in its buffer would never wake
    // the event loop.
    let input = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(MoteError::Console)?;
    let console = Console {
        output: Box::new(io::stdout()),
        input: Some(input),
    };
    let (vmm, subscribers) =
        build_microvm(resources, console, process_start, process_start_cpu_us)?;
    let _raw_terminal = terminal::RawTerminal::enable().map_err(MoteError::Console)?;
    Ok(run_until_exit(vmm, subscribers)?)
}
