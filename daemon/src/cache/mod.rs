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

mod policy;
mod refresher;
mod schedule;
mod state;
mod status;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credd_core::protocol::{ErrorCode, Response};
use credd_core::secret::Token;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

pub(crate) use self::policy::CachePolicy;
use self::state::{Deadline, HeldToken, Now, Requester, State};
use crate::clock::{self, BootClock};
use crate::platform::{Grant, PlatformClient, PlatformError};

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
        let bootstrap = bootstrap.map(|token| HeldToken {
            token,
            deadline: Deadline {
                mono: started + policy.bootstrap_max_age,
                boot: boot_clock() + policy.bootstrap_max_age,
            },
        });
        Self {
            fetcher,
            policy,
            state: Mutex::new(State::new(started, bootstrap)),
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

    fn serve(&self, st: &mut State) -> Option<Response> {
        let (token, left, source) = st.usable(&self.policy, self.now())?;
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
        let dropped = self.lock().erase(sha256);
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
