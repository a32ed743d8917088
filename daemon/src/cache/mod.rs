//! The token cache and the one task that refreshes it.
//!
//! Why it is shaped like this: every git operation in the workspace asks for a
//! token, but the platform should see about one call per token lifetime. So
//! the cache answers from memory, and a single refresher task owns every
//! platform call and its schedule. Clients never call the platform themselves;
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
//!   ([`TokenCache::refresh_now`]) is the operator's override and always calls.

mod owners;
mod policy;
mod refresher;
mod schedule;
mod state;
mod status;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credd_core::platform_api::TokenQuery;
use credd_core::protocol::{ErrorCode, PlatformHealth, Response, Scope};
use credd_core::repository::RepositoryRef;
use credd_core::secret::Token;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

pub(crate) use self::owners::{Tokens, Want};
pub(crate) use self::policy::CachePolicy;
pub(crate) use self::refresher::Retirement;
use self::state::{Deadline, HeldToken, Now, Requester, State};
use crate::clock::{self, BootClock};
use crate::metrics::Metrics;
use crate::platform::{Grant, PlatformClient, PlatformError, RefusalOutcome};

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
    ) -> impl Future<Output = Result<RefusalOutcome, PlatformError>> + Send;
}

impl Fetch for PlatformClient {
    async fn fetch(&self, query: TokenQuery) -> Result<Grant, PlatformError> {
        PlatformClient::fetch(self, &query).await
    }

    fn report_refusal(
        &self,
        sha256: &str,
    ) -> impl Future<Output = Result<RefusalOutcome, PlatformError>> + Send {
        PlatformClient::report_refusal(self, sha256)
    }
}

/// Called with every freshly fetched token (the `--on-refresh` hook).
pub(crate) type RefreshHook = Box<dyn Fn(&Token) + Send + Sync>;

/// The in-memory token, its refresh schedule and the counters for status.
pub(crate) struct TokenCache<F> {
    fetcher: F,
    policy: CachePolicy,
    /// The account this cache holds a token for; `None` for the default token.
    owner: Option<String>,
    /// A per-owner token is refreshed only while someone asks for it: one
    /// nobody asked for during its whole life is dropped at expiry.
    on_demand: bool,
    state: Mutex<State>,
    /// Wakes the refresher for a request outside its schedule.
    wake: Notify,
    /// Bumped whenever something a waiting client cares about changed.
    changed: watch::Sender<u64>,
    started: Instant,
    on_refresh: Option<RefreshHook>,
    boot_clock: BootClock,
    /// The daemon's counters, shared by every cache (see [`Metrics`]).
    metrics: Arc<Metrics>,
}

impl<F: Fetch> TokenCache<F> {
    /// A cache that will call `fetcher`; `bootstrap` is the provision-time env token.
    pub(crate) fn new(fetcher: F, policy: CachePolicy, bootstrap: Option<Token>) -> Self {
        let started = Instant::now();
        let boot_clock: BootClock = clock::boottime;
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
            owner: None,
            on_demand: false,
            state: Mutex::new(State::new(started, bootstrap)),
            wake: Notify::new(),
            changed: watch::Sender::new(0),
            started,
            on_refresh: None,
            boot_clock,
            metrics: Arc::default(),
        }
    }

    /// A cache for `owner`'s token, refreshed on demand (see [`Tokens`]),
    /// counting into `metrics`.
    pub(crate) fn for_owner(
        fetcher: F,
        policy: CachePolicy,
        owner: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut cache = Self::new(fetcher, policy, None);
        cache.owner = Some(owner);
        cache.on_demand = true;
        cache.metrics = metrics;
        cache
    }

    /// The counters this cache adds to.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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

    /// Runs `hook` after every successful refresh.
    pub(crate) fn with_refresh_hook(mut self, hook: RefreshHook) -> Self {
        self.on_refresh = Some(hook);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; if one did, the state
        // is still consistent field by field, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every state change (for systemd's `STATUS=`).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The answer from what is held now, if anything is usable: the token,
    /// or `not_granted` when its scope does not cover `repository`.
    fn serve(&self, st: &mut State, repository: Option<&RepositoryRef>) -> Option<Served> {
        let usable = st.usable(&self.policy, self.now())?;
        if let Some(repository) = repository
            && !usable.scope.covers(repository)
        {
            return Some(Served::OutOfScope(Response::Error {
                code: ErrorCode::NotGranted,
                message: format!(
                    "the workspace's token for {} does not cover {repository}; ask the platform's operator to add it to the workspace's grant",
                    usable.scope.owner.as_deref().unwrap_or(repository.owner())
                ),
            }));
        }
        st.served += 1;
        st.asked_since_fetch = true;
        Some(Served::Token(Response::Token {
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
        match &st.owner_seen {
            Some(seen) => credd_core::repository::same_name(seen, owner),
            None if st.unscoped_seen => true,
            None => st
                .usable(&self.policy, self.now())
                .is_some_and(|u| u.scope.owner.is_none()),
        }
    }

    /// Someone asked for this cache's token (see [`Tokens`]: called under
    /// its map's lock, so the cache cannot retire in between).
    pub(crate) fn note_asked(&self) {
        self.lock().asked_since_fetch = true;
    }

    /// Whether the token is wanted (see `State::is_wanted`): a per-owner
    /// cache that is must not retire.
    pub(crate) fn is_wanted(&self) -> bool {
        self.lock().is_wanted()
    }

    fn unavailable(st: &State, now: Instant) -> Response {
        if st.health == PlatformHealth::NotGranted {
            return Response::Error {
                code: ErrorCode::NotGranted,
                message: st
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the platform refuses this token".into()),
            };
        }
        let mut message = match &st.last_error {
            Some(error) => format!("no usable token: {error}"),
            None if st.in_flight => {
                "no usable token yet: the platform has not answered in time".to_owned()
            }
            None => "no usable token yet".to_owned(),
        };
        if !st.in_flight {
            let _ = write!(
                message,
                "; next platform call in {}s",
                st.next_attempt.saturating_duration_since(now).as_secs()
            );
        }
        Response::Error {
            code: ErrorCode::Unavailable,
            message,
        }
    }

    /// Answers a `get` (for `repository`, when given): the cached token, or
    /// after waiting (bounded) for the refresher, or `Unavailable` with the
    /// last error. A repository outside the held token's scope asks the
    /// refresher to check the grant first ([`Requester::ScopeCheck`], rate
    /// limited): a grant widened since the token was minted is seen on this
    /// request, and `not_granted` comes once the refresher has answered.
    pub(crate) async fn get(&self, repository: Option<&RepositoryRef>) -> Response {
        let deadline = Instant::now() + self.policy.wait_timeout;
        // Subscribed before looking, so no change between look and wait is missed.
        let mut changes = self.changed.subscribe();
        {
            let mut st = self.lock();
            match self.serve(&mut st, repository) {
                Some(Served::Token(answer)) => {
                    // A parked per-owner refresher is needed again.
                    if st.parked && !st.retired {
                        st.parked = false;
                        st.next_attempt = Instant::now();
                        drop(st);
                        self.wake.notify_one();
                    }
                    return answer;
                }
                Some(Served::OutOfScope(answer)) if st.retired => return answer,
                None if st.retired => return Self::unavailable(&st, Instant::now()),
                Some(Served::OutOfScope(_)) => {
                    st.requested = st.requested.max(Some(Requester::ScopeCheck));
                }
                None => st.requested = st.requested.max(Some(Requester::Client)),
            }
        }
        self.wake.notify_one();
        let _waiting = Waiting::new(self);
        loop {
            {
                let mut st = self.lock();
                let settled = st.retired || (!st.in_flight && st.requested.is_none());
                match self.serve(&mut st, repository) {
                    Some(Served::Token(answer)) => return answer,
                    // The refresher has looked (called, or declined to).
                    Some(Served::OutOfScope(answer)) if settled => return answer,
                    Some(Served::OutOfScope(_)) => {}
                    // Nothing will happen before our deadline: say so now.
                    None if st.retired || (settled && st.next_attempt >= deadline) => {
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
                    Some(Served::Token(answer) | Served::OutOfScope(answer)) => answer,
                    None => Self::unavailable(&st, Instant::now()),
                };
            }
        }
    }

    /// Frees this per-owner cache's slot if it holds nothing and is waiting
    /// out a back-off: marks it retired and returns what its owner is
    /// answered until the back-off ends (see [`Tokens`]).
    fn bench(&self) -> Option<Benched> {
        let st = self.lock();
        if st.in_flight || !st.backing_off || st.usable(&self.policy, self.now()).is_some() {
            return None;
        }
        Some(self.retire(st))
    }

    /// Marks this cache retired (under `st`, its lock) and wakes the clients
    /// waiting on it, which then answer from what it says until its back-off
    /// ends.
    fn retire(&self, mut st: MutexGuard<'_, State>) -> Benched {
        st.retired = true;
        let benched = Benched::of(&st);
        drop(st);
        self.bump();
        benched
    }

    /// Answers an `erase`: drops the cached (or bootstrap) token if its SHA-256
    /// is `sha256`. The next `get` then fetches a fresh one.
    /// Whether it was dropped; the refresher reports it to the platform
    /// before its next call. `sha256` is checked by the caller
    /// ([`is_sha256_hex`]).
    pub(crate) fn erase(&self, sha256: &str) -> bool {
        let dropped = self.lock().erase(sha256);
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
            st.requested = Some(Requester::Operator);
        }
        self.wake.notify_one();
    }
}

/// A client waiting in [`TokenCache::get`], counted while it waits
/// (however the wait ends, a dropped future included).
struct Waiting<'a, F: Fetch>(&'a TokenCache<F>);

impl<'a, F: Fetch> Waiting<'a, F> {
    fn new(cache: &'a TokenCache<F>) -> Self {
        cache.lock().waiting += 1;
        Self(cache)
    }
}

impl<F: Fetch> Drop for Waiting<'_, F> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.waiting = st.waiting.saturating_sub(1);
    }
}

/// What [`TokenCache::serve`] found.
enum Served {
    /// The token (served and counted).
    Token(Response),
    /// A usable token whose scope does not cover the repository: the
    /// `not_granted` answer from memory.
    OutOfScope(Response),
}

/// What an owner whose cache left its map is answered until `until` (the
/// end of that cache's back-off), without a cache or a platform call.
#[derive(Debug, Clone)]
pub(crate) struct Benched {
    /// When the owner may have a cache (and a platform call) again.
    pub(crate) until: Instant,
    code: ErrorCode,
    message: String,
}

impl Benched {
    /// The answer `st` gives now, kept.
    fn of(st: &State) -> Self {
        let code = if st.health == PlatformHealth::NotGranted {
            ErrorCode::NotGranted
        } else {
            ErrorCode::Unavailable
        };
        let message = match (&st.last_error, code) {
            (Some(error), ErrorCode::NotGranted) => error.clone(),
            (None, ErrorCode::NotGranted) => "the platform refuses this token".to_owned(),
            (Some(error), _) => format!("no usable token: {error}"),
            (None, _) => "no usable token yet".to_owned(),
        };
        Self {
            until: st.next_attempt,
            code,
            message,
        }
    }

    /// The answer at `now`.
    pub(crate) fn answer(&self, now: Instant) -> Response {
        let message = if self.code == ErrorCode::NotGranted {
            self.message.clone()
        } else {
            format!(
                "{}; next platform call in {}s",
                self.message,
                self.until.saturating_duration_since(now).as_secs()
            )
        };
        Response::Error {
            code: self.code,
            message,
        }
    }
}

/// Whether `text` is a hex SHA-256 as the protocol writes it (credd-core's
/// one rule: 64 lower-case digits).
pub(crate) fn is_sha256_hex(text: &str) -> bool {
    credd_core::secret::parse_sha256_hex(text.as_bytes()).is_some()
}

/// The `bad_request` answer to an erase without a SHA-256.
fn bad_erase() -> Response {
    Response::Error {
        code: ErrorCode::BadRequest,
        message: "erase needs the 64-hex-digit SHA-256 of the rejected password".into(),
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
