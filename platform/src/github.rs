//! The GitHub App provider: installation access tokens minted with the App's
//! private key.
//!
//! GitHub's flow: sign a short JWT (RS256, `iss` = App ID or client ID) with
//! the App's key, then `POST {api}/app/installations/{id}/access_tokens` with
//! it to get an installation token that lives about an hour. Everything
//! upstream's version skipped is here: the status is checked, the body is
//! size-capped and parsed as JSON, every call has connect and total
//! timeouts, redirects are refused (they would carry the JWT elsewhere), and
//! tokens are cached and refreshed through one [`TokenCache`] so GitHub sees
//! one call per token lifetime whatever the request rate.
//!
//! With grants, each owner's installation is found from the App itself
//! (`GET /app/installations`, paginated through `Link`), cached for
//! [`INSTALLATIONS_TTL`] and bounded, and tokens are minted with the
//! grant's `repositories` and `permissions`, one cache per (installation,
//! repositories, permissions) in [`ScopedCaches`]: workspaces with the same
//! grant share one token.
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

use crate::grants::Scope;
use crate::provider::{
    Clock, IssuedToken, ProviderError, REFRESH_WINDOW, RefusalFuture, ServedFuture, ServedToken,
    TokenFuture, TokenProvider, TokenRequest,
};
use crate::scoped::{MintKey, ScopedCaches};

/// GitHub's public API.
pub const DEFAULT_API_URL: &str = "https://api.github.com";
/// The REST API version we speak (`X-GitHub-Api-Version`).
pub const GITHUB_API_VERSION: &str = "2022-11-28";
/// Largest answer body read from GitHub.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
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
struct ErrorAnswer {
    message: Option<String>,
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

#[derive(Deserialize)]
struct InstallationAnswer {
    id: u64,
    account: Option<AccountAnswer>,
}

#[derive(Deserialize)]
struct AccountAnswer {
    login: String,
}

/// Owner (lowercased) → installation, as last listed.
#[derive(Default)]
struct Directory {
    by_owner: HashMap<String, u64>,
    listed_at: Option<Timestamp>,
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
    /// claims and cache decisions).
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
                ProviderError::Config(format!("cannot build the HTTP client: {}", error_chain(&e)))
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
            calls: AtomicU64::new(0),
            listings: AtomicU64::new(0),
        };
        // Sign once now so a key that parses but cannot sign refuses to start
        // instead of failing the first request an hour later.
        provider.jwt(provider.caches.clock().now())?;
        Ok(provider)
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

    fn cached_installation(&self, owner: &str) -> (Option<u64>, Option<Timestamp>) {
        let directory = self
            .directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (
            directory.by_owner.get(&owner.to_ascii_lowercase()).copied(),
            directory.listed_at,
        )
    }

    /// The installation of `owner`, from the table when it is recent enough,
    /// else listed again (one listing at a time).
    async fn installation_of(&self, owner: &str) -> Result<u64, ProviderError> {
        let fresh = |listed_at: Option<Timestamp>, within: Duration| {
            listed_at.is_some_and(|at| {
                let age = self.caches.clock().now().duration_since(at);
                age < SignedDuration::try_from(within).unwrap_or(SignedDuration::MAX)
            })
        };
        match self.cached_installation(owner) {
            (Some(id), at) if fresh(at, INSTALLATIONS_TTL) => return Ok(id),
            (None, at) if fresh(at, RELIST_AFTER_MISS) => {
                return Err(ProviderError::NotInstalled(owner.to_owned()));
            }
            _ => {}
        }
        let listed_before = self.cached_installation(owner).1;
        let _flight = self.listing.lock().await;
        let (known, listed_at) = self.cached_installation(owner);
        if listed_at == listed_before {
            // Nobody listed while we waited: list now.
            match self.list_installations().await {
                Ok(table) => {
                    let mut directory = self
                        .directory
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    directory.by_owner = table;
                    directory.listed_at = Some(self.caches.clock().now());
                }
                Err(error) => {
                    if let Some(id) = known {
                        tracing::warn!(
                            "[github] listing installations failed, using the known installation of {owner}: {error}"
                        );
                        return Ok(id);
                    }
                    return Err(error);
                }
            }
        }
        self.cached_installation(owner)
            .0
            .ok_or_else(|| ProviderError::NotInstalled(owner.to_owned()))
    }

    /// Every installation of the App, owner (lowercased) → id, following
    /// `Link: <…>; rel="next"` on the API's own origin only.
    async fn list_installations(&self) -> Result<HashMap<String, u64>, ProviderError> {
        let mut table = HashMap::new();
        let mut url = format!("{}/app/installations?per_page=100", self.api_url);
        for _ in 0..MAX_INSTALLATION_PAGES {
            let jwt = self.jwt(self.caches.clock().now())?;
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
            let next = response
                .headers()
                .get(reqwest::header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_link);
            let body = self.read_limited(response, MAX_LISTING_PAGE_BYTES).await?;
            if !status.is_success() {
                return Err(upstream_status(status.as_u16(), &body));
            }
            let page: Vec<InstallationAnswer> =
                serde_json::from_slice(&body).map_err(|e| describe_json_error(&e))?;
            for installation in page {
                if let Some(account) = installation.account
                    && credd_core::repository::is_valid_owner(&account.login)
                {
                    table.insert(account.login.to_ascii_lowercase(), installation.id);
                }
            }
            match next {
                None => return Ok(table),
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
        let installation = match scope {
            None => self.default_installation,
            Some(scope) => self.installation_of(&scope.owner).await?,
        };
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
    /// and the permissions GitHub's answer states.
    async fn fetch(
        &self,
        installation: u64,
        scope: Option<&Scope>,
    ) -> Result<(IssuedToken, BTreeMap<String, String>), ProviderError> {
        let jwt = self.jwt(self.caches.clock().now())?;
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
        let body = self.read_body(response).await?;
        if !status.is_success() {
            return Err(upstream_status(status.as_u16(), &body));
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

    async fn read_body(
        &self,
        mut response: reqwest::Response,
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        if response
            .content_length()
            .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
        {
            return Err(ProviderError::Malformed(format!(
                "answer larger than {MAX_ANSWER_BYTES} bytes"
            )));
        }
        // Capacity fixed up front so growing never leaves a copy of the token
        // behind in freed memory.
        let mut body = Zeroizing::new(Vec::with_capacity(MAX_ANSWER_BYTES));
        while let Some(chunk) = response.chunk().await.map_err(|e| self.classify(&e))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(ProviderError::Malformed(format!(
                    "answer larger than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn classify(&self, error: &reqwest::Error) -> ProviderError {
        if error.is_timeout() {
            ProviderError::Timeout(self.request_timeout)
        } else {
            ProviderError::Transport(error_chain(error))
        }
    }
}

/// A non-success answer as an error, with GitHub's `message` sanitised.
fn upstream_status(status: u16, body: &[u8]) -> ProviderError {
    let detail = serde_json::from_slice::<ErrorAnswer>(body)
        .ok()
        .and_then(|a| a.message)
        .map(|m| sanitize(&m));
    ProviderError::UpstreamStatus { status, detail }
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

/// `error` and its sources joined with `: `.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
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

    fn report_refusal(&self, scopes: Vec<Option<Scope>>, sha256: [u8; 32]) -> RefusalFuture<'_> {
        Box::pin(async move {
            let keys: Vec<MintKey> = scopes
                .iter()
                .filter_map(|scope| match scope {
                    None => Some(MintKey::new(self.default_installation, None)),
                    Some(s) => self
                        .cached_installation(&s.owner)
                        .0
                        .map(|id| MintKey::new(id, Some(s))),
                })
                .collect();
            self.caches.refuse(&keys, &sha256)
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
