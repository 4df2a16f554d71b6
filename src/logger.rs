//! The `log` backend: Firecracker's line format,
//! `<UTC timestamp> [<instance id>:<thread>:<LEVEL>:<file>:<line>] <message>`, on the process's
//! own output until `--log-path` or `PUT /logger` sends it to a file or named pipe (where, as in
//! Firecracker, the level and the origin are shown only when asked for). That output is
//! Firecracker's, stdout, for a monitor driven as Firecracker is (API or config file), and
//! stderr for `mote run`, whose stdout is the guest's console on a terminal.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{LazyLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::LoggerConfig;
use crate::metrics::open_sink;

#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("cannot open the log file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid level: {0}")]
    Level(String),
}

/// Where lines go and what they show.
struct Output {
    file: Option<File>,
    path: Option<PathBuf>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    configured: bool,
}

static OUTPUT: LazyLock<RwLock<Output>> = LazyLock::new(|| {
    RwLock::new(Output {
        file: None,
        path: None,
        show_level: true,
        show_origin: true,
        module: None,
        configured: false,
    })
});

struct Logger {
    instance_id: String,
    default: Destination,
}

/// Where lines go while no log file is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    Stderr,
}

/// Days since 1970-01-01 as a (year, month, day) civil date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn write_timestamp(out: &mut impl std::fmt::Write, now: SystemTime) -> std::fmt::Result {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs() as i64;
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let secs_of_day = secs.rem_euclid(86_400);
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
        since_epoch.subsec_nanos()
    )
}

#[cfg(test)]
fn timestamp(now: SystemTime) -> String {
    let mut text = String::new();
    let _ = write_timestamp(&mut text, now);
    text
}

/// A line longer than this gets a buffer of its own rather than keeping the thread's large.
const KEPT_LINE_CAPACITY: usize = 1024;

thread_local! {
    /// Each thread's line buffer, reused: formatting a line allocates nothing once the thread
    /// logged one (musl's allocator maps and unmaps a page for a short-lived string, a tenth
    /// of the time to the API's first answer went to the two lines logged on the way).
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    }
}

impl Logger {
    /// `timestamp [id:thread[:LEVEL][:file:line]] message\n`, Firecracker's layout.
    fn format_line(&self, line: &mut String, output: &Output, record: &Record) -> std::fmt::Result {
        use std::fmt::Write as _;
        write_timestamp(line, SystemTime::now())?;
        let thread = std::thread::current();
        write!(
            line,
            " [{}:{}",
            self.instance_id,
            thread.name().unwrap_or("unnamed")
        )?;
        if output.show_level {
            write!(line, ":{}", level_name(record.level()))?;
        }
        if output.show_origin {
            write!(
                line,
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            )?;
        }
        writeln!(line, "] {}", record.args())
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let Ok(output) = OUTPUT.read() else {
            return;
        };
        if let Some(module) = &output.module {
            if !record
                .module_path()
                .unwrap_or("")
                .starts_with(module.as_str())
            {
                return;
            }
        }
        let emit = |line: &mut String| {
            line.clear();
            let formatted = self.format_line(line, &output, record);
            // One write per line, so lines from several threads do not interleave. A full pipe
            // loses the line rather than stalling the monitor.
            let written = formatted
                .map_err(|_| std::io::ErrorKind::Other.into())
                .and_then(|()| match &output.file {
                    Some(file) => (&*file).write_all(line.as_bytes()),
                    None if self.default == Destination::Stdout => {
                        std::io::stdout().lock().write_all(line.as_bytes())
                    }
                    None => std::io::stderr().lock().write_all(line.as_bytes()),
                });
            if written.is_err() {
                crate::metrics::METRICS.logger.missed_log_count.inc();
            }
        };
        // A line logged while formatting another (a Display that logs) gets its own buffer.
        let reused = LINE.try_with(|kept| match kept.try_borrow_mut() {
            Ok(mut line) => {
                emit(&mut line);
                if line.capacity() > KEPT_LINE_CAPACITY {
                    *line = String::new();
                }
                true
            }
            Err(_) => false,
        });
        if reused != Ok(true) {
            emit(&mut String::new());
        }
    }

    fn flush(&self) {}
}

/// Parses Firecracker's level names (`Error`, `Warning`, `Info`, `Debug`, `Trace`, `Off`),
/// in any case; `Warn` is accepted too.
pub fn parse_level(name: &str) -> Result<LevelFilter, String> {
    match name.to_ascii_lowercase().as_str() {
        "off" => Ok(LevelFilter::Off),
        "error" => Ok(LevelFilter::Error),
        "warning" | "warn" => Ok(LevelFilter::Warn),
        "info" => Ok(LevelFilter::Info),
        "debug" => Ok(LevelFilter::Debug),
        "trace" => Ok(LevelFilter::Trace),
        _ => Err(format!(
            "unknown log level {name:?}: use Error, Warning, Info, Debug, Trace or Off"
        )),
    }
}

/// The level a configuration without one sets (Firecracker's default).
const DEFAULT_LEVEL: &str = "Info";

/// Applies Firecracker's logger configuration, as Firecracker does each time it is given
/// (`--log-path`, the config file, then any number of `PUT /logger` before boot): a field
/// given replaces what was there, a field left out keeps it, except the level, which goes back
/// to Info. The first configuration turns off the level and origin that stderr's lines show
/// (a log file shows them only when asked, as Firecracker's does). Returns the configuration
/// now in force, for `GET /vm/config`.
pub fn configure(config: &LoggerConfig) -> Result<LoggerConfig, LoggerError> {
    let level_name = config.level.as_deref().unwrap_or(DEFAULT_LEVEL);
    let level = parse_level(level_name).map_err(LoggerError::Level)?;
    // Opened first: a refused configuration changes nothing.
    let file = config
        .log_path
        .as_deref()
        .map(|path| {
            open_sink(path).map_err(|source| LoggerError::Open {
                path: path.to_path_buf(),
                source,
            })
        })
        .transpose()?;
    let mut output = OUTPUT.write().unwrap_or_else(|p| p.into_inner());
    if !output.configured {
        output.show_level = false;
        output.show_origin = false;
        output.configured = true;
    }
    if let Some(file) = file {
        output.file = Some(file);
        output.path = config.log_path.clone();
    }
    if let Some(show_level) = config.show_level {
        output.show_level = show_level;
    }
    if let Some(show_origin) = config.show_log_origin {
        output.show_origin = show_origin;
    }
    if let Some(module) = &config.module {
        output.module = Some(module.clone());
    }
    log::set_max_level(level);
    Ok(LoggerConfig {
        log_path: output.path.clone(),
        level: Some(level_name.to_string()),
        show_level: Some(output.show_level),
        show_log_origin: Some(output.show_origin),
        module: output.module.clone(),
    })
}

/// Installs the logger for the process.
pub fn init(instance_id: &str, level: LevelFilter, default: Destination) {
    let logger = Logger {
        instance_id: instance_id.to_string(),
        default,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_utc_civil_time() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123);
        assert_eq!(timestamp(t), "2023-11-14T22:13:20.000000123");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000");
    }

    #[test]
    fn firecracker_level_names_parse() {
        assert_eq!(parse_level("Warning"), Ok(LevelFilter::Warn));
        assert_eq!(parse_level("INFO"), Ok(LevelFilter::Info));
        assert!(parse_level("loud").is_err());
    }
}
