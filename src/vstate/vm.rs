//! The KVM VM: its fd, its guest memory registered as memory slots, its interrupt controllers.

use devices::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};

use crate::config::{CpuTemplate, KvmCapability};
use std::os::fd::AsRawFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::MmapRegion;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::dirty::DirtyPages;
use super::spare_vm::{self, FreshVm, KVM_API_VERSION};
use crate::arch;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}{hint}", hint = kvm_open_hint(.0))]
    OpenKvm(kvm_ioctls::Error),
    #[error("/dev/kvm speaks KVM API version {0}, not {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("cannot create the KVM VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot register guest memory at {addr:#x} ({len} bytes) with KVM: {source}")]
    MemorySlot {
        addr: u64,
        len: u64,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    #[error(transparent)]
    VcpuFeatures(#[from] arch::ArchVcpuError),
    #[error("cannot create vCPU {index}: {source}")]
    CreateVcpu {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot route writes at {addr:#x} to an eventfd: {source}")]
    Ioeventfd {
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("cannot route IRQ {gsi} to an eventfd: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cpu-config: the host's KVM lacks capability {0}, which the CPU template requires")]
    MissingCapability(u32),
    #[error("cannot save or restore the VM's state: {0}")]
    State(#[from] arch::StateError),
    #[error("the VM has no vCPUs yet, so neither have its in-kernel devices")]
    NoVcpus,
    #[error("cannot read KVM's dirty page log of the memory at {addr:#x}: {source}")]
    DirtyLog {
        addr: u64,
        source: kvm_ioctls::Error,
    },
}

fn kvm_open_hint(err: &kvm_ioctls::Error) -> &'static str {
    match err.errno() {
        libc::ENOENT => " (no KVM on this host: load the kvm module or enable virtualization)",
        libc::EACCES | libc::EPERM => {
            " (no permission: run as root or join the group owning /dev/kvm)"
        }
        _ => "",
    }
}

pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemoryMmap,
    /// The in-kernel devices made once the vCPUs exist (aarch64: the GIC).
    devices: Option<arch::VmDevices>,
    /// KVM logs the guest's writes to memory (`track_dirty_pages`), for Diff snapshots.
    track_dirty_pages: bool,
    /// Dirty pages taken for a snapshot that then failed: the next one must still write them
    /// (KVM's log cannot be given them back).
    unsaved: DirtyPages,
    /// Guest memory is anonymous and filled on demand by a page-fault handler (the Uffd
    /// backend, or mote's own pager): a page never touched is not known to be zero.
    lazy_memory: Option<Lazily>,
}

/// Who fills guest memory on demand.
pub enum Lazily {
    /// The user's page-fault handler (the Uffd backend).
    Handler,
    /// mote's own pager (the Lazy backend), stopped when the VM goes.
    Pager(crate::snapshot::lazy::pager::Pager),
}

impl Vm {
    /// A VM (the one made ahead while the monitor waited, or a new one) with `memory`
    /// registered (logging the guest's writes when `track_dirty_pages`), then the in-kernel
    /// devices that must exist before the vCPUs.
    pub fn new(memory: GuestMemoryMmap, track_dirty_pages: bool) -> Result<Self, VmError> {
        let FreshVm { kvm, fd } = spare_vm::take_or_create()?;
        for (slot, region) in memory.iter().enumerate() {
            let addr = region.start_addr().raw_value();
            let len = region.len();
            let host_addr = region.as_ptr() as u64;
            // Logging is opt-in: it makes KVM map the slot in 4 KiB pages and write-protect
            // them after each read of the log, which slows a guest that writes a lot.
            let flags = if track_dirty_pages {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            };
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: addr,
                memory_size: len,
                userspace_addr: host_addr,
            };
            // SAFETY: the host range is a live mapping owned by `memory`, which the Vm keeps for
            // as long as the VM fd (and so the slot) exists.
            unsafe { fd.set_user_memory_region(region) }.map_err(|source| VmError::MemorySlot {
                addr,
                len,
                source,
            })?;
        }
        arch::create_vm_devices(&kvm, &fd)?;
        Ok(Self {
            kvm,
            fd,
            memory,
            devices: None,
            track_dirty_pages,
            unsaved: DirtyPages::default(),
            lazy_memory: None,
        })
    }

    /// Records that a page-fault handler fills guest memory on demand (a Uffd or Lazy
    /// restore).
    pub fn mark_memory_lazy(&mut self, lazily: Lazily) {
        self.lazy_memory = Some(lazily);
    }

    /// Whether a page-fault handler fills guest memory on demand: a snapshot must then read
    /// every page (through the handler), not only those the host has.
    pub fn memory_is_lazy(&self) -> bool {
        self.lazy_memory.is_some()
    }

    /// The vCPUs run (again): mote's own pager starts its working-set window the first time.
    pub fn vcpus_running(&self) {
        if let Some(Lazily::Pager(pager)) = &self.lazy_memory {
            pager.vcpus_running();
        }
    }

    /// Whether the guest's writes are logged (Diff snapshots can be taken).
    pub fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty_pages
    }

    /// The pages written since the last call (since the VM was made, the first time): KVM's
    /// log of the guest's writes and the monitor's own, both cleared. The vCPUs must be
    /// paused and the devices idle. Without `track_dirty_pages` there is no log: None.
    pub fn take_dirty_pages(&mut self) -> Result<Option<DirtyPages>, VmError> {
        if !self.track_dirty_pages {
            return Ok(None);
        }
        let mut dirty = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let addr = region.start_addr().raw_value();
            let mut words = match self.fd.get_dirty_log(slot as u32, region.len() as usize) {
                Ok(words) => words,
                Err(source) => {
                    // The slots read so far were cleared: their pages stay owed.
                    self.unsaved.add(&DirtyPages::new(dirty));
                    return Err(VmError::DirtyLog { addr, source });
                }
            };
            // The mapping's own bitmap (the region's trait method gives a slice of it).
            let mapping: &MmapRegion<AtomicBitmap> = region;
            let monitor = mapping.bitmap().get_and_reset();
            for (word, written) in words.iter_mut().zip(monitor) {
                *word |= written;
            }
            dirty.push(words);
        }
        let mut dirty = DirtyPages::new(dirty);
        dirty.add(&std::mem::take(&mut self.unsaved));
        Ok(Some(dirty))
    }

    /// Gives back pages [`Vm::take_dirty_pages`] returned that no snapshot holds after all.
    pub fn keep_dirty_pages(&mut self, dirty: &DirtyPages) {
        self.unsaved.add(dirty);
    }

    /// The in-kernel devices' and the clock's state (a snapshot; the vCPUs are paused).
    pub fn save_state(&self) -> Result<arch::VmState, VmError> {
        let devices = self.devices.as_ref().ok_or(VmError::NoVcpus)?;
        Ok(arch::VmState::save(&self.fd, devices)?)
    }

    /// Puts back the part of what [`Vm::save_state`] read that must come before the vCPUs
    /// are created (x86_64: all of it, the kvm-clock before the vCPUs' clock MSRs).
    pub fn restore_state_before_vcpus(
        &self,
        state: &arch::VmState,
        clock_realtime: bool,
    ) -> Result<(), VmError> {
        Ok(state.restore_before_vcpus(&self.fd, clock_realtime)?)
    }

    /// Puts back the part that needs the vCPUs restored first (aarch64: the GIC).
    pub fn restore_state_after_vcpus(&self, state: &arch::VmState) -> Result<(), VmError> {
        let devices = self.devices.as_ref().ok_or(VmError::NoVcpus)?;
        Ok(state.restore_after_vcpus(&self.fd, devices)?)
    }

    /// Keeps the VM and its memory alive until the process ends, whatever is dropped before:
    /// a second descriptor for the VM and a second handle on its memory, never released here.
    /// [`crate::teardown::exit`] then leaves their release to its reaper.
    pub fn keep_until_exit(&self) {
        // SAFETY: dup only duplicates the descriptor, which `self.fd` keeps open for the call;
        // the copy is deliberately never closed by this process.
        let copy = unsafe { libc::dup(self.fd.as_raw_fd()) };
        if copy < 0 {
            log::debug!(
                "cannot keep the VM for the exit: {}",
                std::io::Error::last_os_error()
            );
        }
        std::mem::forget(self.memory.clone());
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// What KVM offers every vCPU of a booting guest, shaped by the custom CPU template.
    pub fn vcpu_features(
        &self,
        template: Option<&CpuTemplate>,
    ) -> Result<arch::VcpuFeatures, VmError> {
        Ok(arch::vcpu_features(&self.kvm, &self.fd, template)?)
    }

    /// Creates `count` vCPUs, then the in-kernel devices that must come after them; a custom
    /// CPU template's KVM capabilities are checked first.
    pub fn create_vcpus(
        &mut self,
        count: u8,
        template: Option<&CpuTemplate>,
    ) -> Result<Vec<VcpuFd>, VmError> {
        for capability in template.map_or(&[][..], |t| t.kvm_capabilities.as_slice()) {
            // A dropped check drops nothing here: mote checks no capability it can go without.
            if let KvmCapability::Require(cap) = *capability {
                if self.kvm.check_extension_raw(libc::c_ulong::from(cap)) <= 0 {
                    return Err(VmError::MissingCapability(cap));
                }
            }
        }
        let fds = (0..count)
            .map(|index| {
                self.fd
                    .create_vcpu(u64::from(index))
                    .map_err(|source| VmError::CreateVcpu { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.devices = Some(arch::finish_vm_devices(&self.fd, &fds, template)?);
        Ok(fds)
    }

    /// Makes a guest's 4-byte MMIO write of `value` at `addr` signal `evt` inside KVM, with no
    /// exit to the monitor.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        value: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), value)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }

    /// Makes writes to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }
}
