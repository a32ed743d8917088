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
//! - `PUT /_stand-in/mode` with `{"issue_secs": N}`, `{"status": CODE}` or
//!   `{"mode": "garbage" | "hang" | "redirect" | "huge" | "expired"}`;
//! - `POST /_stand-in/installations` with `{"login": "acme", "id": 1001}`;
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

use crate::{Mode, StandInState, lock, valid_login};

/// Adds the inspection routes to `app`.
pub(crate) fn routes(app: Router, state: Arc<StandInState>) -> Router {
    let inspect = Router::new()
        .route("/_stand-in/record", axum::routing::get(record))
        .route("/_stand-in/mode", axum::routing::put(set_mode))
        .route("/_stand-in/installations", axum::routing::post(install))
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
    axum::Json(serde_json::json!({
        "calls": *state.calls.borrow(),
        "listings": *lock(&state.listings),
        "issued": lock(&state.issued).len(),
        "rejections": lock(&state.rejections).clone(),
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
struct Installation {
    login: String,
    id: u64,
}

async fn install(
    State(state): State<Arc<StandInState>>,
    axum::Json(request): axum::Json<Installation>,
) -> Response {
    if !valid_login(&request.login) || request.id == 0 {
        return (
            StatusCode::BAD_REQUEST,
            "login: 1-39 letters, digits, '-' or '_'; id > 0",
        )
            .into_response();
    }
    lock(&state.installations).push((request.login, request.id));
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
