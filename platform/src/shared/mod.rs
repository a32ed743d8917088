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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use rand::Rng;
use redis::{AsyncCommands, RedisError};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::provider::IssuedToken;
use crate::scoped::MintKey;

mod refusals;
mod seal;
mod tokens;

use refusals::{RefusalListener, subscribe_forever};
pub use seal::SealKey;
use seal::Sealer;

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

/// Deletes `KEYS[1]` only if it holds `ARGV[1]`: releasing a lock only by
/// its holder, removing a refused entry only if it is still that entry.
const COMPARE_AND_DELETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

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
    /// The provider's counters.
    metrics: Arc<crate::metrics::PlatformMetrics>,
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
    /// Its events count into `metrics` (the provider's, see [`crate::metrics`]).
    pub fn new(
        config: SharedConfig,
        metrics: Arc<crate::metrics::PlatformMetrics>,
    ) -> Result<Arc<Self>, String> {
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
            metrics,
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

    /// Counts `event` in `/metrics`.
    fn count(&self, event: Event) {
        self.metrics.shared_cache(event.as_str());
    }

    fn went_down(&self, down: &mut Option<Instant>, what: &str, why: &str) {
        self.count(Event::Error);
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
        self.count(Event::Rejected);
        if !self.bad_entry_logged.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                "[redis] an entry under {redis_key:?} does not open with this replica's cache key \
                 (sealed under another PLATFORM_CACHE_KEY_FILE, edited or truncated): treated as missing, never served"
            );
        }
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

    /// Starts the refusal subscriber (reconnecting with back-off) on the
    /// current runtime. It ends when the store is dropped.
    pub fn start(self: &Arc<Self>) {
        tokio::spawn(subscribe_forever(Arc::downgrade(self)));
        tokio::spawn(probe_forever(Arc::downgrade(self)));
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

/// The shared side of one local [`TokenCache`](crate::token_cache::TokenCache):
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_describe_installation_repositories_and_permissions() {
        use crate::scope::Level;
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
