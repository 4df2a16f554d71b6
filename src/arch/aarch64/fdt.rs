//! The flattened device tree an arm64 guest boots with (X0 points at it): memory, the vCPUs
//! with PSCI as their enable method, the GICv3, the arch timer, PSCI itself, the UART, the
//! RTC, every virtio-mmio device, the VM generation ID (`microsoft,vmgenid`, its page kept
//! from the guest by a memory reservation), and `chosen` with the command line and the initrd.

use devices::memory::GuestMemoryMmap;
use devices::vmgenid::{VmGenIdState, VMGENID_LEN};
use vm_fdt::{FdtReserveEntry, FdtWriter, FdtWriterResult};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::gic::redist_size;
use super::layout::{
    GIC_DIST_SIZE, GIC_DIST_START, GIC_REDIST_START, RTC_IRQ, RTC_SIZE, RTC_START, SERIAL_IRQ,
    SERIAL_SIZE, SERIAL_START, VMGENID_PAGE_SIZE,
};
use super::regs::mpidr_affinity;
use super::InitrdPlacement;
use crate::arch::MmioDeviceInfo;

#[derive(Debug, thiserror::Error)]
#[error("cannot build the device tree: {0}")]
pub struct FdtError(#[from] vm_fdt::Error);

/// Phandles: the GIC (every node's interrupt parent) and the fixed clock the UART and RTC
/// name.
const PHANDLE_GIC: u32 = 1;
const PHANDLE_CLOCK: u32 = 2;

/// Interrupt specifier cells (`arm,gic-v3` binding): kind, number, flags.
const GIC_FDT_IRQ_TYPE_SPI: u32 = 0;
const GIC_FDT_IRQ_TYPE_PPI: u32 = 1;
const IRQ_TYPE_EDGE_RISING: u32 = 1;
const IRQ_TYPE_LEVEL_HI: u32 = 4;
/// The GIC's maintenance interrupt (PPI 9), which KVM uses and the binding asks for.
const GIC_MAINTENANCE_PPI: u32 = 9;
/// The arch timer's PPIs: secure physical, non-secure physical, virtual, hypervisor.
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// The UART's and RTC's APB clock, as the drivers want one named (its rate is not used by
/// the emulated devices).
const APB_CLOCK_HZ: u32 = 24_000_000;

/// What goes into the device tree besides the fixed devices.
pub struct FdtConfig<'a> {
    pub cmdline: &'a str,
    pub vcpus: u8,
    pub devices: &'a [MmioDeviceInfo],
    pub initrd: Option<InitrdPlacement>,
    pub vmgenid: &'a VmGenIdState,
}

/// The device tree for `mem` and `config`, as bytes to place in guest memory.
pub fn create_fdt(mem: &GuestMemoryMmap, config: &FdtConfig) -> Result<Vec<u8>, FdtError> {
    let mut fdt = FdtWriter::new_with_mem_reserv(&[FdtReserveEntry::new(
        config.vmgenid.addr,
        VMGENID_PAGE_SIZE,
    )?])?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", PHANDLE_GIC)?;
    cpus(&mut fdt, config.vcpus)?;
    memory(&mut fdt, mem)?;
    chosen(&mut fdt, config)?;
    gic(&mut fdt, config.vcpus)?;
    timer(&mut fdt)?;
    psci(&mut fdt)?;
    clock(&mut fdt)?;
    serial(&mut fdt)?;
    rtc(&mut fdt)?;
    for device in config.devices {
        virtio_mmio(&mut fdt, device)?;
    }
    vmgenid(&mut fdt, config.vmgenid)?;
    fdt.end_node(root)?;
    Ok(fdt.finish()?)
}

fn cpus(fdt: &mut FdtWriter, vcpus: u8) -> FdtWriterResult<()> {
    let node = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for index in 0..vcpus {
        let affinity = mpidr_affinity(index);
        let cpu = fdt.begin_node(&format!("cpu@{affinity:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", affinity)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(node)
}

fn memory(fdt: &mut FdtWriter, mem: &GuestMemoryMmap) -> FdtWriterResult<()> {
    for region in mem.iter() {
        let start = region.start_addr().0;
        let node = fdt.begin_node(&format!("memory@{start:x}"))?;
        fdt.property_string("device_type", "memory")?;
        fdt.property_array_u64("reg", &[start, region.len()])?;
        fdt.end_node(node)?;
    }
    Ok(())
}

fn chosen(fdt: &mut FdtWriter, config: &FdtConfig) -> FdtWriterResult<()> {
    let node = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", config.cmdline)?;
    if let Some(initrd) = config.initrd {
        let start = initrd.address.0;
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", start + initrd.size)?;
    }
    fdt.end_node(node)
}

fn gic(fdt: &mut FdtWriter, vcpus: u8) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("intc@{GIC_DIST_START:x}"))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_array_u64(
        "reg",
        &[
            GIC_DIST_START,
            GIC_DIST_SIZE,
            GIC_REDIST_START,
            redist_size(vcpus),
        ],
    )?;
    fdt.property_u32("#redistributor-regions", 1)?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_FDT_IRQ_TYPE_PPI, GIC_MAINTENANCE_PPI, IRQ_TYPE_LEVEL_HI],
    )?;
    fdt.property_phandle(PHANDLE_GIC)?;
    fdt.end_node(node)
}

fn timer(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let cells: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|&ppi| [GIC_FDT_IRQ_TYPE_PPI, ppi, IRQ_TYPE_LEVEL_HI])
        .collect();
    fdt.property_array_u32("interrupts", &cells)?;
    fdt.end_node(node)
}

fn psci(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node("psci")?;
    fdt.property_string("compatible", "arm,psci-0.2")?;
    // KVM serves PSCI calls made with HVC.
    fdt.property_string("method", "hvc")?;
    fdt.end_node(node)
}

fn clock(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", APB_CLOCK_HZ)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(PHANDLE_CLOCK)?;
    fdt.end_node(node)
}

fn serial(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("uart@{SERIAL_START:x}"))?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[SERIAL_START, SERIAL_SIZE])?;
    fdt.property_u32("clocks", PHANDLE_CLOCK)?;
    fdt.property_string("clock-names", "apb_pclk")?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_FDT_IRQ_TYPE_SPI, SERIAL_IRQ, IRQ_TYPE_EDGE_RISING],
    )?;
    fdt.end_node(node)
}

fn rtc(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("rtc@{RTC_START:x}"))?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,pl031".to_string(), "arm,primecell".to_string()],
    )?;
    fdt.property_array_u64("reg", &[RTC_START, RTC_SIZE])?;
    fdt.property_u32("clocks", PHANDLE_CLOCK)?;
    fdt.property_string("clock-names", "apb_pclk")?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_FDT_IRQ_TYPE_SPI, RTC_IRQ, IRQ_TYPE_LEVEL_HI],
    )?;
    fdt.end_node(node)
}

fn virtio_mmio(fdt: &mut FdtWriter, device: &MmioDeviceInfo) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("virtio_mmio@{:x}", device.addr))?;
    fdt.property_string("compatible", "virtio,mmio")?;
    fdt.property_array_u64("reg", &[device.addr, device.len])?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_FDT_IRQ_TYPE_SPI, device.irq, IRQ_TYPE_EDGE_RISING],
    )?;
    fdt.property_null("dma-coherent")?;
    fdt.end_node(node)
}

/// The binding Linux 6.10 reads (and mote's 6.1 test guest, backported): the ID's 16 bytes and
/// the line that announces a new one.
fn vmgenid(fdt: &mut FdtWriter, vmgenid: &VmGenIdState) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("vmgenid@{:x}", vmgenid.addr))?;
    fdt.property_string("compatible", "microsoft,vmgenid")?;
    fdt.property_array_u64("reg", &[vmgenid.addr, VMGENID_LEN as u64])?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_FDT_IRQ_TYPE_SPI, vmgenid.irq, IRQ_TYPE_EDGE_RISING],
    )?;
    fdt.end_node(node)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::arch::aarch64::layout::DRAM_START;

    /// A node's `interrupts` as (kind, number, flags) triples (the fdt crate reads only one-
    /// and two-cell specifiers).
    fn interrupts(node: fdt::node::FdtNode) -> Vec<[u32; 3]> {
        let cells: Vec<u32> = node
            .property("interrupts")
            .unwrap()
            .value
            .chunks(4)
            .map(|cell| u32::from_be_bytes(cell.try_into().unwrap()))
            .collect();
        cells.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
    }

    const VMGENID: VmGenIdState = VmGenIdState {
        addr: 0x87ff_f000,
        irq: 95,
    };

    fn build(vcpus: u8, initrd: Option<InitrdPlacement>) -> Vec<u8> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(DRAM_START), 128 << 20)]).unwrap();
        let devices = [
            MmioDeviceInfo {
                addr: 0x4000_1000,
                len: 0x1000,
                irq: 2,
            },
            MmioDeviceInfo {
                addr: 0x4000_2000,
                len: 0x1000,
                irq: 3,
            },
        ];
        create_fdt(
            &mem,
            &FdtConfig {
                cmdline: "console=ttyS0 reboot=k panic=1",
                vcpus,
                devices: &devices,
                initrd,
                vmgenid: &VMGENID,
            },
        )
        .unwrap()
    }

    #[test]
    fn the_tree_describes_memory_cpus_and_chosen() {
        let initrd = InitrdPlacement {
            address: GuestAddress(0x8700_0000),
            size: 0x1234,
        };
        let blob = build(2, Some(initrd));
        let tree = fdt::Fdt::new(&blob).unwrap();
        let region = tree.memory().regions().next().unwrap();
        assert_eq!(region.starting_address as u64, DRAM_START);
        assert_eq!(region.size, Some(128 << 20));
        let cpus: Vec<_> = tree.cpus().map(|cpu| cpu.ids().first()).collect();
        assert_eq!(cpus, vec![0, 1]);
        for cpu in tree.cpus() {
            assert_eq!(
                cpu.property("enable-method").and_then(|p| p.as_str()),
                Some("psci")
            );
        }
        assert_eq!(
            tree.chosen().bootargs(),
            Some("console=ttyS0 reboot=k panic=1")
        );
        let chosen = tree.find_node("/chosen").unwrap();
        let start = chosen.property("linux,initrd-start").unwrap();
        let end = chosen.property("linux,initrd-end").unwrap();
        assert_eq!(start.value, 0x8700_0000u64.to_be_bytes());
        assert_eq!(end.value, 0x8700_1234u64.to_be_bytes());
    }

    #[test]
    fn the_gic_timer_psci_and_uart_are_where_the_layout_says() {
        let blob = build(4, None);
        let tree = fdt::Fdt::new(&blob).unwrap();
        let gic = tree.find_compatible(&["arm,gic-v3"]).unwrap();
        let regs: Vec<_> = gic.reg().unwrap().collect();
        assert_eq!(regs[0].starting_address as u64, GIC_DIST_START);
        assert_eq!(regs[1].starting_address as u64, GIC_REDIST_START);
        assert_eq!(regs[1].size, Some(4 * 0x2_0000));
        assert!(tree
            .find_node("/chosen")
            .unwrap()
            .property("linux,initrd-start")
            .is_none());
        let psci = tree.find_compatible(&["arm,psci-0.2"]).unwrap();
        assert_eq!(
            psci.property("method").and_then(|p| p.as_str()),
            Some("hvc")
        );
        assert!(tree.find_compatible(&["arm,armv8-timer"]).is_some());
        let uart = tree.find_compatible(&["ns16550a"]).unwrap();
        let reg = uart.reg().unwrap().next().unwrap();
        assert_eq!(reg.starting_address as u64, SERIAL_START);
        assert_eq!(
            interrupts(uart),
            vec![[GIC_FDT_IRQ_TYPE_SPI, SERIAL_IRQ, IRQ_TYPE_EDGE_RISING]]
        );
        let timer = tree.find_compatible(&["arm,armv8-timer"]).unwrap();
        assert_eq!(interrupts(timer).len(), 4);
        assert!(tree.find_compatible(&["arm,pl031"]).is_some());
    }

    #[test]
    fn every_virtio_device_has_its_window_and_line() {
        let blob = build(1, None);
        let tree = fdt::Fdt::new(&blob).unwrap();
        let found: Vec<(u64, u32)> = tree
            .all_nodes()
            .filter(|node| {
                node.compatible()
                    .is_some_and(|c| c.all().any(|name| name == "virtio,mmio"))
            })
            .map(|node| {
                let reg = node.reg().unwrap().next().unwrap();
                (reg.starting_address as u64, interrupts(node)[0][1])
            })
            .collect();
        assert_eq!(found, vec![(0x4000_1000, 2), (0x4000_2000, 3)]);
    }

    #[test]
    fn the_vm_generation_id_is_described_and_its_page_reserved() {
        let blob = build(1, None);
        let tree = fdt::Fdt::new(&blob).unwrap();
        let node = tree.find_compatible(&["microsoft,vmgenid"]).unwrap();
        let reg = node.reg().unwrap().next().unwrap();
        assert_eq!(reg.starting_address as u64, VMGENID.addr);
        assert_eq!(reg.size, Some(16));
        assert_eq!(
            interrupts(node),
            vec![[GIC_FDT_IRQ_TYPE_SPI, 95, IRQ_TYPE_EDGE_RISING]]
        );
        let reserved: Vec<(u64, u64)> = tree
            .memory_reservations()
            .map(|r| (r.address() as u64, r.size() as u64))
            .collect();
        assert_eq!(reserved, vec![(VMGENID.addr, VMGENID_PAGE_SIZE)]);
    }
}
