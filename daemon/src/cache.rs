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
//! Schedule (see [`refresh_delay`] and [`backoff_delay`]):
//! - after a success, refresh `margin + jitter` before expiry, jitter uniform
//!   in `[0, margin/4]` so a fleet started together spreads out;
//! - a token with less life than that is refreshed at half of its *usable*
//!   life (life above `--min-lifetime`), never sooner than [`MIN_REFRESH_DELAY`];
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
//!   [`CLIENT_CALLS_PER_WINDOW`] times per [`CLIENT_CALL_WINDOW`]. SIGHUP
//!   ([`TokenCache::refresh_now`]) is the operator's override and always calls.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credd_core::platform::{ErrorClass, Grant, PlatformClient, PlatformError};
use credd_core::protocol::{ErrorCode, Response, Source, Status, TokenState};
use credd_core::secret::Token;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::{self, BootClock};

/// Never schedule a refresh sooner than this after the previous one, whatever
/// the platform hands out: the bound that rules out a refresh loop.
pub(crate) const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);
/// Platform calls that clients may cause per [`CLIENT_CALL_WINDOW`].
pub(crate) const CLIENT_CALLS_PER_WINDOW: usize = 4;
/// The sliding window of [`CLIENT_CALLS_PER_WINDOW`].
pub(crate) const CLIENT_CALL_WINDOW: Duration = Duration::from_secs(60);
/// Longest lifetime believed: a platform claiming more (a bad clock, a bug)
/// still gets asked again within a day.
pub(crate) const MAX_TRUSTED_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Longest error text kept for status (chains of transport errors can be long).
const MAX_ERROR_TEXT: usize = 300;

/// One platform call; implemented by [`PlatformClient`] and by test fakes.
pub(crate) trait Fetch: Send + Sync + 'static {
    /// Asks the platform for a token.
    fn fetch(&self) -> impl Future<Output = Result<Grant, PlatformError>> + Send;
}

impl Fetch for PlatformClient {
    fn fetch(&self) -> impl Future<Output = Result<Grant, PlatformError>> + Send {
        PlatformClient::fetch(self)
    }
}

/// Timing knobs, from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CachePolicy {
    /// Refresh this long before expiry (plus jitter).
    pub(crate) refresh_margin: Duration,
    /// Never serve a token with less life left.
    pub(crate) min_lifetime: Duration,
    /// How long a `get` waits for a usable token.
    pub(crate) wait_timeout: Duration,
    /// How long after start the bootstrap (env) token may be served.
    pub(crate) bootstrap_max_age: Duration,
    /// First back-off step.
    pub(crate) backoff_initial: Duration,
    /// Largest back-off step.
    pub(crate) backoff_max: Duration,
}

/// When to refresh a token with `life` left, counted from now.
///
/// `unit` is a uniform random number in `[0, 1)` (the jitter). `unchanged`
/// says the platform just handed out the token we already had: it has not
/// rotated it yet and will only do so closer to expiry, so a short-lived
/// token is then refreshed at 3/4 of its servable life instead of half —
/// with a platform that rotates 5 min before expiry and the default 10 min
/// margin that saves a call per token lifetime and still leaves a quarter of
/// the servable life for retries.
pub(crate) fn refresh_delay(
    life: Duration,
    margin: Duration,
    min_lifetime: Duration,
    unit: f64,
    unchanged: bool,
) -> Duration {
    let jitter = margin.mul_f64(unit.clamp(0.0, 1.0) / 4.0);
    let lead = (margin + jitter).max(min_lifetime);
    // An unrotated token inside the margin (plus the largest jitter) is past
    // its margin refresh already; a fresh jitter draw must not schedule
    // another one seconds later.
    let inside_margin = unchanged && life <= (margin + margin / 4).max(min_lifetime);
    match life.checked_sub(lead) {
        Some(delay) if delay >= MIN_REFRESH_DELAY && !inside_margin => delay,
        // Less life than the margin (the platform refreshes only 5 min before
        // expiry): a fraction of what is still servable.
        _ => {
            let servable = life.saturating_sub(min_lifetime);
            let fraction = if unchanged {
                servable.mul_f64(0.75)
            } else {
                servable / 2
            };
            fraction.max(MIN_REFRESH_DELAY)
        }
    }
}

/// The wait before retry number `attempt` (0-based) after a failure.
///
/// Uniform in `[cap/2, cap]` with `cap = min(max, initial·2^attempt)`;
/// `unit` is uniform in `[0, 1)`.
pub(crate) fn backoff_delay(initial: Duration, max: Duration, attempt: u32, unit: f64) -> Duration {
    let growth = 2u32.saturating_pow(attempt.min(31));
    let cap = initial.saturating_mul(growth).min(max);
    let floor = cap / 2;
    floor + (cap - floor).mul_f64(unit.clamp(0.0, 1.0))
}

/// Platform health in a word, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PlatformHealth {
    /// No call has completed yet.
    Unknown,
    /// The last call succeeded.
    Ok,
    /// The last call failed in a way worth retrying.
    Failing,
    /// The bearer is missing or refused.
    Unauthorized,
    /// The platform has no GitHub App (404).
    NotConfigured,
    /// The platform answers, but with tokens barely above `--min-lifetime`.
    ShortLived,
}

impl PlatformHealth {
    /// The status word (`credd status`).
    pub(crate) fn word(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Ok => "ok",
            Self::Failing => "failing",
            Self::Unauthorized => "unauthorized",
            Self::NotConfigured => "not_configured",
            Self::ShortLived => "short_lived",
        }
    }
}

/// Who asked for a refresh outside the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Requester {
    /// A client found no usable token (rate limited, never overrides back-off).
    Client,
    /// SIGHUP: always calls.
    Operator,
}

/// When a token stops living, on both clocks (see the module docs).
#[derive(Debug, Clone, Copy)]
struct Deadline {
    /// On the monotonic clock (drives timers; stops during suspend).
    mono: Instant,
    /// On [`crate::clock::boottime`] (counts suspend).
    boot: Duration,
}

struct CachedToken {
    token: Token,
    deadline: Deadline,
}

struct BootstrapToken {
    token: Token,
    deadline: Deadline,
}

struct State {
    cached: Option<CachedToken>,
    /// Dropped (and zeroed) once a platform token arrives or its age is up.
    bootstrap: Option<BootstrapToken>,
    health: PlatformHealth,
    last_error: Option<String>,
    last_refresh_at: Option<u64>,
    next_attempt: Instant,
    backing_off: bool,
    in_flight: bool,
    requested: Option<Requester>,
    failures: u32,
    /// Tokens in a row that were servable for less than `--min-lifetime`.
    short_streak: u32,
    unauthorized_retried: bool,
    client_calls: VecDeque<Instant>,
    platform_calls: u64,
    served: u64,
}

/// Called with every freshly fetched token (the `--on-refresh` hook).
pub(crate) type RefreshHook = Box<dyn Fn(&Token) + Send + Sync>;

/// The in-memory token, its refresh schedule and the counters for status.
pub(crate) struct TokenCache<F> {
    fetcher: F,
    policy: CachePolicy,
    state: Mutex<State>,
    /// Wakes the refresher for a request outside its schedule.
    wake: Notify,
    /// Bumped whenever something a waiting client cares about changed.
    changed: watch::Sender<u64>,
    started: Instant,
    on_refresh: Option<RefreshHook>,
    boot_clock: BootClock,
}

impl<F: Fetch> TokenCache<F> {
    /// A cache that will call `fetcher`; `bootstrap` is the provision-time env token.
    pub(crate) fn new(fetcher: F, policy: CachePolicy, bootstrap: Option<Token>) -> Self {
        let started = Instant::now();
        let boot_clock: BootClock = clock::boottime;
        let bootstrap = bootstrap.map(|token| BootstrapToken {
            token,
            deadline: Deadline {
                mono: started + policy.bootstrap_max_age,
                boot: boot_clock() + policy.bootstrap_max_age,
            },
        });
        Self {
            fetcher,
            policy,
            state: Mutex::new(State {
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
            }),
            wake: Notify::new(),
            changed: watch::Sender::new(0),
            started,
            on_refresh: None,
            boot_clock,
        }
    }

    /// Reads the suspend-counting clock from `clock` instead (tests simulate
    /// a suspend with it).
    #[cfg(test)]
    fn with_boot_clock(mut self, clock: BootClock) -> Self {
        self.boot_clock = clock;
        self
    }

    /// Life left until `deadline`: the lesser of the two clocks' answers.
    fn life_left(&self, deadline: Deadline, now: Instant) -> Duration {
        deadline
            .mono
            .saturating_duration_since(now)
            .min(deadline.boot.saturating_sub((self.boot_clock)()))
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

    /// The token to serve now, if any, with its life left: the platform's
    /// while it has at least `min_lifetime` left, else the bootstrap token
    /// while it may be served.
    fn usable(&self, st: &State, now: Instant) -> Option<(Token, Duration, Source)> {
        if let Some(c) = &st.cached {
            let left = self.life_left(c.deadline, now);
            if left >= self.policy.min_lifetime {
                return Some((c.token.clone(), left, Source::Platform));
            }
        }
        let b = st.bootstrap.as_ref()?;
        let left = self.life_left(b.deadline, now);
        (!left.is_zero()).then(|| (b.token.clone(), left, Source::Env))
    }

    fn serve(&self, st: &mut State) -> Option<Response> {
        let (token, left, source) = self.usable(st, Instant::now())?;
        st.served += 1;
        Some(Response::Token {
            token,
            expires_at: local_expiry(left),
            source,
        })
    }

    fn unavailable(st: &State, now: Instant) -> Response {
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

    /// Answers a `get`: the cached token, or after waiting (bounded) for the
    /// refresher, or `Unavailable` with the last error.
    pub(crate) async fn get(&self) -> Response {
        let deadline = Instant::now() + self.policy.wait_timeout;
        // Subscribed before looking, so no change between look and wait is missed.
        let mut changes = self.changed.subscribe();
        {
            let mut st = self.lock();
            if let Some(answer) = self.serve(&mut st) {
                return answer;
            }
            st.requested = st.requested.max(Some(Requester::Client));
        }
        self.wake.notify_one();
        loop {
            {
                let mut st = self.lock();
                if let Some(answer) = self.serve(&mut st) {
                    return answer;
                }
                // Nothing will happen before our deadline: say so now.
                if !st.in_flight && st.requested.is_none() && st.next_attempt >= deadline {
                    return Self::unavailable(&st, Instant::now());
                }
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                let mut st = self.lock();
                return self
                    .serve(&mut st)
                    .unwrap_or_else(|| Self::unavailable(&st, Instant::now()));
            }
        }
    }

    /// Answers an `erase`: drops the cached (or bootstrap) token if its SHA-256
    /// is `sha256`. The next `get` then fetches a fresh one.
    pub(crate) fn erase(&self, sha256: &str) -> Response {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Response::Error {
                code: ErrorCode::BadRequest,
                message: "erase needs the 64-hex-digit SHA-256 of the rejected password".into(),
            };
        }
        let mut st = self.lock();
        let dropped = if st
            .cached
            .as_ref()
            .is_some_and(|c| c.token.matches_sha256_hex(sha256))
        {
            let gone = st.cached.take().map(|c| c.token.fingerprint());
            tracing::info!(
                fingerprint = gone.as_deref().unwrap_or(""),
                "dropped the cached token: a client reported it was refused"
            );
            true
        } else if st
            .bootstrap
            .as_ref()
            .is_some_and(|b| b.token.matches_sha256_hex(sha256))
        {
            let gone = st.bootstrap.take().map(|b| b.token.fingerprint());
            tracing::info!(
                fingerprint = gone.as_deref().unwrap_or(""),
                "dropped the bootstrap token: a client reported it was refused"
            );
            true
        } else {
            tracing::debug!("erase for a token that is not cached: kept the cached one");
            false
        };
        drop(st);
        if dropped {
            self.bump();
        }
        Response::Erased { dropped }
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

    /// The daemon's state for `credd status` (never the token).
    pub(crate) fn status(&self) -> Status {
        let now = Instant::now();
        let st = self.lock();
        let current = self.usable(&st, now);
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_secs: now.duration_since(self.started).as_secs(),
            state: Some(if current.is_some() {
                TokenState::Valid
            } else {
                TokenState::Missing
            }),
            source: current.as_ref().map(|c| c.2),
            fingerprint: current.as_ref().map(|c| c.0.fingerprint()),
            expires_at: current.as_ref().map(|c| local_expiry(c.1)),
            expires_in_secs: current.as_ref().map(|c| c.1.as_secs()),
            next_refresh_in_secs: Some(if st.in_flight {
                0
            } else {
                st.next_attempt.saturating_duration_since(now).as_secs()
            }),
            last_refresh_at: st.last_refresh_at,
            last_error: st.last_error.clone(),
            platform: st.health.word().to_owned(),
            platform_calls: st.platform_calls,
            served: st.served,
        }
    }

    /// One line for systemd's `STATUS=`.
    pub(crate) fn status_line(&self) -> String {
        let status = self.status();
        let mut line = match (status.source, status.expires_in_secs) {
            (Some(Source::Platform), Some(secs)) => {
                format!("token from platform, expires in {}", human_secs(secs))
            }
            (Some(Source::Env), Some(secs)) => {
                format!("bootstrap token from env, served for {}", human_secs(secs))
            }
            _ => "no usable token".to_owned(),
        };
        let _ = write!(line, "; platform {}", status.platform);
        if status.platform != "ok"
            && let Some(error) = &status.last_error
        {
            let _ = write!(line, ": {error}");
        }
        line
    }

    /// Healthy for the systemd watchdog: a token can be served, or the
    /// platform has not (yet) failed.
    pub(crate) fn is_healthy(&self) -> bool {
        let st = self.lock();
        self.usable(&st, Instant::now()).is_some()
            || matches!(
                st.health,
                PlatformHealth::Unknown | PlatformHealth::Ok | PlatformHealth::ShortLived
            )
    }

    /// The refresher: the only caller of the platform. Runs until `cancel`.
    pub(crate) async fn run_refresher(&self, cancel: CancellationToken) {
        loop {
            let next = self.lock().next_attempt;
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
                    if Instant::now() < self.lock().next_attempt {
                        continue;
                    }
                }
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = self.attempt() => {}
            }
        }
    }

    /// Decides whether an out-of-schedule request leads to a call now.
    fn take_request(&self) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(requester) = st.requested.take() else {
            return false;
        };
        let go = match requester {
            Requester::Operator => true,
            // Someone else's call already produced a token, or the platform
            // is failing and the back-off decides.
            Requester::Client if self.usable(&st, now).is_some() || st.backing_off => false,
            // Due anyway (the first call at start): not the client's doing.
            Requester::Client if now >= st.next_attempt => true,
            Requester::Client => {
                while st
                    .client_calls
                    .front()
                    .is_some_and(|&t| now.duration_since(t) >= CLIENT_CALL_WINDOW)
                {
                    st.client_calls.pop_front();
                }
                if st.client_calls.len() < CLIENT_CALLS_PER_WINDOW {
                    st.client_calls.push_back(now);
                    true
                } else {
                    let free_at =
                        st.client_calls.front().copied().unwrap_or(now) + CLIENT_CALL_WINDOW;
                    st.next_attempt = st.next_attempt.min(free_at);
                    tracing::debug!(
                        "clients asked for more than {CLIENT_CALLS_PER_WINDOW} platform calls a minute; next call when the window frees"
                    );
                    false
                }
            }
        };
        drop(st);
        if !go {
            // Waiting clients re-check whether anything can happen before their deadline.
            self.bump();
        }
        go
    }

    /// One platform call and its consequences for the schedule.
    async fn attempt(&self) {
        let sent_at = Deadline {
            mono: Instant::now(),
            boot: (self.boot_clock)(),
        };
        {
            let mut st = self.lock();
            st.in_flight = true;
            st.requested = None;
            st.platform_calls += 1;
        }
        self.bump();
        tracing::debug!("calling the platform");
        let result = self.fetcher.fetch().await;
        let now = Instant::now();
        let mut st = self.lock();
        st.in_flight = false;
        let fresh = match result {
            Ok(grant) => self.accept(&mut st, grant, sent_at, now),
            Err(error) => {
                self.fail(&mut st, &Failure::Platform(&error), now);
                None
            }
        };
        drop(st);
        self.bump();
        if let (Some(token), Some(hook)) = (fresh, &self.on_refresh) {
            hook(&token);
        }
    }

    /// Caches `grant` (or refuses it if it has too little life); returns the
    /// token when it is a new one.
    fn accept(
        &self,
        st: &mut State,
        grant: Grant,
        sent_at: Deadline,
        now: Instant,
    ) -> Option<Token> {
        // Counted from when the request left: the answer cannot be older.
        let lifetime = grant.lifetime.min(MAX_TRUSTED_LIFETIME);
        let deadline = Deadline {
            mono: sent_at.mono + lifetime,
            boot: sent_at.boot + lifetime,
        };
        let life = self.life_left(deadline, now);
        if life < self.policy.min_lifetime.max(MIN_REFRESH_DELAY) {
            self.fail(
                st,
                &Failure::TooShort {
                    life,
                    min: self.policy.min_lifetime,
                },
                now,
            );
            return None;
        }
        let unchanged = st.cached.as_ref().is_some_and(|c| c.token == grant.token);
        let unit = rand::random::<f64>();
        let mut delay = refresh_delay(
            life,
            self.policy.refresh_margin,
            self.policy.min_lifetime,
            unit,
            unchanged,
        );
        // Servable for less than the minimum itself: the platform is handing
        // out nearly dead tokens. Bounded like failures from the second on.
        if life.saturating_sub(self.policy.min_lifetime) < self.policy.min_lifetime {
            st.short_streak = st.short_streak.saturating_add(1);
        } else {
            st.short_streak = 0;
        }
        let short_lived = st.short_streak >= 2;
        if short_lived {
            delay = delay.max(backoff_delay(
                self.policy.backoff_initial,
                self.policy.backoff_max,
                st.short_streak - 2,
                unit,
            ));
        }
        let fingerprint = grant.token.fingerprint();
        tracing::info!(
            fingerprint,
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
        st.cached = Some(CachedToken {
            token: grant.token,
            deadline,
        });
        if st.bootstrap.take().is_some() {
            tracing::info!(
                "the platform's token replaces the bootstrap token from the environment"
            );
        }
        if short_lived {
            let text = format!(
                "the platform handed out {} tokens in a row with only {}s of life (--min-lifetime {}s); next call in {}s",
                st.short_streak,
                life.as_secs(),
                self.policy.min_lifetime.as_secs(),
                delay.as_secs()
            );
            tracing::warn!(error = %text, "platform tokens are too short-lived; backing off");
            st.health = PlatformHealth::ShortLived;
            st.last_error = Some(text);
        } else {
            st.health = PlatformHealth::Ok;
            st.last_error = None;
        }
        st.last_refresh_at = Some(unix_secs(SystemTime::now()));
        st.failures = 0;
        st.unauthorized_retried = false;
        // While short-lived, clients must not bring calls forward either.
        st.backing_off = short_lived;
        st.next_attempt = now + delay;
        token
    }

    fn fail(&self, st: &mut State, failure: &Failure<'_>, now: Instant) {
        let text = failure.describe();
        let class = failure.class();
        let unit = rand::random::<f64>();
        let backoff = |st: &mut State| {
            let d = backoff_delay(
                self.policy.backoff_initial,
                self.policy.backoff_max,
                st.failures,
                unit,
            );
            st.failures = st.failures.saturating_add(1);
            d
        };
        let delay = match class {
            ErrorClass::Unauthorized if !st.unauthorized_retried => {
                // The bearer may have rotated under us: one immediate retry
                // (the next call re-reads the file).
                st.unauthorized_retried = true;
                Duration::ZERO
            }
            ErrorClass::NotConfigured => {
                st.unauthorized_retried = false;
                self.policy.backoff_max.mul_f64(0.75 + unit / 4.0)
            }
            ErrorClass::Unauthorized => backoff(st),
            ErrorClass::Bearer | ErrorClass::Transient => {
                st.unauthorized_retried = false;
                let d = backoff(st);
                d.max(failure.retry_after().unwrap_or_default())
            }
        };
        st.health = match class {
            ErrorClass::Unauthorized | ErrorClass::Bearer => PlatformHealth::Unauthorized,
            ErrorClass::NotConfigured => PlatformHealth::NotConfigured,
            ErrorClass::Transient => PlatformHealth::Failing,
        };
        st.backing_off = true;
        st.next_attempt = now + delay;
        let serving = self.usable(st, now).map(|(_, _, source)| source);
        tracing::warn!(
            error = %text,
            platform = st.health.word(),
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            still_serving = serving.map_or("nothing", |s| match s {
                Source::Platform => "cached platform token",
                Source::Env => "bootstrap token",
            }),
            "platform call failed"
        );
        st.last_error = Some(text);
    }
}

/// Why a call did not produce a servable token.
enum Failure<'a> {
    Platform(&'a PlatformError),
    TooShort { life: Duration, min: Duration },
}

impl Failure<'_> {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Platform(e) => e.class(),
            Self::TooShort { .. } => ErrorClass::Transient,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Platform(e) => e.retry_after(),
            Self::TooShort { .. } => None,
        }
    }

    /// The error chain `a -> b -> c`, bounded. Platform errors never carry
    /// the token, the bearer or the body (credd-core guarantees it).
    fn describe(&self) -> String {
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

/// `error -> source -> source…`
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let _ = write!(text, " -> {e}");
        source = e.source();
    }
    text
}

/// This machine's wall-clock time `left` from now, Unix seconds: what git
/// compares with its own clock.
fn local_expiry(left: Duration) -> u64 {
    unix_secs(SystemTime::now() + left)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn human_secs(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    const M: Duration = Duration::from_secs(600);
    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn refresh_comes_margin_plus_jitter_before_expiry() {
        let life = Duration::from_secs(3600);
        assert_eq!(
            refresh_delay(life, M, MIN, 0.0, false),
            Duration::from_secs(3000)
        );
        let latest = refresh_delay(life, M, MIN, 0.0, false);
        let earliest = refresh_delay(life, M, MIN, 0.999_999, false);
        assert!(
            earliest >= Duration::from_secs(3600 - 600 - 150),
            "{earliest:?}"
        );
        assert!(earliest < latest);
        for i in 0..100 {
            let d = refresh_delay(life, M, MIN, f64::from(i) / 100.0, false);
            assert!(d <= latest && d >= earliest, "{d:?}");
        }
    }

    #[test]
    fn short_lived_tokens_refresh_at_half_their_usable_life_never_in_a_loop() {
        // 90 s of life, 60 s minimum: 30 s servable, refresh after 15 s.
        assert_eq!(
            refresh_delay(Duration::from_secs(90), M, MIN, 0.5, false),
            Duration::from_secs(15)
        );
        // Less than the minimum, or nothing at all: the floor, never zero.
        for life in [0, 1, 30, 60, 61] {
            let d = refresh_delay(Duration::from_secs(life), M, MIN, 0.3, true);
            assert!(d >= MIN_REFRESH_DELAY, "{life}s -> {d:?}");
        }
        // A platform that keeps handing out the same token: the delays
        // shrink geometrically to the floor, so the calls before the token
        // becomes unservable are few.
        let mut life = Duration::from_secs(290);
        let mut calls = 0;
        while life > MIN {
            life = life.saturating_sub(refresh_delay(life, M, MIN, 0.5, true));
            calls += 1;
        }
        assert!(calls <= 10, "{calls} calls");
    }

    #[test]
    fn an_unrotated_token_is_refreshed_late_enough_to_meet_the_platforms_window() {
        // The platform rotates 5 min before expiry. At 10..12.5 min before
        // expiry it hands back the same token; the next call must land under
        // its window, so one more call brings the new token.
        for unit in [0.0, 0.5, 0.999] {
            let life = M + M.mul_f64(unit / 4.0);
            let delay = refresh_delay(life, M, MIN, unit, true);
            let left = life - delay;
            assert!(left < Duration::from_secs(300), "{unit}: {left:?} left");
            assert!(
                left >= MIN + (life - MIN) / 4,
                "{unit}: retry slack {left:?}"
            );
        }
        // Whatever the new jitter draw says.
        for unit in [0.0, 0.999] {
            let life = Duration::from_secs(651);
            let delay = refresh_delay(life, M, MIN, unit, true);
            assert_eq!(delay, (life - MIN).mul_f64(0.75), "{unit}");
        }
        // A token that is new to us: half, as before.
        assert_eq!(
            refresh_delay(Duration::from_secs(540), M, MIN, 0.0, false),
            Duration::from_secs(240)
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let initial = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        assert_eq!(
            backoff_delay(initial, max, 0, 0.0),
            Duration::from_millis(500)
        );
        assert_eq!(backoff_delay(initial, max, 0, 1.0), initial);
        assert_eq!(backoff_delay(initial, max, 3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff_delay(initial, max, 3, 0.0), Duration::from_secs(4));
        for attempt in [0, 1, 5, 8, 9, 20, 31, 1000] {
            let cap = initial
                .saturating_mul(2u32.saturating_pow(attempt.min(31)))
                .min(max);
            for unit in [0.0, 0.25, 0.5, 0.999] {
                let d = backoff_delay(initial, max, attempt, unit);
                assert!(d >= cap / 2 && d <= cap, "{attempt} {unit}: {d:?}");
            }
        }
        assert_eq!(backoff_delay(initial, max, 1000, 1.0), max);
        // Jitter spreads: two draws differ.
        assert_ne!(
            backoff_delay(initial, max, 6, 0.1),
            backoff_delay(initial, max, 6, 0.9)
        );
    }

    /// A platform double: answers from a script, counts calls, and can hold
    /// a call until released.
    struct FakePlatform {
        calls: AtomicUsize,
        script: Mutex<VecDeque<Result<Duration, PlatformError>>>,
        gate: tokio::sync::Semaphore,
    }

    impl FakePlatform {
        fn new(script: Vec<Result<Duration, PlatformError>>, open: bool) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicUsize::new(0),
                script: Mutex::new(script.into()),
                gate: tokio::sync::Semaphore::new(if open {
                    tokio::sync::Semaphore::MAX_PERMITS
                } else {
                    0
                }),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Fetch for Arc<FakePlatform> {
        async fn fetch(&self) -> Result<Grant, PlatformError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            // Each call consumes a permit: a test can let calls through one by one.
            self.gate.acquire().await.expect("gate open").forget();
            let next = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Ok(Duration::from_secs(3600)));
            next.map(|lifetime| Grant {
                token: Token::new(format!("ghs_fake{n}")).unwrap(),
                expires_at: SystemTime::now() + lifetime,
                lifetime,
            })
        }
    }

    /// Like the real platform: caches a 60-min token and rotates it only
    /// when less than 5 min are left.
    #[derive(Default)]
    struct RotatingPlatform {
        calls: AtomicUsize,
        minted: AtomicUsize,
        current: Mutex<Option<(Token, Instant)>>,
    }

    impl Fetch for Arc<RotatingPlatform> {
        async fn fetch(&self) -> Result<Grant, PlatformError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now = Instant::now();
            let mut current = self.current.lock().unwrap();
            let stale = current.as_ref().is_none_or(|(_, expiry)| {
                expiry.saturating_duration_since(now) <= Duration::from_secs(300)
            });
            if stale {
                let n = self.minted.fetch_add(1, Ordering::SeqCst);
                let token = Token::new(format!("ghs_rotated{n}")).unwrap();
                *current = Some((token, now + Duration::from_secs(3600)));
            }
            let (token, expiry) = current.clone().expect("minted");
            let lifetime = expiry.saturating_duration_since(now);
            Ok(Grant {
                token,
                expires_at: SystemTime::now() + lifetime,
                lifetime,
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn two_calls_per_token_lifetime_against_a_platform_that_rotates_late() {
        let platform = Arc::new(RotatingPlatform::default());
        let cache = Arc::new(TokenCache::new(Arc::clone(&platform), policy(), None));
        let cancel = CancellationToken::new();
        let refresher = Arc::clone(&cache);
        let c = cancel.clone();
        tokio::spawn(async move { refresher.run_refresher(c).await });
        // Ten hours of clients asking every minute: never without a token.
        for _ in 0..600 {
            let answer = cache.get().await;
            assert!(matches!(answer, Response::Token { .. }), "{answer:?}");
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        let minted = platform.minted.load(Ordering::SeqCst);
        let calls = platform.calls.load(Ordering::SeqCst);
        assert!(minted >= 10, "{minted} tokens in 10 h");
        assert!(calls <= 2 * minted, "{calls} calls for {minted} tokens");
        cancel.cancel();
    }

    fn policy() -> CachePolicy {
        CachePolicy {
            refresh_margin: M,
            min_lifetime: MIN,
            wait_timeout: Duration::from_secs(4),
            bootstrap_max_age: Duration::from_secs(3000),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }

    fn start(
        platform: &Arc<FakePlatform>,
        policy: CachePolicy,
        bootstrap: Option<&str>,
    ) -> (Arc<TokenCache<Arc<FakePlatform>>>, CancellationToken) {
        // tokio's paused clock drives these tests; a boot clock that stands
        // still leaves every deadline to it (suspend has its own test).
        start_with_boot_clock(platform, policy, bootstrap, || Duration::ZERO)
    }

    fn start_with_boot_clock(
        platform: &Arc<FakePlatform>,
        policy: CachePolicy,
        bootstrap: Option<&str>,
        boot_clock: BootClock,
    ) -> (Arc<TokenCache<Arc<FakePlatform>>>, CancellationToken) {
        let cache = Arc::new(
            TokenCache::new(
                Arc::clone(platform),
                policy,
                bootstrap.map(|b| Token::new(b.into()).unwrap()),
            )
            .with_boot_clock(boot_clock),
        );
        let cancel = CancellationToken::new();
        let refresher = Arc::clone(&cache);
        let c = cancel.clone();
        tokio::spawn(async move { refresher.run_refresher(c).await });
        (cache, cancel)
    }

    fn token_of(r: &Response) -> (String, Source) {
        match r {
            Response::Token { token, source, .. } => (token.expose().to_owned(), *source),
            other => panic!("expected a token, got {other:?}"),
        }
    }

    fn server_error() -> PlatformError {
        PlatformError::Server {
            status: 500,
            retry_after: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_gets_on_an_empty_cache_share_one_call() {
        let platform = FakePlatform::new(vec![], false);
        let (cache, cancel) = start(&platform, policy(), None);
        let gets: Vec<_> = (0..100)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move { cache.get().await })
            })
            .collect();
        tokio::task::yield_now().await;
        platform.gate.add_permits(1000);
        for get in gets {
            assert_eq!(token_of(&get.await.unwrap()).0, "ghs_fake0");
        }
        assert_eq!(platform.calls(), 1);
        assert_eq!(cache.status().served, 100);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_of_expiry_once_per_lifetime() {
        let platform = FakePlatform::new(vec![], true);
        let (cache, cancel) = start(&platform, policy(), None);
        assert_eq!(token_of(&cache.get().await).0, "ghs_fake0");
        // 50 minutes later, no second call yet (refresh at 47.5..50 min).
        tokio::time::sleep(Duration::from_secs(47 * 60)).await;
        assert_eq!(platform.calls(), 1);
        tokio::time::sleep(Duration::from_secs(3 * 60 + 1)).await;
        assert_eq!(platform.calls(), 2);
        assert_eq!(token_of(&cache.get().await).0, "ghs_fake1");
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_keep_serving_the_cached_token() {
        let platform = FakePlatform::new(
            vec![
                Ok(Duration::from_secs(3600)),
                Err(server_error()),
                Err(server_error()),
                Err(server_error()),
            ],
            true,
        );
        let (cache, cancel) = start(&platform, policy(), None);
        cache.get().await;
        cache.refresh_now();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(platform.calls(), 2);
        // While failing: served from cache, no call per client.
        for _ in 0..50 {
            assert_eq!(token_of(&cache.get().await).0, "ghs_fake0");
        }
        assert_eq!(platform.calls(), 2);
        let status = cache.status();
        assert_eq!(status.platform, "failing");
        assert!(status.last_error.as_deref().unwrap().contains("500"));
        // Back-off: the next calls come after ≥0.5 s, then ≥1 s, then ≥2 s.
        tokio::time::sleep(Duration::from_millis(499)).await;
        assert_eq!(platform.calls(), 2);
        tokio::time::sleep(Duration::from_millis(502)).await;
        assert_eq!(platform.calls(), 3);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(platform.calls() >= 4);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(cache.status().platform, "ok");
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn unauthorized_is_retried_once_then_backs_off() {
        let unauthorized = || PlatformError::Unauthorized {
            status: 401,
            path: "/configs/.auth_token".into(),
        };
        let platform = FakePlatform::new((0..10).map(|_| Err(unauthorized())).collect(), true);
        let mut p = policy();
        p.backoff_initial = Duration::from_secs(3600);
        p.backoff_max = Duration::from_secs(3600);
        let (cache, cancel) = start(&platform, p, None);
        let answer = cache.get().await;
        assert!(
            matches!(answer, Response::Error { code: ErrorCode::Unavailable, ref message } if message.contains("401")),
            "{answer:?}"
        );
        assert_eq!(platform.calls(), 2, "one immediate retry");
        assert_eq!(cache.status().platform, "unauthorized");
        // Clients cannot override the back-off.
        for _ in 0..10 {
            cache.get().await;
        }
        assert_eq!(platform.calls(), 2);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_and_not_configured_wait_long() {
        let platform = FakePlatform::new(
            vec![
                Err(PlatformError::RateLimited {
                    retry_after: Some(Duration::from_secs(30)),
                }),
                Err(PlatformError::NotConfigured),
            ],
            true,
        );
        let (cache, cancel) = start(&platform, policy(), None);
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(platform.calls(), 1, "Retry-After: 30 honoured");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(platform.calls(), 2);
        assert_eq!(cache.status().platform, "not_configured");
        // 404: at least 3/4 of the 5 min cap.
        tokio::time::sleep(Duration::from_secs(223)).await;
        assert_eq!(platform.calls(), 2);
        tokio::time::sleep(Duration::from_secs(80)).await;
        assert_eq!(platform.calls(), 3);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn bootstrap_is_served_until_the_platform_answers_or_its_age_is_up() {
        let platform = FakePlatform::new((0..10_000).map(|_| Err(server_error())).collect(), true);
        let mut p = policy();
        p.bootstrap_max_age = Duration::from_secs(600);
        let (cache, cancel) = start(&platform, p, Some("ghs_bootstrap"));
        let (token, source) = token_of(&cache.get().await);
        assert_eq!((token.as_str(), source), ("ghs_bootstrap", Source::Env));
        assert_eq!(cache.status().source, Some(Source::Env));
        tokio::time::sleep(Duration::from_secs(601)).await;
        assert!(matches!(
            cache.get().await,
            Response::Error {
                code: ErrorCode::Unavailable,
                ..
            }
        ));
        cancel.cancel();

        let platform = FakePlatform::new(vec![], true);
        let (cache, cancel) = start(&platform, policy(), Some("ghs_bootstrap"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            token_of(&cache.get().await),
            ("ghs_fake0".into(), Source::Platform)
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn erase_drops_only_a_matching_token_and_clients_are_rate_limited() {
        let platform = FakePlatform::new(vec![], true);
        let (cache, cancel) = start(&platform, policy(), None);
        let (first, _) = token_of(&cache.get().await);
        let other = credd_core::secret::sha256_hex(b"something else");
        assert_eq!(cache.erase(&other), Response::Erased { dropped: false });
        assert!(matches!(
            cache.erase("not-hex"),
            Response::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ));
        // Erase after erase: only CLIENT_CALLS_PER_WINDOW client-caused calls a minute.
        let mut current = first;
        for _ in 0..(CLIENT_CALLS_PER_WINDOW + 3) {
            let hash = credd_core::secret::sha256_hex(current.as_bytes());
            assert_eq!(cache.erase(&hash), Response::Erased { dropped: true });
            assert_eq!(cache.status().state, Some(TokenState::Missing));
            match cache.get().await {
                Response::Token { token, .. } => current = token.expose().to_owned(),
                Response::Error { .. } => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(platform.calls(), 1 + CLIENT_CALLS_PER_WINDOW);
        // The window frees up: the next call happens without a client.
        tokio::time::sleep(CLIENT_CALL_WINDOW + Duration::from_secs(1)).await;
        assert_eq!(platform.calls(), 2 + CLIENT_CALLS_PER_WINDOW);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_below_the_minimum_life_is_never_served() {
        let platform = FakePlatform::new(
            (0..1000).map(|_| Ok(Duration::from_secs(20))).collect(),
            true,
        );
        let (cache, cancel) = start(&platform, policy(), None);
        let answer = cache.get().await;
        assert!(
            matches!(answer, Response::Error { code: ErrorCode::Unavailable, ref message } if message.contains("min-lifetime")),
            "{answer:?}"
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        // Backed off (≥0.5 s, ≥1 s, ≥2 s, …) rather than looping.
        assert!(platform.calls() < 10, "{}", platform.calls());
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn sighup_overrides_the_back_off_and_many_make_one_follow_up_call() {
        let platform = FakePlatform::new(vec![Err(server_error())], false);
        let mut p = policy();
        p.backoff_initial = Duration::from_secs(3600);
        p.backoff_max = Duration::from_secs(3600);
        let (cache, cancel) = start(&platform, p, None);
        platform.gate.add_permits(1);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(platform.calls(), 1);
        assert!(cache.status().next_refresh_in_secs.unwrap() >= 1800);
        // The operator's override: a call now, whatever the back-off says.
        cache.refresh_now();
        platform.gate.add_permits(1);
        assert_eq!(token_of(&cache.get().await).0, "ghs_fake1");
        assert_eq!(platform.calls(), 2);
        // SIGHUPs during a call (it may have read the old bearer) lead to one
        // more call after it, not one each.
        cache.refresh_now();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(platform.calls(), 3, "in flight");
        for _ in 0..5 {
            cache.refresh_now();
        }
        platform.gate.add_permits(10);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(platform.calls(), 4);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn status_and_health_follow_the_token() {
        let platform = FakePlatform::new(
            std::iter::once(Ok(Duration::from_secs(3600)))
                .chain((0..1000).map(|_| Err(server_error())))
                .collect(),
            true,
        );
        let (cache, cancel) = start(&platform, policy(), None);
        cache.get().await;
        let status = cache.status();
        assert_eq!(status.state, Some(TokenState::Valid));
        assert_eq!(status.source, Some(Source::Platform));
        assert_eq!(status.expires_in_secs, Some(3600));
        assert_eq!(status.platform, "ok");
        assert_eq!((status.platform_calls, status.served), (1, 1));
        let next = status.next_refresh_in_secs.expect("scheduled");
        assert!((2850..=3000).contains(&next), "{next}");
        let line = cache.status_line();
        assert!(
            line.starts_with("token from platform, expires in 1h"),
            "{line}"
        );
        assert!(!line.contains("ghs_"), "{line}");
        assert!(cache.is_healthy());

        // The refresh fails from then on: healthy while the token is
        // servable, not once it is gone.
        tokio::time::sleep(Duration::from_secs(3600 - 59)).await;
        let status = cache.status();
        assert_eq!(status.state, Some(TokenState::Missing));
        assert_eq!(status.platform, "failing");
        assert!(!cache.is_healthy());
        let line = cache.status_line();
        assert!(
            line.starts_with("no usable token; platform failing: "),
            "{line}"
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_get_waits_at_most_the_wait_timeout() {
        let platform = FakePlatform::new(vec![], false);
        let (cache, cancel) = start(&platform, policy(), None);
        let started = Instant::now();
        let answer = cache.get().await;
        assert!(matches!(
            answer,
            Response::Error {
                code: ErrorCode::Unavailable,
                ..
            }
        ));
        assert_eq!(started.elapsed(), policy().wait_timeout);
        assert_eq!(platform.calls(), 1);
        assert_eq!(cache.status().next_refresh_in_secs, Some(0));
        cancel.cancel();
    }

    /// Seconds the simulated machine has been suspended (read by
    /// [`suspended_clock`]); only the suspend test moves it.
    static SUSPENDED_SECS: AtomicU64 = AtomicU64::new(0);

    fn suspended_clock() -> Duration {
        Duration::from_secs(SUSPENDED_SECS.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn a_suspend_longer_than_the_life_left_makes_the_token_unservable() {
        let platform = FakePlatform::new(
            (0..4).map(|_| Ok(Duration::from_secs(3600))).collect(),
            true,
        );
        let (cache, cancel) = start_with_boot_clock(&platform, policy(), None, suspended_clock);
        let (first, _) = token_of(&cache.get().await);
        assert_eq!(platform.calls(), 1);
        // The machine sleeps 70 minutes; the monotonic (paused) clock does
        // not move, exactly as CLOCK_MONOTONIC does not during suspend.
        SUSPENDED_SECS.store(70 * 60, Ordering::SeqCst);
        assert_eq!(cache.status().state, Some(TokenState::Missing));
        let (second, _) = token_of(&cache.get().await);
        assert_ne!(
            first, second,
            "the dead token is never served after the wake"
        );
        assert_eq!(platform.calls(), 2);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn served_expiry_is_this_machines_clock_plus_the_life_left() {
        let platform = FakePlatform::new(vec![Ok(Duration::from_secs(3600))], true);
        let (cache, cancel) = start(&platform, policy(), None);
        let Response::Token { expires_at, .. } = cache.get().await else {
            panic!("a token");
        };
        let expected = unix_secs(SystemTime::now() + Duration::from_secs(3600));
        assert!(
            expires_at.abs_diff(expected) <= 2,
            "{expires_at} vs local now + 3600 s = {expected}"
        );
        assert_eq!(
            cache.status().expires_at.map(|e| e.abs_diff(expected) <= 2),
            Some(true)
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_barely_above_the_minimum_life_are_fetched_at_a_bounded_rate() {
        // A platform that hands out fresh 61-s tokens forever (min 60 s).
        let platform = FakePlatform::new(
            (0..2000)
                .map(|_| Ok(MIN + Duration::from_secs(1)))
                .collect(),
            true,
        );
        let (cache, cancel) = start(&platform, policy(), None);
        cache.get().await;
        tokio::time::sleep(Duration::from_secs(20 * 60)).await;
        let calls = platform.calls();
        // Unbounded, that is one call a second (1,200); with the back-off
        // (initial 1 s doubling to the 5-min cap) it is a few dozen at most.
        assert!(calls <= 30, "{calls} platform calls in 20 minutes");
        assert!(calls >= 5, "still asks: {calls}");
        let status = cache.status();
        assert_eq!(status.platform, "short_lived", "{status:?}");
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("in a row")),
            "{status:?}"
        );
        cancel.cancel();
    }
}
