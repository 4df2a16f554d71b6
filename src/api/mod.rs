//! The REST API: Firecracker's HTTP API on a Unix socket, served by its own thread (`mote_api`).
//! The thread parses and checks each request, sends the main thread a typed [`VmmAction`] with a
//! reply channel, wakes it through an EventFd, and renders the typed answer as HTTP.

pub mod http;
pub mod paths;
pub mod routes;

use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};

use log::{error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

/// Binds the socket (so it answers as soon as this returns) and starts the API thread.
pub fn start(
    socket: &Path,
    max_payload: usize,
    startup: StartupTimes,
) -> Result<ApiChannel, ApiError> {
    let mut server = HttpServer::bind(socket, max_payload)?;
    let (to_vmm, requests) = channel();
    let wake = EventFd::new(EFD_NONBLOCK).map_err(ApiError::Thread)?;
    let api_wake = wake.try_clone().map_err(ApiError::Thread)?;
    info!("API listening on {}", socket.display());
    info!("{STARTED_LINE}");
    // As Firecracker: how long the process took to serve its API, when its starter says when
    // it began.
    METRICS.api.record_startup(&startup);
    crate::thread::spawn_named(
        "mote_api".to_string(),
        crate::seccomp::thread_filter(crate::seccomp::Filter::Api),
        move || {
            let err = server.serve(&mut |request| handle(request, &to_vmm, &api_wake));
            error!("the API server stopped: {err}");
        },
        |what| error!("the API thread failed: {what}"),
    )
    .map_err(ApiError::Thread)?;
    Ok(ApiChannel { requests, wake })
}

/// Answers one request: routes it, has the main thread act on it, renders the outcome.
fn handle(request: Request, to_vmm: &Sender<ApiRequest>, wake: &EventFd) -> Response {
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
            let mut response = match ask_vmm(action, to_vmm, wake) {
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
