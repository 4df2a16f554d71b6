//! The REST API: Firecracker's HTTP API on a Unix socket, served by its own thread (`mote_api`).
//! The thread parses and checks each request, sends the main thread a typed [`VmmAction`] with a
//! reply channel, wakes it through an EventFd, and renders the typed answer as HTTP.

pub mod http;
pub mod paths;
pub mod routes;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;

use log::{error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::controller::{instance_info, InstanceState};
use crate::metrics::METRICS;
use crate::rpc::{ActionResult, VmmAction, VmmActionError, VmmData};
use http::{HttpError, HttpServer, Request, Response};
use routes::Route;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

/// One request for the main thread, with where its answer goes.
pub struct ApiRequest {
    pub action: VmmAction,
    pub reply: SyncSender<ActionResult>,
}

/// The main thread's end of the API: requests, and the EventFd that says one is waiting.
pub struct ApiChannel {
    pub requests: Receiver<ApiRequest>,
    pub wake: EventFd,
    pub preboot: PrebootInfo,
}

/// What the API thread answers `GET /` with on its own until the VM starts: the instance's id,
/// and that it has not started. A spawner polls `GET /` to see the monitor ready, and the
/// main thread installs its own filter meanwhile (a tenth of a millisecond or more), so the
/// first answer does not wait for it. From the start on, `GET /` goes to the main thread like
/// every other request.
#[derive(Debug, Clone)]
pub struct PrebootInfo {
    instance_id: Arc<str>,
    started: Arc<AtomicBool>,
}

impl PrebootInfo {
    pub fn new(instance_id: &str) -> Self {
        Self {
            instance_id: instance_id.into(),
            started: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Called by the main thread once the VM runs, before it answers the request that started
    /// it (a `GET /` sent after that answer is the main thread's), or before the API serves
    /// where the VM starts without a request (a config file, `run --restore`).
    pub fn mark_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// The answer to `GET /` while the VM has not started; None once it has.
    fn answer(&self) -> Option<ActionResult> {
        (!self.started.load(Ordering::Acquire))
            .then(|| instance_info(&self.instance_id, InstanceState::NotStarted))
    }
}

/// What the process's starter (Firecracker's jailer) said about its start, on the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartupTimes {
    /// CLOCK_MONOTONIC when the starter began, µs.
    pub start_time_us: Option<u64>,
    /// The process's CPU time when the starter handed over to mote, µs.
    pub start_time_cpu_us: Option<u64>,
    /// The starter's own CPU time, µs (its process is not ours when it forked).
    pub parent_cpu_time_us: Option<u64>,
}

/// The line tools wait for once the socket answers (Firecracker's words, exactly).
pub const STARTED_LINE: &str = "API server started.";

/// What the API thread is handed once the main thread is ready for clients: the bound server
/// and its ends of the channel to the main thread.
struct Handover {
    server: HttpServer,
    to_vmm: Sender<ApiRequest>,
    wake: EventFd,
    preboot: PrebootInfo,
}

/// The API thread, started early: it makes its own start and installs its filter while the
/// main thread reads the configuration and catches the signals (on another CPU where there is
/// one), then waits to be handed the socket ([`ApiThread::serve`]). Dropped unused, it ends.
pub struct ApiThread {
    handover: SyncSender<Handover>,
    filtered: Receiver<()>,
}

impl ApiThread {
    /// Spawns `mote_api`, which installs the `api` filter and waits for the socket.
    pub fn spawn() -> Result<Self, ApiError> {
        let (handover, handed) = sync_channel::<Handover>(1);
        let (filtered, under_filter) = sync_channel(1);
        crate::thread::spawn_named(
            "mote_api".to_string(),
            crate::seccomp::thread_filter(crate::seccomp::Filter::Api),
            move || {
                let _ = filtered.send(());
                // An Err: the main thread ended before it served the API.
                let Ok(Handover {
                    mut server,
                    to_vmm,
                    wake,
                    preboot,
                }) = handed.recv()
                else {
                    return;
                };
                let err = server.serve(&mut |request| handle(request, &preboot, &to_vmm, &wake));
                error!("the API server stopped: {err}");
            },
            |what| error!("the API thread failed: {what}"),
        )
        .map_err(ApiError::Thread)?;
        Ok(Self {
            handover,
            filtered: under_filter,
        })
    }

    /// Binds the socket (so it answers as soon as this returns) and hands it to the API
    /// thread; returns once that thread runs under its seccomp filter. Installing a filter
    /// takes the process's signal lock, so the main thread's own install, which comes next,
    /// would otherwise hold up the API thread's and with it the first answer.
    pub fn serve(
        self,
        socket: &Path,
        max_payload: usize,
        startup: StartupTimes,
        preboot: PrebootInfo,
    ) -> Result<ApiChannel, ApiError> {
        let server = HttpServer::bind(socket, max_payload)?;
        let (to_vmm, requests) = channel();
        let wake = EventFd::new(EFD_NONBLOCK).map_err(ApiError::Thread)?;
        let api_wake = wake.try_clone().map_err(ApiError::Thread)?;
        info!("API listening on {}", socket.display());
        info!("{STARTED_LINE}");
        // As Firecracker: how long the process took to serve its API, when its starter says
        // when it began.
        METRICS.api.record_startup(&startup);
        let handover = Handover {
            server,
            to_vmm,
            wake: api_wake,
            preboot: preboot.clone(),
        };
        // An Err is a thread that failed its filter: it said why, and its requests go
        // unanswered as they would have anyway.
        let _ = self.handover.send(handover);
        let _ = self.filtered.recv();
        Ok(ApiChannel {
            requests,
            wake,
            preboot,
        })
    }
}

/// Starts the API thread and serves the API on `socket` at once (see [`ApiThread`]).
pub fn start(
    socket: &Path,
    max_payload: usize,
    startup: StartupTimes,
    preboot: PrebootInfo,
) -> Result<ApiChannel, ApiError> {
    ApiThread::spawn()?.serve(socket, max_payload, startup, preboot)
}

/// Answers one request: routes it, has the main thread act on it, renders the outcome.
fn handle(
    request: Request,
    preboot: &PrebootInfo,
    to_vmm: &Sender<ApiRequest>,
    wake: &EventFd,
) -> Response {
    let counters = METRICS.api.for_request(&request.method, &request.path);
    if let Some(counters) = counters {
        counters.count.inc();
    }
    let response = match routes::route(&request.method, &request.path, &request.body) {
        Ok(Route::Version) => Response::json(
            200,
            serde_json::json!({ "firecracker_version": env!("CARGO_PKG_VERSION") }).to_string(),
        ),
        Ok(Route::Action(action)) => {
            let deprecation = routes::deprecation(&action);
            if let Some(what) = deprecation {
                METRICS.deprecated_api.deprecated_http_api_calls.inc();
                warn!("{} {}: {what}", request.method, request.path);
            }
            let answer = match action {
                VmmAction::GetInstanceInfo => preboot.answer(),
                _ => None,
            };
            let answer = answer.unwrap_or_else(|| ask_vmm(action, to_vmm, wake));
            let mut response = match answer {
                Ok(VmmData::Empty) => Response::no_content(),
                Ok(VmmData::Json(body)) => Response::json(200, body),
                // The one place a typed refusal becomes the client's text.
                Err(err) => Response::fault(400, &err.to_string()),
            };
            response.deprecated = deprecation.is_some();
            response
        }
        Err(message) => Response::fault(400, &message),
    };
    if response.status >= 400 {
        if let Some(counters) = counters {
            counters.fails.inc();
        }
        info!(
            "API: {} {}: {} {}",
            request.method,
            request.path,
            response.status,
            response.body.as_deref().unwrap_or("")
        );
    }
    response
}

fn ask_vmm(action: VmmAction, to_vmm: &Sender<ApiRequest>, wake: &EventFd) -> ActionResult {
    let (reply, answer) = sync_channel(1);
    let stopping = VmmActionError::ShuttingDown;
    to_vmm
        .send(ApiRequest { action, reply })
        .map_err(|_| VmmActionError::ShuttingDown)?;
    wake.write(1).map_err(|_| VmmActionError::ShuttingDown)?;
    answer.recv().map_err(|_| {
        METRICS.api.sync_response_fails.inc();
        stopping
    })?
}
