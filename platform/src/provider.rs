//! The token provider contract.
//!
//! Upstream's first fallback minted a fresh GitHub token on every request: a
//! stampede against GitHub under load. Here every provider answers through a
//! [`TokenCache`](crate::token_cache::TokenCache), which keeps the contract
//! (see there): never an expired token, replaced ahead of expiry, one
//! upstream call however many callers.
//!
//! The trait returns a boxed future so it stays object safe: the service
//! holds its provider as `Arc<dyn TokenProvider>`.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::metrics::PlatformMetrics;
use crate::scope::MintScope;

/// How long before expiry a cached token is replaced (GitHub's own plugin
/// uses the same five minutes).
pub const REFRESH_WINDOW: Duration = Duration::from_secs(5 * 60);

/// The most remaining life a caller may demand of a cached token
/// (`min_remaining_secs`). A demand close to a token's whole life would make
/// every call mint; this cap (and half the token's life, whichever is less)
/// keeps a misbehaving or hostile client from turning the cache off.
pub const MAX_MIN_REMAINING: Duration = Duration::from_secs(30 * 60);

/// After a failed upstream call, how long further callers get the same error
/// without a new call, so a failing upstream sees a few calls a minute at
/// most whatever the request rate.
pub const FAILURE_COOLDOWN: Duration = Duration::from_secs(2);

/// A token together with the expiry its issuer stated.
///
/// `Debug` redacts the token (it is a [`SecretString`]).
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The token itself.
    pub token: SecretString,
    /// When the issuer says it stops working.
    pub expires_at: Timestamp,
}

impl IssuedToken {
    /// A short, non-reversible fingerprint (first 12 hex digits of the
    /// SHA-256) for logs that must tell tokens apart without showing them.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.token.expose_secret())
    }
}

/// The fingerprint of `secret` (credd-core's one rule).
pub(crate) use credd_core::secret::fingerprint;

/// Whether the SHA-256 of `token`'s text is `sha256` (constant time).
pub(crate) fn digest_matches(token: &IssuedToken, sha256: &[u8; 32]) -> bool {
    secret_matches(token.token.expose_secret(), sha256)
}

/// Whether the SHA-256 of `secret` is `sha256` (constant time).
pub(crate) fn secret_matches(secret: &str, sha256: &[u8; 32]) -> bool {
    let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    bool::from(subtle::ConstantTimeEq::ct_eq(&digest[..], &sha256[..]))
}

/// Why a provider could not produce a token. Never contains a token, a JWT or
/// an upstream response body.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProviderError {
    /// Upstream answered with a non-success HTTP status.
    #[error("upstream answered HTTP {status}{}", detail_suffix(.detail))]
    UpstreamStatus {
        /// The HTTP status code.
        status: u16,
        /// Upstream's own short explanation (GitHub's `message`), sanitised.
        detail: Option<String>,
    },
    /// Upstream did not answer in time.
    #[error("upstream did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Upstream could not be reached (DNS, connect, TLS, reset).
    #[error("cannot reach upstream: {0}")]
    Transport(String),
    /// Upstream answered 2xx with something that is not a usable token.
    #[error("malformed upstream answer: {0}")]
    Malformed(String),
    /// The provider is misconfigured (bad key, bad URL, bad id).
    #[error("configuration: {0}")]
    Config(String),
    /// The GitHub App is not installed on this account.
    #[error("the GitHub App is not installed on account {0}")]
    NotInstalled(String),
    /// GitHub answered 404 for the installation: it was removed (the App
    /// uninstalled from its account).
    #[error("the GitHub App's installation {0} no longer exists")]
    InstallationGone(u64),
    /// GitHub refuses this token for a reason only a change of the grant or
    /// of the installation fixes: 422 (a repository the installation does
    /// not reach, a permission it lacks), 403 (the installation suspended).
    #[error("GitHub refuses this token (HTTP {status}): {reason}")]
    Refused {
        /// GitHub's status.
        status: u16,
        /// GitHub's `message` (and `errors`), sanitised.
        reason: String,
    },
    /// GitHub rate limits the App: nothing is asked of GitHub before
    /// `until`.
    #[error("GitHub rate limits the App until {until}")]
    RateLimited {
        /// When GitHub may be asked again.
        until: Timestamp,
        /// How long that was from when the error was made (on the
        /// provider's clock): the caller's `Retry-After`.
        wait: Duration,
    },
}

fn detail_suffix(detail: &Option<String>) -> String {
    match detail {
        Some(d) => format!(" ({d})"),
        None => String::new(),
    }
}

impl ProviderError {
    /// A stable one-word class for logs and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Self::UpstreamStatus { .. } => "upstream_status",
            Self::Timeout(_) => "timeout",
            Self::Transport(_) => "transport",
            Self::Malformed(_) => "malformed",
            Self::Config(_) => "config",
            Self::NotInstalled(_) => "not_installed",
            Self::InstallationGone(_) => "installation_gone",
            Self::Refused { .. } => "refused",
            Self::RateLimited { .. } => "rate_limited",
        }
    }

    /// The `status` label of the upstream-errors metric: GitHub's status
    /// when it answered one, else the class.
    pub fn status_label(&self) -> String {
        match self {
            Self::UpstreamStatus { status, .. } | Self::Refused { status, .. } => {
                status.to_string()
            }
            Self::InstallationGone(_) => "404".to_owned(),
            other => other.class().to_owned(),
        }
    }

    /// Whether this failure still stands at `now`: a rate limit does not
    /// outlive its end (then GitHub may be asked again at once), anything
    /// else does (until its cool-down).
    pub fn stands_at(&self, now: Timestamp) -> bool {
        match self {
            Self::RateLimited { until, .. } => *until > now,
            _ => true,
        }
    }

    /// Whether GitHub said this definitively: asking again soon gets the
    /// same answer, so it is remembered for [`DEFINITIVE_COOLDOWN`] rather
    /// than [`FAILURE_COOLDOWN`] (a rate limit is held to its own end).
    pub fn is_definitive(&self) -> bool {
        matches!(
            self,
            Self::NotInstalled(_) | Self::InstallationGone(_) | Self::Refused { .. }
        )
    }
}

/// How long a definitive refusal from GitHub ([`ProviderError::is_definitive`])
/// is answered from memory: a fleet of workspaces asking for a token GitHub
/// refuses costs one mint per this interval, and a fix on GitHub's side
/// (installing the App, granting a permission) shows within it.
pub const DEFINITIVE_COOLDOWN: Duration = Duration::from_secs(30);

/// The future a [`TokenProvider`] returns.
pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<IssuedToken, ProviderError>> + Send + 'a>>;

/// Something that hands out a current GitHub token.
///
/// Contract: never returns an expired token; when its cached token is inside
/// the refresh window it obtains a new one before answering; concurrent
/// callers share one upstream call. Implementations get this by answering
/// through a [`TokenCache`](crate::token_cache::TokenCache).
pub trait TokenProvider: Send + Sync {
    /// The counters this provider's caches add to, which the service
    /// serves at `/metrics` (see [`crate::metrics`]). The default, for a
    /// provider that counts nothing: an empty set of its own.
    fn metrics(&self) -> Arc<PlatformMetrics> {
        Arc::default()
    }

    /// The current token and its expiry.
    fn token(&self) -> TokenFuture<'_>;

    /// A token for `request`: its scope (`None`: the configured installation,
    /// unscoped, as [`TokenProvider::token`]) with at least its
    /// `min_remaining` of life when the cache can tell.
    ///
    /// The default serves unscoped requests from [`TokenProvider::token`]
    /// and refuses scoped ones (a provider that cannot down-scope must never
    /// hand out a broader token).
    fn scoped_token(&self, request: TokenRequest) -> ServedFuture<'_> {
        Box::pin(async move {
            if request.scope.is_some() {
                return Err(ProviderError::Config(
                    "this token provider cannot mint tokens scoped by a grant".into(),
                ));
            }
            let issued = self.token().await?;
            Ok(ServedToken::unscoped(issued))
        })
    }

    /// A workspace reports that GitHub refused one of its tokens: a
    /// matching cached token is dropped, at most once per workspace and
    /// installation per [`REFUSAL_INTERVAL`]. The default does nothing.
    fn report_refusal(&self, refusal: Refusal) -> RefusalFuture<'_> {
        let _ = refusal;
        Box::pin(async { RefusalOutcome::NoMatch })
    }
}

/// [`TokenProvider::token`] for a provider that serves every request
/// through one scoped path: the unscoped request's token.
pub(crate) fn unscoped_token<'a>(
    served: impl Future<Output = Result<ServedToken, ProviderError>> + Send + 'a,
) -> TokenFuture<'a> {
    Box::pin(async move { served.await.map(|served| served.issued) })
}

/// What a caller asks a provider for.
#[derive(Clone, Debug, Default)]
pub struct TokenRequest {
    /// `None`: the configured installation, unscoped.
    pub scope: Option<MintScope>,
    /// The least remaining life the caller accepts of a cached token
    /// (clamped, see [`MAX_MIN_REMAINING`]).
    pub min_remaining: Duration,
}

/// A token with the scope it was minted for.
#[derive(Clone, Debug)]
pub struct ServedToken {
    /// The token and its expiry.
    pub issued: IssuedToken,
    /// The account it is for, when known.
    pub owner: Option<String>,
    /// `OWNER/NAME` of each repository it covers; `None`: all of the
    /// installation's.
    pub repositories: Option<Vec<String>>,
    /// Its permissions, as GitHub's answer states them (or the grant's).
    pub permissions: BTreeMap<String, String>,
}

impl ServedToken {
    /// `issued` for an unknown owner, every repository, unknown permissions.
    pub fn unscoped(issued: IssuedToken) -> Self {
        Self {
            issued,
            owner: None,
            repositories: None,
            permissions: BTreeMap::new(),
        }
    }
}

/// The future [`TokenProvider::scoped_token`] returns.
pub type ServedFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ServedToken, ProviderError>> + Send + 'a>>;

/// A workspace's report that GitHub refused a token it was served.
#[derive(Debug)]
pub struct Refusal {
    /// The workspace reporting.
    pub workspace: String,
    /// The scopes it may use (`None`: the unscoped one): where the refused
    /// token can be cached.
    pub scopes: Vec<Option<MintScope>>,
    /// The refused token's SHA-256.
    pub sha256: [u8; 32],
}

/// The future [`TokenProvider::report_refusal`] returns.
pub type RefusalFuture<'a> = Pin<Box<dyn Future<Output = RefusalOutcome> + Send + 'a>>;

/// What a refusal report did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalOutcome {
    /// The refused token was cached and is dropped: the next call mints.
    Dropped,
    /// No cached token of the workspace's scopes matches: nothing changed.
    NoMatch,
    /// It matches, but this workspace had a token of its installation
    /// dropped less than [`REFUSAL_INTERVAL`] ago: try again after this
    /// long.
    Limited {
        /// Until the workspace may have a token of the installation dropped
        /// again.
        retry_after: Duration,
    },
}

/// At most one refused token is dropped per (workspace, installation) per
/// this interval, so no workspace can make the platform hammer GitHub by
/// reporting refusals: a real revocation needs one drop, and a token GitHub
/// keeps refusing after a fresh mint is not fixed by minting faster.
///
/// Why per workspace and not per installation: with one window per
/// installation, any workspace on it that kept refusing its own token kept
/// the window busy, and every other workspace of the installation was
/// handed its refused token straight back. Keyed by workspace, a
/// workspace's reports can only ever limit its own.
pub const REFUSAL_INTERVAL: Duration = Duration::from_secs(30);

/// Where "now" comes from: the system clock in production, a controllable
/// one in tests of the refresh window.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Timestamp + Send + Sync>);

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self(Arc::new(Timestamp::now))
    }

    /// A clock reading `now()` from `f`.
    pub fn from_fn(f: impl Fn() -> Timestamp + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

/// `d` as a signed duration (saturating: a `Duration` beyond its range is
/// "forever" for every comparison here).
pub(crate) fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_well() {
        let e = ProviderError::UpstreamStatus {
            status: 401,
            detail: Some("Bad credentials".into()),
        };
        assert_eq!(
            e.to_string(),
            "upstream answered HTTP 401 (Bad credentials)"
        );
        assert_eq!(
            ProviderError::Timeout(Duration::from_secs(15)).to_string(),
            "upstream did not answer within 15s"
        );
        assert_eq!(fingerprint("x").len(), 12);
    }
}
