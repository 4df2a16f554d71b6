//! The running microVM and the main thread's event loop: vCPU exits, the guest's reset request
//! and stop signals all arrive here as fds, and decide how the monitor ends.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{debug, info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::VcpuState;
use crate::device_manager::{DeviceManager, Subscriber};
use crate::metrics::{LatencyTimer, METRICS};
use crate::signals::{signal_name, StopSignals};
use crate::sync::lock;
use crate::vstate::vcpu::{SaveVcpuError, VcpuEvent, VcpuExitReason, VcpuHandle, VcpuResponse};
use crate::vstate::vm::Vm;

/// Event data that tells the Vmm's fds apart.
const EXIT_EVT_DATA: u32 = u32::MAX;
const RESET_EVT_DATA: u32 = u32::MAX - 1;
const STOP_SIGNAL_DATA: u32 = u32::MAX - 2;

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
    /// The guest memory and the VM fd, which must outlive the vCPUs.
    vm: Vm,
    vcpus: Vec<VcpuHandle>,
    exit_evt: EventFd,
    reset_evt: EventFd,
    signals: &'static StopSignals,
    outcome: Option<Outcome>,
    /// The vCPUs were paused through the API.
    paused: bool,
    /// vCPU exits seen while waiting for a pause or resume, for the event loop to conclude.
    early_exits: Vec<VcpuExitReason>,
    /// Which vCPUs' threads have stopped running the guest for good.
    exited: Vec<bool>,
    /// The emulated devices: post-boot actions and snapshots reach them here.
    devices: DeviceManager,
    /// Where stop signals go instead of stopping the monitor (`mote run --image`: to the
    /// container's program), if anywhere.
    signal_sink: Option<SignalSink>,
}

/// Takes a stop signal for the guest; false when it could not, and the monitor stops.
pub type SignalSink = Box<dyn FnMut(libc::c_int, &DeviceManager) -> bool + Send>;

impl Vmm {
    pub fn new(
        vm: Vm,
        vcpus: Vec<VcpuHandle>,
        exit_evt: EventFd,
        reset_evt: EventFd,
        devices: DeviceManager,
    ) -> io::Result<Self> {
        let vcpu_count = vcpus.len();
        Ok(Self {
            vm,
            vcpus,
            exit_evt,
            reset_evt,
            signals: StopSignals::get()?,
            outcome: None,
            paused: false,
            early_exits: Vec::new(),
            exited: vec![false; vcpu_count],
            devices,
            signal_sink: None,
        })
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Records that the vCPUs, started Paused, stay so (a restored snapshot not yet resumed).
    pub fn mark_paused(&mut self) {
        self.paused = true;
    }

    /// Stops every vCPU outside KVM_RUN and waits until all of them are (`PATCH /vm` Paused).
    pub fn pause(&mut self) -> Result<(), VmmError> {
        let _latency = LatencyTimer::start(&METRICS.latencies_us.vmm_pause_vm);
        if !self.paused {
            self.command_vcpus(VcpuEvent::Pause, &VcpuResponse::Paused)?;
            self.paused = true;
        }
        Ok(())
    }

    /// Lets paused vCPUs run again (`PATCH /vm` Resumed).
    pub fn resume(&mut self) -> Result<(), VmmError> {
        let _latency = LatencyTimer::start(&METRICS.latencies_us.vmm_resume_vm);
        if self.paused {
            self.command_vcpus(VcpuEvent::Resume, &VcpuResponse::Resumed)?;
            self.paused = false;
            self.vm.vcpus_running();
        }
        Ok(())
    }

    /// Sends `event` to every vCPU still running the guest and waits for each to answer.
    fn command_vcpus(&mut self, event: VcpuEvent, answer: &VcpuResponse) -> Result<(), VmmError> {
        if self.outcome.is_some() {
            return Err(VmmError::Stopping);
        }
        for (vcpu, exited) in self.vcpus.iter().zip(&self.exited) {
            if !exited {
                vcpu.send(event);
            }
        }
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        for index in 0..self.vcpus.len() {
            while !self.exited[index] {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.vcpus[index].response_within(left) {
                    Some(response)
                        if std::mem::discriminant(&response) == std::mem::discriminant(answer) =>
                    {
                        break
                    }
                    Some(VcpuResponse::Exited(reason)) => {
                        // The guest stopped meanwhile: the event loop concludes it.
                        self.exited[index] = true;
                        self.early_exits.push(reason);
                    }
                    Some(_) => {}
                    None if self.vm.memory_is_lazy() => {
                        if event == VcpuEvent::Pause {
                            self.withdraw_pause(index);
                        }
                        return Err(VmmError::VcpuHeldByFault { index });
                    }
                    None => return Err(VmmError::VcpuTimeout { index }),
                }
            }
        }
        Ok(())
    }

    /// Withdraws a pause that vCPU `held` could not take in time (held in the kernel by a
    /// fault its handler has not served): every vCPU is told to run on, so the VM is as it
    /// was before the refused request, Running, as the API goes on saying.
    ///
    /// Firecracker's rule is that a refused request changes nothing, and a user who sees
    /// `PATCH /vm` refused has no reason to expect the VM to pause later on its own, nor
    /// anything to tell him it did (GET / would say Running about a guest that no longer
    /// runs). The held vCPU still gets the pause once the page is served, and the resume
    /// right behind it: it stops for a moment and carries on.
    fn withdraw_pause(&mut self, held: usize) {
        for (index, vcpu) in self.vcpus.iter_mut().enumerate() {
            if self.exited[index] {
                continue;
            }
            vcpu.send(VcpuEvent::Resume);
            // Those before `held` answered Paused already; the others will, late.
            vcpu.expect_stale(if index < held { 1 } else { 2 });
        }
        warn!("vCPU {held} did not take the pause in time; the pause is withdrawn, every vCPU runs on");
    }

    /// Each vCPU's KVM state, read by its own thread; the vCPUs must be paused.
    pub fn save_vcpu_states(&mut self) -> Result<Vec<VcpuState>, VmmError> {
        if self.outcome.is_some() || self.exited.iter().any(|exited| *exited) {
            return Err(VmmError::Stopping);
        }
        for vcpu in &self.vcpus {
            vcpu.send(VcpuEvent::SaveState);
        }
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        let mut states = Vec::with_capacity(self.vcpus.len());
        for index in 0..self.vcpus.len() {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.vcpus[index].response_within(left) {
                    Some(VcpuResponse::Saved(saved)) => {
                        let state =
                            (*saved).map_err(|source| VmmError::SaveVcpu { index, source })?;
                        states.push(state);
                        break;
                    }
                    Some(VcpuResponse::Exited(reason)) => {
                        self.exited[index] = true;
                        self.early_exits.push(reason);
                        return Err(VmmError::Stopping);
                    }
                    Some(_) => {}
                    None => return Err(VmmError::VcpuTimeout { index }),
                }
            }
        }
        Ok(states)
    }

    /// The VM: its KVM state and guest memory (snapshots).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The VM, to take its dirty pages (Diff snapshots).
    pub fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }

    /// The emulated devices (post-boot actions, snapshots).
    /// From now on stop signals go to `sink` rather than stopping the monitor, while it
    /// takes them.
    pub fn send_signals_to(&mut self, sink: SignalSink) {
        self.signal_sink = Some(sink);
    }

    pub fn device_manager(&self) -> &DeviceManager {
        &self.devices
    }

    /// Lets every vCPU run.
    pub fn resume_vcpus(&self) {
        for vcpu in &self.vcpus {
            vcpu.send(VcpuEvent::Resume);
        }
        self.vm.vcpus_running();
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
        let mut reasons = std::mem::take(&mut self.early_exits);
        for (vcpu, exited) in self.vcpus.iter_mut().zip(self.exited.iter_mut()) {
            while let Some(response) = vcpu.try_response() {
                if let VcpuResponse::Exited(reason) = response {
                    *exited = true;
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
            STOP_SIGNAL_DATA => {
                if let Some(signal) = self.signals.take() {
                    let devices = &self.devices;
                    let passed = self
                        .signal_sink
                        .as_mut()
                        .is_some_and(|sink| sink(signal, devices));
                    if passed {
                        info!("passed {} to the guest", signal_name(signal));
                    } else {
                        self.conclude(Outcome::Signal(signal));
                    }
                }
            }
            other => debug!("event for unknown data {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            (self.exit_evt.as_raw_fd(), EXIT_EVT_DATA),
            (self.reset_evt.as_raw_fd(), RESET_EVT_DATA),
            (self.signals.fd(), STOP_SIGNAL_DATA),
        ];
        for (fd, data) in fds {
            if let Err(err) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                warn!("cannot watch fd {fd}: {err}");
            }
        }
    }
}

/// How long a vCPU may take to leave or re-enter the guest when told to.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("vCPU {index} did not answer within {VCPU_ANSWER_TIMEOUT:?}")]
    VcpuTimeout { index: usize },
    #[error("vCPU {index} did not answer within {VCPU_ANSWER_TIMEOUT:?}: it is probably waiting for a guest page the page-fault handler (mem_backend Uffd) has not served, where the kernel lets no signal reach it (KVM reading the guest's page tables on a PVM host, or any fault before Linux 6.3); the pause is withdrawn, and the guest runs on once the page is served")]
    VcpuHeldByFault { index: usize },
    #[error("the guest is stopping")]
    Stopping,
    #[error("cannot read vCPU {index}'s state: {source}")]
    SaveVcpu { index: usize, source: SaveVcpuError },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the event loop: {0}")]
    EventManager(event_manager::Error),
    #[error("the event loop failed: {0}")]
    Loop(event_manager::Error),
}

/// Serves the running guest's event loop until the guest stops, fails or a signal stops the
/// monitor; then ends the vCPUs.
pub fn run_until_exit(
    vmm: Arc<Mutex<Vmm>>,
    subscribers: Vec<Subscriber>,
) -> Result<Outcome, RunError> {
    let mut manager = EventManager::<Subscriber>::new().map_err(RunError::EventManager)?;
    manager.add_subscriber(vmm.clone());
    for subscriber in subscribers {
        manager.add_subscriber(subscriber);
    }
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
    let mut vmm = lock(&vmm);
    vmm.stop();
    // Dropping the VM would make this process wait for KVM's teardown: main's exit leaves it
    // to a reaper (src/teardown.rs).
    vmm.vm().keep_until_exit();
    Ok(outcome)
}
