//! AF_VSOCK sockets through the C library's calls (std has no vsock), and the stream trait
//! that lets one copy loop serve vsock, Unix and TCP streams.

use std::fs::File;
use std::io::{Error, Read, Result, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const SHUT_WR: i32 = 1;
const VMADDR_CID_ANY: u32 = u32::MAX;

/// struct sockaddr_vm from <linux/vm_sockets.h>.
#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved: u16,
    port: u32,
    cid: u32,
    zero: [u8; 4],
}

extern "C" {
    fn socket(domain: i32, kind: i32, protocol: i32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn listen(fd: i32, backlog: i32) -> i32;
    fn accept(fd: i32, addr: *mut SockaddrVm, len: *mut u32) -> i32;
    fn shutdown(fd: i32, how: i32) -> i32;
}

pub trait Stream: Read + Write + Send {
    fn try_clone_box(&self) -> Result<Box<dyn Stream>>;
    fn shutdown_write(&self) -> Result<()>;
}

impl Stream for UnixStream {
    fn try_clone_box(&self) -> Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_write(&self) -> Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Stream for TcpStream {
    fn try_clone_box(&self) -> Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_write(&self) -> Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// A connected vsock stream (read and write are the file calls).
pub struct Vsock(File);

impl Read for Vsock {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Vsock {
    fn write(&mut self, buf: &[u8]) -> Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

impl Stream for Vsock {
    fn try_clone_box(&self) -> Result<Box<dyn Stream>> {
        Ok(Box::new(Vsock(self.0.try_clone()?)))
    }
    fn shutdown_write(&self) -> Result<()> {
        // SAFETY: shutdown only acts on this process's own open socket.
        check(unsafe { shutdown(self.0.as_raw_fd(), SHUT_WR) }).map(drop)
    }
}

fn check(ret: i32) -> Result<i32> {
    if ret < 0 {
        Err(Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn new_socket() -> Result<OwnedFd> {
    // SAFETY: socket returns a new descriptor (or -1), which OwnedFd then owns alone.
    Ok(unsafe { OwnedFd::from_raw_fd(check(socket(AF_VSOCK, SOCK_STREAM, 0))?) })
}

fn address(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm {
        family: AF_VSOCK as u16,
        reserved: 0,
        port,
        cid,
        zero: [0; 4],
    }
}

pub fn vsock_connect(cid: u32, port: u32) -> Result<Vsock> {
    let fd = new_socket()?;
    let addr = address(cid, port);
    // SAFETY: addr is a valid sockaddr_vm of the length given, read only during the call.
    check(unsafe { connect(fd.as_raw_fd(), &addr, size_of::<SockaddrVm>() as u32) })?;
    Ok(Vsock(File::from(fd)))
}

pub struct VsockListener(OwnedFd);

pub fn vsock_listen(port: u32) -> Result<VsockListener> {
    let fd = new_socket()?;
    let addr = address(VMADDR_CID_ANY, port);
    // SAFETY: as in vsock_connect; listen takes only the descriptor.
    check(unsafe { bind(fd.as_raw_fd(), &addr, size_of::<SockaddrVm>() as u32) })?;
    // SAFETY: listen only acts on this process's own socket.
    check(unsafe { listen(fd.as_raw_fd(), 16) })?;
    Ok(VsockListener(fd))
}

impl VsockListener {
    pub fn accept(&self) -> Result<Vsock> {
        let mut addr = address(0, 0);
        let mut len = size_of::<SockaddrVm>() as u32;
        // SAFETY: addr and len are valid for writes of the sizes given; the new descriptor is
        // owned by the File alone.
        let fd = check(unsafe { accept(self.0.as_raw_fd(), &mut addr, &mut len) })?;
        // SAFETY: accept returned a new descriptor that nothing else owns.
        Ok(Vsock(unsafe { File::from_raw_fd(fd) }))
    }
}
