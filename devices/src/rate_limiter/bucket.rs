//! One token bucket: `size` tokens refilled evenly over `refill_time` ms, and a
//! `one_time_burst` spent before the bucket. Pure arithmetic on a time the caller gives, so the
//! tests drive it with a clock of their own.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Firecracker's `TokenBucket`: `size` tokens, refilled from empty to full in `refill_time`
/// milliseconds, plus `one_time_burst` tokens that are spent first and never come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

/// The JSON object [`TokenBucketConfig`] is read from (an object only: see
/// [`super::object_only`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBucketObject {
    size: u64,
    #[serde(default)]
    one_time_burst: Option<u64>,
    refill_time: u64,
}

impl<'de> Deserialize<'de> for TokenBucketConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let object: TokenBucketObject = super::object_only(deserializer)?;
        Ok(Self {
            size: object.size,
            one_time_burst: object.one_time_burst,
            refill_time: object.refill_time,
        })
    }
}

/// Why a bucket's configuration is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BucketError {
    #[error("refill_time is 0 for a bucket of size {0}: a bucket that never refills would stop the device for good")]
    ZeroRefillTime(u64),
    #[error("refill_time {0} ms is too long: at most {max} ms", max = u64::MAX / NANOS_PER_MILLI)]
    RefillTimeOverflow(u64),
}

const NANOS_PER_MILLI: u64 = 1_000_000;

impl TokenBucketConfig {
    /// A size of 0 is Firecracker's way of saying "no limit": no bucket at all.
    pub fn is_unlimited(&self) -> bool {
        self.size == 0
    }

    pub fn validate(&self) -> Result<(), BucketError> {
        // Out of range whatever the size: an unlimited bucket is still shown as given.
        self.refill_time
            .checked_mul(NANOS_PER_MILLI)
            .ok_or(BucketError::RefillTimeOverflow(self.refill_time))?;
        if !self.is_unlimited() && self.refill_time == 0 {
            return Err(BucketError::ZeroRefillTime(self.size));
        }
        Ok(())
    }
}

/// A bucket's counters for a snapshot; its configuration comes with it, field by field (the
/// state file's bincode cannot read back fields serde skips, as the JSON form does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketState {
    pub size: u64,
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
    /// Tokens in the bucket, or owed by it after an oversized request (one of the two is 0).
    pub budget: u64,
    pub debt: u64,
    pub burst_left: u64,
    /// Refill progress towards the next token, in token-nanoseconds.
    pub fraction: u64,
    /// Nanoseconds since the bucket was last refilled: refilling goes on from there.
    pub elapsed_ns: u64,
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: TokenBucketConfig,
    refill_ns: u64,
    /// Negative after an oversized request: the debt is paid back before anything else passes.
    budget: i128,
    burst_left: u64,
    /// Refill progress towards the next token (`< refill_ns`), so that no fraction of a token is
    /// lost between refills however often they happen.
    fraction: u64,
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket; None for an unlimited configuration. The configuration must be valid.
    pub fn new(config: TokenBucketConfig, now: Instant) -> Result<Option<Self>, BucketError> {
        config.validate()?;
        if config.is_unlimited() {
            return Ok(None);
        }
        Ok(Some(Self {
            config,
            refill_ns: config.refill_time * NANOS_PER_MILLI,
            budget: i128::from(config.size),
            burst_left: config.one_time_burst.unwrap_or(0),
            fraction: 0,
            last_update: now,
        }))
    }

    pub fn config(&self) -> TokenBucketConfig {
        self.config
    }

    fn size(&self) -> i128 {
        i128::from(self.config.size)
    }

    /// True when the bucket holds its whole size (time brings it nothing more).
    pub fn is_full(&self) -> bool {
        self.budget >= self.size()
    }

    /// Adds what the time since the last refill brought, up to the bucket's size. A time
    /// before the last refill (a limiter's older clock reading) brings nothing and moves
    /// nothing back, so no interval is counted twice.
    fn refill(&mut self, now: Instant) {
        if now < self.last_update {
            return;
        }
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        self.last_update = now;
        if self.budget >= self.size() {
            self.fraction = 0;
            return;
        }
        let missing = (self.size() - self.budget) as u128;
        let gained = elapsed
            .checked_mul(u128::from(self.config.size))
            .and_then(|progress| progress.checked_add(u128::from(self.fraction)));
        match gained {
            Some(progress) if progress / u128::from(self.refill_ns) < missing => {
                self.budget += (progress / u128::from(self.refill_ns)) as i128;
                // Below refill_ns, which is a u64.
                self.fraction = (progress % u128::from(self.refill_ns)) as u64;
            }
            _ => {
                self.budget = self.size();
                self.fraction = 0;
            }
        }
    }

    /// What `tokens` take from the bucket (after the burst), and whether the bucket has that
    /// now. A request larger than the bucket passes when the bucket is full and leaves it in
    /// debt: it could never wait for more, and the debt keeps the long-run rate exact.
    fn needed(&self, tokens: u64) -> i128 {
        let from_bucket = tokens.saturating_sub(self.burst_left);
        i128::from(from_bucket).min(self.size())
    }

    /// None when `tokens` can be taken now; otherwise how long until they can.
    pub fn check(&mut self, tokens: u64, now: Instant) -> Option<Duration> {
        self.refill(now);
        let needed = self.needed(tokens);
        if self.budget >= needed {
            return None;
        }
        // deficit tokens take deficit * refill_ns / size nanoseconds, less the progress made.
        let deficit = (needed - self.budget) as u128;
        let wait = deficit
            .saturating_mul(u128::from(self.refill_ns))
            .saturating_sub(u128::from(self.fraction))
            .div_ceil(u128::from(self.config.size));
        Some(Duration::from_nanos(
            u64::try_from(wait).unwrap_or(u64::MAX),
        ))
    }

    /// Takes `tokens` that [`TokenBucket::check`] just allowed: the burst first, then the bucket.
    pub fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst_left);
        self.burst_left -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }

    /// This bucket with a new configuration, taking effect at once: the tokens it holds stay
    /// (up to the new size), as does a debt; the new `one_time_burst` is granted.
    pub fn reconfigured(
        &self,
        config: TokenBucketConfig,
        now: Instant,
    ) -> Result<Option<Self>, BucketError> {
        let Some(mut bucket) = Self::new(config, now)? else {
            return Ok(None);
        };
        let mut old = self.clone();
        old.refill(now);
        bucket.budget = old.budget.min(bucket.size());
        Ok(Some(bucket))
    }

    pub fn state(&self, now: Instant) -> TokenBucketState {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        TokenBucketState {
            size: self.config.size,
            one_time_burst: self.config.one_time_burst,
            refill_time: self.config.refill_time,
            budget: u64::try_from(self.budget.max(0)).unwrap_or(u64::MAX),
            debt: u64::try_from((-self.budget).max(0)).unwrap_or(u64::MAX),
            burst_left: self.burst_left,
            fraction: self.fraction,
            elapsed_ns: u64::try_from(elapsed).unwrap_or(u64::MAX),
        }
    }

    /// The bucket a snapshot saved, refilling on from where it was.
    pub fn from_state(state: &TokenBucketState, now: Instant) -> Result<Option<Self>, BucketError> {
        let config = TokenBucketConfig {
            size: state.size,
            one_time_burst: state.one_time_burst,
            refill_time: state.refill_time,
        };
        let Some(mut bucket) = Self::new(config, now)? else {
            return Ok(None);
        };
        bucket.budget = (i128::from(state.budget) - i128::from(state.debt)).min(bucket.size());
        bucket.burst_left = state.burst_left;
        bucket.fraction = state.fraction % bucket.refill_ns;
        bucket.last_update = now
            .checked_sub(Duration::from_nanos(state.elapsed_ns))
            .unwrap_or(now);
        Ok(Some(bucket))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_ms: u64, now: Instant) -> TokenBucket {
        let config = TokenBucketConfig {
            size,
            one_time_burst: Some(burst),
            refill_time: refill_ms,
        };
        TokenBucket::new(config, now).unwrap().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_full_bucket_gives_its_size_then_refills_evenly() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 100, t0);
        assert_eq!(b.check(1000, t0), None);
        b.take(1000);
        // Empty: 100 tokens need 10 ms.
        assert_eq!(b.check(100, t0), Some(ms(10)));
        assert_eq!(b.check(100, t0 + ms(5)), Some(ms(5)));
        assert_eq!(b.check(100, t0 + ms(10)), None);
        b.take(100);
        // Never more than the size, however long it waits.
        assert_eq!(b.check(1000, t0 + ms(10_000)), None);
        b.take(1000);
        assert!(b.check(1, t0 + ms(10_000)).is_some());
    }

    #[test]
    fn fractions_of_a_token_are_not_lost_between_frequent_refills() {
        let t0 = Instant::now();
        // 3 tokens a second: one every 333.33 ms.
        let mut b = bucket(3, 0, 1000, t0);
        b.take(3);
        let mut now = t0;
        for _ in 0..1000 {
            now += ms(1);
            let _ = b.check(1, now);
        }
        // After 1 s exactly 3 tokens are back, though each refill brought 0.003 of one.
        assert_eq!(b.check(3, now), None);
    }

    #[test]
    fn the_burst_is_spent_first_and_does_not_come_back() {
        let t0 = Instant::now();
        let mut b = bucket(100, 500, 1000, t0);
        assert_eq!(b.check(550, t0), None);
        b.take(550);
        // 50 of the bucket's 100 are left.
        assert_eq!(b.check(50, t0), None);
        b.take(50);
        assert_eq!(b.check(10, t0), Some(ms(100)));
        assert_eq!(b.check(100, t0 + ms(5000)), None);
        b.take(100);
        assert!(b.check(1, t0 + ms(5000)).is_some());
    }

    #[test]
    fn an_oversized_request_passes_when_full_and_leaves_a_debt() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        b.take(1);
        // Not full: it waits for the bucket to be full, not for 5000 tokens that cannot fit.
        assert_eq!(b.check(5000, t0), Some(ms(1)));
        assert_eq!(b.check(5000, t0 + ms(1)), None);
        b.take(5000);
        // 4000 owed, then 1 token: 4.001 s.
        assert_eq!(b.check(1, t0 + ms(1)), Some(ms(4001)));
        assert_eq!(b.check(1, t0 + ms(4002)), None);
    }

    #[test]
    fn waits_round_up_so_the_token_is_there_when_the_timer_fires() {
        let t0 = Instant::now();
        let mut b = bucket(3, 0, 1, t0);
        b.take(3);
        let wait = b.check(1, t0).unwrap();
        assert_eq!(wait, Duration::from_nanos(333_334));
        assert_eq!(b.check(1, t0 + wait), None);
    }

    #[test]
    fn bad_configurations_are_refused_and_size_zero_is_unlimited() {
        let config = |size, refill_time| TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time,
        };
        assert_eq!(
            config(10, 0).validate(),
            Err(BucketError::ZeroRefillTime(10))
        );
        assert_eq!(
            config(10, u64::MAX).validate(),
            Err(BucketError::RefillTimeOverflow(u64::MAX))
        );
        assert_eq!(config(0, 0).validate(), Ok(()));
        // An unlimited bucket's refill time is still in range (the API shows it as given).
        assert_eq!(
            config(0, u64::MAX / 1000).validate(),
            Err(BucketError::RefillTimeOverflow(u64::MAX / 1000))
        );
        assert!(TokenBucket::new(config(0, 0), Instant::now())
            .unwrap()
            .is_none());
        // The largest sizes do not overflow the arithmetic.
        let t0 = Instant::now();
        let mut b = TokenBucket::new(config(u64::MAX, u64::MAX / NANOS_PER_MILLI), t0)
            .unwrap()
            .unwrap();
        b.take(u64::MAX);
        assert!(b.check(u64::MAX, t0 + ms(1)).is_some());
        assert_eq!(b.check(1, t0 + Duration::from_secs(1 << 40)), None);
    }

    #[test]
    fn a_reconfigured_bucket_keeps_its_tokens_up_to_the_new_size() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        b.take(400);
        let smaller = TokenBucketConfig {
            size: 100,
            one_time_burst: None,
            refill_time: 1000,
        };
        let mut b2 = b.reconfigured(smaller, t0).unwrap().unwrap();
        assert_eq!(b2.check(100, t0), None);
        let larger = TokenBucketConfig {
            size: 10_000,
            one_time_burst: None,
            refill_time: 1000,
        };
        let mut b3 = b.reconfigured(larger, t0).unwrap().unwrap();
        assert_eq!(b3.check(600, t0), None);
        assert!(b3.check(601, t0).is_some());
    }

    #[test]
    fn a_bucket_survives_its_state_round_trip() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 50, 1000, t0);
        b.take(1550);
        let state = b.state(t0 + ms(100));
        assert_eq!((state.debt, state.budget, state.burst_left), (500, 0, 0));
        let mut again = TokenBucket::from_state(&state, t0 + ms(100))
            .unwrap()
            .unwrap();
        // 500 owed and 100 ms elapsed: 400 ms until the debt is paid, then 1 ms a token.
        assert_eq!(again.check(1, t0 + ms(100)), Some(ms(401)));
    }
}
