//! Leaving without waiting for KVM: closing a VM's last file descriptor makes the host kernel
//! tear the VM down there and then (memory slots, irqfds, RCU grace periods), about 17 ms on
//! the machines we measured, longer than the rest of a short guest's whole life. A process
//! that exits with the VM still open pays the same in its exit. So at the end the monitor
//! hands its descriptors and its memory to a reaper process that shares them
//! (`CLONE_VM | CLONE_FILES`), and exits at once; the reaper closes the console first (so
//! readers of mote's output see it end with mote), then everything else, and exits, leaving
//! the teardown to finish in its own time.

use std::io::Write;

/// The reaper's stack: it only makes system calls.
const REAPER_STACK_SIZE: usize = 64 * 1024;
/// Highest descriptor closed one by one where close_range(2) is missing.
const FALLBACK_MAX_FD: libc::c_int = 4096;

extern "C" fn reap(_: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the reaper runs on its own stack in the monitor's address space and makes only
    // system calls; closing descriptors it shares with the exiting monitor is its whole job.
    unsafe {
        for fd in 0..3 {
            libc::close(fd);
        }
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..FALLBACK_MAX_FD {
                libc::close(fd);
            }
        }
        libc::_exit(0)
    }
}

/// Ends the process with `code`, leaving the kernel's VM teardown to a reaper. Only for the
/// very end of `main`: nothing may run after it, and everything that should be closed in this
/// process (devices, sockets) must be closed before.
pub fn exit(code: u8) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: an anonymous private mapping of a fixed size, checked below; it is never unmapped
    // (the reaper runs on it until it exits, and the process is ending).
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            REAPER_STACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack != libc::MAP_FAILED {
        // SAFETY: the stack is REAPER_STACK_SIZE bytes, so its top is in bounds (clone wants the
        // highest address); `reap` touches nothing of this process but descriptors. SIGCHLD as
        // the exit signal lets whoever inherits the reaper (init) collect it as usual.
        let pid = unsafe {
            let top = stack.cast::<u8>().add(REAPER_STACK_SIZE).cast();
            libc::clone(
                reap,
                top,
                libc::CLONE_VM | libc::CLONE_FILES | libc::SIGCHLD,
                std::ptr::null_mut(),
            )
        };
        if pid > 0 {
            // SAFETY: _exit ends this thread group at once; the descriptors and memory stay
            // with the reaper.
            unsafe { libc::_exit(i32::from(code)) }
        }
    }
    // No reaper: exit the ordinary way, paying for the teardown here.
    std::process::exit(i32::from(code))
}
