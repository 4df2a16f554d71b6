//! Acts on the API's requests, by phase, as Firecracker's `PrebootApiController` and
//! `RuntimeApiController` do: before boot, requests edit the [`VmResources`], and
//! `InstanceStart` or `PUT /snapshot/load` builds the VM from them; after boot, requests act on
//! the running [`Vmm`]. Every rule of which request is allowed when lives here.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::virtio::balloon::Balloon;
use devices::virtio::vsock::Vsock;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{info, warn};
use serde_json::json;

use devices::virtio::balloon::PAGES_PER_MIB;

use crate::api::ApiChannel;
use crate::builder::{
    build_microvm_for_boot, check_boot_files, BuildError, Built, Console, EarlyDevices,
    ProcessStart,
};
use crate::config::{check_amount, BalloonConfig, LoadSnapshotParams, SnapshotType, VmResources};
use crate::device_manager::{check_drive_file, vsock_device, Subscriber};
use crate::metrics::{LatencyTimer, MetricsError, METRICS};
use crate::rpc::{ActionResult, VmmAction, VmmActionError, VmmData};
use crate::snapshot::actions::{create_snapshot, load_snapshot};
use crate::sync::lock;
use crate::vmm::Vmm;
use devices::mmds::{Mmds, SharedMmds, StoreError};

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

fn to_json<T: serde::Serialize>(value: &T) -> ActionResult {
    serde_json::to_string(value)
        .map(VmmData::Json)
        .map_err(VmmActionError::Render)
}

/// The answer to `GET /`, Firecracker's `InstanceInfo`.
pub fn instance_info(instance_id: &str, state: InstanceState) -> ActionResult {
    to_json(&json!({
        "app_name": "mote",
        "id": instance_id,
        "state": state.name(),
        "vmm_version": env!("CARGO_PKG_VERSION"),
    }))
}

/// The requests answered the same way in both phases; None for the others. (FlushMetrics is
/// not one: Firecracker refuses it before boot.)
fn handle_any_phase(
    instance_id: &str,
    state: InstanceState,
    resources: &VmResources,
    action: &VmmAction,
) -> Option<ActionResult> {
    Some(match action {
        VmmAction::GetInstanceInfo => instance_info(instance_id, state),
        VmmAction::GetVmConfig => to_json(&resources.to_config_file()),
        VmmAction::GetMachineConfig => to_json(&resources.machine_config),
        VmmAction::GetBalloon => match &resources.balloon {
            Some(balloon) => to_json(balloon),
            None => Err(VmmActionError::NoBalloon),
        },
        _ => return None,
    })
}

/// The data store requests, the same in both phases.
fn handle_mmds(mmds: &SharedMmds, action: &VmmAction) -> Option<ActionResult> {
    let mut mmds = lock(mmds);
    let limit = mmds.store.limit();
    let refusal = |err| match err {
        StoreError::TooLarge => VmmActionError::MmdsTooLarge { limit },
        other => VmmActionError::Mmds(other),
    };
    Some(match action {
        VmmAction::GetMmds => to_json(mmds.store.data()),
        VmmAction::PutMmds(data) => mmds
            .store
            .put(data.clone())
            .map(|()| VmmData::Empty)
            .map_err(refusal),
        VmmAction::PatchMmds(patch) => mmds
            .store
            .patch(patch)
            .map(|()| VmmData::Empty)
            .map_err(refusal),
        _ => return None,
    })
}

/// A VM that started: its controller from now on, and what the event loop must serve.
pub struct Started {
    pub vmm: Arc<Mutex<Vmm>>,
    pub subscribers: Vec<Subscriber>,
    pub controller: RuntimeController,
}

/// What a request before boot came to.
pub enum PrebootAnswer {
    /// Answered; the VM is still to be started.
    Answered(ActionResult),
    /// The request started the VM (its answer is 204).
    Started(Box<Started>),
    /// A snapshot load failed part-way: the client gets its answer and the monitor ends, as
    /// Firecracker's does (a half-loaded monitor is not reused).
    Fatal(VmmActionError),
}

/// The controller before boot.
pub struct PrebootController {
    instance_id: String,
    resources: VmResources,
    /// Taken by the start.
    console: Option<Console>,
    process_start: ProcessStart,
    /// A request configured what only a boot uses (boot source, machine, devices): a snapshot
    /// may no longer be loaded (Firecracker's rule).
    boot_configured: bool,
    /// The vsock device `PUT /vsock` made: its host socket listens from then on, as
    /// Firecracker's does (clients wait for the file before they boot the guest).
    early_vsock: Option<Vsock>,
    /// The metadata service: its store is filled before boot too.
    mmds: SharedMmds,
}

impl PrebootController {
    pub fn new(
        instance_id: String,
        resources: VmResources,
        console: Console,
        process_start: ProcessStart,
    ) -> Self {
        let limit = resources
            .mmds_size_limit
            .unwrap_or(devices::mmds::DEFAULT_SIZE_LIMIT);
        Self {
            instance_id,
            resources,
            console: Some(console),
            process_start,
            boot_configured: false,
            early_vsock: None,
            mmds: Mmds::shared(limit),
        }
    }

    /// Acts on one request.
    pub fn handle(&mut self, action: VmmAction) -> PrebootAnswer {
        let _latency = api_latency(&action);
        let any = handle_any_phase(
            &self.instance_id,
            InstanceState::NotStarted,
            &self.resources,
            &action,
        );
        if let Some(answer) = any.or_else(|| handle_mmds(&self.mmds, &action)) {
            return PrebootAnswer::Answered(answer);
        }
        let started = match action {
            VmmAction::InstanceStart => self.start().map_err(|err| {
                info!("InstanceStart failed: {err}");
                VmmActionError::from(err)
            }),
            VmmAction::LoadSnapshot(_) if self.boot_configured => {
                Err(VmmActionError::LoadAfterBootConfig)
            }
            VmmAction::LoadSnapshot(params) => match self
                .take_mmds_data(&params)
                .and_then(|()| self.load_snapshot(&params))
            {
                Ok(started) => Ok(started),
                Err(err) if load_failure_is_fatal(&err) => {
                    log::error!("snapshot load failed, so this monitor ends: {err}");
                    return PrebootAnswer::Fatal(err);
                }
                Err(err) => {
                    info!("snapshot load refused: {err}");
                    Err(err)
                }
            },
            action => {
                let answer = self.configure(action);
                return PrebootAnswer::Answered(answer);
            }
        };
        match started {
            Ok(started) => PrebootAnswer::Started(Box::new(started)),
            Err(err) => PrebootAnswer::Answered(Err(err)),
        }
    }

    /// The requests that edit the configuration.
    fn configure(&mut self, action: VmmAction) -> ActionResult {
        let resources = &mut self.resources;
        let boot_only = matches!(
            action,
            VmmAction::PutBootSource(_)
                | VmmAction::PutMachineConfig(_)
                | VmmAction::PatchMachineConfig(_)
                | VmmAction::PutDrive(_)
                | VmmAction::PutNetworkInterface(_)
                | VmmAction::PutVsock(_)
                | VmmAction::PutEntropy(_)
                | VmmAction::PutCpuConfig(_)
                | VmmAction::PutBalloon(_)
                | VmmAction::PutMmdsConfig(_)
        );
        match action {
            VmmAction::PutBootSource(boot_source) => {
                check_boot_files(&boot_source)?;
                resources.boot_source = Some(boot_source);
            }
            VmmAction::PutMachineConfig(config) => {
                config.validate()?;
                resources.check_machine_fits_balloon(&config)?;
                resources.machine_config = config;
            }
            VmmAction::PatchMachineConfig(update) => {
                let config = resources.machine_config.updated(&update);
                config.validate()?;
                resources.check_machine_fits_balloon(&config)?;
                resources.machine_config = config;
            }
            VmmAction::PutDrive(drive) => {
                // Checked before the file is opened, so that a bad id is named as such.
                drive.validate()?;
                check_drive_file(&drive)?;
                resources.insert_drive(drive)?;
            }
            VmmAction::PutNetworkInterface(iface) => resources.insert_network_interface(iface)?,
            VmmAction::PutLogger(config) => {
                resources.logger = Some(crate::logger::configure(&config)?);
            }
            VmmAction::PutMetrics(config) => {
                METRICS.configure(&config.metrics_path)?;
                resources.metrics = Some(config);
            }
            VmmAction::PutVsock(config) => {
                config.validate()?;
                // A vsock device replaced on the same path gives the path up first.
                if resources.vsock.as_ref().map(|v| &v.uds_path) == Some(&config.uds_path) {
                    self.early_vsock = None;
                    resources.vsock = None;
                }
                config.check_path_free()?;
                self.early_vsock = Some(vsock_device(&config)?);
                resources.vsock = Some(config);
            }
            VmmAction::PutEntropy(config) => {
                config.validate()?;
                resources.entropy = Some(config);
            }
            VmmAction::PutCpuConfig(template) => resources.cpu_config = Some(template),
            VmmAction::PutBalloon(config) => {
                config.validate(&resources.machine_config)?;
                resources.balloon = Some(config);
            }
            VmmAction::PutMmdsConfig(config) => {
                let (version, imds_compat) = (config.version, config.imds_compat);
                resources.set_mmds_config(config)?;
                lock(&self.mmds).set_options(version, imds_compat);
            }
            VmmAction::PatchDrive(_)
            | VmmAction::GetBalloonStats
            | VmmAction::PatchBalloon(_)
            | VmmAction::PatchBalloonStats(_)
            | VmmAction::StartBalloonHinting(_)
            | VmmAction::StopBalloonHinting
            | VmmAction::GetBalloonHintingStatus
            | VmmAction::PatchNetworkInterface(_)
            | VmmAction::SendCtrlAltDel
            | VmmAction::FlushMetrics
            | VmmAction::Pause
            | VmmAction::Resume
            | VmmAction::CreateSnapshot(_) => return Err(VmmActionError::NotBeforeBoot),
            VmmAction::GetInstanceInfo
            | VmmAction::GetVmConfig
            | VmmAction::GetMachineConfig
            | VmmAction::GetBalloon
            | VmmAction::InstanceStart
            | VmmAction::LoadSnapshot(_)
            | VmmAction::GetMmds
            | VmmAction::PutMmds(_)
            | VmmAction::PatchMmds(_) => {
                unreachable!("answered by PrebootController::handle")
            }
        }
        self.boot_configured |= boot_only;
        Ok(VmmData::Empty)
    }

    /// A refused start can be retried with a corrected configuration; the console went into
    /// the failed build, so the retry gets stdout and stdin again.
    fn take_console_back(&mut self) {
        self.console = Console::stdio().ok();
    }

    /// Builds the VM and lets its vCPUs run.
    pub fn start(&mut self) -> Result<Started, BuildError> {
        let console = self.console.take().ok_or(BuildError::AlreadyStarted)?;
        let early = EarlyDevices {
            vsock: self.early_vsock.take(),
            mmds: Some(self.mmds.clone()),
        };
        let built = build_microvm_for_boot(&self.resources, early, console, self.process_start)
            .inspect_err(|_| self.take_console_back())?;
        built.vmm.resume_vcpus();
        info!("the guest is running");
        // The controller's part ends here: the configuration goes to the runtime controller.
        let resources = std::mem::take(&mut self.resources);
        Ok(self.started(resources, built))
    }

    /// A load's `mmds_data` becomes the store (checked before anything is loaded, so that a
    /// store too large is a refusal that leaves the monitor usable).
    fn take_mmds_data(&mut self, params: &LoadSnapshotParams) -> Result<(), VmmActionError> {
        let Some(data) = &params.mmds_data else {
            return Ok(());
        };
        let mut mmds = lock(&self.mmds);
        let limit = mmds.store.limit();
        mmds.store
            .put(data.clone().into())
            .map_err(|err| match err {
                StoreError::TooLarge => VmmActionError::MmdsTooLarge { limit },
                other => VmmActionError::Mmds(other),
            })
    }

    /// Restores a snapshot instead of booting (`PUT /snapshot/load`): the VM takes the
    /// snapshot's configuration (with this process's logger and metrics) and stays paused
    /// unless `resume_vm`. A refused load leaves everything as it was.
    pub fn load_snapshot(
        &mut self,
        params: &LoadSnapshotParams,
    ) -> Result<Started, VmmActionError> {
        let console = self.console.take().ok_or(BuildError::AlreadyStarted)?;
        let loaded = load_snapshot(
            params,
            console,
            self.process_start,
            self.resources.boot_timer,
            &self.mmds,
        );
        let (mut resources, mut built) = loaded.inspect_err(|_| self.take_console_back())?;
        if params.resume_vm {
            built.vmm.resume()?;
        }
        resources.logger = self.resources.logger.take();
        resources.metrics = self.resources.metrics.take();
        info!(
            "restored {}{}",
            params.snapshot_path.display(),
            if params.resume_vm {
                "; the guest is running"
            } else {
                "; the guest is paused"
            }
        );
        Ok(self.started(resources, built))
    }

    fn started(&self, resources: VmResources, built: Built) -> Started {
        let vmm = Arc::new(Mutex::new(built.vmm));
        Started {
            vmm: vmm.clone(),
            subscribers: built.subscribers,
            controller: RuntimeController {
                instance_id: self.instance_id.clone(),
                resources,
                vmm,
                mmds: self.mmds.clone(),
            },
        }
    }
}

/// Whether a failed `PUT /snapshot/load` ends the monitor: any failure once the snapshot was
/// being read or built does; a request refused for its shape alone does not.
fn load_failure_is_fatal(err: &VmmActionError) -> bool {
    match err {
        VmmActionError::Snapshot(err) => !err.leaves_monitor_usable(),
        _ => true,
    }
}

/// The `latencies_us` gauge that times `action` as the API sees it (from the controller taking
/// the request to its answer), for the actions Firecracker times.
fn api_latency(action: &VmmAction) -> Option<LatencyTimer<'static>> {
    let gauges = &METRICS.latencies_us;
    let gauge = match action {
        VmmAction::Pause => &gauges.pause_vm,
        VmmAction::Resume => &gauges.resume_vm,
        VmmAction::CreateSnapshot(params) => match params.snapshot_type {
            SnapshotType::Full => &gauges.full_create_snapshot,
            SnapshotType::Diff => &gauges.diff_create_snapshot,
        },
        VmmAction::LoadSnapshot(_) => &gauges.load_snapshot,
        _ => return None,
    };
    Some(LatencyTimer::start(gauge))
}

/// The running balloon and its configuration, which a PATCH changes together.
fn configured_balloon<'a>(
    resources: &'a mut VmResources,
    vmm: &'a Vmm,
) -> Result<(&'a mut BalloonConfig, &'a Arc<Mutex<Balloon>>), VmmActionError> {
    let config = resources
        .balloon
        .as_mut()
        .ok_or(VmmActionError::NoBalloon)?;
    let balloon = vmm
        .device_manager()
        .balloon()
        .ok_or(VmmActionError::NoBalloon)?;
    Ok((config, balloon))
}

/// The controller of a running VM.
pub struct RuntimeController {
    instance_id: String,
    /// The effective configuration.
    resources: VmResources,
    vmm: Arc<Mutex<Vmm>>,
    mmds: SharedMmds,
}

impl RuntimeController {
    /// Acts on one request.
    pub fn handle(&mut self, action: VmmAction) -> ActionResult {
        let _latency = api_latency(&action);
        let mut vmm = lock(&self.vmm);
        let state = match vmm.is_paused() {
            true => InstanceState::Paused,
            false => InstanceState::Running,
        };
        if let Some(answer) = handle_any_phase(&self.instance_id, state, &self.resources, &action)
            .or_else(|| handle_mmds(&self.mmds, &action))
        {
            return answer;
        }
        match action {
            VmmAction::Pause => {
                vmm.pause()?;
                METRICS.vmm.pause_count.inc();
            }
            VmmAction::Resume => {
                vmm.resume()?;
                METRICS.vmm.resume_count.inc();
            }
            VmmAction::SendCtrlAltDel => vmm.device_manager().send_ctrl_alt_del()?,
            // Firecracker answers 204 when no metrics are configured: nothing to write.
            VmmAction::FlushMetrics => match METRICS.flush() {
                Err(MetricsError::NotConfigured) => {
                    info!("FlushMetrics: no metrics configured, nothing written")
                }
                flushed => flushed?,
            },
            VmmAction::PatchDrive(update) => {
                let drive = self
                    .resources
                    .drives
                    .iter_mut()
                    .find(|d| d.drive_id == update.drive_id)
                    .ok_or_else(|| VmmActionError::UnknownDrive(update.drive_id.clone()))?;
                update.validate()?;
                if let Some(path) = update.path_on_host {
                    vmm.device_manager()
                        .update_drive_path(&update.drive_id, &path)?;
                    drive.path_on_host = path;
                }
                if let Some(limits) = &update.rate_limiter {
                    vmm.device_manager()
                        .update_drive_rate_limiter(&update.drive_id, limits)?;
                    drive.rate_limiter =
                        Some(drive.rate_limiter.unwrap_or_default().updated(limits));
                }
            }
            VmmAction::PatchNetworkInterface(update) => {
                update.validate()?;
                let iface = self
                    .resources
                    .network_interfaces
                    .iter_mut()
                    .find(|i| i.iface_id == update.iface_id)
                    .ok_or_else(|| {
                        VmmActionError::UnknownNetworkInterface(update.iface_id.clone())
                    })?;
                vmm.device_manager().update_net_rate_limiters(&update)?;
                if let Some(rx) = &update.rx_rate_limiter {
                    iface.rx_rate_limiter =
                        Some(iface.rx_rate_limiter.unwrap_or_default().updated(rx));
                }
                if let Some(tx) = &update.tx_rate_limiter {
                    iface.tx_rate_limiter =
                        Some(iface.tx_rate_limiter.unwrap_or_default().updated(tx));
                }
            }
            VmmAction::GetBalloonStats => {
                let balloon = vmm
                    .device_manager()
                    .balloon()
                    .ok_or(VmmActionError::NoBalloon)?;
                let stats = lock(balloon).stats();
                return to_json(&stats.ok_or(VmmActionError::BalloonStatsDisabled)?);
            }
            VmmAction::PatchBalloon(update) => {
                check_amount(
                    update.amount_mib,
                    self.resources.machine_config.mem_size_mib,
                )?;
                let (config, balloon) = configured_balloon(&mut self.resources, &vmm)?;
                lock(balloon).set_target_pages(update.amount_mib * PAGES_PER_MIB)?;
                config.amount_mib = update.amount_mib;
            }
            VmmAction::PatchBalloonStats(update) => {
                let (config, balloon) = configured_balloon(&mut self.resources, &vmm)?;
                lock(balloon).set_stats_polling_interval(update.stats_polling_interval_s)?;
                config.stats_polling_interval_s = update.stats_polling_interval_s;
            }
            VmmAction::StartBalloonHinting(start) => {
                let (_, balloon) = configured_balloon(&mut self.resources, &vmm)?;
                lock(balloon).start_hinting(start.acknowledge_on_stop)?;
            }
            VmmAction::StopBalloonHinting => {
                let (_, balloon) = configured_balloon(&mut self.resources, &vmm)?;
                lock(balloon).stop_hinting()?;
            }
            VmmAction::GetBalloonHintingStatus => {
                let (_, balloon) = configured_balloon(&mut self.resources, &vmm)?;
                let status = lock(balloon).hinting_status()?;
                return to_json(&status);
            }
            VmmAction::CreateSnapshot(params) => {
                create_snapshot(&mut vmm, &self.resources, &params)?;
                info!("snapshot written to {}", params.snapshot_path.display());
            }
            VmmAction::PutBootSource(_)
            | VmmAction::PutMachineConfig(_)
            | VmmAction::PatchMachineConfig(_)
            | VmmAction::PutDrive(_)
            | VmmAction::PutNetworkInterface(_)
            | VmmAction::PutLogger(_)
            | VmmAction::PutMetrics(_)
            | VmmAction::PutVsock(_)
            | VmmAction::PutEntropy(_)
            | VmmAction::PutCpuConfig(_)
            | VmmAction::PutBalloon(_)
            | VmmAction::InstanceStart
            | VmmAction::PutMmdsConfig(_)
            | VmmAction::LoadSnapshot(_) => return Err(VmmActionError::NotAfterBoot),
            VmmAction::GetInstanceInfo
            | VmmAction::GetVmConfig
            | VmmAction::GetMachineConfig
            | VmmAction::GetBalloon
            | VmmAction::GetMmds
            | VmmAction::PutMmds(_)
            | VmmAction::PatchMmds(_) => {
                unreachable!("answered by handle_any_phase or handle_mmds")
            }
        }
        Ok(VmmData::Empty)
    }
}

/// The API on the running VM's event loop: woken by the API thread, answers every waiting
/// request through the runtime controller.
pub struct ApiSubscriber {
    pub api: ApiChannel,
    pub controller: RuntimeController,
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
