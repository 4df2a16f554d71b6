//! vCPU threads as message-driven state machines.
//!
//! Each vCPU runs on its own thread, named `mote_vcpu{N}`, in one of three states: Paused (waits
//! for a message), Running (KVM_RUN, dispatching MMIO exits to the bus and the exits only the
//! arch has, such as x86's port I/O, to `arch::handle_exit`) and
//! Exited (the guest stopped this vCPU for good; waits to be finished). Messages come in over a
//! channel; to reach a vCPU inside KVM_RUN the sender also kicks it with a signal whose handler
//! sets `immediate_exit`, so KVM_RUN returns at once even if the kick lands just before it.

use std::cell::Cell;
use std::io;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Once;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::{self, VcpuState};
use crate::device_manager::VcpuBuses;
use crate::metrics::METRICS;
use crate::thread;

/// Messages to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Start or continue running the guest.
    Resume,
    /// Leave KVM_RUN and wait.
    Pause,
    /// Read this vCPU's KVM state for a snapshot (only while Paused); answered by `Saved`.
    SaveState,
    /// End the thread.
    Finish,
}

/// Answers from a vCPU thread.
#[derive(Debug)]
pub enum VcpuResponse {
    Resumed,
    Paused,
    /// The vCPU's state, or why it could not be read.
    Saved(Box<Result<VcpuState, SaveVcpuError>>),
    /// The guest stopped this vCPU; the thread also wrote the VM's exit event.
    Exited(VcpuExitReason),
}

/// Why a vCPU's state could not be read for a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SaveVcpuError {
    #[error("vCPU {0} is running, not paused")]
    Running(u8),
    #[error(transparent)]
    State(#[from] arch::StateError),
}

/// Why a vCPU stopped running the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpuExitReason {
    #[error("the guest asked for a reset")]
    Reset,
    #[error("the guest powered off")]
    PowerOff,
    #[error("the guest reported a crash")]
    Crash,
    #[error("the guest triple-faulted (vCPU {index} shut down)")]
    TripleFault { index: u8 },
    #[error("KVM internal error {suberror} on vCPU {index} at guest instruction pointer {ip:#x}")]
    InternalError { index: u8, suberror: u32, ip: u64 },
    #[error("KVM failed to enter vCPU {index}: hardware entry failure reason {reason:#x}")]
    FailEntry { index: u8, reason: u64 },
    #[error("vCPU {index} exited to the monitor for an unhandled reason: {what}")]
    Unhandled { index: u8, what: String },
    #[error("KVM_RUN failed on vCPU {index}: {errno}")]
    RunFailed { index: u8, errno: i32 },
    #[error("vCPU {index}'s thread cannot install its seccomp filter: {what}")]
    ThreadFailed { index: u8, what: String },
}

thread_local! {
    /// This thread's `kvm_run` area, for the kick signal's handler; null outside a vCPU thread.
    static KVM_RUN_AREA: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let area = KVM_RUN_AREA.with(Cell::get);
    if !area.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run area, published by the vCPU
        // loop and cleared before the VcpuFd (and the mapping) is dropped; a volatile byte store
        // is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*area).immediate_exit, 1) };
    }
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler once per process.
fn register_kick_handler() -> io::Result<()> {
    static REGISTER: Once = Once::new();
    let mut result = Ok(());
    REGISTER.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick)
            .map_err(|err| io::Error::from_raw_os_error(err.errno()));
    });
    result
}

/// What one KVM_RUN came back with.
enum RunOutcome {
    Continue,
    Exit(VcpuExitReason),
}

/// A vCPU and the buses its exits go to; moved onto its own thread.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    buses: VcpuBuses,
    exit_evt: EventFd,
}

impl Vcpu {
    pub fn new(index: u8, fd: VcpuFd, buses: VcpuBuses, exit_evt: EventFd) -> Self {
        Self {
            index,
            fd,
            buses,
            exit_evt,
        }
    }

    /// Starts the vCPU's thread, Paused.
    pub fn start(self) -> io::Result<VcpuHandle> {
        register_kick_handler()?;
        let (event_tx, event_rx) = channel();
        let (response_tx, response_rx) = channel();
        let index = self.index;
        let failed_tx = response_tx.clone();
        let failed_exit_evt = self.exit_evt.try_clone()?;
        let thread = thread::spawn_named(
            format!("mote_vcpu{index}"),
            crate::seccomp::thread_filter(crate::seccomp::Filter::Vcpu),
            move || self.run(event_rx, response_tx),
            move |what| {
                let _ = failed_tx.send(VcpuResponse::Exited(VcpuExitReason::ThreadFailed {
                    index,
                    what,
                }));
                let _ = failed_exit_evt.write(1);
            },
        )?;
        Ok(VcpuHandle {
            index,
            event_tx,
            response_rx,
            stale: 0,
            thread: Some(thread),
        })
    }

    fn run(mut self, events: Receiver<VcpuEvent>, responses: Sender<VcpuResponse>) {
        KVM_RUN_AREA.with(|area| area.set(self.fd.get_kvm_run()));
        self.state_machine(&events, &responses);
        KVM_RUN_AREA.with(|area| area.set(std::ptr::null_mut()));
    }

    fn state_machine(&mut self, events: &Receiver<VcpuEvent>, responses: &Sender<VcpuResponse>) {
        #[derive(PartialEq)]
        enum State {
            Paused,
            Running,
            Exited,
        }
        let mut state = State::Paused;
        loop {
            let event = match state {
                State::Running => {
                    // Clear a kick before looking for its message: a kick that lands after
                    // this makes the next KVM_RUN return at once, so no message waits.
                    self.fd.set_kvm_immediate_exit(0);
                    match events.try_recv() {
                        Ok(event) => Some(event),
                        Err(TryRecvError::Empty) => None,
                        Err(TryRecvError::Disconnected) => Some(VcpuEvent::Finish),
                    }
                }
                State::Paused | State::Exited => Some(events.recv().unwrap_or(VcpuEvent::Finish)),
            };
            match (event, &state) {
                (Some(VcpuEvent::Finish), _) => return,
                (Some(_), State::Exited) => {}
                (Some(VcpuEvent::Pause), _) => {
                    state = State::Paused;
                    let _ = responses.send(VcpuResponse::Paused);
                }
                (Some(VcpuEvent::Resume), _) => {
                    state = State::Running;
                    let _ = responses.send(VcpuResponse::Resumed);
                }
                (Some(VcpuEvent::SaveState), State::Paused) => {
                    // Read on the vCPU's own thread, out of KVM_RUN, so that nothing changes
                    // the state while it is read.
                    let saved = VcpuState::save(&self.fd).map_err(SaveVcpuError::from);
                    let _ = responses.send(VcpuResponse::Saved(Box::new(saved)));
                }
                (Some(VcpuEvent::SaveState), State::Running) => {
                    let refused = Err(SaveVcpuError::Running(self.index));
                    let _ = responses.send(VcpuResponse::Saved(Box::new(refused)));
                }
                (None, _) => {
                    if let RunOutcome::Exit(reason) = self.run_once() {
                        debug!("vCPU {}: {reason}", self.index);
                        state = State::Exited;
                        let _ = responses.send(VcpuResponse::Exited(reason));
                        if let Err(err) = self.exit_evt.write(1) {
                            warn!("vCPU {}: cannot signal its exit: {err}", self.index);
                        }
                    }
                }
            }
        }
    }

    fn run_once(&mut self) -> RunOutcome {
        let index = self.index;
        let exit = match self
            .fd
            .run()
            .map(|exit| arch::handle_exit(exit, &self.buses.arch))
        {
            // The arch served it.
            Ok(None) => return RunOutcome::Continue,
            Ok(Some(VcpuExit::MmioRead(addr, data))) => {
                METRICS.vcpu.exit_mmio_read.inc();
                if !self.buses.mmio.read(addr, data) {
                    data.fill(0);
                }
                return RunOutcome::Continue;
            }
            Ok(Some(VcpuExit::MmioWrite(addr, data))) => {
                METRICS.vcpu.exit_mmio_write.inc();
                self.buses.mmio.write(addr, data);
                return RunOutcome::Continue;
            }
            Ok(Some(VcpuExit::Hlt | VcpuExit::Intr)) => return RunOutcome::Continue,
            Ok(Some(VcpuExit::Shutdown)) => VcpuExitReason::TripleFault { index },
            Ok(Some(VcpuExit::SystemEvent(kind, _))) => match kind {
                KVM_SYSTEM_EVENT_RESET => VcpuExitReason::Reset,
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExitReason::PowerOff,
                KVM_SYSTEM_EVENT_CRASH => VcpuExitReason::Crash,
                other => VcpuExitReason::Unhandled {
                    index,
                    what: format!("system event {other}"),
                },
            },
            Ok(Some(VcpuExit::FailEntry(reason, _))) => VcpuExitReason::FailEntry { index, reason },
            Ok(Some(VcpuExit::InternalError)) => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let ip = arch::instruction_pointer(&self.fd).unwrap_or(0);
                VcpuExitReason::InternalError {
                    index,
                    suberror,
                    ip,
                }
            }
            Ok(Some(other)) => VcpuExitReason::Unhandled {
                index,
                what: format!("{other:?}"),
            },
            // A kick (signal) or immediate_exit: go and look at the messages.
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                return RunOutcome::Continue
            }
            Err(err) => VcpuExitReason::RunFailed {
                index,
                errno: err.errno(),
            },
        };
        if !matches!(
            exit,
            VcpuExitReason::Reset | VcpuExitReason::PowerOff | VcpuExitReason::Crash
        ) {
            METRICS.vcpu.failures.inc();
        }
        RunOutcome::Exit(exit)
    }
}

/// How long a finishing vCPU thread is waited for.
pub const VCPU_FINISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The monitor's end of a vCPU thread.
pub struct VcpuHandle {
    index: u8,
    event_tx: Sender<VcpuEvent>,
    response_rx: Receiver<VcpuResponse>,
    /// Answers still to come to withdrawn requests.
    stale: usize,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends `event` and kicks the thread out of KVM_RUN.
    pub fn send(&self, event: VcpuEvent) {
        // A thread that is gone has nothing left to tell; its exit was already reported.
        if self.event_tx.send(event).is_err() {
            return;
        }
        if let Some(thread) = &self.thread {
            if let Err(err) = thread.kill(kick_signal()) {
                debug!("vCPU {}: kick failed: {err}", self.index);
            }
        }
    }

    /// The thread's next response, waiting at most `timeout`; answers to withdrawn requests
    /// ([`Self::expect_stale`]) are passed over.
    pub fn response_within(&mut self, timeout: std::time::Duration) -> Option<VcpuResponse> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let response = self.response_rx.recv_timeout(left).ok()?;
            if let Some(response) = self.unless_stale(response) {
                return Some(response);
            }
        }
    }

    /// A response the thread sent, if any, without waiting; answers to withdrawn requests are
    /// passed over.
    pub fn try_response(&mut self) -> Option<VcpuResponse> {
        loop {
            let response = self.response_rx.try_recv().ok()?;
            if let Some(response) = self.unless_stale(response) {
                return Some(response);
            }
        }
    }

    /// The next `count` answers (but an exit) are to requests that were withdrawn, whose
    /// answers come late: whoever waits for the answer to a later request must not take
    /// them for it.
    pub fn expect_stale(&mut self, count: usize) {
        self.stale += count;
    }

    fn unless_stale(&mut self, response: VcpuResponse) -> Option<VcpuResponse> {
        match response {
            // The thread is done: nothing more comes, stale or not.
            VcpuResponse::Exited(_) => {
                self.stale = 0;
                Some(response)
            }
            _ if self.stale > 0 => {
                self.stale -= 1;
                None
            }
            _ => Some(response),
        }
    }

    /// Finishes the thread and waits for it, at most [`VCPU_FINISH_TIMEOUT`]: a thread that
    /// cannot leave KVM_RUN is left to the process's exit, which ends it.
    ///
    /// A thread can be held in the kernel: a guest page whose fault a page-fault handler never
    /// serves (the Uffd backend) holds a vCPU thread where only a fatal signal reaches it,
    /// when KVM takes the fault in a user access of its own (reading the guest's page tables
    /// in its shadow page-table walk, as on PVM hosts) or on kernels before 6.3 (KVM's own
    /// fault-in waits interruptibly from 6.3). The kick cannot reach it, and a stop must not
    /// wait for ever.
    pub fn finish(&mut self) {
        self.send(VcpuEvent::Finish);
        let Some(thread) = self.thread.take() else {
            return;
        };
        // The thread drops its end of the response channel as it returns.
        let deadline = std::time::Instant::now() + VCPU_FINISH_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.response_rx.recv_timeout(left) {
                Ok(_) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    warn!(
                        "vCPU {} did not leave KVM_RUN within {VCPU_FINISH_TIMEOUT:?} (is it waiting for a guest page nobody serves?): the monitor ends without it",
                        self.index
                    );
                    return;
                }
            }
        }
        if thread.join().is_err() {
            warn!("vCPU {}: its thread panicked", self.index);
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.finish();
    }
}
