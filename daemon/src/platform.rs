//! The platform's token endpoint: the daemon's one client of it (the
//! refresher's calls and `--fetch-once`).
//!
//! `GET {PLATFORM_URL}/workspaces/{id}/github-installation-token` (or the admin
//! route) with `Authorization: Bearer <.auth_token>` answers
//! `{"token": "...", "expires_at": "<RFC3339>"}`, plus the token's scope
//! (`owner`, `repositories`, `permissions`) from a platform with grants.
//! `?owner=`/`?repository=` choose the account, `min_remaining_secs` says how
//! much life a cached token must still have to be worth handing out (so the
//! daemon's refresh gets a new token, not the one it holds), and
//! `POST …/refusals` reports a token git was refused with, by its SHA-256
//! (see [`PlatformClient::report_refusal`]). This module owns everything
//! about that exchange: the bearer is re-read on every call (the platform
//! rotates it), the body is capped and parsed as real JSON (any field order,
//! extra fields), and each failure is classified so callers can choose between
//! backing off, re-reading the bearer or giving up. The remaining lifetime is
//! measured against the response's `Date` header, so a workspace whose wall
//! clock is wrong still knows how long the token lives.
//!
//! No error built here contains the token, the bearer or the response body.

use std::borrow::Cow;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, DATE, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use credd_core::config::PlatformConfig;
use credd_core::deadlines;
use credd_core::platform_api::{
    CheckedAnswer, REFUSALS_SEGMENT, RefusalReport, Status, TokenAnswer, TokenQuery, Which,
};
use credd_core::protocol::Scope;
use credd_core::secret::Token;

/// Largest response body read from the platform: a token answer with the
/// largest token and scope (credd-core's bound, shared with the socket).
pub const MAX_BODY: usize = credd_core::protocol::MAX_TOKEN_ANSWER;
/// Largest `.auth_token` file read.
pub const MAX_BEARER_FILE: u64 = 8 * 1024;
/// How long reading `.auth_token` may take. It lives on whatever filesystem
/// `CONFIGS_DIR` is (a network mount, a secret volume); a stalled one must
/// cost a failed call, not a frozen daemon or a hung `git fetch`.
pub const BEARER_READ_TIMEOUT: Duration = deadlines::BEARER_READ;
/// Longest `Retry-After` honoured; anything longer is treated as this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Time limits for one platform call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing the TCP (and TLS) connection.
    pub connect: Duration,
    /// The whole call, body included.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            total: Duration::from_secs(15),
        }
    }
}

/// A token as granted by the platform.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The installation token.
    pub token: Token,
    /// Expiry as the platform stated it.
    pub expires_at: SystemTime,
    /// Life left when the response was sent: `expires_at` minus the response's
    /// `Date` (or the local clock when the platform sent none).
    pub lifetime: Duration,
    /// What the token may reach, as the platform stated it.
    pub scope: Scope,
}

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

    /// The platform's `Retry-After`, capped at [`MAX_RETRY_AFTER`].
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

/// Client of the platform's token endpoint.
#[derive(Debug, Clone)]
pub struct PlatformClient {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    bearer_path: PathBuf,
    /// The bearer read in flight, shared by every clone (the default
    /// token's refresher and each owner's): see [`BearerReads`].
    bearer_reads: Arc<BearerReads>,
    /// How the bearer file is read: [`read_bearer`] (tests hold it up).
    bearer_reader: BearerReader,
}

/// Reads the bearer file, blocking (run on a thread of its own).
type BearerReader = fn(&Path) -> Result<SecretString, PlatformError>;

/// One finished bearer read, handed to every call that waited for it.
type SharedRead = Arc<Result<SecretString, PlatformError>>;

/// The bearer read in flight, if any: single flight for `.auth_token`.
///
/// A read stuck in the kernel (a stalled filesystem under `CONFIGS_DIR`)
/// cannot be cancelled, so at most one read thread exists at a time. A call
/// that finds one running *joins* it and waits, within its own
/// [`BEARER_READ_TIMEOUT`], for that read's result — it does not fail
/// because another refresher happens to be reading. So calls at the same
/// moment (a SIGHUP with several owners' tokens held) share one read of the
/// file and all get its answer, and a stuck read still costs one thread
/// however many calls time out waiting for it. The slot is cleared before
/// the result is published, so a call that starts after a read finished
/// reads the file afresh (the platform rotates it).
#[derive(Debug, Default)]
struct BearerReads {
    running: Mutex<Option<tokio::sync::watch::Receiver<Option<SharedRead>>>>,
}

impl BearerReads {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<tokio::sync::watch::Receiver<Option<SharedRead>>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PlatformClient {
    /// Builds a client for `config`'s endpoint and bearer file.
    pub fn new(config: &PlatformConfig, timeouts: Timeouts) -> Result<Self, PlatformError> {
        let endpoint = reqwest::Url::parse(&config.token_endpoint()).map_err(|e| {
            PlatformError::InvalidUrl {
                problem: e.to_string(),
            }
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.total)
            // The bearer must never follow a redirect to another origin.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("molecule-credd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(PlatformError::Client)?;
        Ok(Self {
            http,
            endpoint,
            bearer_path: config.auth_token_path(),
            bearer_reads: Arc::default(),
            bearer_reader: read_bearer,
        })
    }

    /// Reads the bearer file with `reader` instead of [`read_bearer`].
    #[cfg(test)]
    fn with_bearer_reader(mut self, reader: BearerReader) -> Self {
        self.bearer_reader = reader;
        self
    }

    /// The URL called.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// The `Authorization` header, from the bearer file read afresh.
    async fn authorization(&self) -> Result<HeaderValue, PlatformError> {
        let bearer = self.read_bearer_bounded().await?;
        let mut auth = {
            let value = Zeroizing::new(format!("Bearer {}", bearer.expose_secret()));
            HeaderValue::from_str(&value).map_err(|_| PlatformError::BearerInvalid {
                path: self.bearer_path.clone(),
                problem: "it contains characters not allowed in an HTTP header",
            })?
        };
        auth.set_sensitive(true);
        Ok(auth)
    }

    /// The token URL for `query`.
    fn url_for(&self, query: &TokenQuery) -> reqwest::Url {
        let mut url = self.endpoint.clone();
        let pairs = query.pairs();
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        url
    }

    /// Fetches the token `query` asks for, reading the bearer file afresh.
    pub async fn fetch(&self, query: &TokenQuery) -> Result<Grant, PlatformError> {
        let auth = self.authorization().await?;
        let mut response = self
            .http
            .get(self.url_for(query))
            .header(AUTHORIZATION, auth)
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;

        let headers = response.headers();
        let date = headers
            .get(DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_date);
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, date.unwrap_or_else(SystemTime::now)));
        let declared_len = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());

        let what = || query.which.to_string();
        match Status::of(response.status().as_u16()) {
            Status::Granted => {}
            Status::Unauthorized => {
                return Err(PlatformError::Unauthorized {
                    status: Status::Unauthorized.code(),
                    path: self.bearer_path.clone(),
                });
            }
            Status::BadRequest => return Err(PlatformError::BadRequest { what: what() }),
            Status::NotGranted => return Err(PlatformError::NotGranted { what: what() }),
            Status::NotFound if query.which != Which::Default => {
                return Err(PlatformError::NotInstalled { what: what() });
            }
            Status::NotFound => return Err(PlatformError::NotConfigured),
            Status::TooManyRequests => return Err(PlatformError::RateLimited { retry_after }),
            Status::Unavailable(status) => {
                return Err(PlatformError::Server {
                    status,
                    retry_after,
                });
            }
            Status::Unexpected(status) => {
                return Err(PlatformError::UnexpectedStatus { status });
            }
        }

        if declared_len.is_some_and(|n| n > MAX_BODY as u64) {
            return Err(PlatformError::BodyTooLarge);
        }
        let mut body = Zeroizing::new(Vec::with_capacity(1024));
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport_error(e))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(PlatformError::BodyTooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        parse_grant(&body, date.unwrap_or_else(SystemTime::now))
    }

    /// Tells the platform that git was refused with the token whose SHA-256
    /// is `sha256` (lower-case hex), so it drops that token from its cache
    /// and the next call mints a fresh one instead of handing it out again.
    /// The platform rate-limits these per installation; a 429 or a platform
    /// without the route is not an error worth more than a log line.
    pub async fn report_refusal(&self, sha256: &str) -> Result<ReportOutcome, PlatformError> {
        let auth = self.authorization().await?;
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .map_err(|()| PlatformError::InvalidUrl {
                problem: "the endpoint cannot have a path".into(),
            })?
            .push(REFUSALS_SEGMENT);
        let body = serde_json::to_vec(&RefusalReport {
            sha256: Cow::Borrowed(sha256),
        })
        .unwrap_or_default();
        let response = self
            .http
            .post(url)
            .header(AUTHORIZATION, auth)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        Ok(match response.status().as_u16() {
            200..=299 => ReportOutcome::Accepted,
            429 => ReportOutcome::RateLimited,
            404 | 405 => ReportOutcome::Unsupported,
            status => ReportOutcome::Refused { status },
        })
    }

    /// [`read_bearer`] on a thread of its own, within [`BEARER_READ_TIMEOUT`],
    /// joining a read already in flight (see [`BearerReads`]).
    ///
    /// Not `spawn_blocking`: a read stuck in `open(2)` would then hold the
    /// runtime's shutdown forever. A plain thread is abandoned on timeout
    /// (it ends when the kernel lets it, or with the process).
    async fn read_bearer_bounded(&self) -> Result<SecretString, PlatformError> {
        let stalled = || PlatformError::BearerStalled {
            path: self.bearer_path.clone(),
            waited: BEARER_READ_TIMEOUT,
        };
        let mut result = {
            let mut running = self.bearer_reads.lock();
            match &*running {
                Some(read) => read.clone(),
                None => {
                    let (done, read) = tokio::sync::watch::channel(None);
                    let path = self.bearer_path.clone();
                    let reads = Arc::clone(&self.bearer_reads);
                    let reader = self.bearer_reader;
                    let spawned = std::thread::Builder::new()
                        .name("bearer-read".into())
                        .spawn(move || {
                            // The slot is cleared however the read ends (a
                            // panic included), and before the answer is
                            // sent: a call after this one reads afresh.
                            let read = {
                                let _clear = ClearOnDrop(reads);
                                reader(&path)
                            };
                            done.send_replace(Some(Arc::new(read)));
                        });
                    if let Err(source) = spawned {
                        return Err(PlatformError::BearerUnreadable {
                            path: self.bearer_path.clone(),
                            source,
                        });
                    }
                    // Set before the lock is released, so the thread's
                    // clear (which takes the lock) always comes after.
                    *running = Some(read.clone());
                    read
                }
            }
        };
        let answer = async {
            loop {
                if let Some(read) = result.borrow_and_update().clone() {
                    return Some(read);
                }
                if result.changed().await.is_err() {
                    // The thread ended without an answer (it panicked).
                    return result.borrow().clone();
                }
            }
        };
        match tokio::time::timeout(BEARER_READ_TIMEOUT, answer).await {
            Ok(Some(read)) => match &*read {
                Ok(bearer) => Ok(bearer.clone()),
                Err(error) => Err(copy_bearer_error(error)),
            },
            Ok(None) | Err(_) => Err(stalled()),
        }
    }

    fn transport_error(&self, e: reqwest::Error) -> PlatformError {
        let endpoint = self.endpoint.to_string();
        if e.is_timeout() {
            PlatformError::Timeout { endpoint }
        } else {
            PlatformError::Unreachable {
                endpoint,
                source: e.without_url(),
            }
        }
    }
}

/// What the platform did with a refusal report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Taken: a matching cached token is gone.
    Accepted,
    /// Too many reports for that installation just now; the platform keeps
    /// its token until its own refresh.
    RateLimited,
    /// The platform has no such route (an older platform, the admin route).
    Unsupported,
    /// Any other status.
    Refused {
        /// The status code.
        status: u16,
    },
}

/// Clears the bearer read in flight when dropped.
struct ClearOnDrop(Arc<BearerReads>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        *self.0.lock() = None;
    }
}

/// The same bearer-file error again, for each call that shared the read.
/// [`read_bearer`] returns only the bearer variants; an I/O error keeps its
/// kind and text.
fn copy_bearer_error(error: &PlatformError) -> PlatformError {
    match error {
        PlatformError::BearerUnreadable { path, source } => PlatformError::BearerUnreadable {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        PlatformError::BearerInvalid { path, problem } => PlatformError::BearerInvalid {
            path: path.clone(),
            problem,
        },
        PlatformError::BearerStalled { path, waited } => PlatformError::BearerStalled {
            path: path.clone(),
            waited: *waited,
        },
        other => PlatformError::BearerUnreadable {
            path: PathBuf::new(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

/// Reads and checks the bearer file (bounded, trimmed, header-safe). Blocks
/// as long as the filesystem does: async callers use the bounded read of
/// [`PlatformClient`].
///
/// Opened non-blocking, so a FIFO planted (or mounted) there cannot block the
/// open waiting for a writer, and refused unless it is a regular file.
pub fn read_bearer(path: &Path) -> Result<SecretString, PlatformError> {
    let invalid = |problem| PlatformError::BearerInvalid {
        path: path.to_owned(),
        problem,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|source| PlatformError::BearerUnreadable {
            path: path.to_owned(),
            source,
        })?;
    let is_file = file
        .metadata()
        .map_err(|source| PlatformError::BearerUnreadable {
            path: path.to_owned(),
            source,
        })?
        .is_file();
    if !is_file {
        return Err(invalid(
            "it is not a regular file (a FIFO, device or folder); the platform writes a plain file there",
        ));
    }
    let mut raw = Zeroizing::new(Vec::new());
    file.take(MAX_BEARER_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(|source| PlatformError::BearerUnreadable {
            path: path.to_owned(),
            source,
        })?;
    if raw.len() as u64 > MAX_BEARER_FILE {
        return Err(invalid("the file is larger than 8 KiB"));
    }
    let text = std::str::from_utf8(&raw).map_err(|_| invalid("it is not text"))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(invalid("the file is empty"));
    }
    if !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid("it contains spaces or non-printable characters"));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

/// Parses a 200 body. `now` is the platform's clock (its `Date` header).
pub fn parse_grant(body: &[u8], now: SystemTime) -> Result<Grant, PlatformError> {
    let malformed = |problem: String| PlatformError::Malformed { problem };
    let parsed: TokenAnswer<'_> = serde_json::from_slice(body).map_err(|e| {
        // serde_json's message can quote the offending value; describe the
        // error by its category and position only.
        malformed(match e.classify() {
            serde_json::error::Category::Data => format!(
                "expected a JSON object with string fields \"token\" and \"expires_at\" (line {}, column {})",
                e.line(),
                e.column()
            ),
            _ => format!(
                "not valid JSON (line {}, column {}; {} bytes)",
                e.line(),
                e.column(),
                body.len()
            ),
        })
    })?;
    let CheckedAnswer {
        token,
        expires_at,
        scope,
    } = parsed.check().map_err(|e| malformed(e.to_string()))?;
    let stated: jiff::Timestamp = expires_at.parse().map_err(|_| {
        malformed("\"expires_at\" is not an RFC 3339 timestamp such as 2026-01-01T12:00:00Z".into())
    })?;
    let expires_at = SystemTime::try_from(stated)
        .map_err(|_| malformed("\"expires_at\" is out of range".into()))?;
    let lifetime = expires_at.duration_since(now).unwrap_or(Duration::ZERO);
    if lifetime.is_zero() {
        return Err(PlatformError::AlreadyExpired {
            expires_at: stated.to_string(),
        });
    }
    Ok(Grant {
        token,
        expires_at,
        lifetime,
        scope,
    })
}

/// The platform's clock from a `Date` header value, if it parses.
pub fn parse_date(value: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(value).ok()
}

/// A `Retry-After` value (seconds or an HTTP date, relative to `now`),
/// capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Condvar;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Waker};

    use super::*;

    /// Holds bearer reads until opened, counting the reads started.
    struct Gate {
        open: Mutex<bool>,
        opened: Condvar,
        reads: AtomicUsize,
    }

    impl Gate {
        const fn new() -> Self {
            Self {
                open: Mutex::new(false),
                opened: Condvar::new(),
                reads: AtomicUsize::new(0),
            }
        }

        fn read(&self, path: &Path) -> Result<SecretString, PlatformError> {
            let mut open = self.open.lock().expect("gate");
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.opened.notify_all();
            while !*open {
                open = self.opened.wait(open).expect("gate");
            }
            drop(open);
            read_bearer(path)
        }

        /// Blocks until `n` reads have started.
        fn wait_for_reads(&self, n: usize) {
            let mut open = self.open.lock().expect("gate");
            while self.reads.load(Ordering::SeqCst) < n {
                open = self.opened.wait(open).expect("gate");
            }
        }

        fn open(&self) {
            *self.open.lock().expect("gate") = true;
            self.opened.notify_all();
        }
    }

    /// A client of a configs folder whose `.auth_token` holds `bearer`.
    fn client(dir: &Path, bearer: &str, reader: BearerReader) -> PlatformClient {
        std::fs::write(dir.join(".auth_token"), format!("{bearer}\n")).expect("bearer");
        let config = PlatformConfig::from_lookup(|name| match name {
            "CONFIGS_DIR" => Some(dir.into()),
            "PLATFORM_URL" => Some("http://127.0.0.1:9".into()),
            _ => None,
        })
        .expect("config");
        PlatformClient::new(&config, Timeouts::default())
            .expect("client")
            .with_bearer_reader(reader)
    }

    type Read<'a> = Pin<Box<dyn Future<Output = Result<SecretString, PlatformError>> + 'a>>;

    static SHARED: Gate = Gate::new();

    /// Issue 20, item 5: every per-owner client shared one "bearer read
    /// running" flag, so refreshes at the same moment (a SIGHUP with 8
    /// tokens held) failed at once with "stalled". Eight clones of one
    /// client ask while a read is in flight: all wait for that one read and
    /// all get the bearer.
    #[tokio::test]
    async fn concurrent_calls_share_one_bearer_read_and_none_fails() {
        let dir = tempfile::tempdir().expect("dir");
        let client = client(dir.path(), "bearer-shared-0123", |p| SHARED.read(p));
        let clones: Vec<PlatformClient> = (0..8).map(|_| client.clone()).collect();
        let mut calls: Vec<Read<'_>> = clones
            .iter()
            .map(|c| Box::pin(c.read_bearer_bounded()) as Read<'_>)
            .collect();
        // Each call starts (or joins) a read and waits: none fails at once.
        let mut cx = Context::from_waker(Waker::noop());
        for (n, call) in calls.iter_mut().enumerate() {
            assert!(
                matches!(call.as_mut().poll(&mut cx), Poll::Pending),
                "call {n} did not wait for the read in flight"
            );
        }
        SHARED.wait_for_reads(1);
        SHARED.open();
        for call in calls {
            let bearer = call.await.expect("the shared read's bearer");
            assert_eq!(bearer.expose_secret(), "bearer-shared-0123");
        }
        assert_eq!(SHARED.reads.load(Ordering::SeqCst), 1, "one read for all");
        // A call after the read finished reads the file afresh.
        std::fs::write(dir.path().join(".auth_token"), "bearer-rotated-4567\n").expect("rotate");
        let bearer = client.read_bearer_bounded().await.expect("a fresh read");
        assert_eq!(bearer.expose_secret(), "bearer-rotated-4567");
        assert_eq!(SHARED.reads.load(Ordering::SeqCst), 2);
    }

    static STUCK: Gate = Gate::new();

    /// The protection against a stuck `.auth_token` (a stalled filesystem)
    /// holds: calls time out as "stalled", and calls while it is stuck join
    /// it instead of starting another thread.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_read_fails_calls_in_time_and_costs_one_thread() {
        let dir = tempfile::tempdir().expect("dir");
        let client = client(dir.path(), "bearer-stuck-0123", |p| STUCK.read(p));
        for _ in 0..3 {
            let error = client.read_bearer_bounded().await.expect_err("stuck");
            assert!(
                matches!(error, PlatformError::BearerStalled { .. }),
                "{error:?}"
            );
            assert_eq!(error.class(), ErrorClass::Bearer);
        }
        STUCK.wait_for_reads(1);
        assert_eq!(STUCK.reads.load(Ordering::SeqCst), 1, "one stuck thread");
        STUCK.open();
    }
}
