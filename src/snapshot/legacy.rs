//! The bodies of earlier state file versions, read into today's types, so that no snapshot a
//! mote wrote is lost to a later mote. Versions 1 and 2 have the same body (2 only added the
//! arch to the header); version 3 added each virtio device's rate limiters, which an older
//! snapshot's devices did not have: they come back without limits, as they ran. Each type here
//! mirrors, field for field and in order, the type of its name as version 2 had it (bincode
//! has no field names: the order is the format); the types that did not change are today's.
//! Version 4 added the VM generation ID's placement to the devices; a version-3 guest has no
//! such device and comes back without one.

use devices::legacy::serial::SerialDeviceState;
use devices::rate_limiter::RateLimiterState;
use devices::virtio::state::{
    DeviceSpecificState, MmioTransportState, QueueSnapshot, VirtioDeviceState,
};
use serde::Deserialize;

use super::{config_as_json, MemoryRegionState, MicrovmState};
use crate::arch::{LegacyDevicesState, VcpuState, VmState};
use crate::config::VmConfigFile;
use crate::device_manager::{DevicesState, VirtioSlotState};

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
    virtio: Vec<VirtioSlotState>,
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
                virtio: old.devices.virtio,
                vmgenid: None,
            },
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
    virtio: Vec<VirtioSlotStateV2>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct VirtioSlotStateV2 {
    addr: u64,
    transport: MmioTransportStateV2,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct MmioTransportStateV2 {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueSnapshot>,
    activated: bool,
    interrupt_status: u32,
    needs_reset: bool,
    device: VirtioDeviceStateV2,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct VirtioDeviceStateV2 {
    device_type: u32,
    acked_features: u64,
    queues: Option<Vec<QueueSnapshot>>,
    specific: DeviceSpecificStateV2,
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
        }
    }
}

impl From<VirtioSlotStateV2> for VirtioSlotState {
    fn from(old: VirtioSlotStateV2) -> Self {
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

    fn slot(addr: u64, device_type: u32, specific: DeviceSpecificStateV2) -> VirtioSlotStateV2 {
        VirtioSlotStateV2 {
            addr,
            transport: MmioTransportStateV2 {
                status: 15,
                device_features_sel: 1,
                driver_features_sel: 1,
                driver_features: 1 << 32,
                queue_sel: 0,
                queues: vec![queue()],
                activated: true,
                interrupt_status: 0,
                needs_reset: false,
                device: VirtioDeviceStateV2 {
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
    fn a_version_3_file_reads_into_todays_state_without_a_generation_id() {
        let v2 = decode(&version_2_file()).unwrap();
        let old = MicrovmStateV3 {
            config: v2.config,
            memory: v2.memory,
            vm: v2.vm,
            vcpus: v2.vcpus,
            devices: DevicesStateV3 {
                serial: v2.devices.serial,
                legacy: v2.devices.legacy,
                virtio: v2.devices.virtio.clone(),
            },
        };
        let state = decode(&file_of_version(3, &bincode::serialize(&old).unwrap())).unwrap();
        assert_eq!(state.devices.vmgenid, None);
        assert_eq!(state.devices.virtio.len(), 3);
        assert_eq!(
            state.devices.virtio[1].transport.device.specific,
            v2.devices.virtio[1].transport.device.specific
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
