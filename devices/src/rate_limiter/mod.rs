//! Firecracker's rate limiters: a `bandwidth` bucket (bytes) and an `ops` bucket (requests),
//! either optional, in front of a device's queue. A request that does not fit is not served:
//! the device leaves it at the head of its queue and stops taking requests from it, the
//! limiter arms its timerfd for when enough tokens will be there, and the event loop resumes the
//! queue when it fires. Nothing busy-waits and nothing is dropped or reordered.

mod bucket;
pub(crate) mod timer;

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use log::warn;
use serde::{Deserialize, Serialize};

pub use self::bucket::{BucketError, TokenBucket, TokenBucketConfig, TokenBucketState};
use self::timer::Timer;

/// Firecracker's `RateLimiter` object: either bucket may be left out (no limit of that kind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RateLimiterConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

/// The JSON object [`RateLimiterConfig`] is read from.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimiterObject {
    #[serde(default)]
    bandwidth: Option<TokenBucketConfig>,
    #[serde(default)]
    ops: Option<TokenBucketConfig>,
}

impl<'de> Deserialize<'de> for RateLimiterConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let object: RateLimiterObject = object_only(deserializer)?;
        Ok(Self {
            bandwidth: object.bandwidth,
            ops: object.ops,
        })
    }
}

/// Reads `T` from a map (a JSON object) only. serde's derive also takes a struct from a
/// sequence of its fields in order (`[null, null]` for a rate limiter), which Firecracker's
/// API and the OpenAPI document do not allow.
fn object_only<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct MapOnly<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for MapOnly<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    deserializer.deserialize_map(MapOnly(std::marker::PhantomData))
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error("bandwidth: {0}")]
    Bandwidth(BucketError),
    #[error("ops: {0}")]
    Ops(BucketError),
    #[error("cannot create the rate limiter's timer: {0}")]
    Timer(std::io::Error),
}

impl RateLimiterConfig {
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        if let Some(bandwidth) = &self.bandwidth {
            bandwidth.validate().map_err(RateLimiterError::Bandwidth)?;
        }
        if let Some(ops) = &self.ops {
            ops.validate().map_err(RateLimiterError::Ops)?;
        }
        Ok(())
    }

    /// This configuration with what a PATCH gives: a bucket given replaces the one there (a
    /// size of 0 removes it), a bucket left out stays as it was (Firecracker's rule).
    pub fn updated(&self, update: &RateLimiterConfig) -> RateLimiterConfig {
        let pick = |now: Option<TokenBucketConfig>, new: Option<TokenBucketConfig>| match new {
            Some(bucket) if bucket.is_unlimited() => None,
            Some(bucket) => Some(bucket),
            None => now,
        };
        RateLimiterConfig {
            bandwidth: pick(self.bandwidth, update.bandwidth),
            ops: pick(self.ops, update.ops),
        }
    }
}

/// A limiter's buckets for a snapshot (each with its configuration).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterState {
    pub bandwidth: Option<TokenBucketState>,
    pub ops: Option<TokenBucketState>,
}

/// The shortest the device sleeps once throttled. A bucket refills at most its size in a
/// millisecond (refill times are whole milliseconds), so nothing is lost by waiting this long,
/// and a fast limit costs a wake-up per millisecond instead of one per request.
const MIN_WAIT: Duration = Duration::from_millis(1);

pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Timer,
    /// The timer is armed for a request that did not fit: the queue waits for it.
    blocked: bool,
    /// CLOCK_MONOTONIC, as the timer's.
    clock: fn() -> Instant,
    /// The clock's last reading, which requests are first checked against (see `consume`).
    now: Instant,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config())
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        let clock: fn() -> Instant = Instant::now;
        let now = clock();
        let bucket = |config: Option<TokenBucketConfig>| {
            config.map_or(Ok(None), |config| TokenBucket::new(config, now))
        };
        Ok(Self {
            bandwidth: bucket(config.bandwidth).map_err(RateLimiterError::Bandwidth)?,
            ops: bucket(config.ops).map_err(RateLimiterError::Ops)?,
            timer: Timer::new().map_err(RateLimiterError::Timer)?,
            blocked: false,
            clock,
            now,
        })
    }

    fn read_clock(&mut self) -> Instant {
        self.now = (self.clock)().max(self.now);
        self.now
    }

    /// How long until one operation and `bytes` fit at time `now` (None: they fit now),
    /// refilling the buckets to `now`.
    fn wait_at(&mut self, bytes: u64, now: Instant) -> Option<Duration> {
        let bandwidth_wait = self.bandwidth.as_mut().and_then(|b| b.check(bytes, now));
        let ops_wait = self.ops.as_mut().and_then(|b| b.check(1, now));
        bandwidth_wait.max(ops_wait)
    }

    fn a_bucket_is_full(&self) -> bool {
        let full = |bucket: &Option<TokenBucket>| bucket.as_ref().is_some_and(TokenBucket::is_full);
        full(&self.bandwidth) || full(&self.ops)
    }

    /// The configuration in force (unlimited buckets left out).
    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    /// True while the queue must wait for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Takes one operation and `bytes` when both buckets have them, and says so; otherwise takes
    /// nothing, blocks, and arms the timer for when the request will fit.
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.bandwidth.is_none() && self.ops.is_none() {
            return true;
        }
        if self.blocked {
            return false;
        }
        // First against the clock's last reading: tokens only grow with time, so what fits
        // then fits now, and the clock (a third of an idle limiter's cost per request) is read
        // only when it matters: for a request that does not fit yet, and when a bucket is full,
        // so that its refill counts from when it stops being full.
        let mut wait = self.wait_at(bytes, self.now);
        if wait.is_some() || self.a_bucket_is_full() {
            let now = self.read_clock();
            wait = self.wait_at(bytes, now);
        }
        match wait {
            None => {
                if let Some(bucket) = &mut self.bandwidth {
                    bucket.take(bytes);
                }
                if let Some(bucket) = &mut self.ops {
                    bucket.take(1);
                }
                true
            }
            Some(wait) => {
                self.block(wait.max(MIN_WAIT));
                false
            }
        }
    }

    fn block(&mut self, wait: Duration) {
        match self.timer.arm(wait) {
            Ok(()) => self.blocked = true,
            // Without a timer nothing would wake the queue: let the request through instead.
            Err(err) => warn!("rate limiter: cannot arm its timer, not throttling: {err}"),
        }
    }

    /// The timer fired (the event loop saw its fd): the queue may go on.
    pub fn on_timer(&mut self) {
        self.timer.acknowledge();
        self.blocked = false;
    }

    /// Takes a new configuration at once (PATCH): given buckets replace the old ones, keeping
    /// the tokens they held up to the new size; the queue is unblocked so the device tries its
    /// head request again under the new limits.
    pub fn update(&mut self, update: &RateLimiterConfig) -> Result<(), RateLimiterError> {
        update.validate()?;
        let now = self.read_clock();
        let reconfigure = |bucket: &Option<TokenBucket>, config: Option<TokenBucketConfig>| match (
            bucket, config,
        ) {
            (_, None) => Ok(bucket.clone()),
            (Some(old), Some(config)) => old.reconfigured(config, now),
            (None, Some(config)) => TokenBucket::new(config, now),
        };
        let bandwidth =
            reconfigure(&self.bandwidth, update.bandwidth).map_err(RateLimiterError::Bandwidth)?;
        let ops = reconfigure(&self.ops, update.ops).map_err(RateLimiterError::Ops)?;
        self.bandwidth = bandwidth;
        self.ops = ops;
        self.unblock();
        Ok(())
    }

    fn unblock(&mut self) {
        if self.blocked {
            if let Err(err) = self.timer.disarm() {
                warn!("rate limiter: cannot disarm its timer: {err}");
            }
            self.blocked = false;
        }
    }

    pub fn state(&self) -> RateLimiterState {
        let now = (self.clock)();
        RateLimiterState {
            bandwidth: self.bandwidth.as_ref().map(|b| b.state(now)),
            ops: self.ops.as_ref().map(|b| b.state(now)),
        }
    }

    /// Takes the buckets a snapshot saved (their configuration included). The device tries its
    /// queue afterwards and blocks again if it must.
    pub fn restore(&mut self, state: &RateLimiterState) -> Result<(), RateLimiterError> {
        let now = self.read_clock();
        let bucket = |state: &Option<TokenBucketState>| {
            state
                .as_ref()
                .map_or(Ok(None), |state| TokenBucket::from_state(state, now))
        };
        self.bandwidth = bucket(&state.bandwidth).map_err(RateLimiterError::Bandwidth)?;
        self.ops = bucket(&state.ops).map_err(RateLimiterError::Ops)?;
        self.unblock();
        Ok(())
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, refill_time: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time,
        })
    }

    fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd that lives for the call.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
    }

    static CLOCK_READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn counted_clock() -> Instant {
        CLOCK_READS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Instant::now()
    }

    /// An idle limiter (buckets far above the rate) reads the clock only when a bucket is
    /// full or a request does not fit at its last reading: not once per request. And a bucket
    /// counts its refill from when it stopped being full, not from an older reading.
    #[test]
    fn an_idle_limiter_reads_the_clock_rarely_and_counts_refills_exactly() {
        let config = RateLimiterConfig {
            bandwidth: bucket(1 << 30, 1000),
            ops: bucket(1 << 20, 1000),
        };
        let mut limiter = RateLimiter::new(&config).unwrap();
        limiter.clock = counted_clock;
        let before = CLOCK_READS.load(std::sync::atomic::Ordering::SeqCst);
        for _ in 0..10_000 {
            assert!(limiter.consume(4096));
        }
        let reads = CLOCK_READS.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert!(reads <= 2, "{reads} clock reads for 10000 requests");

        // A full bucket whose last reading is old: the request that empties it starts its
        // refill now, so 100 ms later it has only a tenth of its size back (counted from the
        // old reading, it would have seven tenths, and 500 would fit).
        let config = RateLimiterConfig {
            bandwidth: bucket(1000, 1000),
            ops: None,
        };
        let mut limiter = RateLimiter::new(&config).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        assert!(limiter.consume(1000));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !limiter.consume(500),
            "600 ms spent full were counted as refill"
        );
    }

    #[test]
    fn both_buckets_must_fit_and_a_refusal_takes_nothing() {
        let config = RateLimiterConfig {
            bandwidth: bucket(1000, 1000),
            ops: bucket(2, 1000),
        };
        let mut limiter = RateLimiter::new(&config).unwrap();
        assert!(limiter.consume(600));
        // 400 bytes left and one op: 500 bytes do not fit, and the op is not taken.
        assert!(!limiter.consume(500));
        assert!(limiter.is_blocked());
        limiter.update(&RateLimiterConfig::default()).unwrap();
        assert!(!limiter.is_blocked());
        assert!(limiter.consume(400));
        assert!(!limiter.consume(0), "two ops were all the ops bucket had");
    }

    #[test]
    fn the_timer_fires_when_the_request_fits() {
        let config = RateLimiterConfig {
            bandwidth: bucket(1000, 100),
            ops: None,
        };
        let mut limiter = RateLimiter::new(&config).unwrap();
        assert!(limiter.consume(1000));
        let start = Instant::now();
        assert!(!limiter.consume(500));
        assert!(!wait_readable(limiter.as_raw_fd(), 20), "fired early");
        assert!(wait_readable(limiter.as_raw_fd(), 1000));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        limiter.on_timer();
        assert!(limiter.consume(500));
        // A stale read after a disarm does not block.
        limiter.on_timer();
    }

    #[test]
    fn an_unlimited_limiter_never_blocks() {
        let mut limiter = RateLimiter::new(&RateLimiterConfig::default()).unwrap();
        for _ in 0..1000 {
            assert!(limiter.consume(u64::MAX));
        }
        assert_eq!(limiter.state(), RateLimiterState::default());
    }

    #[test]
    fn a_patch_changes_only_the_buckets_it_names_and_size_zero_removes_one() {
        let config = RateLimiterConfig {
            bandwidth: bucket(1000, 100),
            ops: bucket(10, 100),
        };
        let update = RateLimiterConfig {
            bandwidth: bucket(0, 0),
            ops: None,
        };
        assert_eq!(
            config.updated(&update),
            RateLimiterConfig {
                bandwidth: None,
                ops: bucket(10, 100)
            }
        );
        let mut limiter = RateLimiter::new(&config).unwrap();
        limiter.update(&update).unwrap();
        assert_eq!(limiter.config(), config.updated(&update));
        let bad = RateLimiterConfig {
            bandwidth: None,
            ops: bucket(5, 0),
        };
        let err = limiter.update(&bad).unwrap_err().to_string();
        assert!(err.starts_with("ops: refill_time is 0"), "{err}");
        assert_eq!(limiter.config(), config.updated(&update));
    }

    #[test]
    fn the_state_restores_the_buckets_and_their_configuration() {
        let config = RateLimiterConfig {
            bandwidth: bucket(1000, 1000),
            ops: None,
        };
        let mut limiter = RateLimiter::new(&config).unwrap();
        assert!(limiter.consume(900));
        let state = limiter.state();
        let mut again = RateLimiter::new(&RateLimiterConfig::default()).unwrap();
        again.restore(&state).unwrap();
        assert_eq!(again.config(), config);
        assert!(
            !again.consume(500),
            "the restored bucket had about 100 bytes"
        );
    }
}
