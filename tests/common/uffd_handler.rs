//! A page-fault handler for mote's `Uffd` memory backend, as Firecracker's example handlers
//! are: it listens on a Unix socket, takes the monitor's message (the JSON array of
//! `GuestRegionUffdMapping`) with the userfaultfd attached, maps the snapshot's memory file
//! privately and serves each fault with UFFDIO_COPY of the faulting page from it. Pages the
//! monitor gave back (UFFD_EVENT_REMOVE: the balloon) are served zeroed when touched again.
//! It counts what it did, and can be told to stop serving, to hang up or to go, for the tests
//! of a handler that fails.
//!
//! Shared, by `#[path]`, by the probe-guest tests (a thread of the test) and tests/hosted-tool
//! (`uffd-handler`, a process of its own in the emulated host and in `tools/bench snapshot`),
//! so it uses std and the C library's calls only (hosted-tool has no dependencies).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
const UFFDIO_WAKE: u64 = 0x8010_aa02;
const POLLIN: i16 = 1;
const POLLHUP: i16 = 0x10;
const PROT_READ: i32 = 1;
const MAP_PRIVATE: i32 = 2;
const SOL_SOCKET: i32 = 1;
const SCM_RIGHTS: i32 = 1;
const EAGAIN: i32 = 11;
const EEXIST: i32 = 17;
const ENOENT: i32 = 2;

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

#[repr(C)]
struct IoVec {
    base: *mut u8,
    len: usize,
}

/// `struct msghdr` as the kernel lays it out on 64-bit arches.
#[repr(C)]
struct MsgHdr {
    name: *mut u8,
    namelen: u32,
    iov: *mut IoVec,
    iovlen: usize,
    control: *mut u8,
    controllen: usize,
    flags: i32,
}

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage` and `struct uffdio_range` (for UFFDIO_WAKE, its first two).
#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

extern "C" {
    fn poll(fds: *mut PollFd, nfds: u64, timeout: i32) -> i32;
    fn recvmsg(fd: i32, msg: *mut MsgHdr, flags: i32) -> isize;
    fn read(fd: i32, buf: *mut u8, count: usize) -> isize;
    fn ioctl(fd: i32, request: u64, ...) -> i32;
    fn mmap(addr: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, offset: i64) -> *mut u8;
}

/// One region of the monitor's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub base_host_virt_addr: u64,
    pub size: u64,
    pub offset: u64,
    pub page_size: u64,
}

/// What a test steers and reads.
#[derive(Debug)]
pub struct Control {
    /// Faults served from the memory file.
    pub faults: AtomicU64,
    /// Faults served with a zero page (pages the monitor removed before).
    pub zero_faults: AtomicU64,
    /// UFFD_EVENT_REMOVE events read.
    pub removes: AtomicU64,
    /// The monitor's message, once received.
    pub mappings: std::sync::Mutex<Vec<Mapping>>,
    /// Cleared: the handler stops reading the userfaultfd (stuck), faults queue up.
    pub serving: AtomicBool,
    /// Set: the handler closes its socket (and goes on serving, or not, as `serving` says).
    pub hang_up: AtomicBool,
    /// Set: the handler returns, closing everything it has (gone).
    pub quit: AtomicBool,
    /// Set: the handler writes bytes the contract has no place for on its socket, once.
    pub garbage: AtomicBool,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            faults: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            removes: AtomicU64::new(0),
            mappings: Default::default(),
            serving: AtomicBool::new(true),
            hang_up: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            garbage: AtomicBool::new(false),
        }
    }
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// The unsigned number after `"key":` in `object`.
fn field(object: &str, key: &str) -> Option<u64> {
    let at = object.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = object[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The monitor's message: `[{"base_host_virt_addr":…,"size":…,"offset":…,"page_size":…,…},…]`.
pub fn parse_mappings(message: &str) -> Option<Vec<Mapping>> {
    let body = message.trim().strip_prefix('[')?.strip_suffix(']')?;
    body.split('}')
        .filter(|object| object.contains('{'))
        .map(|object| {
            Some(Mapping {
                base_host_virt_addr: field(object, "base_host_virt_addr")?,
                size: field(object, "size")?,
                offset: field(object, "offset")?,
                page_size: field(object, "page_size")?,
            })
        })
        .collect()
}

/// Reads the monitor's message and the descriptor that comes with it.
pub fn receive(stream: &UnixStream) -> io::Result<(String, OwnedFd)> {
    let mut buf = vec![0u8; 64 << 10];
    // Room for one control message with one descriptor (CMSG_SPACE(4) = 24), 8-aligned.
    let mut control = [0u64; 4];
    let mut iov = IoVec {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    };
    let mut msg = MsgHdr {
        name: std::ptr::null_mut(),
        namelen: 0,
        iov: &mut iov,
        iovlen: 1,
        control: control.as_mut_ptr().cast(),
        controllen: std::mem::size_of_val(&control),
        flags: 0,
    };
    // SAFETY: every pointer in `msg` points into buffers alive for the call, with their sizes.
    let n = unsafe { recvmsg(stream.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(last_error());
    }
    // struct cmsghdr { size_t len; int level; int type; } then the data.
    let level = control[1] as u32 as i32;
    let kind = (control[1] >> 32) as u32 as i32;
    if msg.controllen < 20 || level != SOL_SOCKET || kind != SCM_RIGHTS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the message came without a descriptor",
        ));
    }
    let fd = control[2] as u32 as RawFd;
    buf.truncate(n as usize);
    let text = String::from_utf8(buf)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?;
    // SAFETY: SCM_RIGHTS made this descriptor ours.
    Ok((text, unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The memory file, mapped read-only and private.
fn map_file(path: &Path) -> io::Result<(*const u8, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    // SAFETY: a new private read-only mapping of the whole file; never unmapped (the handler
    // serves from it until the process ends).
    let at = unsafe {
        mmap(
            std::ptr::null_mut(),
            len.max(1) as usize,
            PROT_READ,
            MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if at as isize == -1 {
        return Err(last_error());
    }
    Ok((at, len))
}

/// Accepts the monitor on `listener` and serves its faults from `mem_file` until the monitor
/// hangs up (or `control.quit`).
pub fn serve(listener: &UnixListener, mem_file: &Path, control: &Control) -> io::Result<()> {
    let (stream, _) = listener.accept()?;
    let (message, uffd) = receive(&stream)?;
    let mappings = parse_mappings(&message).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad message {message:?}"),
        )
    })?;
    *control.mappings.lock().unwrap_or_else(|e| e.into_inner()) = mappings.clone();
    let (file, file_len) = map_file(mem_file)?;
    let mut handler = Handler {
        uffd,
        mappings,
        file,
        file_len,
        removed: Vec::new(),
        zeros: Vec::new(),
        retry: Vec::new(),
    };
    let mut stream = Some(stream);
    loop {
        if control.quit.load(Ordering::SeqCst) {
            return Ok(());
        }
        if control.garbage.swap(false, Ordering::SeqCst) {
            if let Some(mut socket) = stream.as_ref() {
                std::io::Write::write_all(&mut socket, b"\x00garbage{]\n")?;
            }
        }
        if control.hang_up.load(Ordering::SeqCst) {
            stream = None;
        }
        let mut fds = [
            PollFd {
                fd: handler.uffd.as_raw_fd(),
                events: if control.serving.load(Ordering::SeqCst) {
                    POLLIN
                } else {
                    0
                },
                revents: 0,
            },
            PollFd {
                fd: stream.as_ref().map_or(-1, |s| s.as_raw_fd()),
                events: POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two pollfds, alive for the call.
        if unsafe { poll(fds.as_mut_ptr(), 2, 20) } < 0 {
            let err = last_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
            continue;
        }
        if fds[1].revents & (POLLHUP | POLLIN) != 0 {
            // The monitor sends nothing after its message: this is its end.
            return Ok(());
        }
        if fds[0].revents & POLLIN != 0 {
            handler.serve_one(control)?;
        }
        if control.serving.load(Ordering::SeqCst) {
            handler.retry_refused(control)?;
        }
    }
}

struct Handler {
    uffd: OwnedFd,
    mappings: Vec<Mapping>,
    file: *const u8,
    file_len: u64,
    /// Ranges the monitor removed: served zeroed from then on.
    removed: Vec<(u64, u64)>,
    /// A zero page for huge pages (UFFDIO_ZEROPAGE is for 4 KiB pages only).
    zeros: Vec<u8>,
    /// Faults whose fill the kernel refused with EAGAIN (a remove was under way): their
    /// threads still wait, so each is filled again once the pending events are read.
    retry: Vec<u64>,
}

impl Handler {
    fn serve_one(&mut self, control: &Control) -> io::Result<()> {
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes (one struct uffd_msg) into `msg`.
        let n = unsafe { read(self.uffd.as_raw_fd(), msg.as_mut_ptr(), msg.len()) };
        if n < 0 {
            let err = last_error();
            return match err.raw_os_error() {
                Some(EAGAIN) => Ok(()),
                _ => Err(err),
            };
        }
        let word = |at: usize| u64::from_ne_bytes(msg[at..at + 8].try_into().unwrap_or_default());
        match msg[0] {
            UFFD_EVENT_PAGEFAULT => self.fault(word(16), control),
            UFFD_EVENT_REMOVE => {
                self.removed.push((word(8), word(16)));
                control.removes.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn fault(&mut self, addr: u64, control: &Control) -> io::Result<()> {
        let Some(region) = self
            .mappings
            .iter()
            .find(|m| (m.base_host_virt_addr..m.base_host_virt_addr + m.size).contains(&addr))
            .copied()
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a fault at {addr:#x}, outside guest memory"),
            ));
        };
        let page = region.page_size.max(4096);
        let start = addr & !(page - 1);
        let removed = self
            .removed
            .iter()
            .any(|&(from, to)| start >= from && start < to);
        let offset = region.offset + (start - region.base_host_virt_addr);
        let zeroed = removed || offset + page > self.file_len;
        let result = if zeroed {
            self.zero(start, page)
        } else {
            // SAFETY: `offset + page` is within the mapped file.
            let src = unsafe { self.file.add(offset as usize) };
            self.copy(start, src, page)
        };
        match result {
            Ok(()) => {
                let count = if zeroed {
                    &control.zero_faults
                } else {
                    &control.faults
                };
                count.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            // Another fault on the same page was served first; wake whoever waits.
            Err(err) if err.raw_os_error() == Some(EEXIST) => self.wake(start, page),
            // A remove is under way: the kernel takes no fill until its event is read, and
            // the faulting thread goes on waiting; fill again after the events.
            Err(err) if err.raw_os_error() == Some(EAGAIN) => {
                self.retry.push(addr);
                Ok(())
            }
            // The range is no longer registered (unmapped): nobody waits on it.
            Err(err) if err.raw_os_error() == Some(ENOENT) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Fills again the faults the kernel refused with EAGAIN, now that the events before them
    /// have been read (those refused again stay for the next round).
    fn retry_refused(&mut self, control: &Control) -> io::Result<()> {
        for addr in std::mem::take(&mut self.retry) {
            self.fault(addr, control)?;
        }
        Ok(())
    }

    fn copy(&self, dst: u64, src: *const u8, len: u64) -> io::Result<()> {
        let mut copy = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (mapped) into the registered page.
        if unsafe { ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY, &mut copy) } != 0 {
            return Err(last_error());
        }
        Ok(())
    }

    fn zero(&mut self, start: u64, len: u64) -> io::Result<()> {
        if len > 4096 {
            if self.zeros.len() < len as usize {
                self.zeros = vec![0; len as usize];
            }
            return self.copy(start, self.zeros.as_ptr(), len);
        }
        let mut zero = UffdioZeropage {
            start,
            len,
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE maps a zero page at the registered `start`.
        if unsafe { ioctl(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut zero) } != 0 {
            return Err(last_error());
        }
        Ok(())
    }

    fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = [start, len];
        // SAFETY: UFFDIO_WAKE reads a struct uffdio_range.
        if unsafe { ioctl(self.uffd.as_raw_fd(), UFFDIO_WAKE, range.as_mut_ptr()) } != 0 {
            return Err(last_error());
        }
        Ok(())
    }
}

/// Binds `socket` and serves one monitor from `mem_file` on a thread; the control and the
/// thread, whose result says whether the handler failed.
pub fn spawn(
    socket: &Path,
    mem_file: &Path,
) -> (
    std::sync::Arc<Control>,
    std::thread::JoinHandle<io::Result<()>>,
) {
    let listener = UnixListener::bind(socket).expect("bind the handler's socket");
    let control = std::sync::Arc::new(Control::default());
    let mem_file = mem_file.to_path_buf();
    let theirs = control.clone();
    let thread = std::thread::spawn(move || serve(&listener, &mem_file, &theirs));
    (control, thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monitors_message_is_parsed() {
        let message = r#"[{"base_host_virt_addr":140000,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096},{"base_host_virt_addr":9,"size":8192,"offset":4096,"page_size":2097152,"page_size_kib":2097152}]"#;
        let mappings = parse_mappings(message).unwrap();
        assert_eq!(mappings.len(), 2);
        assert_eq!(mappings[1].offset, 4096);
        assert_eq!(mappings[1].page_size, 2 << 20);
        assert_eq!(mappings[0].base_host_virt_addr, 140000);
        assert!(parse_mappings("garbage").is_none());
    }
}
