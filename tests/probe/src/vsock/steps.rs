//! The vsock steps: `vsock-init[:SLOT]`, `vsock-echo-listen:PORT:CONNS`,
//! `vsock-connect-echo:HOSTPORT:BYTES`, `vsock-bench-recv:PORT`,
//! `vsock-bench-send:HOSTPORT:MIB`, `vsock-hostile:CASE` (see README.md).

use super::{Role, Vsock};
use crate::steps::parse_u64;

/// Polls without progress after a hostile packet before deciding no answer comes.
const HOSTILE_WAIT_POLLS: u64 = 5_000_000;

pub fn init(slot: u64) -> Option<Vsock> {
    match Vsock::start(slot) {
        Ok(device) => {
            report!("vsock-init cid={}", device.cid);
            Some(device)
        }
        Err(err) => {
            report!("vsock-init error {err:?}");
            None
        }
    }
}

pub fn step<'a>(device: &mut Vsock, name: &str, args: &mut impl Iterator<Item = &'a [u8]>) {
    if name == "vsock-hostile" {
        hostile(device, args.next().unwrap_or_default());
        return;
    }
    let first = parse_u64(args.next()).unwrap_or(0);
    let second = parse_u64(args.next()).unwrap_or(1);
    match name {
        "vsock-echo-listen" => echo_listen(device, first as u32, second as usize),
        "vsock-connect-echo" => connect(device, name, first as u32, Role::Check { total: second }),
        "vsock-bench-send" => connect(
            device,
            name,
            first as u32,
            Role::Source {
                total: second << 20,
            },
        ),
        "vsock-bench-recv" => {
            device.listen(first as u32, Role::Sink);
            report!("vsock: listening port={first}");
            if device.run_until(|d| d.finished_count() >= 1) {
                report!("vsock-bench-recv bytes={}", device.total_received());
            } else {
                report!("vsock-bench-recv timeout bytes={}", device.total_received());
            }
            device.forget_finished();
        }
        _ => report!("error unknown step {name}"),
    }
}

/// Accepts `conns` host connections on `port` and echoes each until both sides shut down.
fn echo_listen(device: &mut Vsock, port: u32, conns: usize) {
    device.listen(port, Role::Echo);
    report!("vsock: listening port={port}");
    let conns = conns.min(super::MAX_CONNS);
    let finished = device.run_until(|d| d.finished_count() >= conns);
    let bytes = device.total_received();
    if finished {
        report!("vsock-echo-listen conns={conns} bytes={bytes}");
    } else {
        report!(
            "vsock-echo-listen timeout finished={} bytes={bytes}",
            device.finished_count()
        );
    }
    device.forget_finished();
}

/// Connects to host port `port` and runs the stream in `role` until the host side ends it.
fn connect(device: &mut Vsock, name: &str, port: u32, role: Role) {
    let Some(index) = device.connect(port, role) else {
        report!("{name} error no free connection");
        return;
    };
    let ended = device.run_until(|d| d.is_finished(index));
    let outcome = device.outcome(index);
    if !outcome.established {
        report!("{name} rst");
    } else if !ended {
        report!(
            "{name} timeout sent={} received={}",
            outcome.sent,
            outcome.received
        );
    } else if matches!(role, Role::Check { .. }) {
        report!(
            "{name} bytes={} match={} checksum={:#018x}",
            outcome.received,
            if outcome.matched { "yes" } else { "no" },
            outcome.checksum
        );
    } else {
        report!("{name} bytes={}", outcome.sent);
    }
    device.forget_finished();
}

/// `vsock-hostile:CASE`: sends a malformed packet and reports whether an RST came back and
/// whether the device still runs.
fn hostile(device: &mut Vsock, case: &[u8]) {
    let case = core::str::from_utf8(case).unwrap_or("<not utf-8>");
    if !device.send_hostile(case.as_bytes()) {
        report!("error unknown hostile case {case}");
        return;
    }
    let before = device.stray_rsts;
    device.run_until_idle_for(HOSTILE_WAIT_POLLS, |d| d.stray_rsts > before);
    report!(
        "vsock-hostile {case} rst={} needs_reset={}",
        if device.stray_rsts > before {
            "yes"
        } else {
            "no"
        },
        if device.needs_reset() { "yes" } else { "no" }
    );
}
