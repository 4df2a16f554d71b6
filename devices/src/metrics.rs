//! Counters a device keeps for the monitor's metrics. Firecracker reports each counter as what
//! happened since the previous report, so a counter remembers what it last reported.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count, reported as deltas.
#[derive(Debug, Default)]
pub struct Counter {
    total: AtomicU64,
    reported: AtomicU64,
}

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        // Relaxed: counters order nothing; a report may miss an increment racing with it, and
        // the next report carries it.
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// What was added since the previous call.
    pub fn take_delta(&self) -> u64 {
        let total = self.total();
        total.saturating_sub(self.reported.swap(total, Ordering::Relaxed))
    }
}

/// A virtio-blk device's counters (Firecracker's `block` metrics).
#[derive(Debug, Default)]
pub struct BlockMetrics {
    pub read_count: Counter,
    pub write_count: Counter,
    pub flush_count: Counter,
    pub get_id_count: Counter,
    pub read_bytes: Counter,
    pub write_bytes: Counter,
    /// Requests the device refused: malformed chains, bad types, out-of-range sectors.
    pub invalid_reqs_count: Counter,
    /// Host I/O that failed.
    pub io_errors: Counter,
    pub queue_event_count: Counter,
    pub update_count: Counter,
}

impl BlockMetrics {
    /// The counters as (name, delta since the last report).
    pub fn take_deltas(&self) -> [(&'static str, u64); 10] {
        [
            ("read_count", self.read_count.take_delta()),
            ("write_count", self.write_count.take_delta()),
            ("flush_count", self.flush_count.take_delta()),
            ("get_id_count", self.get_id_count.take_delta()),
            ("read_bytes", self.read_bytes.take_delta()),
            ("write_bytes", self.write_bytes.take_delta()),
            ("invalid_reqs_count", self.invalid_reqs_count.take_delta()),
            ("io_errors", self.io_errors.take_delta()),
            ("queue_event_count", self.queue_event_count.take_delta()),
            ("update_count", self.update_count.take_delta()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_reports_what_happened_since_its_last_report() {
        let counter = Counter::default();
        counter.add(3);
        counter.inc();
        assert_eq!(counter.take_delta(), 4);
        assert_eq!(counter.take_delta(), 0);
        counter.inc();
        assert_eq!(counter.take_delta(), 1);
        assert_eq!(counter.total(), 5);
    }
}
