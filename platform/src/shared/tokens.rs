//! Tokens in the shared cache: one replica mints under a cross-replica
//! lock while the others wait for its sealed entry, and an entry a
//! refusal names is removed only while it still holds that token.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{Event, OpError, Origin, SharedEntry, SharedStore, describe, hex};
use crate::provider::{IssuedToken, ProviderError};
use crate::scoped::MintKey;

/// How often a replica waiting for another's mint looks for its result.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// A token as shared: what a replica needs to serve it as its minter does.
#[derive(Deserialize)]
struct SharedToken {
    token: SecretString,
    /// Unix milliseconds: when the minter asked for it (its cache's
    /// "obtained at", so every replica places the refresh window alike).
    minted_at_ms: i64,
    expires_at_ms: i64,
    permissions: BTreeMap<String, String>,
}

impl SharedStore {
    /// The shared token of `key`, if one opens.
    async fn get_token(&self, key: &MintKey) -> Result<Option<SharedEntry>, OpError> {
        let redis_key = self.token_key(key);
        let Some(sealed) = self.get_sealed(&redis_key).await? else {
            return Ok(None);
        };
        let parsed: Option<SharedToken> = serde_json::from_slice(&sealed).ok();
        let entry = parsed.and_then(|shared| {
            let minted_at = Timestamp::from_millisecond(shared.minted_at_ms).ok()?;
            let expires_at = Timestamp::from_millisecond(shared.expires_at_ms).ok()?;
            (!shared.token.expose_secret().is_empty()).then_some(SharedEntry {
                token: IssuedToken {
                    token: shared.token,
                    expires_at,
                },
                minted_at,
                permissions: shared.permissions,
            })
        });
        if entry.is_none() {
            self.bad_entry(&redis_key);
        }
        Ok(entry)
    }

    /// Shares `entry` under `key` until the token expires.
    async fn put_token(&self, key: &MintKey, entry: &SharedEntry) -> Result<(), OpError> {
        let ttl = entry
            .token
            .expires_at
            .duration_since(Timestamp::now())
            .as_millis();
        let Ok(ttl) = u64::try_from(ttl) else {
            return Ok(());
        };
        if ttl == 0 {
            return Ok(());
        }
        let shared = SharedToken {
            token: entry.token.token.clone(),
            minted_at_ms: entry.minted_at.as_millisecond(),
            expires_at_ms: entry.token.expires_at.as_millisecond(),
            permissions: entry.permissions.clone(),
        };
        let plain = Zeroizing::new(serde_json::to_vec(&ExposeForSeal(&shared)).unwrap_or_default());
        self.put_sealed(&self.token_key(key), &plain, Duration::from_millis(ttl))
            .await
    }

    /// Takes the mint lock of `key` for `owner`; whether it was free.
    async fn try_lock(&self, key: &MintKey, owner: &str) -> Result<bool, OpError> {
        let millis = u64::try_from(self.lock_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut connection = self.connection.clone();
        let lock_key = self.lock_key(key);
        let answer: Option<String> = self
            .op("SET NX (mint lock)", async {
                redis::cmd("SET")
                    .arg(&lock_key)
                    .arg(owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        Ok(answer.is_some())
    }

    /// Whether the shared entry of `key` holds the token whose SHA-256 is
    /// `sha256` (Redis failing, or an entry that does not open: `false`).
    pub async fn holds_matching(&self, key: &MintKey, sha256: &[u8; 32]) -> bool {
        self.matching_raw(key, sha256).await.is_some()
    }

    /// The raw shared entry of `key` when it holds the token of `sha256`.
    async fn matching_raw(&self, key: &MintKey, sha256: &[u8; 32]) -> Option<Vec<u8>> {
        let redis_key = self.token_key(key);
        let raw = self.get_plain(&redis_key).await.ok()??;
        let plain = self.sealer.open(redis_key.as_bytes(), &raw)?;
        let shared: SharedToken = serde_json::from_slice(&plain).ok()?;
        crate::provider::secret_matches(shared.token.expose_secret(), sha256).then_some(raw)
    }

    /// Removes the shared entry of `key` if it holds the token of `sha256`
    /// (and still does at the delete: a newer token is never removed).
    pub async fn remove_matching(&self, key: &MintKey, sha256: &[u8; 32]) {
        if let Some(raw) = self.matching_raw(key, sha256).await
            && let Ok(true) = self.compare_and_delete(&self.token_key(key), &raw).await
        {
            self.count(Event::Refused);
        }
    }

    /// A token for `key` through the shared cache: another replica's when
    /// one is shared and `acceptable`, else minted by `fetch` under the
    /// cross-replica lock (waiting, bounded, while another replica mints),
    /// else — Redis unusable — minted by `fetch` locally.
    pub async fn mint<F, Fut>(
        &self,
        key: &MintKey,
        acceptable: &(dyn Fn(&SharedEntry) -> bool + Sync),
        clock: &crate::provider::Clock,
        permissions: &Mutex<BTreeMap<String, String>>,
        fetch: F,
    ) -> (Result<IssuedToken, ProviderError>, Origin, Timestamp)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<IssuedToken, ProviderError>>,
    {
        let obtained_at = clock.now();
        let take = |entry: SharedEntry| {
            *permissions.lock().unwrap_or_else(PoisonError::into_inner) = entry.permissions;
            self.count(Event::Hit);
            (Ok(entry.token), Origin::Shared, entry.minted_at)
        };
        let owner = hex(&rand::random::<[u8; 16]>());
        let give_up_at = Instant::now() + self.lock_ttl + self.op_timeout * 2;
        let mut waited = false;
        // Shared already, or ours to mint once the lock is ours; `false`:
        // Redis is unusable or the lock outlived its expiry, so mint here.
        let locked = loop {
            match self.get_token(key).await {
                Ok(Some(entry)) if acceptable(&entry) => return take(entry),
                Ok(_) => {}
                Err(_) => break false,
            }
            match self.try_lock(key, &owner).await {
                Ok(true) => break true,
                Ok(false) => {}
                Err(_) => break false,
            }
            if !waited {
                waited = true;
                self.count(Event::Waited);
            }
            if Instant::now() >= give_up_at {
                tracing::warn!(
                    "[redis] another replica held the mint lock of {} past its expiry: minting here",
                    describe(key)
                );
                break false;
            }
            let jitter = rand::rng().random_range(0..WAIT_POLL.as_millis() as u64);
            tokio::time::sleep(WAIT_POLL + Duration::from_millis(jitter)).await;
        };
        if !locked {
            self.count(Event::Fallback);
            return (fetch().await, Origin::Minted, obtained_at);
        }
        // Ours: another replica may have shared a token just before.
        if let Ok(Some(entry)) = self.get_token(key).await
            && acceptable(&entry)
        {
            self.unlock(key, &owner).await;
            return take(entry);
        }
        self.count(Event::Miss);
        let obtained_at = clock.now();
        let result = fetch().await;
        if let Ok(token) = &result {
            let entry = SharedEntry {
                token: token.clone(),
                minted_at: obtained_at,
                permissions: permissions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            };
            let _ = self.put_token(key, &entry).await;
        }
        self.unlock(key, &owner).await;
        (result, Origin::Minted, obtained_at)
    }

    async fn unlock(&self, key: &MintKey, owner: &str) {
        let _ = self
            .compare_and_delete(&self.lock_key(key), owner.as_bytes())
            .await;
    }
}

/// Serialises a [`SharedToken`] with the token in clear, only ever into a
/// buffer that is sealed and zeroed.
struct ExposeForSeal<'a>(&'a SharedToken);

impl Serialize for ExposeForSeal<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let t = self.0;
        let mut s = serializer.serialize_struct("SharedToken", 4)?;
        s.serialize_field("token", t.token.expose_secret())?;
        s.serialize_field("minted_at_ms", &t.minted_at_ms)?;
        s.serialize_field("expires_at_ms", &t.expires_at_ms)?;
        s.serialize_field("permissions", &t.permissions)?;
        s.end()
    }
}
