//! Free page hinting (virtio 1.2, 5.5.6.7; Firecracker 1.14's `/balloon/hinting`): a run
//! that the host starts. The host writes a new command id into the configuration space; the
//! driver answers on the free page queue with that id, then hands over blocks of free memory
//! (it allocates them, so the guest does not use them meanwhile), then sends the STOP id. The
//! device gives each block back to the host as it comes. When the host says DONE (at once on
//! the guest's STOP with `acknowledge_on_stop`, or on `PATCH /balloon/hinting/stop`) the driver
//! frees the blocks again; they read as zeros when the guest touches them.
//!
//! This is the run's bookkeeping: the ids and what a command from the driver means.

use serde::{Deserialize, Serialize};

/// The command ids with a fixed meaning; a run's ids are the others.
pub const CMD_ID_STOP: u32 = 0;
pub const CMD_ID_DONE: u32 = 1;

/// `GET /balloon/hinting/status`: the id the host last wrote, and the one the driver last
/// sent (absent until it sent one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HintingStatus {
    pub host_cmd: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_cmd: Option<u32>,
}

/// A run's state; kept in snapshots, so that a restored device goes on with ids the driver
/// has not seen (a driver ignores a start with the id of its last run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hinting {
    /// What the configuration space says: STOP until a run starts.
    pub host_cmd: u32,
    pub guest_cmd: Option<u32>,
    /// The id the last run used; the next run takes the next one.
    pub last_run: u32,
    /// Whether the driver's STOP is answered with DONE at once.
    pub acknowledge_on_stop: bool,
}

impl Hinting {
    /// Starts a run: a new id, never STOP or DONE, never the last run's.
    pub fn start(&mut self, acknowledge_on_stop: bool) -> u32 {
        let mut id = self.last_run.wrapping_add(1);
        if id <= CMD_ID_DONE {
            id = CMD_ID_DONE + 1;
        }
        self.last_run = id;
        self.host_cmd = id;
        self.acknowledge_on_stop = acknowledge_on_stop;
        id
    }

    /// Ends the run: the driver frees the blocks it handed over.
    pub fn stop(&mut self) {
        self.host_cmd = CMD_ID_DONE;
    }

    /// The driver sent command `id`. True when the configuration space changed (its STOP
    /// acknowledged with DONE), so that the driver must be told.
    pub fn driver_sent(&mut self, id: u32) -> bool {
        self.guest_cmd = Some(id);
        if id == CMD_ID_STOP && self.acknowledge_on_stop && self.host_cmd > CMD_ID_DONE {
            self.stop();
            return true;
        }
        false
    }

    /// Whether blocks the driver hands over now belong to the run the host started: the
    /// driver said so with the run's id, and the host has not moved on. Blocks of an older
    /// run, or sent with no run, are returned untouched.
    pub fn accepts_blocks(&self) -> bool {
        self.host_cmd > CMD_ID_DONE && self.guest_cmd == Some(self.host_cmd)
    }

    pub fn status(&self) -> HintingStatus {
        HintingStatus {
            host_cmd: self.host_cmd,
            guest_cmd: self.guest_cmd,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_with_acknowledge_on_stop_ends_on_the_drivers_stop() {
        let mut hinting = Hinting::default();
        assert!(!hinting.accepts_blocks());
        let id = hinting.start(true);
        assert_eq!(id, 2);
        assert!(!hinting.accepts_blocks(), "before the driver's start");
        assert!(!hinting.driver_sent(id));
        assert!(hinting.accepts_blocks());
        assert!(
            hinting.driver_sent(CMD_ID_STOP),
            "DONE must reach the driver"
        );
        assert_eq!(
            hinting.status(),
            HintingStatus {
                host_cmd: CMD_ID_DONE,
                guest_cmd: Some(CMD_ID_STOP)
            }
        );
        assert!(!hinting.accepts_blocks());
    }

    #[test]
    fn without_acknowledge_the_host_ends_the_run() {
        let mut hinting = Hinting::default();
        let id = hinting.start(false);
        hinting.driver_sent(id);
        assert!(!hinting.driver_sent(CMD_ID_STOP));
        assert_eq!(hinting.status().host_cmd, id);
        hinting.stop();
        assert_eq!(hinting.status().host_cmd, CMD_ID_DONE);
    }

    #[test]
    fn ids_never_repeat_the_last_run_nor_take_the_fixed_ones() {
        let mut hinting = Hinting {
            last_run: u32::MAX,
            ..Default::default()
        };
        assert_eq!(hinting.start(true), 2);
        assert_eq!(hinting.start(true), 3);
        // A stale start id from the driver (an older run's) opens nothing.
        hinting.driver_sent(2);
        assert!(!hinting.accepts_blocks());
    }
}
