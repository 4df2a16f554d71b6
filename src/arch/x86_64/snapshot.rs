//! The KVM state of an x86_64 guest that a snapshot keeps: per vCPU (registers, FPU/XSAVE,
//! XCRs, MSRs, LAPIC, pending events, MP state, CPUID, TSC frequency) and per VM (the in-kernel
//! PIC, I/O APIC and PIT, and the KVM clock).
//!
//! Save and restore follow the orders KVM needs (Firecracker's, which QEMU shares):
//! MP_STATE is read first because reading it makes KVM accept pending LAPIC events; on restore
//! the LAPIC comes before the MSRs (the TSC-deadline MSR needs the LAPIC's timer mode) and the
//! vCPU events come last (they may carry an exception that the other state must not clobber).

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use log::{debug, warn};
use serde::{Deserialize, Serialize};

/// The MSRs KVM reports as saveable on this host, read once (`KVM_GET_MSR_INDEX_LIST`).
static MSR_INDEX_LIST: OnceLock<Vec<u32>> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot build a list of {0} entries for KVM")]
    Fam(usize),
    #[error("KVM's list of saveable MSRs was never read (no VM was created)")]
    NoMsrList,
    #[error("clock_realtime: the snapshot holds no host real-time reading of the guest's clock (a mote before format 4 wrote it, or the host's clock source was not the TSC); load it without clock_realtime")]
    NoRealtimeReading,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// Reads KVM's list of saveable MSRs, once per process; a VM's creation calls it so that vCPU
/// threads (which may not open /dev/kvm) can save their MSRs later.
pub fn read_msr_index_list(kvm_fd: &Kvm) -> Result<(), StateError> {
    if MSR_INDEX_LIST.get().is_none() {
        let list = kvm_fd
            .get_msr_index_list()
            .map_err(kvm("read KVM's MSR index list"))?;
        let _ = MSR_INDEX_LIST.set(list.as_slice().to_vec());
    }
    Ok(())
}

/// Everything KVM holds about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The legacy 4 KiB XSAVE area: it holds every state component a guest can enable here
    /// (AMX, the one that needs more, is only granted to processes that ask for it).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM's index list that this vCPU could read, the TSC and kvm-clock ones
    /// included.
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest's TSC frequency; None where KVM cannot tell it.
    pub tsc_khz: Option<u32>,
}

/// Reads `indices` from the vCPU; MSRs KVM refuses to read are left out (KVM_GET_MSRS stops at
/// the first one it cannot read, so the rest is read again after it).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|index| kvm_msr_entry {
                index: *index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Fam(entries.len()))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("read the MSRs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        if read < rest.len() {
            debug!("MSR {:#x} cannot be read: not saved", rest[read]);
            rest = &rest[read + 1..];
        } else {
            rest = &[];
        }
    }
    Ok(saved)
}

/// Writes `entries`; an MSR KVM refuses is reported and skipped, so one host quirk does not
/// lose the rest.
fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    let mut rest = entries;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|_| StateError::Fam(rest.len()))?;
        let written = fd.set_msrs(&msrs).map_err(kvm("write the MSRs"))?;
        if written < rest.len() {
            warn!(
                "KVM refused MSR {:#x} = {:#x} on restore",
                rest[written].index, rest[written].data
            );
            rest = &rest[written + 1..];
        } else {
            rest = &[];
        }
    }
    Ok(())
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN (paused), on its own thread.
    pub fn save(fd: &VcpuFd) -> Result<Self, StateError> {
        let indices = MSR_INDEX_LIST.get().ok_or(StateError::NoMsrList)?;
        let mp_state = fd.get_mp_state().map_err(kvm("read the MP state"))?;
        let regs = fd.get_regs().map_err(kvm("read the registers"))?;
        let sregs = fd.get_sregs().map_err(kvm("read the special registers"))?;
        let xsave = fd.get_xsave().map_err(kvm("read the XSAVE area"))?;
        let xcrs = fd.get_xcrs().map_err(kvm("read the XCRs"))?;
        let debug_regs = fd
            .get_debug_regs()
            .map_err(kvm("read the debug registers"))?;
        let lapic = fd.get_lapic().map_err(kvm("read the local APIC"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("read the CPUID"))?
            .as_slice()
            .to_vec();
        let msrs = read_msrs(fd, indices)?;
        let vcpu_events = fd.get_vcpu_events().map_err(kvm("read the vCPU events"))?;
        Ok(Self {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Writes the state into a freshly created vCPU that has not run yet.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| StateError::Fam(self.cpuid.len()))?;
        fd.set_cpuid2(&cpuid).map_err(kvm("set the CPUID"))?;
        if let Some(khz) = self.tsc_khz {
            // The guest calibrated its clocks against this frequency: keep it on a host whose
            // TSC runs at another one (KVM scales it where the hardware can).
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(kvm("set the TSC frequency"))?;
            }
        }
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("set the MP state"))?;
        fd.set_regs(&self.regs).map_err(kvm("set the registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm("set the special registers"))?;
        // SAFETY: KVM reads at most 4096 bytes, all inside `self.xsave`: this process never
        // asks for dynamically enabled XSTATE features (AMX), the only ones that need more.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("set the XSAVE area"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("set the XCRs"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm("set the debug registers"))?;
        fd.set_lapic(&self.lapic)
            .map_err(kvm("set the local APIC"))?;
        write_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm("set the vCPU events"))?;
        Ok(())
    }
}

/// The VM-wide in-kernel devices and the clock.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

fn read_irqchip(fd: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(kvm(what))?;
    Ok(chip)
}

impl VmState {
    pub fn save(fd: &VmFd, _devices: &super::VmDevices) -> Result<Self, StateError> {
        let pit = fd.get_pit2().map_err(kvm("read the PIT"))?;
        // Kept whole: with KVM_CLOCK_REALTIME in its flags it also holds the host's real time
        // at the reading, which a `clock_realtime` restore advances the clock by.
        let clock = fd.get_clock().map_err(kvm("read the KVM clock"))?;
        Ok(Self {
            pit,
            clock,
            pic_master: read_irqchip(fd, KVM_IRQCHIP_PIC_MASTER, "read the master PIC")?,
            pic_slave: read_irqchip(fd, KVM_IRQCHIP_PIC_SLAVE, "read the slave PIC")?,
            ioapic: read_irqchip(fd, KVM_IRQCHIP_IOAPIC, "read the I/O APIC")?,
        })
    }

    /// Writes the state into a VM whose irqchip and PIT exist, before its vCPUs are created
    /// and their state restored: the kvm-clock must be set before the vCPUs' kvm-clock MSRs
    /// are, or a restored guest's timers see its clock jump. Setting the clock to the saved
    /// value keeps the guest's kvm-clock from going backwards (or jumping by the time the
    /// snapshot spent on disk); with `clock_realtime` KVM advances it by the host's real time
    /// since the snapshot instead, so the guest's clock reads as if it had run on.
    pub fn restore_before_vcpus(&self, fd: &VmFd, clock_realtime: bool) -> Result<(), StateError> {
        fd.set_pit2(&self.pit).map_err(kvm("set the PIT"))?;
        let mut clock = self.clock;
        // KVM refuses some flags it reports (TSC_STABLE, HOST_TSC) when they are given back.
        clock.flags = if clock_realtime {
            if self.clock.flags & KVM_CLOCK_REALTIME == 0 {
                return Err(StateError::NoRealtimeReading);
            }
            KVM_CLOCK_REALTIME
        } else {
            0
        };
        fd.set_clock(&clock).map_err(kvm("set the KVM clock"))?;
        fd.set_irqchip(&self.pic_master)
            .map_err(kvm("set the master PIC"))?;
        fd.set_irqchip(&self.pic_slave)
            .map_err(kvm("set the slave PIC"))?;
        fd.set_irqchip(&self.ioapic)
            .map_err(kvm("set the I/O APIC"))?;
        Ok(())
    }

    /// Nothing of x86's VM state waits for the vCPUs (aarch64's GIC state does).
    pub fn restore_after_vcpus(
        &self,
        _fd: &VmFd,
        _devices: &super::VmDevices,
    ) -> Result<(), StateError> {
        Ok(())
    }
}
