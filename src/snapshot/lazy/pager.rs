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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::source::PageSource;
use super::working_set::{self, SnapshotId};
use crate::metrics::METRICS;
use crate::seccomp::{thread_filter, Filter};
use crate::vstate::uffd::{Uffd, UffdError, UffdEvent, MSG_SIZE};

/// Pages the prefetch fills with one call at most (1 MiB): small enough that a fault on a
/// page it is about to fill waits little for it.
const PREFETCH_RUN: u64 = 256;

/// Epoll data of the userfaultfd and of the pager's own doorbell.
const UFFD_DATA: u64 = 0;
const DOORBELL_DATA: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    #[error("cannot wait on the userfaultfd: {0}")]
    Wait(std::io::Error),
    #[error(transparent)]
    Uffd(#[from] UffdError),
}

/// A recording of the working set: where it goes and for how long.
pub struct Recording {
    pub path: PathBuf,
    pub id: SnapshotId,
    pub window: Duration,
}

/// What the monitor tells the pager's threads: the vCPUs run (the recording window starts),
/// or the pager is no longer wanted (a load refused after it started, or the VM gone).
struct Doorbell {
    fd: EventFd,
    running: AtomicBool,
    stopping: AtomicBool,
}

/// The monitor's end of the pager: dropping it stops both threads, quietly.
pub struct Pager {
    doorbell: Arc<Doorbell>,
}

impl Pager {
    /// The vCPUs run from now on: the working set's window counts from here, so a load that
    /// leaves the VM paused records the guest's first moments of running, not its wait.
    pub fn vcpus_running(&self) {
        if !self.doorbell.running.swap(true, Ordering::AcqRel) {
            ring(&self.doorbell);
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.doorbell.stopping.store(true, Ordering::Release);
        ring(&self.doorbell);
    }
}

fn ring(doorbell: &Doorbell) {
    if let Err(err) = doorbell.fd.write(1) {
        warn!("cannot reach the lazy pager's fault thread: {err}");
    }
}

/// Starts both threads on `uffd`, whose guest memory `source` fills; with `recording`, the
/// faults of its window (which starts when the vCPUs first run) are written as the
/// snapshot's working set before the prefetch starts.
///
/// Either thread failing (the memory file cannot be read any more, the kernel refuses a
/// fill) ends the monitor with a message naming it: the guest would otherwise stall on its
/// next fault, silently and for ever. A panic ends it too, as on any thread (src/thread.rs).
pub fn start(
    uffd: Arc<Uffd>,
    source: Arc<PageSource>,
    recording: Option<Recording>,
) -> std::io::Result<Pager> {
    let doorbell = Arc::new(Doorbell {
        fd: EventFd::new(EFD_NONBLOCK)?,
        running: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
    });
    // Made here, under the main thread's filter: the pager only waits on it.
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        uffd.as_raw_fd(),
        EpollEvent::new(EventSet::IN, UFFD_DATA),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        doorbell.fd.as_raw_fd(),
        EpollEvent::new(EventSet::IN, DOORBELL_DATA),
    )?;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let faults = FaultThread {
        uffd: uffd.clone(),
        source: source.clone(),
        doorbell: doorbell.clone(),
        epoll,
        record: recording.as_ref().map(|r| Record {
            window: r.window,
            until: None,
            pages: Vec::new(),
            done: done_tx.clone(),
        }),
        retry: Vec::new(),
    };
    if recording.is_none() {
        // Nothing to wait for: prefetch at once.
        let _ = done_tx.send(Vec::new());
    }
    drop(done_tx);
    let stopping = doorbell.clone();
    crate::thread::spawn_named(
        "mote_pager".into(),
        thread_filter(Filter::LazyPager),
        move || {
            if let Err(err) = faults.run() {
                fail("mote_pager", &stopping, &err);
            }
        },
        |err| error!("the lazy pager did not start, guest memory faults go unserved: {err}"),
    )?;
    let stopping = doorbell.clone();
    crate::thread::spawn_named(
        "mote_prefetch".into(),
        thread_filter(Filter::LazyPager),
        move || {
            if let Err(err) = prefetch(&uffd, &source, recording, &done_rx, &stopping) {
                fail("mote_prefetch", &stopping, &err);
            }
        },
        |err| error!("the lazy pager's prefetch did not start: {err}"),
    )?;
    Ok(Pager { doorbell })
}

/// Ends the monitor for the pager thread `thread` that failed with `err`, unless the pager
/// was being stopped anyway (its failure is then the VM going away under it).
fn fail(thread: &str, doorbell: &Doorbell, err: &PagerError) {
    if doorbell.stopping.load(Ordering::Acquire) {
        debug!("{thread} ends with the VM: {err}");
        return;
    }
    crate::snapshot::failure::end_monitor(&format!(
        "the lazy pager's thread {thread} failed: {err}; guest memory can no longer be filled from the memory file, so this monitor ends"
    ))
}

/// What the fault thread acts on: a message from the descriptor, or a page to fill again.
enum Fault {
    Event(UffdEvent),
    Again(u64),
}

/// The working set being recorded.
struct Record {
    window: Duration,
    /// When the window ends: none until the vCPUs run.
    until: Option<Instant>,
    /// The pages faulted so far, in order.
    pages: Vec<u32>,
    /// Where they go at the end.
    done: Sender<Vec<u32>>,
}

struct FaultThread {
    uffd: Arc<Uffd>,
    source: Arc<PageSource>,
    doorbell: Arc<Doorbell>,
    epoll: Epoll,
    /// While recording, what is recorded and until when.
    record: Option<Record>,
    /// Faulted pages the kernel asked to fill again later (EAGAIN): retried once the events
    /// waiting on the descriptor are read, since one of them is what holds the fills back.
    retry: Vec<u64>,
}

impl FaultThread {
    /// Serves faults until the pager is stopped (Ok) or cannot go on (the error).
    fn run(mut self) -> Result<(), PagerError> {
        let mut messages = [[0u8; MSG_SIZE]; 16];
        let mut events = [EpollEvent::default(); 2];
        loop {
            let timeout = match &self.record {
                // Pages to fill again: read what is waiting, then come back to them.
                _ if !self.retry.is_empty() => 0,
                Some(Record {
                    until: Some(until), ..
                }) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.end_recording();
                        continue;
                    }
                    i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
                }
                _ => -1,
            };
            let ready = match self.epoll.wait(timeout, &mut events) {
                Ok(ready) => ready,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(err) => return Err(PagerError::Wait(err)),
            };
            if events[..ready]
                .iter()
                .any(|event| event.data() == DOORBELL_DATA)
                && self.answer_doorbell()
            {
                return Ok(());
            }
            // Removes read from here on are marked before the batch ends: the prefetch
            // thread checks its fills against that (PageSource::begin_reading).
            self.source.begin_reading();
            let served = self.serve_waiting(&mut messages);
            self.source.end_reading();
            served?;
        }
    }

    /// Reads what waits on the descriptor and serves it with the pages to fill again.
    fn serve_waiting(&mut self, messages: &mut [[u8; MSG_SIZE]]) -> Result<(), PagerError> {
        let count = self.uffd.read_events(messages)?;
        let retry = std::mem::take(&mut self.retry);
        messages[..count]
            .iter()
            .map(|message| Fault::Event(UffdEvent::decode(message)))
            .chain(retry.into_iter().map(Fault::Again))
            .try_for_each(|event| self.serve(event))?;
        Ok(())
    }

    /// Takes the doorbell's news; true when the pager is to stop.
    fn answer_doorbell(&mut self) -> bool {
        let _ = self.doorbell.fd.read();
        if self.doorbell.stopping.load(Ordering::Acquire) {
            return true;
        }
        if self.doorbell.running.load(Ordering::Acquire) {
            if let Some(record) = &mut self.record {
                if record.until.is_none() {
                    record.until = Some(Instant::now() + record.window);
                }
            }
        }
        false
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
                if let Some(record) = &mut self.record {
                    // The memory file of a 16 TiB guest has 2^32 pages: beyond mote's.
                    record.pages.push(page as u32);
                }
            }
            Some(false) => {}
            None => self.retry.push(page),
        }
        Ok(())
    }

    fn end_recording(&mut self) {
        if let Some(record) = self.record.take() {
            // The prefetch thread is gone only if it could not start: nobody to write them.
            let _ = record.done.send(record.pages);
        }
    }
}

/// Waits for the go (with the recorded pages, if any), writes the working set, then fills
/// every page still missing; stops early, and quietly, when the pager is stopped.
fn prefetch(
    uffd: &Uffd,
    source: &PageSource,
    recording: Option<Recording>,
    go: &Receiver<Vec<u32>>,
    doorbell: &Doorbell,
) -> Result<(), PagerError> {
    let Ok(pages) = go.recv() else {
        // The fault thread ended: stopped, or failed and ending the monitor.
        return Ok(());
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
        if doorbell.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        let (count, looked) = source.prefetch_run(uffd, page, PREFETCH_RUN)?;
        filled += count;
        METRICS.lazy_restore.pages_prefetched.add(count);
        page += looked;
    }
    info!(
        "lazy restore: guest memory fully resident, {filled} pages prefetched in {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}
