//! Each rule that checks arguments, tried for real: a forked child installs one built-in filter
//! and makes one call, and the kernel either lets it through (the child exits 0, whatever the
//! call returned) or kills the child with SIGSYS. Every test makes a call the rule exists for
//! and one it must refuse, so a rule widened back to the whole call fails its test.

use std::ffi::{c_int, c_long, c_void, CStr};

use super::*;

/// What the kernel did with a call made under a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allowed,
    Killed,
}

use Verdict::{Allowed, Killed};

fn program(filter: Filter) -> Vec<sock_filter> {
    SeccompFilters::load(&SeccompConfig::BuiltIn)
        .unwrap()
        .get(filter)
        .program
        .expect("the built-in filters are on")
        .to_vec()
}

/// Runs `call` in a forked child under the built-in `filter` alone; the child exits with what
/// `call` returns, which is 0 unless the call failed in a way the test did not expect. `call`
/// runs after fork in a copy of a multi-threaded process: it must not allocate or take locks,
/// only make calls.
fn under(filter: Filter, call: impl FnOnce() -> c_int) -> Verdict {
    let program = program(filter);
    // SAFETY: the child only installs a filter (prctl and seccomp; seccompiler allocates
    // nothing there), runs `call`, which makes system calls only, and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = match seccompiler::apply_filter(&program) {
            Ok(()) => call(),
            Err(_) => 2,
        };
        // SAFETY: ends the child at once, without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above; `status` is a valid place for its status.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS {
        Killed
    } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Allowed
    } else {
        panic!(
            "the child under `{}` ended with status {status:#x}",
            filter.name()
        );
    }
}

/// One raw system call with six arguments; what it returns does not matter here.
fn syscall(nr: c_long, args: [u64; 6]) -> impl FnOnce() -> c_int {
    move || {
        // SAFETY: every call the tests make gets arguments it can check (a path that does not
        // exist, descriptor -1, a null address): at worst it fails with an error code, in a
        // child that exits next.
        unsafe {
            libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]);
        }
        0
    }
}

/// What each filter decides for `nr` with `args`, in the order of [`Filter::ALL`].
fn verdicts(nr: c_long, args: [u64; 6]) -> [Verdict; 6] {
    Filter::ALL.map(|filter| under(filter, syscall(nr, args)))
}

const NO_SUCH_PATH: &CStr = c"/nonexistent/mote-seccomp-test";

/// The path argument of a test open: a file that does not exist, so an allowed open fails
/// with ENOENT and creates nothing.
fn no_such_path() -> u64 {
    NO_SUCH_PATH.as_ptr() as u64
}

/// Opens the test path with `flags`: `open` on musl, `openat` on glibc (which is how each C
/// library opens a file for std).
fn open_verdict(filter: Filter, flags: c_int) -> Verdict {
    #[cfg(target_env = "musl")]
    let (nr, args) = (
        libc::SYS_open,
        [no_such_path(), flags as u64, 0o600, 0, 0, 0],
    );
    #[cfg(not(target_env = "musl"))]
    let (nr, args) = (
        libc::SYS_openat,
        [
            libc::AT_FDCWD as u64,
            no_such_path(),
            flags as u64,
            0o600,
            0,
            0,
        ],
    );
    under(filter, syscall(nr, args))
}

fn ioctl(request: u64) -> [u64; 6] {
    [u64::MAX, request, 0, 0, 0, 0] // descriptor -1: an allowed request fails with EBADF
}

#[test]
fn build_allows_ioctl_only_for_the_requests_mote_makes() {
    let build = |request| under(Filter::Build, syscall(libc::SYS_ioctl, ioctl(request)));
    // One request of each kind of descriptor: /dev/kvm, a VM, a vCPU, a TAP (attaching and
    // reading back), a socket (the TAP's index, non-blocking), the terminal.
    for request in [
        0xae01,
        0x4020_ae46,
        0xae80,
        0x4004_54ca,
        0x8004_54d2,
        0x8933,
        0x5421,
        0x5402,
    ] {
        assert_eq!(build(request), Allowed, "{request:#x}");
    }
    // TIOCSTI (typing into a terminal), KVM_CREATE_DEVICE, KVM_SET_GSI_ROUTING: mote makes
    // none of them.
    for request in [0x5412, 0xc00c_aee0, 0x4008_ae6a] {
        assert_eq!(build(request), Killed, "{request:#x}");
    }
}

#[test]
fn build_allows_open_only_with_the_flags_mote_passes() {
    use libc::{O_APPEND, O_CLOEXEC, O_CREAT, O_EXCL, O_NOCTTY, O_NONBLOCK, O_RDONLY, O_RDWR};
    use libc::{O_PATH, O_TRUNC, O_WRONLY};
    let build = |flags| open_verdict(Filter::Build, flags);
    for flags in [
        O_RDONLY | O_CLOEXEC,
        O_RDWR | O_CLOEXEC,
        O_RDONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC,
        O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC,
        O_RDWR | O_NONBLOCK | O_CLOEXEC,
        O_RDWR | O_CREAT | O_APPEND | O_NONBLOCK | O_CLOEXEC,
        O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
        // musl adds O_LARGEFILE to every open.
        O_RDONLY | O_CLOEXEC | 0o100000,
    ] {
        assert_eq!(build(flags), Allowed, "{flags:#o}");
    }
    for flags in [
        O_RDONLY,
        O_PATH | O_CLOEXEC,
        O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
        O_RDWR | O_CREAT | O_CLOEXEC,
    ] {
        assert_eq!(build(flags), Killed, "{flags:#o}");
    }
}

#[test]
fn vmm_allows_open_only_for_drives_snapshots_and_proc() {
    use libc::{O_APPEND, O_CLOEXEC, O_CREAT, O_EXCL, O_NOCTTY, O_NONBLOCK, O_RDONLY, O_RDWR};
    use libc::{O_TRUNC, O_WRONLY};
    let vmm = |flags| open_verdict(Filter::Vmm, flags);
    for flags in [
        O_RDONLY | O_CLOEXEC,
        O_RDONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC,
        O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC,
        O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
    ] {
        assert_eq!(vmm(flags), Allowed, "{flags:#o}");
    }
    // /dev/kvm, a TAP and the log are opened before the guest runs, never after.
    for flags in [
        O_RDWR | O_CLOEXEC,
        O_RDWR | O_NONBLOCK | O_CLOEXEC,
        O_RDWR | O_CREAT | O_APPEND | O_NONBLOCK | O_CLOEXEC,
        O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
    ] {
        assert_eq!(vmm(flags), Killed, "{flags:#o}");
    }
}

#[test]
fn socket_is_allowed_only_for_unix_streams() {
    use libc::{AF_INET, AF_NETLINK, AF_UNIX, SOCK_CLOEXEC, SOCK_DGRAM, SOCK_NONBLOCK};
    use libc::{SOCK_RAW, SOCK_STREAM};
    let socket = |domain: c_int, kind: c_int| {
        syscall(libc::SYS_socket, [domain as u64, kind as u64, 0, 0, 0, 0])
    };
    let listener = SOCK_STREAM | SOCK_CLOEXEC;
    let connecting = SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC;
    assert_eq!(under(Filter::Build, socket(AF_UNIX, listener)), Allowed);
    assert_eq!(under(Filter::Build, socket(AF_UNIX, connecting)), Allowed);
    assert_eq!(under(Filter::Vmm, socket(AF_UNIX, connecting)), Allowed);
    // The vsock listener is made before the guest runs.
    assert_eq!(under(Filter::Vmm, socket(AF_UNIX, listener)), Killed);
    for filter in [Filter::Build, Filter::Vmm] {
        assert_eq!(under(filter, socket(AF_INET, connecting)), Killed);
        assert_eq!(
            under(filter, socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC)),
            Killed
        );
        assert_eq!(
            under(filter, socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC)),
            Killed
        );
    }
}

/// A child of `libc::clone` that returns at once, touching no thread-local state (a thread
/// started by the test has none).
extern "C" fn return_at_once(_: *mut c_void) -> c_int {
    0
}

/// Starts a task with `flags` the way the C library does, on a stack of its own.
fn clone_with(flags: c_int) -> impl FnOnce() -> c_int {
    const STACK_SIZE: usize = 64 << 10;
    // SAFETY: a new private anonymous mapping, checked below; it outlives the child it is
    // the stack of, which ends as soon as it starts.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    assert_ne!(stack, libc::MAP_FAILED);
    let top = stack as usize + STACK_SIZE;
    move || {
        let null = std::ptr::null_mut::<c_void>();
        // SAFETY: the child runs `return_at_once` on its own stack and exits; the parent
        // ids, TLS and child id pointers are null (no id written, TLS base 0, which the child
        // never reads).
        let child = unsafe {
            libc::clone(
                return_at_once,
                top as *mut c_void,
                flags,
                null,
                null,
                null,
                null,
            )
        };
        // The C library may refuse flags itself (musl refuses a thread's): then the filter was
        // never asked.
        if child > 0 {
            0
        } else {
            3
        }
    }
}

#[test]
fn clone_is_allowed_only_for_the_exit_reaper_and_new_threads() {
    let reaper = libc::CLONE_VM | libc::CLONE_FILES | libc::SIGCHLD;
    assert_eq!(under(Filter::Build, clone_with(reaper)), Allowed);
    assert_eq!(under(Filter::Vmm, clone_with(reaper)), Allowed);
    // A fork, a process in a new user namespace: mote makes neither.
    let fork = [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]; // if allowed, both copies exit 0
    let new_user = [(libc::CLONE_NEWUSER | libc::SIGCHLD) as u64, 0, 0, 0, 0, 0];
    for filter in [Filter::Build, Filter::Vmm] {
        assert_eq!(under(filter, syscall(libc::SYS_clone, fork)), Killed);
        assert_eq!(under(filter, syscall(libc::SYS_clone, new_user)), Killed);
    }
}

/// musl's pthread_create starts a thread with `clone` and these flags (glibc uses clone3,
/// whose flags seccomp cannot read). musl's `clone()` refuses them, so the call is made raw,
/// with a TLS base no thread can have: the kernel refuses it with EPERM before the thread
/// would run.
#[cfg(target_env = "musl")]
#[test]
fn build_allows_clone_with_the_flags_of_a_new_thread() {
    let thread = super::tests::MUSL_THREAD_CLONE_FLAGS;
    let clone_thread = || {
        let mut tid: libc::pid_t = 0;
        // SAFETY: the kernel checks the TLS base (above the user address space) before the
        // new thread exists, and fails the call with EPERM; no thread starts on our stack.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone,
                thread,
                0,
                &mut tid as *mut libc::pid_t,
                std::ptr::null_mut::<libc::pid_t>(),
                u64::MAX,
            )
        };
        let errno = std::io::Error::last_os_error().raw_os_error();
        if ret == -1 && errno == Some(libc::EPERM) {
            0
        } else {
            3
        }
    };
    assert_eq!(under(Filter::Build, clone_thread), Allowed);
    // Threads start before the guest runs, never after.
    assert_eq!(under(Filter::Vmm, clone_thread), Killed);
}

#[test]
fn build_allows_prctl_only_to_name_a_thread_and_to_install_filters() {
    let name = c"mote_test";
    let prctl =
        |option: c_int, arg: u64| syscall(libc::SYS_prctl, [option as u64, arg, 0, 0, 0, 0]);
    assert_eq!(
        under(
            Filter::Build,
            prctl(libc::PR_SET_NAME, name.as_ptr() as u64)
        ),
        Allowed
    );
    assert_eq!(
        under(Filter::Build, prctl(libc::PR_SET_NO_NEW_PRIVS, 1)),
        Allowed
    );
    assert_eq!(
        under(Filter::Build, prctl(libc::PR_SET_DUMPABLE, 1)),
        Killed
    );
    assert_eq!(
        under(Filter::Build, prctl(libc::PR_SET_PTRACER, u64::MAX)),
        Killed
    );
}

#[test]
fn build_allows_seccomp_only_to_install_a_filter() {
    const SECCOMP_SET_MODE_FILTER: u64 = 1;
    const SECCOMP_GET_ACTION_AVAIL: u64 = 2;
    const SECCOMP_FILTER_FLAG_TSYNC: u64 = 1;
    let seccomp = |op, flags| syscall(libc::SYS_seccomp, [op, flags, 0, 0, 0, 0]);
    // No program (a null pointer): an allowed call fails with EFAULT.
    assert_eq!(
        under(Filter::Build, seccomp(SECCOMP_SET_MODE_FILTER, 0)),
        Allowed
    );
    assert_eq!(
        under(
            Filter::Build,
            seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC)
        ),
        Killed
    );
    assert_eq!(
        under(Filter::Build, seccomp(SECCOMP_GET_ACTION_AVAIL, 0)),
        Killed
    );
}

#[test]
fn every_filter_allows_mremap_only_to_move_a_mapping() {
    let mremap = |flags: c_int| [0, 0, 4096, flags as u64, 0, 0];
    // An empty old mapping at address 0: an allowed call fails with EINVAL.
    assert_eq!(
        verdicts(libc::SYS_mremap, mremap(libc::MREMAP_MAYMOVE)),
        [Allowed; 6]
    );
    assert_eq!(
        verdicts(
            libc::SYS_mremap,
            mremap(libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED)
        ),
        [Killed; 6]
    );
    assert_eq!(verdicts(libc::SYS_mremap, mremap(0)), [Killed; 6]);
}

#[test]
fn calls_mote_never_makes_are_refused() {
    let memfd = [
        c"mote".as_ptr() as u64,
        libc::MFD_CLOEXEC as u64,
        0,
        0,
        0,
        0,
    ];
    assert_eq!(verdicts(libc::SYS_memfd_create, memfd), [Killed; 6]);
    let no_message = [u64::MAX, 0, 0, 0, 0, 0];
    assert_eq!(verdicts(libc::SYS_sendmsg, no_message), [Killed; 6]);
    assert_eq!(verdicts(libc::SYS_recvmsg, no_message), [Killed; 6]);
}

#[test]
fn only_build_makes_a_userfaultfd_and_sends_it() {
    // Filter::ALL's order: build, vmm, api, vcpu, uffd_watch, lazy_pager.
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let only_build = [Allowed, Killed, Killed, Killed, Killed, Killed];
    // Under `build` a real userfaultfd may be made here: it is closed with the child.
    assert_eq!(
        verdicts(libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0]),
        only_build
    );
    // Blocking, or user-mode only (UFFD_USER_MODE_ONLY, 1): not what mote asks for.
    assert_eq!(
        verdicts(
            libc::SYS_userfaultfd,
            [libc::O_CLOEXEC as u64, 0, 0, 0, 0, 0]
        ),
        [Killed; 6]
    );
    assert_eq!(
        verdicts(libc::SYS_userfaultfd, [flags | 1, 0, 0, 0, 0, 0]),
        [Killed; 6]
    );
    let nosignal = [u64::MAX, 0, libc::MSG_NOSIGNAL as u64, 0, 0, 0];
    assert_eq!(verdicts(libc::SYS_sendmsg, nosignal), only_build);
    // USERFAULTFD_IOC_NEW, UFFDIO_API, UFFDIO_REGISTER.
    for request in [0xaa00, 0xc018_aa3f, 0xc020_aa00] {
        assert_eq!(
            verdicts(libc::SYS_ioctl, ioctl(request)),
            only_build,
            "{request:#x}"
        );
    }
}

#[test]
fn only_build_and_the_lazy_pager_fill_guest_memory() {
    // UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE: the working-set load (under `build`, before
    // the vCPUs run) and the pager's threads. On a descriptor that is no userfaultfd an
    // allowed call fails with ENOTTY.
    let build_and_pager = [Allowed, Killed, Killed, Killed, Killed, Allowed];
    for request in [0xc028_aa03, 0xc020_aa04, 0x8010_aa02] {
        assert_eq!(
            verdicts(libc::SYS_ioctl, ioctl(request)),
            build_and_pager,
            "{request:#x}"
        );
    }
}
