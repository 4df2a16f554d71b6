//! mote's probe guest: a freestanding x86_64 guest, entered through the Linux 64-bit boot
//! protocol, that does its work at CPL 3 and reports what it sees on COM1.
//!
//! It runs the steps named on its kernel command line (`probe.run=hello,mem,cpus`), prints
//! `probe: done` and resets through the i8042. See README.md for the steps.

#![no_std]
#![no_main]

mod balloon;
mod blk;
mod bootparams;
mod entry;
mod kbd;
mod mmds;
mod mptable;
mod net;
mod net_steps;
mod pattern;
mod port;
mod rng;
#[macro_use]
mod serial;
mod steps;
mod virtio;
mod vsock;

use bootparams::ZeroPage;

/// The precompiled `core` refers to this symbol; nothing unwinds here.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Reached from `_start` at CPL 3, with the zero page's address.
#[no_mangle]
pub extern "C" fn probe_main(zero_page: u64) -> ! {
    let zero_page = ZeroPage(zero_page);
    steps::run(&zero_page);
    report!("done");
    steps::reset()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    report!("panic {}", info.message());
    steps::reset()
}
