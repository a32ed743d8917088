//! The token store: each token's keeper and the one task that refreshes it.
//!
//! Why it is shaped like this: every git operation in the workspace asks for a
//! token, but the platform should see about one call per token lifetime. So
//! each keeper answers from memory, and a single refresher task per token
//! owns every platform call and its schedule. The [`TokenStore`] owns the
//! keepers, their refreshers and what is daemon-wide ([`Daemonwide`]); it
//! answers in its own terms ([`Got`]), never in the protocol's. Clients never call the platform themselves;
//! a client that finds no usable token *asks* the refresher (rate limited) and
//! waits on a `watch` channel for at most `--wait-timeout`. Any number of
//! concurrent clients therefore cause at most one call (single flight).
//!
//! Expiry is tracked from the lifetime the platform stated relative to its
//! own `Date` header, on the monotonic clock ([`tokio::time::Instant`]) and on
//! `CLOCK_BOOTTIME` ([`crate::clock`]), whichever says less is left, so
//! neither a wrong or jumping wall clock nor a suspended machine can make us
//! serve a dead token. The expiry handed to git (`password_expiry_utc`) and
//! shown in status is *this machine's* wall clock plus that remaining life,
//! computed as it is served: git compares it with this machine's clock, and
//! a workspace clock ahead of the platform's must not make git discard a
//! live token.
//!
//! Schedule (see [`refresh_delay`](schedule::refresh_delay) and
//! [`backoff_delay`](schedule::backoff_delay)):
//! - after a success, refresh `margin + jitter` before expiry, jitter uniform
//!   in `[0, margin/4]` so a fleet started together spreads out;
//! - a token with less life than that is refreshed at half of its *usable*
//!   life (life above `--min-lifetime`), never sooner than
//!   [`MIN_REFRESH_DELAY`](policy::MIN_REFRESH_DELAY);
//! - failures back off exponentially with jitter, uniform in `[cap/2, cap]`
//!   with `cap = min(max, initial·2ⁿ)` ("equal jitter": unlike full jitter
//!   over `[0, cap]`, the shortest possible wait grows too, so no unlucky
//!   member of a fleet keeps retrying at the initial rate); `Retry-After` is a
//!   lower bound; 404 (feature off) waits `[3/4·max, max]`; the first 401/403 of a
//!   streak is retried at once (the bearer file is re-read on every call, it
//!   may just have rotated), the next one backs off;
//! - a platform that keeps handing out tokens barely above `--min-lifetime`
//!   (servable for less than `--min-lifetime` itself) would be asked every
//!   second; from the second such token in a row, the next call waits at
//!   least the failure back-off, and status says `short_lived`;
//! - clients that find no usable token bring the next call forward only while
//!   the refresher is not backing off, and at most
//!   [`CLIENT_CALLS_PER_WINDOW`](policy::CLIENT_CALLS_PER_WINDOW) times per
//!   [`CLIENT_CALL_WINDOW`](policy::CLIENT_CALL_WINDOW). SIGHUP
//!   ([`TokenKeeper::refresh_now`]) is the operator's override and always calls.

mod held;
mod outcome;
mod policy;
mod refresher;
mod schedule;
mod state;
mod status;
mod store;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credd_core::platform_api::TokenQuery;
use credd_core::protocol::{PlatformHealth, Scope};
use credd_core::repository::RepositoryRef;
use credd_core::secret::Token;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

pub(crate) use self::outcome::{Got, NotGranted, Unavailable};
pub(crate) use self::policy::CachePolicy;
pub(crate) use self::refresher::Retirement;
use self::state::{Deadline, HeldToken, Now, Requester, State};
pub(crate) use self::store::TokenStore;
use crate::clock::{self, BootClock};
use crate::metrics::Metrics;
use crate::platform::{Grant, PlatformClient, PlatformError, ReportOutcome};

/// The platform calls the cache makes; implemented by [`PlatformClient`]
/// and by test fakes. Cloned once per owner the daemon holds a token for.
pub(crate) trait Fetch: Clone + Send + Sync + 'static {
    /// Asks the platform for the token `query` names.
    fn fetch(&self, query: TokenQuery)
    -> impl Future<Output = Result<Grant, PlatformError>> + Send;

    /// Reports a token git was refused with (its SHA-256).
    fn report_refusal(
        &self,
        sha256: &str,
    ) -> impl Future<Output = Result<ReportOutcome, PlatformError>> + Send;
}

impl Fetch for PlatformClient {
    async fn fetch(&self, query: TokenQuery) -> Result<Grant, PlatformError> {
        PlatformClient::fetch(self, &query).await
    }

    fn report_refusal(
        &self,
        sha256: &str,
    ) -> impl Future<Output = Result<ReportOutcome, PlatformError>> + Send {
        PlatformClient::report_refusal(self, sha256)
    }
}

/// Called with every freshly fetched token and whose it is (the
/// `--on-refresh` hook).
pub(crate) type RefreshHook = Box<dyn Fn(&Token, Whose<'_>) + Send + Sync>;

/// Whose a refreshed token is: what the `--on-refresh` hook is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Whose<'a> {
    /// The workspace's default token, and its account when the platform
    /// stated one.
    Default {
        /// The account, as the platform spells it.
        account: Option<&'a str>,
    },
    /// The token of this account (as the platform spells it, once it has
    /// answered; as first asked for before).
    Owner(&'a str),
}

/// How a keeper lives: the one difference between the default token and an
/// account's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// The workspace's default token, seeded with the bootstrap token and
    /// kept fresh for the daemon's whole life.
    Kept,
    /// `owner`'s token: refreshed only while someone asks for it, dropped
    /// at expiry once nobody did during its whole life (see `OnDemand`), or
    /// at once when the platform refuses the owner (see [`TokenStore`]).
    OnDemand {
        /// The account.
        owner: String,
    },
}

impl Lifecycle {
    /// The account this keeper is for; `None` for the default token.
    fn owner(&self) -> Option<&str> {
        match self {
            Self::Kept => None,
            Self::OnDemand { owner } => Some(owner),
        }
    }
}

/// What belongs to the daemon, not to one token: its counters, start time
/// and `--on-refresh` hook, and the signal its reporters (systemd's
/// `STATUS=`) follow. The [`TokenStore`] owns it; each keeper holds a share.
pub(crate) struct Daemonwide {
    metrics: Metrics,
    started: Instant,
    on_refresh: Option<RefreshHook>,
    /// Bumped whenever any keeper's state changed.
    changed: watch::Sender<u64>,
    boot_clock: BootClock,
}

impl Daemonwide {
    /// Counters from zero, started now, calling `on_refresh` with every new token.
    pub(crate) fn new(on_refresh: Option<RefreshHook>) -> Self {
        Self {
            metrics: Metrics::default(),
            started: Instant::now(),
            on_refresh,
            changed: watch::Sender::new(0),
            boot_clock: clock::boottime,
        }
    }
}

/// One token: held in memory, its refresh schedule and what status reports
/// of it (the daemon's counters are the store's, [`Daemonwide`]).
pub(crate) struct TokenKeeper<F> {
    fetcher: F,
    policy: CachePolicy,
    lifecycle: Lifecycle,
    state: Mutex<State>,
    /// Wakes the refresher for a request outside its schedule.
    wake: Notify,
    /// Bumped whenever something a waiting client cares about changed.
    changed: watch::Sender<u64>,
    boot_clock: BootClock,
    daemon: Arc<Daemonwide>,
}

impl<F: Fetch> TokenKeeper<F> {
    /// A keeper that will call `fetcher`, living by `lifecycle`;
    /// `bootstrap` is the provision-time env token (the default token's).
    pub(crate) fn new(
        fetcher: F,
        policy: CachePolicy,
        lifecycle: Lifecycle,
        bootstrap: Option<Token>,
        daemon: Arc<Daemonwide>,
    ) -> Self {
        let started = Instant::now();
        let boot_clock = daemon.boot_clock;
        let bootstrap = bootstrap.map(|token| HeldToken {
            token,
            deadline: Deadline {
                mono: started + policy.bootstrap_max_age,
                boot: boot_clock() + policy.bootstrap_max_age,
            },
            // The provision-time token's reach is not known.
            scope: Scope::default(),
        });
        Self {
            fetcher,
            policy,
            lifecycle,
            state: Mutex::new(State::new(started, bootstrap)),
            wake: Notify::new(),
            changed: watch::Sender::new(0),
            boot_clock,
            daemon,
        }
    }

    /// The default token's keeper with a daemon of its own (the cache's
    /// unit tests).
    #[cfg(test)]
    fn kept(fetcher: F, policy: CachePolicy, bootstrap: Option<Token>) -> Self {
        Self::new(
            fetcher,
            policy,
            Lifecycle::Kept,
            bootstrap,
            Arc::new(Daemonwide::new(None)),
        )
    }

    /// Reads the suspend-counting clock from `clock` instead (tests simulate
    /// a suspend with it).
    #[cfg(test)]
    fn with_boot_clock(mut self, clock: BootClock) -> Self {
        self.boot_clock = clock;
        self
    }

    /// Both clocks now.
    fn now(&self) -> Now {
        Now {
            mono: Instant::now(),
            boot: (self.boot_clock)(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; if one did, the state
        // is still consistent field by field, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        self.daemon.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The answer from what is held now, if anything is usable: the token,
    /// or `OutOfScope` when its scope does not cover `repository`.
    fn serve(&self, st: &mut State, repository: Option<&RepositoryRef>) -> Option<Served> {
        let usable = st.usable(&self.policy, self.now())?;
        if let Some(repository) = repository
            && !usable.scope.covers(repository)
        {
            return Some(Served::OutOfScope(NotGranted::OutsideScope {
                owner: usable
                    .scope
                    .owner
                    .unwrap_or_else(|| repository.owner().to_owned()),
                repository: repository.clone(),
            }));
        }
        st.report.served += 1;
        st.demand.asked_since_fetch = true;
        Some(Served::Token(outcome::Served {
            token: usable.token,
            expires_at: local_expiry(usable.left),
            source: usable.source,
            scope: usable.scope,
        }))
    }

    /// Whether this is the cache to ask for `owner`'s token: the account of
    /// its last platform token is `owner`; or that token stated no account
    /// (a platform without grants), even once it is gone — a token erased
    /// after a refusal must be replaced here, where the refusal is reported,
    /// not fetched again by a new per-owner cache; or, before any platform
    /// token, it holds a usable one that says nothing about accounts (the
    /// bootstrap token).
    pub(crate) fn speaks_for(&self, owner: &str) -> bool {
        let st = self.lock();
        match &st.held.owner_seen {
            Some(seen) => credd_core::repository::same_name(seen, owner),
            None if st.held.unscoped_seen => true,
            None => st
                .usable(&self.policy, self.now())
                .is_some_and(|u| u.scope.owner.is_none()),
        }
    }

    /// Someone asked for this cache's token (see [`TokenStore`]: called under
    /// its map's lock, so the cache cannot retire in between).
    pub(crate) fn note_asked(&self) {
        self.lock().demand.asked_since_fetch = true;
    }

    /// Whether the token is wanted (see `State::is_wanted`): a per-owner
    /// cache that is must not retire.
    pub(crate) fn is_wanted(&self) -> bool {
        self.lock().is_wanted()
    }

    /// What a client gets when nothing is servable.
    fn unavailable(st: &State, now: Instant) -> Got {
        no_token(
            st,
            (!st.schedule.in_flight).then_some(st.schedule.next_attempt),
            now,
        )
    }

    /// Answers a `get` (for `repository`, when given): the cached token, or
    /// after waiting (bounded) for the refresher, or `Unavailable` with the
    /// last error. A repository outside the held token's scope asks the
    /// refresher to check the grant first ([`Requester::ScopeCheck`], rate
    /// limited): a grant widened since the token was minted is seen on this
    /// request, and `not_granted` comes once the refresher has answered.
    pub(crate) async fn get(&self, repository: Option<&RepositoryRef>) -> Got {
        let deadline = Instant::now() + self.policy.wait_timeout;
        // Subscribed before looking, so no change between look and wait is missed.
        let mut changes = self.changed.subscribe();
        {
            let mut st = self.lock();
            match self.serve(&mut st, repository) {
                Some(Served::Token(served)) => {
                    // A parked per-owner refresher is needed again.
                    if st.demand.parked && !st.demand.retired {
                        st.demand.parked = false;
                        st.schedule.next_attempt = Instant::now();
                        drop(st);
                        self.wake.notify_one();
                    }
                    return Got::Token(served);
                }
                Some(Served::OutOfScope(refused)) if st.demand.retired => {
                    return Got::NotGranted(refused);
                }
                None if st.demand.retired => return Self::unavailable(&st, Instant::now()),
                Some(Served::OutOfScope(_)) => {
                    st.schedule.requested = st.schedule.requested.max(Some(Requester::ScopeCheck));
                }
                None => st.schedule.requested = st.schedule.requested.max(Some(Requester::Client)),
            }
        }
        self.wake.notify_one();
        let _waiting = Waiting::new(self);
        loop {
            {
                let mut st = self.lock();
                let settled = st.demand.retired
                    || (!st.schedule.in_flight && st.schedule.requested.is_none());
                match self.serve(&mut st, repository) {
                    Some(Served::Token(served)) => return Got::Token(served),
                    // The refresher has looked (called, or declined to).
                    Some(Served::OutOfScope(refused)) if settled => {
                        return Got::NotGranted(refused);
                    }
                    Some(Served::OutOfScope(_)) => {}
                    // Nothing will happen before our deadline: say so now.
                    None if st.demand.retired
                        || (settled && st.schedule.next_attempt >= deadline) =>
                    {
                        return Self::unavailable(&st, Instant::now());
                    }
                    None => {}
                }
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                let mut st = self.lock();
                return match self.serve(&mut st, repository) {
                    Some(Served::Token(served)) => Got::Token(served),
                    Some(Served::OutOfScope(refused)) => Got::NotGranted(refused),
                    None => Self::unavailable(&st, Instant::now()),
                };
            }
        }
    }

    /// Frees this per-owner cache's slot if it holds nothing and is waiting
    /// out a back-off: marks it retired and returns what its owner is
    /// answered until the back-off ends (see [`TokenStore`]).
    fn bench(&self) -> Option<Benched> {
        let st = self.lock();
        if st.schedule.in_flight
            || !st.schedule.backing_off
            || st.usable(&self.policy, self.now()).is_some()
        {
            return None;
        }
        Some(self.retire(st))
    }

    /// Marks this cache retired (under `st`, its lock) and wakes the clients
    /// waiting on it, which then answer from what it says until its back-off
    /// ends.
    fn retire(&self, mut st: MutexGuard<'_, State>) -> Benched {
        st.demand.retired = true;
        let benched = Benched::of(&st);
        drop(st);
        self.bump();
        benched
    }

    /// Answers an `erase`: drops the cached (or bootstrap) token if its SHA-256
    /// is `sha256`. The next `get` then fetches a fresh one.
    /// Whether it was dropped; the refresher reports it to the platform
    /// before its next call.
    pub(crate) fn erase(&self, sha256: &Sha256Hex) -> bool {
        let dropped = self.lock().held.erase(sha256);
        if dropped {
            self.bump();
        }
        dropped
    }

    /// SIGHUP: call the platform now, whatever the schedule or back-off.
    ///
    /// Requests made while a call is in flight add one call after it (the
    /// operator may just have rotated the bearer that call already read).
    pub(crate) fn refresh_now(&self) {
        {
            let mut st = self.lock();
            st.schedule.requested = Some(Requester::Operator);
        }
        self.wake.notify_one();
    }
}

/// A client waiting in [`TokenKeeper::get`], counted while it waits
/// (however the wait ends, a dropped future included).
struct Waiting<'a, F: Fetch>(&'a TokenKeeper<F>);

impl<'a, F: Fetch> Waiting<'a, F> {
    fn new(cache: &'a TokenKeeper<F>) -> Self {
        cache.lock().demand.waiting += 1;
        Self(cache)
    }
}

impl<F: Fetch> Drop for Waiting<'_, F> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.demand.waiting = st.demand.waiting.saturating_sub(1);
    }
}

/// What [`TokenKeeper::serve`] found.
enum Served {
    /// The token (served and counted).
    Token(outcome::Served),
    /// A usable token whose scope does not cover the repository: the
    /// refusal from memory.
    OutOfScope(NotGranted),
}

/// What an owner whose cache left its map is answered until `until` (the
/// end of that cache's back-off), without a cache or a platform call.
#[derive(Debug, Clone)]
pub(crate) struct Benched {
    /// When the owner may have a cache (and a platform call) again.
    pub(crate) until: Instant,
    /// Whether the platform refused the owner (else it failed).
    refused: bool,
    last_error: Option<String>,
}

impl Benched {
    /// What `st` says now, kept.
    fn of(st: &State) -> Self {
        Self {
            until: st.schedule.next_attempt,
            refused: st.report.health == PlatformHealth::NotGranted,
            last_error: st.report.last_error.clone(),
        }
    }

    /// The answer at `now`.
    pub(crate) fn answer(&self, now: Instant) -> Got {
        refusal_or_wait(self.refused, self.last_error.clone(), Some(self.until), now)
    }
}

/// What a client gets from a keeper that holds nothing servable: the
/// platform's refusal, or the wait until `next_call` (`None`: a call is in
/// flight).
fn no_token(st: &State, next_call: Option<Instant>, now: Instant) -> Got {
    refusal_or_wait(
        st.report.health == PlatformHealth::NotGranted,
        st.report.last_error.clone(),
        next_call,
        now,
    )
}

fn refusal_or_wait(
    refused: bool,
    last_error: Option<String>,
    next_call: Option<Instant>,
    now: Instant,
) -> Got {
    if refused {
        return Got::NotGranted(NotGranted::Refused { reason: last_error });
    }
    Got::Unavailable(Unavailable::NoToken {
        last_error,
        next_call_in: next_call.map(|at| at.saturating_duration_since(now)),
    })
}

/// A SHA-256 as the protocol writes it, checked by credd-core's one rule
/// (64 lower-case hex digits) where it enters: an erase on the socket, a
/// token the gateway saw refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sha256Hex(String);

impl Sha256Hex {
    /// `text` if it is one.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        credd_core::secret::parse_sha256_hex(text.as_bytes()).map(|_| Self(text.to_owned()))
    }

    /// The SHA-256 of `token`.
    pub(crate) fn of(token: &Token) -> Self {
        Self(token.sha256_hex())
    }
}

/// The scope a cache shows before it holds a token: its owner, if any.
fn scope_of_owner(owner: Option<&str>) -> Scope {
    Scope {
        owner: owner.map(str::to_owned),
        ..Scope::default()
    }
}

/// This machine's wall-clock time `left` from now, Unix seconds: what git
/// compares with its own clock.
fn local_expiry(left: Duration) -> u64 {
    unix_secs(SystemTime::now() + left)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(super) fn human_secs(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}
