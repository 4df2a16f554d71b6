//! Firecracker's flags alone, parsed by hand: the command line of every monitor a spawner or
//! a jailer starts for the API. clap builds its whole command first (every flag's definition,
//! its groups and key maps, each allocated and, with musl's allocator, mapped and unmapped),
//! which took 0.16-0.19 ms of the 1.0 ms to the API's first answer here. This parser takes only
//! what it is sure of: `--flag VALUE`, `--flag=VALUE` and plain switches, each at most once,
//! with values it can check exactly as clap would. Anything else (a command, help, the
//! version, an unknown or repeated flag, a conflict, a value it is unsure of) is left to clap,
//! whose answer or error, with its usage, stays the one users see.

use std::ffi::OsString;
use std::path::PathBuf;

use super::{parse_instance_id, ApiArgs, Cli, TopArgs, DEFAULT_API_SOCK};
use crate::logger::parse_level;

/// The flags mote takes without a command, each a switch or a flag with a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Flag {
    Level,
    Id,
    NoSeccomp,
    SeccompFilter,
    SnapshotVersion,
    DescribeSnapshot,
    ApiSock,
    ConfigFile,
    NoApi,
    BootTimer,
    LogPath,
    ShowLevel,
    ShowLogOrigin,
    Module,
    MetricsPath,
    HttpApiMaxPayloadSize,
    StartTimeUs,
    StartTimeCpuUs,
    ParentCpuTimeUs,
    EnablePci,
    MmdsSizeLimit,
}

const FLAGS: [(&str, Flag); 21] = [
    ("level", Flag::Level),
    ("id", Flag::Id),
    ("no-seccomp", Flag::NoSeccomp),
    ("seccomp-filter", Flag::SeccompFilter),
    ("snapshot-version", Flag::SnapshotVersion),
    ("describe-snapshot", Flag::DescribeSnapshot),
    ("api-sock", Flag::ApiSock),
    ("config-file", Flag::ConfigFile),
    ("no-api", Flag::NoApi),
    ("boot-timer", Flag::BootTimer),
    ("log-path", Flag::LogPath),
    ("show-level", Flag::ShowLevel),
    ("show-log-origin", Flag::ShowLogOrigin),
    ("module", Flag::Module),
    ("metrics-path", Flag::MetricsPath),
    ("http-api-max-payload-size", Flag::HttpApiMaxPayloadSize),
    ("start-time-us", Flag::StartTimeUs),
    ("start-time-cpu-us", Flag::StartTimeCpuUs),
    ("parent-cpu-time-us", Flag::ParentCpuTimeUs),
    ("enable-pci", Flag::EnablePci),
    ("mmds-size-limit", Flag::MmdsSizeLimit),
];

impl Flag {
    fn named(name: &str) -> Option<Flag> {
        FLAGS
            .iter()
            .find(|(flag_name, _)| *flag_name == name)
            .map(|(_, flag)| *flag)
    }

    fn is_switch(self) -> bool {
        matches!(
            self,
            Flag::NoSeccomp
                | Flag::SnapshotVersion
                | Flag::NoApi
                | Flag::BootTimer
                | Flag::ShowLevel
                | Flag::ShowLogOrigin
                | Flag::EnablePci
        )
    }
}

/// A number as clap's parser for it takes it; None for what this parser leaves to clap (a
/// sign, spaces, an overflow).
fn number<T: std::str::FromStr>(value: &str) -> Option<T> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// `args` (the program's name first) parsed, with whether `--api-sock` was given; None for a
/// command line this parser leaves to clap.
pub(super) fn parse(args: &[OsString]) -> Option<(Cli, bool)> {
    let mut top = TopArgs {
        level: parse_level("Info").ok()?,
        id: "anonymous-instance".to_string(),
        no_seccomp: false,
        seccomp_filter: None,
        api: ApiArgs {
            api_sock: PathBuf::from(DEFAULT_API_SOCK),
            config_file: None,
            no_api: false,
            boot_timer: false,
            log_path: None,
            show_level: false,
            show_log_origin: false,
            module: None,
            metrics_path: None,
            http_api_max_payload_size: crate::api::http::DEFAULT_MAX_PAYLOAD,
            start_time_us: None,
            start_time_cpu_us: None,
            parent_cpu_time_us: None,
            enable_pci: false,
            mmds_size_limit: None,
        },
        snapshot_version: false,
        describe_snapshot: None,
    };
    let mut seen: Vec<Flag> = Vec::with_capacity(args.len());
    let mut words = args.iter().skip(1);
    while let Some(word) = words.next() {
        let word = word.to_str()?.strip_prefix("--")?;
        let (name, inline) = match word.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (word, None),
        };
        let flag = Flag::named(name)?;
        if seen.contains(&flag) {
            return None;
        }
        seen.push(flag);
        if flag.is_switch() {
            if inline.is_some() {
                return None;
            }
            match flag {
                Flag::NoSeccomp => top.no_seccomp = true,
                Flag::SnapshotVersion => top.snapshot_version = true,
                Flag::NoApi => top.api.no_api = true,
                Flag::BootTimer => top.api.boot_timer = true,
                Flag::ShowLevel => top.api.show_level = true,
                Flag::ShowLogOrigin => top.api.show_log_origin = true,
                Flag::EnablePci => top.api.enable_pci = true,
                _ => return None,
            }
            continue;
        }
        let value = match inline {
            Some(value) => value,
            None => words.next()?.to_str()?,
        };
        // An empty value, or one clap could take for a flag, is clap's to judge.
        if value.is_empty() || value.starts_with('-') {
            return None;
        }
        let path = || Some(PathBuf::from(value));
        match flag {
            Flag::Level => top.level = parse_level(value).ok()?,
            Flag::Id => top.id = parse_instance_id(value).ok()?,
            Flag::SeccompFilter => top.seccomp_filter = path(),
            Flag::DescribeSnapshot => top.describe_snapshot = path(),
            Flag::ApiSock => top.api.api_sock = path()?,
            Flag::ConfigFile => top.api.config_file = path(),
            Flag::LogPath => top.api.log_path = path(),
            Flag::Module => top.api.module = Some(value.to_string()),
            Flag::MetricsPath => top.api.metrics_path = path(),
            Flag::HttpApiMaxPayloadSize => top.api.http_api_max_payload_size = number(value)?,
            Flag::StartTimeUs => top.api.start_time_us = Some(number(value)?),
            Flag::StartTimeCpuUs => top.api.start_time_cpu_us = Some(number(value)?),
            Flag::ParentCpuTimeUs => top.api.parent_cpu_time_us = Some(number(value)?),
            Flag::MmdsSizeLimit => top.api.mmds_size_limit = Some(number(value)?),
            _ => return None,
        }
    }
    // clap's conflicts and requirements: its error names them.
    let conflict = (top.no_seccomp && top.seccomp_filter.is_some())
        || (top.snapshot_version && top.describe_snapshot.is_some())
        || (top.api.no_api && top.api.config_file.is_none());
    if conflict {
        return None;
    }
    let api_sock_given = seen.contains(&Flag::ApiSock);
    Some((Cli { top, command: None }, api_sock_given))
}
