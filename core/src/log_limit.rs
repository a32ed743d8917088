//! At most one log line per interval for an event a caller can repeat,
//! with the number left out: a flood of refused callers, failed accepts or
//! refused requests cannot flood the journal.
//!
//! The daemon and the platform both have such events, so the rule is
//! defined once. The transition is pure (the clock is passed in), so tests
//! drive it with any clock, tokio's paused one included.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a repeatable event may be logged, everywhere it is limited.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One event's limit: when it was last logged and how many were left out
/// since.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// A limit of one line per `interval`; the first event is logged.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// An event at `now`: `Some(left out since the last line)` when a line
    /// is due, `None` when this one is only counted.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Distinct keys a [`SharedLogLimit`] tracks at once; past it, keys whose
/// interval has passed are forgotten, and while all are recent a new key
/// shares one overflow limit.
pub const MAX_KEYS: usize = 256;

/// A [`LogLimit`] per key (a workspace, a message), shared by every task or
/// thread that logs the event: a `static` per call site. Keyed, so a caller
/// repeating its own event cannot hide another's first line.
#[derive(Debug)]
pub struct SharedLogLimit {
    interval: Duration,
    limits: Mutex<BTreeMap<String, LogLimit>>,
}

impl SharedLogLimit {
    /// One line per `interval` for each key.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            limits: Mutex::new(BTreeMap::new()),
        }
    }

    /// [`LogLimit::admit`] for `key`, at this moment.
    pub fn admit(&self, key: &str) -> Option<u64> {
        self.admit_at(key, Instant::now())
    }

    fn admit_at(&self, key: &str, now: Instant) -> Option<u64> {
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = key;
        if !limits.contains_key(key) && limits.len() >= MAX_KEYS {
            limits.retain(|_, limit| {
                limit
                    .last
                    .is_some_and(|last| now.saturating_duration_since(last) < limit.interval)
            });
            if limits.len() >= MAX_KEYS {
                key = OVERFLOW;
            }
        }
        if let Some(limit) = limits.get_mut(key) {
            return limit.admit(now);
        }
        let mut limit = LogLimit::new(self.interval);
        let admitted = limit.admit(now);
        limits.insert(key.to_owned(), limit);
        admitted
    }
}

/// The key every new one shares while [`MAX_KEYS`] recent keys are held.
const OVERFLOW: &str = "";

#[cfg(test)]
mod tests {
    use super::*;

    /// An event every 50 ms for 25 s is three lines, not 500: at 0, 10
    /// and 20 s, each with the number left out before it.
    #[test]
    fn a_flood_is_one_line_per_interval_with_the_rest_counted() {
        let start = Instant::now();
        let mut limit = LogLimit::new(LOG_INTERVAL);
        let lines: Vec<u64> = (0..500u32)
            .filter_map(|i| limit.admit(start + Duration::from_millis(50) * i))
            .collect();
        assert_eq!(lines, [0, 199, 199]);
    }

    #[test]
    fn a_clock_that_goes_back_is_counted_not_logged() {
        let start = Instant::now() + Duration::from_secs(60);
        let mut limit = LogLimit::new(LOG_INTERVAL);
        assert_eq!(limit.admit(start), Some(0));
        assert_eq!(limit.admit(start - Duration::from_secs(30)), None);
        assert_eq!(limit.admit(start + LOG_INTERVAL), Some(1));
    }

    #[test]
    fn the_shared_limit_is_per_key() {
        static LIMIT: SharedLogLimit = SharedLogLimit::new(LOG_INTERVAL);
        assert_eq!(LIMIT.admit("ws-a"), Some(0));
        assert_eq!(LIMIT.admit("ws-a"), None);
        assert_eq!(LIMIT.admit("ws-b"), Some(0), "another key's first line");
    }

    #[test]
    fn a_flood_of_new_keys_is_bounded_and_still_logged() {
        let limit = SharedLogLimit::new(LOG_INTERVAL);
        let start = Instant::now();
        let lines = (0..10 * MAX_KEYS)
            .filter_map(|i| limit.admit_at(&format!("key-{i}"), start))
            .count();
        // Each of the first MAX_KEYS, then one for all the rest.
        assert_eq!(lines, MAX_KEYS + 1);
        assert!(limit.limits.lock().unwrap().len() <= MAX_KEYS + 1);
        // Once their interval has passed, old keys make room again.
        assert_eq!(limit.admit_at("late", start + LOG_INTERVAL), Some(0));
        assert!(limit.limits.lock().unwrap().len() <= 2);
    }
}
