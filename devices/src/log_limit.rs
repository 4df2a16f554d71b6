//! Log lines that a guest or a client can cause at will, limited to one per interval: a guest
//! writing past its disk's file size limit, or a flood of API clients, must not fill the log.
//! The line that is written says how many like it were held back since the last one.

use std::time::{Duration, Instant};

/// Allows one line per `interval`, counting the ones it holds back.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl LogLimiter {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            held_back: 0,
        }
    }

    /// Whether a line may be written now: `Some(n)` with the number of lines held back since
    /// the last one written, `None` to hold this one back.
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// " (N more like it held back)" when `held_back` is not zero, for the end of a line.
pub fn held_back_note(held_back: u64) -> String {
    if held_back == 0 {
        String::new()
    } else {
        format!(" ({held_back} more like it held back)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_next_counts_the_ones_held_back() {
        let mut limiter = LogLimiter::new(Duration::from_secs(5));
        let start = Instant::now();
        assert_eq!(limiter.allow_at(start), Some(0));
        for ms in [1, 100, 4_999] {
            assert_eq!(limiter.allow_at(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(limiter.allow_at(start + Duration::from_secs(5)), Some(3));
        assert_eq!(limiter.allow_at(start + Duration::from_secs(6)), None);
        assert_eq!(limiter.allow_at(start + Duration::from_secs(11)), Some(1));
        assert_eq!(held_back_note(0), "");
        assert_eq!(held_back_note(3), " (3 more like it held back)");
    }
}
