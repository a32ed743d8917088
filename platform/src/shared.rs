//! The token cache shared by platform replicas through Redis.
//!
//! Why: an operator runs two or three replicas behind a load balancer, and
//! with only per-process caches every (installation, repositories,
//! permissions) is minted once per replica per token lifetime — past
//! GitHub's secondary limit for one endpoint at fleet scale — and a refusal
//! reported to one replica leaves the others serving the refused token.
//! Sharing uses Redis, which the platform this system came from already
//! runs; no replication of our own.
//!
//! What is shared (all under the configured key prefix, nothing outside):
//!
//! - `PREFIX token:KEY`: the token minted for cache key `KEY` (installation,
//!   repositories, permissions in clear), **sealed** with AES-256-GCM under
//!   the key from `PLATFORM_CACHE_KEY_FILE`, with the whole Redis key as
//!   associated data so an entry cannot be moved to another key. It expires
//!   with the token. An entry that does not open (another key, edited,
//!   truncated, garbage) is a miss: counted, logged once, never served,
//!   and replaced by the next mint.
//! - `PREFIX lock:KEY`: single flight across replicas. `SET NX PX` with a
//!   random owner; only the owner deletes it (compare-and-delete script).
//!   Others wait, bounded, for the shared result; a holder killed mid-mint
//!   stalls them at most the lock's expiry.
//! - `PREFIX refused` (pub/sub channel): the SHA-256 of a refused token; each
//!   replica drops a matching local copy at once.
//! - `PREFIX refusal:WORKSPACE-DIGEST:INSTALLATION`: the refusal rate limit
//!   (one drop per workspace and installation per interval) for the fleet,
//!   so a load balancer does not multiply it by the replicas.
//! - `PREFIX github:installations` and `PREFIX github:rate-limit`: the App's
//!   installations table (owner → installation, when listed) and GitHub's
//!   rate limit on the App (until when), each a sealed record
//!   ([`SharedStore::get_record`] / [`SharedStore::put_record`], owned and
//!   read by [`crate::github`]). Sealed although neither is a secret: a
//!   forged table would send one owner's grant to another's installation,
//!   a forged limit would stop every mint; with sealing, whoever can write
//!   to Redis but lacks the key can only delete them (a miss: the replica
//!   asks GitHub).
//!
//! Redis failing never fails a request: every operation has a short
//! deadline; while Redis is down, slow or answers garbage, the replica
//! serves from and mints into its local cache (counted in `/metrics` as
//! `molecule_platform_shared_cache_total{event="fallback"}`, logged once per
//! episode), probes Redis every [`RETRY_DOWN_AFTER`], and shares again
//! once it answers.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use jiff::Timestamp;
use rand::Rng;
use redis::AsyncCommands;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use redis::RedisError;
use zeroize::Zeroizing;

use crate::provider::{IssuedToken, ProviderError};
use crate::scoped::MintKey;

/// Default key prefix: every key and channel the platform uses starts so.
pub const DEFAULT_PREFIX: &str = "molecule-platform:";
/// Default deadline of one Redis operation.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(500);
/// Default expiry of the mint lock: longer than a mint (GitHub's request
/// timeout is 15 s), short enough that a killed holder stalls little.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(20);
/// During a down episode requests use the local cache without asking
/// Redis (a dead Redis costs them no latency), and a probe asks it this
/// often whether it is back.
pub const RETRY_DOWN_AFTER: Duration = Duration::from_secs(1);
/// How often a replica waiting for another's mint looks for its result.
const WAIT_POLL: Duration = Duration::from_millis(50);
/// The sealing key file's size cap (64 hex digits and a newline, loosely).
const MAX_KEY_FILE_BYTES: u64 = 256;
/// Format byte of a sealed entry.
const SEAL_VERSION: u8 = 1;
/// Largest sealed entry read back (a token is ~520 bytes; permissions few).
const MAX_ENTRY_BYTES: usize = 64 * 1024;
/// Largest shared record read back: the installations table of 10,000
/// owners (the listing's page cap) is ~400 KiB of JSON.
const MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;

/// The replicated-cache settings (`PLATFORM_REDIS_URL` and friends).
pub struct SharedConfig {
    /// `redis://[user:password@]host:port[/db]`; may hold a password.
    pub url: SecretString,
    /// Every key and channel starts with this.
    pub prefix: String,
    /// The AES-256-GCM key sealing tokens.
    pub seal_key: SealKey,
    /// Deadline of one Redis operation.
    pub op_timeout: Duration,
    /// Expiry of the mint lock.
    pub lock_ttl: Duration,
}

impl fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedConfig")
            .field("prefix", &self.prefix)
            .field("op_timeout", &self.op_timeout)
            .field("lock_ttl", &self.lock_ttl)
            .finish_non_exhaustive()
    }
}

/// Checks a key prefix: 1-64 printable ASCII characters, no space.
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty() && prefix.len() <= 64 && prefix.bytes().all(|b| b.is_ascii_graphic())
}

/// The 32-byte sealing key, zeroed on drop.
pub struct SealKey(Zeroizing<[u8; 32]>);

impl SealKey {
    /// From 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Reads 64 hex digits (surrounding whitespace ignored) from `path`,
    /// e.g. made by `openssl rand -hex 32`.
    pub fn read(path: &Path) -> Result<Self, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
        let mut text = Zeroizing::new(String::new());
        file.take(MAX_KEY_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read it: {e}"))?;
        let hex = text.trim();
        if text.len() as u64 > MAX_KEY_FILE_BYTES || hex.len() != 64 {
            return Err("it must hold 64 hex digits (make one with `openssl rand -hex 32`)".into());
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let digit = |b: u8| (b as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => bytes[i] = (h * 16 + l) as u8,
                _ => {
                    return Err(
                        "it must hold 64 hex digits (make one with `openssl rand -hex 32`)".into(),
                    );
                }
            }
        }
        Ok(Self(bytes))
    }
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// Seals and opens entries (AES-256-GCM, random 96-bit nonce).
struct Sealer(LessSafeKey);

impl Sealer {
    fn new(key: &SealKey) -> Self {
        // A 32-byte key is always a valid AES-256 key.
        let unbound = UnboundKey::new(&AES_256_GCM, &key.0[..]).expect("a 32-byte AES-256 key");
        Self(LessSafeKey::new(unbound))
    }

    /// `version || nonce || ciphertext || tag`, bound to `aad`.
    fn seal(&self, aad: &[u8], plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill(&mut nonce[..]);
        let mut buffer = Zeroizing::new(plain.to_vec());
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut *buffer,
            )
            .ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buffer.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buffer);
        Some(out)
    }

    /// The plaintext, or `None` for anything that is not an entry sealed
    /// under this key for `aad`.
    fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEAL_VERSION || rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = Zeroizing::new(body.to_vec());
        let plain_len = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut buffer)
            .ok()?
            .len();
        buffer.truncate(plain_len);
        Some(buffer)
    }
}

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

/// A token read from or written to the shared cache.
#[derive(Clone, Debug)]
pub struct SharedEntry {
    /// The token and its expiry.
    pub token: IssuedToken,
    /// When its minter asked for it.
    pub minted_at: Timestamp,
    /// Permissions as its mint stated them.
    pub permissions: BTreeMap<String, String>,
}

/// Where a token handed to the local cache came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Minted by this replica.
    Minted,
    /// Minted by another replica, read from Redis.
    Shared,
}

/// What one Redis operation can end in, besides its value.
#[derive(Debug)]
pub enum OpError {
    /// Redis is in a down episode: not tried.
    Skipped,
    /// Redis failed, timed out or answered garbage (now down).
    Failed,
}

/// What a shared-cache event counts as in `/metrics`.
#[derive(Clone, Copy, Debug)]
pub enum Event {
    /// A token read from Redis instead of minting.
    Hit,
    /// No usable entry: this replica minted under the lock.
    Miss,
    /// A mint or read done locally because Redis was unusable.
    Fallback,
    /// A Redis operation failed or timed out.
    Error,
    /// An entry did not open (other key, edited, truncated): a miss.
    Rejected,
    /// A replica waited for another's mint.
    Waited,
    /// A shared entry was removed after a refusal.
    Refused,
}

impl Event {
    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Fallback => "fallback",
            Self::Error => "error",
            Self::Rejected => "rejected",
            Self::Waited => "waited",
            Self::Refused => "refused",
        }
    }
}

fn count(event: Event) {
    crate::metrics::metrics().shared_cache(event);
}

/// Deletes `KEYS[1]` only if it holds `ARGV[1]`: releasing a lock only by
/// its holder, removing a refused entry only if it is still that entry.
const COMPARE_AND_DELETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Called with the SHA-256 of each token refused on any replica.
type RefusalListener = Box<dyn Fn(&[u8; 32]) + Send + Sync>;

/// The connection to Redis and the rules above. One per process.
pub struct SharedStore {
    client: redis::Client,
    connection: redis::aio::ConnectionManager,
    prefix: String,
    sealer: Sealer,
    op_timeout: Duration,
    lock_ttl: Duration,
    /// `Some(when to try again)` during a down episode.
    down: Mutex<Option<Instant>>,
    /// Whether a bad entry was logged in the current run of bad entries.
    bad_entry_logged: AtomicBool,
    listeners: Mutex<Vec<RefusalListener>>,
    compare_and_delete: redis::Script,
}

impl fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl SharedStore {
    /// Parses the URL and prepares the (lazy) connection: nothing is sent
    /// until the first request, so a replica starts with Redis down.
    pub fn new(config: SharedConfig) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(config.url.expose_secret())
            .map_err(|e| format!("not a Redis URL: {}", describe_error(&e)))?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.op_timeout))
            .set_response_timeout(Some(config.op_timeout))
            .set_number_of_retries(1)
            .set_max_delay(config.op_timeout);
        let connection =
            redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
                .map_err(|e| format!("cannot prepare the connection: {}", describe_error(&e)))?;
        Ok(Arc::new(Self {
            client,
            connection,
            prefix: config.prefix,
            sealer: Sealer::new(&config.seal_key),
            op_timeout: config.op_timeout,
            lock_ttl: config.lock_ttl,
            down: Mutex::new(None),
            bad_entry_logged: AtomicBool::new(false),
            listeners: Mutex::default(),
            compare_and_delete: redis::Script::new(COMPARE_AND_DELETE),
        }))
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The expiry of the mint lock.
    pub fn lock_ttl(&self) -> Duration {
        self.lock_ttl
    }

    /// Where a token of `key` is shared.
    pub fn token_key(&self, key: &MintKey) -> String {
        format!("{}token:{}", self.prefix, describe(key))
    }

    fn lock_key(&self, key: &MintKey) -> String {
        format!("{}lock:{}", self.prefix, describe(key))
    }

    fn refusal_channel(&self) -> String {
        format!("{}refused", self.prefix)
    }

    /// Runs one operation under the deadline and the down-episode rules.
    async fn op<T, F>(&self, what: &'static str, f: F) -> Result<T, OpError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        if self.is_down() {
            return Err(OpError::Skipped);
        }
        self.attempt(what, f).await
    }

    /// Runs one operation under the deadline, down or not: a success ends
    /// a down episode, a failure starts or prolongs one.
    async fn attempt<T, F>(&self, what: &'static str, f: F) -> Result<T, OpError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let outcome = tokio::time::timeout(self.op_timeout, f).await;
        let mut down = self.down.lock().unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok(Ok(value)) => {
                if down.take().is_some() {
                    tracing::info!("[redis] answering again: replicas share their tokens again");
                }
                Ok(value)
            }
            Ok(Err(error)) => {
                self.went_down(&mut down, what, &describe_error(&error));
                Err(OpError::Failed)
            }
            Err(_) => {
                self.went_down(
                    &mut down,
                    what,
                    &format!(
                        "no answer within {}",
                        humantime::format_duration(self.op_timeout)
                    ),
                );
                Err(OpError::Failed)
            }
        }
    }

    fn went_down(&self, down: &mut Option<Instant>, what: &str, why: &str) {
        count(Event::Error);
        if down.is_none() {
            tracing::warn!(
                "[redis] {what} failed ({why}): serving from and minting into this replica's own cache until Redis answers"
            );
        }
        *down = Some(Instant::now());
    }

    /// Whether Redis is in a down episode now (requests then use the local
    /// cache without asking Redis; [`probe_forever`] ends the episode).
    pub fn is_down(&self) -> bool {
        self.down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn bad_entry(&self, redis_key: &str) {
        count(Event::Rejected);
        if !self.bad_entry_logged.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                "[redis] an entry under {redis_key:?} does not open with this replica's cache key \
                 (sealed under another PLATFORM_CACHE_KEY_FILE, edited or truncated): treated as missing, never served"
            );
        }
    }

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

    /// A sealed record's plaintext (`None`: missing, or not opening, which
    /// is logged once and counted).
    pub async fn get_sealed(&self, redis_key: &str) -> Result<Option<Zeroizing<Vec<u8>>>, OpError> {
        self.get_sealed_within(redis_key, MAX_ENTRY_BYTES).await
    }

    /// Where the record `name` is shared (`PREFIX name`).
    pub fn record_key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The shared record `name` (sealed; up to [`MAX_RECORD_BYTES`]):
    /// `None` when missing, not opening (logged once, counted), or Redis is
    /// unusable — every caller then asks GitHub itself.
    pub async fn get_record(&self, name: &str) -> Option<Zeroizing<Vec<u8>>> {
        self.get_sealed_within(&self.record_key(name), MAX_RECORD_BYTES)
            .await
            .ok()
            .flatten()
    }

    /// Shares the record `name` for `ttl` (Redis failing: not shared, and
    /// the caller carries on).
    pub async fn put_record(&self, name: &str, plain: &[u8], ttl: Duration) {
        let _ = self.put_sealed(&self.record_key(name), plain, ttl).await;
    }

    /// Removes the record `name`.
    pub async fn remove_record(&self, name: &str) {
        let mut connection = self.connection.clone();
        let key = self.record_key(name);
        let _ = self.op::<i64, _>("DEL", connection.del(&key)).await;
    }

    async fn get_sealed_within(
        &self,
        redis_key: &str,
        limit: usize,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, OpError> {
        debug_assert!(redis_key.starts_with(&self.prefix));
        let Some(sealed) = self.get_plain_within(redis_key, limit).await? else {
            return Ok(None);
        };
        match self.sealer.open(redis_key.as_bytes(), &sealed) {
            Some(plain) => {
                self.bad_entry_logged.store(false, Ordering::SeqCst);
                Ok(Some(plain))
            }
            None => {
                self.bad_entry(redis_key);
                Ok(None)
            }
        }
    }

    /// Seals `plain` under `redis_key` for `ttl`.
    pub async fn put_sealed(
        &self,
        redis_key: &str,
        plain: &[u8],
        ttl: Duration,
    ) -> Result<(), OpError> {
        let Some(sealed) = self.sealer.seal(redis_key.as_bytes(), plain) else {
            return Err(OpError::Failed);
        };
        self.put_plain(redis_key, &sealed, ttl).await
    }

    /// A plain record (bounded size; a larger one is garbage).
    pub async fn get_plain(&self, redis_key: &str) -> Result<Option<Vec<u8>>, OpError> {
        self.get_plain_within(redis_key, MAX_ENTRY_BYTES).await
    }

    async fn get_plain_within(
        &self,
        redis_key: &str,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, OpError> {
        if !redis_key.starts_with(&self.prefix) {
            return Ok(None);
        }
        let mut connection = self.connection.clone();
        let value: Option<Vec<u8>> = self.op("GET", connection.get(redis_key)).await?;
        Ok(value.filter(|v| v.len() <= limit))
    }

    /// Stores a plain record for `ttl` (at least 1 ms).
    pub async fn put_plain(
        &self,
        redis_key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), OpError> {
        if !redis_key.starts_with(&self.prefix) {
            return Err(OpError::Failed);
        }
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut connection = self.connection.clone();
        self.op("SET", async {
            redis::cmd("SET")
                .arg(redis_key)
                .arg(value)
                .arg("PX")
                .arg(millis)
                .query_async::<()>(&mut connection)
                .await
        })
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

    /// Deletes `redis_key` if it still holds `value`; whether it did.
    async fn compare_and_delete(&self, redis_key: &str, value: &[u8]) -> Result<bool, OpError> {
        let mut connection = self.connection.clone();
        let deleted: i64 = self
            .op("compare-and-delete", async {
                self.compare_and_delete
                    .key(redis_key)
                    .arg(value)
                    .invoke_async(&mut connection)
                    .await
            })
            .await?;
        Ok(deleted == 1)
    }

    /// Calls `listener` with the SHA-256 of every token refused on any
    /// replica (including this one).
    pub fn on_refusal(&self, listener: impl Fn(&[u8; 32]) + Send + Sync + 'static) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(listener));
    }

    fn refused(&self, sha256: &[u8; 32]) {
        for listener in self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            listener(sha256);
        }
    }

    /// Starts the refusal subscriber (reconnecting with back-off) on the
    /// current runtime. It ends when the store is dropped.
    pub fn start(self: &Arc<Self>) {
        tokio::spawn(subscribe_forever(Arc::downgrade(self)));
        tokio::spawn(probe_forever(Arc::downgrade(self)));
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
            count(Event::Refused);
        }
    }

    /// Claims the fleet's refusal window of (`workspace`, `installation`)
    /// for `interval`: `None` when claimed (or Redis is unusable: each
    /// replica's own limit still holds), else how long until it frees.
    /// The key names the workspace by the first 128 bits of its SHA-256.
    pub async fn claim_refusal(
        &self,
        workspace: &str,
        installation: u64,
        interval: Duration,
    ) -> Option<Duration> {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(workspace.as_bytes());
        let key = format!(
            "{}refusal:{}:{installation}",
            self.prefix,
            hex(&digest[..16])
        );
        let millis = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let mut connection = self.connection.clone();
        let claimed: Option<String> = self
            .op("SET NX (refusal window)", async {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis)
                    .query_async(&mut connection)
                    .await
            })
            .await
            .ok()?;
        if claimed.is_some() {
            return None;
        }
        let left: i64 = self
            .op("PTTL", async {
                redis::cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await
            })
            .await
            .unwrap_or(0);
        Some(Duration::from_millis(u64::try_from(left).unwrap_or(0)))
    }

    /// Tells every replica (this one too) to drop the token of `sha256`.
    pub async fn announce(&self, sha256: &[u8; 32]) {
        let mut connection = self.connection.clone();
        let channel = self.refusal_channel();
        let message = hex(sha256);
        let _ = self
            .op::<i64, _>("PUBLISH", connection.publish(&channel, message))
            .await;
        // Our own subscriber hears it too; dropping here as well keeps this
        // replica right when the subscriber is disconnected.
        self.refused(sha256);
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
            count(Event::Hit);
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
                count(Event::Waited);
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
            count(Event::Fallback);
            return (fetch().await, Origin::Minted, obtained_at);
        }
        // Ours: another replica may have shared a token just before.
        if let Ok(Some(entry)) = self.get_token(key).await
            && acceptable(&entry)
        {
            self.unlock(key, &owner).await;
            return take(entry);
        }
        count(Event::Miss);
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

/// During a down episode, pings Redis every [`RETRY_DOWN_AFTER`] (with
/// jitter) so requests never wait for a dead server, and sharing resumes
/// as soon as it answers.
async fn probe_forever(store: Weak<SharedStore>) {
    loop {
        let jitter = rand::rng().random_range(0..=RETRY_DOWN_AFTER.as_millis() as u64 / 4);
        tokio::time::sleep(RETRY_DOWN_AFTER + Duration::from_millis(jitter)).await;
        let Some(store) = store.upgrade() else { return };
        if store.is_down() {
            let mut connection = store.connection.clone();
            let _ = store
                .attempt::<String, _>("PING", redis::cmd("PING").query_async(&mut connection))
                .await;
        }
    }
}

/// The subscriber loop: listens on the refusal channel, reconnecting with
/// back-off and jitter while the store lives.
async fn subscribe_forever(store: Weak<SharedStore>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (client, channel, op_timeout) = match store.upgrade() {
            Some(s) => (s.client.clone(), s.refusal_channel(), s.op_timeout),
            None => return,
        };
        let connected = tokio::time::timeout(op_timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        if let Ok(Ok(pubsub)) = connected {
            backoff = Duration::from_millis(200);
            let mut messages = pubsub.into_on_message();
            loop {
                let next = std::future::poll_fn(|cx| {
                    futures_core::Stream::poll_next(std::pin::Pin::new(&mut messages), cx)
                })
                .await;
                let Some(message) = next else { break };
                let Some(store) = store.upgrade() else { return };
                let payload: Vec<u8> = message.get_payload_bytes().to_vec();
                if let Some(sha256) = credd_core::secret::parse_sha256_hex(&payload) {
                    store.refused(&sha256);
                }
            }
        }
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A cache key in words: `i=INSTALLATION;r=REPO,REPO|*;p=NAME=LEVEL,…|*`.
/// Repository and permission names are validated by the grants file
/// (letters, digits, `.`, `_`, `-`), so the form is unambiguous.
pub fn describe(key: &MintKey) -> String {
    let repositories = key
        .repositories
        .as_ref()
        .map_or_else(|| "*".to_owned(), |r| r.join(","));
    let permissions = key.permissions.as_ref().map_or_else(
        || "*".to_owned(),
        |p| {
            p.iter()
                .map(|(name, level)| format!("{name}={}", level.as_str()))
                .collect::<Vec<_>>()
                .join(",")
        },
    );
    format!("i={};r={repositories};p={permissions}", key.installation)
}

/// A Redis error in a few words: its kind, never the server's text or the
/// URL (which may hold a password).
fn describe_error(error: &RedisError) -> String {
    if error.is_connection_refusal() {
        "connection refused".into()
    } else if error.is_timeout() {
        "timed out".into()
    } else if error.is_connection_dropped() {
        "connection dropped".into()
    } else if error.is_io_error() {
        "I/O error".into()
    } else {
        format!("{:?}", error.kind())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_entries_open_only_under_their_key_and_redis_key() {
        let sealer = Sealer::new(&SealKey::from_bytes([7; 32]));
        let other = Sealer::new(&SealKey::from_bytes([8; 32]));
        let sealed = sealer.seal(b"p:token:a", b"ghs_secret").unwrap();
        assert!(!sealed.windows(10).any(|w| w == b"ghs_secret"));
        assert_eq!(
            &sealer.open(b"p:token:a", &sealed).unwrap()[..],
            b"ghs_secret"
        );
        assert!(sealer.open(b"p:token:b", &sealed).is_none(), "moved");
        assert!(other.open(b"p:token:a", &sealed).is_none(), "other key");
        for cut in 0..sealed.len() {
            assert!(
                sealer.open(b"p:token:a", &sealed[..cut]).is_none(),
                "cut {cut}"
            );
        }
        for i in 0..sealed.len() {
            let mut edited = sealed.clone();
            edited[i] ^= 1;
            assert!(sealer.open(b"p:token:a", &edited).is_none(), "byte {i}");
        }
    }

    #[test]
    fn key_files_hold_64_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        assert!(SealKey::read(&path).is_ok());
        for bad in [
            "ab".repeat(31),
            "zz".repeat(32),
            "ab".repeat(33),
            String::new(),
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(SealKey::read(&path).unwrap_err().contains("64 hex digits"));
        }
        assert!(SealKey::read(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn keys_describe_installation_repositories_and_permissions() {
        use crate::grants::Level;
        let key = MintKey {
            installation: 7,
            repositories: Some(vec!["api".into(), "web".into()]),
            permissions: Some(vec![("contents".into(), Level::Read)]),
        };
        assert_eq!(describe(&key), "i=7;r=api,web;p=contents=read");
        assert_eq!(describe(&MintKey::new(7, None)), "i=7;r=*;p=*");
        assert_eq!(
            credd_core::secret::parse_sha256_hex(hex(&[9; 32]).as_bytes()),
            Some([9; 32])
        );
        assert!(valid_prefix("molecule-platform:"));
        assert!(!valid_prefix("has space") && !valid_prefix(""));
    }
}

/// The shared side of one local [`TokenCache`](crate::provider::TokenCache):
/// the store, the cache key, and the slot's permissions (shared with the
/// token so a replica serving another's token states them too).
#[derive(Clone)]
pub struct SharedSlot {
    /// The process's store.
    pub store: Arc<SharedStore>,
    /// The cache key.
    pub key: MintKey,
    /// The slot's permissions, as its mint stated them.
    pub permissions: Arc<Mutex<BTreeMap<String, String>>>,
}

impl fmt::Debug for SharedSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSlot")
            .field("key", &describe(&self.key))
            .finish_non_exhaustive()
    }
}
