//! Leaving without waiting for KVM: closing a VM's last file descriptor makes the host kernel
//! tear the VM down there and then (memory slots, irqfds, RCU grace periods), about 17 ms on
//! the machines we measured, longer than the rest of a short guest's whole life. A process
//! that exits with the VM still open pays the same in its exit. So at the end the monitor
//! hands its descriptors and its memory to a reaper process that shares them
//! (`CLONE_VM | CLONE_FILES`), and exits at once; the reaper closes the console first (so
//! readers of mote's output see it end with mote), then everything else, and exits, leaving
//! the teardown to finish in its own time.

//!
//! What a supervisor sees: the monitor's exit (its wait status) comes before its VM is torn
//! down; the reaper, a process of the same name, goes on for the teardown's length (tens of
//! milliseconds, longer on a loaded host) and is then collected by whoever adopts it: init,
//! or the supervisor itself where it is a child subreaper (`PR_SET_CHILD_SUBREAPER`: systemd,
//! containerd shims), which must reap it as any orphan. Under a start storm reapers add up
//! (185 at once were seen after 1000 back-to-back lifecycles), so a monitor hands over to one
//! only while the host is far from its task limits ([`room_for_a_reaper`]); otherwise it pays
//! for the teardown in its own exit, and a reaper can never be why a new monitor cannot start.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

/// The reaper's stack: it only makes system calls.
const REAPER_STACK_SIZE: usize = 64 * 1024;
/// Highest descriptor closed one by one where close_range(2) is missing.
const FALLBACK_MAX_FD: libc::c_int = 4096;

/// Non-zero until the exiting thread of the monitor is gone: the kernel clears it and wakes its
/// futex then (the thread's `set_tid_address`), which the reaper, sharing the memory, sleeps on.
static MONITOR_THREAD_LIVES: AtomicU32 = AtomicU32::new(1);

extern "C" fn reap(parent: *mut libc::c_void) -> libc::c_int {
    let parent = parent as libc::pid_t;
    // SAFETY: the reaper runs on its own stack in the monitor's address space and makes only
    // system calls; closing descriptors it shares with the exiting monitor is its whole job.
    unsafe {
        // The descriptor table is shared: closing before the monitor is gone would pull its
        // descriptors from under its other threads (the API thread, a vCPU), which may then
        // fail, panic and abort the monitor instead of letting it exit with its status. The
        // monitor exits right after starting the reaper, which is then given to another
        // parent: only then are the descriptors its alone.
        // First asleep until the thread that exits the monitor is gone (a spin here took a
        // CPU from the exiting monitor, and under a start storm from the monitors starting:
        // a millisecond of CPU a monitor on a loaded host), then, for the monitor's other
        // threads, which that exit already killed, the short wait until it has no thread
        // left and the reaper a new parent. FUTEX_WAIT, getppid and sched_yield: calls the
        // monitor's filters allow (the reaper runs under them). A spurious wake-up or a
        // signal only goes round again.
        while MONITOR_THREAD_LIVES.load(Ordering::Acquire) != 0 {
            libc::syscall(
                libc::SYS_futex,
                MONITOR_THREAD_LIVES.as_ptr(),
                libc::FUTEX_WAIT,
                1u32,
                std::ptr::null::<libc::timespec>(),
            );
        }
        while libc::getppid() == parent {
            libc::sched_yield();
        }
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

/// The share of the host's task budget below which reapers are used: past it, what is left is
/// for monitors and everything else to start.
const REAPER_BUDGET_SHARE: u64 = 2;

/// True while the host runs fewer tasks than half of the smallest limit that applies to a new
/// process of this user: the kernel's `threads-max` and this process's `RLIMIT_NPROC` (a
/// count per user, compared here with every task on the host, which errs on the safe side).
/// Read from /proc at the end of the process (about 15 µs), not at start-up. Where a figure
/// cannot be read, no reaper.
pub fn room_for_a_reaper() -> bool {
    let tasks = read_proc("/proc/loadavg").and_then(|text| loadavg_tasks(&text));
    let threads_max = read_proc("/proc/sys/kernel/threads-max").and_then(|t| t.trim().parse().ok());
    let nproc = read_proc("/proc/self/limits").and_then(|text| max_processes(&text));
    match (tasks, threads_max) {
        (Some(tasks), Some(threads_max)) => {
            let limit = nproc.map_or(threads_max, |n: u64| n.min(threads_max));
            tasks.saturating_mul(REAPER_BUDGET_SHARE) < limit
        }
        _ => false,
    }
}

fn read_proc(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The task count of /proc/loadavg: `0.10 0.20 0.30 2/345 6789` → 345.
fn loadavg_tasks(text: &str) -> Option<u64> {
    text.split_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()
}

/// The soft "Max processes" of /proc/self/limits; None when unlimited.
fn max_processes(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max processes"))?;
    line["Max processes".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Ends the process with `code`, leaving the kernel's VM teardown to a reaper. Only for the
/// very end of `main`: nothing may run after it, and everything that should be closed in this
/// process (devices, sockets) must be closed before.
pub fn exit(code: u8) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if !room_for_a_reaper() {
        std::process::exit(i32::from(code))
    }
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
        // SAFETY: from here this thread's exit clears MONITOR_THREAD_LIVES and wakes its
        // futex, a static that outlives the thread; the thread ends in the _exit below, or in
        // std::process::exit if no reaper starts (then nobody waits on it).
        unsafe { libc::syscall(libc::SYS_set_tid_address, MONITOR_THREAD_LIVES.as_ptr()) };
        // SAFETY: the stack is REAPER_STACK_SIZE bytes, so its top is in bounds (clone wants the
        // highest address); `reap` touches nothing of this process but descriptors. SIGCHLD as
        // the exit signal lets whoever inherits the reaper (init) collect it as usual.
        let pid = unsafe {
            let top = stack.cast::<u8>().add(REAPER_STACK_SIZE).cast();
            libc::clone(
                reap,
                top,
                libc::CLONE_VM | libc::CLONE_FILES | libc::SIGCHLD,
                libc::getpid() as usize as *mut libc::c_void,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_count_and_the_process_limit_are_read_from_proc() {
        assert_eq!(loadavg_tasks("0.10 0.20 0.30 2/345 6789\n"), Some(345));
        assert_eq!(loadavg_tasks("garbage"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max cpu time              unlimited            unlimited            seconds\n\
                      Max processes             4096                 8192                 processes\n";
        assert_eq!(max_processes(limits), Some(4096));
        let unlimited = limits.replace(
            "4096                 8192",
            "unlimited            unlimited",
        );
        assert_eq!(max_processes(&unlimited), None);
    }

    #[test]
    fn this_host_has_room_for_a_reaper() {
        // The test machine runs far fewer tasks than half its limits; this reads the real
        // files, so a parse that broke on them would fail here.
        assert!(room_for_a_reaper());
    }
}
