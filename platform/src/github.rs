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
//! Signing uses jsonwebtoken's `aws_lc_rs` backend: the `rust_crypto` one
//! pulls in the `rsa` crate (RUSTSEC-2023-0071).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::provider::{
    Clock, IssuedToken, ProviderError, REFRESH_WINDOW, TokenCache, TokenFuture, TokenProvider,
};

/// GitHub's public API.
pub const DEFAULT_API_URL: &str = "https://api.github.com";
/// The REST API version we speak (`X-GitHub-Api-Version`).
pub const GITHUB_API_VERSION: &str = "2022-11-28";
/// Largest answer body read from GitHub.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Largest private key file accepted.
pub const MAX_KEY_BYTES: usize = 64 * 1024;
/// Longest token accepted (GitHub is moving to longer, JWT-shaped tokens).
const MAX_TOKEN_CHARS: usize = 16 * 1024;

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

/// Mints and caches installation tokens for one GitHub App installation.
pub struct GitHubAppProvider {
    issuer: String,
    key: EncodingKey,
    endpoint: String,
    http: reqwest::Client,
    request_timeout: Duration,
    cache: TokenCache,
    calls: AtomicU64,
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
            endpoint,
            http,
            request_timeout: config.request_timeout,
            cache: TokenCache::new(config.refresh_window, clock),
            calls: AtomicU64::new(0),
        };
        // Sign once now so a key that parses but cannot sign refuses to start
        // instead of failing the first request an hour later.
        provider.jwt(provider.cache.clock().now())?;
        Ok(provider)
    }

    /// How many calls to GitHub's token endpoint were made so far.
    pub fn upstream_calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// The access-token URL this provider posts to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
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

    async fn fetch(&self) -> Result<IssuedToken, ProviderError> {
        let jwt = self.jwt(self.cache.clock().now())?;
        self.calls.fetch_add(1, Ordering::SeqCst);
        let response = self
            .http
            .post(&self.endpoint)
            .bearer_auth(jwt.as_str())
            .header(reqwest::header::ACCEPT, "application/vnd.github+json")
            .header("X-GitHub-Api-Version", GITHUB_API_VERSION)
            .send()
            .await
            .map_err(|e| self.classify(&e))?;
        drop(jwt);
        let status = response.status();
        let body = self.read_body(response).await?;
        if !status.is_success() {
            let detail = serde_json::from_slice::<ErrorAnswer>(&body)
                .ok()
                .and_then(|a| a.message)
                .map(|m| sanitize(&m));
            return Err(ProviderError::UpstreamStatus {
                status: status.as_u16(),
                detail,
            });
        }
        let answer: AccessTokenAnswer =
            serde_json::from_slice(&body).map_err(|e| describe_json_error(&e))?;
        let token = answer.token.expose_secret();
        if token.is_empty() {
            return Err(ProviderError::Malformed("empty token".into()));
        }
        if token.len() > MAX_TOKEN_CHARS || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(ProviderError::Malformed(format!(
                "the token is not 1-{MAX_TOKEN_CHARS} printable ASCII characters"
            )));
        }
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
            "[github] installation token minted (fingerprint {}, expires at {})",
            issued.fingerprint(),
            issued.expires_at
        );
        Ok(issued)
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
        Box::pin(self.cache.get_or_refresh(|| self.fetch()))
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
