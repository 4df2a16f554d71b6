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
    pub discard_count: Counter,
    pub write_zeroes_count: Counter,
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
    pub fn take_deltas(&self) -> [(&'static str, u64); 12] {
        [
            ("read_count", self.read_count.take_delta()),
            ("write_count", self.write_count.take_delta()),
            ("flush_count", self.flush_count.take_delta()),
            ("get_id_count", self.get_id_count.take_delta()),
            ("discard_count", self.discard_count.take_delta()),
            ("write_zeroes_count", self.write_zeroes_count.take_delta()),
            ("read_bytes", self.read_bytes.take_delta()),
            ("write_bytes", self.write_bytes.take_delta()),
            ("invalid_reqs_count", self.invalid_reqs_count.take_delta()),
            ("io_errors", self.io_errors.take_delta()),
            ("queue_event_count", self.queue_event_count.take_delta()),
            ("update_count", self.update_count.take_delta()),
        ]
    }
}

/// A virtio-net device's counters (Firecracker's `net` metrics, plus why frames were dropped).
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames and bytes (without the virtio-net header) delivered to the guest.
    pub rx_packets_count: Counter,
    pub rx_bytes_count: Counter,
    /// Frames and bytes the guest sent that the TAP took.
    pub tx_packets_count: Counter,
    pub tx_bytes_count: Counter,
    pub rx_queue_event_count: Counter,
    pub tx_queue_event_count: Counter,
    pub rx_tap_event_count: Counter,
    /// Times the TAP had a frame and the guest had posted no receive buffer: reading stopped
    /// until it posts one.
    pub no_rx_avail_buffer: Counter,
    /// Frames from the TAP dropped because the guest's buffer chain was too short for them.
    pub rx_dropped_too_big: Counter,
    /// Receive chains the device returned unused: a read-only or out-of-memory buffer.
    pub rx_bad_chain: Counter,
    /// Frames from the TAP dropped because the driver reset the device while one waited.
    pub rx_dropped_reset: Counter,
    /// Reads from the TAP that failed (other than "nothing to read").
    pub rx_tap_errors: Counter,
    /// Transmit chains dropped: a device-writable or out-of-memory buffer.
    pub tx_dropped_bad_chain: Counter,
    /// Transmit chains shorter than the virtio-net header.
    pub tx_dropped_truncated_header: Counter,
    /// Transmit headers asking for an offload the driver did not negotiate, or pointing past
    /// the frame.
    pub tx_dropped_bad_header: Counter,
    /// Transmit frames over 64 KiB.
    pub tx_dropped_oversized: Counter,
    /// Frames the TAP refused.
    pub tx_tap_errors: Counter,
}

impl NetMetrics {
    /// The counters as (name, delta since the last report).
    pub fn take_deltas(&self) -> [(&'static str, u64); 17] {
        [
            ("rx_packets_count", self.rx_packets_count.take_delta()),
            ("rx_bytes_count", self.rx_bytes_count.take_delta()),
            ("tx_packets_count", self.tx_packets_count.take_delta()),
            ("tx_bytes_count", self.tx_bytes_count.take_delta()),
            (
                "rx_queue_event_count",
                self.rx_queue_event_count.take_delta(),
            ),
            (
                "tx_queue_event_count",
                self.tx_queue_event_count.take_delta(),
            ),
            ("rx_tap_event_count", self.rx_tap_event_count.take_delta()),
            ("no_rx_avail_buffer", self.no_rx_avail_buffer.take_delta()),
            ("rx_dropped_too_big", self.rx_dropped_too_big.take_delta()),
            ("rx_bad_chain", self.rx_bad_chain.take_delta()),
            ("rx_dropped_reset", self.rx_dropped_reset.take_delta()),
            ("rx_tap_errors", self.rx_tap_errors.take_delta()),
            (
                "tx_dropped_bad_chain",
                self.tx_dropped_bad_chain.take_delta(),
            ),
            (
                "tx_dropped_truncated_header",
                self.tx_dropped_truncated_header.take_delta(),
            ),
            (
                "tx_dropped_bad_header",
                self.tx_dropped_bad_header.take_delta(),
            ),
            (
                "tx_dropped_oversized",
                self.tx_dropped_oversized.take_delta(),
            ),
            ("tx_tap_errors", self.tx_tap_errors.take_delta()),
        ]
    }
}

/// A virtio-vsock device's counters (Firecracker's `vsock` metrics). RX is toward the guest,
/// TX from it.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    pub rx_queue_event_count: Counter,
    pub tx_queue_event_count: Counter,
    /// Packets and payload bytes delivered to the guest.
    pub rx_packets_count: Counter,
    pub rx_bytes_count: Counter,
    /// Packets and payload bytes the guest sent that were well formed.
    pub tx_packets_count: Counter,
    pub tx_bytes_count: Counter,
    /// Streams opened (either side), closed cleanly, and reset.
    pub conns_added: Counter,
    pub conns_removed: Counter,
    pub conns_killed: Counter,
    /// Guest packets dropped as malformed: short or lying headers, wrong CIDs, bad memory.
    pub invalid_packets: Counter,
    /// Well-formed guest packets nobody took (unknown stream, wrong type or state): answered
    /// with an RST.
    pub dropped_packets: Counter,
    /// RX buffers too small for a header or outside guest memory, returned unused.
    pub rx_invalid_buffers: Counter,
}

impl VsockMetrics {
    /// The counters as (name, delta since the last report).
    pub fn take_deltas(&self) -> [(&'static str, u64); 12] {
        [
            (
                "rx_queue_event_count",
                self.rx_queue_event_count.take_delta(),
            ),
            (
                "tx_queue_event_count",
                self.tx_queue_event_count.take_delta(),
            ),
            ("rx_packets_count", self.rx_packets_count.take_delta()),
            ("rx_bytes_count", self.rx_bytes_count.take_delta()),
            ("tx_packets_count", self.tx_packets_count.take_delta()),
            ("tx_bytes_count", self.tx_bytes_count.take_delta()),
            ("conns_added", self.conns_added.take_delta()),
            ("conns_removed", self.conns_removed.take_delta()),
            ("conns_killed", self.conns_killed.take_delta()),
            ("invalid_packets", self.invalid_packets.take_delta()),
            ("dropped_packets", self.dropped_packets.take_delta()),
            ("rx_invalid_buffers", self.rx_invalid_buffers.take_delta()),
        ]
    }
}

/// The virtio-rng device's counters (Firecracker's `entropy` metrics).
#[derive(Debug, Default)]
pub struct EntropyMetrics {
    /// Times the driver's start of the device failed.
    pub activate_fails: Counter,
    /// Requests refused (a read-only or out-of-memory buffer) and broken rings.
    pub entropy_event_fails: Counter,
    /// Queue notifications from the driver.
    pub entropy_event_count: Counter,
    /// Random bytes given to the guest.
    pub entropy_bytes: Counter,
    /// Times the host's `getrandom` failed.
    pub host_rng_fails: Counter,
    /// Firecracker's rate-limiter counters: always 0, as mote has no rate limiters yet.
    pub entropy_rate_limiter_throttled: Counter,
    pub rate_limiter_event_count: Counter,
}

impl EntropyMetrics {
    /// The counters as (name, delta since the last report).
    pub fn take_deltas(&self) -> [(&'static str, u64); 7] {
        [
            ("activate_fails", self.activate_fails.take_delta()),
            ("entropy_event_fails", self.entropy_event_fails.take_delta()),
            ("entropy_event_count", self.entropy_event_count.take_delta()),
            ("entropy_bytes", self.entropy_bytes.take_delta()),
            ("host_rng_fails", self.host_rng_fails.take_delta()),
            (
                "entropy_rate_limiter_throttled",
                self.entropy_rate_limiter_throttled.take_delta(),
            ),
            (
                "rate_limiter_event_count",
                self.rate_limiter_event_count.take_delta(),
            ),
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
