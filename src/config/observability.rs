//! Where the monitor's own output goes: Firecracker's `logger` and `metrics`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Firecracker's `logger`: where log lines go and what they show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// A file (appended to, created if missing) or a named pipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// Error, Warning, Info, Debug, Trace or Off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Left out: as before (false the first time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Left out: as before (false the first time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only lines from this module path (for example `mote::api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// Firecracker's `metrics`: where the JSON metrics lines go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A file (appended to, created if missing) or a named pipe.
    pub metrics_path: PathBuf,
}
