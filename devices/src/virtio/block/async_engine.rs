//! The Async drive engine (Firecracker's `io_engine: "Async"`): reads, writes and flushes go
//! to the kernel through an io_uring and complete later, so that the event loop serves other
//! requests and devices meanwhile and a deep queue keeps the host disk busy.
//!
//! Durability is the Sync engine's: a write completes when the kernel has taken its data (the
//! page cache, as `pwrite`), and a flush is an fdatasync submitted with `IOSQE_IO_DRAIN`, so it
//! starts only once every request submitted before it has completed. The guest sees a
//! request as used only after its completion arrived.
//!
//! Each request in flight keeps its guest buffers as an iovec array owned here until the
//! kernel has completed it. Guest memory stays mapped for the monitor's whole life, so the
//! kernel never writes into memory that went away; the device waits for everything in flight
//! before a snapshot and before its file changes (`drain`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::memory::GuestMemoryMmap;
use io_uring::{opcode, squeue, types, IoUring};
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{IoOp, IoRequest, RequestError};

#[derive(Debug, thiserror::Error)]
pub enum AsyncEngineError {
    #[error("cannot set up an io_uring ({0}); the host's kernel must allow io_uring (Linux 5.10 or later, kernel.io_uring_disabled = 0) for io_engine Async")]
    Setup(io::Error),
    #[error("cannot create the io_uring's completion event: {0}")]
    EventFd(io::Error),
    #[error("cannot register the completion event with the io_uring: {0}")]
    RegisterEventFd(io::Error),
}

/// A request the kernel has, with what it needs until it completes.
struct InFlight {
    /// The chain's head, for the used ring.
    head: u16,
    io: IoRequest,
    /// The iovec array the kernel reads the buffers from; it must not move or go until the
    /// request completes, hence a boxed slice that stays put while the slot is taken.
    _iovecs: Box<[libc::iovec]>,
    /// The driver reset the device since: the completion goes nowhere.
    orphaned: bool,
}

/// A request the engine is done with: `bytes` moved (or the errno), to complete in the ring.
pub struct Finished {
    pub head: u16,
    pub io: IoRequest,
    pub result: Result<u64, RequestError>,
}

pub struct AsyncEngine {
    ring: IoUring,
    /// Written by the kernel when a request completes: the event loop watches it.
    completions: EventFd,
    /// Indexed by the SQE's user data.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Entries pushed since the last submit.
    unsubmitted: usize,
}

// SAFETY: the iovec arrays hold raw pointers into guest memory, which is mapped for the
// monitor's whole life and shared between threads anyway; the engine is only ever used by one
// thread at a time (behind the device's lock).
unsafe impl Send for AsyncEngine {}

impl AsyncEngine {
    /// An engine for up to `depth` requests in flight (the queue's size: the driver cannot
    /// have more outstanding).
    pub fn new(depth: u16) -> Result<Self, AsyncEngineError> {
        let depth = u32::from(depth.max(1));
        let ring = IoUring::builder()
            // The completion ring is twice the submission ring, and requests in flight never
            // exceed the submission ring: no completion is ever dropped.
            .build(depth.next_power_of_two())
            .map_err(AsyncEngineError::Setup)?;
        let completions = EventFd::new(EFD_NONBLOCK).map_err(AsyncEngineError::EventFd)?;
        // Every completion writes the event, also those the submitting thread posts itself:
        // a read that waited for the page cache completes through task work on the event
        // loop's own thread, which `register_eventfd_async` would leave unsignalled (and the
        // guest waiting). A completion already reaped makes a spurious wake-up, no more.
        ring.submitter()
            .register_eventfd(completions.as_raw_fd())
            .map_err(AsyncEngineError::RegisterEventFd)?;
        let depth = depth as usize;
        Ok(Self {
            ring,
            completions,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            unsubmitted: 0,
        })
    }

    /// The descriptor that becomes readable when requests complete.
    pub fn completion_fd(&self) -> RawFd {
        self.completions.as_raw_fd()
    }

    /// Whether another request fits.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Requests the kernel has and has not completed yet.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues `io` for the kernel (sent with the next `submit`). A buffer outside guest memory
    /// fails the request here, before the kernel sees any of it.
    pub fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        file: &File,
        head: u16,
        io: IoRequest,
    ) -> Result<(), (IoRequest, RequestError)> {
        let Some(slot) = self.free.pop() else {
            return Err((io, RequestError::Io(libc::EAGAIN)));
        };
        let iovecs = match iovecs(mem, &io) {
            Ok(iovecs) => iovecs,
            Err(err) => {
                self.free.push(slot);
                return Err((io, err));
            }
        };
        let fd = types::Fd(file.as_raw_fd());
        let entry = match io.op {
            IoOp::Read => opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(io.offset)
                .build(),
            IoOp::Write => opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(io.offset)
                .build(),
            IoOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(slot as u64);
        // SAFETY: the entry's iovec array and the buffers it points at stay valid until the
        // request completes: the array is kept in the slot below until `reap` takes the
        // completion, and the buffers are guest memory, mapped for the monitor's life.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // Cannot happen: the submission ring has a place for every slot and is emptied at
            // each submit. Fail the request rather than lose it.
            self.free.push(slot);
            return Err((io, RequestError::Io(libc::EAGAIN)));
        }
        self.slots[slot] = Some(InFlight {
            head,
            io,
            _iovecs: iovecs,
            orphaned: false,
        });
        self.unsubmitted += 1;
        Ok(())
    }

    /// Hands the queued requests to the kernel. Those the kernel could not take stay queued
    /// for the next submit (an error here is the ring's, e.g. EBUSY with completions owed).
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(taken) => {
                    self.unsubmitted = self.unsubmitted.saturating_sub(taken);
                    return Ok(());
                }
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// Takes every completion the kernel has posted, in the order posted.
    pub fn reap(&mut self) -> Vec<Finished> {
        let mut finished = Vec::new();
        for entry in self.ring.completion() {
            let slot = entry.user_data() as usize;
            let Some(in_flight) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            if in_flight.orphaned {
                continue;
            }
            let result = match entry.result() {
                errno if errno < 0 => Err(RequestError::Io(-errno)),
                bytes => Ok(bytes as u64),
            };
            finished.push(Finished {
                head: in_flight.head,
                io: in_flight.io,
                result,
            });
        }
        finished
    }

    /// Clears the completion event once the event loop reported it: only edge information,
    /// since what the kernel completed is in the ring, which `reap` reads.
    pub fn clear_completion_event(&self) {
        let _ = self.completions.read();
    }

    /// Watches the completion ring for up to `window`; true when a completion arrived.
    pub fn poll_completion(&mut self, window: Duration) -> bool {
        let start = Instant::now();
        loop {
            if !self.ring.completion().is_empty() {
                return true;
            }
            if start.elapsed() >= window {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Submits what is queued and waits until nothing is in flight; returns the completions.
    pub fn drain(&mut self) -> io::Result<Vec<Finished>> {
        let mut finished = Vec::new();
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(taken) => self.unsubmitted = self.unsubmitted.saturating_sub(taken),
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                Err(err) => return Err(err),
            }
            finished.extend(self.reap());
        }
        Ok(finished)
    }

    /// The driver reset the device: what is in flight completes into nothing. The kernel may
    /// still move those buffers' data, as a disk controller finishes the DMA it started; the
    /// buffers were the driver's to give, and a driver resets with nothing outstanding.
    pub fn orphan_all(&mut self) {
        for in_flight in self.slots.iter_mut().flatten() {
            in_flight.orphaned = true;
        }
    }
}

impl Drop for AsyncEngine {
    fn drop(&mut self) {
        // The kernel must not be left holding iovec arrays that are about to be freed.
        if self.in_flight() > 0 {
            let _ = self.drain();
        }
    }
}

/// The host addresses of `io`'s buffers, each checked to lie in guest memory.
fn iovecs(mem: &GuestMemoryMmap, io: &IoRequest) -> Result<Box<[libc::iovec]>, RequestError> {
    io.buffers
        .iter()
        .map(|&(addr, len)| {
            let slice = mem
                .get_slice(addr, len as usize)
                .map_err(|_| RequestError::BadGuestAddress(addr.0))?;
            if io.op == IoOp::Read {
                // The kernel writes these through their host addresses, which vm-memory
                // cannot see: marked now for diff snapshots, which take the marks only once
                // the requests in flight are done.
                slice.bitmap().mark_dirty(0, len as usize);
            }
            Ok(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: len as usize,
            })
        })
        .collect()
}
