//! Every token the daemon holds: the default one and one per account asked for.
//!
//! Why per owner: a GitHub App installation token covers one account, and a
//! workspace may work across several organisations. git says which
//! repository it is about (`credential.useHttpPath`), so the daemon can hand
//! out the token of that repository's owner — scoped by the platform to the
//! workspace's grant — instead of one broad token for everything.
//!
//! The default token ([`Lifecycle::Kept`]) is kept fresh for the daemon's
//! whole life (and seeded with the bootstrap token). A request for an owner goes to
//! it when its token is that owner's (the platform says whose token it is),
//! so a single-owner workspace makes one platform call per lifetime however
//! git asks. Any other owner gets a [`TokenKeeper`] of its own, made on the
//! first request (at most [`MAX_OWNER_TOKENS`]), with its own schedule,
//! back-off and single flight; it is refreshed only while someone asks for
//! it and dropped at expiry once nobody has (see `OnDemand`).
//!
//! A request for a repository its owner's token does not cover makes the
//! refresher check the grant (rate limited: see `Requester::ScopeCheck`),
//! then is answered from the held scope: `not_granted` unless the grant was
//! widened.
//!
//! Slots are for owners that can have a token. Git asks for whatever a
//! repository names — a superproject's submodules are untrusted content —
//! so owners the platform refuses must not hold the [`MAX_OWNER_TOKENS`]
//! slots, or a repository with 33 submodule owners would lock every granted
//! owner out. A per-owner cache that holds no token and whose owner the
//! platform refused (not granted, not installed) retires right after that
//! call; its answer is *benched*: kept (bounded, [`MAX_BENCHED`]) and given
//! from memory until its back-off ends, so a refused owner costs one
//! platform call per back-off however often it is asked, and no slot. When
//! the slots are full, a cache that holds no token and waits out a back-off
//! (a platform failing for that owner) is benched the same way to make room;
//! only caches with a token or a call in flight are never displaced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use credd_core::protocol::{Status, Which};
use credd_core::secret::Token;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    Benched, CachePolicy, Daemonwide, Fetch, Got, Lifecycle, RefreshHook, Retirement, Sha256Hex,
    TokenKeeper, Unavailable,
};
use crate::metrics::Metrics;

/// Most accounts a daemon holds tokens for besides the default one.
pub(crate) use credd_core::protocol::MAX_OWNER_TOKENS;
/// Most owners whose refusal (or failure) is remembered without a cache.
pub(crate) const MAX_BENCHED: usize = 1024;

/// A per-owner cache and the token that stops its refresher.
struct Held<F> {
    cache: Arc<TokenKeeper<F>>,
    stop: CancellationToken,
}

/// The per-owner caches and the benched owners, by lower-cased owner.
struct Owners<F> {
    caches: HashMap<String, Held<F>>,
    benched: HashMap<String, Benched>,
}

impl<F: Fetch> Owners<F> {
    /// Remembers `benched` for `key` (at most [`MAX_BENCHED`]: expired
    /// entries go first, then the one ending soonest).
    fn bench(&mut self, key: String, benched: Benched) {
        if self.benched.len() >= MAX_BENCHED {
            let now = Instant::now();
            self.benched.retain(|_, b| b.until > now);
        }
        if self.benched.len() >= MAX_BENCHED
            && let Some(soonest) = self
                .benched
                .iter()
                .min_by_key(|(_, b)| b.until)
                .map(|(k, _)| k.clone())
        {
            self.benched.remove(&soonest);
        }
        self.benched.insert(key, benched);
    }

    /// Frees a slot by benching a cache that holds no token and waits out a
    /// back-off; whether one was freed.
    fn free_a_slot(&mut self) -> bool {
        let Some((key, benched)) = self
            .caches
            .iter()
            .find_map(|(key, held)| held.cache.bench().map(|b| (key.clone(), b)))
        else {
            return false;
        };
        if let Some(held) = self.caches.remove(&key) {
            held.stop.cancel();
            tracing::debug!(
                owner = key.as_str(),
                "all owner slots were taken; benched a cache with no token until its back-off ends"
            );
        }
        self.bench(key, benched);
        true
    }
}

/// The daemon's token store: the default token, one per account asked for,
/// every refresher, and what belongs to the daemon rather than to one token
/// ([`Daemonwide`]: counters, uptime, the `--on-refresh` hook, the signal
/// systemd's `STATUS=` follows). One handle starts and stops all of it, as
/// mini-redis's `Db`: dropping the last handle stops every refresher.
pub(crate) struct TokenStore<F> {
    default: Arc<TokenKeeper<F>>,
    owners: Arc<Mutex<Owners<F>>>,
    fetcher: F,
    policy: CachePolicy,
    daemon: Arc<Daemonwide>,
    stop: CancellationToken,
    /// The per-owner keepers' refreshers.
    refreshers: TaskTracker,
    /// The default token's refresher, joined at the end: its panic is the
    /// daemon's failure (a per-owner one only loses that owner's token).
    default_refresher: Mutex<Option<JoinHandle<()>>>,
}

impl<F: Fetch> TokenStore<F> {
    /// Starts the store: the default token's keeper (seeded with
    /// `bootstrap`) and its refresher. Per-owner keepers are made on the
    /// first request for their owner, calling through clones of `fetcher`;
    /// every refresher runs until `stop` is cancelled or the store is
    /// dropped. `on_refresh` hears every new token, the default and each
    /// account's.
    pub(crate) fn start(
        fetcher: F,
        policy: CachePolicy,
        bootstrap: Option<Token>,
        on_refresh: Option<RefreshHook>,
        stop: &CancellationToken,
    ) -> Self {
        let daemon = Arc::new(Daemonwide::new(on_refresh));
        let default = Arc::new(TokenKeeper::new(
            fetcher.clone(),
            policy,
            Lifecycle::Kept,
            bootstrap,
            Arc::clone(&daemon),
        ));
        let stop = stop.child_token();
        let default_refresher = {
            let (default, stop) = (Arc::clone(&default), stop.clone());
            // The default token is kept fresh for the daemon's whole life.
            tokio::spawn(async move { default.run_refresher(stop, |_| false).await })
        };
        Self {
            default,
            owners: Arc::new(Mutex::new(Owners {
                caches: HashMap::new(),
                benched: HashMap::new(),
            })),
            fetcher,
            policy,
            daemon,
            stop,
            refreshers: TaskTracker::new(),
            default_refresher: Mutex::new(Some(default_refresher)),
        }
    }

    fn lock_owners(&self) -> MutexGuard<'_, Owners<F>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers a `get`.
    pub(crate) async fn get(&self, want: &Which) -> Got {
        let (owner, repository) = match want {
            Which::Default => return self.default.get(None).await,
            Which::Owner(owner) => (owner.as_str(), None),
            Which::Repository(repository) => (repository.owner(), Some(repository)),
        };
        if self.default.speaks_for(owner) {
            return self.default.get(repository).await;
        }
        match self.cache_for(owner) {
            Ok(cache) => cache.get(repository).await,
            Err(answer) => answer,
        }
    }

    /// The cache for `owner`, made (and its refresher started) if needed;
    /// the answer from memory for a benched owner or when no slot is free.
    fn cache_for(&self, owner: &str) -> Result<Arc<TokenKeeper<F>>, Got> {
        let key = owner.to_ascii_lowercase();
        let mut owners = self.lock_owners();
        if let Some(held) = owners.caches.get(&key) {
            // Under the map's lock: the refresher's retire check takes it too.
            held.cache.note_asked();
            return Ok(Arc::clone(&held.cache));
        }
        let now = Instant::now();
        if let Some(benched) = owners.benched.get(&key) {
            if now < benched.until {
                return Err(benched.answer(now));
            }
            owners.benched.remove(&key);
        }
        if owners.caches.len() >= MAX_OWNER_TOKENS && !owners.free_a_slot() {
            return Err(Got::Unavailable(Unavailable::SlotsFull {
                max: MAX_OWNER_TOKENS,
            }));
        }
        let cache = Arc::new(TokenKeeper::new(
            self.fetcher.clone(),
            self.policy,
            Lifecycle::OnDemand {
                owner: owner.to_owned(),
            },
            None,
            Arc::clone(&self.daemon),
        ));
        cache.note_asked();
        let stop = self.stop.child_token();
        owners.caches.insert(
            key.clone(),
            Held {
                cache: Arc::clone(&cache),
                stop: stop.clone(),
            },
        );
        drop(owners);
        let map = Arc::clone(&self.owners);
        let running = Arc::clone(&cache);
        self.refreshers.spawn(async move {
            let retire = |why: Retirement| {
                let mut owners = map.lock().unwrap_or_else(|e| e.into_inner());
                // Asked again since it decided to go (asking takes this lock).
                if matches!(why, Retirement::Idle) && running.is_wanted() {
                    return false;
                }
                if owners
                    .caches
                    .get(&key)
                    .is_some_and(|held| Arc::ptr_eq(&held.cache, &running))
                {
                    owners.caches.remove(&key);
                }
                if let Retirement::Refused(benched) = why {
                    owners.bench(key.clone(), benched);
                }
                true
            };
            running.run_refresher(stop, retire).await;
        });
        Ok(cache)
    }

    /// Answers an `erase`: drops the held token (default or per owner) whose
    /// SHA-256 is `sha256`; whether one was dropped.
    pub(crate) fn erase(&self, sha256: &Sha256Hex) -> bool {
        self.default.erase(sha256)
            || self
                .snapshot()
                .into_iter()
                .any(|(_, cache)| cache.erase(sha256))
    }

    /// The daemon's state: the default token and every per-owner one.
    pub(crate) fn status(&self) -> Status {
        let mut owners = self.snapshot();
        owners.sort_by(|a, b| a.0.cmp(&b.0));
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_secs: self.daemon.started.elapsed().as_secs(),
            token: self.default.status(),
            owners: owners.into_iter().map(|(_, c)| c.status()).collect(),
            counters: Some(self.daemon.metrics.snapshot()),
        }
    }

    /// One line for systemd's `STATUS=`: the default token's state, then
    /// each account's.
    pub(crate) fn status_line(&self) -> String {
        let mut owners: Vec<_> = self
            .snapshot()
            .into_iter()
            .map(|(_, c)| c.status())
            .collect();
        owners.sort_by(|a, b| a.scope.owner.cmp(&b.scope.owner));
        super::status::line(&self.default.status(), &owners)
    }

    /// Healthy for the systemd watchdog: the default token can be served,
    /// or the platform has not (yet) failed for it. Accounts do not count:
    /// git asks for whatever owner a repository names, and a refused or
    /// failing account must not get the daemon restarted.
    pub(crate) fn is_healthy(&self) -> bool {
        self.default.is_healthy()
    }

    /// A receiver that sees every change of any token's state (for
    /// systemd's `STATUS=`).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.daemon.changed.subscribe()
    }

    /// The daemon's counters.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.daemon.metrics
    }

    /// SIGHUP: every held token is refreshed now.
    pub(crate) fn refresh_now(&self) {
        self.default.refresh_now();
        for (_, cache) in self.snapshot() {
            cache.refresh_now();
        }
    }

    /// Waits for every refresher after `stop` was cancelled; an error if
    /// the default token's refresher panicked.
    pub(crate) async fn stopped(&self) -> Result<(), tokio::task::JoinError> {
        self.refreshers.close();
        self.refreshers.wait().await;
        let default = self
            .default_refresher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match default {
            Some(refresher) => refresher.await,
            None => Ok(()),
        }
    }

    fn snapshot(&self) -> Vec<(String, Arc<TokenKeeper<F>>)> {
        self.lock_owners()
            .caches
            .iter()
            .map(|(k, held)| (k.clone(), Arc::clone(&held.cache)))
            .collect()
    }
}

impl<F> Drop for TokenStore<F> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
