//! The connection to the page-fault handler, kept on the event loop after the hand-over.
//!
//! Firecracker's contract passes nothing more on it, but it tells mote when the handler
//! goes: a hang-up is logged as an error naming the socket. The VM goes on: a handler may
//! close the socket on purpose and keep serving the userfaultfd it was given, and one that is
//! gone leaves its faults unread, which the stall watch ([`super::watch`]) ends. Bytes the
//! handler sends are not part of the contract: they are read, counted in the log and dropped.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};

use crate::vstate::uffd::Uffd;

pub struct HandlerLink {
    stream: UnixStream,
    path: PathBuf,
    /// Kept for the VM's whole life, as Firecracker keeps its copy: were the handler to exit
    /// and this the last descriptor, the kernel would drop the registration and the guest
    /// would read zero pages where its memory should be, silently. With it, unserved faults
    /// wait, and the watch sees them.
    _uffd: Arc<Uffd>,
    /// Whether the handler sent bytes already (warned once).
    chatty: bool,
    /// The stall watch's limit, for the hang-up's message.
    fault_timeout: Option<Duration>,
}

impl HandlerLink {
    pub fn new(
        stream: UnixStream,
        path: PathBuf,
        uffd: Arc<Uffd>,
        fault_timeout: Option<Duration>,
    ) -> Self {
        Self {
            stream,
            path,
            _uffd: uffd,
            chatty: false,
            fault_timeout,
        }
    }

    fn hung_up(&self, ops: &mut EventOps) {
        let then = match self.fault_timeout {
            Some(limit) => format!(
                "a fault left unread for {} ms ends this monitor (mem_backend fault_timeout_ms)",
                limit.as_millis()
            ),
            None => "a fault left unserved stalls it (no mem_backend fault_timeout_ms)".into(),
        };
        error!(
            "the page-fault handler on {} closed its socket; the guest runs on while its faults are served, and {then}",
            self.path.display()
        );
        if let Err(err) = ops.remove(Events::new(&self.stream, EventSet::IN)) {
            warn!("cannot stop watching the page-fault handler's socket: {err}");
        }
    }
}

impl MutEventSubscriber for HandlerLink {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
            && !events.event_set().contains(EventSet::IN)
        {
            return self.hung_up(ops);
        }
        let mut chunk = [0u8; 512];
        match (&self.stream).read(&mut chunk) {
            Ok(0) => self.hung_up(ops),
            Ok(n) => {
                if !self.chatty {
                    warn!(
                        "the page-fault handler on {} sent {n} bytes, which Firecracker's contract has no use for: dropped (and so is whatever it sends later)",
                        self.path.display()
                    );
                    self.chatty = true;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => {
                error!(
                    "the page-fault handler's socket {} failed: {err}",
                    self.path.display()
                );
                self.hung_up(ops);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // The socket stays blocking: the loop reads it only when epoll says it is readable
        // (data or the end), and a read then returns at once.
        let events = Events::new(&self.stream, EventSet::IN | EventSet::READ_HANG_UP);
        if let Err(err) = ops.add(events) {
            warn!(
                "cannot watch the page-fault handler's socket (fd {}): {err}",
                self.stream.as_raw_fd()
            );
        }
    }
}
