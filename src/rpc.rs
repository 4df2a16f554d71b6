//! What the API thread asks of the main thread, and what it gets back: typed actions in, typed
//! answers out. The API thread never touches the VM; the main thread never parses HTTP.

use crate::builder::BuildError;
use crate::config::{
    BalloonConfig, BalloonHintingStart, BalloonStatsUpdate, BalloonUpdate, BootSourceConfig,
    ConfigError, CpuTemplate, CreateSnapshotParams, DriveConfig, DriveUpdate, EntropyConfig,
    LoadSnapshotParams, LoggerConfig, MachineConfig, MachineConfigUpdate, MetricsConfig,
    MmdsConfig, MmdsData, NetworkInterfaceConfig, NetworkInterfaceUpdate, VsockConfig,
};
use crate::device_manager::DeviceError;
use crate::logger::LoggerError;
use crate::metrics::MetricsError;
use crate::snapshot::actions::SnapshotActionError;
use crate::vmm::VmmError;

/// One request for the monitor, from the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmAction {
    /// `GET /`: id, state and version.
    GetInstanceInfo,
    /// `GET /vm/config`: the whole effective configuration.
    GetVmConfig,
    /// `GET /machine-config`.
    GetMachineConfig,
    PutBootSource(BootSourceConfig),
    PutDrive(DriveConfig),
    PatchDrive(DriveUpdate),
    /// `PUT /network-interfaces/{id}`, before boot only.
    PutNetworkInterface(NetworkInterfaceConfig),
    /// `PATCH /network-interfaces/{id}`: new rate limits, after boot only.
    PatchNetworkInterface(NetworkInterfaceUpdate),
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutLogger(LoggerConfig),
    PutMetrics(MetricsConfig),
    /// `PUT /vsock`, before boot only.
    PutVsock(VsockConfig),
    /// `PUT /entropy`, before boot only.
    PutEntropy(EntropyConfig),
    /// `PUT /cpu-config`: a custom CPU template, before boot only.
    PutCpuConfig(CpuTemplate),
    /// `GET /balloon`: its configuration, with the target as it is now.
    GetBalloon,
    /// `GET /balloon/statistics`, after boot.
    GetBalloonStats,
    /// `PUT /balloon`, before boot only.
    PutBalloon(BalloonConfig),
    /// `PATCH /balloon`: a new target, after boot.
    PatchBalloon(BalloonUpdate),
    /// `PATCH /balloon/statistics`: a new polling interval, after boot.
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PATCH /balloon/hinting/start`: a free page hinting run, after boot.
    StartBalloonHinting(BalloonHintingStart),
    /// `PATCH /balloon/hinting/stop`: the run ends, the guest frees what it handed over.
    StopBalloonHinting,
    /// `GET /balloon/hinting/status`, after boot.
    GetBalloonHintingStatus,
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
    /// `PUT /snapshot/create`, after boot, while paused.
    CreateSnapshot(CreateSnapshotParams),
    /// `PUT /snapshot/load`, before boot: restores instead of booting.
    LoadSnapshot(LoadSnapshotParams),
    /// `PUT /mmds/config`, before boot only.
    PutMmdsConfig(MmdsConfig),
    /// `PUT /mmds`: the whole data store, in either phase.
    PutMmds(MmdsData),
    /// `PATCH /mmds`: a JSON Merge Patch of the data store.
    PatchMmds(MmdsData),
    /// `GET /mmds`.
    GetMmds,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmData {
    /// 204 No Content.
    Empty,
    /// 200 with this JSON document.
    Json(String),
}

/// Why an action was refused or failed. The API renders it as the `fault_message` the client
/// reads (`src/api/`); until then it stays typed.
#[derive(Debug, thiserror::Error)]
pub enum VmmActionError {
    /// Firecracker's words for a request in the wrong phase.
    #[error("The requested operation is not supported after starting the microVM.")]
    NotAfterBoot,
    #[error("The requested operation is not supported before starting the microVM.")]
    NotBeforeBoot,
    /// Firecracker's words: a snapshot brings its own configuration.
    #[error("Loading a microVM snapshot not allowed after configuring boot-specific resources.")]
    LoadAfterBootConfig,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] BuildError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotActionError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Logger(#[from] LoggerError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// Firecracker's words.
    #[error("No balloon device found.")]
    NoBalloon,
    #[error("Statistics for the balloon device are not enabled")]
    BalloonStatsDisabled,
    #[error(transparent)]
    Balloon(#[from] devices::virtio::balloon::BalloonError),
    #[error("no drive has the id {0:?}")]
    UnknownDrive(String),
    #[error("no network interface has the id {0:?}")]
    UnknownNetworkInterface(String),
    /// Firecracker's words, and the limit.
    #[error("The MMDS data store limit is exceeded: mmds data is more than the {limit} bytes of JSON it may hold (--mmds-size-limit)")]
    MmdsTooLarge { limit: usize },
    #[error("mmds: {0}")]
    Mmds(devices::mmds::StoreError),
    #[error("cannot render the answer: {0}")]
    Render(serde_json::Error),
    #[error("the monitor is shutting down")]
    ShuttingDown,
}

/// An action's outcome.
pub type ActionResult = Result<VmmData, VmmActionError>;
