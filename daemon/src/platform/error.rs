//! What a platform call can end with, and the class each failure is in
//! for the refresher's retry decisions. No error carries the token, the
//! bearer or a response body.

use std::path::PathBuf;
use std::time::Duration;

use super::MAX_BODY;

/// Broad classes of [`PlatformError`], for retry decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The local bearer file is missing or unusable.
    Bearer,
    /// The platform refused the bearer (401).
    Unauthorized,
    /// No GitHub App is configured on the platform, or it is not installed
    /// on the account asked for (404): only installing it will help.
    NotConfigured,
    /// The workspace may not have this token (403: outside its grant, or
    /// GitHub refuses it; 400: the platform refuses the request itself):
    /// only a grant change will help.
    NotGranted,
    /// Worth retrying later: network, timeout, 5xx, 429, garbage.
    Transient,
}

impl ErrorClass {
    /// Every class, in declaration order.
    pub const ALL: [Self; 5] = [
        Self::Bearer,
        Self::Unauthorized,
        Self::NotConfigured,
        Self::NotGranted,
        Self::Transient,
    ];

    /// The class in a word (metrics).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Bearer => "bearer",
            Self::Unauthorized => "unauthorized",
            Self::NotConfigured => "not_configured",
            Self::NotGranted => "not_granted",
            Self::Transient => "transient",
        }
    }
}

/// Why no token came back from the platform.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
    /// The endpoint URL did not parse.
    #[error("PLATFORM_URL does not form a valid endpoint URL: {problem}")]
    InvalidUrl {
        /// The URL parser's complaint.
        problem: String,
    },
    /// `.auth_token` could not be read.
    #[error(
        "cannot read the platform bearer from {path}; the platform writes it when the workspace registers"
    )]
    BearerUnreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reading `.auth_token` did not finish in time (a stalled filesystem),
    /// or an earlier read of it is still stuck.
    #[error(
        "reading the platform bearer from {path} did not finish within {} s; is the filesystem under CONFIGS_DIR stalled?",
        waited.as_secs()
    )]
    BearerStalled {
        /// The file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// `.auth_token` was empty, too large or not header-safe.
    #[error("the platform bearer in {path} is unusable: {problem}")]
    BearerInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// 401.
    #[error(
        "the platform refused the workspace bearer (HTTP {status}); check that {path} holds this workspace's current token"
    )]
    Unauthorized {
        /// The status code.
        status: u16,
        /// The bearer file used.
        path: PathBuf,
    },
    /// 403: outside the workspace's grant (or no grant at all), or GitHub
    /// refuses the token (a repository or permission the installation does
    /// not have, a suspended installation).
    #[error(
        "the platform does not give this workspace a token for {what} (HTTP 403: outside its grant, or GitHub refuses it); ask the platform's operator to fix the grant or the GitHub App's installation"
    )]
    NotGranted {
        /// What was asked for: `acme/api`, `owner acme`, `its default account`.
        what: String,
    },
    /// 404 for a named account: the GitHub App is not installed there.
    #[error(
        "the platform's GitHub App is not installed on the account of {what} (HTTP 404); install the App on that account"
    )]
    NotInstalled {
        /// What was asked for.
        what: String,
    },
    /// 400: the platform refuses the request as malformed (a name it does
    /// not accept, a parameter it does not know): asking again the same
    /// way cannot help.
    #[error(
        "the platform refuses the request for {what} as malformed (HTTP 400); credd and the platform may disagree on a name rule or a parameter"
    )]
    BadRequest {
        /// What was asked for.
        what: String,
    },
    /// 404: the platform has no GitHub App configured.
    #[error("the platform has no GitHub App configured (HTTP 404)")]
    NotConfigured,
    /// 429.
    #[error("the platform is rate limiting this workspace (HTTP 429)")]
    RateLimited {
        /// `Retry-After`, when given.
        retry_after: Option<Duration>,
    },
    /// 5xx.
    #[error("the platform failed (HTTP {status})")]
    Server {
        /// The status code.
        status: u16,
        /// `Retry-After`, when given (503).
        retry_after: Option<Duration>,
    },
    /// Any other non-200 status.
    #[error("unexpected HTTP {status} from the platform")]
    UnexpectedStatus {
        /// The status code.
        status: u16,
    },
    /// The call took longer than its deadline.
    #[error("timed out waiting for the platform at {endpoint}")]
    Timeout {
        /// The endpoint called.
        endpoint: String,
    },
    /// Connection refused, DNS failure, reset.
    #[error("cannot reach the platform at {endpoint}")]
    Unreachable {
        /// The endpoint called.
        endpoint: String,
        /// The transport error (carries no secret).
        #[source]
        source: reqwest::Error,
    },
    /// The body exceeded [`MAX_BODY`].
    #[error("the platform's answer is larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    /// The body was not the expected JSON. The body itself is never included.
    #[error("the platform's answer is not a token: {problem}")]
    Malformed {
        /// What was wrong, without the content.
        problem: String,
    },
    /// The platform handed out a token that had already expired.
    #[error("the platform handed out a token that expired at {expires_at}")]
    AlreadyExpired {
        /// The stated expiry (RFC3339).
        expires_at: String,
    },
}

impl PlatformError {
    /// How a caller should treat this failure.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::BearerUnreadable { .. }
            | Self::BearerStalled { .. }
            | Self::BearerInvalid { .. } => ErrorClass::Bearer,
            Self::Unauthorized { .. } => ErrorClass::Unauthorized,
            Self::NotConfigured | Self::NotInstalled { .. } => ErrorClass::NotConfigured,
            Self::NotGranted { .. } | Self::BadRequest { .. } => ErrorClass::NotGranted,
            Self::Client(_)
            | Self::InvalidUrl { .. }
            | Self::RateLimited { .. }
            | Self::Server { .. }
            | Self::UnexpectedStatus { .. }
            | Self::Timeout { .. }
            | Self::Unreachable { .. }
            | Self::BodyTooLarge
            | Self::Malformed { .. }
            | Self::AlreadyExpired { .. } => ErrorClass::Transient,
        }
    }

    /// The HTTP status the platform answered with, when it answered: 200
    /// for an answer whose body was unusable; `None` when no answer came
    /// (network, timeout, the bearer file) or it broke off mid-body.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            Self::Unauthorized { status, .. }
            | Self::Server { status, .. }
            | Self::UnexpectedStatus { status } => Some(*status),
            Self::NotGranted { .. } => Some(403),
            Self::BadRequest { .. } => Some(400),
            Self::NotInstalled { .. } | Self::NotConfigured => Some(404),
            Self::RateLimited { .. } => Some(429),
            Self::BodyTooLarge | Self::Malformed { .. } | Self::AlreadyExpired { .. } => Some(200),
            Self::Client(_)
            | Self::InvalidUrl { .. }
            | Self::BearerUnreadable { .. }
            | Self::BearerStalled { .. }
            | Self::BearerInvalid { .. }
            | Self::Timeout { .. }
            | Self::Unreachable { .. } => None,
        }
    }

    /// The platform's `Retry-After`, capped at [`MAX_RETRY_AFTER`](super::MAX_RETRY_AFTER).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } | Self::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the daemon is simply not there (so a client may try elsewhere).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Timeout { .. })
    }
}
