//! A host TAP device opened for virtio-net: `/dev/net/tun` attached to an existing TAP with
//! IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, the 12-byte `virtio_net_hdr_v1` in front of every
//! frame, non-blocking reads and writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The longest interface name Linux takes (IFNAMSIZ less the terminating NUL).
pub const IFNAME_MAX_LEN: usize = 15;

const TUN_PATH: &str = "/dev/net/tun";

// From <linux/if_tun.h>: _IOW('T', 202, int), _IOW('T', 208, unsigned int),
// _IOR('T', 210, unsigned int), _IOW('T', 216, int).
const TUNSETIFF: libc::Ioctl = 0x4004_54ca;
const TUNSETOFFLOAD: libc::Ioctl = 0x4004_54d0;
// The request has its top bit set: an int (musl) takes it negative, the bits unchanged.
const TUNGETIFF: libc::Ioctl = 0x8004_54d2_u32 as libc::Ioctl;
const TUNSETVNETHDRSZ: libc::Ioctl = 0x4004_54d8;
const IFF_TUN: u16 = 0x0001;
const IFF_TAP: u16 = 0x0002;
const IFF_MULTI_QUEUE: u16 = 0x0100;
const IFF_PERSIST: u16 = 0x0800;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
/// From <linux/sockios.h>: an interface's index by name, asked of any socket.
const SIOCGIFINDEX: libc::Ioctl = 0x8933;

/// TUNSETOFFLOAD bits: what the reader of the TAP (the guest) accepts in the frames it gets.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is invalid: use 1 to {IFNAME_MAX_LEN} bytes, no '/', ' ' or NUL")]
    InvalidName(String),
    #[error("there is no network interface {0:?}: create the TAP first (ip tuntap add dev {0} mode tap)")]
    Missing(String),
    #[error("cannot look up the network interface {name:?}: {source}")]
    Lookup { name: String, source: io::Error },
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(io::Error),
    #[error("TAP {0:?} is busy: another process has it open")]
    Busy(String),
    #[error(
        "{0:?} is not a TAP device (a TUN device, another kind of interface, or a multi-queue TAP)"
    )]
    NotATap(String),
    #[error(
        "TAP {0:?} is not this process's to attach: make it with `ip tuntap add dev {0} mode tap \
         user UID` for the monitor's uid (a jailed monitor's is the jailer's --uid)"
    )]
    NotPermitted(String),
    #[error("cannot attach to TAP {name:?}: {source}")]
    Attach { name: String, source: io::Error },
    #[error("cannot set up TAP {name:?}: {what}: {source}")]
    Configure {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF, TUNGETIFF and SIOCGIFINDEX use it: the name, then the flags
/// (or the index) in the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: u16,
    _union_rest: [u8; 22],
}

impl IfReq {
    /// `name` must be a valid interface name (at most IFNAME_MAX_LEN bytes).
    fn new(name: &str, flags: u16) -> Self {
        let mut req = IfReq {
            name: [0; 16],
            flags,
            _union_rest: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
}

/// An open TAP: frames in and out, each led by a `virtio_net_hdr_v1`.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing TAP `name` (never creates one: a missing TAP is an error).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty()
            || name.len() > IFNAME_MAX_LEN
            || name.bytes().any(|b| b == b'/' || b == b' ' || b == 0)
        {
            return Err(TapError::InvalidName(name.to_string()));
        }
        // TUNSETIFF with a name that does not exist would create a new TAP nobody configured.
        let exists = interface_exists(name).map_err(|source| TapError::Lookup {
            name: name.to_string(),
            source,
        })?;
        if !exists {
            return Err(TapError::Missing(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out in full
        // (40 bytes); the fd is the open tun device.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                Some(libc::EINVAL) => TapError::NotATap(name.to_string()),
                Some(libc::EPERM) => TapError::NotPermitted(name.to_string()),
                _ => TapError::Attach {
                    name: name.to_string(),
                    source: err,
                },
            });
        }
        let tap = Self {
            file,
            name: name.to_string(),
        };
        tap.check_attached()?;
        // virtio 1.x always has the 12-byte header (with num_buffers).
        tap.ioctl_int(
            TUNSETVNETHDRSZ,
            super::VNET_HDR_LEN as libc::c_int,
            "header size",
        )?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// What the kernel says it attached: a single-queue TAP with the virtio header, and one
    /// that was there before. A TAP that is not persistent had no other holder (else it would
    /// be busy), so TUNSETIFF made it: the interface went between the look-up and the attach.
    /// Dropping the descriptor removes it again.
    fn check_attached(&self) -> Result<(), TapError> {
        let mut req = IfReq::new("", 0);
        // SAFETY: TUNGETIFF writes a `struct ifreq`, which `IfReq` lays out in full; the fd
        // is the tun device, attached above.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNGETIFF, &mut req) };
        if ret < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what: "reading back its flags",
                source: io::Error::last_os_error(),
            });
        }
        let kind = req.flags & (IFF_TUN | IFF_TAP | IFF_MULTI_QUEUE);
        if kind != IFF_TAP || req.flags & IFF_VNET_HDR == 0 {
            return Err(TapError::NotATap(self.name.clone()));
        }
        if req.flags & IFF_PERSIST == 0 {
            return Err(TapError::Missing(self.name.clone()));
        }
        Ok(())
    }

    fn ioctl_int(
        &self,
        request: libc::Ioctl,
        value: libc::c_int,
        what: &'static str,
    ) -> Result<(), TapError> {
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `value`.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), request, &value) };
        if ret < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Tells the kernel which offloads (TUN_F_*) the guest takes in the frames it receives.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what: "offloads",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header first) into `buf`; `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read writes at most `buf.len()` bytes into `buf`, which we own mutably.
        let ret = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as usize)
    }

    /// Writes one frame (header first); the TAP takes it whole or not at all.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: write reads `frame.len()` bytes from `frame`, which we borrow.
        let ret = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Whether the network namespace this thread runs in has an interface `name`, asked of the
/// kernel (a jail has no /proc). Any socket answers netdevice ioctls for its namespace; a Unix
/// stream is the one kind the monitor's seccomp filter lets it make.
fn interface_exists(name: &str) -> io::Result<bool> {
    // SAFETY: socket takes no pointers.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq::new(name, 0);
    // SAFETY: SIOCGIFINDEX reads the name from and writes the index into the `struct ifreq`,
    // which `IfReq` lays out in full.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCGIFINDEX, &mut req) };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENODEV) => Ok(false),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        for name in ["", "a/b", "with space", "sixteen-chars-xx"] {
            assert!(
                matches!(Tap::open(name), Err(TapError::InvalidName(_))),
                "{name}"
            );
        }
    }

    #[test]
    fn the_kernel_is_asked_whether_an_interface_exists() {
        // Every network namespace has a loopback interface.
        assert!(interface_exists("lo").unwrap());
        assert!(!interface_exists("mote-no-such0").unwrap());
    }

    #[test]
    fn a_missing_tap_is_not_created() {
        assert!(matches!(
            Tap::open("mote-no-such0"),
            Err(TapError::Missing(_))
        ));
    }

    #[test]
    fn an_interface_that_is_not_a_tap_is_refused() {
        // Every network namespace has a loopback interface; it is no TAP.
        if std::fs::metadata(TUN_PATH).is_err() {
            return;
        }
        match Tap::open("lo") {
            Err(TapError::NotATap(_)) | Err(TapError::OpenTun(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}
