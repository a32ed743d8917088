//! Minting: one `POST /app/installations/{id}/access_tokens`, its answer
//! read whole but bounded (it holds the token, so every buffer is wiped),
//! and GitHub's failures turned into [`ProviderError`]s by what GitHub says.

use std::collections::BTreeMap;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use jiff::Timestamp;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{GITHUB_API_VERSION, GitHubAppProvider, INITIAL_ANSWER_BUFFER, MAX_ANSWER_BYTES};
use crate::provider::{IssuedToken, ProviderError};
use crate::scope::MintScope;

#[derive(Deserialize)]
pub(super) struct AccessTokenAnswer {
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

impl GitHubAppProvider {
    /// Mints a token of `installation`, scoped as `scope` says; the token
    /// and the permissions GitHub's answer states. Nothing is sent while
    /// GitHub's rate limit holds.
    pub(super) async fn fetch(
        &self,
        installation: u64,
        scope: Option<&MintScope>,
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
        if let Some(body) = mint_body(scope)? {
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
        let issued = read_answer(&body)?;
        tracing::info!(
            "[github] installation token minted (fingerprint {}, expires at {}, installation {installation})",
            issued.fingerprint(),
            issued.expires_at
        );
        Ok((issued, stated_permissions(&body)))
    }

    /// A non-success answer as an error, by what GitHub says: a rate limit
    /// (held), 404 for the installation (forgotten: the next request lists
    /// again), 422 and 403 as refusals with GitHub's reason, the rest by
    /// status. GitHub's `message` is sanitised; the body is never kept.
    pub(super) async fn upstream_error(
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
                self.forget_installation(installation).await;
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
    pub(super) async fn read_limited(
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

    pub(super) fn classify(&self, error: &reqwest::Error) -> ProviderError {
        if error.is_timeout() {
            ProviderError::Timeout(self.request_timeout)
        } else {
            ProviderError::Transport(credd_core::text::error_chain(error))
        }
    }
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
pub(super) fn describe_json_error(error: &serde_json::Error) -> ProviderError {
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

/// The mint request's body: the grant's repositories and permissions, or
/// none when the scope names neither (the installation's own token).
fn mint_body(scope: Option<&MintScope>) -> Result<Option<Vec<u8>>, ProviderError> {
    let Some(scope) = scope else {
        return Ok(None);
    };
    if scope.repositories.is_none() && scope.permissions.is_none() {
        return Ok(None);
    }
    let body = MintBody {
        repositories: scope.repositories.as_deref(),
        permissions: scope.permissions.as_ref().map(|p| {
            p.iter()
                .map(|(name, level)| (name.as_str(), level.as_str()))
                .collect()
        }),
    };
    serde_json::to_vec(&body)
        .map(Some)
        .map_err(|e| ProviderError::Config(format!("cannot encode the mint request: {e}")))
}

/// The token and its expiry from a mint answer: the token opaque (classic
/// or stateless, `ghs_<APPID>_<JWT>`) within credd-core's one bound, the
/// expiry an RFC 3339 timestamp. Errors never quote the answer.
fn read_answer(body: &[u8]) -> Result<IssuedToken, ProviderError> {
    let answer: AccessTokenAnswer =
        serde_json::from_slice(body).map_err(|e| describe_json_error(&e))?;
    credd_core::secret::check_token_text(answer.token.expose_secret())
        .map_err(|e| ProviderError::Malformed(e.to_string()))?;
    let expires_at: Timestamp = answer.expires_at.trim().parse().map_err(|_| {
        ProviderError::Malformed(format!(
            "expires_at is not an RFC 3339 timestamp ({} characters)",
            answer.expires_at.len()
        ))
    })?;
    Ok(IssuedToken {
        token: answer.token,
        expires_at,
    })
}

/// The permissions a mint answer states, each a valid name at a plausible
/// level (anything else is dropped: they are shown, never enforced here),
/// at most [`MAX_PERMISSIONS`](crate::scope::MAX_PERMISSIONS).
fn stated_permissions(body: &[u8]) -> BTreeMap<String, String> {
    serde_json::from_slice::<AccessTokenPermissions>(body)
        .map(|a| {
            a.permissions
                .into_iter()
                .filter_map(|(k, v)| {
                    let level = v.as_str()?;
                    (crate::scope::valid_permission_name(&k)
                        && level.len() <= 16
                        && level.bytes().all(|b| b.is_ascii_lowercase()))
                    .then(|| (k, level.to_owned()))
                })
                .take(crate::scope::MAX_PERMISSIONS)
                .collect()
        })
        .unwrap_or_default()
}
