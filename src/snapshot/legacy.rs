//! The bodies of earlier state file versions, read into today's types, so that no snapshot a
//! mote wrote is lost to a later mote. Versions 1 and 2 have the same body (2 only added the
//! arch to the header); version 3 added each virtio device's rate limiters, which an older
//! snapshot's devices did not have: they come back without limits, as they ran. Each type here
//! mirrors, field for field and in order, the type of its name as version 2 had it (bincode
//! has no field names: the order is the format); the types that did not change are today's.
//! Version 4 added the VM generation ID's placement to the devices (a version-3 guest has no
//! such device and comes back without one) and the balloon's free page hinting run (a
//! version-3 balloon had none). The virtio slots' outer layers did not change: one generic
//! mirror of them serves every version, over that version's device-specific state.
//! Version 5 added the memory file's kind at the end: every older snapshot's is Full.

use devices::legacy::serial::SerialDeviceState;
use devices::rate_limiter::RateLimiterState;
use devices::virtio::balloon::{BalloonState, Hinting, STAT_TAGS};
use devices::virtio::state::{
    DeviceSpecificState, MmioTransportState, QueueSnapshot, VirtioDeviceState,
};
use serde::Deserialize;

use super::{config_as_json, MemoryFileKind, MemoryRegionState, MicrovmState};
use crate::arch::{LegacyDevicesState, VcpuState, VmState};
use crate::config::VmConfigFile;
use crate::device_manager::{DevicesState, VirtioSlotState};

/// Version 4: today's state but for the memory file's kind.
#[derive(Deserialize)]
pub struct MicrovmStateV4 {
    #[serde(with = "config_as_json")]
    config: VmConfigFile,
    memory: Vec<MemoryRegionState>,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    devices: DevicesState,
}

impl From<MicrovmStateV4> for MicrovmState {
    fn from(old: MicrovmStateV4) -> Self {
        MicrovmState {
            config: old.config,
            memory: old.memory,
            vm: old.vm,
            vcpus: old.vcpus,
            devices: old.devices,
            memory_file: MemoryFileKind::Full,
        }
    }
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct MicrovmStateV3 {
    #[serde(with = "config_as_json")]
    config: VmConfigFile,
    memory: Vec<MemoryRegionState>,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    devices: DevicesStateV3,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct DevicesStateV3 {
    serial: SerialDeviceState,
    legacy: LegacyDevicesState,
    virtio: Vec<OldVirtioSlotState<DeviceSpecificStateV3>>,
}

/// Version 3's device-specific state: today's, but for the balloon's.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
enum DeviceSpecificStateV3 {
    Block {
        drive_id: String,
        config_generation: u32,
        rate_limiter: RateLimiterState,
    },
    Net {
        iface_id: String,
        mac: Option<[u8; 6]>,
        rx_rate_limiter: RateLimiterState,
        tx_rate_limiter: RateLimiterState,
    },
    Vsock {
        guest_cid: u64,
    },
    Entropy {
        rate_limiter: RateLimiterState,
    },
    Balloon(Box<BalloonStateV3>),
}

/// Version 3's balloon: no free page hinting.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct BalloonStateV3 {
    target_pages: u32,
    actual_pages: u32,
    stats_polling_interval_s: u16,
    stats_head: Option<u16>,
    guest_stats: [Option<u64>; STAT_TAGS],
    config_generation: u32,
}

impl From<DeviceSpecificStateV3> for DeviceSpecificState {
    fn from(old: DeviceSpecificStateV3) -> Self {
        match old {
            DeviceSpecificStateV3::Block {
                drive_id,
                config_generation,
                rate_limiter,
            } => DeviceSpecificState::Block {
                drive_id,
                config_generation,
                rate_limiter,
            },
            DeviceSpecificStateV3::Net {
                iface_id,
                mac,
                rx_rate_limiter,
                tx_rate_limiter,
            } => DeviceSpecificState::Net {
                iface_id,
                mac,
                rx_rate_limiter,
                tx_rate_limiter,
            },
            DeviceSpecificStateV3::Vsock { guest_cid } => DeviceSpecificState::Vsock { guest_cid },
            DeviceSpecificStateV3::Entropy { rate_limiter } => {
                DeviceSpecificState::Entropy { rate_limiter }
            }
            DeviceSpecificStateV3::Balloon(old) => {
                DeviceSpecificState::Balloon(Box::new(BalloonState {
                    target_pages: old.target_pages,
                    actual_pages: old.actual_pages,
                    stats_polling_interval_s: old.stats_polling_interval_s,
                    stats_head: old.stats_head,
                    guest_stats: old.guest_stats,
                    config_generation: old.config_generation,
                    hinting: Hinting::default(),
                }))
            }
        }
    }
}

impl From<MicrovmStateV3> for MicrovmState {
    fn from(old: MicrovmStateV3) -> Self {
        MicrovmState {
            config: old.config,
            memory: old.memory,
            vm: old.vm,
            vcpus: old.vcpus,
            devices: DevicesState {
                serial: old.devices.serial,
                legacy: old.devices.legacy,
                virtio: old.devices.virtio.into_iter().map(Into::into).collect(),
                vmgenid: None,
            },
            memory_file: MemoryFileKind::Full,
        }
    }
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct MicrovmStateV2 {
    #[serde(with = "config_as_json")]
    config: VmConfigFile,
    memory: Vec<MemoryRegionState>,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    devices: DevicesStateV2,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct DevicesStateV2 {
    serial: SerialDeviceState,
    legacy: LegacyDevicesState,
    virtio: Vec<OldVirtioSlotState<DeviceSpecificStateV2>>,
}

/// A virtio slot as versions 1 to 3 saved it, `S` being that version's device-specific state.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct OldVirtioSlotState<S> {
    addr: u64,
    transport: OldMmioTransportState<S>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct OldMmioTransportState<S> {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueSnapshot>,
    activated: bool,
    interrupt_status: u32,
    needs_reset: bool,
    device: OldVirtioDeviceState<S>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct OldVirtioDeviceState<S> {
    device_type: u32,
    acked_features: u64,
    queues: Option<Vec<QueueSnapshot>>,
    specific: S,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
enum DeviceSpecificStateV2 {
    Block {
        drive_id: String,
        config_generation: u32,
    },
    Net {
        iface_id: String,
        mac: Option<[u8; 6]>,
    },
    Vsock {
        guest_cid: u64,
    },
    Entropy,
}

impl From<MicrovmStateV2> for MicrovmState {
    fn from(old: MicrovmStateV2) -> Self {
        MicrovmState {
            config: old.config,
            memory: old.memory,
            vm: old.vm,
            vcpus: old.vcpus,
            devices: DevicesState {
                serial: old.devices.serial,
                legacy: old.devices.legacy,
                virtio: old.devices.virtio.into_iter().map(Into::into).collect(),
                vmgenid: None,
            },
            memory_file: MemoryFileKind::Full,
        }
    }
}

impl<S: Into<DeviceSpecificState>> From<OldVirtioSlotState<S>> for VirtioSlotState {
    fn from(old: OldVirtioSlotState<S>) -> Self {
        let t = old.transport;
        VirtioSlotState {
            addr: old.addr,
            transport: MmioTransportState {
                status: t.status,
                device_features_sel: t.device_features_sel,
                driver_features_sel: t.driver_features_sel,
                driver_features: t.driver_features,
                queue_sel: t.queue_sel,
                queues: t.queues,
                activated: t.activated,
                interrupt_status: t.interrupt_status,
                needs_reset: t.needs_reset,
                device: VirtioDeviceState {
                    device_type: t.device.device_type,
                    acked_features: t.device.acked_features,
                    queues: t.device.queues,
                    specific: t.device.specific.into(),
                },
            },
        }
    }
}

impl From<DeviceSpecificStateV2> for DeviceSpecificState {
    fn from(old: DeviceSpecificStateV2) -> Self {
        let unlimited = RateLimiterState::default;
        match old {
            DeviceSpecificStateV2::Block {
                drive_id,
                config_generation,
            } => DeviceSpecificState::Block {
                drive_id,
                config_generation,
                rate_limiter: unlimited(),
            },
            DeviceSpecificStateV2::Net { iface_id, mac } => DeviceSpecificState::Net {
                iface_id,
                mac,
                rx_rate_limiter: unlimited(),
                tx_rate_limiter: unlimited(),
            },
            DeviceSpecificStateV2::Vsock { guest_cid } => DeviceSpecificState::Vsock { guest_cid },
            DeviceSpecificStateV2::Entropy => DeviceSpecificState::Entropy {
                rate_limiter: unlimited(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{decode, SNAPSHOT_ARCH, SNAPSHOT_MAGIC};

    fn queue() -> QueueSnapshot {
        QueueSnapshot {
            max_size: 256,
            next_avail: 7,
            next_used: 7,
            event_idx_enabled: true,
            size: 256,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        }
    }

    fn slot<S>(addr: u64, device_type: u32, specific: S) -> OldVirtioSlotState<S> {
        OldVirtioSlotState {
            addr,
            transport: OldMmioTransportState {
                status: 15,
                device_features_sel: 1,
                driver_features_sel: 1,
                driver_features: 1 << 32,
                queue_sel: 0,
                queues: vec![queue()],
                activated: true,
                interrupt_status: 0,
                needs_reset: false,
                device: OldVirtioDeviceState {
                    device_type,
                    acked_features: 1 << 32,
                    queues: Some(vec![queue()]),
                    specific,
                },
            },
        }
    }

    /// A version-2 state file as a mote of that version wrote it: three devices whose state
    /// has changed since.
    fn version_2_file() -> Vec<u8> {
        let old = MicrovmStateV2 {
            config: serde_json::from_str(
                r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}"#,
            )
            .unwrap(),
            memory: vec![MemoryRegionState {
                guest_addr: 0,
                size: 128 << 20,
            }],
            vm: VmState::default(),
            vcpus: Vec::new(),
            devices: DevicesStateV2 {
                serial: vm_superio::serial::SerialState::default().into(),
                legacy: LegacyDevicesState::default(),
                virtio: vec![
                    slot(
                        0x1000,
                        2,
                        DeviceSpecificStateV2::Block {
                            drive_id: "rootfs".into(),
                            config_generation: 3,
                        },
                    ),
                    slot(
                        0x2000,
                        1,
                        DeviceSpecificStateV2::Net {
                            iface_id: "eth0".into(),
                            mac: Some([6, 0, 10, 0, 0, 2]),
                        },
                    ),
                    slot(0x3000, 4, DeviceSpecificStateV2::Entropy),
                ],
            },
        };
        file_of_version(2, &bincode::serialize(&old).unwrap())
    }

    /// A state file of `version` around `body`, with a valid checksum.
    fn file_of_version(version: u32, body: &[u8]) -> Vec<u8> {
        let mut bytes = SNAPSHOT_MAGIC.to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&u32::from(SNAPSHOT_ARCH).to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(body);
        let crc = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182).checksum(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn a_version_3_file_reads_into_todays_state_without_a_generation_id_or_hinting() {
        let v2 = decode(&version_2_file()).unwrap();
        let limiter = RateLimiterState::default();
        let old = MicrovmStateV3 {
            config: v2.config,
            memory: v2.memory,
            vm: v2.vm,
            vcpus: v2.vcpus,
            devices: DevicesStateV3 {
                serial: v2.devices.serial,
                legacy: v2.devices.legacy,
                virtio: vec![
                    slot(
                        0x1000,
                        1,
                        DeviceSpecificStateV3::Net {
                            iface_id: "eth0".into(),
                            mac: Some([6, 0, 10, 0, 0, 2]),
                            rx_rate_limiter: limiter,
                            tx_rate_limiter: limiter,
                        },
                    ),
                    slot(
                        0x2000,
                        5,
                        DeviceSpecificStateV3::Balloon(Box::new(BalloonStateV3 {
                            target_pages: 256,
                            actual_pages: 128,
                            stats_polling_interval_s: 1,
                            stats_head: Some(3),
                            guest_stats: [Some(7); STAT_TAGS],
                            config_generation: 2,
                        })),
                    ),
                ],
            },
        };
        let state = decode(&file_of_version(3, &bincode::serialize(&old).unwrap())).unwrap();
        assert_eq!(state.devices.vmgenid, None);
        let specific: Vec<_> = state
            .devices
            .virtio
            .iter()
            .map(|slot| slot.transport.device.specific.clone())
            .collect();
        assert_eq!(
            specific,
            vec![
                DeviceSpecificState::Net {
                    iface_id: "eth0".into(),
                    mac: Some([6, 0, 10, 0, 0, 2]),
                    rx_rate_limiter: limiter,
                    tx_rate_limiter: limiter,
                },
                DeviceSpecificState::Balloon(Box::new(BalloonState {
                    target_pages: 256,
                    actual_pages: 128,
                    stats_polling_interval_s: 1,
                    stats_head: Some(3),
                    guest_stats: [Some(7); STAT_TAGS],
                    config_generation: 2,
                    hinting: Hinting::default(),
                })),
            ]
        );
    }

    #[test]
    fn a_version_2_file_reads_into_todays_state_without_limits() {
        let state = decode(&version_2_file()).unwrap();
        let specific: Vec<_> = state
            .devices
            .virtio
            .iter()
            .map(|slot| slot.transport.device.specific.clone())
            .collect();
        let unlimited = RateLimiterState::default();
        assert_eq!(
            specific,
            vec![
                DeviceSpecificState::Block {
                    drive_id: "rootfs".into(),
                    config_generation: 3,
                    rate_limiter: unlimited,
                },
                DeviceSpecificState::Net {
                    iface_id: "eth0".into(),
                    mac: Some([6, 0, 10, 0, 0, 2]),
                    rx_rate_limiter: unlimited,
                    tx_rate_limiter: unlimited,
                },
                DeviceSpecificState::Entropy {
                    rate_limiter: unlimited,
                },
            ]
        );
        let slot = &state.devices.virtio[1];
        assert_eq!(slot.addr, 0x2000);
        assert_eq!(slot.transport.queues, vec![queue()]);
        assert_eq!(slot.transport.device.queues, Some(vec![queue()]));
        assert_eq!(state.config.machine_config.mem_size_mib, 128);
    }
}
