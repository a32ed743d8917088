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
//! [`TokenCache`](crate::token_cache::TokenCache) so GitHub sees one call per
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
//! [`FAILURE_COOLDOWN`](crate::provider::FAILURE_COOLDOWN); GitHub's rate limits (`retry-after`,
//! `x-ratelimit-remaining`/`x-ratelimit-reset`, a 429) hold every request to
//! GitHub until they end, once for the App; 422 and 403 become refusals with
//! GitHub's reason and 404 forgets the installation (the next request lists
//! again). [`crate::answer`] says what each becomes for a workspace.
//!
//! Signing uses jsonwebtoken's `aws_lc_rs` backend: the `rust_crypto` one
//! pulls in the `rsa` crate (RUSTSEC-2023-0071).
//!
//! Layout: this file holds the configuration, the provider and its serving
//! path; `mint.rs` the token request and how its answers are read,
//! `installations.rs` the owner → installation table, `rate_limit.rs`
//! GitHub's rate limits.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use zeroize::Zeroizing;

use credd_core::repository::MAX_REPOSITORIES_PER_TOKEN;

use crate::provider::{Clock, ProviderError, REFRESH_WINDOW, ServedToken, TokenRequest, signed};
use crate::scope::MintScope;
use crate::scoped::{ScopedCaches, ScopedProvider};

mod installations;
mod mint;
mod rate_limit;

use installations::Directory;
use rate_limit::Hold;

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

impl fmt::Debug for GitHubAppProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHubAppProvider")
            .field("issuer", &self.issuer)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
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

    async fn serve_from(
        &self,
        installation: u64,
        request: &TokenRequest,
    ) -> Result<ServedToken, ProviderError> {
        let scope = request.scope.as_ref();
        self.caches
            .serve(installation, request, || async {
                let (token, stated) = self.fetch(installation, scope).await?;
                // GitHub states them; an answer without them keeps the grant's.
                let permissions = if stated.is_empty() {
                    scope
                        .and_then(MintScope::permissions_text)
                        .unwrap_or_default()
                } else {
                    stated
                };
                Ok((token, permissions))
            })
            .await
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
}

impl ScopedProvider for GitHubAppProvider {
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

    fn default_installation(&self) -> u64 {
        self.default_installation
    }

    async fn known_installation(&self, owner: &str) -> Option<u64> {
        if let Some(id) = self.cached_installation(owner) {
            return Some(id);
        }
        let (_, table) = self.shared_directory().await?;
        table.get(&owner.to_ascii_lowercase()).copied()
    }

    fn caches(&self) -> &ScopedCaches {
        &self.caches
    }
}

#[cfg(test)]
mod tests {
    use super::installations::next_link;
    use super::mint::{AccessTokenAnswer, describe_json_error};
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
