//! Marks on the way from `main` to the API's first answer, so that `tools/bench api` can say
//! where a spawn's time goes (issue 19: readiness is what every spawner waits on). Each mark
//! is a CLOCK_MONOTONIC reading, the clock a spawner's own timestamps and the jailer's
//! `--start-time-us` use, so the time before `main` (exec, the loader) shows too. Marking is
//! one clock read into a fixed array: no allocation, nothing on the path when unused; the
//! marks are logged once, at debug level, when the API listens.

use log::debug;

/// How many marks a start takes; one more is dropped (a mark is a measurement, not state).
const MAX_MARKS: usize = 12;

/// The marks of one start, in the order they were taken.
#[derive(Debug, Clone, Copy)]
pub struct StartupPhases {
    marks: [(&'static str, u64); MAX_MARKS],
    len: usize,
}

impl StartupPhases {
    /// The first mark, `main`, taken now.
    pub fn begin() -> Self {
        let mut phases = Self {
            marks: [("", 0); MAX_MARKS],
            len: 0,
        };
        phases.mark("main");
        phases
    }

    /// Records that the phase `name` ended now.
    pub fn mark(&mut self, name: &'static str) {
        if let Some(slot) = self.marks.get_mut(self.len) {
            *slot = (name, monotonic_ns());
            self.len += 1;
        }
    }

    /// The marks as `name=µs` pairs, the clock's microseconds.
    pub fn line(&self) -> String {
        self.marks[..self.len]
            .iter()
            .map(|(name, ns)| format!("{name}={}", ns / 1000))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Logs the marks at debug level, the one line `tools/bench api` reads.
    pub fn log(&self) {
        debug!("start-up phases (CLOCK_MONOTONIC us): {}", self.line());
    }
}

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec owned by this frame; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_kept_in_order_and_extra_ones_dropped() {
        let mut phases = StartupPhases::begin();
        for _ in 0..MAX_MARKS + 2 {
            phases.mark("later");
        }
        let line = phases.line();
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words.len(), MAX_MARKS);
        assert!(words[0].starts_with("main="));
        let times: Vec<u64> = words
            .iter()
            .map(|word| word.split_once('=').unwrap().1.parse().unwrap())
            .collect();
        assert!(times.windows(2).all(|pair| pair[0] <= pair[1]), "{line}");
    }
}
