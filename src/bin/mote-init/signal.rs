//! The control drive's signal slot, where mote writes a signal for the program before it
//! types Ctrl-Alt-Del. Read with O_DIRECT: the guest's page cache would hold an old copy of a
//! sector the host wrote.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use crate::init_config::{parse_signal_slot, CONTROL_DEVICE, SECTOR, SIGNAL_OFFSET};

pub struct SignalSlot {
    /// None when the drive cannot be opened so (the program then gets SIGINT as it is).
    device: Option<File>,
    /// The sequence number of the last signal passed on.
    last: u64,
    /// A read failed already (said once).
    failed: bool,
}

impl SignalSlot {
    /// Opens the control drive for reading past the page cache (before init leaves the
    /// initramfs's /dev, or after: the drive is on the container's devtmpfs too).
    pub fn open() -> SignalSlot {
        let device = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(CONTROL_DEVICE)
            .map_err(|err| {
                crate::say(&format!(
                    "cannot read {CONTROL_DEVICE} for signals: {err}; signals to mote will not reach the program"
                ))
            })
            .ok();
        SignalSlot {
            device,
            last: 0,
            failed: false,
        }
    }

    /// Whether the slot can be read: then a SIGINT to init is mote's doorbell, not a signal
    /// for the program.
    pub fn readable(&self) -> bool {
        self.device.is_some()
    }

    /// The signal mote wrote since the last one taken, if any.
    pub fn take(&mut self) -> Option<i32> {
        let device = self.device.as_ref()?;
        // O_DIRECT wants a buffer aligned to the logical block size.
        let mut buffer = vec![0u8; 2 * SECTOR];
        let start = buffer.as_ptr().align_offset(SECTOR);
        let sector = &mut buffer[start..start + SECTOR];
        if let Err(err) = device.read_exact_at(sector, SIGNAL_OFFSET) {
            if !self.failed {
                crate::say(&format!("cannot read the signal slot: {err}"));
                self.failed = true;
            }
            return None;
        }
        let (sequence, signal) = parse_signal_slot(sector)?;
        if sequence <= self.last {
            return None;
        }
        self.last = sequence;
        Some(signal)
    }
}
