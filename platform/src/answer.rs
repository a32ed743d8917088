//! What a workspace is answered when no token can be had: every
//! [`ProviderError`] mapped to one HTTP answer, here and nowhere else.
//!
//! Why in one place: the answer is what the daemon acts on (`credd-core`'s
//! states: `not_granted`, `not_configured`, back-off), so each of GitHub's
//! answers must become the same platform answer on every route, and the
//! reason a workspace is given must never include more than GitHub's own
//! short `message` (no token, no JWT, no body).
//!
//! | provider error | answer | the daemon |
//! | --- | --- | --- |
//! | `Refused` (GitHub's 422: a repository the installation does not reach, a permission it lacks; 403: the installation suspended) | `403` with GitHub's reason | `not_granted` |
//! | `NotInstalled`, `InstallationGone` (GitHub's 404) | `404` | `not_configured` |
//! | `RateLimited` (GitHub's primary or secondary limit) | `503` with `Retry-After` | backs off at least that long |
//! | anything else (GitHub's 401 or 5xx, a timeout, a malformed answer) | `500 token refresh failed`, the cause logged | backs off |

use std::time::Duration;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use credd_core::log_limit::{LOG_INTERVAL, SharedLogLimit};
use credd_core::platform_api::Status;

use crate::provider::ProviderError;
use crate::service::json_error;

/// The body of every answer for a failure that is not the workspace's to
/// fix: the cause is in the platform's log only.
pub const REFRESH_FAILED: &str = "token refresh failed";

impl IntoResponse for ProviderError {
    fn into_response(self) -> Response {
        match &self {
            // Answered from memory for a while, so a workspace can repeat
            // them cheaply: each reason logged at a bounded rate.
            Self::NotInstalled(_) | Self::InstallationGone(_) | Self::Refused { .. } => {
                static LOG: SharedLogLimit = SharedLogLimit::new(LOG_INTERVAL);
                let reason = self.to_string();
                if let Some(suppressed) = LOG.admit(&reason) {
                    tracing::warn!(suppressed, "[github] {reason}");
                }
                let status = if matches!(self, Self::Refused { .. }) {
                    Status::NotGranted
                } else {
                    Status::NotFound
                };
                json_error(status, &reason)
            }
            Self::RateLimited { wait, .. } => {
                // Rounded up: never invite a request before the limit ends.
                let wait = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
                let mut response = json_error(
                    Status::RATE_LIMITED,
                    &format!(
                        "GitHub rate limits the platform's GitHub App; retry after {} s",
                        wait
                    ),
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(wait));
                response
            }
            Self::UpstreamStatus { .. }
            | Self::Timeout(_)
            | Self::Transport(_)
            | Self::Malformed(_)
            | Self::Config(_) => {
                tracing::error!(
                    class = self.class(),
                    "[github] token refresh failed: {self}"
                );
                json_error(Status::REFRESH_FAILED, REFRESH_FAILED)
            }
        }
    }
}

/// Seconds a `Retry-After` says, for tests and logs.
pub fn retry_after(response: &Response) -> Option<Duration> {
    response
        .headers()
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn each_failure_has_its_one_answer() {
        let until = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(90);
        let wait = Duration::from_millis(89_500);
        let cases: Vec<(ProviderError, StatusCode)> = vec![
            (
                ProviderError::Refused {
                    status: 422,
                    reason: "The permissions requested are not granted to this installation."
                        .into(),
                },
                StatusCode::FORBIDDEN,
            ),
            (
                ProviderError::NotInstalled("acme".into()),
                StatusCode::NOT_FOUND,
            ),
            (ProviderError::InstallationGone(7), StatusCode::NOT_FOUND),
            (
                ProviderError::RateLimited { until, wait },
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                ProviderError::UpstreamStatus {
                    status: 502,
                    detail: None,
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (error, status) in cases {
            let response = error.clone().into_response();
            assert_eq!(response.status(), status, "{error}");
            assert_eq!(response.headers()["cache-control"], "no-store");
            let wait = retry_after(&response);
            if status == StatusCode::SERVICE_UNAVAILABLE {
                let wait = wait.expect("Retry-After").as_secs();
                assert_eq!(wait, 90, "rounded up");
            } else {
                assert_eq!(wait, None);
            }
        }
    }
}
