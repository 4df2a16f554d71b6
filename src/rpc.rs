//! What the API thread asks of the main thread, and what it gets back: typed actions in, typed
//! answers out. The API thread never touches the VM; the main thread never parses HTTP.

use crate::config::{
    BootSourceConfig, DriveConfig, DriveUpdate, LoggerConfig, MachineConfig, MachineConfigUpdate,
    MetricsConfig, NetworkInterfaceConfig, VsockConfig,
};

use crate::snapshot::actions::{CreateSnapshotParams, LoadSnapshotParams};

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
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutLogger(LoggerConfig),
    PutMetrics(MetricsConfig),
    /// `PUT /vsock`, before boot only.
    PutVsock(VsockConfig),
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
    /// `PUT /snapshot/create`, after boot, while paused.
    CreateSnapshot(CreateSnapshotParams),
    /// `PUT /snapshot/load`, before boot: restores instead of booting.
    LoadSnapshot(LoadSnapshotParams),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmData {
    /// 204 No Content.
    Empty,
    /// 200 with this JSON document.
    Json(String),
}

/// An action's outcome: the error is the fault message the client reads.
pub type ActionResult = Result<VmmData, String>;
