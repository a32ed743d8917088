//! Inspection routes, for a stand-in running as a separate process.
//!
//! Why: a script or a cross-crate test driving the real `molecule-platform`
//! against the `github-stand-in` binary cannot call [`GitHubStandIn`]'s
//! methods; these routes answer the same questions over HTTP on the same
//! loopback port. They never show a token or a JWT (the record holds counts
//! and scopes only), so their answers are safe to log.
//!
//! - `GET /_stand-in/record`: `{"calls", "listings", "issued", "rejections",
//!   "mints": [{"installation", "repositories", "permissions"}]}`;
//! - `GET /_stand-in/record`: also `"violations"` (requests GitHub's
//!   description refuses, requests during a rate limit, answers not matching
//!   it: must be empty), `"requests"` (`[{"method", "path", "at"}]`) and
//!   `"limited_until"`;
//! - `PUT /_stand-in/mode` with `{"issue_secs": N}`, `{"status": CODE}` or
//!   `{"mode": "garbage" | "hang" | "redirect" | "huge" | "expired"}`;
//! - `PUT /_stand-in/token-format` with `{"format": "classic" | "stateless"}`;
//! - `PUT /_stand-in/rate-limit` with `{"kind": "primary" | "secondary" |
//!   "secondary-403" | "secondary-bare", "secs": N}`: the next request is
//!   answered with that limit;
//! - `POST /_stand-in/installations` with `{"login": "acme", "id": 1001}`,
//!   optionally `"kind": "organization" | "user" | "enterprise" | "none"`,
//!   `"repositories": [NAME…]`, `"suspended": true`;
//! - `DELETE /_stand-in/installations/{id}`: uninstall;
//! - `PUT /_stand-in/page-size` with `{"page_size": N}`.
//!
//! [`GitHubStandIn`]: crate::GitHubStandIn

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jiff::SignedDuration;
use serde::Deserialize;

use crate::{
    Account, Installation, Mode, RateLimit, StandInState, TokenFormat, default_permissions, lock,
    valid_login,
};

/// Adds the inspection routes to `app`.
pub(crate) fn routes(app: Router, state: Arc<StandInState>) -> Router {
    let inspect = Router::new()
        .route("/_stand-in/record", axum::routing::get(record))
        .route("/_stand-in/mode", axum::routing::put(set_mode))
        .route("/_stand-in/installations", axum::routing::post(install))
        .route(
            "/_stand-in/installations/{id}",
            axum::routing::delete(uninstall),
        )
        .route("/_stand-in/token-format", axum::routing::put(token_format))
        .route("/_stand-in/rate-limit", axum::routing::put(rate_limit))
        .route("/_stand-in/page-size", axum::routing::put(page_size))
        .with_state(state);
    app.merge(inspect)
}

async fn record(State(state): State<Arc<StandInState>>) -> Response {
    let mints: Vec<serde_json::Value> = lock(&state.mints)
        .iter()
        .map(|m| {
            serde_json::json!({
                "installation": m.installation,
                "repositories": m.repositories,
                "permissions": m.permissions,
            })
        })
        .collect();
    let requests: Vec<serde_json::Value> = lock(&state.requests)
        .iter()
        .map(|r| serde_json::json!({"method": r.method, "path": r.path, "at": r.at.to_string()}))
        .collect();
    axum::Json(serde_json::json!({
        "calls": *state.calls.borrow(),
        "listings": *lock(&state.listings),
        "issued": lock(&state.issued).len(),
        "rejections": lock(&state.rejections).clone(),
        "violations": lock(&state.violations).clone(),
        "requests": requests,
        "limited_until": lock(&state.limit).as_ref().and_then(|l| l.until).map(|t| t.to_string()),
        "mints": mints,
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeRequest {
    issue_secs: Option<i64>,
    status: Option<u16>,
    mode: Option<String>,
}

async fn set_mode(
    State(state): State<Arc<StandInState>>,
    axum::Json(request): axum::Json<ModeRequest>,
) -> Response {
    let mode = match (request.issue_secs, request.status, request.mode.as_deref()) {
        (Some(secs), None, None) => Mode::Issue(SignedDuration::from_secs(secs)),
        (None, Some(code), None) if StatusCode::from_u16(code).is_ok() && code >= 200 => {
            Mode::Status(code)
        }
        (None, None, Some("garbage")) => Mode::Garbage,
        (None, None, Some("hang")) => Mode::Hang,
        (None, None, Some("redirect")) => Mode::Redirect,
        (None, None, Some("huge")) => Mode::Huge,
        (None, None, Some("expired")) => Mode::Expired,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "give one of issue_secs, status (200-999) or mode (garbage, hang, redirect, huge, expired)",
            )
                .into_response();
        }
    };
    *lock(&state.mode) = mode;
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallRequest {
    login: String,
    id: u64,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    repositories: Option<Vec<String>>,
    #[serde(default)]
    suspended: bool,
}

async fn install(
    State(state): State<Arc<StandInState>>,
    axum::Json(request): axum::Json<InstallRequest>,
) -> Response {
    if !valid_login(&request.login) || request.id == 0 {
        return (
            StatusCode::BAD_REQUEST,
            "login: 1-39 letters, digits, '-' or '_'; id > 0",
        )
            .into_response();
    }
    let account = match request.kind.as_deref() {
        None | Some("organization") => Account::Organization(request.login),
        Some("user") => Account::User(request.login),
        Some("enterprise") => Account::Enterprise(request.login),
        Some("none") => Account::Missing,
        Some(_) => {
            return (
                StatusCode::BAD_REQUEST,
                "kind: organization, user, enterprise or none",
            )
                .into_response();
        }
    };
    let installation = Installation {
        id: request.id,
        account,
        repositories: request.repositories,
        permissions: default_permissions(),
        suspended: request.suspended,
    };
    let mut all = lock(&state.installations);
    all.retain(|i| i.id != installation.id);
    all.push(installation);
    StatusCode::NO_CONTENT.into_response()
}

async fn uninstall(
    State(state): State<Arc<StandInState>>,
    axum::extract::Path(id): axum::extract::Path<u64>,
) -> Response {
    lock(&state.installations).retain(|i| i.id != id);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FormatRequest {
    format: String,
}

async fn token_format(
    State(state): State<Arc<StandInState>>,
    axum::Json(request): axum::Json<FormatRequest>,
) -> Response {
    let format = match request.format.as_str() {
        "classic" => TokenFormat::Classic,
        "stateless" => TokenFormat::Stateless,
        _ => return (StatusCode::BAD_REQUEST, "format: classic or stateless").into_response(),
    };
    *lock(&state.format) = format;
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitRequest {
    kind: String,
    secs: i64,
}

async fn rate_limit(
    State(state): State<Arc<StandInState>>,
    axum::Json(request): axum::Json<RateLimitRequest>,
) -> Response {
    let length = SignedDuration::from_secs(request.secs.clamp(1, 3600));
    let kind = match request.kind.as_str() {
        "primary" => RateLimit::Primary(length),
        "secondary" => RateLimit::Secondary {
            status: 429,
            retry_after: length,
        },
        "secondary-403" => RateLimit::Secondary {
            status: 403,
            retry_after: length,
        },
        "secondary-bare" => RateLimit::SecondaryWithoutHeaders(length),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "kind: primary, secondary, secondary-403 or secondary-bare",
            )
                .into_response();
        }
    };
    *lock(&state.limit) = Some(crate::Limit { kind, until: None });
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageSize {
    page_size: usize,
}

async fn page_size(
    State(state): State<Arc<StandInState>>,
    axum::Json(request): axum::Json<PageSize>,
) -> Response {
    *lock(&state.page_size) = request.page_size.clamp(1, 100);
    StatusCode::NO_CONTENT.into_response()
}
