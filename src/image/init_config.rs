//! What mote tells its guest init (`mote-init`, src/bin/mote-init) about the container to
//! run, and where the init reports how it ended. Shared by both (the init includes this file).
//!
//! Both travel on a small raw drive of their own, the "control drive" (the guest's
//! `/dev/vdb`), rather than on the kernel command line (at most 2048 bytes, too few for an
//! image's environment) or in the root image (which is shared by every run of an image, and
//! would need an ext4 writer on the host per run): the first sector is where the init writes
//! its report, the second where mote writes a signal for the program (then types
//! Ctrl-Alt-Del, which the kernel turns into SIGINT for init), and the configuration (JSON)
//! follows from the third sector, ended by a NUL.

use serde::{Deserialize, Serialize};

/// The guest's name for the root drive (the per-run copy of the image's root file system).
pub const ROOT_DEVICE: &str = "/dev/vda";
/// The guest's name for the control drive.
pub const CONTROL_DEVICE: &str = "/dev/vdb";
/// The sector size the control drive is laid out in.
pub const SECTOR: usize = 512;
/// The report's first word, then the program's exit status.
pub const EXIT_PREFIX: &str = "mote-exit: ";
/// Where the signal slot is.
pub const SIGNAL_OFFSET: u64 = SECTOR as u64;
/// Where the configuration starts.
pub const CONFIG_OFFSET: usize = 2 * SECTOR;
/// The signal slot's first word, then a sequence number (a new signal has a higher one) and
/// the signal's number.
pub const SIGNAL_PREFIX: &str = "mote-signal: ";

/// The container to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// The program and its arguments (the image's Entrypoint and Cmd, or what overrode them).
    pub args: Vec<String>,
    /// `NAME=VALUE` strings.
    pub env: Vec<String>,
    /// The working directory (made when missing, as Docker does).
    pub workdir: String,
    /// `user[:group]`, each a name or a number (the image's User); empty for root.
    pub user: String,
    pub hostname: String,
    /// Drives mounted in the root before the program starts.
    pub volumes: Vec<Volume>,
    /// What /etc/resolv.conf becomes (with a network); None leaves the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolv_conf: Option<String>,
}

/// An extra drive mounted at `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// The guest's block device (`/dev/vdc`, …).
    pub device: String,
    pub path: String,
    pub read_only: bool,
}

/// The guest's name for the `index`th drive (0: vda).
pub fn drive_device(index: usize) -> String {
    let letter = char::from(b'a' + u8::try_from(index % 26).unwrap_or(0));
    format!("/dev/vd{letter}")
}

/// The exit status in a report sector, if the init wrote one.
pub fn parse_report(sector: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(sector.split(|b| *b == 0).next()?).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(EXIT_PREFIX))
        .and_then(|status| status.trim().parse().ok())
}

/// The signal slot's text for the `sequence`th signal, `signal`.
pub fn signal_slot(sequence: u64, signal: i32) -> Vec<u8> {
    let mut slot = format!("{SIGNAL_PREFIX}{sequence} {signal}\n").into_bytes();
    slot.resize(SECTOR, 0);
    slot
}

/// The sequence number and signal in a signal slot, if mote wrote one.
pub fn parse_signal_slot(sector: &[u8]) -> Option<(u64, i32)> {
    let text = std::str::from_utf8(sector.split(|b| *b == 0).next()?).ok()?;
    let rest = text.lines().next()?.strip_prefix(SIGNAL_PREFIX)?;
    let (sequence, signal) = rest.split_once(' ')?;
    Some((sequence.parse().ok()?, signal.trim().parse().ok()?))
}
