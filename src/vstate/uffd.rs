//! userfaultfd: a descriptor through which another process serves the page faults of a range
//! of this process's memory (the `Uffd` memory backend of a snapshot load).
//!
//! Raw system calls and ioctls, with the kernel's structures written out here: the
//! `userfaultfd` crate (what Firecracker uses) generates its bindings with bindgen and
//! compiles C at build time, which needs libclang and a C compiler for each musl target, and
//! these machines have neither for aarch64. The ioctl numbers are the generic `_IOWR` encoding,
//! the same on x86_64 and aarch64; the system call's number comes from libc per arch.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The node through which kernels from 6.1 hand out userfaultfds to whoever may open it.
pub const DEV_USERFAULTFD: &str = "/dev/userfaultfd";

/// `UFFD_API`: the only API version.
const UFFD_API: u64 = 0xaa;
/// `UFFD_FEATURE_EVENT_REMOVE`: madvise(MADV_DONTNEED) on a registered range (the balloon
/// giving pages back) reaches the handler as an event, so it serves those pages zeroed later.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFDIO_REGISTER_MODE_MISSING`: faults on pages that are not there yet.
const REGISTER_MODE_MISSING: u64 = 1;

/// `_IOWR(0xAA, nr, size)`.
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}
/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0)` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = 0xaa << 8;
const UFFDIO_API: u64 = iowr(0x3f, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
/// `_IOR(0xAA, 0x02, struct uffdio_range)`.
pub const UFFDIO_WAKE: u64 =
    (2 << 30) | ((std::mem::size_of::<UffdioRange>() as u64) << 16) | (0xaa << 8) | 0x02;
pub const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
pub const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());

/// `UFFD_EVENT_PAGEFAULT`: a thread touched a missing page of a registered range.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_REMOVE`: madvise(MADV_DONTNEED) dropped a range (the balloon).
pub const EVENT_REMOVE: u8 = 0x15;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register` (its range inline).
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    /// Bytes copied, or a negated errno when none were.
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    /// Bytes mapped, or a negated errno when none were.
    zeropage: i64,
}

/// One `struct uffd_msg` (32 bytes), the fields mote reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// A fault at this address (not rounded to the page).
    PageFault { address: u64 },
    /// `[start, end)` was dropped by madvise: its pages are zero from now on.
    Remove { start: u64, end: u64 },
    /// An event mote does not ask for.
    Other(u8),
}

/// The size of a `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

impl UffdEvent {
    /// Decodes one message as the kernel lays it out: the event in byte 0, its arguments
    /// from byte 8.
    pub fn decode(msg: &[u8; MSG_SIZE]) -> Self {
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&msg[at..at + 8]);
            u64::from_ne_bytes(bytes)
        };
        match msg[0] {
            // pagefault: flags at 8, address at 16.
            EVENT_PAGEFAULT => UffdEvent::PageFault { address: word(16) },
            // remove: start at 8, end at 16.
            EVENT_REMOVE => UffdEvent::Remove {
                start: word(8),
                end: word(16),
            },
            other => UffdEvent::Other(other),
        }
    }
}

/// What one UFFDIO_COPY or UFFDIO_ZEROPAGE did to its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// Every byte.
    All,
    /// The first this many bytes, then it stopped (the next page is there already, or the
    /// call was interrupted): the caller goes on from there.
    Part(u64),
    /// None: the first page is there already (EEXIST).
    Present,
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd ({DEV_USERFAULTFD}: {dev}; userfaultfd(2): {syscall}): give this process read-write access to {DEV_USERFAULTFD} (the jailer makes the node in its jail), or CAP_SYS_PTRACE, or set vm.unprivileged_userfaultfd to 1")]
    Create { dev: String, syscall: io::Error },
    #[error(
        "the kernel refuses the userfaultfd API with the remove events the balloon needs: {0}"
    )]
    Api(io::Error),
    #[error("cannot fill guest memory ({len:#x} bytes at host address {start:#x}) through the userfaultfd: {source}")]
    Fill {
        start: u64,
        len: u64,
        source: io::Error,
    },
    #[error("cannot read the userfaultfd: {0}")]
    Read(io::Error),
    #[error("cannot register guest memory ({len:#x} bytes at host address {start:#x}) with the userfaultfd: {source}")]
    Register {
        start: u64,
        len: u64,
        source: io::Error,
    },
}

/// A userfaultfd, non-blocking and close-on-exec, whose API is agreed with `features`.
#[derive(Debug)]
pub struct Uffd(OwnedFd);

impl Uffd {
    /// Creates one through /dev/userfaultfd where that can be opened (its permissions decide,
    /// so a jailed monitor needs no capability), else through the system call (root, or
    /// CAP_SYS_PTRACE while vm.unprivileged_userfaultfd is 0: faults that KVM takes in the
    /// kernel on the guest's behalf are not reported to user-mode-only descriptors).
    pub fn new(features: u64) -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let from_dev = open_from_dev(flags);
        let fd = match from_dev {
            Ok(fd) => fd,
            Err(dev) => from_syscall(flags).map_err(|syscall| UffdError::Create {
                dev: dev.to_string(),
                syscall,
            })?,
        };
        let uffd = Self(fd);
        uffd.api(features)?;
        Ok(uffd)
    }

    fn api(&self, features: u64) -> Result<(), UffdError> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is (repr(C),
        // the kernel's layout), alive for the call; the descriptor is a userfaultfd we own.
        let ret = unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if ret != 0 {
            return Err(UffdError::Api(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Has faults on missing pages of `[start, start + len)` reported on this descriptor.
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut register = UffdioRegister {
            start,
            len,
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`, which `register`
        // is, alive for the call. The kernel checks the range is mapped; from here on faults
        // in it wait for whoever serves this descriptor, which the caller hands the range to.
        let ret = unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_REGISTER as _, &mut register) };
        if ret != 0 {
            return Err(UffdError::Register {
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Uffd {
    /// Fills `[dst, dst + len)`, all of it missing until now, with a copy of the bytes at
    /// `src` (UFFDIO_COPY), waking whoever waits on those pages.
    ///
    /// # Safety
    /// `src..src + len` must be readable memory of this process (a bad address is reported by
    /// the kernel as EFAULT, not a crash, but the bytes become guest memory).
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64) -> Result<Filled, UffdError> {
        let mut copy = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes a `struct uffdio_copy`, which `copy` is, alive
        // for the call; it writes only into the registered range at `dst`, pages that are
        // missing (it refuses present ones with EEXIST), and reads `src`, which the caller
        // vouches for.
        let ret = unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_COPY as _, &mut copy) };
        filled(ret, copy.copy, dst, len)
    }

    /// Maps the zero page over `[dst, dst + len)`, all of it missing until now
    /// (UFFDIO_ZEROPAGE), waking whoever waits on those pages.
    pub fn zero(&self, dst: u64, len: u64) -> Result<Filled, UffdError> {
        let mut zero = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes a `struct uffdio_zeropage`, which `zero`
        // is, alive for the call; it maps zero pages only where pages of the registered range
        // are missing.
        let ret = unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut zero) };
        filled(ret, zero.zeropage, dst, len)
    }

    /// Wakes whoever waits on `[start, start + len)` (UFFDIO_WAKE): for a fault on a page
    /// that someone else filled meanwhile.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`, which `range` is, alive for the
        // call; it changes no memory.
        let ret = unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_WAKE as _, &range) };
        if ret != 0 {
            return Err(UffdError::Fill {
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads the messages waiting on the descriptor into `buf`, none when there are none (it
    /// does not block); returns how many.
    pub fn read_events(&self, buf: &mut [[u8; MSG_SIZE]]) -> Result<usize, UffdError> {
        // SAFETY: reads at most `buf`'s bytes into it; the kernel writes whole messages.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                std::mem::size_of_val(buf),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(UffdError::Read(err)),
            };
        }
        Ok(n as usize / MSG_SIZE)
    }
}

/// What a UFFDIO_COPY or UFFDIO_ZEROPAGE that returned `ret` and reported `done` did.
fn filled(ret: libc::c_int, done: i64, start: u64, len: u64) -> Result<Filled, UffdError> {
    if ret == 0 {
        return Ok(Filled::All);
    }
    match done {
        // Stopped part way (the kernel says EAGAIN and how far it got).
        bytes if bytes > 0 => Ok(Filled::Part(bytes as u64)),
        errno if -errno == i64::from(libc::EEXIST) => Ok(Filled::Present),
        // Interrupted before the first page, or the mapping changed under it: try again.
        errno if -errno == i64::from(libc::EAGAIN) => Ok(Filled::Part(0)),
        // Refused before it began (EINVAL, ENOENT when the process is exiting, ...): the
        // count was not written, errno says why.
        0 => Err(UffdError::Fill {
            start,
            len,
            source: io::Error::last_os_error(),
        }),
        errno => Err(UffdError::Fill {
            start,
            len,
            source: io::Error::from_raw_os_error(-errno as i32),
        }),
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

fn open_from_dev(flags: libc::c_int) -> io::Result<OwnedFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_USERFAULTFD)?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags by value and returns it;
    // `dev` is the open node, alive for the call.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn from_syscall(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes its flags by value and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns; descriptors fit in a c_int.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_numbers_are_the_kernels() {
        // From <linux/userfaultfd.h>, as strace prints them.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
    }

    #[test]
    fn copy_and_zero_fill_missing_pages_and_tell_present_ones() {
        let uffd = match Uffd::new(FEATURE_EVENT_REMOVE) {
            Ok(uffd) => uffd,
            Err(err) => {
                eprintln!("SKIPPED: {err}");
                return;
            }
        };
        let len = 4 * 4096usize;
        // SAFETY: a fresh anonymous private mapping, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let at = addr as u64;
        uffd.register(at, len as u64).unwrap();
        let source = vec![0x5au8; 2 * 4096];
        // SAFETY: `source` is 2 pages, alive for the call.
        let copied = unsafe { uffd.copy(at + 4096, source.as_ptr(), 4096) }.unwrap();
        assert_eq!(copied, Filled::All);
        // Pages 0..2: page 0 goes in, page 1 is there already: a part.
        // SAFETY: as above.
        let part = unsafe { uffd.copy(at, source.as_ptr(), 2 * 4096) }.unwrap();
        assert_eq!(part, Filled::Part(4096));
        // SAFETY: as above.
        let present = unsafe { uffd.copy(at + 4096, source.as_ptr(), 4096) }.unwrap();
        assert_eq!(present, Filled::Present);
        assert_eq!(uffd.zero(at + 2 * 4096, 2 * 4096).unwrap(), Filled::All);
        assert_eq!(uffd.zero(at, 4096).unwrap(), Filled::Present);
        // Every page is there now: reading them takes no fault (which would wait for ever).
        // SAFETY: the mapping is live and every page filled.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
        assert!(bytes[..2 * 4096].iter().all(|b| *b == 0x5a));
        assert!(bytes[2 * 4096..].iter().all(|b| *b == 0));
        assert!(uffd.wake(at, 4096).is_ok());
        // A range outside anything registered is an error naming it, not a crash.
        let err = uffd.zero(8 << 40, 4096).unwrap_err();
        assert!(err.to_string().contains("0x80000000000"), "{err}");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(addr, len) };
    }

    #[test]
    fn a_fault_on_registered_memory_is_reported_and_waits() {
        let uffd = match Uffd::new(FEATURE_EVENT_REMOVE) {
            Ok(uffd) => uffd,
            Err(err) => {
                eprintln!("SKIPPED: {err}");
                return;
            }
        };
        let len = 4096usize;
        // SAFETY: a fresh anonymous private mapping, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        uffd.register(addr as u64, len as u64).unwrap();
        let mut poll = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, alive for the call.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 0, "nothing yet");
        let at = addr as usize;
        let reader = std::thread::spawn(move || {
            // SAFETY: the page is mapped; the read waits until it is served or unregistered.
            unsafe { std::ptr::read_volatile(at as *const u8) }
        });
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 5000) }, 1, "a fault came");
        let mut msg = [0u8; 32];
        // SAFETY: reads one 32-byte `struct uffd_msg` into `msg`.
        let n = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        assert_eq!(n, 32);
        assert_eq!(msg[0], 0x12, "UFFD_EVENT_PAGEFAULT");
        let fault = u64::from_ne_bytes(msg[16..24].try_into().unwrap());
        assert_eq!(fault & !0xfff, at as u64);
        // Dropping the descriptor releases the waiter, which then reads a zero page.
        drop(uffd);
        assert_eq!(reader.join().unwrap(), 0);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(addr, len) };
    }
}
