//! The lazy pager's two threads. `mote_pager` serves the guest's faults (and the monitor's
//! own) from the memory file as they come and, during the recording window, notes which pages
//! they were; `mote_prefetch` copies in every page no fault has asked for yet, so the guest
//! ends up fully resident and the file is no longer needed for its memory.
//!
//! When a working set is being recorded the prefetch waits for the window to end: pages it
//! copied in would never fault, and so would be missing from the record. It writes the
//! working-set file first (the fault thread only hands it the pages), so no fault waits on
//! the file system.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::source::PageSource;
use super::working_set::{self, SnapshotId};
use crate::metrics::METRICS;
use crate::seccomp::{thread_filter, Filter};
use crate::vstate::uffd::{Uffd, UffdError, UffdEvent, MSG_SIZE};

/// Pages the prefetch fills with one call at most (1 MiB): small enough that a fault on a
/// page it is about to fill waits little for it.
const PREFETCH_RUN: u64 = 256;

/// A recording of the working set: where it goes and for how long.
pub struct Recording {
    pub path: PathBuf,
    pub id: SnapshotId,
    pub window: Duration,
}

/// Starts both threads on `uffd`, whose guest memory `source` fills; with `recording`, the
/// faults of its window are written as the snapshot's working set before the prefetch starts.
pub fn start(
    uffd: Arc<Uffd>,
    source: Arc<PageSource>,
    recording: Option<Recording>,
) -> std::io::Result<()> {
    // Made here, under the main thread's filter: the pager only waits on it.
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        uffd.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    )?;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let window = recording.as_ref().map(|r| r.window);
    let faults = FaultThread {
        uffd: uffd.clone(),
        source: source.clone(),
        epoll,
        record: window.map(|window| (Instant::now() + window, Vec::new(), done_tx.clone())),
        retry: Vec::new(),
    };
    if recording.is_none() {
        // Nothing to wait for: prefetch at once.
        let _ = done_tx.send(Vec::new());
    }
    drop(done_tx);
    crate::thread::spawn_named(
        "mote_pager".into(),
        thread_filter(Filter::LazyPager),
        move || faults.run(),
        |err| error!("the lazy pager did not start, guest memory faults go unserved: {err}"),
    )?;
    crate::thread::spawn_named(
        "mote_prefetch".into(),
        thread_filter(Filter::LazyPager),
        move || prefetch(&uffd, &source, recording, &done_rx),
        |err| error!("the lazy pager's prefetch did not start: {err}"),
    )?;
    Ok(())
}

/// What the fault thread acts on: a message from the descriptor, or a page to fill again.
enum Fault {
    Event(UffdEvent),
    Again(u64),
}

struct FaultThread {
    uffd: Arc<Uffd>,
    source: Arc<PageSource>,
    epoll: Epoll,
    /// While recording: until when, the pages faulted so far, and where they go at the end.
    record: Option<(Instant, Vec<u32>, Sender<Vec<u32>>)>,
    /// Faulted pages the kernel asked to fill again later (EAGAIN): retried once the events
    /// waiting on the descriptor are read, since one of them is what holds the fills back.
    retry: Vec<u64>,
}

impl FaultThread {
    fn run(mut self) {
        let mut messages = [[0u8; MSG_SIZE]; 16];
        let mut events = [EpollEvent::default(); 1];
        loop {
            let timeout = match &self.record {
                // Pages to fill again: read what is waiting, then come back to them.
                _ if !self.retry.is_empty() => 0,
                Some((until, _, _)) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.end_recording();
                        continue;
                    }
                    i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
                }
                None => -1,
            };
            if let Err(err) = self.epoll.wait(timeout, &mut events) {
                if err.kind() != std::io::ErrorKind::Interrupted {
                    error!("the lazy pager cannot wait on the userfaultfd: {err}");
                    return;
                }
            }
            let count = match self.uffd.read_events(&mut messages) {
                Ok(count) => count,
                Err(err) => {
                    error!("the lazy pager stops: {err}");
                    return;
                }
            };
            let retry = std::mem::take(&mut self.retry);
            let served = messages[..count]
                .iter()
                .map(|message| Fault::Event(UffdEvent::decode(message)))
                .chain(retry.into_iter().map(Fault::Again))
                .try_for_each(|event| self.serve(event));
            if let Err(err) = served {
                // The guest's memory is gone (the process is ending) or the kernel refuses:
                // nothing more can be served.
                error!("the lazy pager stops: {err}");
                return;
            }
        }
    }

    fn serve(&mut self, event: Fault) -> Result<(), UffdError> {
        let page = match event {
            Fault::Event(UffdEvent::PageFault { address }) => {
                let Some(page) = self.source.page_at(address) else {
                    warn!("a fault at host address {address:#x}, outside guest memory: ignored");
                    return Ok(());
                };
                page
            }
            Fault::Again(page) => page,
            Fault::Event(UffdEvent::Remove { start, end }) => {
                self.source.remove(start, end);
                return Ok(());
            }
            Fault::Event(UffdEvent::Other(event)) => {
                warn!("the lazy pager ignores userfaultfd event {event:#x}");
                return Ok(());
            }
        };
        match self.source.fill_page(&self.uffd, page)? {
            Some(true) => {
                METRICS.lazy_restore.pages_on_demand.inc();
                if let Some((_, pages, _)) = &mut self.record {
                    // The memory file of a 16 TiB guest has 2^32 pages: beyond mote's.
                    pages.push(page as u32);
                }
            }
            Some(false) => {}
            None => self.retry.push(page),
        }
        Ok(())
    }

    fn end_recording(&mut self) {
        if let Some((_, pages, done)) = self.record.take() {
            // The prefetch thread is gone only if it could not start: nobody to write them.
            let _ = done.send(pages);
        }
    }
}

/// Waits for the go (with the recorded pages, if any), writes the working set, then fills
/// every page still missing.
fn prefetch(
    uffd: &Uffd,
    source: &PageSource,
    recording: Option<Recording>,
    go: &Receiver<Vec<u32>>,
) {
    let Ok(pages) = go.recv() else {
        return;
    };
    if let Some(recording) = recording {
        match working_set::write(&recording.path, recording.id, &pages) {
            Ok(()) => info!(
                "working set of {} pages recorded in {}",
                pages.len(),
                recording.path.display()
            ),
            Err(err) => warn!(
                "cannot write the working-set file {}: {err}; later lazy restores of this snapshot are served on demand",
                recording.path.display()
            ),
        }
    }
    let started = Instant::now();
    let mut page = 0;
    let mut filled = 0;
    while page < source.pages() {
        match source.fill_run(uffd, page, PREFETCH_RUN) {
            Ok((0, 0)) => {
                // EAGAIN: guest memory is changing under an event the fault thread is about
                // to read; let it.
                std::thread::yield_now();
            }
            Ok((count, looked)) => {
                filled += count;
                METRICS.lazy_restore.pages_prefetched.add(count);
                page += looked;
            }
            Err(err) => {
                // The process is ending, or the kernel refuses: faults still serve the rest.
                warn!("the lazy pager's prefetch stops at page {page}: {err}");
                return;
            }
        }
    }
    info!(
        "lazy restore: guest memory fully resident, {filled} pages prefetched in {} ms",
        started.elapsed().as_millis()
    );
}
