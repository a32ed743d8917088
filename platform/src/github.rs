//! The GitHub App provider: installation access tokens minted with the App's
//! private key.
//!
//! GitHub's flow: sign a short JWT (RS256, `iss` = App ID or client ID) with
//! the App's key, then `POST {api}/app/installations/{id}/access_tokens` with
//! it to get an installation token that lives about an hour. Everything
//! upstream's version skipped is here: the status is checked, the body is
//! size-capped and parsed as JSON, every call has connect and total
//! timeouts, redirects are refused (they would carry the JWT elsewhere), and
//! tokens are cached and refreshed through one
//! [`TokenCache`](crate::provider::TokenCache) so GitHub sees one call per
//! token lifetime whatever the request rate.
//!
//! With grants, each owner's installation is found from the App itself
//! (`GET /app/installations`, paginated through `Link`), cached for
//! [`INSTALLATIONS_TTL`] and bounded, and tokens are minted with the
//! grant's `repositories` and `permissions`, one cache per (installation,
//! repositories, permissions) in [`ScopedCaches`]: workspaces with the same
//! grant share one token.
//!
//! What GitHub answers is read as GitHub documents it (its OpenAPI
//! description, checked by the stand-in the tests run against): a mint
//! answer carries a full repository object per repository asked for, so it
//! is read up to [`MAX_ANSWER_BYTES`] (500 repositories); a listing item
//! whose account is an enterprise or `null` is skipped, not a failure; a
//! failed listing is shared by the requests that come within
//! [`FAILURE_COOLDOWN`]; GitHub's rate limits (`retry-after`,
//! `x-ratelimit-remaining`/`x-ratelimit-reset`, a 429) hold every request to
//! GitHub until they end, once for the App; 422 and 403 become refusals with
//! GitHub's reason and 404 forgets the installation (the next request lists
//! again). [`crate::answer`] says what each becomes for a workspace.
//!
//! Signing uses jsonwebtoken's `aws_lc_rs` backend: the `rust_crypto` one
//! pulls in the `rsa` crate (RUSTSEC-2023-0071).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use credd_core::repository::MAX_REPOSITORIES_PER_TOKEN;

use crate::grants::Scope;
use crate::provider::{
    Clock, FAILURE_COOLDOWN, IssuedToken, ProviderError, REFRESH_WINDOW, RefusalFuture,
    ServedFuture, ServedToken, TokenFuture, TokenProvider, TokenRequest,
};
use crate::scoped::{MintKey, ScopedCaches};

/// GitHub's public API.
pub const DEFAULT_API_URL: &str = "https://api.github.com";
/// The REST API version we speak (`X-GitHub-Api-Version`).
pub const GITHUB_API_VERSION: &str = "2022-11-28";
/// Largest `repository` object GitHub puts in a mint answer for one
/// repository. GitHub's own example is about 5.6 KB; with the longest owner
/// (39 characters) and name (100) in each of its URLs it stays well under
/// this (test `the_largest_repository_object_fits`).
pub const MAX_REPOSITORY_OBJECT_BYTES: usize = 16 * 1024;
/// Largest mint answer read: GitHub answers a mint with a full repository
/// object for each repository asked for, and a token can be minted for
/// [`MAX_REPOSITORIES_PER_TOKEN`]; plus the token and permissions.
pub const MAX_ANSWER_BYTES: usize =
    MAX_REPOSITORIES_PER_TOKEN * MAX_REPOSITORY_OBJECT_BYTES + 64 * 1024;
/// The buffer a mint answer starts in when GitHub does not say its length
/// (a token with a few repositories fits; larger answers grow it).
const INITIAL_ANSWER_BUFFER: usize = 64 * 1024;
/// Longest GitHub's rate limit is held: a `retry-after` or
/// `x-ratelimit-reset` further away (a clock error, a garbled header) is
/// held this long, then GitHub is asked again.
pub const MAX_RATE_LIMIT_HOLD: Duration = Duration::from_secs(60 * 60);
/// How long a secondary rate limit without `retry-after` is held the first
/// time (GitHub: "wait for at least one minute"); it doubles while they
/// repeat, up to 64 times this.
pub const BARE_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);
/// Largest private key file accepted.
pub const MAX_KEY_BYTES: usize = 64 * 1024;
/// Largest page of `GET /app/installations` read (100 installations with
/// their account objects are far smaller; no secret is in it).
pub const MAX_LISTING_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Most pages of `GET /app/installations` read (of 100 each): the bound on
/// installations known.
pub const MAX_INSTALLATION_PAGES: usize = 100;
/// How long the owner → installation table is trusted.
pub const INSTALLATIONS_TTL: Duration = Duration::from_secs(10 * 60);
/// An owner missing from the table makes the platform list installations
/// again only when the table is older than this (a new installation shows
/// up within it; unknown owners cannot make it list on every request).
pub const RELIST_AFTER_MISS: Duration = Duration::from_secs(30);

/// JWT `iat` is backdated this much to absorb clock drift (GitHub's advice).
const JWT_BACKDATE: SignedDuration = SignedDuration::from_secs(60);
/// JWT lifetime from now; GitHub refuses more than 10 minutes.
const JWT_LIFETIME: SignedDuration = SignedDuration::from_secs(9 * 60);

/// Everything needed to mint installation tokens for one GitHub App.
pub struct GitHubAppConfig {
    /// The JWT issuer: the App ID, or the App's client ID.
    pub issuer: String,
    /// The installation whose token is minted.
    pub installation_id: u64,
    /// The App's private key, PEM (PKCS#1 `RSA PRIVATE KEY` or PKCS#8
    /// `PRIVATE KEY`).
    pub private_key_pem: SecretString,
    /// API base URL (`https://api.github.com`, a GitHub Enterprise
    /// `https://HOST/api/v3`, or a test server).
    pub api_url: String,
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// Time allowed for one whole call, body included.
    pub request_timeout: Duration,
    /// Replace a cached token this long before it expires.
    pub refresh_window: Duration,
    /// `User-Agent` sent to GitHub (it requires one).
    pub user_agent: String,
}

impl fmt::Debug for GitHubAppConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHubAppConfig")
            .field("issuer", &self.issuer)
            .field("installation_id", &self.installation_id)
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

impl GitHubAppConfig {
    /// A configuration with default timeouts (connect 5 s, call 15 s) and
    /// the default refresh window (5 min).
    pub fn new(
        issuer: impl Into<String>,
        installation_id: u64,
        private_key_pem: SecretString,
        api_url: impl Into<String>,
    ) -> Self {
        Self {
            issuer: issuer.into(),
            installation_id,
            private_key_pem,
            api_url: api_url.into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            refresh_window: REFRESH_WINDOW,
            user_agent: concat!("molecule-platform/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iat: i64,
    exp: i64,
    iss: &'a str,
}

#[derive(Deserialize)]
struct AccessTokenAnswer {
    token: SecretString,
    expires_at: String,
}

#[derive(Deserialize)]
struct GitHubErrorBody {
    message: Option<String>,
    #[serde(default)]
    errors: Vec<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

#[derive(Deserialize)]
struct AccessTokenPermissions {
    #[serde(default)]
    permissions: BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize)]
struct MintBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    repositories: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    permissions: Option<BTreeMap<&'a str, &'static str>>,
}

/// One item of `GET /app/installations`, read leniently: GitHub's
/// `installation` has an `account` that is a user or organisation (with a
/// `login`), an enterprise (a `slug`, no `login`) or `null`. Only the first
/// can be an owner a grant names; the others are skipped, never a reason
/// to fail the listing.
#[derive(Deserialize)]
struct InstallationAnswer {
    id: u64,
    #[serde(default)]
    account: Option<serde_json::Value>,
}

/// Owner (lowercased) → installation, as last listed, and the last listing's
/// failure (shared by the requests that come within [`FAILURE_COOLDOWN`]).
#[derive(Default)]
struct Directory {
    by_owner: HashMap<String, u64>,
    listed_at: Option<Timestamp>,
    /// Listings attempted, successful or not: a request that waited for
    /// another's listing takes its result instead of listing again.
    attempts: u64,
    failure: Option<(Timestamp, ProviderError)>,
}

/// GitHub's rate limit on the App, as last answered: no request goes to
/// GitHub before `until`.
#[derive(Default)]
struct Hold {
    until: Option<Timestamp>,
    /// Secondary limits without `retry-after` in a row: each waits twice the
    /// one before (GitHub: "at least one minute", then exponentially).
    bare_streak: u32,
}

/// Mints and caches installation tokens for one GitHub App: the configured
/// installation's, and each granted owner's.
pub struct GitHubAppProvider {
    issuer: String,
    key: EncodingKey,
    api_url: String,
    default_installation: u64,
    endpoint: String,
    http: reqwest::Client,
    request_timeout: Duration,
    caches: ScopedCaches,
    directory: Mutex<Directory>,
    listing: tokio::sync::Mutex<()>,
    hold: Mutex<Hold>,
    /// Replicas' shared state: the installations table and GitHub's rate
    /// limit are read from and written to it (see [`crate::shared`]).
    shared: Option<std::sync::Arc<crate::shared::SharedStore>>,
    calls: AtomicU64,
    listings: AtomicU64,
}

/// The shared record of the installations table.
const INSTALLATIONS_RECORD: &str = "github:installations";
/// The shared record of GitHub's rate limit on the App.
const RATE_LIMIT_RECORD: &str = "github:rate-limit";

/// The installations table as replicas share it.
#[derive(Serialize, Deserialize)]
struct SharedDirectory {
    /// When it was listed (Unix seconds, the lister's clock).
    listed_at: i64,
    by_owner: HashMap<String, u64>,
}

/// GitHub's rate limit on the App as replicas share it.
#[derive(Serialize, Deserialize)]
struct SharedHold {
    /// No request goes to GitHub before this (Unix seconds).
    until: i64,
}

impl fmt::Debug for GitHubAppProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHubAppProvider")
            .field("issuer", &self.issuer)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

impl GitHubAppProvider {
    /// Checks `config` (key parses and signs, URL is http(s), ids are sane)
    /// and builds the provider. Errors are [`ProviderError::Config`].
    pub fn new(config: GitHubAppConfig) -> Result<Self, ProviderError> {
        Self::with_clock(config, Clock::system())
    }

    /// Like [`GitHubAppProvider::new`], reading time from `clock` (JWT
    /// claims, cache decisions and rate limits).
    pub fn with_clock(config: GitHubAppConfig, clock: Clock) -> Result<Self, ProviderError> {
        let issuer = config.issuer.trim().to_owned();
        if issuer.is_empty()
            || issuer.len() > 64
            || !issuer
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
        {
            return Err(ProviderError::Config(
                "the App ID / client ID must be 1-64 characters of letters, digits, '.', '_' or '-'".into(),
            ));
        }
        if config.installation_id == 0 {
            return Err(ProviderError::Config(
                "the installation ID must be a positive number".into(),
            ));
        }
        let api_url = config.api_url.trim().trim_end_matches('/');
        if !(api_url.starts_with("https://") || api_url.starts_with("http://"))
            || api_url.len() > 2048
            || api_url.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ProviderError::Config(format!(
                "the GitHub API URL must be an http(s) URL such as {DEFAULT_API_URL}, got {api_url:?}"
            )));
        }
        let pem = config.private_key_pem.expose_secret().as_bytes();
        if pem.len() > MAX_KEY_BYTES {
            return Err(ProviderError::Config(format!(
                "the private key is larger than {MAX_KEY_BYTES} bytes: is it the right file?"
            )));
        }
        let key = EncodingKey::from_rsa_pem(pem).map_err(|e| {
            ProviderError::Config(format!(
                "the private key is not an RSA key in PEM form (PKCS#1 or PKCS#8): {e}"
            ))
        })?;
        let endpoint = format!(
            "{api_url}/app/installations/{}/access_tokens",
            config.installation_id
        );
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(config.user_agent)
            .build()
            .map_err(|e| {
                ProviderError::Config(format!(
                    "cannot build the HTTP client: {}",
                    credd_core::text::error_chain(&e)
                ))
            })?;
        let provider = Self {
            issuer,
            key,
            api_url: api_url.to_owned(),
            default_installation: config.installation_id,
            endpoint,
            http,
            request_timeout: config.request_timeout,
            caches: ScopedCaches::new(config.refresh_window, clock),
            directory: Mutex::default(),
            listing: tokio::sync::Mutex::new(()),
            hold: Mutex::default(),
            shared: None,
            calls: AtomicU64::new(0),
            listings: AtomicU64::new(0),
        };
        // Sign once now so a key that parses but cannot sign refuses to start
        // instead of failing the first request an hour later.
        provider.jwt(provider.now())?;
        Ok(provider)
    }

    /// Shares this provider's tokens with other replicas through `store`
    /// (see [`crate::shared`]).
    pub fn with_shared(mut self, store: std::sync::Arc<crate::shared::SharedStore>) -> Self {
        self.caches = self.caches.with_shared(store.clone());
        self.shared = Some(store);
        self
    }

    /// `Err(RateLimited)` while a rate limit another replica was told about
    /// holds (read before each request to GitHub: they are rare, one per
    /// token lifetime per grant, so one Redis read each costs nothing).
    async fn check_shared_hold(&self) -> Result<(), ProviderError> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let Some(plain) = shared.get_record(RATE_LIMIT_RECORD).await else {
            return Ok(());
        };
        let until = serde_json::from_slice::<SharedHold>(&plain)
            .ok()
            .and_then(|hold| Timestamp::from_second(hold.until).ok());
        match until {
            Some(until) if until > self.now() => {
                crate::metrics::metrics().held();
                Err(self.hold_until(until, "announced to another replica"))
            }
            _ => Ok(()),
        }
    }

    /// Holds every request to GitHub until `until`, on this replica and,
    /// shared, on every other before this returns.
    async fn hold(&self, until: Timestamp, why: &str) -> ProviderError {
        let error = self.hold_until(until, why);
        if let (Some(shared), ProviderError::RateLimited { until, wait }) = (&self.shared, &error) {
            let record = SharedHold {
                until: until.as_second(),
            };
            if let Ok(plain) = serde_json::to_vec(&record) {
                shared
                    .put_record(RATE_LIMIT_RECORD, &plain, *wait + Duration::from_secs(1))
                    .await;
            }
        }
        error
    }

    /// The installations table another replica listed, if it is no older
    /// than `INSTALLATIONS_TTL` (a lister's clock ahead of ours counts as
    /// now).
    async fn shared_directory(&self) -> Option<(Timestamp, HashMap<String, u64>)> {
        let plain = self
            .shared
            .as_ref()?
            .get_record(INSTALLATIONS_RECORD)
            .await?;
        let record: SharedDirectory = serde_json::from_slice(&plain).ok()?;
        let now = self.now();
        let listed_at = Timestamp::from_second(record.listed_at).ok()?.min(now);
        let by_owner = record
            .by_owner
            .into_iter()
            .filter(|(owner, id)| {
                *id > 0
                    && credd_core::repository::is_valid_owner(owner)
                    && *owner == owner.to_ascii_lowercase()
            })
            .collect();
        (now.duration_since(listed_at) < signed(INSTALLATIONS_TTL)).then_some((listed_at, by_owner))
    }

    /// Shares the table this replica just listed.
    async fn share_directory(&self, listed_at: Timestamp, by_owner: HashMap<String, u64>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let record = SharedDirectory {
            listed_at: listed_at.as_second(),
            by_owner,
        };
        if let Ok(plain) = serde_json::to_vec(&record) {
            shared
                .put_record(INSTALLATIONS_RECORD, &plain, INSTALLATIONS_TTL)
                .await;
        }
    }

    /// The installation of `owner` as this replica or another already
    /// knows it, asking GitHub nothing (a refusal's keys: a token of an
    /// owner nobody resolved was never minted).
    async fn known_installation(&self, owner: &str) -> Option<u64> {
        if let Some(id) = self.cached_installation(owner) {
            return Some(id);
        }
        let (_, table) = self.shared_directory().await?;
        table.get(&owner.to_ascii_lowercase()).copied()
    }

    fn now(&self) -> Timestamp {
        self.caches.clock().now()
    }

    /// How many calls to GitHub's token endpoint were made so far.
    pub fn upstream_calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Pages of `GET /app/installations` read so far.
    pub fn listing_calls(&self) -> u64 {
        self.listings.load(Ordering::SeqCst)
    }

    /// The access-token URL this provider posts to for the configured
    /// installation.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// When GitHub's rate limit on the App ends, while it holds.
    pub fn rate_limited_until(&self) -> Option<Timestamp> {
        let hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
        hold.until.filter(|until| *until > self.now())
    }

    /// `Err(RateLimited)` while GitHub's limit holds: then nothing may be
    /// asked of GitHub (the mint and the listing are both the App's JWT
    /// requests, so one hold covers every installation and scope).
    fn check_hold(&self) -> Result<(), ProviderError> {
        let now = self.now();
        let hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
        match hold.until {
            Some(until) if now < until => {
                crate::metrics::metrics().held();
                Err(ProviderError::RateLimited {
                    until,
                    wait: until.duration_since(now).unsigned_abs(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Holds every request to GitHub until `until` (bounded by
    /// [`MAX_RATE_LIMIT_HOLD`]); logs one line when an episode begins.
    fn hold_until(&self, until: Timestamp, why: &str) -> ProviderError {
        let now = self.now();
        let until = until
            .max(now + SignedDuration::from_secs(1))
            .min(now + signed(MAX_RATE_LIMIT_HOLD));
        let mut hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
        let new_episode = hold.until.is_none_or(|held| held <= now);
        if new_episode || hold.until.is_some_and(|held| held < until) {
            hold.until = Some(until);
        }
        let until = hold.until.unwrap_or(until);
        drop(hold);
        crate::metrics::metrics().rate_limited(until.as_second(), new_episode);
        let wait = until.duration_since(now).unsigned_abs();
        if new_episode {
            tracing::warn!(
                "[github] GitHub rate limits the App ({why}): no request goes to GitHub until {until} ({} s); workspaces needing a new token get 503 with Retry-After",
                wait.as_secs()
            );
        }
        ProviderError::RateLimited { until, wait }
    }

    /// The rate limit an answer announces, if any (GitHub's rules for its
    /// REST API): a 403 or 429 with `retry-after` waits that long; with
    /// `x-ratelimit-remaining: 0`, until `x-ratelimit-reset`; a 429, or a
    /// 403 whose message names a rate limit, without either header waits a
    /// minute, doubling while it repeats. Any answer with
    /// `x-ratelimit-remaining: 0` (a success too) holds until the reset.
    fn rate_limit_of(
        &self,
        status: u16,
        headers: &reqwest::header::HeaderMap,
        message: Option<&str>,
    ) -> Option<(Timestamp, &'static str)> {
        let now = self.now();
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let retry_after = text("retry-after").and_then(|v| {
            let v = v.trim();
            match v.parse::<u64>() {
                Ok(secs) => Some(now + signed(Duration::from_secs(secs.min(86_400)))),
                Err(_) => httpdate::parse_http_date(v)
                    .ok()
                    .and_then(|t| Timestamp::try_from(t).ok()),
            }
        });
        let used_up = text("x-ratelimit-remaining").is_some_and(|v| v.trim() == "0");
        let reset = text("x-ratelimit-reset")
            .and_then(|v| v.trim().parse::<i64>().ok())
            .and_then(|secs| Timestamp::from_second(secs).ok());
        let limited_status = status == 403 || status == 429;
        if limited_status && let Some(until) = retry_after {
            return Some((until, "secondary rate limit, retry-after"));
        }
        if used_up {
            let until = reset.unwrap_or(now + SignedDuration::from_secs(60));
            return Some((until, "primary rate limit used up, x-ratelimit-reset"));
        }
        let says_limit = message.is_some_and(|m| m.to_ascii_lowercase().contains("rate limit"));
        if status == 429 || (status == 403 && says_limit) {
            let mut hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
            let factor = 1u32 << hold.bare_streak.min(6);
            hold.bare_streak = hold.bare_streak.saturating_add(1);
            let wait = BARE_RATE_LIMIT_WAIT.saturating_mul(factor);
            return Some((
                now + signed(wait),
                "secondary rate limit without retry-after: waiting a minute, doubling",
            ));
        }
        None
    }

    fn cached_installation(&self, owner: &str) -> Option<u64> {
        self.directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_owner
            .get(&owner.to_ascii_lowercase())
            .copied()
    }

    /// GitHub said installation `id` does not exist: forget it and make the
    /// next request list installations at once.
    fn forget_installation(&self, id: u64) {
        let mut directory = self
            .directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        directory.by_owner.retain(|_, known| *known != id);
        directory.listed_at = None;
        directory.failure = None;
    }

    /// The installation of `owner`, from the table when it is recent enough,
    /// else listed again: one listing at a time, and requests that waited
    /// for a listing (or come within [`FAILURE_COOLDOWN`] of a failed one)
    /// take its result instead of listing again.
    async fn installation_of(&self, owner: &str) -> Result<u64, ProviderError> {
        let key = owner.to_ascii_lowercase();
        let fresh = |listed_at: Option<Timestamp>, within: Duration, now: Timestamp| {
            listed_at.is_some_and(|at| now.duration_since(at) < signed(within))
        };
        let lookup =
            |directory: &Directory, now: Timestamp| -> Option<Result<u64, ProviderError>> {
                let known = directory.by_owner.get(&key).copied();
                match known {
                    Some(id) if fresh(directory.listed_at, INSTALLATIONS_TTL, now) => {
                        return Some(Ok(id));
                    }
                    None if fresh(directory.listed_at, RELIST_AFTER_MISS, now) => {
                        return Some(Err(ProviderError::NotInstalled(owner.to_owned())));
                    }
                    _ => {}
                }
                match &directory.failure {
                    Some((at, error))
                        if now.duration_since(*at) < signed(FAILURE_COOLDOWN)
                            && error.stands_at(now) =>
                    {
                        Some(known.ok_or_else(|| error.clone()))
                    }
                    _ => None,
                }
            };
        let seen = {
            let directory = self
                .directory
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(answer) = lookup(&directory, self.now()) {
                return answer;
            }
            directory.attempts
        };
        let _flight = self.listing.lock().await;
        {
            let directory = self
                .directory
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if directory.attempts != seen {
                // Someone listed while we waited: take that.
                if let Some(answer) = lookup(&directory, self.now()) {
                    return answer;
                }
            }
        }
        if let Some((listed_at, table)) = self.shared_directory().await {
            // Another replica listed recently: take its table.
            let mut directory = self
                .directory
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if directory.listed_at.is_none_or(|at| at < listed_at) {
                directory.by_owner = table;
                directory.listed_at = Some(listed_at);
                directory.failure = None;
            }
            if let Some(answer) = lookup(&directory, self.now()) {
                return answer;
            }
        }
        let listed = self.list_installations().await;
        let now = self.now();
        if let Ok(table) = &listed {
            self.share_directory(now, table.clone()).await;
        }
        let mut directory = self
            .directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        directory.attempts += 1;
        match listed {
            Ok(table) => {
                directory.by_owner = table;
                directory.listed_at = Some(now);
                directory.failure = None;
            }
            Err(error) => {
                directory.failure = Some((now, error.clone()));
                if let Some(id) = directory.by_owner.get(&key) {
                    tracing::warn!(
                        "[github] listing installations failed, using the known installation of {owner}: {error}"
                    );
                    return Ok(*id);
                }
                return Err(error);
            }
        }
        directory
            .by_owner
            .get(&key)
            .copied()
            .ok_or_else(|| ProviderError::NotInstalled(owner.to_owned()))
    }

    /// Every installation of the App on an account a grant can name, owner
    /// (lowercased) → id, following `Link: <…>; rel="next"` on the API's own
    /// origin only. Installations on an enterprise or without an account
    /// are skipped (counted in one log line per listing).
    async fn list_installations(&self) -> Result<HashMap<String, u64>, ProviderError> {
        let mut table = HashMap::new();
        let mut skipped = 0usize;
        let mut url = format!("{}/app/installations?per_page=100", self.api_url);
        for _ in 0..MAX_INSTALLATION_PAGES {
            self.check_hold()?;
            self.check_shared_hold().await?;
            let jwt = self.jwt(self.now())?;
            self.listings.fetch_add(1, Ordering::SeqCst);
            let response = self
                .http
                .get(&url)
                .bearer_auth(jwt.as_str())
                .header(reqwest::header::ACCEPT, "application/vnd.github+json")
                .header("X-GitHub-Api-Version", GITHUB_API_VERSION)
                .send()
                .await
                .map_err(|e| self.classify(&e))?;
            drop(jwt);
            let status = response.status();
            let headers = response.headers().clone();
            let next = headers
                .get(reqwest::header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_link);
            let body = self.read_limited(response, MAX_LISTING_PAGE_BYTES).await?;
            if !status.is_success() {
                return Err(self
                    .upstream_error(status.as_u16(), &headers, &body, None)
                    .await);
            }
            if let Some((until, why)) = self.rate_limit_of(status.as_u16(), &headers, None) {
                // Used up by this very request: later pages wait.
                let _ = self.hold(until, why).await;
            }
            let page: Vec<serde_json::Value> =
                serde_json::from_slice(&body).map_err(|e| describe_json_error(&e))?;
            for item in page {
                let login = serde_json::from_value::<InstallationAnswer>(item)
                    .ok()
                    .and_then(|i| {
                        let login = i.account?.get("login")?.as_str()?.to_owned();
                        credd_core::repository::is_valid_owner(&login).then_some((login, i.id))
                    });
                match login {
                    Some((login, id)) => {
                        table.insert(login.to_ascii_lowercase(), id);
                    }
                    None => skipped += 1,
                }
            }
            match next {
                None => {
                    if skipped > 0 {
                        tracing::info!(
                            "[github] installations listed: {} usable, {skipped} skipped (an enterprise account, no account, or a login no grant can name)",
                            table.len()
                        );
                    }
                    return Ok(table);
                }
                Some(next) if next.starts_with(&format!("{}/", self.api_url)) => url = next,
                Some(_) => {
                    return Err(ProviderError::Malformed(
                        "the installations listing links to another host".into(),
                    ));
                }
            }
        }
        tracing::warn!(
            "[github] the App has more than {} installations: only the first {} pages are used",
            MAX_INSTALLATION_PAGES * 100,
            MAX_INSTALLATION_PAGES
        );
        Ok(table)
    }

    async fn serve(&self, request: TokenRequest) -> Result<ServedToken, ProviderError> {
        let scope = request.scope.as_ref();
        let mut installation = match scope {
            None => self.default_installation,
            Some(scope) => self.installation_of(&scope.owner).await?,
        };
        let mut relisted = false;
        loop {
            match self.serve_from(installation, &request).await {
                Err(ProviderError::InstallationGone(gone)) if scope.is_some() => {
                    let owner = scope.map_or("", |s| s.owner.as_str());
                    // Uninstalled, or reinstalled under a new id: list at
                    // once (the table just forgot it) and try the new id
                    // once, so this very request sees either.
                    match self.installation_of(owner).await {
                        Ok(id) if id != gone && !relisted => {
                            relisted = true;
                            installation = id;
                        }
                        Ok(_) | Err(ProviderError::NotInstalled(_)) => {
                            return Err(ProviderError::NotInstalled(owner.to_owned()));
                        }
                        Err(other) => return Err(other),
                    }
                }
                other => return other,
            }
        }
    }

    async fn serve_from(
        &self,
        installation: u64,
        request: &TokenRequest,
    ) -> Result<ServedToken, ProviderError> {
        let scope = request.scope.as_ref();
        let key = MintKey::new(installation, scope);
        let slot = self.caches.slot(&key);
        let issued = slot
            .cache
            .get_or_refresh_with(request.min_remaining, || async {
                let (token, stated) = self.fetch(installation, scope).await?;
                let permissions = if stated.is_empty() {
                    scope
                        .and_then(|s| s.permissions.as_ref())
                        .map(|p| {
                            p.iter()
                                .map(|(k, v)| (k.clone(), v.as_str().to_owned()))
                                .collect()
                        })
                        .unwrap_or_default()
                } else {
                    stated
                };
                slot.set_permissions(permissions);
                Ok(token)
            })
            .await?;
        Ok(ServedToken {
            issued,
            owner: scope.map(|s| s.owner.clone()),
            repositories: scope.and_then(Scope::full_names),
            permissions: slot.permissions(),
        })
    }

    fn jwt(&self, now: Timestamp) -> Result<Zeroizing<String>, ProviderError> {
        let claims = Claims {
            iat: (now - JWT_BACKDATE).as_second(),
            exp: (now + JWT_LIFETIME).as_second(),
            iss: &self.issuer,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map(Zeroizing::new)
            .map_err(|e| {
                ProviderError::Config(format!("cannot sign the App JWT with the private key: {e}"))
            })
    }

    /// Mints a token of `installation`, scoped as `scope` says; the token
    /// and the permissions GitHub's answer states. Nothing is sent while
    /// GitHub's rate limit holds.
    async fn fetch(
        &self,
        installation: u64,
        scope: Option<&Scope>,
    ) -> Result<(IssuedToken, BTreeMap<String, String>), ProviderError> {
        self.check_hold()?;
        self.check_shared_hold().await?;
        let jwt = self.jwt(self.now())?;
        self.calls.fetch_add(1, Ordering::SeqCst);
        let endpoint = if installation == self.default_installation {
            self.endpoint.clone()
        } else {
            format!(
                "{}/app/installations/{installation}/access_tokens",
                self.api_url
            )
        };
        let mut post = self
            .http
            .post(&endpoint)
            .bearer_auth(jwt.as_str())
            .header(reqwest::header::ACCEPT, "application/vnd.github+json")
            .header("X-GitHub-Api-Version", GITHUB_API_VERSION);
        if let Some(scope) = scope
            && (scope.repositories.is_some() || scope.permissions.is_some())
        {
            let body = MintBody {
                repositories: scope.repositories.as_deref(),
                permissions: scope.permissions.as_ref().map(|p| {
                    p.iter()
                        .map(|(name, level)| (name.as_str(), level.as_str()))
                        .collect()
                }),
            };
            let body = serde_json::to_vec(&body).map_err(|e| {
                ProviderError::Config(format!("cannot encode the mint request: {e}"))
            })?;
            post = post
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = post.send().await.map_err(|e| self.classify(&e))?;
        drop(jwt);
        let status = response.status();
        let headers = response.headers().clone();
        let body = self.read_body(response).await?;
        if !status.is_success() {
            return Err(self
                .upstream_error(status.as_u16(), &headers, &body, Some(installation))
                .await);
        }
        if let Some((until, why)) = self.rate_limit_of(status.as_u16(), &headers, None) {
            let _ = self.hold(until, why).await;
        } else {
            self.hold
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .bare_streak = 0;
        }
        let answer: AccessTokenAnswer =
            serde_json::from_slice(&body).map_err(|e| describe_json_error(&e))?;
        let stated: BTreeMap<String, String> =
            serde_json::from_slice::<AccessTokenPermissions>(&body)
                .map(|a| {
                    a.permissions
                        .into_iter()
                        .filter_map(|(k, v)| {
                            let level = v.as_str()?;
                            (crate::grants::valid_permission_name(&k)
                                && level.len() <= 16
                                && level.bytes().all(|b| b.is_ascii_lowercase()))
                            .then(|| (k, level.to_owned()))
                        })
                        .take(crate::grants::MAX_PERMISSIONS)
                        .collect()
                })
                .unwrap_or_default();
        // Opaque: classic or stateless (`ghs_<APPID>_<JWT>`), bounded by
        // credd-core's one limit.
        credd_core::secret::check_token_text(answer.token.expose_secret())
            .map_err(|e| ProviderError::Malformed(e.to_string()))?;
        let expires_at: Timestamp = answer.expires_at.trim().parse().map_err(|_| {
            ProviderError::Malformed(format!(
                "expires_at is not an RFC 3339 timestamp ({} characters)",
                answer.expires_at.len()
            ))
        })?;
        let issued = IssuedToken {
            token: answer.token,
            expires_at,
        };
        tracing::info!(
            "[github] installation token minted (fingerprint {}, expires at {}, installation {installation})",
            issued.fingerprint(),
            issued.expires_at
        );
        Ok((issued, stated))
    }

    /// A non-success answer as an error, by what GitHub says: a rate limit
    /// (held), 404 for the installation (forgotten: the next request lists
    /// again), 422 and 403 as refusals with GitHub's reason, the rest by
    /// status. GitHub's `message` is sanitised; the body is never kept.
    async fn upstream_error(
        &self,
        status: u16,
        headers: &reqwest::header::HeaderMap,
        body: &[u8],
        installation: Option<u64>,
    ) -> ProviderError {
        let answer = serde_json::from_slice::<GitHubErrorBody>(body).ok();
        let message = answer.as_ref().and_then(|a| a.message.as_deref());
        if let Some((until, why)) = self.rate_limit_of(status, headers, message) {
            return self.hold(until, why).await;
        }
        let detail = message.map(sanitize);
        match (status, installation) {
            (404, Some(installation)) => {
                self.forget_installation(installation);
                if let Some(shared) = &self.shared {
                    shared.remove_record(INSTALLATIONS_RECORD).await;
                }
                ProviderError::InstallationGone(installation)
            }
            (403 | 422, Some(_)) => {
                let mut reason = detail.unwrap_or_else(|| "no reason given".to_owned());
                for error in answer.iter().flat_map(|a| &a.errors).take(3) {
                    if let Some(text) = error.message.as_deref().or(error.code.as_deref()) {
                        reason.push_str("; ");
                        reason.push_str(&sanitize(text));
                    }
                }
                ProviderError::Refused { status, reason }
            }
            _ => ProviderError::UpstreamStatus { status, detail },
        }
    }

    /// A body of at most `limit` bytes (no secret in it: not zeroized).
    async fn read_limited(
        &self,
        mut response: reqwest::Response,
        limit: usize,
    ) -> Result<Vec<u8>, ProviderError> {
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(ProviderError::Malformed(format!(
                "answer larger than {limit} bytes"
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.classify(&e))? {
            if body.len() + chunk.len() > limit {
                return Err(ProviderError::Malformed(format!(
                    "answer larger than {limit} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// A mint answer (it holds the token) of at most [`MAX_ANSWER_BYTES`].
    /// Grown by hand: each larger buffer is a new zeroizing one and the old
    /// is wiped as it goes, so no copy of the token is left in freed memory
    /// (a plain `Vec` would reallocate without wiping).
    async fn read_body(
        &self,
        mut response: reqwest::Response,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let too_large =
            || ProviderError::Malformed(format!("answer larger than {MAX_ANSWER_BYTES} bytes"));
        let declared = response.content_length();
        if declared.is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
            return Err(too_large());
        }
        let initial = declared.map_or(INITIAL_ANSWER_BUFFER, |n| n as usize);
        let mut body = Zeroizing::new(Vec::with_capacity(initial.min(MAX_ANSWER_BYTES)));
        while let Some(chunk) = response.chunk().await.map_err(|e| self.classify(&e))? {
            let needed = body.len() + chunk.len();
            if needed > MAX_ANSWER_BYTES {
                return Err(too_large());
            }
            if needed > body.capacity() {
                let capacity = needed.max(body.capacity() * 2).min(MAX_ANSWER_BYTES);
                let mut larger = Zeroizing::new(Vec::with_capacity(capacity));
                larger.extend_from_slice(&body);
                body = larger;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn classify(&self, error: &reqwest::Error) -> ProviderError {
        if error.is_timeout() {
            ProviderError::Timeout(self.request_timeout)
        } else {
            ProviderError::Transport(credd_core::text::error_chain(error))
        }
    }
}

/// The `rel="next"` target of a `Link` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"");
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| target.to_owned())
    })
}

/// GitHub's error `message`, reduced to printable ASCII and 200 characters.
fn sanitize(message: &str) -> String {
    message
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect()
}

/// A JSON error described without quoting the input (it may hold the token).
fn describe_json_error(error: &serde_json::Error) -> ProviderError {
    use serde_json::error::Category;
    let what = match error.classify() {
        Category::Io => "unreadable".to_owned(),
        Category::Syntax | Category::Eof => "not JSON".to_owned(),
        Category::Data => {
            let text = error.to_string();
            if text.starts_with("missing field") {
                // serde's own wording names the field, never a value.
                text.split(" at line")
                    .next()
                    .unwrap_or("missing field")
                    .to_owned()
            } else {
                "unexpected JSON shape".to_owned()
            }
        }
    };
    ProviderError::Malformed(format!(
        "{what} (line {}, column {})",
        error.line(),
        error.column()
    ))
}

impl TokenProvider for GitHubAppProvider {
    fn token(&self) -> TokenFuture<'_> {
        crate::provider::unscoped_token(self.serve(TokenRequest::default()))
    }

    fn scoped_token(&self, request: TokenRequest) -> ServedFuture<'_> {
        Box::pin(self.serve(request))
    }

    fn report_refusal(
        &self,
        workspace: String,
        scopes: Vec<Option<Scope>>,
        sha256: [u8; 32],
    ) -> RefusalFuture<'_> {
        Box::pin(async move {
            let mut keys = Vec::with_capacity(scopes.len());
            for scope in &scopes {
                match scope {
                    None => keys.push(MintKey::new(self.default_installation, None)),
                    Some(s) => {
                        if let Some(id) = self.known_installation(&s.owner).await {
                            keys.push(MintKey::new(id, Some(s)));
                        }
                    }
                }
            }
            self.caches.report(&workspace, &keys, &sha256).await
        })
    }
}

crate::registry::github_token_plugin!(GitHubAppProvider, "github-app-auth");

#[cfg(test)]
mod tests {
    use super::*;

    fn config(key: &str) -> GitHubAppConfig {
        GitHubAppConfig::new(
            "12345",
            42,
            SecretString::from(key.to_owned()),
            "http://127.0.0.1:9",
        )
    }

    #[test]
    fn garbage_key_is_a_config_error() {
        let err = GitHubAppProvider::new(config("not a key")).unwrap_err();
        assert!(matches!(err, ProviderError::Config(_)), "{err}");
        assert!(err.to_string().contains("PEM"), "{err}");
    }

    #[test]
    fn bad_ids_and_urls_are_refused() {
        let mut c = config("x");
        c.installation_id = 0;
        assert!(
            GitHubAppProvider::new(c)
                .unwrap_err()
                .to_string()
                .contains("installation ID")
        );
        let mut c = config("x");
        c.issuer = "12 34".into();
        assert!(
            GitHubAppProvider::new(c)
                .unwrap_err()
                .to_string()
                .contains("App ID")
        );
        let mut c = config("x");
        c.api_url = "ftp://example".into();
        assert!(
            GitHubAppProvider::new(c)
                .unwrap_err()
                .to_string()
                .contains("URL")
        );
    }

    #[test]
    fn next_links() {
        let header = r#"<https://api.github.com/app/installations?page=2>; rel="next", <https://api.github.com/app/installations?page=5>; rel="last""#;
        assert_eq!(
            next_link(header).as_deref(),
            Some("https://api.github.com/app/installations?page=2")
        );
        assert_eq!(next_link(r#"<https://x/?page=1>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn json_errors_never_quote_values() {
        let secret = "ghs_SECRETSECRETSECRET";
        for body in [
            format!(r#"{{"token": {{"x": "{secret}"}}, "expires_at": "2030-01-01T00:00:00Z"}}"#),
            format!(r#"{{"token": "{secret}""#),
            format!(r#"{{"token": "{secret}", "expires_at": 5}}"#),
        ] {
            let err = serde_json::from_str::<AccessTokenAnswer>(&body)
                .err()
                .unwrap();
            let text = describe_json_error(&err).to_string();
            assert!(!text.contains("SECRET"), "{text}");
        }
        let err = serde_json::from_str::<AccessTokenAnswer>(r#"{"expires_at":"x"}"#)
            .err()
            .unwrap();
        assert_eq!(
            describe_json_error(&err).to_string(),
            "malformed upstream answer: missing field `token` (line 1, column 18)"
        );
    }
}
