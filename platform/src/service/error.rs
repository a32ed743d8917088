//! Every way an API request fails, answered in one place: the handlers say
//! which failure it is ([`ApiError`]), and [`ApiError::into_response`]
//! gives its status (one of `platform_api::Status`'s meanings), its JSON
//! body and its log line — rate-limited wherever a workspace can repeat the
//! request at will. A provider's failures are answered by
//! [`crate::answer`], through [`ApiError::Provider`].

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use credd_core::log_limit::{LOG_INTERVAL, SharedLogLimit};
use credd_core::platform_api::Status;

use super::connections::AuthRefusals;
use super::{admin_route_closed, json_error};
use crate::auth::{AuthError, valid_workspace_id};
use crate::provider::{ProviderError, REFUSAL_INTERVAL};

/// Why a request was not served.
pub(crate) enum ApiError {
    /// 401: no bearer, or a wrong one. Counted for the server loop's
    /// periodic summary when `tally` is there (a flood of them cannot
    /// flood the log), else a warning of its own.
    Unauthorized {
        route: &'static str,
        workspace: Option<String>,
        error: AuthError,
        tally: Option<Arc<AuthRefusals>>,
    },
    /// 400: a query or body the contract does not allow.
    BadRequest(String),
    /// 403: outside the workspace's grant.
    OutsideGrant { workspace: String, reason: String },
    /// 403: a workspace bearer on the admin route while grants are in force.
    AdminRouteClosed { workspace: String },
    /// 404: no GitHub App is configured.
    NotConfigured,
    /// 404: no such route.
    NoRoute,
    /// 429: the workspace had a refused token of this installation dropped
    /// within [`REFUSAL_INTERVAL`].
    RefusalLimited {
        workspace: String,
        fingerprint: String,
        retry_after: Duration,
    },
    /// The provider failed: [`crate::answer`] says how that is answered.
    Provider(ProviderError),
    /// 500: the provider handed out a token that cannot be served (why, for
    /// the log).
    Unusable(String),
}

impl From<ProviderError> for ApiError {
    fn from(error: ProviderError) -> Self {
        Self::Provider(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Unauthorized {
                route,
                workspace,
                error,
                tally,
            } => {
                let workspace = workspace.as_deref().map(|id| {
                    if valid_workspace_id(id) {
                        id
                    } else {
                        "<invalid id>"
                    }
                });
                match tally {
                    Some(tally) => {
                        tally.count(error == AuthError::MissingBearer, workspace);
                        tracing::debug!(route, workspace, "request refused: {error}");
                    }
                    None => tracing::warn!(route, workspace, "request refused: {error}"),
                }
                json_error(Status::Unauthorized, &error.to_string())
            }
            Self::BadRequest(message) => json_error(Status::BadRequest, &message),
            Self::OutsideGrant { workspace, reason } => {
                static LOG: SharedLogLimit = SharedLogLimit::new(LOG_INTERVAL);
                if let Some(suppressed) = LOG.admit(&workspace) {
                    tracing::warn!(workspace = %workspace, suppressed, "token refused: {reason}");
                }
                json_error(Status::NotGranted, &reason)
            }
            Self::AdminRouteClosed { workspace } => {
                static LOG: SharedLogLimit = SharedLogLimit::new(LOG_INTERVAL);
                if let Some(suppressed) = LOG.admit(&workspace) {
                    tracing::warn!(
                        workspace = %workspace,
                        suppressed,
                        "admin route refused to a workspace bearer: grants are in force (ask the workspace route)"
                    );
                }
                json_error(Status::NotGranted, &admin_route_closed())
            }
            Self::NotConfigured => json_error(Status::NotFound, "no GitHub App configured"),
            Self::NoRoute => json_error(Status::NotFound, "not found"),
            Self::RefusalLimited {
                workspace,
                fingerprint,
                retry_after,
            } => {
                static LOG: SharedLogLimit = SharedLogLimit::new(LOG_INTERVAL);
                if let Some(suppressed) = LOG.admit(&workspace) {
                    tracing::warn!(
                        workspace = %workspace,
                        suppressed,
                        "[github] refusal of token {fingerprint} rate-limited (one drop per workspace and installation per {})",
                        humantime::format_duration(REFUSAL_INTERVAL)
                    );
                }
                let mut response = json_error(
                    Status::TooManyRequests,
                    "this workspace had a refused token of this installation dropped moments ago; retry later",
                );
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after.as_secs().max(1)),
                );
                response
            }
            Self::Provider(error) => error.into_response(),
            Self::Unusable(why) => {
                tracing::error!("[github] token refresh failed: {why}");
                json_error(Status::REFRESH_FAILED, crate::answer::REFRESH_FAILED)
            }
        }
    }
}
