//! The cache's state and its transitions, as plain functions.
//!
//! Everything the refresher decides — what a grant or a failure does to the
//! schedule, which token may be served, when a client may bring a call
//! forward — is a method on [`State`] that takes the policy, the clocks and
//! the random draw as arguments. So each rule is tested directly, without a
//! runtime or a platform double, and the async code around it only locks,
//! calls and notifies.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use credd_core::protocol::{PlatformHealth, Scope, Source};
use credd_core::secret::Token;
use credd_core::text::error_chain;
use tokio::time::Instant;

use super::policy::{
    CLIENT_CALL_WINDOW, CLIENT_CALLS_PER_WINDOW, CachePolicy, MAX_ERROR_TEXT, MAX_TRUSTED_LIFETIME,
    MIN_REFRESH_DELAY, MIN_REMAINING_HEADROOM, SHORT_LIVED_DELAY,
};
use super::schedule::{backoff_delay, refresh_delay};
use super::unix_secs;
use crate::platform::{ErrorClass, Grant, PlatformError};

/// Both clocks at one moment (see the cache's docs): the monotonic clock
/// drives timers, `CLOCK_BOOTTIME` counts suspend.
#[derive(Debug, Clone, Copy)]
pub(super) struct Now {
    /// The monotonic clock (tokio's, so tests can pause it).
    pub(super) mono: Instant,
    /// [`crate::clock::boottime`].
    pub(super) boot: Duration,
}

/// Who asked for a refresh outside the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Requester {
    /// A client found no usable token (rate limited, never overrides back-off).
    Client,
    /// A client asked for a repository the held token's scope does not
    /// cover: the grant may have been widened since. Asks the platform for
    /// its current token of this grant (rate limited with clients, never
    /// overrides back-off); an unchanged answer leaves the schedule alone.
    ScopeCheck,
    /// SIGHUP: always calls.
    Operator,
}

/// When a token stops living, on both clocks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline {
    /// On the monotonic clock (drives timers; stops during suspend).
    pub(super) mono: Instant,
    /// On [`crate::clock::boottime`] (counts suspend).
    pub(super) boot: Duration,
}

/// A token the cache holds (the platform's or the bootstrap one) and when it
/// stops living.
pub(super) struct HeldToken {
    pub(super) token: Token,
    pub(super) deadline: Deadline,
    /// What it may reach, as the platform stated it.
    pub(super) scope: Scope,
}

/// A token that may be served now.
pub(super) struct Usable {
    pub(super) token: Token,
    /// Life left (the lesser of both clocks).
    pub(super) left: Duration,
    pub(super) source: Source,
    pub(super) scope: Scope,
}

/// What a per-owner cache does when its schedule comes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnDemand {
    /// Someone asked since the last grant: call as scheduled.
    Call,
    /// Nobody asked: keep the token until it expires, call only if asked.
    Parked,
    /// Nobody asked and nothing usable is left: the cache can go.
    Idle,
}

/// What [`State::accept`] made of a grant.
pub(super) enum Accepted {
    /// Cached; the token when it is a new one (for the refresh hook).
    Cached(Option<Token>),
    /// Refused: it had too little life left (counted as a failure).
    TooShort,
}

/// Drops `held` if its SHA-256 is `sha256`; its fingerprint when it did.
fn take_matching(held: &mut Option<HeldToken>, sha256: &str) -> Option<String> {
    held.take_if(|h| h.token.matches_sha256_hex(sha256))
        .map(|h| h.token.fingerprint())
}

pub(super) struct State {
    pub(super) cached: Option<HeldToken>,
    /// Dropped (and zeroed) once a platform token arrives or its age is up.
    pub(super) bootstrap: Option<HeldToken>,
    pub(super) health: PlatformHealth,
    pub(super) last_error: Option<String>,
    pub(super) last_refresh_at: Option<u64>,
    pub(super) next_attempt: Instant,
    pub(super) backing_off: bool,
    pub(super) in_flight: bool,
    pub(super) requested: Option<Requester>,
    pub(super) failures: u32,
    /// Tokens in a row that were servable for less than `--min-lifetime`.
    pub(super) short_streak: u32,
    pub(super) unauthorized_retried: bool,
    pub(super) client_calls: VecDeque<Instant>,
    pub(super) platform_calls: u64,
    pub(super) served: u64,
    /// Served (or asked for) since the last platform call began (and, after
    /// a grant, since it arrived).
    pub(super) asked_since_fetch: bool,
    /// A per-owner refresher waiting for its token to expire (see [`OnDemand`]).
    pub(super) parked: bool,
    /// Clients waiting in `get` for a token right now: a per-owner cache
    /// they wait on is wanted, whatever `asked_since_fetch` says.
    pub(super) waiting: u32,
    /// The account of the last platform token, kept after it expires.
    pub(super) owner_seen: Option<String>,
    /// The last platform token stated no account (a platform without
    /// grants, or an older one), kept after it expires or is erased.
    pub(super) unscoped_seen: bool,
    /// The SHA-256 of a dropped token, for the refresher to report.
    pub(super) refusal_to_report: Option<String>,
    /// A per-owner cache that left its map (refused, or benched to free its
    /// slot): it answers from what it has, at once, and calls no more.
    pub(super) retired: bool,
}

/// Life left until `deadline` at `now`: the lesser of the two clocks' answers.
pub(super) fn life_left(deadline: Deadline, now: Now) -> Duration {
    deadline
        .mono
        .saturating_duration_since(now.mono)
        .min(deadline.boot.saturating_sub(now.boot))
}

impl State {
    /// The state at start: nothing cached, the first call due at once.
    pub(super) fn new(started: Instant, bootstrap: Option<HeldToken>) -> Self {
        Self {
            cached: None,
            bootstrap,
            health: PlatformHealth::Unknown,
            last_error: None,
            last_refresh_at: None,
            next_attempt: started,
            backing_off: false,
            in_flight: false,
            requested: None,
            failures: 0,
            short_streak: 0,
            unauthorized_retried: false,
            client_calls: VecDeque::new(),
            platform_calls: 0,
            served: 0,
            asked_since_fetch: false,
            parked: false,
            waiting: 0,
            owner_seen: None,
            unscoped_seen: false,
            refusal_to_report: None,
            retired: false,
        }
    }

    /// The token to serve now, if any, with its life left: the platform's
    /// while it has at least `min_lifetime` left, else the bootstrap token
    /// while it may be served.
    pub(super) fn usable(&self, policy: &CachePolicy, now: Now) -> Option<Usable> {
        if let Some(c) = &self.cached {
            let left = life_left(c.deadline, now);
            if left >= policy.min_lifetime {
                return Some(Usable {
                    token: c.token.clone(),
                    left,
                    source: Source::Platform,
                    scope: c.scope.clone(),
                });
            }
        }
        let b = self.bootstrap.as_ref()?;
        let left = life_left(b.deadline, now);
        (!left.is_zero()).then(|| Usable {
            token: b.token.clone(),
            left,
            source: Source::Env,
            scope: b.scope.clone(),
        })
    }

    /// How much life the platform's cached token must have for the next
    /// call to be worth answering with it: more than the token held now, so
    /// a refresh never gets back the very token it is replacing (which
    /// would cost a second call before expiry). `None` without a token.
    pub(super) fn min_remaining_to_ask(&self, now: Now) -> Option<Duration> {
        let held = life_left(self.cached.as_ref()?.deadline, now);
        Some(held + (held / 4).max(MIN_REMAINING_HEADROOM))
    }

    /// Whether someone asked since the last call began, a call is
    /// requested, or a client is waiting: a per-owner cache that is wanted
    /// calls when due and must not retire.
    pub(super) fn is_wanted(&self) -> bool {
        self.asked_since_fetch || self.requested.is_some() || self.waiting > 0
    }

    /// For a per-owner cache whose schedule came due: call, park until the
    /// token expires, or let the cache go (see [`OnDemand`]).
    pub(super) fn on_demand_due(&mut self, now: Now) -> OnDemand {
        if self.is_wanted() {
            return OnDemand::Call;
        }
        match &self.cached {
            Some(c) if !life_left(c.deadline, now).is_zero() => {
                self.next_attempt = c.deadline.mono;
                self.parked = true;
                OnDemand::Parked
            }
            _ => OnDemand::Idle,
        }
    }

    /// Caches `grant`, or refuses it if it has too little life.
    /// `scope_check`: the call was a [`Requester::ScopeCheck`]; when it
    /// brings back the token already held, nothing changes (the grant did
    /// not either) and the schedule stands.
    pub(super) fn accept(
        &mut self,
        policy: &CachePolicy,
        grant: Grant,
        sent_at: Deadline,
        now: Now,
        unit: f64,
        scope_check: bool,
    ) -> Accepted {
        if scope_check && self.cached.as_ref().is_some_and(|c| c.token == grant.token) {
            tracing::debug!(
                fingerprint = grant.token.fingerprint(),
                "scope check: the platform's token for this grant is the one held; its scope is unchanged"
            );
            return Accepted::Cached(None);
        }
        // Counted from when the request left: the answer cannot be older.
        let lifetime = grant.lifetime.min(MAX_TRUSTED_LIFETIME);
        let deadline = Deadline {
            mono: sent_at.mono + lifetime,
            boot: sent_at.boot + lifetime,
        };
        let life = life_left(deadline, now);
        if life < policy.min_lifetime.max(MIN_REFRESH_DELAY) {
            self.fail(
                policy,
                &Failure::TooShort {
                    life,
                    min: policy.min_lifetime,
                },
                now,
                unit,
            );
            return Accepted::TooShort;
        }
        let unchanged = self.cached.as_ref().is_some_and(|c| c.token == grant.token);
        let (delay, short_lived) = self.next_refresh(policy, life, unit, unchanged);
        let fingerprint = grant.token.fingerprint();
        tracing::info!(
            fingerprint,
            owner = grant.scope.owner.as_deref().unwrap_or("-"),
            expires_at = unix_secs(grant.expires_at),
            expires_in_secs = life.as_secs(),
            next_refresh_in_secs = delay.as_secs(),
            "{}",
            if unchanged {
                "the platform has not rotated the token yet"
            } else {
                "token refreshed from the platform"
            }
        );
        // The hook hears about new tokens only.
        let token = (!unchanged).then(|| grant.token.clone());
        // A platform that states no account (no grants) speaks for every
        // account through this token, while it has one and after.
        self.owner_seen.clone_from(&grant.scope.owner);
        self.unscoped_seen = grant.scope.owner.is_none();
        self.cached = Some(HeldToken {
            token: grant.token,
            deadline,
            scope: grant.scope,
        });
        self.asked_since_fetch = false;
        self.parked = false;
        if self.bootstrap.take().is_some() {
            tracing::info!(
                "the platform's token replaces the bootstrap token from the environment"
            );
        }
        self.report_health(policy, short_lived, life, delay);
        self.last_refresh_at = Some(unix_secs(SystemTime::now()));
        self.failures = 0;
        self.unauthorized_retried = false;
        // Clients may still bring a call forward (rate limited): a token
        // that is no longer servable must not wait out the whole back-off.
        self.backing_off = false;
        self.next_attempt = now.mono + delay;
        Accepted::Cached(token)
    }

    /// When to call next for a token with `life` left: the refresh delay,
    /// bounded like failures from the second nearly dead token in a row;
    /// and whether that bound applies (the platform is short-lived).
    fn next_refresh(
        &mut self,
        policy: &CachePolicy,
        life: Duration,
        unit: f64,
        unchanged: bool,
    ) -> (Duration, bool) {
        let mut delay = refresh_delay(
            life,
            policy.refresh_margin,
            policy.min_lifetime,
            unit,
            unchanged,
        );
        // So little servable life that the schedule would call again within
        // seconds: the platform is handing out nearly dead tokens. From the
        // second such token in a row, calls are bounded like failures. (A
        // deployment with short tokens, say 2 minutes, schedules tens of
        // seconds apart and never gets here.)
        if delay < SHORT_LIVED_DELAY {
            self.short_streak = self.short_streak.saturating_add(1);
        } else {
            self.short_streak = 0;
        }
        let short_lived = self.short_streak >= 2;
        if short_lived {
            delay = delay.max(backoff_delay(
                policy.backoff_initial,
                policy.backoff_max,
                self.short_streak - 2,
                unit,
            ));
        }
        (delay, short_lived)
    }

    /// The platform's health after a token was accepted: short-lived (with
    /// the words for `status`), or well.
    fn report_health(
        &mut self,
        policy: &CachePolicy,
        short_lived: bool,
        life: Duration,
        delay: Duration,
    ) {
        if short_lived {
            let text = format!(
                "the platform handed out {} tokens in a row with only {}s of life (--min-lifetime {}s); next call in {}s",
                self.short_streak,
                life.as_secs(),
                policy.min_lifetime.as_secs(),
                delay.as_secs()
            );
            tracing::warn!(error = %text, "platform tokens are too short-lived; backing off");
            self.health = PlatformHealth::ShortLived;
            self.last_error = Some(text);
        } else {
            self.health = PlatformHealth::Ok;
            self.last_error = None;
        }
    }

    /// Records a failed call (or an unservable grant) and schedules the
    /// retry: back-off, `Retry-After`, one immediate retry after a first
    /// 401/403, the longest wait after a 404.
    pub(super) fn fail(
        &mut self,
        policy: &CachePolicy,
        failure: &Failure<'_>,
        now: Now,
        unit: f64,
    ) {
        let text = failure.describe();
        let class = failure.class();
        let backoff = |state: &mut Self| {
            let d = backoff_delay(
                policy.backoff_initial,
                policy.backoff_max,
                state.failures,
                unit,
            );
            state.failures = state.failures.saturating_add(1);
            d
        };
        let delay = match class {
            ErrorClass::Unauthorized if !self.unauthorized_retried => {
                // The bearer may have rotated under us: one immediate retry
                // (the next call re-reads the file).
                self.unauthorized_retried = true;
                Duration::ZERO
            }
            ErrorClass::NotConfigured | ErrorClass::NotGranted => {
                self.unauthorized_retried = false;
                policy.backoff_max.mul_f64(0.75 + unit / 4.0)
            }
            ErrorClass::Unauthorized => backoff(self),
            ErrorClass::Bearer | ErrorClass::Transient => {
                self.unauthorized_retried = false;
                let d = backoff(self);
                d.max(failure.retry_after().unwrap_or_default())
            }
        };
        if class == ErrorClass::NotGranted {
            // The platform no longer grants this token (a grant revoked or
            // narrowed, the App uninstalled): it is not served again.
            for (held, what) in [
                (&mut self.cached, "cached"),
                (&mut self.bootstrap, "bootstrap"),
            ] {
                if let Some(gone) = held.take() {
                    tracing::warn!(
                        fingerprint = gone.token.fingerprint(),
                        "dropped the {what} token: the platform refuses this workspace that token now"
                    );
                }
            }
        }
        self.health = match class {
            ErrorClass::Unauthorized | ErrorClass::Bearer => PlatformHealth::Unauthorized,
            ErrorClass::NotConfigured => PlatformHealth::NotConfigured,
            ErrorClass::NotGranted => PlatformHealth::NotGranted,
            ErrorClass::Transient => PlatformHealth::Failing,
        };
        self.backing_off = true;
        self.next_attempt = now.mono + delay;
        let serving = self.usable(policy, now).map(|u| u.source);
        tracing::warn!(
            error = %text,
            platform = self.health.as_str(),
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            still_serving = serving.map_or("nothing", |s| match s {
                Source::Platform => "cached platform token",
                Source::Env => "bootstrap token",
            }),
            "platform call failed"
        );
        self.last_error = Some(text);
    }

    /// Drops the cached or bootstrap token whose SHA-256 is `sha256` (a
    /// client was refused with it); whether one was dropped.
    pub(super) fn erase(&mut self, sha256: &str) -> bool {
        if let Some(gone) = take_matching(&mut self.cached, sha256) {
            tracing::info!(
                fingerprint = gone,
                "dropped the cached token: a client reported it was refused"
            );
            self.refusal_to_report = Some(sha256.to_ascii_lowercase());
            true
        } else if let Some(gone) = take_matching(&mut self.bootstrap, sha256) {
            tracing::info!(
                fingerprint = gone,
                "dropped the bootstrap token: a client reported it was refused"
            );
            // The platform may still hold the provision-time token too.
            self.refusal_to_report = Some(sha256.to_ascii_lowercase());
            true
        } else {
            tracing::debug!("erase for a token that is not cached: kept the cached one");
            false
        }
    }

    /// Whether an out-of-schedule request (taken from `requested`) leads to
    /// a call now; clients are rate limited and never cut a back-off short.
    pub(super) fn take_request(&mut self, policy: &CachePolicy, now: Now) -> bool {
        let Some(requester) = self.requested.take() else {
            return false;
        };
        let usable = self.usable(policy, now).is_some();
        match requester {
            Requester::Operator => true,
            // The platform is failing: the back-off decides.
            Requester::Client | Requester::ScopeCheck if self.backing_off => false,
            // Someone else's call already produced a token.
            Requester::Client if usable => false,
            // Due anyway (the first call at start): not the client's doing.
            Requester::Client | Requester::ScopeCheck if now.mono >= self.next_attempt => true,
            Requester::Client | Requester::ScopeCheck => match self.client_call(now.mono) {
                Ok(()) => true,
                Err(free_at) => {
                    // A client without a token gets the call when the window
                    // frees; a scope check with a servable token does not
                    // move the schedule (a flood of them must not either).
                    if !usable {
                        self.next_attempt = self.next_attempt.min(free_at);
                    }
                    tracing::debug!(
                        "clients asked for more than {CLIENT_CALLS_PER_WINDOW} platform calls a minute; next call when the window frees"
                    );
                    false
                }
            },
        }
    }

    /// Takes a place in the clients' window of calls, or says when one frees.
    fn client_call(&mut self, now: Instant) -> Result<(), Instant> {
        while self
            .client_calls
            .front()
            .is_some_and(|&t| now.duration_since(t) >= CLIENT_CALL_WINDOW)
        {
            self.client_calls.pop_front();
        }
        if self.client_calls.len() < CLIENT_CALLS_PER_WINDOW {
            self.client_calls.push_back(now);
            Ok(())
        } else {
            Err(self.client_calls.front().copied().unwrap_or(now) + CLIENT_CALL_WINDOW)
        }
    }
}

/// Why a call did not produce a servable token.
pub(super) enum Failure<'a> {
    Platform(&'a PlatformError),
    TooShort { life: Duration, min: Duration },
}

impl Failure<'_> {
    pub(super) fn class(&self) -> ErrorClass {
        match self {
            Self::Platform(e) => e.class(),
            Self::TooShort { .. } => ErrorClass::Transient,
        }
    }

    pub(super) fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Platform(e) => e.retry_after(),
            Self::TooShort { .. } => None,
        }
    }

    /// The error chain `a -> b -> c`, bounded. Platform errors never carry
    /// the token, the bearer or the body (credd-core guarantees it).
    pub(super) fn describe(&self) -> String {
        let mut text = match self {
            Self::Platform(e) => error_chain(*e),
            Self::TooShort { life, min } => format!(
                "the platform handed out a token with {}s of life left, less than --min-lifetime {}s",
                life.as_secs(),
                min.as_secs()
            ),
        };
        if text.len() > MAX_ERROR_TEXT {
            let mut cut = MAX_ERROR_TEXT;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        text
    }
}
