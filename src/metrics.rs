//! The monitor's metrics, in Firecracker's shape: one JSON object a line, each counter the
//! count since the previous line, written on `FlushMetrics` and every 60 s once the guest runs.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use devices::counters;
use devices::metrics::{
    BalloonMetrics, BlockMetrics, Counter, Deltas, EntropyMetrics, Gauge, NetMetrics, VsockMetrics,
    INTERRUPT_METRICS, MMDS_METRICS, UART_METRICS,
};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::warn;
use serde_json::{Map, Value};
use vmm_sys_util::timerfd::TimerFd;

use crate::api::paths::{self, ENDPOINTS};
use crate::api::StartupTimes;

/// The process's metrics: counters are bumped where things happen, from any thread.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// How often metrics are written without being asked.
pub const PERIOD_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("the metrics are already configured (to {0})")]
    AlreadyConfigured(PathBuf),
    #[error("cannot open the metrics file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the metrics are not configured: PUT /metrics or --metrics-path first")]
    NotConfigured,
    #[error("cannot write the metrics to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A group's report as a JSON object.
fn object(deltas: Vec<(&'static str, u64)>) -> Value {
    Value::Object(
        deltas
            .into_iter()
            .map(|(name, delta)| (name.to_string(), delta.into()))
            .collect(),
    )
}

/// Each device of a kind under `<kind>_<id>`, and their sum under `<kind>`.
fn report_each<T: Deltas>(
    top: &mut Map<String, Value>,
    kind: &str,
    devices: &Mutex<Vec<(String, Arc<T>)>>,
) {
    let mut total = Map::new();
    if let Ok(devices) = devices.lock() {
        for (id, device) in devices.iter() {
            let deltas = device.take_deltas();
            for (name, delta) in &deltas {
                let sum = total.get(*name).and_then(Value::as_u64).unwrap_or(0) + delta;
                total.insert(name.to_string(), sum.into());
            }
            top.insert(format!("{kind}_{id}"), object(deltas));
        }
    }
    top.insert(kind.into(), Value::Object(total));
}

/// The one device of a kind under `<kind>`; an empty object while there is none.
fn report_one<T: Deltas>(top: &mut Map<String, Value>, kind: &str, device: &Mutex<Option<Arc<T>>>) {
    let deltas = match device.lock().as_deref() {
        Ok(Some(device)) => device.take_deltas(),
        _ => Vec::new(),
    };
    top.insert(kind.into(), object(deltas));
}

/// The clock `clock` now, in microseconds (0 if it cannot be read).
fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass, which outlives the call.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// A request kind's count and its failures.
#[derive(Debug, Default)]
pub struct RequestCounters {
    pub count: Counter,
    pub fails: Counter,
}

counters! {
    /// Firecracker's `api_server`, and its `get_api_requests`, `put_api_requests` and
    /// `patch_api_requests`.
    pub struct ApiMetrics {
        sync_response_fails,
        @gauges
        /// From the starter's `--start-time-us` to the API's socket listening, µs.
        process_startup_time_us,
        /// The CPU time spent from the starter's `--start-time-cpu-us` to the API's socket
        /// listening, plus its `--parent-cpu-time-us`, µs.
        process_startup_time_cpu_us,
        ;
        /// Each endpoint's counters, in the order of [`ENDPOINTS`].
        requests: [RequestCounters; ENDPOINTS.len()],
    }
}

impl ApiMetrics {
    /// Firecracker's startup metrics: set only from what the starter passed, so they stay 0
    /// for a monitor started without the flags, as Firecracker's do.
    pub fn record_startup(&self, startup: &StartupTimes) {
        if let Some(start) = startup.start_time_us {
            let now = clock_us(libc::CLOCK_MONOTONIC);
            self.process_startup_time_us.set(now.saturating_sub(start));
        }
        if let Some(start_cpu) = startup.start_time_cpu_us {
            let now = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID);
            let parent = startup.parent_cpu_time_us.unwrap_or(0);
            self.process_startup_time_cpu_us
                .set(now.saturating_sub(start_cpu).saturating_add(parent));
        }
    }

    /// The counters of the request kind `METHOD /path…`, if it is one that is counted.
    pub fn for_request(&self, method: &str, path: &str) -> Option<&RequestCounters> {
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let (index, endpoint) = paths::find(method, first)?;
        endpoint.metrics?;
        self.requests.get(index)
    }

    /// The counters of the requests made with `method`, under their Firecracker names.
    fn report(&self, method: &str) -> Value {
        let mut map = Map::new();
        let endpoints = ENDPOINTS.iter().zip(&self.requests);
        for (endpoint, counters) in endpoints.filter(|(endpoint, _)| endpoint.method == method) {
            let Some(name) = endpoint.metrics else {
                continue;
            };
            map.insert(format!("{name}_count"), counters.count.take_delta().into());
            // Firecracker reports no failures of GET requests.
            if method != "GET" {
                map.insert(format!("{name}_fails"), counters.fails.take_delta().into());
            }
        }
        Value::Object(map)
    }
}

counters! {
    /// Firecracker's `vcpu`: exits the vCPU threads handled.
    pub struct VcpuMetrics {
        exit_io_in,
        exit_io_out,
        exit_mmio_read,
        exit_mmio_write,
        failures,
    }
}

counters! {
    /// Firecracker's `vmm`: pauses and resumes.
    pub struct VmmMetrics {
        pause_count,
        resume_count,
    }
}

counters! {
    /// Firecracker's `i8042`.
    pub struct I8042Metrics {
        ctrl_alt_del_count,
    }
}

counters! {
    /// Firecracker's `metrics`: lines that could not be written (a full pipe, for example).
    pub struct MetricsMetrics {
        write_fails,
    }
}

counters! {
    /// Firecracker's `logger`: log lines that could not be written (`missed_log_count`), and
    /// metrics lines that could not (`metrics_fails`, the same count as `metrics.write_fails`,
    /// kept there too for mote's earlier readers). `missed_metrics_count` counts reports that
    /// were skipped: none are, each is written or fails.
    pub struct LoggerMetrics {
        missed_metrics_count,
        metrics_fails,
        missed_log_count,
    }
}

counters! {
    /// Firecracker's `deprecated_api`: requests that used a deprecated form (the `vsock_id`
    /// field of `PUT /vsock`, which Firecracker deprecated).
    pub struct DeprecatedApiMetrics {
        deprecated_http_api_calls,
    }
}

counters! {
    /// Firecracker's `latencies_us`: how long the last of each operation took, in µs, at the
    /// API (from the request's arrival to its answer) and in the monitor (the operation
    /// itself). (Diff snapshots are timed apart from Full ones.)
    pub struct LatencyMetrics {
        @gauges
        full_create_snapshot,
        diff_create_snapshot,
        load_snapshot,
        pause_vm,
        resume_vm,
        vmm_full_create_snapshot,
        vmm_diff_create_snapshot,
        vmm_load_snapshot,
        vmm_pause_vm,
        vmm_resume_vm,
    }
}

counters! {
    /// mote's own: where the pages of a VM restored through the `Lazy` memory backend came
    /// from (the built-in pager, `snapshot/lazy/`): brought in for the working-set file before
    /// the vCPUs ran (every page of the 2 MiB blocks dense in it, which are read whole, and
    /// its own pages elsewhere: so at least the working set's pages, and more when blocks are
    /// read whole), served when a fault asked for them, or copied in by the prefetch thread
    /// ahead of any fault. Each page is counted once, by whichever brought it in. Zero pages
    /// (the memory file's holes) count as the others do.
    pub struct LazyRestoreMetrics {
        pages_from_working_set,
        pages_on_demand,
        pages_prefetched,
        /// Working-set files that could not be used (another snapshot's, damaged): the
        /// restore fell back to serving on demand.
        working_set_fallbacks,
    }
}

/// Times an operation into a [`Gauge`] of [`LatencyMetrics`] when dropped.
pub struct LatencyTimer<'a> {
    gauge: &'a Gauge,
    start: std::time::Instant,
}

impl<'a> LatencyTimer<'a> {
    pub fn start(gauge: &'a Gauge) -> Self {
        Self {
            gauge,
            start: std::time::Instant::now(),
        }
    }
}

impl Drop for LatencyTimer<'_> {
    fn drop(&mut self) {
        let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.gauge.set(us);
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub api: ApiMetrics,
    pub vcpu: VcpuMetrics,
    pub vmm: VmmMetrics,
    pub i8042: I8042Metrics,
    pub metrics: MetricsMetrics,
    pub logger: LoggerMetrics,
    pub deprecated_api: DeprecatedApiMetrics,
    pub latencies_us: LatencyMetrics,
    pub lazy_restore: LazyRestoreMetrics,
    /// Each drive's counters, by drive id, in the guest's order.
    blocks: Mutex<Vec<(String, Arc<BlockMetrics>)>>,
    /// Each network interface's counters, by interface id, in the guest's order.
    nets: Mutex<Vec<(String, Arc<NetMetrics>)>>,
    /// The vsock device's counters, once it exists (reported as `vsock`).
    vsock: Mutex<Option<Arc<VsockMetrics>>>,
    /// The entropy device's counters, once it exists (reported as `entropy`).
    entropy: Mutex<Option<Arc<EntropyMetrics>>>,
    /// The balloon device's counters, once it exists (reported as `balloon`).
    balloon: Mutex<Option<Arc<BalloonMetrics>>>,
    sink: Mutex<Option<Sink>>,
}

#[derive(Debug)]
struct Sink {
    path: PathBuf,
    file: File,
}

/// Opens a metrics or log destination: a regular file is created if missing and appended to;
/// a named pipe is opened read-write and non-blocking, so that neither opening it without a
/// reader nor writing to a full one stalls the monitor.
pub fn open_sink(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

impl Metrics {
    /// Sends the metrics to `path` from now on.
    pub fn configure(&self, path: &Path) -> Result<(), MetricsError> {
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = sink.as_ref() {
            return Err(MetricsError::AlreadyConfigured(existing.path.clone()));
        }
        let file = open_sink(path).map_err(|source| MetricsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        *sink = Some(Sink {
            path: path.to_path_buf(),
            file,
        });
        Ok(())
    }

    pub fn is_configured(&self) -> bool {
        self.sink.lock().map(|s| s.is_some()).unwrap_or(false)
    }

    /// Counts a drive's I/O under `block_<id>` and in the `block` total.
    pub fn register_block(&self, id: &str, metrics: Arc<BlockMetrics>) {
        if let Ok(mut blocks) = self.blocks.lock() {
            blocks.retain(|(existing, _)| existing != id);
            blocks.push((id.to_string(), metrics));
        }
    }

    /// Counts an interface's traffic under `net_<id>` and in the `net` total.
    pub fn register_net(&self, id: &str, metrics: Arc<NetMetrics>) {
        if let Ok(mut nets) = self.nets.lock() {
            nets.retain(|(existing, _)| existing != id);
            nets.push((id.to_string(), metrics));
        }
    }

    /// Counts the vsock device's traffic under `vsock`.
    pub fn register_vsock(&self, metrics: Arc<VsockMetrics>) {
        if let Ok(mut vsock) = self.vsock.lock() {
            *vsock = Some(metrics);
        }
    }

    /// Counts the entropy device's requests under `entropy`.
    pub fn register_entropy(&self, metrics: Arc<EntropyMetrics>) {
        if let Ok(mut entropy) = self.entropy.lock() {
            *entropy = Some(metrics);
        }
    }

    /// Counts the balloon device's work under `balloon`.
    pub fn register_balloon(&self, metrics: Arc<BalloonMetrics>) {
        if let Ok(mut balloon) = self.balloon.lock() {
            *balloon = Some(metrics);
        }
    }

    /// The metrics since the previous report, as one JSON object.
    pub fn report(&self) -> Value {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut top = Map::new();
        top.insert("utc_timestamp_ms".into(), now_ms.into());
        top.insert("api_server".into(), object(self.api.take_deltas()));
        top.insert("get_api_requests".into(), self.api.report("GET"));
        top.insert("put_api_requests".into(), self.api.report("PUT"));
        top.insert("patch_api_requests".into(), self.api.report("PATCH"));
        top.insert("vcpu".into(), object(self.vcpu.take_deltas()));
        top.insert("vmm".into(), object(self.vmm.take_deltas()));
        top.insert("i8042".into(), object(self.i8042.take_deltas()));
        top.insert("metrics".into(), object(self.metrics.take_deltas()));
        top.insert("logger".into(), object(self.logger.take_deltas()));
        top.insert(
            "deprecated_api".into(),
            object(self.deprecated_api.take_deltas()),
        );
        top.insert(
            "latencies_us".into(),
            object(self.latencies_us.take_deltas()),
        );
        top.insert(
            "lazy_restore".into(),
            object(self.lazy_restore.take_deltas()),
        );
        top.insert(
            "signals".into(),
            object(crate::signals::take_counts().to_vec()),
        );
        top.insert("uart".into(), object(UART_METRICS.take_deltas()));
        top.insert("interrupts".into(), object(INTERRUPT_METRICS.take_deltas()));
        top.insert("mmds".into(), object(MMDS_METRICS.take_deltas()));
        report_each(&mut top, "block", &self.blocks);
        report_each(&mut top, "net", &self.nets);
        report_one(&mut top, "vsock", &self.vsock);
        report_one(&mut top, "entropy", &self.entropy);
        report_one(&mut top, "balloon", &self.balloon);
        Value::Object(top)
    }

    /// Writes one metrics line to the configured destination.
    pub fn flush(&self) -> Result<(), MetricsError> {
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let sink = sink.as_mut().ok_or(MetricsError::NotConfigured)?;
        let mut line = self.report().to_string();
        line.push('\n');
        // One write: a line is whole or absent, never torn, in a pipe.
        sink.file.write_all(line.as_bytes()).map_err(|source| {
            self.metrics.write_fails.inc();
            self.logger.metrics_fails.inc();
            MetricsError::Write {
                path: sink.path.clone(),
                source,
            }
        })
    }
}

/// Writes the metrics every [`PERIOD_SECS`] from the event loop, while the guest runs.
pub struct PeriodicFlush {
    timer: TimerFd,
}

impl PeriodicFlush {
    pub fn new() -> std::io::Result<Self> {
        let mut timer = TimerFd::new()?;
        let period = Duration::from_secs(PERIOD_SECS);
        timer.reset(period, Some(period))?;
        Ok(Self { timer })
    }
}

impl MutEventSubscriber for PeriodicFlush {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Readable, so this read does not block; it only clears the expiry count.
        let _ = self.timer.wait();
        if let Err(err) = METRICS.flush() {
            warn!("{err}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            warn!("cannot watch the metrics timer: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_counts_since_the_previous_one() {
        let metrics = Metrics::default();
        let counters = metrics.api.for_request("PUT", "/drives/rootfs").unwrap();
        counters.count.inc();
        counters.fails.inc();
        metrics.api.for_request("GET", "/").unwrap().count.add(2);
        let block = Arc::new(BlockMetrics::default());
        block.read_bytes.add(4096);
        metrics.register_block("rootfs", block.clone());
        let report = metrics.report();
        assert_eq!(report["put_api_requests"]["drive_count"], 1);
        assert_eq!(report["put_api_requests"]["drive_fails"], 1);
        assert_eq!(report["get_api_requests"]["instance_info_count"], 2);
        assert_eq!(report["block_rootfs"]["read_bytes"], 4096);
        assert_eq!(report["block"]["read_bytes"], 4096);
        let again = metrics.report();
        assert_eq!(again["put_api_requests"]["drive_count"], 0);
        assert_eq!(again["block"]["read_bytes"], 0);
        assert!(metrics.api.for_request("DELETE", "/").is_none());
    }

    #[test]
    fn startup_gauges_are_zero_without_the_flags_and_stay_in_every_report() {
        let metrics = Metrics::default();
        metrics.api.record_startup(&StartupTimes::default());
        let report = metrics.report();
        assert_eq!(report["api_server"]["process_startup_time_us"], 0);
        assert_eq!(report["api_server"]["process_startup_time_cpu_us"], 0);
        let now = clock_us(libc::CLOCK_MONOTONIC);
        metrics.api.record_startup(&StartupTimes {
            start_time_us: Some(now - 5_000_000),
            start_time_cpu_us: Some(0),
            parent_cpu_time_us: Some(7_000_000),
        });
        for report in [metrics.report(), metrics.report()] {
            let wall = report["api_server"]["process_startup_time_us"]
                .as_u64()
                .unwrap();
            assert!((5_000_000..6_000_000).contains(&wall), "{report}");
            let cpu = report["api_server"]["process_startup_time_cpu_us"]
                .as_u64()
                .unwrap();
            assert!(cpu >= 7_000_000, "the parent's CPU time is added: {report}");
        }
    }

    #[test]
    fn each_counted_endpoint_is_reported_under_its_own_name() {
        for endpoint in &ENDPOINTS {
            let metrics = Metrics::default();
            let path = format!("/{}", endpoint.segment);
            let counters = metrics.api.for_request(endpoint.method, &path);
            let Some(name) = endpoint.metrics else {
                assert!(counters.is_none(), "{endpoint:?}");
                continue;
            };
            counters.unwrap().count.inc();
            let report = metrics.report();
            let section = format!("{}_api_requests", endpoint.method.to_lowercase());
            assert_eq!(report[&section][format!("{name}_count")], 1, "{report}");
            let all: u64 = ["get", "put", "patch"]
                .iter()
                .flat_map(|method| report[format!("{method}_api_requests")].as_object())
                .flat_map(|section| section.values())
                .map(|count| count.as_u64().unwrap())
                .sum();
            assert_eq!(all, 1, "{report}");
        }
    }

    #[test]
    fn each_interface_is_reported_and_summed() {
        let metrics = Metrics::default();
        let (eth0, eth1) = (
            Arc::new(NetMetrics::default()),
            Arc::new(NetMetrics::default()),
        );
        eth0.tx_packets_count.add(3);
        eth1.tx_packets_count.add(4);
        eth1.tx_dropped_oversized.inc();
        metrics.register_net("eth0", eth0);
        metrics.register_net("eth1", eth1);
        metrics
            .api
            .for_request("PUT", "/network-interfaces/eth0")
            .unwrap()
            .count
            .inc();
        let report = metrics.report();
        assert_eq!(report["net_eth0"]["tx_packets_count"], 3);
        assert_eq!(report["net_eth1"]["tx_dropped_oversized"], 1);
        assert_eq!(report["net"]["tx_packets_count"], 7);
        assert_eq!(report["put_api_requests"]["network_count"], 1);
        assert_eq!(metrics.report()["net"]["tx_packets_count"], 0);
    }

    #[test]
    fn flushing_needs_a_destination_and_writes_a_line() {
        let metrics = Metrics::default();
        assert!(matches!(metrics.flush(), Err(MetricsError::NotConfigured)));
        let path = std::env::temp_dir().join(format!("mote-metrics-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        metrics.configure(&path).unwrap();
        assert!(matches!(
            metrics.configure(&path),
            Err(MetricsError::AlreadyConfigured(_))
        ));
        metrics.flush().unwrap();
        metrics.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert!(line["utc_timestamp_ms"].as_u64().unwrap() > 0);
        let _ = std::fs::remove_file(&path);
    }
}
