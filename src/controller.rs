//! Acts on the API's requests: before boot they edit the [`VmResources`]; `InstanceStart` builds
//! the VM from them; after boot they act on the running [`Vmm`]. Each answer is what the client
//! reads, so every refusal says what was wrong.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{info, warn};
use serde_json::json;

use crate::api::ApiChannel;
use crate::builder::{build_microvm, BuildError, Console};
use crate::config::{ConfigError, VmResources};
use crate::device_manager::Subscriber;
use crate::metrics::METRICS;
use crate::rpc::{ActionResult, VmmAction, VmmData};
use crate::snapshot::actions::{create_snapshot, load_snapshot, LoadSnapshotParams};
use crate::vmm::Vmm;

/// Firecracker's words for a request in the wrong phase.
const NOT_AFTER_BOOT: &str = "The requested operation is not supported after starting the microVM.";
const NOT_BEFORE_BOOT: &str =
    "The requested operation is not supported before starting the microVM.";

/// What `GET /` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    NotStarted,
    Running,
    Paused,
}

impl InstanceState {
    fn name(self) -> &'static str {
        match self {
            InstanceState::NotStarted => "Not started",
            InstanceState::Running => "Running",
            InstanceState::Paused => "Paused",
        }
    }
}

/// What a successful start hands to the event loop.
pub struct Started {
    pub vmm: Arc<Mutex<Vmm>>,
    pub subscribers: Vec<Subscriber>,
}

pub struct Controller {
    instance_id: String,
    /// The configuration: edited before boot, the effective one after.
    resources: VmResources,
    vmm: Option<Arc<Mutex<Vmm>>>,
    /// Taken by the start.
    console: Option<Console>,
    process_start: Instant,
    process_start_cpu_us: u64,
}

fn lock(vmm: &Mutex<Vmm>) -> std::sync::MutexGuard<'_, Vmm> {
    vmm.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn to_json<T: serde::Serialize>(value: &T) -> ActionResult {
    serde_json::to_string(value)
        .map(VmmData::Json)
        .map_err(|err| format!("cannot render the answer: {err}"))
}

impl Controller {
    pub fn new(
        instance_id: String,
        resources: VmResources,
        console: Console,
        process_start: Instant,
        process_start_cpu_us: u64,
    ) -> Self {
        Self {
            instance_id,
            resources,
            vmm: None,
            console: Some(console),
            process_start,
            process_start_cpu_us,
        }
    }

    pub fn state(&self) -> InstanceState {
        match &self.vmm {
            None => InstanceState::NotStarted,
            Some(vmm) if lock(vmm).is_paused() => InstanceState::Paused,
            Some(_) => InstanceState::Running,
        }
    }

    /// Builds the VM and lets its vCPUs run.
    pub fn start(&mut self) -> Result<Started, BuildError> {
        if self.vmm.is_some() {
            return Err(BuildError::AlreadyStarted);
        }
        let console = self.console.take().ok_or(BuildError::AlreadyStarted)?;
        let (vmm, subscribers) = match build_microvm(
            &self.resources,
            console,
            self.process_start,
            self.process_start_cpu_us,
        ) {
            Ok(built) => built,
            Err(err) => {
                // A refused start can be retried with a corrected configuration; the console
                // went into the failed build, so the retry gets stdout and stdin again.
                self.console = Console::stdio().ok();
                return Err(err);
            }
        };
        vmm.resume_vcpus();
        let vmm = Arc::new(Mutex::new(vmm));
        self.vmm = Some(vmm.clone());
        info!("the guest is running");
        Ok(Started { vmm, subscribers })
    }

    /// Acts on one request.
    pub fn handle(&mut self, action: VmmAction) -> ActionResult {
        match action {
            VmmAction::GetInstanceInfo => to_json(&json!({
                "app_name": "mote",
                "id": self.instance_id,
                "state": self.state().name(),
                "vmm_version": env!("CARGO_PKG_VERSION"),
            })),
            VmmAction::GetVmConfig => to_json(&self.resources.to_config_file()),
            VmmAction::GetMachineConfig => to_json(&self.resources.machine_config),
            VmmAction::FlushMetrics => METRICS
                .flush()
                .map(|()| VmmData::Empty)
                .map_err(|err| err.to_string()),
            VmmAction::InstanceStart | VmmAction::LoadSnapshot(_) => match self.vmm {
                Some(_) => Err(NOT_AFTER_BOOT.to_string()),
                // The event loop starts the VM itself (it must serve the new devices); reaching
                // here means the caller has no loop to give them to.
                None => Err("starting a VM must go through the event loop".to_string()),
            },
            action => match self.vmm.clone() {
                None => self.handle_before_boot(action),
                Some(vmm) => handle_after_boot(&mut lock(&vmm), &mut self.resources, action),
            },
        }
    }

    fn handle_before_boot(&mut self, action: VmmAction) -> ActionResult {
        let config_err = |err: ConfigError| err.to_string();
        match action {
            VmmAction::PutBootSource(boot_source) => {
                self.resources.boot_source = Some(boot_source);
            }
            VmmAction::PutMachineConfig(config) => {
                config.validate().map_err(config_err)?;
                self.resources.machine_config = config;
            }
            VmmAction::PatchMachineConfig(update) => {
                let config = self.resources.machine_config.updated(&update);
                config.validate().map_err(config_err)?;
                self.resources.machine_config = config;
            }
            VmmAction::PutDrive(drive) => {
                self.resources.insert_drive(drive).map_err(config_err)?;
            }
            VmmAction::PutNetworkInterface(iface) => {
                self.resources
                    .insert_network_interface(iface)
                    .map_err(config_err)?;
            }
            VmmAction::PutLogger(config) => {
                crate::logger::configure(&config).map_err(|err| err.to_string())?;
                self.resources.logger = Some(config);
            }
            VmmAction::PutMetrics(config) => {
                METRICS
                    .configure(&config.metrics_path)
                    .map_err(|err| err.to_string())?;
                self.resources.metrics = Some(config);
            }
            VmmAction::PutVsock(config) => {
                config.validate().map_err(config_err)?;
                // Said now rather than at InstanceStart, where the socket is created.
                config.check_path_free().map_err(config_err)?;
                self.resources.vsock = Some(config);
            }
            VmmAction::PatchDrive(_)
            | VmmAction::SendCtrlAltDel
            | VmmAction::Pause
            | VmmAction::Resume
            | VmmAction::CreateSnapshot(_) => return Err(NOT_BEFORE_BOOT.to_string()),
            VmmAction::GetInstanceInfo
            | VmmAction::GetVmConfig
            | VmmAction::GetMachineConfig
            | VmmAction::FlushMetrics
            | VmmAction::InstanceStart
            | VmmAction::LoadSnapshot(_) => unreachable!("handled in Controller::handle"),
        }
        Ok(VmmData::Empty)
    }

    /// Restores a snapshot instead of booting (`PUT /snapshot/load`): the VM takes the
    /// snapshot's configuration (with this process's logger and metrics) and stays paused
    /// unless `resume_vm`. A refused load leaves everything as it was.
    pub fn load_snapshot(&mut self, params: &LoadSnapshotParams) -> Result<Started, String> {
        if self.vmm.is_some() {
            return Err(NOT_AFTER_BOOT.to_string());
        }
        let console = self.console.take().ok_or(NOT_AFTER_BOOT)?;
        let loaded = load_snapshot(
            params,
            console,
            self.process_start,
            self.process_start_cpu_us,
            self.resources.boot_timer,
        );
        let (mut resources, mut vmm, subscribers) = match loaded {
            Ok(loaded) => loaded,
            Err(err) => {
                self.console = Console::stdio().ok();
                return Err(err.to_string());
            }
        };
        if params.resume_vm {
            vmm.resume().map_err(|err| err.to_string())?;
        }
        resources.logger = self.resources.logger.take();
        resources.metrics = self.resources.metrics.take();
        self.resources = resources;
        let vmm = Arc::new(Mutex::new(vmm));
        self.vmm = Some(vmm.clone());
        info!(
            "restored {}{}",
            params.snapshot_path.display(),
            if params.resume_vm {
                "; the guest is running"
            } else {
                "; the guest is paused"
            }
        );
        Ok(Started { vmm, subscribers })
    }
}

fn handle_after_boot(
    vmm: &mut Vmm,
    resources: &mut VmResources,
    action: VmmAction,
) -> ActionResult {
    match action {
        VmmAction::Pause => {
            vmm.pause().map_err(|err| err.to_string())?;
            METRICS.vmm_pauses.inc();
        }
        VmmAction::Resume => {
            vmm.resume().map_err(|err| err.to_string())?;
            METRICS.vmm_resumes.inc();
        }
        VmmAction::SendCtrlAltDel => {
            vmm.send_ctrl_alt_del().map_err(|err| err.to_string())?;
            METRICS.i8042_ctrl_alt_del.inc();
        }
        VmmAction::PatchDrive(update) => {
            let drive = resources
                .drives
                .iter_mut()
                .find(|d| d.drive_id == update.drive_id)
                .ok_or_else(|| format!("no drive has the id {:?}", update.drive_id))?;
            if let Some(path) = update.path_on_host {
                vmm.update_drive_path(&update.drive_id, &path)
                    .map_err(|err| err.to_string())?;
                drive.path_on_host = path;
            }
        }
        VmmAction::CreateSnapshot(params) => {
            create_snapshot(vmm, resources, &params).map_err(|err| err.to_string())?;
            info!("snapshot written to {}", params.snapshot_path.display());
        }
        VmmAction::PutBootSource(_)
        | VmmAction::PutMachineConfig(_)
        | VmmAction::PatchMachineConfig(_)
        | VmmAction::PutDrive(_)
        | VmmAction::PutNetworkInterface(_)
        | VmmAction::PutLogger(_)
        | VmmAction::PutMetrics(_)
        | VmmAction::PutVsock(_) => return Err(NOT_AFTER_BOOT.to_string()),
        VmmAction::GetInstanceInfo
        | VmmAction::GetVmConfig
        | VmmAction::GetMachineConfig
        | VmmAction::FlushMetrics
        | VmmAction::InstanceStart
        | VmmAction::LoadSnapshot(_) => unreachable!("handled in Controller::handle"),
    }
    Ok(VmmData::Empty)
}

/// The API on the running VM's event loop: woken by the API thread, answers every waiting
/// request through the controller.
pub struct ApiSubscriber {
    pub api: ApiChannel,
    pub controller: Controller,
}

impl ApiSubscriber {
    fn answer_waiting(&mut self) {
        let _ = self.api.wake.read();
        while let Ok(request) = self.api.requests.try_recv() {
            let answer = self.controller.handle(request.action);
            // A client that gave up no longer listens: nothing to do.
            let _ = request.reply.send(answer);
        }
    }
}

impl MutEventSubscriber for ApiSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.answer_waiting();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new_raw(self.api.wake.as_raw_fd(), EventSet::IN)) {
            warn!("cannot watch the API's requests: {err}");
        }
        // Requests that came while the VM was being built.
        self.answer_waiting();
    }
}
