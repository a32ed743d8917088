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
//!
//! Files: this one the client and its calls; `error.rs` what a call can
//! end with; `bearer.rs` the bearer file, read bounded and shared;
//! `answer.rs` the answer's body and headers, parsed.

mod answer;
mod bearer;
mod error;

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, DATE, HeaderValue, RETRY_AFTER};
use secrecy::ExposeSecret;
use zeroize::Zeroizing;

use credd_core::config::PlatformConfig;
use credd_core::deadlines;
use credd_core::platform_api::{REFUSALS_SEGMENT, RefusalReport, Status, TokenQuery, Which};
use credd_core::protocol::Scope;
use credd_core::secret::Token;

pub use self::answer::{parse_date, parse_grant, parse_retry_after};
pub use self::bearer::read_bearer;
use self::bearer::{BearerReader, BearerReads};
pub use self::error::{ErrorClass, PlatformError};

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

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::path::Path;
    use std::pin::Pin;
    use std::sync::Condvar;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Waker};

    use secrecy::SecretString;

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
