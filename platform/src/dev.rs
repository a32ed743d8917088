//! A provider that mints fake `ghs_` tokens, for local runs and tests.
//!
//! It goes through the same [`TokenCache`](crate::token_cache::TokenCache) as
//! the GitHub provider, with the same refresh window, so a short lifetime
//! makes refresh behaviour visible in minutes: what a daemon sees from it is
//! what it would see from GitHub, minus GitHub.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use rand::Rng;
use rand::distr::Alphanumeric;
use secrecy::SecretString;

use crate::provider::{
    Clock, IssuedToken, ProviderError, REFRESH_WINDOW, ServedToken, TokenRequest,
};
use crate::scope::{MintScope, Permissions};
use crate::scoped::{ScopedCaches, ScopedProvider};

/// Characters after the `ghs_` prefix (GitHub's classic installation tokens
/// have 36).
const RANDOM_CHARS: usize = 36;

/// The dev "installation" of unscoped tokens (the configured one).
pub const DEV_DEFAULT_INSTALLATION: u64 = 1;

/// Most owners the dev provider hands installation numbers to, and most
/// mints it remembers for [`DevProvider::mints`].
const MAX_DEV_RECORDS: usize = 10_000;

/// The permissions dev tokens state when the grant names none.
const DEV_INSTALLATION_PERMISSIONS: [(&str, &str); 2] =
    [("contents", "write"), ("metadata", "read")];

/// What one dev mint was asked for (as GitHub's stand-in records it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevMint {
    /// The fake installation.
    pub installation: u64,
    /// The owner, for scoped mints.
    pub owner: Option<String>,
    /// Repository names without the owner; `None`: all.
    pub repositories: Option<Vec<String>>,
    /// `None`: the installation's own.
    pub permissions: Option<Permissions>,
    /// Fingerprint of the token minted.
    pub fingerprint: String,
}

#[derive(Default)]
struct Owners {
    /// Lowercased owner → fake installation number.
    installations: HashMap<String, u64>,
    /// Lowercased owners where the App is "not installed".
    not_installed: HashSet<String>,
}

/// Mints random `ghs_`-shaped tokens living `lifetime`, for any owner (every
/// owner is "installed" unless [`DevProvider::set_not_installed`] says
/// otherwise), scoped as asked.
pub struct DevProvider {
    lifetime: Duration,
    caches: ScopedCaches,
    owners: Mutex<Owners>,
    mints: Mutex<Vec<DevMint>>,
    minted: AtomicU64,
}

impl std::fmt::Debug for DevProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevProvider")
            .field("lifetime", &self.lifetime)
            .field("caches", &self.caches)
            .finish_non_exhaustive()
    }
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
            caches: ScopedCaches::new(REFRESH_WINDOW, clock),
            owners: Mutex::default(),
            mints: Mutex::default(),
            minted: AtomicU64::new(0),
        }
    }

    /// How many tokens were minted so far (the dev "upstream calls").
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::SeqCst)
    }

    /// Every mint so far with the scope it was asked for, oldest first.
    pub fn mints(&self) -> Vec<DevMint> {
        self.mints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The lifetime of minted tokens.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// From now on the App counts as not installed on `owners` (ASCII
    /// case-insensitive), and as installed everywhere else.
    pub fn set_not_installed<I, S>(&self, owners: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut state = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        state.not_installed = owners
            .into_iter()
            .map(|o| o.as_ref().to_ascii_lowercase())
            .collect();
    }

    fn installation_of(&self, owner: &str) -> Result<u64, ProviderError> {
        let key = owner.to_ascii_lowercase();
        let mut state = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        if state.not_installed.contains(&key) {
            return Err(ProviderError::NotInstalled(owner.to_owned()));
        }
        if let Some(id) = state.installations.get(&key) {
            return Ok(*id);
        }
        if state.installations.len() >= MAX_DEV_RECORDS {
            return Err(ProviderError::Config(format!(
                "the dev provider serves at most {MAX_DEV_RECORDS} owners"
            )));
        }
        let id = DEV_DEFAULT_INSTALLATION + 1 + state.installations.len() as u64;
        state.installations.insert(key, id);
        Ok(id)
    }

    /// The installation of `owner` if the provider handed it one (no new
    /// number, for refusals).
    fn installation_handed_out(&self, owner: &str) -> Option<u64> {
        let state = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .installations
            .get(&owner.to_ascii_lowercase())
            .copied()
    }

    fn mint(&self, installation: u64, scope: Option<&MintScope>) -> IssuedToken {
        let random: String = rand::rng()
            .sample_iter(Alphanumeric)
            .take(RANDOM_CHARS)
            .map(char::from)
            .collect();
        // Whole seconds, rounded down, like GitHub's `expires_at`: the stated
        // expiry is never later than the real one.
        let now = self.caches.clock().now();
        let life = SignedDuration::try_from(self.lifetime).unwrap_or(SignedDuration::MAX);
        let expires_at = now
            .checked_add(life)
            .and_then(|t| Timestamp::from_second(t.as_second()))
            .unwrap_or(Timestamp::MAX);
        self.minted.fetch_add(1, Ordering::SeqCst);
        let token = IssuedToken {
            token: SecretString::from(format!("ghs_{random}")),
            expires_at,
        };
        let mut mints = self.mints.lock().unwrap_or_else(PoisonError::into_inner);
        if mints.len() >= MAX_DEV_RECORDS {
            mints.remove(0);
        }
        mints.push(DevMint {
            installation,
            owner: scope.map(|s| s.owner.clone()),
            repositories: scope.and_then(|s| s.repositories.clone()),
            permissions: scope.and_then(|s| s.permissions.clone()),
            fingerprint: token.fingerprint(),
        });
        token
    }
}

impl ScopedProvider for DevProvider {
    async fn serve(&self, request: TokenRequest) -> Result<ServedToken, ProviderError> {
        let scope = request.scope.as_ref();
        let installation = match scope {
            None => DEV_DEFAULT_INSTALLATION,
            Some(scope) => self.installation_of(&scope.owner)?,
        };
        self.caches
            .serve(installation, &request, || async {
                let token = self.mint(installation, scope);
                tracing::info!(
                    "[github] dev provider minted a token (fingerprint {}, expires at {})",
                    token.fingerprint(),
                    token.expires_at
                );
                let permissions =
                    scope
                        .and_then(MintScope::permissions_text)
                        .unwrap_or_else(|| {
                            DEV_INSTALLATION_PERMISSIONS
                                .iter()
                                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                                .collect()
                        });
                Ok((token, permissions))
            })
            .await
    }

    fn default_installation(&self) -> u64 {
        DEV_DEFAULT_INSTALLATION
    }

    async fn known_installation(&self, owner: &str) -> Option<u64> {
        self.installation_handed_out(owner)
    }

    fn caches(&self) -> &ScopedCaches {
        &self.caches
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::TokenProvider;
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
