//! A host TAP device opened for virtio-net: `/dev/net/tun` attached to an existing TAP with
//! IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, the 12-byte `virtio_net_hdr_v1` in front of every
//! frame, non-blocking reads and writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The longest interface name Linux takes (IFNAMSIZ less the terminating NUL).
pub const IFNAME_MAX_LEN: usize = 15;

const TUN_PATH: &str = "/dev/net/tun";

// From <linux/if_tun.h>: _IOW('T', 202, int), _IOW('T', 208, unsigned int),
// _IOW('T', 216, int).
const TUNSETIFF: libc::Ioctl = 0x4004_54ca;
const TUNSETOFFLOAD: libc::Ioctl = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::Ioctl = 0x4004_54d8;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;

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
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(io::Error),
    #[error("TAP {0:?} is busy: another process has it open")]
    Busy(String),
    #[error(
        "{0:?} is not a TAP device (a TUN device, another kind of interface, or a multi-queue TAP)"
    )]
    NotATap(String),
    #[error("cannot attach to TAP {name:?}: {source}")]
    Attach { name: String, source: io::Error },
    #[error("cannot set up TAP {name:?}: {what}: {source}")]
    Configure {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: u16,
    _union_rest: [u8; 22],
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
        if !interface_exists(name) {
            return Err(TapError::Missing(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _union_rest: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out in full
        // (40 bytes); the fd is the open tun device.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                Some(libc::EINVAL) => TapError::NotATap(name.to_string()),
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
        // virtio 1.x always has the 12-byte header (with num_buffers).
        tap.ioctl_int(
            TUNSETVNETHDRSZ,
            super::VNET_HDR_LEN as libc::c_int,
            "header size",
        )?;
        tap.set_offload(0)?;
        Ok(tap)
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

/// Whether the network namespace this thread runs in has an interface `name`. Read from
/// procfs rather than asked of a socket: the monitor's seccomp filter allows no sockets here.
fn interface_exists(name: &str) -> bool {
    let Ok(devices) = std::fs::read_to_string("/proc/thread-self/net/dev") else {
        return false;
    };
    // Two header lines, then `  NAME: counters…` per interface.
    devices
        .lines()
        .skip(2)
        .filter_map(|line| line.split_once(':'))
        .any(|(interface, _)| interface.trim() == name)
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
