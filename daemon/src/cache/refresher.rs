//! The refresher: the one task that calls the platform.
//!
//! It sleeps until the schedule says so or something wakes it (a client
//! that found no usable token, SIGHUP), makes the call, and hands the
//! outcome to the state's transitions ([`super::state`]). Being the only
//! caller is what makes any number of clients cost one call.

use credd_core::platform_api::{TokenQuery, Which};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::state::{Accepted, Deadline, Failure, OnDemand, Requester};
use super::{Benched, Fetch, Lifecycle, TokenKeeper, Whose};
use crate::metrics::CallOutcome;
use crate::platform::ReportOutcome;

/// Why a per-owner cache's refresher offers to end (see [`super::TokenStore`]).
pub(crate) enum Retirement {
    /// Nobody asked for its token during its life, and it has none left:
    /// gone unless asked again meanwhile.
    Idle,
    /// The platform refuses this owner (not granted, not installed) and it
    /// holds no token: gone at once, its answer remembered until its
    /// back-off ends, so neither its slot nor a platform call per request is
    /// spent on it.
    Refused(Benched),
}

impl<F: Fetch> TokenKeeper<F> {
    /// The refresher: the only caller of the platform. Runs until `cancel`,
    /// or — for a per-owner cache nobody asks for any more, or whose owner
    /// is refused — until `retire` agrees that the cache is gone (see
    /// [`super::TokenStore`]).
    pub(crate) async fn run_refresher(
        &self,
        cancel: CancellationToken,
        retire: impl Fn(Retirement) -> bool + Send,
    ) {
        loop {
            let next = self.lock().schedule.next_attempt;
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = self.wake.notified() => {
                    if !self.take_request() {
                        continue;
                    }
                }
                () = tokio::time::sleep_until(next) => {
                    // An erase or request may have moved the schedule meanwhile.
                    if Instant::now() < self.lock().schedule.next_attempt {
                        continue;
                    }
                    if matches!(self.lifecycle, Lifecycle::OnDemand { .. }) {
                        let now = self.now();
                        // Its own statement: `retire` takes the lock too.
                        let due = self.lock().on_demand_due(now);
                        match due {
                            OnDemand::Call => {}
                            OnDemand::Parked => continue,
                            OnDemand::Idle if retire(Retirement::Idle) => {
                                tracing::debug!(
                                    owner = self.lifecycle.owner().unwrap_or("-"),
                                    "nobody asked for this owner's token during its life; dropped it"
                                );
                                return;
                            }
                            OnDemand::Idle => continue,
                        }
                    }
                }
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = self.attempt() => {}
            }
            if matches!(self.lifecycle, Lifecycle::OnDemand { .. })
                && let Some(benched) = self.retire_refused()
            {
                tracing::debug!(
                    owner = self.lifecycle.owner().unwrap_or("-"),
                    "the platform refuses this owner; its cache is dropped, its answer kept until the back-off ends"
                );
                retire(Retirement::Refused(benched));
                return;
            }
        }
    }

    /// After a call the platform refused: marks this per-owner cache
    /// retired and returns what it answers until its back-off ends.
    fn retire_refused(&self) -> Option<Benched> {
        let st = self.lock();
        let now = self.now();
        if st.report.health != credd_core::protocol::PlatformHealth::NotGranted
            || st.schedule.in_flight
            || st.usable(&self.policy, now).is_some()
        {
            return None;
        }
        Some(self.retire(st))
    }

    /// Decides whether an out-of-schedule request leads to a call now.
    fn take_request(&self) -> bool {
        let go = self.lock().take_request(&self.policy, self.now());
        if !go {
            // Waiting clients re-check whether anything can happen before their deadline.
            self.bump();
        }
        go
    }

    /// One platform call and its consequences for the schedule.
    async fn attempt(&self) {
        let sent = self.now();
        let sent_at = Deadline {
            mono: sent.mono,
            boot: sent.boot,
        };
        let (refused, min_remaining, scope_check) = {
            let mut st = self.lock();
            st.schedule.in_flight = true;
            let scope_check = st.schedule.requested == Some(Requester::ScopeCheck);
            st.schedule.requested = None;
            // Asks from now on count for the next decision (see `OnDemand`).
            st.demand.asked_since_fetch = false;
            st.report.platform_calls += 1;
            // A scope check asks for the grant's current token, not for
            // more life: the platform mints only if the grant changed.
            let min_remaining = (!scope_check)
                .then(|| st.held.min_remaining_to_ask(sent))
                .flatten();
            (st.held.refusal_to_report.take(), min_remaining, scope_check)
        };
        self.bump();
        if let Some(sha256) = refused {
            // First, so the call below gets a fresh token rather than the
            // refused one from the platform's cache.
            self.report_refusal(&sha256).await;
        }
        tracing::debug!("calling the platform");
        let query = TokenQuery {
            which: self
                .lifecycle
                .owner()
                .map_or(Which::Default, |owner| Which::Owner(owner.to_owned())),
            min_remaining,
        };
        let started = std::time::Instant::now();
        let result = self.fetcher.fetch(query).await;
        let took = started.elapsed();
        let now = self.now();
        let unit = rand::random::<f64>();
        let mut st = self.lock();
        st.schedule.in_flight = false;
        let fresh = match result {
            Ok(grant) => match st.accept(&self.policy, grant, sent_at, now, unit, scope_check) {
                Accepted::Cached(fresh) => {
                    self.daemon
                        .metrics
                        .platform_call(took, &CallOutcome::Granted);
                    fresh
                }
                Accepted::TooShort => {
                    self.daemon
                        .metrics
                        .platform_call(took, &CallOutcome::TooShort);
                    None
                }
            },
            Err(error) => {
                st.fail(&self.policy, &Failure::Platform(&error), now, unit);
                self.daemon
                    .metrics
                    .platform_call(took, &CallOutcome::Failed(&error));
                None
            }
        };
        // The account as the platform spells it (an account's keeper is
        // named as git first asked, which is untrusted casing).
        let account = st.held.owner_seen.clone();
        drop(st);
        self.bump();
        if let (Some(token), Some(hook)) = (fresh, &self.daemon.on_refresh) {
            let whose = match &self.lifecycle {
                Lifecycle::Kept => Whose::Default {
                    account: account.as_deref(),
                },
                Lifecycle::OnDemand { owner } => Whose::Owner(account.as_deref().unwrap_or(owner)),
            };
            hook(&token, whose);
        }
    }
}

impl<F: Fetch> TokenKeeper<F> {
    /// Tells the platform about a refused token; the outcome is only logged
    /// (the platform rate-limits these, and the call after it still runs).
    async fn report_refusal(&self, sha256: &str) {
        let fingerprint = &sha256[..credd_core::secret::FINGERPRINT_HEX_LEN.min(sha256.len())];
        match self.fetcher.report_refusal(sha256).await {
            Ok(ReportOutcome::Accepted) => tracing::info!(
                fingerprint,
                "told the platform that git was refused with this token"
            ),
            Ok(ReportOutcome::RateLimited) => tracing::info!(
                fingerprint,
                "the platform is rate limiting refusal reports; it may hand out the refused token until its own refresh"
            ),
            Ok(ReportOutcome::Unsupported) => tracing::debug!(
                "the platform does not take refusal reports; its cache decides when the token is replaced"
            ),
            Ok(ReportOutcome::Refused { status }) => {
                tracing::warn!(status, "the platform refused a refusal report")
            }
            Err(error) => tracing::warn!(
                error = %credd_core::text::error_chain(&error),
                "could not report a refused token to the platform"
            ),
        }
    }
}
