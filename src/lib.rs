//! mote: a KVM microVM monitor. See `docs/architecture.md` for how the pieces fit.

// Public only what `main.rs` and the tests reach; the rest is private to the crate, so that
// rustc reports what nothing uses.
pub mod api;
mod arch;
mod builder;
pub mod cli;
pub mod config;
mod controller;
mod device_manager;
mod host_file;
pub mod image;
pub mod logger;
mod metrics;
mod rpc;
pub mod seccomp;
pub mod signals;
mod snapshot;
mod start_up_text;
pub mod startup_phases;
mod sync;
pub mod teardown;
pub mod terminal;
mod thread;
mod vmm;
mod vstate;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::TryRecvError;
use std::sync::{Arc, Mutex};

use api::{ApiChannel, ApiError};
pub use builder::ProcessStart;
use builder::{build_microvm_for_boot, BuildError, Console, EarlyDevices};
use config::{ConfigError, VmConfigFile, VmResources};
use controller::{ApiSubscriber, PrebootAnswer, PrebootController, Started};
use device_manager::Subscriber;
use log::info;
use metrics::METRICS;
use rpc::{VmmActionError, VmmData};
use signals::StopSignals;
use vmm::{run_until_exit, Outcome, RunError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

#[derive(Debug, thiserror::Error)]
pub enum MoteError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("cannot set up the console: {0}")]
    Console(io::Error),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    ReadConfig(#[from] host_file::HostFileError),
    #[error("invalid config file {path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("config file {path}: {source}")]
    Config { path: PathBuf, source: ConfigError },
    #[error(transparent)]
    Logger(#[from] logger::LoggerError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("the API thread has gone")]
    ApiGone,
    #[error("snapshot {path}: {source}")]
    Restore {
        path: PathBuf,
        source: VmmActionError,
    },
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("cannot create the metrics timer: {0}")]
    MetricsTimer(io::Error),
    #[error("cannot catch stop signals: {0}")]
    Signals(io::Error),
    #[error("cannot wait for API requests: {0}")]
    PreBootWait(io::Error),
    #[error("a snapshot load failed part-way (its API answer says why); a half-loaded monitor is not reused, so it ends")]
    LoadFailed,
    #[error("cannot boot the microVM of config file {path}: {source}")]
    ConfigFileBoot { path: PathBuf, source: BuildError },
    #[error(transparent)]
    Image(#[from] image::run::RunError),
}

/// Firecracker's exit status for a bad `--config-file` (`BadConfiguration`).
pub const EXIT_BAD_CONFIGURATION: u8 = 152;

impl MoteError {
    /// The process's exit status for this error: Firecracker's where a spawner can tell them
    /// apart (152 for a config file that cannot be read, parsed or booted), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            MoteError::ReadConfig(_)
            | MoteError::InvalidConfig { .. }
            | MoteError::Config { .. }
            | MoteError::ConfigFileBoot { .. } => EXIT_BAD_CONFIGURATION,
            _ => 1,
        }
    }
}

/// Boots the guest described by `resources` with its console on stdin/stdout, and runs it to
/// the end (`mote run`).
pub fn run_guest(resources: &VmResources, start: ProcessStart) -> Result<Outcome, MoteError> {
    run_guest_with(resources, start, None)
}

/// [`run_guest`], with stop signals given to `signal_sink` while it takes them.
fn run_guest_with(
    resources: &VmResources,
    start: ProcessStart,
    signal_sink: Option<vmm::SignalSink>,
) -> Result<Outcome, MoteError> {
    let console = Console::stdio().map_err(MoteError::Console)?;
    // No `build` filter here: until the guest runs, the main thread acts only on the command
    // line, and a filter costs start-up time (resources/seccomp/README.md). `vmm` comes before
    // the event loop serves the guest.
    let mut built = build_microvm_for_boot(resources, EarlyDevices::default(), console, start)?;
    if let Some(sink) = signal_sink {
        built.vmm.send_signals_to(sink);
    }
    built.vmm.resume_vcpus();
    let vmm = Arc::new(Mutex::new(built.vmm));
    run_to_the_end(vmm, built.subscribers, None)
}

/// How mote ends: its exit status, and a line for the person when there is something to say.
pub struct Ended {
    code: u8,
    message: Option<String>,
}

impl Ended {
    pub fn exit_code(&self) -> u8 {
        self.code
    }

    pub fn message(&self) -> Option<String> {
        self.message.clone()
    }
}

impl From<Outcome> for Ended {
    fn from(outcome: Outcome) -> Ended {
        Ended {
            code: outcome.exit_code(),
            message: outcome.message(),
        }
    }
}

/// Runs a container image as a microVM (`mote run --image`): the run's files made, the guest
/// booted with mote-init, and mote's exit status the program's, as `docker run`'s is.
pub fn run_image(
    resources: &VmResources,
    options: &image::run::ImageRunOptions,
    start: ProcessStart,
) -> Result<Ended, MoteError> {
    let mut resources = resources.clone();
    let prepared = std::time::Instant::now();
    let run = image::run::prepare(options, &mut resources)?;
    info!(
        "container files ready in {} us",
        prepared.elapsed().as_micros()
    );
    // Signals go to the program, as `docker run` passes them on: written where mote-init
    // reads them (it polls), then Ctrl-Alt-Del, which the guest kernel turns into a signal
    // to its init so that it reads at once (x86_64; aarch64 has no keyboard).
    let mut forwarder = run.signal_forwarder()?;
    let sink: vmm::SignalSink = Box::new(move |signal, devices| {
        let written = forwarder.write(signal);
        if written {
            if let Err(err) = devices.send_ctrl_alt_del() {
                log::debug!("no Ctrl-Alt-Del for the guest's init: {err}");
            }
        }
        written
    });
    let outcome = run_guest_with(&resources, start, Some(sink))?;
    let ended = match outcome {
        Outcome::GuestStopped(_) => match run.exit_status() {
            Some(code) => Ended {
                code,
                message: None,
            },
            None => Ended {
                code: 1,
                message: Some(
                    "the guest stopped without its init reporting the program's exit status \
                     (its console says why)"
                        .to_string(),
                ),
            },
        },
        other => Ended::from(other),
    };
    run.finish();
    Ok(ended)
}

/// How `mote` without `run` was asked to work (Firecracker's process model).
pub struct ApiOptions<'a> {
    pub instance_id: String,
    /// None with `--no-api`.
    pub api_sock: Option<&'a Path>,
    pub max_payload: usize,
    /// `--mmds-size-limit`; None: `max_payload`.
    pub mmds_size_limit: Option<usize>,
    pub config_file: Option<&'a Path>,
    pub boot_timer: bool,
    pub logger: Option<config::LoggerConfig>,
    pub metrics_path: Option<&'a Path>,
    /// The jailer's `--start-time-us`, `--start-time-cpu-us` and `--parent-cpu-time-us`.
    pub startup: api::StartupTimes,
    /// Where the start's time went so far; logged (debug) once the API listens.
    pub phases: startup_phases::StartupPhases,
    /// The API thread, spawned as early as the filters were known (None: it is spawned when
    /// the socket is, or there is no API).
    pub api_thread: Option<api::ApiThread>,
}

/// The largest `--config-file` read: a configuration is a few KiB; more is a wrong file.
const CONFIG_FILE_MAX_BYTES: u64 = 1 << 20;

/// Reads and checks a `--config-file`.
pub fn read_config_file(path: &Path) -> Result<VmResources, MoteError> {
    let text = host_file::read_capped("config file", path, CONFIG_FILE_MAX_BYTES)?;
    let mut deserializer = serde_json::Deserializer::from_slice(&text);
    let file: VmConfigFile =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            MoteError::InvalidConfig {
                path: path.to_path_buf(),
                reason: format!("field `{}`: {}", err.path(), err.inner()),
            }
        })?;
    VmResources::from_config_file(file).map_err(|source| MoteError::Config {
        path: path.to_path_buf(),
        source,
    })
}

/// Serves the API (unless `--no-api`), boots from the config file or on `InstanceStart`, and
/// runs the guest to the end.
pub fn run_api(options: ApiOptions, start: ProcessStart) -> Result<Outcome, MoteError> {
    let mut resources = match options.config_file {
        Some(path) => read_config_file(path)?,
        None => VmResources::default(),
    };
    resources.boot_timer = options.boot_timer;
    resources.mmds_size_limit = Some(options.mmds_size_limit.unwrap_or(options.max_payload));
    // Command-line logger and metrics first, then the config file's.
    if let Some(config) = options.logger.as_ref().or(resources.logger.as_ref()) {
        resources.logger = Some(logger::configure(config)?);
    }
    if let Some(path) = options.metrics_path {
        resources.metrics = Some(config::MetricsConfig {
            metrics_path: path.to_path_buf(),
        });
    }
    if let Some(metrics) = &resources.metrics {
        METRICS.configure(&metrics.metrics_path)?;
    }
    // Before the API answers anything: a client that saw the socket and sends a stop signal
    // must find it caught (an orderly stop that removes the socket), not the default action.
    // Before the filter too: registering takes calls the main thread needs no more.
    let mut phases = options.phases;
    phases.mark("config");
    let signals = StopSignals::get().map_err(MoteError::Signals)?;
    phases.mark("signals");
    let api = options
        .api_sock
        .map(|path| {
            let preboot = api::PrebootInfo::new(&options.instance_id);
            if options.config_file.is_some() {
                // The VM starts at once, and `GET /` waits for it, as in Firecracker.
                preboot.mark_started();
            }
            match options.api_thread {
                Some(thread) => thread.serve(path, options.max_payload, options.startup, preboot),
                None => api::start(path, options.max_payload, options.startup, preboot),
            }
        })
        .transpose()?;
    phases.mark("listening");
    // The socket goes with the process, on every path out of here.
    let _socket = options.api_sock.map(RemoveOnDrop);
    let console = Console::stdio().map_err(MoteError::Console)?;
    phases.mark("console");
    // From here on the main thread acts on what clients send: pre-boot requests, then the build.
    seccomp::apply(seccomp::Filter::Build)?;
    phases.mark("filter");
    let mut controller = PrebootController::new(options.instance_id, resources, console, start);
    phases.mark("controller");
    phases.log();
    let started = if let Some(path) = options.config_file {
        controller
            .start()
            .map_err(|source| MoteError::ConfigFileBoot {
                path: path.to_path_buf(),
                source,
            })?
    } else {
        let api = api.as_ref().ok_or(MoteError::ApiGone)?;
        match serve_until_start(api, &mut controller, signals)? {
            PreBoot::Started(started) => *started,
            PreBoot::Stopped(signal) => {
                info!("stopped by {} before boot", signals::signal_name(signal));
                return Ok(Outcome::Signal(signal));
            }
        }
    };
    run_started(started, api)
}

/// The one tail of every way mote runs a VM that started: the API (if any) on the event
/// loop, periodic metrics, the raw terminal, the `vmm` filter, the event loop to the end, and
/// the answers and metrics still owed.
fn run_started(started: Started, api: Option<ApiChannel>) -> Result<Outcome, MoteError> {
    let Started {
        vmm,
        subscribers,
        controller,
    } = started;
    let api =
        api.map(|api| -> Subscriber { Arc::new(Mutex::new(ApiSubscriber { api, controller })) });
    run_to_the_end(vmm, subscribers, api)
}

fn run_to_the_end(
    vmm: Arc<Mutex<vmm::Vmm>>,
    mut subscribers: Vec<Subscriber>,
    api: Option<Subscriber>,
) -> Result<Outcome, MoteError> {
    let _raw_terminal = terminal::RawTerminal::enable().map_err(MoteError::Console)?;
    subscribers.extend(api);
    if METRICS.is_configured() {
        let periodic = metrics::PeriodicFlush::new().map_err(MoteError::MetricsTimer)?;
        subscribers.push(Arc::new(Mutex::new(periodic)));
    }
    start_up_text::release();
    match start_up_text::ReleaseAfterBoot::new() {
        Ok(later) => subscribers.push(Arc::new(Mutex::new(later))),
        // Only memory is at stake.
        Err(err) => log::warn!("cannot set the timer that gives back the boot's code: {err}"),
    }
    seccomp::apply(seccomp::Filter::Vmm)?;
    let outcome = run_until_exit(vmm, subscribers);
    // The client that started a guest which ended at once still gets its answer.
    api::http::wait_for_answers(ANSWER_GRACE);
    // A last line, so a short-lived guest's counters are not lost.
    if METRICS.is_configured() {
        if let Err(err) = METRICS.flush() {
            log::warn!("{err}");
        }
    }
    Ok(outcome?)
}

/// How long an ending monitor waits for the API thread to write the answers it owes: usually
/// microseconds (an answer is offered to its socket's buffer without blocking), but the API
/// thread may wait that long for a CPU on a loaded host (100 ms lost one InstanceStart answer
/// in 1000 in a CI soak beside other work). Only a stuck thread is waited for this long.
const ANSWER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Removes a file when dropped: the API socket, which would otherwise make the next
/// `--api-sock` with the same path fail.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// `mote run --restore SNAPSHOT --mem-file PATH [--net-override ID=TAP]... [--vsock-override
/// PATH] [--api-sock PATH]`: restores the snapshot as `params` say, resumes it and runs it to
/// the end, serving the API on `api_sock` when given.
pub fn run_restored(
    instance_id: String,
    params: &config::LoadSnapshotParams,
    api_sock: Option<&Path>,
    start: ProcessStart,
) -> Result<Outcome, MoteError> {
    // Caught before the API answers, as in run_api.
    StopSignals::get().map_err(MoteError::Signals)?;
    let api = api_sock
        .map(|path| {
            // The restore comes at once: `GET /` waits for it.
            let preboot = api::PrebootInfo::new(&instance_id);
            preboot.mark_started();
            api::start(
                path,
                api::http::DEFAULT_MAX_PAYLOAD,
                Default::default(),
                preboot,
            )
        })
        .transpose()?;
    let _socket = api_sock.map(RemoveOnDrop);
    let console = Console::stdio().map_err(MoteError::Console)?;
    let mut controller =
        PrebootController::new(instance_id, VmResources::default(), console, start);
    let started = controller
        .load_snapshot(params)
        .map_err(|source| MoteError::Restore {
            path: params.snapshot_path.clone(),
            source,
        })?;
    run_started(started, api)
}

/// How the wait for a start ended.
enum PreBoot {
    Started(Box<Started>),
    /// A stop signal came first.
    Stopped(libc::c_int),
}

/// Epoll data of the API's wake-up and of the stop signals' pipe.
const API_WAKE_DATA: u64 = u64::MAX;
const STOP_SIGNAL_DATA: u64 = u64::MAX - 1;

/// Before boot the main thread has nothing to do but answer the API, in order, until a start
/// succeeds, or until a stop signal, which ends the process in order (its socket removed).
fn serve_until_start(
    api: &ApiChannel,
    controller: &mut PrebootController,
    signals: &StopSignals,
) -> Result<PreBoot, MoteError> {
    let wait_err = MoteError::PreBootWait;
    let epoll = Epoll::new().map_err(wait_err)?;
    epoll
        .ctl(
            ControlOperation::Add,
            api.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, API_WAKE_DATA),
        )
        .map_err(wait_err)?;
    epoll
        .ctl(
            ControlOperation::Add,
            signals.fd(),
            EpollEvent::new(EventSet::IN, STOP_SIGNAL_DATA),
        )
        .map_err(wait_err)?;
    let mut events = [EpollEvent::default(); 4];
    let mut made_ahead = false;
    loop {
        let request = match api.requests.try_recv() {
            Ok(request) => request,
            Err(TryRecvError::Disconnected) => return Err(MoteError::ApiGone),
            Err(TryRecvError::Empty) => {
                // The first time nothing waits, the VM every start and load needs is made
                // (vstate::spare_vm): a request that comes meanwhile waits at most for that.
                let timeout = if made_ahead { -1 } else { 0 };
                // The API thread writes the wake-up after queueing a request, so a request
                // that came after try_recv is not missed.
                let ready = match epoll.wait(timeout, &mut events) {
                    Ok(ready) => ready,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => 0,
                    Err(err) => return Err(wait_err(err)),
                };
                for event in &events[..ready] {
                    if event.data() == API_WAKE_DATA {
                        let _ = api.wake.read();
                    } else if let Some(signal) = signals.take() {
                        return Ok(PreBoot::Stopped(signal));
                    }
                }
                if ready == 0 && !made_ahead {
                    made_ahead = true;
                    vstate::spare_vm::prepare();
                }
                continue;
            }
        };
        match controller.handle(request.action) {
            PrebootAnswer::Answered(answer) => {
                let _ = request.reply.send(answer);
            }
            PrebootAnswer::Started(started) => {
                api.preboot.mark_started();
                let _ = request.reply.send(Ok(VmmData::Empty));
                return Ok(PreBoot::Started(started));
            }
            PrebootAnswer::Fatal(err) => {
                let _ = request.reply.send(Err(err));
                api::http::wait_for_answers(ANSWER_GRACE);
                return Err(MoteError::LoadFailed);
            }
        }
    }
}
