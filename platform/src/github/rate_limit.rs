//! GitHub's rate limits on the App: read from every answer as GitHub
//! documents them, held once for every installation and scope, and shared
//! with other replicas.

use std::sync::PoisonError;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::{BARE_RATE_LIMIT_WAIT, GitHubAppProvider, MAX_RATE_LIMIT_HOLD, signed};
use crate::provider::ProviderError;

/// GitHub's rate limit on the App, as last answered: no request goes to
/// GitHub before `until`.
#[derive(Default)]
pub(super) struct Hold {
    until: Option<Timestamp>,
    /// Secondary limits without `retry-after` in a row: each waits twice the
    /// one before (GitHub: "at least one minute", then exponentially).
    pub(super) bare_streak: u32,
}

/// The shared record of GitHub's rate limit on the App.
const RATE_LIMIT_RECORD: &str = "github:rate-limit";

/// GitHub's rate limit on the App as replicas share it.
#[derive(Serialize, Deserialize)]
struct SharedHold {
    /// No request goes to GitHub before this (Unix seconds).
    until: i64,
}

impl GitHubAppProvider {
    /// `Err(RateLimited)` while a rate limit another replica was told about
    /// holds (read before each request to GitHub: they are rare, one per
    /// token lifetime per grant, so one Redis read each costs nothing).
    pub(super) async fn check_shared_hold(&self) -> Result<(), ProviderError> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let Some(plain) = shared.get_record(RATE_LIMIT_RECORD).await else {
            return Ok(());
        };
        let until = serde_json::from_slice::<SharedHold>(&plain)
            .ok()
            .and_then(|hold| Timestamp::from_second(hold.until).ok());
        match until {
            Some(until) if until > self.now() => {
                self.caches.metrics().held();
                Err(self.hold_until(until, "announced to another replica"))
            }
            _ => Ok(()),
        }
    }

    /// Holds every request to GitHub until `until`, on this replica and,
    /// shared, on every other before this returns.
    pub(super) async fn hold(&self, until: Timestamp, why: &str) -> ProviderError {
        let error = self.hold_until(until, why);
        if let (Some(shared), ProviderError::RateLimited { until, wait }) = (&self.shared, &error) {
            let record = SharedHold {
                until: until.as_second(),
            };
            if let Ok(plain) = serde_json::to_vec(&record) {
                shared
                    .put_record(RATE_LIMIT_RECORD, &plain, *wait + Duration::from_secs(1))
                    .await;
            }
        }
        error
    }

    /// When GitHub's rate limit on the App ends, while it holds.
    pub fn rate_limited_until(&self) -> Option<Timestamp> {
        let hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
        hold.until.filter(|until| *until > self.now())
    }

    /// `Err(RateLimited)` while GitHub's limit holds: then nothing may be
    /// asked of GitHub (the mint and the listing are both the App's JWT
    /// requests, so one hold covers every installation and scope).
    pub(super) fn check_hold(&self) -> Result<(), ProviderError> {
        let now = self.now();
        let hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
        match hold.until {
            Some(until) if now < until => {
                self.caches.metrics().held();
                Err(ProviderError::RateLimited {
                    until,
                    wait: until.duration_since(now).unsigned_abs(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Holds every request to GitHub until `until` (bounded by
    /// [`MAX_RATE_LIMIT_HOLD`]); logs one line when an episode begins.
    fn hold_until(&self, until: Timestamp, why: &str) -> ProviderError {
        let now = self.now();
        let until = until
            .max(now + SignedDuration::from_secs(1))
            .min(now + signed(MAX_RATE_LIMIT_HOLD));
        let mut hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
        let new_episode = hold.until.is_none_or(|held| held <= now);
        if new_episode || hold.until.is_some_and(|held| held < until) {
            hold.until = Some(until);
        }
        let until = hold.until.unwrap_or(until);
        drop(hold);
        self.caches
            .metrics()
            .rate_limited(until.as_second(), new_episode);
        let wait = until.duration_since(now).unsigned_abs();
        if new_episode {
            tracing::warn!(
                "[github] GitHub rate limits the App ({why}): no request goes to GitHub until {until} ({} s); workspaces needing a new token get 503 with Retry-After",
                wait.as_secs()
            );
        }
        ProviderError::RateLimited { until, wait }
    }

    /// The rate limit an answer announces, if any (GitHub's rules for its
    /// REST API): a 403 or 429 with `retry-after` waits that long; with
    /// `x-ratelimit-remaining: 0`, until `x-ratelimit-reset`; a 429, or a
    /// 403 whose message names a rate limit, without either header waits a
    /// minute, doubling while it repeats. Any answer with
    /// `x-ratelimit-remaining: 0` (a success too) holds until the reset.
    pub(super) fn rate_limit_of(
        &self,
        status: u16,
        headers: &reqwest::header::HeaderMap,
        message: Option<&str>,
    ) -> Option<(Timestamp, &'static str)> {
        let now = self.now();
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let retry_after = text("retry-after").and_then(|v| {
            let v = v.trim();
            match v.parse::<u64>() {
                Ok(secs) => Some(now + signed(Duration::from_secs(secs.min(86_400)))),
                Err(_) => httpdate::parse_http_date(v)
                    .ok()
                    .and_then(|t| Timestamp::try_from(t).ok()),
            }
        });
        let used_up = text("x-ratelimit-remaining").is_some_and(|v| v.trim() == "0");
        let reset = text("x-ratelimit-reset")
            .and_then(|v| v.trim().parse::<i64>().ok())
            .and_then(|secs| Timestamp::from_second(secs).ok());
        let limited_status = status == 403 || status == 429;
        if limited_status && let Some(until) = retry_after {
            return Some((until, "secondary rate limit, retry-after"));
        }
        if used_up {
            let until = reset.unwrap_or(now + SignedDuration::from_secs(60));
            return Some((until, "primary rate limit used up, x-ratelimit-reset"));
        }
        let says_limit = message.is_some_and(|m| m.to_ascii_lowercase().contains("rate limit"));
        if status == 429 || (status == 403 && says_limit) {
            let mut hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
            let factor = 1u32 << hold.bare_streak.min(6);
            hold.bare_streak = hold.bare_streak.saturating_add(1);
            let wait = BARE_RATE_LIMIT_WAIT.saturating_mul(factor);
            return Some((
                now + signed(wait),
                "secondary rate limit without retry-after: waiting a minute, doubling",
            ));
        }
        None
    }
}
