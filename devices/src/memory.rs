//! Guest memory as every device and the monitor see it: vm-memory's mmap backend with its
//! page-granular dirty bitmap.
//!
//! Diff snapshots need every page written since the last snapshot. KVM's dirty log sees the
//! guest's own writes only; the monitor's (used rings, receive buffers, block reads, the VM
//! generation ID…) bypass it. vm-memory marks its bitmap on every write made through its
//! `Bytes`/`GuestMemory` interface, which is how the devices and virtio-queue write (used
//! ring entries, `avail_event`), so those are counted with no change to the write paths;
//! the few writes through raw pointers (block reads with `pread` into a `VolatileSlice`)
//! mark their slice themselves. The alternative, a bitmap of the monitor's own marked by
//! each device, would have to hook virtio-queue's writes as well and would miss any write
//! path nobody remembered to mark.
//!
//! The bitmap is kept whether or not dirty pages are tracked: one bit per 4 KiB page (32 KiB
//! per GiB of guest) and an atomic OR per page a device writes, small beside the write
//! itself, and it keeps one memory type for every VM (`Option<AtomicBitmap>` would save the
//! bits but cannot be built by `GuestMemoryMmap::from_ranges`). It is only read by a Diff
//! snapshot, which takes and clears it.

use vm_memory::bitmap::AtomicBitmap;

/// Guest RAM with the bitmap of the pages written by the monitor.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, MmapRegion};

    use super::*;

    fn bitmap(mem: &GuestMemoryMmap) -> &AtomicBitmap {
        let region: &MmapRegion<AtomicBitmap> = mem.iter().next().unwrap();
        region.bitmap()
    }

    #[test]
    fn the_monitor_s_writes_mark_their_pages_and_reads_do_not() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rings = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let mut queue: virtio_queue::Queue = rings.create_queue().unwrap();
        bitmap(&mem).reset();

        let _: u64 = mem.read_obj(GuestAddress(0x2_0000)).unwrap();
        assert!(bitmap(&mem).get_and_reset().iter().all(|word| *word == 0));

        mem.write_slice(&[1; 5000], GuestAddress(0x3_0ff0)).unwrap();
        queue.add_used(&mem, 0, 16).unwrap();
        let used_page = rings.used_addr().0 as usize / 4096;
        let dirty = bitmap(&mem).get_and_reset()[0];
        let pages: Vec<usize> = (0..64).filter(|page| dirty & (1 << page) != 0).collect();
        assert_eq!(pages, [used_page, 0x30, 0x31, 0x32]);
    }
}
