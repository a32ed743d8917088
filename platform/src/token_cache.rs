//! The cache that keeps providers honest: where the [`TokenProvider`]
//! contract lives.
//!
//! - it never returns a token that has expired;
//! - a token inside the refresh window is replaced before answering (the old
//!   one is still served when the refresh fails and it has not expired);
//! - any number of concurrent callers share one upstream call (single
//!   flight), and callers that queued behind a failed call share its error
//!   instead of retrying one after another.
//!
//! [`TokenProvider`]: crate::provider::TokenProvider

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use secrecy::ExposeSecret;

use crate::metrics::PlatformMetrics;
use crate::provider::{
    Clock, DEFINITIVE_COOLDOWN, FAILURE_COOLDOWN, IssuedToken, MAX_MIN_REMAINING, ProviderError,
    digest_matches, signed,
};

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
/// [`TokenProvider`](crate::provider::TokenProvider) contract.
pub struct TokenCache {
    current: RwLock<Option<Cached>>,
    attempts: Mutex<Attempts>,
    refresh: tokio::sync::Mutex<()>,
    refresh_window: SignedDuration,
    failure_cooldown: SignedDuration,
    clock: Clock,
    /// With replicas: where this cache's tokens are shared.
    shared: Option<crate::shared::SharedSlot>,
    /// Its provider's counters.
    metrics: Arc<PlatformMetrics>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("refresh_window", &self.refresh_window)
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// An empty cache replacing tokens `refresh_window` before they expire.
    ///
    /// A token issued with less than twice the window of life is replaced
    /// at half its life instead, so short-lived tokens (dev mode, an
    /// upstream handing out little life) do not cause a call per request.
    /// Mints and hits count into `metrics` (its provider's).
    pub fn new(refresh_window: Duration, clock: Clock, metrics: Arc<PlatformMetrics>) -> Self {
        Self {
            current: RwLock::new(None),
            attempts: Mutex::default(),
            refresh: tokio::sync::Mutex::new(()),
            refresh_window: signed(refresh_window),
            failure_cooldown: signed(FAILURE_COOLDOWN),
            clock,
            shared: None,
            metrics,
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
            self.metrics.cache_hit();
            return Ok(token);
        }
        let seen = self.lock_attempts().completed;
        let _flight = self.refresh.lock().await;
        let now = self.clock.now();
        if let Some(token) = self.fresh(now, min_remaining) {
            self.metrics.cache_hit();
            return Ok(token);
        }
        if let Some(shared) = self.failure_to_share(seen, now) {
            return shared;
        }
        let obtained_at = self.clock.now();
        let checked = || async { fetch().await.and_then(|token| self.checked(token)) };
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
        self.record(result, origin, obtained_at)
    }

    /// The answer of the call we queued behind when it failed, or of one
    /// that failed moments ago (within the cooldown, longer for a
    /// definitive refusal): shared rather than calling again. The cached
    /// token still serves while it has not expired.
    fn failure_to_share(
        &self,
        seen: u64,
        now: Timestamp,
    ) -> Option<Result<IssuedToken, ProviderError>> {
        let attempts = self.lock_attempts();
        let (failed_at, error) = attempts.last_failure.as_ref()?;
        let cooldown = if error.is_definitive() {
            self.failure_cooldown.max(signed(DEFINITIVE_COOLDOWN))
        } else {
            self.failure_cooldown
        };
        let recent = now.duration_since(*failed_at) < cooldown && error.stands_at(now);
        (attempts.completed != seen || recent)
            .then(|| self.unexpired(now).ok_or_else(|| error.clone()))
    }

    /// A fetched token, refused when it is empty or already expired.
    fn checked(&self, token: IssuedToken) -> Result<IssuedToken, ProviderError> {
        if token.token.expose_secret().is_empty() {
            Err(ProviderError::Malformed("empty token".into()))
        } else if token.expires_at <= self.clock.now() {
            Err(ProviderError::Malformed(format!(
                "token already expired at {}",
                token.expires_at
            )))
        } else {
            Ok(token)
        }
    }

    /// Records an attempt's result: a token is cached (and counted as
    /// minted or shared); a failure is remembered for the cooldown, and the
    /// cached token is served instead while it has not expired.
    fn record(
        &self,
        result: Result<IssuedToken, ProviderError>,
        origin: crate::shared::Origin,
        obtained_at: Timestamp,
    ) -> Result<IssuedToken, ProviderError> {
        let mut attempts = self.lock_attempts();
        attempts.completed += 1;
        let error = match result {
            Ok(token) => {
                match origin {
                    crate::shared::Origin::Minted => self.metrics.minted(),
                    crate::shared::Origin::Shared => self.metrics.cache_hit(),
                }
                attempts.last_failure = None;
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Cached {
                    token: token.clone(),
                    obtained_at,
                });
                return Ok(token);
            }
            Err(error) => error,
        };
        self.metrics.upstream_error(error.status_label());
        attempts.last_failure = Some((self.clock.now(), error.clone()));
        drop(attempts);
        let Some(stale) = self.unexpired(self.clock.now()) else {
            return Err(error);
        };
        tracing::warn!(
            "[github] token refresh failed, serving the cached token (expires at {}): {error}",
            stale.expires_at
        );
        Ok(stale)
    }

    fn lock_attempts(&self) -> std::sync::MutexGuard<'_, Attempts> {
        self.attempts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::REFRESH_WINDOW;
    use secrecy::SecretString;
    use std::sync::Arc;
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
        let cache = TokenCache::new(REFRESH_WINDOW, clock.clone(), Arc::default());
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
        let cache = TokenCache::new(REFRESH_WINDOW, clock.clone(), Arc::default());
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
        let cache = TokenCache::new(REFRESH_WINDOW, clock.clone(), Arc::default())
            .with_failure_cooldown(Duration::ZERO);
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
        let cache = TokenCache::new(REFRESH_WINDOW, clock.clone(), Arc::default());
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
}
