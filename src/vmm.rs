//! The running microVM and the main thread's event loop: vCPU exits, the guest's reset request
//! and stop signals all arrive here as fds, and decide how the monitor ends.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use crate::device_manager::Subscriber;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::signals::{signal_name, StopSignals};
use crate::vstate::vcpu::{VcpuEvent, VcpuExitReason, VcpuHandle, VcpuResponse};
use crate::vstate::vm::Vm;

/// Event data that tells the Vmm's fds apart (signal pipes carry their signal number).
const EXIT_EVT_DATA: u32 = u32::MAX;
const RESET_EVT_DATA: u32 = u32::MAX - 1;

/// How a guest's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest reset or powered off: a normal end.
    GuestStopped(VcpuExitReason),
    /// The guest or KVM failed.
    GuestFailed(VcpuExitReason),
    /// A signal asked the monitor to stop.
    Signal(libc::c_int),
}

impl Outcome {
    /// The monitor's exit status: 0 for a guest that stopped itself, 128 + N for signal N
    /// (as a shell reports it), 1 for a failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::GuestStopped(_) => 0,
            Outcome::Signal(signal) => 128u8.saturating_add(*signal as u8),
            Outcome::GuestFailed(_) => 1,
        }
    }

    /// A one-line account for the user; None when there is nothing to say.
    pub fn message(&self) -> Option<String> {
        match self {
            Outcome::GuestStopped(_) => None,
            Outcome::GuestFailed(reason) => Some(reason.to_string()),
            Outcome::Signal(signal) => Some(format!("stopped by {}", signal_name(*signal))),
        }
    }
}

pub struct Vmm {
    /// Kept for the guest memory and the VM fd, which must outlive the vCPUs.
    _vm: Vm,
    vcpus: Vec<VcpuHandle>,
    exit_evt: EventFd,
    reset_evt: EventFd,
    signals: StopSignals,
    outcome: Option<Outcome>,
}

impl Vmm {
    pub fn new(
        vm: Vm,
        vcpus: Vec<VcpuHandle>,
        exit_evt: EventFd,
        reset_evt: EventFd,
    ) -> io::Result<Self> {
        Ok(Self {
            _vm: vm,
            vcpus,
            exit_evt,
            reset_evt,
            signals: StopSignals::register()?,
            outcome: None,
        })
    }

    /// Lets every vCPU run.
    pub fn resume_vcpus(&self) {
        for vcpu in &self.vcpus {
            vcpu.send(VcpuEvent::Resume);
        }
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Ends every vCPU thread.
    pub fn stop(&mut self) {
        for vcpu in &mut self.vcpus {
            vcpu.finish();
        }
    }

    fn conclude(&mut self, outcome: Outcome) {
        // The first reason wins: later vCPU exits are consequences of stopping.
        if self.outcome.is_none() {
            debug!("stopping: {outcome:?}");
            self.outcome = Some(outcome);
        }
    }

    fn on_vcpu_exit(&mut self) {
        let _ = self.exit_evt.read();
        let mut reasons = Vec::new();
        for vcpu in &self.vcpus {
            while let Some(response) = vcpu.try_response() {
                if let VcpuResponse::Exited(reason) = response {
                    reasons.push(reason);
                }
            }
        }
        for reason in reasons {
            let outcome = match reason {
                VcpuExitReason::Reset | VcpuExitReason::PowerOff => Outcome::GuestStopped(reason),
                other => Outcome::GuestFailed(other),
            };
            self.conclude(outcome);
        }
    }
}

impl MutEventSubscriber for Vmm {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            EXIT_EVT_DATA => self.on_vcpu_exit(),
            RESET_EVT_DATA => {
                let _ = self.reset_evt.read();
                self.conclude(Outcome::GuestStopped(VcpuExitReason::Reset));
            }
            signal => {
                let signal = signal as libc::c_int;
                self.signals.drain(signal);
                self.conclude(Outcome::Signal(signal));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![
            (self.exit_evt.as_raw_fd(), EXIT_EVT_DATA),
            (self.reset_evt.as_raw_fd(), RESET_EVT_DATA),
        ];
        fds.extend(self.signals.fds().map(|(sig, fd)| (fd, sig as u32)));
        for (fd, data) in fds {
            if let Err(err) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                warn!("cannot watch fd {fd}: {err}");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the event loop: {0}")]
    EventManager(event_manager::Error),
    #[error("the event loop failed: {0}")]
    Loop(event_manager::Error),
}

fn lock(vmm: &Mutex<Vmm>) -> std::sync::MutexGuard<'_, Vmm> {
    vmm.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs the guest until it stops, fails or a signal stops the monitor; then ends the vCPUs.
pub fn run_until_exit(vmm: Vmm, subscribers: Vec<Subscriber>) -> Result<Outcome, RunError> {
    let mut manager = EventManager::<Subscriber>::new().map_err(RunError::EventManager)?;
    let vmm = Arc::new(Mutex::new(vmm));
    manager.add_subscriber(vmm.clone());
    for subscriber in subscribers {
        manager.add_subscriber(subscriber);
    }
    lock(&vmm).resume_vcpus();
    let outcome = loop {
        if let Some(outcome) = lock(&vmm).outcome() {
            break outcome.clone();
        }
        match manager.run() {
            Ok(_) => {}
            Err(event_manager::Error::Epoll(err)) if err.errno() == libc::EINTR => {}
            Err(err) => {
                lock(&vmm).stop();
                return Err(RunError::Loop(err));
            }
        }
    };
    lock(&vmm).stop();
    Ok(outcome)
}
