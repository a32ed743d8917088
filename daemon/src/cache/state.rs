//! A keeper's state and its transitions, as plain functions.
//!
//! Everything the refresher decides — what a grant or a failure does to the
//! schedule, which token may be served, when a client may bring a call
//! forward — is a method that takes the policy, the clocks and the random
//! draw as arguments. So each rule is tested directly, without a runtime or
//! a platform double, and the async code around it only locks, calls and
//! notifies. [`State`] has four parts, each with its own transitions: what
//! is held ([`Held`], `held.rs`), when to call ([`Schedule`],
//! `schedule.rs`), what status reports ([`Report`]) and who wants the token
//! ([`Demand`]); `accept` and `fail` compose them.

use std::time::{Duration, SystemTime};

use credd_core::protocol::{PlatformHealth, Source};
use credd_core::secret::Token;
use credd_core::text::error_chain;
use tokio::time::Instant;

pub(super) use super::held::{Held, HeldToken, Usable, life_left};
use super::policy::{CachePolicy, MAX_ERROR_TEXT, MAX_TRUSTED_LIFETIME, MIN_REFRESH_DELAY};
pub(super) use super::schedule::{Requester, Schedule};
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

/// When a token stops living, on both clocks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline {
    /// On the monotonic clock (drives timers; stops during suspend).
    pub(super) mono: Instant,
    /// On [`crate::clock::boottime`] (counts suspend).
    pub(super) boot: Duration,
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

/// A keeper's state, in four parts, each written by its own transitions:
/// what is held, when to call, what status reports, and who wants it.
pub(super) struct State {
    pub(super) held: Held,
    pub(super) schedule: Schedule,
    pub(super) report: Report,
    pub(super) demand: Demand,
}

/// What `credd status` and systemd's `STATUS=` say of the platform.
pub(super) struct Report {
    pub(super) health: PlatformHealth,
    pub(super) last_error: Option<String>,
    pub(super) last_refresh_at: Option<u64>,
    pub(super) platform_calls: u64,
    pub(super) served: u64,
}

/// Who wants this token: what keeps a per-owner keeper alive.
#[derive(Default)]
pub(super) struct Demand {
    /// Served (or asked for) since the last platform call began (and, after
    /// a grant, since it arrived).
    pub(super) asked_since_fetch: bool,
    /// A per-owner refresher waiting for its token to expire (see [`OnDemand`]).
    pub(super) parked: bool,
    /// Clients waiting in `get` for a token right now: a per-owner cache
    /// they wait on is wanted, whatever `asked_since_fetch` says.
    pub(super) waiting: u32,
    /// A per-owner cache that left its map (refused, or benched to free its
    /// slot): it answers from what it has, at once, and calls no more.
    pub(super) retired: bool,
}

impl State {
    /// The state at start: nothing cached, the first call due at once.
    pub(super) fn new(started: Instant, bootstrap: Option<HeldToken>) -> Self {
        Self {
            held: Held::new(bootstrap),
            schedule: Schedule::new(started),
            report: Report::new(),
            demand: Demand::default(),
        }
    }

    /// The token to serve now, if any (see [`Held::usable`]).
    pub(super) fn usable(&self, policy: &CachePolicy, now: Now) -> Option<Usable> {
        self.held.usable(policy, now)
    }

    /// Whether someone asked since the last call began, a call is
    /// requested, or a client is waiting: a per-owner cache that is wanted
    /// calls when due and must not retire.
    pub(super) fn is_wanted(&self) -> bool {
        self.demand.is_wanted() || self.schedule.requested.is_some()
    }

    /// For a per-owner cache whose schedule came due: call, park until the
    /// token expires, or let the cache go (see [`OnDemand`]).
    pub(super) fn on_demand_due(&mut self, now: Now) -> OnDemand {
        if self.is_wanted() {
            return OnDemand::Call;
        }
        match &self.held.cached {
            Some(c) if !life_left(c.deadline, now).is_zero() => {
                self.schedule.next_attempt = c.deadline.mono;
                self.demand.parked = true;
                OnDemand::Parked
            }
            _ => OnDemand::Idle,
        }
    }

    /// Whether an out-of-schedule request leads to a call now (see
    /// [`Schedule::take_request`]).
    pub(super) fn take_request(&mut self, policy: &CachePolicy, now: Now) -> bool {
        let usable = self.usable(policy, now).is_some();
        self.schedule.take_request(now.mono, usable)
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
        let unchanged = self.held.holds(&grant.token);
        if scope_check && unchanged {
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
            let min = policy.min_lifetime;
            self.fail(policy, &Failure::TooShort { life, min }, now, unit);
            return Accepted::TooShort;
        }
        let (delay, short_lived) = self.schedule.next_refresh(policy, life, unit, unchanged);
        tracing::info!(
            fingerprint = grant.token.fingerprint(),
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
        self.held.hold(grant, deadline);
        self.demand.after_grant();
        let short_streak = short_lived.then_some(self.schedule.short_streak);
        self.report.after_grant(policy, short_streak, life, delay);
        self.schedule.after_grant(delay, now.mono);
        Accepted::Cached(token)
    }

    /// Records a failed call (or an unservable grant) and schedules the
    /// retry (see [`Schedule::after_failure`]); a refusal drops what is held.
    pub(super) fn fail(
        &mut self,
        policy: &CachePolicy,
        failure: &Failure<'_>,
        now: Now,
        unit: f64,
    ) {
        let class = failure.class();
        let delay =
            self.schedule
                .after_failure(policy, class, failure.retry_after(), now.mono, unit);
        if class == ErrorClass::NotGranted {
            self.held.drop_refused();
        }
        let serving = self.usable(policy, now).map(|u| u.source);
        self.report
            .after_failure(class, failure.describe(), delay, serving);
    }
}

impl Report {
    fn new() -> Self {
        Self {
            health: PlatformHealth::Unknown,
            last_error: None,
            last_refresh_at: None,
            platform_calls: 0,
            served: 0,
        }
    }

    /// A token was accepted: the platform is well, or short-lived
    /// (`short_streak` nearly dead tokens in a row), with the words for
    /// `status`.
    fn after_grant(
        &mut self,
        policy: &CachePolicy,
        short_streak: Option<u32>,
        life: Duration,
        delay: Duration,
    ) {
        if let Some(streak) = short_streak {
            let text = format!(
                "the platform handed out {streak} tokens in a row with only {}s of life (--min-lifetime {}s); next call in {}s",
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
        self.last_refresh_at = Some(unix_secs(SystemTime::now()));
    }

    /// A call failed with `class` (`text` its error chain); the next one in
    /// `delay`; `serving` what is served meanwhile.
    fn after_failure(
        &mut self,
        class: ErrorClass,
        text: String,
        delay: Duration,
        serving: Option<Source>,
    ) {
        self.health = match class {
            ErrorClass::Unauthorized | ErrorClass::Bearer => PlatformHealth::Unauthorized,
            ErrorClass::NotConfigured => PlatformHealth::NotConfigured,
            ErrorClass::NotGranted => PlatformHealth::NotGranted,
            ErrorClass::Transient => PlatformHealth::Failing,
        };
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
}

impl Demand {
    /// Asked since the last call began, or a client is waiting.
    fn is_wanted(&self) -> bool {
        self.asked_since_fetch || self.waiting > 0
    }

    /// A token arrived: asks from now on count for the next decision, and
    /// a parked refresher runs again.
    fn after_grant(&mut self) {
        self.asked_since_fetch = false;
        self.parked = false;
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
