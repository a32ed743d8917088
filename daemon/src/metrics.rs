//! The daemon's counters since start, reported in `status` for `credd metrics`.
//!
//! Why here and not in each token cache: a per-owner cache is dropped when
//! nobody asks for its token any more, and a counter that went down with it
//! would read as a reset to Prometheus. So the whole daemon shares one
//! [`Metrics`], which the caches and the server only add to.
//!
//! The answers are counted with atomics (one per kind: the `get` path takes
//! no lock for them); the platform's counters and latency histogram sit
//! behind one mutex, taken once per platform call, so a snapshot is
//! consistent (a histogram's `count` never lags its buckets).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use credd_core::protocol::{Counters, ErrorCode, Histogram, Response};

use crate::platform::{ErrorClass, PlatformError};

/// Upper bounds of the platform latency histogram, in milliseconds: from a
/// platform next door to the daemon's 15 s call timeout.
pub(crate) const PLATFORM_LATENCY_BOUNDS_MS: [u64; 12] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000,
];

/// Kinds of answer that are not a refusal; a refusal is counted under its
/// [`ErrorCode`].
const ANSWER_KINDS: [&str; 4] = ["token", "erased", "kept", "status"];
const ANSWER_SLOTS: usize = ANSWER_KINDS.len() + ErrorCode::ALL.len();

/// Why a platform call produced no servable token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureCause {
    /// The call failed ([`ErrorClass`]).
    Class(ErrorClass),
    /// The platform handed out a token with less life than `--min-lifetime`.
    ShortLived,
}

impl FailureCause {
    /// Every cause, in the order they are reported.
    const ALL: [Self; ErrorClass::ALL.len() + 1] = {
        let mut all = [Self::ShortLived; ErrorClass::ALL.len() + 1];
        let mut i = 0;
        while i < ErrorClass::ALL.len() {
            all[i] = Self::Class(ErrorClass::ALL[i]);
            i += 1;
        }
        all
    };

    /// The cause in a word: the [`ErrorClass`]'s, or `short_lived`.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Class(class) => class.as_str(),
            Self::ShortLived => "short_lived",
        }
    }

    fn slot(self) -> usize {
        Self::ALL
            .iter()
            .position(|c| *c == self)
            .expect("every cause is in ALL")
    }
}

impl From<ErrorClass> for FailureCause {
    fn from(class: ErrorClass) -> Self {
        Self::Class(class)
    }
}

/// HTTP status classes counted (1xx … 5xx).
const STATUS_CLASSES: usize = 5;

/// What one platform call came to, for [`Metrics::platform_call`].
pub(crate) enum CallOutcome<'a> {
    /// A token came back and was cached.
    Granted,
    /// A token came back with too little life and was refused.
    TooShort,
    /// The call failed.
    Failed(&'a PlatformError),
}

#[derive(Default)]
struct PlatformCounters {
    calls: u64,
    failures: [u64; FailureCause::ALL.len()],
    responses: [u64; STATUS_CLASSES],
    /// Per bucket, not cumulative; the last one is `+Inf`.
    latency_buckets: [u64; PLATFORM_LATENCY_BOUNDS_MS.len() + 1],
    latency_sum_us: u64,
}

/// The daemon's counters (see the module docs).
pub(crate) struct Metrics {
    answers: [AtomicU64; ANSWER_SLOTS],
    platform: Mutex<PlatformCounters>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            answers: std::array::from_fn(|_| AtomicU64::new(0)),
            platform: Mutex::new(PlatformCounters::default()),
        }
    }
}

/// The counter slot and word for an answer.
fn answer_slot(answer: &Response) -> usize {
    match answer {
        Response::Token { .. } => 0,
        Response::Erased { dropped: true } => 1,
        Response::Erased { dropped: false } => 2,
        Response::Status(_) => 3,
        Response::Error { code, .. } => {
            ANSWER_KINDS.len()
                + ErrorCode::ALL
                    .iter()
                    .position(|c| c == code)
                    .expect("every code is in ALL")
        }
    }
}

fn answer_word(slot: usize) -> &'static str {
    ANSWER_KINDS
        .get(slot)
        .copied()
        .unwrap_or_else(|| ErrorCode::ALL[slot - ANSWER_KINDS.len()].as_str())
}

/// What an answer was, in a word (logs and metrics; never its content).
pub(crate) fn answer_kind(answer: &Response) -> &'static str {
    answer_word(answer_slot(answer))
}

impl Metrics {
    /// Counts an answer the server gave (or is about to give).
    pub(crate) fn answered(&self, answer: &Response) {
        self.answers[answer_slot(answer)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one platform token call that took `took`.
    pub(crate) fn platform_call(&self, took: Duration, outcome: &CallOutcome<'_>) {
        let (status, cause) = match outcome {
            CallOutcome::Granted => (Some(200), None),
            CallOutcome::TooShort => (Some(200), Some(FailureCause::ShortLived)),
            CallOutcome::Failed(error) => (error.http_status(), Some(error.class().into())),
        };
        let took_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = PLATFORM_LATENCY_BOUNDS_MS
            .iter()
            .position(|&ms| took_us <= ms.saturating_mul(1_000))
            .unwrap_or(PLATFORM_LATENCY_BOUNDS_MS.len());
        let mut p = self.platform.lock().unwrap_or_else(|e| e.into_inner());
        p.calls += 1;
        if let Some(cause) = cause {
            p.failures[cause.slot()] += 1;
        }
        if let Some(class) = status
            .map(|s| usize::from(s / 100))
            .filter(|c| (1..=STATUS_CLASSES).contains(c))
        {
            p.responses[class - 1] += 1;
        }
        p.latency_buckets[bucket] += 1;
        p.latency_sum_us = p.latency_sum_us.saturating_add(took_us);
    }

    /// The counters as reported in `status`: every kind, cause and class,
    /// zeros included (so a rate over them exists from the start).
    pub(crate) fn snapshot(&self) -> Counters {
        let answers = self
            .answers
            .iter()
            .enumerate()
            .map(|(slot, n)| (answer_word(slot).to_owned(), n.load(Ordering::Relaxed)))
            .collect();
        let p = self.platform.lock().unwrap_or_else(|e| e.into_inner());
        let platform_failures = FailureCause::ALL
            .iter()
            .map(|cause| (cause.as_str().to_owned(), p.failures[cause.slot()]))
            .collect();
        let platform_responses: BTreeMap<String, u64> = p
            .responses
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("{}xx", i + 1), *n))
            .collect();
        let mut seen = 0;
        let counts = p.latency_buckets[..PLATFORM_LATENCY_BOUNDS_MS.len()]
            .iter()
            .map(|n| {
                seen += n;
                seen
            })
            .collect();
        Counters {
            answers,
            platform_calls: p.calls,
            platform_failures,
            platform_responses,
            platform_latency: Histogram {
                le_ms: PLATFORM_LATENCY_BOUNDS_MS.to_vec(),
                counts,
                count: p.latency_buckets.iter().sum(),
                sum_us: p.latency_sum_us,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_has_its_own_word() {
        let words: Vec<&str> = (0..ANSWER_SLOTS).map(answer_word).collect();
        for code in ErrorCode::ALL {
            let answer = Response::Error {
                code: *code,
                message: String::new(),
            };
            assert_eq!(answer_kind(&answer), code.as_str());
        }
        let mut unique = words.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), words.len(), "{words:?}");
    }

    #[test]
    fn calls_land_in_their_bucket_cause_and_status_class() {
        let metrics = Metrics::default();
        metrics.platform_call(Duration::from_millis(3), &CallOutcome::Granted);
        metrics.platform_call(Duration::from_millis(10), &CallOutcome::TooShort);
        let server = PlatformError::Server {
            status: 503,
            retry_after: None,
        };
        metrics.platform_call(Duration::from_secs(60), &CallOutcome::Failed(&server));
        let refused = PlatformError::NotGranted { what: "x".into() };
        metrics.platform_call(Duration::from_millis(40), &CallOutcome::Failed(&refused));
        metrics.answered(&Response::Erased { dropped: false });

        let c = metrics.snapshot();
        assert_eq!(c.platform_calls, 4);
        assert_eq!(c.platform_failures["short_lived"], 1);
        assert_eq!(c.platform_failures["transient"], 1);
        assert_eq!(c.platform_failures["not_granted"], 1);
        assert_eq!(c.platform_failures["unauthorized"], 0);
        assert_eq!(c.platform_responses["2xx"], 2);
        assert_eq!(c.platform_responses["4xx"], 1);
        assert_eq!(c.platform_responses["5xx"], 1);
        assert_eq!(c.answers["kept"], 1);
        assert_eq!(c.answers["busy"], 0);
        let h = &c.platform_latency;
        assert_eq!(h.count, 4);
        assert_eq!(h.sum_us, 60_053_000);
        // ≤5 ms: 1; ≤10 ms: 2; ≤50 ms: 3; the 60 s call only in +Inf.
        assert_eq!(&h.counts[..4], &[1, 2, 2, 3]);
        assert_eq!(h.counts.last(), Some(&3));
    }
}
