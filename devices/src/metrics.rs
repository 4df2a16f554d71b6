//! Counters a device keeps for the monitor's metrics. Firecracker reports each counter as what
//! happened since the previous report, so a counter remembers what it last reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

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

/// A value that is set rather than counted (Firecracker's `StoreMetric`): every report carries
/// the latest value, 0 until one is set.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A group of counters that reports itself, each counter under its field's name.
pub trait Deltas {
    /// Each counter's count since the previous report, and each gauge's value, by name.
    fn take_deltas(&self) -> Vec<(&'static str, u64)>;
}

/// Declares a group of counters whose report ([`Deltas`]) names each counter by its field, so
/// that a counter's name is written once, for the devices' groups and the monitor's alike.
/// Gauges after `@gauges` are reported beside them with their current value. Fields after a
/// `;` are the struct's own and not reported.
#[macro_export]
macro_rules! counters {
    (
        $(#[$doc:meta])*
        pub struct $name:ident {
            $($(#[$counter_doc:meta])* $counter:ident,)*
            $(@gauges $($(#[$gauge_doc:meta])* $gauge:ident,)*)?
            $(; $($(#[$field_doc:meta])* $field:ident: $field_type:ty,)*)?
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$counter_doc])* pub $counter: $crate::metrics::Counter,)*
            $($($(#[$gauge_doc])* pub $gauge: $crate::metrics::Gauge,)*)?
            $($($(#[$field_doc])* $field: $field_type,)*)?
        }

        impl $crate::metrics::Deltas for $name {
            fn take_deltas(&self) -> Vec<(&'static str, u64)> {
                vec![
                    $((stringify!($counter), self.$counter.take_delta()),)*
                    $($((stringify!($gauge), self.$gauge.get()),)*)?
                ]
            }
        }
    };
}

counters! {
    /// A virtio-blk device's counters (Firecracker's `block` metrics).
    pub struct BlockMetrics {
        read_count,
        write_count,
        flush_count,
        get_id_count,
        discard_count,
        write_zeroes_count,
        read_bytes,
        write_bytes,
        /// Requests the device refused: malformed chains, bad types, out-of-range sectors.
        invalid_reqs_count,
        /// Host I/O that failed.
        io_errors,
        queue_event_count,
        update_count,
        /// Requests the rate limiter held back (also queue notifications that came meanwhile).
        rate_limiter_throttled_events,
        /// Times the rate limiter's timer woke the device.
        rate_limiter_event_count,
    }
}

counters! {
    /// A virtio-net device's counters (Firecracker's `net` metrics, plus why frames were dropped).
    pub struct NetMetrics {
        /// Frames and bytes (without the virtio-net header) delivered to the guest.
        rx_packets_count,
        rx_bytes_count,
        /// Frames and bytes the guest sent that the TAP took.
        tx_packets_count,
        tx_bytes_count,
        rx_queue_event_count,
        tx_queue_event_count,
        rx_tap_event_count,
        /// Times the TAP had a frame and the guest had posted no receive buffer: reading stopped
        /// until it posts one.
        no_rx_avail_buffer,
        /// Frames from the TAP dropped because the guest's buffer chain was too short for them.
        rx_dropped_too_big,
        /// Receive chains the device returned unused: a read-only or out-of-memory buffer.
        rx_bad_chain,
        /// Frames from the TAP dropped because the driver reset the device while one waited.
        rx_dropped_reset,
        /// Reads from the TAP that failed (other than "nothing to read").
        rx_tap_errors,
        /// Transmit chains dropped: a device-writable or out-of-memory buffer.
        tx_dropped_bad_chain,
        /// Transmit chains shorter than the virtio-net header.
        tx_dropped_truncated_header,
        /// Transmit headers asking for an offload the driver did not negotiate, or pointing past
        /// the frame.
        tx_dropped_bad_header,
        /// Transmit frames over 64 KiB.
        tx_dropped_oversized,
        /// Frames the TAP refused.
        tx_tap_errors,
        /// Times a frame from the TAP waited for the receive rate limiter (also wake-ups that
        /// came meanwhile).
        rx_rate_limiter_throttled,
        /// Times the receive rate limiter's timer woke the device.
        rx_event_rate_limiter_count,
        /// Times a frame from the guest waited for the transmit rate limiter (also
        /// notifications that came meanwhile).
        tx_rate_limiter_throttled,
        /// Times the transmit rate limiter's timer woke the device.
        tx_rate_limiter_event_count,
    }
}

counters! {
    /// A virtio-vsock device's counters (Firecracker's `vsock` metrics). RX is toward the guest,
    /// TX from it.
    pub struct VsockMetrics {
        rx_queue_event_count,
        tx_queue_event_count,
        /// Packets and payload bytes delivered to the guest.
        rx_packets_count,
        rx_bytes_count,
        /// Packets and payload bytes the guest sent that were well formed.
        tx_packets_count,
        tx_bytes_count,
        /// Streams opened (either side), closed cleanly, and reset.
        conns_added,
        conns_removed,
        conns_killed,
        /// Guest packets dropped as malformed: short or lying headers, wrong CIDs, bad memory.
        invalid_packets,
        /// Well-formed guest packets nobody took (unknown stream, wrong type or state): answered
        /// with an RST.
        dropped_packets,
        /// RX buffers too small for a header or outside guest memory, returned unused.
        rx_invalid_buffers,
    }
}

counters! {
    /// The virtio-rng device's counters (Firecracker's `entropy` metrics).
    pub struct EntropyMetrics {
        /// Times the driver's start of the device failed.
        activate_fails,
        /// Requests refused (a read-only or out-of-memory buffer) and broken rings.
        entropy_event_fails,
        /// Queue notifications from the driver.
        entropy_event_count,
        /// Random bytes given to the guest.
        entropy_bytes,
        /// Times the host's `getrandom` failed.
        host_rng_fails,
        /// Requests the rate limiter held back (also notifications that came meanwhile).
        entropy_rate_limiter_throttled,
        /// Times the rate limiter's timer woke the device.
        rate_limiter_event_count,
    }
}

counters! {
    /// The virtio-balloon device's counters (Firecracker's `balloon` metrics, plus what a driver
    /// asked for that was skipped).
    pub struct BalloonMetrics {
        /// Times the driver's start of the device failed.
        activate_fails,
        /// Inflate queue notifications served, and deflate ones.
        inflate_count,
        deflate_count,
        /// Statistics buffers the driver posted and the device read, and those it could not read.
        stats_updates_count,
        stats_update_fails,
        /// Broken rings and refused chains on any queue.
        event_fails,
        /// Free page reports served, the bytes they gave back to the host, and reports refused.
        free_page_report_count,
        free_page_report_freed,
        free_page_report_fails,
        /// Free page hinting: blocks the driver handed over in a run, the bytes they gave back
        /// to the host, and blocks or commands refused (outside guest memory, unreadable).
        free_page_hint_count,
        free_page_hint_freed,
        free_page_hint_fails,
        /// Inflated page frame numbers outside guest memory, skipped.
        inflate_invalid_pfns,
        /// Bytes of guest memory inflated pages gave back to the host.
        inflate_freed,
        /// Times giving memory back (madvise) failed.
        discard_fails,
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

counters! {
    /// Firecracker's `uart`: the console UART's traffic. `read_count` and `write_count` are
    /// bytes the guest read and wrote, `flush_count` flushes of the output, `error_count` output
    /// writes or flushes that failed, `missed_write_count` guest bytes lost with them, and
    /// `missed_read_count` host input that could not be put in the receive FIFO.
    pub struct UartMetrics {
        error_count,
        flush_count,
        missed_read_count,
        missed_write_count,
        read_count,
        write_count,
    }
}

counters! {
    /// Firecracker's `interrupts`: interrupts the virtio devices raised (`triggers`), and
    /// changes to an interrupt's routing (`config_updates`), which only PCI's MSI-X makes: with
    /// mote's fixed virtio-mmio lines there are none.
    pub struct InterruptMetrics {
        triggers,
        config_updates,
    }
}

counters! {
    /// Firecracker's `mmds`: the metadata service's traffic, all interfaces together. RX is
    /// from the guest to MMDS, TX from MMDS to the guest.
    pub struct MmdsMetrics {
        /// Frames for the MMDS address taken from the guest's transmit path.
        rx_accepted,
        /// Of those, frames dropped because too many waited.
        rx_accepted_err,
        /// Of those, IPv4 packets other than TCP (ICMP, UDP).
        rx_accepted_unusual,
        /// Of those, frames too short for an Ethernet header.
        rx_bad_eth,
        /// V2 requests with a token that is not valid (unknown or expired), and without one.
        rx_invalid_token,
        rx_no_token,
        /// TCP segments received.
        rx_count,
        /// Frames and bytes put on the guest's receive queue.
        tx_bytes,
        tx_frames,
        /// Frames MMDS produced, and those it dropped because too many waited.
        tx_count,
        tx_errors,
        /// TCP connections opened and ended (closed, reset, timed out or replaced).
        connections_created,
        connections_destroyed,
    }
}

/// The metadata service's counters (one service per monitor).
pub static MMDS_METRICS: LazyLock<MmdsMetrics> = LazyLock::new(MmdsMetrics::default);

/// The console UART's counters (a monitor has one console).
pub static UART_METRICS: LazyLock<UartMetrics> = LazyLock::new(UartMetrics::default);

/// The virtio devices' interrupts, all devices together.
pub static INTERRUPT_METRICS: LazyLock<InterruptMetrics> = LazyLock::new(InterruptMetrics::default);
