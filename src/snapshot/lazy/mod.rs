//! The `Lazy` memory backend of `PUT /snapshot/load`, mote's extension: a restore that needs
//! no page-fault handler of the user's own. Guest memory is anonymous and registered with a
//! userfaultfd that mote serves itself, from the memory file (`backend_path`): the vCPUs run at
//! once, a fault gets its page copied in when it comes ([`pager`]), and a prefetch thread
//! copies in the rest behind them, so the guest ends up fully resident.
//!
//! The first lazy restore of a snapshot records which pages the guest faulted in its first
//! `working_set_ms` of running (from the resume, however long the VM stayed paused after the
//! load) and writes them beside the state file ([`working_set`]); later lazy restores of that
//! snapshot bring those pages in before the vCPUs run (REAP, FaaSnap): the 2 MiB blocks dense
//! in it (an eighth of their pages or more) read whole into transparent huge pages before the
//! userfaultfd is registered, which KVM then maps whole as it maps the File backend's page
//! cache, and its other pages copied in runs ([`blocks`]). A working-set file that is not that
//! snapshot's, or is damaged, is named in a warning and replaced by a new recording: the
//! restore serves on demand meanwhile.
//!
//! A pager thread that fails ends the monitor with a message ([`super::failure`]): the guest would
//! stall on its next fault otherwise.

pub mod blocks;
pub mod pager;
pub mod source;
pub mod working_set;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devices::memory::GuestMemoryMmap;
use log::{info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use self::pager::{Pager, Recording};
use self::source::{PageSource, SourceError};
use self::working_set::SnapshotId;
use super::memory::{open_memory_file, MemoryFileError, MemoryRegionState};
use crate::config::HugePages;
use crate::metrics::METRICS;
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::uffd::{Uffd, UffdError, FEATURE_EVENT_REMOVE};

/// How long the first lazy restore of a snapshot records the pages its guest faults, when
/// the load names no `working_set_ms`: a function's invocation or a service's first request,
/// in the serverless work REAP and FaaSnap measured, is over well within it.
pub const DEFAULT_WORKING_SET_WINDOW: Duration = Duration::from_millis(1000);

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    #[error("cannot read the snapshot state file {path} to name its working set: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot map guest memory for the lazy pager: {0}")]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot read the working set's blocks from the memory file {path}: {source}")]
    Blocks {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the lazy pager: {0}")]
    Start(std::io::Error),
}

/// Maps `mib` MiB of guest memory that the pager fills from the memory file `mem_path`
/// (whose regions are `regions`) for the snapshot whose state file is `state_path`, loads the
/// working set if it has one, and starts the pager; records a working set for
/// `working_set_window` (none when zero, and counted from when the vCPUs first run: see
/// [`pager::Pager::vcpus_running`]) if it has none. Dropping the returned pager stops it.
pub fn restore(
    state_path: &Path,
    mem_path: &Path,
    regions: &[MemoryRegionState],
    mib: u64,
    working_set_window: Duration,
) -> Result<(GuestMemoryMmap, Pager), LazyError> {
    let file = open_memory_file(mem_path, regions)?;
    let memory = create_guest_memory(mib, HugePages::None)?;
    let mut source = PageSource::new(&file, mem_path, &memory)?;
    let state = std::fs::read(state_path).map_err(|source| LazyError::State {
        path: state_path.to_path_buf(),
        source,
    })?;
    let id = SnapshotId::of(&state, source.pages());
    let ws_path = working_set::path_for(state_path);
    let working_set = working_set::read(&ws_path, id);
    let plan = match &working_set {
        Some(Ok(pages)) => source.plan(pages),
        _ => Default::default(),
    };
    source.queue_reads(&plan);
    // Before the userfaultfd is registered: once it is, a page can be filled only through it,
    // 4 KiB at a time.
    let read = source
        .read_blocks(&file, &plan.whole)
        .map_err(|source| LazyError::Blocks {
            path: mem_path.to_path_buf(),
            source,
        })?;
    // EVENT_REMOVE: pages the balloon gives back must read zero afterwards, not the file's.
    let uffd = Uffd::new(FEATURE_EVENT_REMOVE)?;
    for region in memory.iter() {
        uffd.register(region.as_ptr() as u64, region.len())?;
    }
    let copied = source.copy_pages(&uffd, &plan.pages)?;
    let recorded = match working_set {
        Some(Ok(pages)) => {
            METRICS
                .lazy_restore
                .pages_from_working_set
                .add(read + copied);
            info!(
                "lazy restore: the working set {} ({} pages) brought in: {} blocks read whole ({read} pages), {copied} pages copied",
                ws_path.display(),
                pages.len(),
                plan.whole.len(),
            );
            true
        }
        Some(Err(err)) => {
            METRICS.lazy_restore.working_set_fallbacks.inc();
            warn!(
                "the working-set file {} is not used: {err}; pages are served on demand{}",
                ws_path.display(),
                if working_set_window.is_zero() {
                    ""
                } else {
                    ", and a new working set is recorded in its place"
                }
            );
            false
        }
        None => false,
    };
    let recording = (!recorded && !working_set_window.is_zero()).then_some(Recording {
        path: ws_path,
        id,
        window: working_set_window,
    });
    let pager =
        pager::start(Arc::new(uffd), Arc::new(source), recording).map_err(LazyError::Start)?;
    Ok((memory, pager))
}
