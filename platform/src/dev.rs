//! A provider that mints fake `ghs_` tokens, for local runs and tests.
//!
//! It goes through the same [`TokenCache`] as the GitHub provider, with the
//! same refresh window, so a short lifetime makes refresh behaviour visible
//! in minutes: what a daemon sees from it is what it would see from GitHub,
//! minus GitHub.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use rand::Rng;
use rand::distr::Alphanumeric;
use secrecy::SecretString;

use crate::provider::{Clock, IssuedToken, REFRESH_WINDOW, TokenCache, TokenFuture, TokenProvider};

/// Characters after the `ghs_` prefix (GitHub's classic installation tokens
/// have 36).
const RANDOM_CHARS: usize = 36;

/// Mints random `ghs_`-shaped tokens living `lifetime`.
#[derive(Debug)]
pub struct DevProvider {
    lifetime: Duration,
    cache: TokenCache,
    minted: AtomicU64,
}

impl DevProvider {
    /// A provider whose tokens live `lifetime` (at least one second).
    pub fn new(lifetime: Duration) -> Self {
        Self::with_clock(lifetime, Clock::system())
    }

    /// Like [`DevProvider::new`], reading time from `clock`.
    pub fn with_clock(lifetime: Duration, clock: Clock) -> Self {
        Self {
            lifetime: lifetime.max(Duration::from_secs(1)),
            cache: TokenCache::new(REFRESH_WINDOW, clock),
            minted: AtomicU64::new(0),
        }
    }

    /// How many tokens were minted so far (the dev "upstream calls").
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::SeqCst)
    }

    /// The lifetime of minted tokens.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    fn mint(&self) -> IssuedToken {
        let random: String = rand::rng()
            .sample_iter(Alphanumeric)
            .take(RANDOM_CHARS)
            .map(char::from)
            .collect();
        // Whole seconds, rounded down, like GitHub's `expires_at`: the stated
        // expiry is never later than the real one.
        let now = self.cache.clock().now();
        let life = SignedDuration::try_from(self.lifetime).unwrap_or(SignedDuration::MAX);
        let expires_at = now
            .checked_add(life)
            .and_then(|t| Timestamp::from_second(t.as_second()))
            .unwrap_or(Timestamp::MAX);
        self.minted.fetch_add(1, Ordering::SeqCst);
        IssuedToken {
            token: SecretString::from(format!("ghs_{random}")),
            expires_at,
        }
    }
}

impl TokenProvider for DevProvider {
    fn token(&self) -> TokenFuture<'_> {
        Box::pin(self.cache.get_or_refresh(|| async {
            let token = self.mint();
            tracing::info!(
                "[github] dev provider minted a token (fingerprint {}, expires at {})",
                token.fingerprint(),
                token.expires_at
            );
            Ok(token)
        }))
    }
}

crate::registry::github_token_plugin!(DevProvider, "dev-github-token");

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::sync::Arc;
    use std::sync::atomic::AtomicI64;

    #[tokio::test]
    async fn tokens_are_ghs_shaped_and_cached() {
        let provider = DevProvider::new(Duration::from_secs(600));
        let a = provider.token().await.unwrap();
        let b = provider.token().await.unwrap();
        let s = a.token.expose_secret();
        assert!(s.starts_with("ghs_"), "prefix");
        assert_eq!(s.len(), 4 + RANDOM_CHARS);
        assert!(s[4..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(s, b.token.expose_secret());
        assert_eq!(provider.minted(), 1);
        let left = a.expires_at.duration_since(Timestamp::now());
        assert!(left > SignedDuration::from_secs(590) && left <= SignedDuration::from_secs(600));
    }

    #[tokio::test]
    async fn refreshes_inside_the_window() {
        let start = Timestamp::from_second(1_800_000_000).unwrap();
        let offset = Arc::new(AtomicI64::new(0));
        let o = Arc::clone(&offset);
        let clock =
            Clock::from_fn(move || start + SignedDuration::from_secs(o.load(Ordering::SeqCst)));
        let provider = DevProvider::with_clock(Duration::from_secs(600), clock);
        let first = provider.token().await.unwrap();
        offset.store(299, Ordering::SeqCst);
        provider.token().await.unwrap();
        assert_eq!(provider.minted(), 1);
        offset.store(301, Ordering::SeqCst);
        let second = provider.token().await.unwrap();
        assert_eq!(provider.minted(), 2);
        assert_ne!(first.token.expose_secret(), second.token.expose_secret());
        assert!(second.expires_at > first.expires_at);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_mint() {
        let provider = Arc::new(DevProvider::new(Duration::from_secs(600)));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let p = Arc::clone(&provider);
                tokio::spawn(
                    async move { p.token().await.unwrap().token.expose_secret().to_owned() },
                )
            })
            .collect();
        let mut tokens = Vec::new();
        for t in tasks {
            tokens.push(t.await.unwrap());
        }
        tokens.dedup();
        assert_eq!(tokens.len(), 1);
        assert_eq!(provider.minted(), 1);
    }
}
