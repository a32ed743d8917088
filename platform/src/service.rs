//! The HTTP endpoints and a bounded server loop.
//!
//! Routes:
//! - `GET /workspaces/{id}/github-installation-token[?repository=OWNER/NAME
//!   | ?owner=OWNER][&min_remaining_secs=N]`: that workspace's bearer or the
//!   admin bearer;
//! - `POST /workspaces/{id}/github-installation-token/refusals` with
//!   `{"sha256": HEX}`: the workspace reports that GitHub refused that token;
//! - `GET /admin/github-installation-token`: the admin bearer (any workspace
//!   bearer when no admin bearer is configured and no grants are in force:
//!   see [`admin_route_closed`]): the configured installation's token,
//!   unscoped;
//! - `GET /healthz`;
//! - `GET /metrics`: Prometheus text, unauthenticated (counts only, see
//!   [`crate::metrics`]).
//!
//! Answers: 200 `{"token","expires_at","owner","repositories",
//! "permissions"}` (`expires_at` RFC 3339, UTC, `Z`; `owner` absent when not
//! known, that is without a grants file; `repositories` absent when the token
//! covers all of the installation's) with `Cache-Control: no-store`; 401 for
//! a missing or wrong bearer (checked before anything else, so strangers
//! learn nothing about the setup); 400 for a malformed query; 403 when a
//! grants file is in force and the workspace has no entry or asks outside
//! it, or is a workspace bearer on the admin route while grants are in
//! force (no token is minted); 404 when no provider is configured; and for
//! what GitHub answers, the one mapping of [`crate::answer`]: 403 when GitHub
//! refuses the token (its 422 or a suspended installation, with GitHub's
//! reason), 404 when the App is not installed on the owner (or the
//! installation is gone), 503 with `Retry-After` while GitHub rate limits the
//! App, 500 `token refresh failed` for any other failure, logged with a
//! `[github]` prefix and the cause, never the token. Error bodies name only what the caller asked for: internals stay
//! in the log.
//!
//! `min_remaining_secs=N`: the cached token is served only if it has at
//! least N seconds of life left (and is outside the platform's own refresh
//! window); otherwise one is minted (single flight). N is clamped to
//! [`MAX_MIN_REMAINING`](crate::provider::MAX_MIN_REMAINING) and to half a
//! token's life so no client can make every call mint.
//!
//! Refusals: a matching cached token of a scope the workspace may use is
//! dropped so the next GET mints a fresh one; at most one drop per
//! workspace and installation per
//! [`REFUSAL_INTERVAL`](crate::provider::REFUSAL_INTERVAL) (else 429 with
//! `Retry-After`), so one workspace's reports never limit another's. The
//! body carries only the token's SHA-256.
//!
//! Every request is bounded (total time, concurrency, body size) and so is
//! every connection (count, time to a complete request head, idle time);
//! hyper adds the `Date` header daemons use to turn `expires_at` into a
//! remaining lifetime.
//!
//! The server loop drives hyper's HTTP/1 connections itself rather than
//! through `axum::serve`, because it must know what each connection is doing:
//! clients that trickle a request head (slowloris) are cut off after
//! [`HEADER_READ_TIMEOUT`], and at the connection cap the connection that has
//! waited longest for a head makes room for a new one, so a few thousand
//! slow clients cannot lock out real ones. What they cause is logged as one
//! summary per [`LOG_SUMMARY_INTERVAL`], without request content; so are
//! requests refused for a missing or wrong bearer (401), counted by the
//! handlers instead of a line each. (A router served otherwise than by
//! [`serve`] or [`serve_with_limits`] has no such report and logs each 401
//! as a warning of its own.)

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use credd_core::platform_api::{
    ADMIN_TOKEN_ROUTE, ErrorAnswer, REFUSALS_ROUTE, RefusalReport, Status, TOKEN_ROUTE,
    TokenAnswer, TokenQuery, Which,
};
use jiff::Timestamp;
use secrecy::ExposeSecret;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::auth::{Auth, AuthError, Caller, MAX_BEARER_BYTES};
use crate::grants::Grants;
use crate::metrics::PlatformMetrics;
use crate::provider::TokenProvider;
use crate::provider::{Refusal, RefusalOutcome, ServedToken, TokenRequest};
use crate::scope::MintScope;

mod accept;
mod connections;
mod error;

pub use accept::{serve, serve_with_limits};

use connections::AuthRefusals;
pub use connections::LOG_SUMMARY_INTERVAL;
use error::ApiError;

/// Longest a client may take to deliver a complete request head: from
/// connecting, or from the first byte of its next request on a kept-alive
/// connection. Real clients send theirs within microseconds; this only cuts
/// off clients that trickle a head to hold a connection open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest request head read (request line and headers; hyper answers 431
/// beyond it). A bearer is at most [`MAX_BEARER_BYTES`], so 16 KiB is ample,
/// and it bounds what a slow client can make the server buffer.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Bounds on requests and connections.
#[derive(Clone, Debug)]
pub struct ServiceLimits {
    /// Longest a request may take, queueing included (then 503).
    pub request_timeout: Duration,
    /// Requests handled at once; more wait for a slot.
    pub max_concurrent_requests: usize,
    /// Largest request body accepted (then 413).
    pub max_body_bytes: usize,
    /// Connections open at once. Accepting never waits: at the cap a new
    /// connection evicts the one that has waited longest for a request head
    /// (new, mid-head or idle between requests); when every connection is in
    /// a request, the new one is closed at once.
    pub max_connections: usize,
    /// A kept-alive connection with no request for this long is closed (so is
    /// a new one that sends nothing, if this is shorter than
    /// `header_read_timeout`).
    pub idle_timeout: Duration,
    /// A connection whose request head is not complete this long after it
    /// connected (or after the head's first byte, between kept-alive
    /// requests) is closed. Default [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// Largest request head read. Default [`MAX_HEAD_BYTES`]; hyper needs at
    /// least 8 KiB and rounds smaller values up.
    pub max_head_bytes: usize,
    /// On shutdown, how long in-flight requests may take to finish.
    pub drain_timeout: Duration,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 1024,
            max_body_bytes: 16 * 1024,
            max_connections: 4096,
            idle_timeout: Duration::from_secs(75),
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_head_bytes: MAX_HEAD_BYTES,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// What the handlers share: the token provider and the bearer checks.
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use molecule_platform::{app, AppState, Auth, DevProvider, WorkspaceTokens};
///
/// let provider = Arc::new(DevProvider::new(Duration::from_secs(600)));
/// let auth = Auth::new(Some("admin-bearer".into()), WorkspaceTokens::empty());
/// let router: axum::Router = app(AppState::new(Some(provider.clone()), auth));
/// # let _ = (router, provider.minted());
/// ```
#[derive(Clone)]
pub struct AppState {
    provider: Option<Arc<dyn TokenProvider>>,
    auth: Arc<Auth>,
    grants: Arc<Grants>,
    limits: ServiceLimits,
    /// The provider's counters (see [`crate::metrics`]).
    metrics: Arc<PlatformMetrics>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("provider", &self.provider.is_some())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State serving `provider` (`None`: no GitHub App, the token routes
    /// answer 404), guarded by `auth`, with default [`ServiceLimits`].
    /// Requests count into the provider's metrics, which `/metrics` serves.
    pub fn new(provider: Option<Arc<dyn TokenProvider>>, auth: Auth) -> Self {
        let metrics = provider.as_ref().map_or_else(Arc::default, |p| p.metrics());
        Self {
            metrics,
            provider,
            auth: Arc::new(auth),
            grants: Arc::new(Grants::none()),
            limits: ServiceLimits::default(),
        }
    }

    /// Replaces the grants (default: none, every workspace gets the
    /// configured installation's token, unscoped).
    pub fn with_grants(mut self, grants: Arc<Grants>) -> Self {
        self.grants = grants;
        self
    }

    /// The grants in force (to reload them on SIGHUP).
    pub fn grants(&self) -> &Arc<Grants> {
        &self.grants
    }

    /// Replaces the request limits.
    pub fn with_limits(mut self, limits: ServiceLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The bearer checks (to reload the workspace table on SIGHUP).
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The limits in force.
    pub fn limits(&self) -> &ServiceLimits {
        &self.limits
    }

    /// The counters `/metrics` serves: the provider's.
    pub fn metrics(&self) -> &Arc<PlatformMetrics> {
        &self.metrics
    }
}

/// The platform's router, with its request limits applied.
pub fn app(state: AppState) -> Router {
    let limits = state.limits.clone();
    Router::new()
        .route(TOKEN_ROUTE, get(workspace_token))
        .route(REFUSALS_ROUTE, post(workspace_refusal))
        .route(ADMIN_TOKEN_ROUTE, get(admin_token))
        .route("/healthz", get(healthz))
        .route("/metrics", get(serve_metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.metrics),
            crate::metrics::track_request,
        ))
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::SERVICE_UNAVAILABLE,
                    limits.request_timeout,
                ))
                // At the limit a request is answered 503 at once instead of
                // queueing for a slot: a queued request is past its head, so
                // its connection could no longer be evicted, and enough of
                // them (with the upstream stalled) would refuse everyone.
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    StatusCode::SERVICE_UNAVAILABLE
                }))
                .layer(LoadShedLayer::new())
                .layer(GlobalConcurrencyLimitLayer::new(
                    limits.max_concurrent_requests.max(1),
                )),
        )
}

/// The scope a request gets under the grants in force: `Ok(None)` is the
/// configured installation, unscoped (no grants file).
fn resolve_scope(
    grants: &Grants,
    workspace: &str,
    which: &Which,
) -> Result<Option<MintScope>, crate::grants::GrantError> {
    match grants.current() {
        None => Ok(None),
        Some(table) => table.resolve(workspace, which).map(Some),
    }
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A JSON `{"error": message}` answer with `status` (never cached): every
/// failure of the API is one of the meanings of [`Status`].
pub(crate) fn json_error(status: Status, message: &str) -> Response {
    let status = StatusCode::from_u16(status.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&ErrorAnswer {
        error: Cow::Borrowed(message),
    })
    .unwrap_or_default();
    json(status, body)
}

/// RFC 3339 in UTC with a `Z`, whole seconds (rounded down, so never later
/// than the real expiry).
pub fn format_expiry(expires_at: Timestamp) -> String {
    expires_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The bearer of an `Authorization: Bearer …` header.
fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::MissingBearer)?;
    if value.len() > MAX_BEARER_BYTES + 16 {
        return Err(AuthError::InvalidBearer);
    }
    let value = value.to_str().map_err(|_| AuthError::InvalidBearer)?;
    let (scheme, rest) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MissingBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MissingBearer);
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(AuthError::MissingBearer);
    }
    Ok(token)
}

/// Where a request's handler counts it if refused for its bearer: put in
/// the request's extensions by the server loop (absent when the router is
/// served otherwise).
type AuthTally = Option<Extension<Arc<AuthRefusals>>>;

/// The 401 for a missing or wrong bearer on `route`.
fn refused(
    route: &'static str,
    workspace: Option<&str>,
    error: AuthError,
    tally: AuthTally,
) -> ApiError {
    ApiError::Unauthorized {
        route,
        workspace: workspace.map(str::to_owned),
        error,
        tally: tally.map(|Extension(tally)| tally),
    }
}

async fn workspace_token(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    tally: AuthTally,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = bearer(&headers)
        .and_then(|b| state.auth.authorize_workspace(&id, Some(b)))
        .map_err(|error| refused("workspace", Some(&id), error, tally))?;
    let query = match query {
        Ok(Query(pairs)) => TokenQuery::parse(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())))
            .map_err(|e| e.to_string()),
        Err(_) => Err("the query is not URL-encoded".to_owned()),
    };
    let query = query.map_err(ApiError::BadRequest)?;
    let scope = resolve_scope(&state.grants, &id, &query.which).map_err(|error| {
        ApiError::OutsideGrant {
            workspace: id.clone(),
            reason: error.to_string(),
        }
    })?;
    let request = TokenRequest {
        scope,
        min_remaining: query.min_remaining.unwrap_or_default(),
    };
    serve_token(&state, caller, request).await
}

/// Why the admin route refuses a workspace bearer while grants are in
/// force (the 403's text).
pub fn admin_route_closed() -> String {
    format!(
        "the admin route is closed to workspace bearers while a grants file is in force: \
         ask GET {TOKEN_ROUTE} (set WORKSPACE_ID) for a token scoped to your grant"
    )
}

/// `GET /admin/github-installation-token`: the configured installation's
/// token, unscoped.
///
/// Without `ADMIN_TOKEN`, any workspace bearer is accepted here (the
/// seed's contract: a workspace that does not know its ID can still fetch
/// a token). That is only sound without grants: with a grants file in
/// force this route would hand a workspace the installation's full token
/// (every repository, every permission) past its grant. So while grants
/// are in force — checked on every request, so grants that appear later
/// (a reload, [`Grants::replace`]) close it at once — a workspace bearer
/// here gets 403 [`admin_route_closed`] and nothing is minted; only the
/// admin bearer, when `ADMIN_TOKEN` is set, is served. The platform keeps
/// starting with grants and no `ADMIN_TOKEN` (and says at start-up that
/// this route is closed) rather than refusing to start: refusing would
/// take every workspace of an operator who adds a grants file offline,
/// although their own routes serve them correctly scoped tokens.
///
/// Authentication comes first, so a stranger still gets 401 and learns
/// nothing about the setup.
async fn admin_token(
    State(state): State<AppState>,
    tally: AuthTally,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = bearer(&headers)
        .and_then(|b| state.auth.authorize_admin(Some(b)))
        .map_err(|error| refused("admin", None, error, tally))?;
    match caller {
        Caller::Workspace(workspace) if state.grants.current().is_some() => {
            Err(ApiError::AdminRouteClosed { workspace })
        }
        caller => serve_token(&state, caller, TokenRequest::default()).await,
    }
}

/// Largest refusal report body read.
pub const MAX_REFUSAL_BODY_BYTES: usize = 1024;

async fn workspace_refusal(
    State(state): State<AppState>,
    Path(id): Path<String>,
    tally: AuthTally,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    bearer(&headers)
        .and_then(|b| state.auth.authorize_workspace(&id, Some(b)))
        .map_err(|error| refused("refusal", Some(&id), error, tally))?;
    if body.len() > MAX_REFUSAL_BODY_BYTES {
        return Err(ApiError::BadRequest(format!(
            "the body is larger than {MAX_REFUSAL_BODY_BYTES} bytes"
        )));
    }
    let sha256 = serde_json::from_slice::<RefusalReport<'_>>(&body)
        .ok()
        .and_then(|r| credd_core::secret::parse_sha256_hex(r.sha256.as_bytes()))
        .ok_or_else(|| {
            ApiError::BadRequest(
                "expected {\"sha256\": \"<64 lowercase hex digits of the refused token's SHA-256>\"}"
                    .to_owned(),
            )
        })?;
    let Some(provider) = &state.provider else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let scopes: Vec<Option<MintScope>> = match state.grants.current() {
        None => vec![None],
        Some(table) => table.scopes(&id).into_iter().map(Some).collect(),
    };
    let prefix: String = credd_core::secret::fingerprint_of_digest(&sha256);
    let refusal = Refusal {
        workspace: id.clone(),
        scopes,
        sha256,
    };
    match provider.report_refusal(refusal).await {
        RefusalOutcome::Dropped => {
            tracing::info!(
                workspace = %id,
                "[github] refused token (fingerprint {prefix}) dropped from the cache"
            );
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        RefusalOutcome::NoMatch => Ok(StatusCode::NO_CONTENT.into_response()),
        RefusalOutcome::Limited { retry_after } => Err(ApiError::RefusalLimited {
            workspace: id,
            fingerprint: prefix,
            retry_after,
        }),
    }
}

async fn serve_token(
    state: &AppState,
    caller: Caller,
    request: TokenRequest,
) -> Result<Response, ApiError> {
    let provider = state.provider.as_ref().ok_or(ApiError::NotConfigured)?;
    let served: ServedToken = provider.scoped_token(request).await?;
    let issued = &served.issued;
    let token = issued.token.expose_secret();
    if token.is_empty() {
        return Err(ApiError::Unusable(
            "the provider returned an empty token".to_owned(),
        ));
    }
    if issued.expires_at <= Timestamp::now() {
        return Err(ApiError::Unusable(format!(
            "the provider returned a token that expired at {}",
            issued.expires_at
        )));
    }
    state.metrics.served(match &caller {
        Caller::Admin => crate::metrics::CallerKind::Admin,
        Caller::Workspace(_) => crate::metrics::CallerKind::Workspace,
    });
    let caller = match &caller {
        Caller::Admin => "admin".to_owned(),
        Caller::Workspace(id) => format!("workspace {id}"),
    };
    tracing::debug!(
        "token served to {caller} (fingerprint {}, expires at {})",
        issued.fingerprint(),
        issued.expires_at
    );
    let answer = TokenAnswer {
        token: Cow::Borrowed(token),
        expires_at: Cow::Owned(format_expiry(issued.expires_at)),
        owner: served.owner.as_deref().map(Cow::Borrowed),
        repositories: served.repositories.as_deref().map(Cow::Borrowed),
        permissions: Some(Cow::Borrowed(&served.permissions)),
    };
    let body = serde_json::to_vec(&answer)
        .map_err(|_| ApiError::Unusable("the answer could not be encoded".to_owned()))?;
    Ok(json(StatusCode::OK, body))
}

async fn healthz() -> Response {
    json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec())
}

/// `GET /metrics`: counts only, no secret and no workspace identity, so it
/// needs no bearer (see [`crate::metrics`]).
async fn serve_metrics(State(state): State<AppState>) -> Response {
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}

async fn not_found() -> ApiError {
    ApiError::NoRoute
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_rfc3339_utc_whole_seconds() {
        let t: Timestamp = "2030-01-02T03:04:05.9+02:00".parse().unwrap();
        assert_eq!(format_expiry(t), "2030-01-02T01:04:05Z");
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Err(AuthError::MissingBearer));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), Err(AuthError::MissingBearer));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Ok("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), Err(AuthError::MissingBearer));
        let long = format!("Bearer {}", "a".repeat(MAX_BEARER_BYTES + 100));
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&long).unwrap());
        assert_eq!(bearer(&h), Err(AuthError::InvalidBearer));
    }
}
