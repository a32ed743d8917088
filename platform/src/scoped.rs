//! One [`TokenCache`] per mint key, bounded, and the refusal rate limit
//! (per workspace and installation, see [`REFUSAL_INTERVAL`]).
//!
//! Why: with grants, a provider mints many kinds of token — one per
//! (installation, repositories, permissions) — and each kind must keep the
//! [`TokenCache`] contract (never expired, refreshed ahead, single flight)
//! on its own, while workspaces with the same grant share one token. Both
//! providers (GitHub and dev) keep their tokens here so the sharing, the
//! bound on entries and the refusal limit exist once.
//!
//! The map holds at most `max_entries` kinds; at the bound an entry without
//! a live token goes first, else the one used longest ago. An evicted
//! entry's token is only forgotten (its next user mints again), never
//! revoked, so eviction costs a mint, not correctness.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jiff::Timestamp;

use crate::metrics::PlatformMetrics;
use crate::provider::{
    Clock, IssuedToken, ProviderError, REFUSAL_INTERVAL, Refusal, RefusalFuture, RefusalOutcome,
    ServedFuture, ServedToken, TokenFuture, TokenProvider, TokenRequest, unscoped_token,
};
use crate::scope::{Level, MintScope};
use crate::shared::{SharedSlot, SharedStore};
use crate::token_cache::TokenCache;

/// A provider that mints through [`ScopedCaches`]: the GitHub App and dev
/// providers. Each says how it serves a request and which installation an
/// owner is known under; [`TokenProvider`] is implemented once for all of
/// them (below), so the unscoped token and refusals work alike in both.
pub trait ScopedProvider: Send + Sync {
    /// A token for `request`, through this provider's caches.
    fn serve(
        &self,
        request: TokenRequest,
    ) -> impl Future<Output = Result<ServedToken, ProviderError>> + Send;

    /// The installation the unscoped token is minted under.
    fn default_installation(&self) -> u64;

    /// The installation `owner` is already known under, asking upstream
    /// nothing: a token of an owner nobody resolved was never minted, so a
    /// refusal of it matches nothing.
    fn known_installation(&self, owner: &str) -> impl Future<Output = Option<u64>> + Send;

    /// The caches this provider's tokens are kept in.
    fn caches(&self) -> &ScopedCaches;
}

impl<P: ScopedProvider> TokenProvider for P {
    fn metrics(&self) -> Arc<PlatformMetrics> {
        Arc::clone(self.caches().metrics())
    }

    fn token(&self) -> TokenFuture<'_> {
        unscoped_token(self.serve(TokenRequest::default()))
    }

    fn scoped_token(&self, request: TokenRequest) -> ServedFuture<'_> {
        Box::pin(self.serve(request))
    }

    fn report_refusal(&self, refusal: Refusal) -> RefusalFuture<'_> {
        Box::pin(async move {
            let Refusal {
                workspace,
                scopes,
                sha256,
            } = refusal;
            let mut keys = Vec::with_capacity(scopes.len());
            for scope in &scopes {
                let installation = match scope {
                    None => Some(self.default_installation()),
                    Some(s) => self.known_installation(&s.owner).await,
                };
                if let Some(id) = installation {
                    keys.push(MintKey::new(id, scope.as_ref()));
                }
            }
            self.caches().report(&workspace, &keys, &sha256).await
        })
    }
}

/// Most kinds of token cached at once by one provider.
pub const MAX_CACHED_TOKENS: usize = 4096;

/// What one token is minted for: the cache key. Repositories and owners are
/// compared lowercased, as GitHub compares them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MintKey {
    /// The installation minting it.
    pub installation: u64,
    /// Lowercased repository names, sorted; `None`: all.
    pub repositories: Option<Vec<String>>,
    /// `None`: the installation's own.
    pub permissions: Option<Vec<(String, Level)>>,
}

impl MintKey {
    /// The key of `scope` (`None`: unscoped) at `installation`.
    pub fn new(installation: u64, scope: Option<&MintScope>) -> Self {
        Self {
            installation,
            repositories: scope.and_then(MintScope::repositories_key),
            permissions: scope
                .and_then(|s| s.permissions.as_ref())
                .map(|p| p.iter().map(|(k, v)| (k.clone(), *v)).collect()),
        }
    }
}

/// One kind of token: its cache and the permissions its last mint stated.
#[derive(Clone)]
pub struct Slot {
    /// The token cache of this key.
    pub cache: Arc<TokenCache>,
    /// Permissions as the last mint's answer stated them.
    pub permissions: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Slot {
    /// The permissions the last mint stated.
    pub fn permissions(&self) -> BTreeMap<String, String> {
        self.permissions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records what a mint stated.
    pub fn set_permissions(&self, permissions: BTreeMap<String, String>) {
        *self
            .permissions
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = permissions;
    }
}

struct Entry {
    slot: Slot,
    last_used: Timestamp,
}

/// Who a refusal's rate limit applies to: a workspace on an installation.
type RefusalKey = (String, u64);

/// The bounded map of token caches, and when each workspace last had a
/// refused token of each installation dropped.
pub struct ScopedCaches {
    entries: Arc<Mutex<HashMap<MintKey, Entry>>>,
    refusals: Mutex<HashMap<RefusalKey, Timestamp>>,
    refresh_window: Duration,
    clock: Clock,
    max_entries: usize,
    /// With replicas: the store every slot shares its tokens through.
    shared: Option<Arc<SharedStore>>,
    /// The provider's counters, handed to every slot's cache.
    metrics: Arc<PlatformMetrics>,
}

impl fmt::Debug for ScopedCaches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopedCaches")
            .field("entries", &self.len())
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

impl ScopedCaches {
    /// Empty; caches replace tokens `refresh_window` before expiry.
    pub fn new(refresh_window: Duration, clock: Clock) -> Self {
        Self {
            entries: Arc::default(),
            refusals: Mutex::default(),
            refresh_window,
            clock,
            max_entries: MAX_CACHED_TOKENS,
            shared: None,
            metrics: Arc::default(),
        }
    }

    /// The counters every slot's cache adds to: the provider's set (see
    /// [`crate::metrics`]).
    pub fn metrics(&self) -> &Arc<PlatformMetrics> {
        &self.metrics
    }

    /// Shares every slot's tokens with the other replicas through `store`,
    /// and drops a local token at once when any replica reports it refused.
    pub fn with_shared(mut self, store: Arc<SharedStore>) -> Self {
        let entries = Arc::downgrade(&self.entries);
        store.on_refusal(move |sha256| {
            let Some(entries) = entries.upgrade() else {
                return;
            };
            let slots: Vec<Slot> = entries
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .map(|e| e.slot.clone())
                .collect();
            for slot in slots {
                slot.cache.invalidate_matching(sha256);
            }
        });
        self.shared = Some(store);
        self
    }

    /// Sets the bound on entries (at least 1).
    pub fn with_max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// The clock the caches read.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Kinds of token cached now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MintKey, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slot of `key`, created (evicting at the bound) when missing.
    pub fn slot(&self, key: &MintKey) -> Slot {
        let now = self.clock.now();
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(key) {
            entry.last_used = now;
            return entry.slot.clone();
        }
        if entries.len() >= self.max_entries {
            let victim = entries
                .iter()
                .min_by_key(|(_, e)| (e.slot.cache.holds_unexpired(), e.last_used))
                .map(|(k, _)| k.clone());
            if let Some(victim) = victim {
                entries.remove(&victim);
            }
        }
        let permissions: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
        let mut cache = TokenCache::new(
            self.refresh_window,
            self.clock.clone(),
            Arc::clone(&self.metrics),
        );
        if let Some(store) = &self.shared {
            cache = cache.with_shared(SharedSlot {
                store: Arc::clone(store),
                key: key.clone(),
                permissions: Arc::clone(&permissions),
            });
        }
        let slot = Slot {
            cache: Arc::new(cache),
            permissions,
        };
        entries.insert(
            key.clone(),
            Entry {
                slot: slot.clone(),
                last_used: now,
            },
        );
        slot
    }

    /// A token for `request` minted at `installation`, from its slot: the
    /// cached one, or on a miss (single flight, see [`TokenCache`]) one
    /// from `mint`, which also gives the permissions the token carries.
    pub async fn serve<F, Fut>(
        &self,
        installation: u64,
        request: &TokenRequest,
        mint: F,
    ) -> Result<ServedToken, ProviderError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(IssuedToken, BTreeMap<String, String>), ProviderError>>,
    {
        let scope = request.scope.as_ref();
        let slot = self.slot(&MintKey::new(installation, scope));
        let issued = slot
            .cache
            .get_or_refresh_with(request.min_remaining, || async {
                let (token, permissions) = mint().await?;
                slot.set_permissions(permissions);
                Ok(token)
            })
            .await?;
        Ok(ServedToken {
            issued,
            owner: scope.map(|s| s.owner.clone()),
            repositories: scope.and_then(MintScope::full_names),
            permissions: slot.permissions(),
        })
    }

    /// The slot of `key` if it exists (does not count as a use).
    pub fn peek(&self, key: &MintKey) -> Option<Slot> {
        self.lock().get(key).map(|e| e.slot.clone())
    }

    /// `workspace` reports the token whose SHA-256 is `sha256` refused:
    /// drops it if it is cached among `keys`, at most once per workspace
    /// and installation per [`REFUSAL_INTERVAL`] (another workspace's drops
    /// never count against this one).
    ///
    /// The record of drops holds at most `max_entries` (workspace,
    /// installation) pairs: when full, those older than the interval go;
    /// if every one is younger (that many drops within one interval, each
    /// making the next request mint), the record starts over. That can only
    /// ever allow a drop, never refuse one, and whoever fills it has caused
    /// as many mints already.
    pub fn refuse(&self, workspace: &str, keys: &[MintKey], sha256: &[u8; 32]) -> RefusalOutcome {
        self.refuse_where(workspace, keys, sha256, &[])
    }

    /// [`ScopedCaches::refuse`] on every replica: with a shared store, a
    /// matching shared entry is removed (and counts as a match, under the
    /// same rate limit, even when this replica never held the token), and
    /// every replica is told to drop its copy. Without one, `refuse`.
    pub async fn report(
        &self,
        workspace: &str,
        keys: &[MintKey],
        sha256: &[u8; 32],
    ) -> RefusalOutcome {
        let Some(store) = &self.shared else {
            return self.refuse(workspace, keys, sha256);
        };
        let local: Vec<bool> = keys
            .iter()
            .map(|key| {
                self.peek(key)
                    .is_some_and(|slot| slot.cache.holds_matching(sha256))
            })
            .collect();
        let mut shared_matches = Vec::new();
        for (key, held) in keys.iter().zip(&local) {
            if *held {
                continue;
            }
            if store.holds_matching(key, sha256).await {
                shared_matches.push(key.clone());
            }
        }
        let matched = keys
            .iter()
            .zip(&local)
            .find(|(key, held)| **held || shared_matches.contains(key))
            .map(|(key, _)| key.installation);
        let Some(installation) = matched else {
            return RefusalOutcome::NoMatch;
        };
        // The rate limit holds for the fleet, not per replica: a load
        // balancer must not turn one drop per interval into one per replica.
        if let Some(retry_after) = store
            .claim_refusal(workspace, installation, REFUSAL_INTERVAL)
            .await
        {
            return RefusalOutcome::Limited {
                retry_after: retry_after.max(Duration::from_secs(1)),
            };
        }
        let outcome = self.refuse_where(workspace, keys, sha256, &shared_matches);
        if outcome == RefusalOutcome::Dropped {
            for key in keys {
                store.remove_matching(key, sha256).await;
            }
            store.announce(sha256).await;
        }
        outcome
    }

    /// `refuse`, also counting the keys of `elsewhere` as holding the token
    /// (another replica's, shared).
    fn refuse_where(
        &self,
        workspace: &str,
        keys: &[MintKey],
        sha256: &[u8; 32],
        elsewhere: &[MintKey],
    ) -> RefusalOutcome {
        let interval =
            jiff::SignedDuration::try_from(REFUSAL_INTERVAL).unwrap_or(jiff::SignedDuration::MAX);
        for key in keys {
            let slot = self.peek(key);
            let held = slot
                .as_ref()
                .is_some_and(|slot| slot.cache.holds_matching(sha256));
            if !held && !elsewhere.contains(key) {
                continue;
            }
            let now = self.clock.now();
            let record = (workspace.to_owned(), key.installation);
            let mut refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(last) = refusals.get(&record) {
                let since = now.duration_since(*last);
                if since < interval {
                    let left = (interval - since).unsigned_abs();
                    return RefusalOutcome::Limited {
                        retry_after: left.max(Duration::from_secs(1)),
                    };
                }
            }
            let dropped = slot.is_some_and(|slot| slot.cache.invalidate_matching(sha256));
            if dropped || elsewhere.contains(key) {
                if refusals.len() >= self.max_entries {
                    refusals.retain(|_, at| now.duration_since(*at) < interval);
                    if refusals.len() >= self.max_entries {
                        refusals.clear();
                    }
                }
                refusals.insert(record, now);
                return RefusalOutcome::Dropped;
            }
        }
        RefusalOutcome::NoMatch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{IssuedToken, ProviderError};
    use secrecy::{ExposeSecret, SecretString};
    use sha2::{Digest, Sha256};

    fn issued(text: &str) -> Result<IssuedToken, ProviderError> {
        Ok(IssuedToken {
            token: SecretString::from(text.to_owned()),
            expires_at: Timestamp::now() + jiff::SignedDuration::from_mins(60),
        })
    }

    fn key(installation: u64) -> MintKey {
        MintKey::new(installation, None)
    }

    #[tokio::test]
    async fn the_map_is_bounded_and_evicts_empty_entries_first() {
        let caches =
            ScopedCaches::new(Duration::from_secs(300), Clock::system()).with_max_entries(2);
        caches
            .slot(&key(1))
            .cache
            .get_or_refresh(|| async { issued("a") })
            .await
            .unwrap();
        caches.slot(&key(2));
        caches.slot(&key(3));
        assert_eq!(caches.len(), 2);
        assert!(
            caches.peek(&key(1)).is_some(),
            "the entry with a live token stays"
        );
        assert!(caches.peek(&key(2)).is_none(), "the empty one goes");
    }

    #[tokio::test]
    async fn refusals_drop_only_a_matching_token_of_the_given_keys() {
        let caches = ScopedCaches::new(Duration::from_secs(300), Clock::system());
        let slot = caches.slot(&key(1));
        let token = slot
            .cache
            .get_or_refresh(|| async { issued("ghs_a") })
            .await
            .unwrap();
        let sha: [u8; 32] = Sha256::digest(token.token.expose_secret().as_bytes()).into();
        assert_eq!(
            caches.refuse("ws", &[key(2)], &sha),
            RefusalOutcome::NoMatch
        );
        assert_eq!(
            caches.refuse("ws", &[key(1)], &[0; 32]),
            RefusalOutcome::NoMatch
        );
        assert!(slot.cache.holds_unexpired());
        assert_eq!(
            caches.refuse("ws", &[key(2), key(1)], &sha),
            RefusalOutcome::Dropped
        );
        assert!(!slot.cache.holds_unexpired());
        slot.cache
            .get_or_refresh(|| async { issued("ghs_a") })
            .await
            .unwrap();
        assert!(matches!(
            caches.refuse("ws", &[key(1)], &sha),
            RefusalOutcome::Limited { retry_after } if retry_after <= REFUSAL_INTERVAL
        ));
    }

    /// Each workspace has its own window per installation, and a record
    /// full of young entries starts over rather than refuse anyone.
    #[tokio::test]
    async fn refusal_windows_are_per_workspace_and_installation() {
        let caches =
            ScopedCaches::new(Duration::from_secs(300), Clock::system()).with_max_entries(2);
        assert_eq!(refuse(&caches, "ws-a", 1).await, RefusalOutcome::Dropped);
        assert!(matches!(
            refuse(&caches, "ws-a", 1).await,
            RefusalOutcome::Limited { .. }
        ));
        assert_eq!(refuse(&caches, "ws-b", 1).await, RefusalOutcome::Dropped);
        assert_eq!(
            refuse(&caches, "ws-c", 1).await,
            RefusalOutcome::Dropped,
            "a full record of young entries starts over"
        );
        assert_eq!(
            refuse(&caches, "ws-a", 1).await,
            RefusalOutcome::Dropped,
            "ws-a's entry went with the rest"
        );
    }

    /// Has `workspace` refuse the token cached for `installation` (a fresh
    /// one when none is).
    async fn refuse(caches: &ScopedCaches, workspace: &str, installation: u64) -> RefusalOutcome {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let token = format!("ghs_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let cached = caches
            .slot(&key(installation))
            .cache
            .get_or_refresh(|| async { issued(&token) })
            .await
            .unwrap();
        let sha: [u8; 32] = Sha256::digest(cached.token.expose_secret().as_bytes()).into();
        caches.refuse(workspace, &[key(installation)], &sha)
    }
}
