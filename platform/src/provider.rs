//! The token provider contract and the cache that keeps providers honest.
//!
//! Upstream's first fallback minted a fresh GitHub token on every request: a
//! stampede against GitHub under load. Here every provider answers through a
//! [`TokenCache`], which is where the contract lives:
//!
//! - it never returns a token that has expired;
//! - a token inside the refresh window is replaced before answering (the old
//!   one is still served when the refresh fails and it has not expired);
//! - any number of concurrent callers share one upstream call (single
//!   flight), and callers that queued behind a failed call share its error
//!   instead of retrying one after another.
//!
//! The trait returns a boxed future so it stays object safe: the registry and
//! the service hold providers as `Arc<dyn TokenProvider>`.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::grants::Scope;

/// How long before expiry a cached token is replaced (GitHub's own plugin
/// uses the same five minutes).
pub const REFRESH_WINDOW: Duration = Duration::from_secs(5 * 60);

/// The most remaining life a caller may demand of a cached token
/// (`min_remaining_secs`). A demand close to a token's whole life would make
/// every call mint; this cap (and half the token's life, whichever is less)
/// keeps a misbehaving or hostile client from turning the cache off.
pub const MAX_MIN_REMAINING: Duration = Duration::from_secs(30 * 60);

/// After a failed upstream call, how long further callers get the same error
/// without a new call, so a failing upstream sees a few calls a minute at
/// most whatever the request rate.
pub const FAILURE_COOLDOWN: Duration = Duration::from_secs(2);

/// A token together with the expiry its issuer stated.
///
/// `Debug` redacts the token (it is a [`SecretString`]).
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The token itself.
    pub token: SecretString,
    /// When the issuer says it stops working.
    pub expires_at: Timestamp,
}

impl IssuedToken {
    /// A short, non-reversible fingerprint (first 12 hex digits of the
    /// SHA-256) for logs that must tell tokens apart without showing them.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.token.expose_secret())
    }
}

/// The fingerprint of `secret` (credd-core's one rule).
pub(crate) use credd_core::secret::fingerprint;

/// Whether the SHA-256 of `token`'s text is `sha256` (constant time).
fn digest_matches(token: &IssuedToken, sha256: &[u8; 32]) -> bool {
    secret_matches(token.token.expose_secret(), sha256)
}

/// Whether the SHA-256 of `secret` is `sha256` (constant time).
pub(crate) fn secret_matches(secret: &str, sha256: &[u8; 32]) -> bool {
    let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    bool::from(subtle::ConstantTimeEq::ct_eq(&digest[..], &sha256[..]))
}

/// Why a provider could not produce a token. Never contains a token, a JWT or
/// an upstream response body.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProviderError {
    /// Upstream answered with a non-success HTTP status.
    #[error("upstream answered HTTP {status}{}", detail_suffix(.detail))]
    UpstreamStatus {
        /// The HTTP status code.
        status: u16,
        /// Upstream's own short explanation (GitHub's `message`), sanitised.
        detail: Option<String>,
    },
    /// Upstream did not answer in time.
    #[error("upstream did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Upstream could not be reached (DNS, connect, TLS, reset).
    #[error("cannot reach upstream: {0}")]
    Transport(String),
    /// Upstream answered 2xx with something that is not a usable token.
    #[error("malformed upstream answer: {0}")]
    Malformed(String),
    /// The provider is misconfigured (bad key, bad URL, bad id).
    #[error("configuration: {0}")]
    Config(String),
    /// The GitHub App is not installed on this account.
    #[error("the GitHub App is not installed on account {0}")]
    NotInstalled(String),
    /// GitHub answered 404 for the installation: it was removed (the App
    /// uninstalled from its account).
    #[error("the GitHub App's installation {0} no longer exists")]
    InstallationGone(u64),
    /// GitHub refuses this token for a reason only a change of the grant or
    /// of the installation fixes: 422 (a repository the installation does
    /// not reach, a permission it lacks), 403 (the installation suspended).
    #[error("GitHub refuses this token (HTTP {status}): {reason}")]
    Refused {
        /// GitHub's status.
        status: u16,
        /// GitHub's `message` (and `errors`), sanitised.
        reason: String,
    },
    /// GitHub rate limits the App: nothing is asked of GitHub before
    /// `until`.
    #[error("GitHub rate limits the App until {until}")]
    RateLimited {
        /// When GitHub may be asked again.
        until: Timestamp,
        /// How long that was from when the error was made (on the
        /// provider's clock): the caller's `Retry-After`.
        wait: Duration,
    },
}

fn detail_suffix(detail: &Option<String>) -> String {
    match detail {
        Some(d) => format!(" ({d})"),
        None => String::new(),
    }
}

impl ProviderError {
    /// A stable one-word class for logs and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Self::UpstreamStatus { .. } => "upstream_status",
            Self::Timeout(_) => "timeout",
            Self::Transport(_) => "transport",
            Self::Malformed(_) => "malformed",
            Self::Config(_) => "config",
            Self::NotInstalled(_) => "not_installed",
            Self::InstallationGone(_) => "installation_gone",
            Self::Refused { .. } => "refused",
            Self::RateLimited { .. } => "rate_limited",
        }
    }

    /// Whether this failure still stands at `now`: a rate limit does not
    /// outlive its end (then GitHub may be asked again at once), anything
    /// else does (until its cool-down).
    pub fn stands_at(&self, now: Timestamp) -> bool {
        match self {
            Self::RateLimited { until, .. } => *until > now,
            _ => true,
        }
    }

    /// Whether GitHub said this definitively: asking again soon gets the
    /// same answer, so it is remembered for [`DEFINITIVE_COOLDOWN`] rather
    /// than [`FAILURE_COOLDOWN`] (a rate limit is held to its own end).
    pub fn is_definitive(&self) -> bool {
        matches!(
            self,
            Self::NotInstalled(_) | Self::InstallationGone(_) | Self::Refused { .. }
        )
    }
}

/// How long a definitive refusal from GitHub ([`ProviderError::is_definitive`])
/// is answered from memory: a fleet of workspaces asking for a token GitHub
/// refuses costs one mint per this interval, and a fix on GitHub's side
/// (installing the App, granting a permission) shows within it.
pub const DEFINITIVE_COOLDOWN: Duration = Duration::from_secs(30);

/// The future a [`TokenProvider`] returns.
pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<IssuedToken, ProviderError>> + Send + 'a>>;

/// Something that hands out a current GitHub token.
///
/// Contract: never returns an expired token; when its cached token is inside
/// the refresh window it obtains a new one before answering; concurrent
/// callers share one upstream call. Implementations get this by answering
/// through a [`TokenCache`].
pub trait TokenProvider: Send + Sync {
    /// The current token and its expiry.
    fn token(&self) -> TokenFuture<'_>;

    /// A token for `request`: its scope (`None`: the configured installation,
    /// unscoped, as [`TokenProvider::token`]) with at least its
    /// `min_remaining` of life when the cache can tell.
    ///
    /// The default serves unscoped requests from [`TokenProvider::token`]
    /// and refuses scoped ones (a provider that cannot down-scope must never
    /// hand out a broader token).
    fn scoped_token(&self, request: TokenRequest) -> ServedFuture<'_> {
        Box::pin(async move {
            if request.scope.is_some() {
                return Err(ProviderError::Config(
                    "this token provider cannot mint tokens scoped by a grant".into(),
                ));
            }
            let issued = self.token().await?;
            Ok(ServedToken::unscoped(issued))
        })
    }

    /// `workspace` reports that GitHub refused the token whose SHA-256 is
    /// `sha256`; `scopes` are those the workspace may use (`None`: the
    /// unscoped one). A matching cached token is dropped, at most once per
    /// workspace and installation per [`REFUSAL_INTERVAL`]. The default
    /// does nothing.
    fn report_refusal(
        &self,
        workspace: String,
        scopes: Vec<Option<Scope>>,
        sha256: [u8; 32],
    ) -> RefusalFuture<'_> {
        let _ = (workspace, scopes, sha256);
        Box::pin(async { RefusalOutcome::NoMatch })
    }
}

/// [`TokenProvider::token`] for a provider that serves every request
/// through one scoped path: the unscoped request's token.
pub(crate) fn unscoped_token<'a>(
    served: impl Future<Output = Result<ServedToken, ProviderError>> + Send + 'a,
) -> TokenFuture<'a> {
    Box::pin(async move { served.await.map(|served| served.issued) })
}

/// What a caller asks a provider for.
#[derive(Clone, Debug, Default)]
pub struct TokenRequest {
    /// `None`: the configured installation, unscoped.
    pub scope: Option<Scope>,
    /// The least remaining life the caller accepts of a cached token
    /// (clamped, see [`MAX_MIN_REMAINING`]).
    pub min_remaining: Duration,
}

/// A token with the scope it was minted for.
#[derive(Clone, Debug)]
pub struct ServedToken {
    /// The token and its expiry.
    pub issued: IssuedToken,
    /// The account it is for, when known.
    pub owner: Option<String>,
    /// `OWNER/NAME` of each repository it covers; `None`: all of the
    /// installation's.
    pub repositories: Option<Vec<String>>,
    /// Its permissions, as GitHub's answer states them (or the grant's).
    pub permissions: BTreeMap<String, String>,
}

impl ServedToken {
    /// `issued` for an unknown owner, every repository, unknown permissions.
    pub fn unscoped(issued: IssuedToken) -> Self {
        Self {
            issued,
            owner: None,
            repositories: None,
            permissions: BTreeMap::new(),
        }
    }
}

/// The future [`TokenProvider::scoped_token`] returns.
pub type ServedFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ServedToken, ProviderError>> + Send + 'a>>;

/// The future [`TokenProvider::report_refusal`] returns.
pub type RefusalFuture<'a> = Pin<Box<dyn Future<Output = RefusalOutcome> + Send + 'a>>;

/// What a refusal report did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalOutcome {
    /// The refused token was cached and is dropped: the next call mints.
    Dropped,
    /// No cached token of the workspace's scopes matches: nothing changed.
    NoMatch,
    /// It matches, but this workspace had a token of its installation
    /// dropped less than [`REFUSAL_INTERVAL`] ago: try again after this
    /// long.
    Limited {
        /// Until the workspace may have a token of the installation dropped
        /// again.
        retry_after: Duration,
    },
}

/// At most one refused token is dropped per (workspace, installation) per
/// this interval, so no workspace can make the platform hammer GitHub by
/// reporting refusals: a real revocation needs one drop, and a token GitHub
/// keeps refusing after a fresh mint is not fixed by minting faster.
///
/// Why per workspace and not per installation: with one window per
/// installation, any workspace on it that kept refusing its own token kept
/// the window busy, and every other workspace of the installation was
/// handed its refused token straight back. Keyed by workspace, a
/// workspace's reports can only ever limit its own.
pub const REFUSAL_INTERVAL: Duration = Duration::from_secs(30);

/// Where "now" comes from: the system clock in production, a controllable
/// one in tests of the refresh window.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Timestamp + Send + Sync>);

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self(Arc::new(Timestamp::now))
    }

    /// A clock reading `now()` from `f`.
    pub fn from_fn(f: impl Fn() -> Timestamp + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

#[derive(Clone)]
struct Cached {
    token: IssuedToken,
    obtained_at: Timestamp,
}

#[derive(Default)]
struct Attempts {
    /// Completed upstream attempts, successful or not.
    completed: u64,
    /// The last failed attempt, when it is the most recent one.
    last_failure: Option<(Timestamp, ProviderError)>,
}

/// A cached token with single-flight refresh: the heart of the
/// [`TokenProvider`] contract.
pub struct TokenCache {
    current: RwLock<Option<Cached>>,
    attempts: Mutex<Attempts>,
    refresh: tokio::sync::Mutex<()>,
    refresh_window: SignedDuration,
    failure_cooldown: SignedDuration,
    clock: Clock,
    /// With replicas: where this cache's tokens are shared.
    shared: Option<crate::shared::SharedSlot>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("refresh_window", &self.refresh_window)
            .finish_non_exhaustive()
    }
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

impl TokenCache {
    /// An empty cache replacing tokens `refresh_window` before they expire.
    ///
    /// A token issued with less than twice the window of life is replaced
    /// at half its life instead, so short-lived tokens (dev mode, an
    /// upstream handing out little life) do not cause a call per request.
    pub fn new(refresh_window: Duration, clock: Clock) -> Self {
        Self {
            current: RwLock::new(None),
            attempts: Mutex::default(),
            refresh: tokio::sync::Mutex::new(()),
            refresh_window: signed(refresh_window),
            failure_cooldown: signed(FAILURE_COOLDOWN),
            clock,
            shared: None,
        }
    }

    /// Shares this cache's tokens with other replicas (see
    /// [`crate::shared`]): a miss first looks there, and a mint happens
    /// under the replicas' lock and is shared.
    pub fn with_shared(mut self, shared: crate::shared::SharedSlot) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Sets how long a failure is answered from memory (default
    /// [`FAILURE_COOLDOWN`]; zero retries upstream on every call).
    pub fn with_failure_cooldown(mut self, cooldown: Duration) -> Self {
        self.failure_cooldown = signed(cooldown);
        self
    }

    /// The clock this cache reads.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The cached token when it is outside its refresh window and has at
    /// least `min_remaining` of life left (clamped, see
    /// [`MAX_MIN_REMAINING`]).
    fn fresh(&self, now: Timestamp, min_remaining: SignedDuration) -> Option<IssuedToken> {
        let guard = self.current.read().unwrap_or_else(PoisonError::into_inner);
        let cached = guard.as_ref()?;
        self.acceptable(&cached.token, cached.obtained_at, now, min_remaining)
            .then(|| cached.token.clone())
    }

    /// Whether `token`, obtained at `obtained_at`, is outside its refresh
    /// window at `now` and has at least `min_remaining` of life left.
    fn acceptable(
        &self,
        token: &IssuedToken,
        obtained_at: Timestamp,
        now: Timestamp,
        min_remaining: SignedDuration,
    ) -> bool {
        let life = token.expires_at.duration_since(obtained_at);
        let window = self.refresh_window.min(life / 2);
        // Never more than half the token's life: a freshly minted token must
        // satisfy the demand, or every call would mint.
        let demanded = min_remaining.min(signed(MAX_MIN_REMAINING)).min(life / 2);
        let remaining = token.expires_at.duration_since(now);
        remaining > window && remaining >= demanded
    }

    /// Whether the cached token's SHA-256 is `sha256`.
    pub fn holds_matching(&self, sha256: &[u8; 32]) -> bool {
        let guard = self.current.read().unwrap_or_else(PoisonError::into_inner);
        guard
            .as_ref()
            .is_some_and(|cached| digest_matches(&cached.token, sha256))
    }

    /// Drops the cached token when the SHA-256 of its text is `sha256`;
    /// whether it did.
    pub fn invalidate_matching(&self, sha256: &[u8; 32]) -> bool {
        let mut guard = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let matches = guard
            .as_ref()
            .is_some_and(|cached| digest_matches(&cached.token, sha256));
        if matches {
            *guard = None;
        }
        matches
    }

    /// Whether a token is cached that has not expired.
    pub fn holds_unexpired(&self) -> bool {
        self.unexpired(self.clock.now()).is_some()
    }

    /// The cached token when it has not expired, whatever its window.
    fn unexpired(&self, now: Timestamp) -> Option<IssuedToken> {
        let guard = self.current.read().unwrap_or_else(PoisonError::into_inner);
        let cached = guard.as_ref()?;
        (cached.token.expires_at > now).then(|| cached.token.clone())
    }

    /// Drops the cached token so the next call fetches a new one.
    pub fn invalidate(&self) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// The cached token, or a new one from `fetch` when there is none or it
    /// is inside its refresh window. Only one `fetch` runs at a time; callers
    /// that waited for it get its result.
    pub async fn get_or_refresh<F, Fut>(&self, fetch: F) -> Result<IssuedToken, ProviderError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<IssuedToken, ProviderError>>,
    {
        self.get_or_refresh_with(Duration::ZERO, fetch).await
    }

    /// Like [`TokenCache::get_or_refresh`], also replacing a cached token
    /// with less than `min_remaining` of life left (clamped to
    /// [`MAX_MIN_REMAINING`] and to half the token's life, so no caller can
    /// make every call mint).
    pub async fn get_or_refresh_with<F, Fut>(
        &self,
        min_remaining: Duration,
        fetch: F,
    ) -> Result<IssuedToken, ProviderError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<IssuedToken, ProviderError>>,
    {
        let min_remaining = signed(min_remaining);
        if let Some(token) = self.fresh(self.clock.now(), min_remaining) {
            crate::metrics::metrics().cache_hit();
            return Ok(token);
        }
        let seen = self.lock_attempts().completed;
        let _flight = self.refresh.lock().await;
        let now = self.clock.now();
        if let Some(token) = self.fresh(now, min_remaining) {
            crate::metrics::metrics().cache_hit();
            return Ok(token);
        }
        {
            let attempts = self.lock_attempts();
            if let Some((failed_at, error)) = &attempts.last_failure {
                // The call we queued behind failed, or one failed moments ago:
                // share its answer rather than calling again.
                let cooldown = if error.is_definitive() {
                    self.failure_cooldown.max(signed(DEFINITIVE_COOLDOWN))
                } else {
                    self.failure_cooldown
                };
                let recent = now.duration_since(*failed_at) < cooldown && error.stands_at(now);
                if attempts.completed != seen || recent {
                    return self.unexpired(now).ok_or_else(|| error.clone());
                }
            }
        }

        let obtained_at = self.clock.now();
        let checked = || async {
            fetch().await.and_then(|token| {
                let now = self.clock.now();
                if token.token.expose_secret().is_empty() {
                    Err(ProviderError::Malformed("empty token".into()))
                } else if token.expires_at <= now {
                    Err(ProviderError::Malformed(format!(
                        "token already expired at {}",
                        token.expires_at
                    )))
                } else {
                    Ok(token)
                }
            })
        };
        let (result, origin, obtained_at) = match &self.shared {
            None => (checked().await, crate::shared::Origin::Minted, obtained_at),
            Some(shared) => {
                let acceptable = |entry: &crate::shared::SharedEntry| {
                    self.acceptable(
                        &entry.token,
                        entry.minted_at,
                        self.clock.now(),
                        min_remaining,
                    )
                };
                shared
                    .store
                    .mint(
                        &shared.key,
                        &acceptable,
                        &self.clock,
                        &shared.permissions,
                        checked,
                    )
                    .await
            }
        };
        let mut attempts = self.lock_attempts();
        attempts.completed += 1;
        match result {
            Ok(token) => {
                match origin {
                    crate::shared::Origin::Minted => crate::metrics::metrics().minted(),
                    crate::shared::Origin::Shared => crate::metrics::metrics().cache_hit(),
                }
                attempts.last_failure = None;
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Cached {
                    token: token.clone(),
                    obtained_at,
                });
                Ok(token)
            }
            Err(error) => {
                crate::metrics::metrics().upstream_error(&error);
                attempts.last_failure = Some((self.clock.now(), error.clone()));
                drop(attempts);
                match self.unexpired(self.clock.now()) {
                    Some(stale) => {
                        tracing::warn!(
                            "[github] token refresh failed, serving the cached token (expires at {}): {error}",
                            stale.expires_at
                        );
                        Ok(stale)
                    }
                    None => Err(error),
                }
            }
        }
    }

    fn lock_attempts(&self) -> std::sync::MutexGuard<'_, Attempts> {
        self.attempts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    fn manual_clock(start: Timestamp) -> (Clock, Arc<AtomicI64>) {
        let offset = Arc::new(AtomicI64::new(0));
        let o = Arc::clone(&offset);
        let clock =
            Clock::from_fn(move || start + SignedDuration::from_secs(o.load(Ordering::SeqCst)));
        (clock, offset)
    }

    fn token(value: &str, expires_at: Timestamp) -> IssuedToken {
        IssuedToken {
            token: SecretString::from(value.to_owned()),
            expires_at,
        }
    }

    #[tokio::test]
    async fn serves_cached_until_window_then_refreshes() {
        let start = Timestamp::from_second(1_800_000_000).unwrap();
        let (clock, offset) = manual_clock(start);
        let cache = TokenCache::new(REFRESH_WINDOW, clock.clone());
        let calls = AtomicUsize::new(0);
        let fetch = || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Ok(token(
                &format!("t{n}"),
                clock.now() + SignedDuration::from_mins(60),
            ))
        };
        let first = cache.get_or_refresh(fetch).await.unwrap();
        offset.store(54 * 60, Ordering::SeqCst);
        let same = cache.get_or_refresh(fetch).await.unwrap();
        assert_eq!(first.token.expose_secret(), same.token.expose_secret());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        offset.store(55 * 60 + 1, Ordering::SeqCst);
        let next = cache.get_or_refresh(fetch).await.unwrap();
        assert_ne!(first.token.expose_secret(), next.token.expose_secret());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn short_lived_tokens_refresh_at_half_life() {
        let start = Timestamp::from_second(1_800_000_000).unwrap();
        let (clock, offset) = manual_clock(start);
        let cache = TokenCache::new(REFRESH_WINDOW, clock.clone());
        let calls = AtomicUsize::new(0);
        let fetch = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(token("short", clock.now() + SignedDuration::from_secs(120)))
        };
        cache.get_or_refresh(fetch).await.unwrap();
        offset.store(59, Ordering::SeqCst);
        cache.get_or_refresh(fetch).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "inside the first half of its life"
        );
        offset.store(61, Ordering::SeqCst);
        cache.get_or_refresh(fetch).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "past half its life");
    }

    #[tokio::test]
    async fn expired_or_empty_tokens_are_refused() {
        let start = Timestamp::from_second(1_800_000_000).unwrap();
        let (clock, _) = manual_clock(start);
        let cache =
            TokenCache::new(REFRESH_WINDOW, clock.clone()).with_failure_cooldown(Duration::ZERO);
        let err = cache
            .get_or_refresh(|| async { Ok(token("old", start - SignedDuration::from_secs(1))) })
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Malformed(_)), "{err}");
        let err = cache
            .get_or_refresh(|| async { Ok(token("", start + SignedDuration::from_mins(60))) })
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "malformed upstream answer: empty token");
    }

    #[tokio::test]
    async fn failure_serves_unexpired_cached_token_and_cools_down() {
        let start = Timestamp::from_second(1_800_000_000).unwrap();
        let (clock, offset) = manual_clock(start);
        let cache = TokenCache::new(REFRESH_WINDOW, clock.clone());
        cache
            .get_or_refresh(|| async { Ok(token("good", start + SignedDuration::from_mins(60))) })
            .await
            .unwrap();
        offset.store(57 * 60, Ordering::SeqCst);
        let calls = AtomicUsize::new(0);
        let failing = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(ProviderError::Timeout(Duration::from_secs(15)))
        };
        let stale = cache.get_or_refresh(failing).await.unwrap();
        assert_eq!(stale.token.expose_secret(), "good");
        let stale = cache.get_or_refresh(failing).await.unwrap();
        assert_eq!(stale.token.expose_secret(), "good");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "second call inside the cool-down"
        );
        offset.store(61 * 60, Ordering::SeqCst);
        let err = cache.get_or_refresh(failing).await.unwrap_err();
        assert!(matches!(err, ProviderError::Timeout(_)));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn errors_read_well() {
        let e = ProviderError::UpstreamStatus {
            status: 401,
            detail: Some("Bad credentials".into()),
        };
        assert_eq!(
            e.to_string(),
            "upstream answered HTTP 401 (Bad credentials)"
        );
        assert_eq!(
            ProviderError::Timeout(Duration::from_secs(15)).to_string(),
            "upstream did not answer within 15s"
        );
        assert_eq!(fingerprint("x").len(), 12);
    }
}
