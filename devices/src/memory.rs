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
