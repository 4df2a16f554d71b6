//! `mote snapshot describe FILE`: what a state file holds, in lines a person reads before
//! restoring it (and a script can grep): its format version, the machine, its devices with
//! the host files and TAPs a restore reopens, and the size its memory file must have.

use std::fmt::Write;
use std::path::Path;

use super::{read_format_version, read_state_file, MemoryFileKind, MicrovmState, SnapshotError};
use crate::arch::{arch_name, SNAPSHOT_ARCH};

/// The description of the state file at `path`; any format version this mote reads.
pub fn describe_file(path: &Path) -> Result<String, SnapshotError> {
    let version = read_format_version(path)?;
    let state = read_state_file(path)?;
    Ok(describe(&state, version))
}

fn mib(bytes: u64) -> String {
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// One `key: value` line a fact, lists one line an item.
pub fn describe(state: &MicrovmState, version: u32) -> String {
    let config = &state.config;
    let mut out = String::new();
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    line(format!(
        "format: v{version} (this mote writes v{})",
        super::SNAPSHOT_VERSION
    ));
    line(format!("arch: {}", arch_name(SNAPSHOT_ARCH)));
    line(format!("vcpus: {}", state.vcpus.len()));
    let total: u64 = state.memory.iter().map(|region| region.size).sum();
    line(format!(
        "memory: {} ({} configured)",
        mib(total),
        mib(config.machine_config.mem_size_mib << 20)
    ));
    for region in &state.memory {
        line(format!(
            "memory region: {:#x} {}",
            region.guest_addr,
            mib(region.size)
        ));
    }
    line(format!("memory file size: {total} bytes"));
    line(format!(
        "memory file: {}",
        match &state.memory_file {
            MemoryFileKind::Full => "Full",
            MemoryFileKind::Diff { .. } =>
                "Diff (the pages written since the snapshot before: load it rebased onto that snapshot's memory file, mote snapshot rebase)",
        }
    ));
    for drive in &config.drives {
        let mut how = vec![if drive.is_read_only { "ro" } else { "rw" }];
        if drive.is_root_device {
            how.push("root");
        }
        line(format!(
            "drive: {} {} ({})",
            drive.drive_id,
            drive.path_on_host.display(),
            how.join(", ")
        ));
    }
    for iface in &config.network_interfaces {
        let mac = iface
            .guest_mac
            .map_or_else(|| "the guest's own MAC".to_string(), |mac| mac.to_string());
        line(format!(
            "network interface: {} tap {} {mac}",
            iface.iface_id, iface.host_dev_name
        ));
    }
    if let Some(vsock) = &config.vsock {
        line(format!(
            "vsock: cid {} {}",
            vsock.guest_cid,
            vsock.uds_path.display()
        ));
    }
    if let Some(mmds) = &config.mmds_config {
        line(format!(
            "mmds: {:?} at {} on {} (the store is not kept: give the restore mmds_data)",
            mmds.version,
            mmds.address(),
            mmds.network_interfaces.join(", ")
        ));
    }
    if config.entropy.is_some() {
        line("entropy: virtio-rng".to_string());
    }
    if let Some(balloon) = &config.balloon {
        line(format!("balloon: {} MiB inflated", balloon.amount_mib));
    }
    line(format!(
        "vm generation id: {}",
        match state.devices.vmgenid {
            Some(placement) => format!("at {:#x}, line {}", placement.addr, placement.irq),
            None => "none (the guest was never told of one)".to_string(),
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_is_described_line_by_line() {
        let mut state = crate::snapshot::tests::state();
        state.config = serde_json::from_str(
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
                "drives": [{"drive_id": "rootfs", "path_on_host": "/r.ext4",
                            "is_root_device": true, "is_read_only": false}],
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                        "guest_mac": "06:00:ac:10:00:02"}],
                "vsock": {"guest_cid": 3, "uds_path": "/v.sock"},
                "mmds-config": {"version": "V2", "network_interfaces": ["eth0"]},
                "entropy": {}}"#,
        )
        .unwrap();
        let text = describe(&state, 3);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "format: v3 (this mote writes v{})",
                super::super::SNAPSHOT_VERSION
            )
        );
        for expected in [
            "memory: 128 MiB (128 MiB configured)",
            "memory region: 0x0 128 MiB",
            "memory file size: 134217728 bytes",
            "memory file: Diff (the pages written since the snapshot before: load it rebased onto that snapshot's memory file, mote snapshot rebase)",
            "drive: rootfs /r.ext4 (rw, root)",
            "network interface: eth0 tap tap0 06:00:ac:10:00:02",
            "vsock: cid 3 /v.sock",
            "entropy: virtio-rng",
            "mmds: V2 at 169.254.169.254 on eth0 (the store is not kept: give the restore mmds_data)",
            "vm generation id: at 0xe0040, line 23",
        ] {
            assert!(lines.contains(&expected), "{expected:?} not in:\n{text}");
        }
    }
}
