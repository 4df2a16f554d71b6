use std::fs::File;

use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::memory::GuestMemoryMmap;
use crate::virtio::block::Block;
use crate::virtio::{INTERRUPT_CONFIG, TYPE_BLOCK};

fn transport() -> (MmioTransport, Arc<Mutex<Block>>, TempFile) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let file = TempFile::new().unwrap();
    file.as_file().set_len(4096).unwrap();
    let backing: File = file.as_file().try_clone().unwrap();
    let block = Arc::new(Mutex::new(
        Block::new(
            "id".into(),
            backing,
            false,
            &Default::default(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
        .unwrap(),
    ));
    (MmioTransport::new(mem, block.clone()), block, file)
}

fn read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(0, offset, &mut data);
    u32::from_le_bytes(data)
}

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(0, offset, &value.to_le_bytes());
}

/// Drives the transport up to FEATURES_OK with `features`.
fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    write(t, REG_STATUS, STATUS_ACKNOWLEDGE);
    write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write(t, REG_DRIVER_FEATURES_SEL, 0);
    write(t, REG_DRIVER_FEATURES, features as u32);
    write(t, REG_DRIVER_FEATURES_SEL, 1);
    write(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    write(
        t,
        REG_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    read(t, REG_STATUS)
}

fn set_up_queue(t: &mut MmioTransport, size: u32) {
    write(t, REG_QUEUE_SEL, 0);
    write(t, REG_QUEUE_NUM, size);
    write(t, REG_QUEUE_DESC_LOW, 0x1000);
    write(t, REG_QUEUE_DRIVER_LOW, 0x2000);
    write(t, REG_QUEUE_DEVICE_LOW, 0x3000);
    write(t, REG_QUEUE_READY, 1);
}

const UP_TO_FEATURES_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

#[test]
fn identifies_as_a_modern_virtio_mmio_device() {
    let (mut t, _, _) = transport();
    assert_eq!(read(&mut t, REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(read(&mut t, REG_VERSION), 2);
    assert_eq!(read(&mut t, REG_DEVICE_ID), TYPE_BLOCK);
    write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        read(&mut t, REG_DEVICE_FEATURES) & 1,
        1,
        "VERSION_1 is bit 32"
    );
    assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 256);
    // Capacity in sectors, in the configuration space.
    assert_eq!(read(&mut t, CONFIG_SPACE), 8);
}

#[test]
fn full_negotiation_activates_the_device() {
    let (mut t, _, _) = transport();
    assert_eq!(negotiate(&mut t, VIRTIO_F_VERSION_1), UP_TO_FEATURES_OK);
    set_up_queue(&mut t, 16);
    write(&mut t, REG_STATUS, UP_TO_FEATURES_OK | STATUS_DRIVER_OK);
    assert_eq!(
        read(&mut t, REG_STATUS),
        UP_TO_FEATURES_OK | STATUS_DRIVER_OK
    );
    assert!(t.activated);
}

#[test]
fn status_bits_must_come_one_at_a_time_in_order() {
    let (mut t, _, _) = transport();
    write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    assert_eq!(read(&mut t, REG_STATUS), 0);
    write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
    write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK);
    assert_eq!(read(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE);
}

#[test]
fn features_without_version_1_or_beyond_the_offer_are_refused() {
    let (mut t, _, _) = transport();
    assert_eq!(negotiate(&mut t, 0), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write(&mut t, REG_STATUS, 0);
    assert_eq!(
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 60),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER
    );
}

#[test]
fn queue_registers_are_ignored_outside_queue_set_up() {
    let (mut t, _, _) = transport();
    set_up_queue(&mut t, 16);
    assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
}

#[test]
fn an_invalid_queue_size_is_not_taken() {
    let (mut t, _, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    set_up_queue(&mut t, 3); // not a power of two
    assert_eq!(t.queues[0].size(), 256);
    set_up_queue(&mut t, 512); // over the maximum
    assert_eq!(t.queues[0].size(), 256);
}

#[test]
fn a_queue_outside_guest_memory_leaves_the_device_needing_a_reset() {
    let (mut t, block, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    set_up_queue(&mut t, 16);
    write(&mut t, REG_QUEUE_DESC_HIGH, 1); // 4 GiB up: no memory there
    write(&mut t, REG_STATUS, UP_TO_FEATURES_OK | STATUS_DRIVER_OK);
    let status = read(&mut t, REG_STATUS);
    assert_eq!(status & STATUS_DRIVER_OK, 0);
    assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(!t.activated);
    // A reset clears it, and the device can be set up properly.
    write(&mut t, REG_STATUS, 0);
    assert_eq!(read(&mut t, REG_STATUS), 0);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    set_up_queue(&mut t, 16);
    write(&mut t, REG_STATUS, UP_TO_FEATURES_OK | STATUS_DRIVER_OK);
    assert!(t.activated);
    drop(block);
}

#[test]
fn a_notification_without_an_ioeventfd_reaches_the_device() {
    let (mut t, block, _) = transport();
    write(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_eq!(lock_block(&block).queue_events()[0].read().unwrap(), 1);
    // A queue that does not exist is ignored.
    write(&mut t, REG_QUEUE_NOTIFY, 7);
}

#[test]
fn a_new_backing_file_shows_in_the_registers_until_acknowledged() {
    let (mut t, block, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    set_up_queue(&mut t, 16);
    write(&mut t, REG_STATUS, UP_TO_FEATURES_OK | STATUS_DRIVER_OK);
    let generation = read(&mut t, REG_CONFIG_GENERATION);
    assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);

    let bigger = TempFile::new().unwrap();
    bigger.as_file().set_len(3 * 4096).unwrap();
    let file = bigger.as_file().try_clone().unwrap();
    lock_block(&block).update_backing(file).unwrap();

    assert_ne!(read(&mut t, REG_CONFIG_GENERATION), generation);
    assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), INTERRUPT_CONFIG);
    let mut capacity = [0u8; 8];
    t.read(0, CONFIG_SPACE, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 24);
    write(&mut t, REG_INTERRUPT_ACK, INTERRUPT_CONFIG);
    assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);
    // The device goes on running.
    assert_eq!(
        read(&mut t, REG_STATUS),
        UP_TO_FEATURES_OK | STATUS_DRIVER_OK
    );
}

#[test]
fn a_request_served_during_a_restore_shows_in_the_interrupt_status() {
    let (mut t, _, file) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    set_up_queue(&mut t, 16);
    write(&mut t, REG_STATUS, UP_TO_FEATURES_OK | STATUS_DRIVER_OK);
    // A GET_ID request the driver made available without a notification the old monitor
    // saw: header, 20-byte id buffer, status byte, chained from descriptor 0.
    let mem = t.mem.clone();
    let descriptors: [(u64, u32, u16, u16); 3] = [
        (0x4000, 16, 1, 1),
        (0x5000, 20, 1 | 2, 2),
        (0x6000, 1, 2, 0),
    ];
    for (i, (addr, len, flags, next)) in descriptors.into_iter().enumerate() {
        let at = GuestAddress(0x1000 + 16 * i as u64);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }
    mem.write_obj(
        virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID,
        GuestAddress(0x4000),
    )
    .unwrap();
    mem.write_obj(0xffu8, GuestAddress(0x6000)).unwrap();
    mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();
    let saved = t.save_state().unwrap();

    let backing: File = file.as_file().try_clone().unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let block = Block::new("id".into(), backing, false, &Default::default(), irq).unwrap();
    let mut restored = MmioTransport::new(mem.clone(), Arc::new(Mutex::new(block)));
    restored.restore_state(&saved).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x6000)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 1);
    // The saved status (nothing pending) did not wipe the new used-ring bit.
    assert_eq!(
        read(&mut restored, REG_INTERRUPT_STATUS),
        crate::virtio::INTERRUPT_USED_RING
    );
}

fn lock_block(block: &Mutex<Block>) -> MutexGuard<'_, Block> {
    block.lock().unwrap()
}
