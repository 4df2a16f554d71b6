//! The interrupt rule on a split queue laid out by hand (virtio-queue's mock lays its used ring
//! over the end of its available ring, `used_event` included), and the shared part's handling
//! of EVENT_IDX at activation and restore.

use crate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::virtio::block::Block;
use crate::virtio::vsock::Vsock;
use crate::virtio::{VirtioDevice, INTERRUPT_USED_RING, TYPE_BLOCK};

const QUEUE_LEN: u16 = 16;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const USED_EVENT: u64 = AVAIL_RING + 4 + 2 * QUEUE_LEN as u64;
const NO_INTERRUPT: u16 = VRING_AVAIL_F_NO_INTERRUPT as u16;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap()
}

fn queue(event_idx: bool) -> Queue {
    let mut queue = Queue::new(QUEUE_LEN).unwrap();
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    queue.set_event_idx(event_idx);
    queue
}

/// The device returns one buffer; whether the driver gets an interrupt for it.
fn use_one(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    queue.add_used(mem, 0, 0).unwrap();
    needs_interrupt(queue, mem)
}

fn set(mem: &GuestMemoryMmap, addr: u64, value: u16) {
    mem.write_obj(value.to_le(), GuestAddress(addr)).unwrap();
}

#[test]
fn with_event_idx_the_driver_is_interrupted_once_used_event_is_passed() {
    let mem = memory();
    let mut queue = queue(true);
    // "Interrupt me when you use entry 2", and the flag, which EVENT_IDX makes meaningless.
    set(&mem, USED_EVENT, 2);
    set(&mem, AVAIL_RING, NO_INTERRUPT);
    assert!(!use_one(&mut queue, &mem), "used index 1");
    assert!(!use_one(&mut queue, &mem), "used index 2");
    assert!(
        use_one(&mut queue, &mem),
        "used index 3 passes used_event 2"
    );
    assert!(
        !use_one(&mut queue, &mem),
        "already told; used_event not moved"
    );
    // Several buffers in one batch: one interrupt when used_event is among them.
    set(&mem, USED_EVENT, 5);
    for _ in 0..3 {
        queue.add_used(&mem, 0, 0).unwrap();
    }
    assert!(
        needs_interrupt(&mut queue, &mem),
        "used index 4 to 7 passes 5"
    );
}

#[test]
fn without_event_idx_no_interrupt_decides() {
    let mem = memory();
    let mut queue = queue(false);
    // used_event means nothing without EVENT_IDX.
    set(&mem, USED_EVENT, 100);
    assert!(use_one(&mut queue, &mem));
    set(&mem, AVAIL_RING, NO_INTERRUPT);
    assert!(!use_one(&mut queue, &mem), "VRING_AVAIL_F_NO_INTERRUPT");
    assert!(!use_one(&mut queue, &mem));
    set(&mem, AVAIL_RING, 0);
    assert!(use_one(&mut queue, &mem));
}

fn common(features: u64) -> VirtioCommon {
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut common =
        VirtioCommon::new("test".into(), TYPE_BLOCK, &[QUEUE_LEN], 0, Vec::new(), irq).unwrap();
    common.set_acked_features(features);
    common
}

#[test]
fn the_queues_follow_the_drivers_event_idx_choice() {
    for (features, event_idx) in [
        (VIRTIO_F_VERSION_1, false),
        (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, true),
    ] {
        let mut common = common(features);
        common.activate(memory(), vec![queue(!event_idx)]).unwrap();
        let active = common.active().unwrap();
        assert_eq!(active.queues[0].event_idx_enabled(), event_idx);
    }
}

#[test]
fn a_restored_queue_follows_the_saved_features_not_its_own_flag() {
    for (features, event_idx) in [
        (VIRTIO_F_VERSION_1, false),
        (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, true),
    ] {
        let mut saved = common(features);
        saved.activate(memory(), vec![queue(event_idx)]).unwrap();
        let mut state = saved.save_state(DeviceSpecificState::Vsock { guest_cid: 3 });
        assert_eq!(state.acked_features, features);
        // A queue saved before the flag was set, or a forged one: the features decide.
        state.queues.as_mut().unwrap()[0].event_idx_enabled = !event_idx;
        let mut restored = common(0);
        assert!(restored.restore_state(memory(), &state).unwrap());
        assert_eq!(restored.acked_features(), features);
        let active = restored.active().unwrap();
        assert_eq!(active.queues[0].event_idx_enabled(), event_idx);
    }
}

#[test]
fn a_restored_device_with_event_idx_interrupts_by_used_event() {
    let mem = memory();
    let mut saved = common(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    saved.activate(mem.clone(), vec![queue(false)]).unwrap();
    let state = saved.save_state(DeviceSpecificState::Vsock { guest_cid: 3 });
    let mut restored = common(0);
    restored.restore_state(mem.clone(), &state).unwrap();
    set(&mem, USED_EVENT, 1);
    set(&mem, AVAIL_RING, NO_INTERRUPT);
    let active = restored.active_mut().unwrap();
    active.queues[0].add_used(&mem, 0, 0).unwrap();
    signal_used(&active.interrupt, &mut active.queues[0], &active.mem);
    assert_eq!(active.interrupt.status() & INTERRUPT_USED_RING, 0);
    active.queues[0].add_used(&mem, 0, 0).unwrap();
    signal_used(&active.interrupt, &mut active.queues[0], &active.mem);
    assert_eq!(active.interrupt.status() & INTERRUPT_USED_RING, 1);
    assert_eq!(active.interrupt.irq_evt().read().unwrap(), 1);
}

#[test]
fn a_refused_restore_changes_nothing() {
    let mut saved = common(VIRTIO_F_VERSION_1);
    saved.activate(memory(), vec![queue(false)]).unwrap();
    let mut state = saved.save_state(DeviceSpecificState::Vsock { guest_cid: 3 });
    let queue = state.queues.as_ref().unwrap()[0];
    state.queues = Some(vec![queue, queue]);
    let mut restored = common(0);
    assert!(matches!(
        restored.restore_state(memory(), &state),
        Err(DeviceStateError::QueueCount { saved: 2, built: 1 })
    ));
    assert_eq!(restored.acked_features(), 0);
    assert!(restored.active().is_none());
}

#[test]
fn a_restored_queue_outside_guest_memory_or_not_ready_is_refused() {
    let mut saved = common(VIRTIO_F_VERSION_1);
    saved.activate(memory(), vec![queue(false)]).unwrap();
    let state = saved.save_state(DeviceSpecificState::Vsock { guest_cid: 3 });
    let mut outside = state.clone();
    outside.queues.as_mut().unwrap()[0].used_ring = 0x10_0000;
    let mut not_ready = state.clone();
    not_ready.queues.as_mut().unwrap()[0].ready = false;
    for forged in [outside, not_ready] {
        let mut restored = common(0);
        assert!(matches!(
            restored.restore_state(memory(), &forged),
            Err(DeviceStateError::QueueOutsideMemory { index: 0 })
        ));
        assert!(restored.active().is_none());
    }
    // The same state as saved restores.
    assert!(common(0).restore_state(memory(), &state).unwrap());
}

#[test]
fn every_device_offers_event_idx() {
    // virtio-net needs a TAP: its own tests check it.
    let file = TempFile::new().unwrap();
    let irq = || EventFd::new(EFD_NONBLOCK).unwrap();
    let block = Block::new(
        "d".into(),
        file.into_file(),
        false,
        &Default::default(),
        irq(),
    )
    .unwrap();
    let dir = TempDir::new_with_prefix(std::env::temp_dir().join("mote-common-")).unwrap();
    let vsock = Vsock::new(3, &dir.as_path().join("v.sock"), irq()).unwrap();
    let devices: [&dyn VirtioDevice; 2] = [&block, &vsock];
    for device in devices {
        let offered = device.avail_features();
        assert_eq!(
            offered & COMMON_FEATURES,
            COMMON_FEATURES,
            "type {}",
            device.device_type()
        );
    }
}
