//! The platform service in-process, behind a fault switch.
//!
//! Why: the daemon's and the helper's behaviour against a failing platform
//! (down, hanging, refusing, rate limiting, lying about the time) is most of
//! what they are for. This double is the real service (`molecule_platform`'s
//! router with the dev provider) behind a middleware a test flips at run
//! time; it counts requests and lets a test block until "N requests seen".
//!
//! It can also be given a grants table ([`PlatformOptions::grants`],
//! [`TestPlatform::set_grants`]), so the daemon's per-owner tokens are
//! exercised against the real scoping rules: each issued token says which
//! owner, repositories and permissions it carries, each request keeps its
//! query, and refusal reports are counted.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::http::HttpServer;
use crate::lock;
use crate::secrets::{Secrets, assert_secret, random_secret};

/// The workspace id the test platform knows (see
/// [`Sandbox::use_platform_as_workspace`](crate::Sandbox::use_platform_as_workspace)).
pub const WORKSPACE_ID: &str = "ws-credd-test";

/// What the platform does with the next request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Served by the real platform service.
    PassThrough,
    /// Listener closed and every open connection dropped: connection refused.
    Down,
    /// Answer this status with a JSON error body (500, 401, 404, 503…).
    Status(u16),
    /// 429 with `Retry-After: <seconds>`.
    RateLimited {
        /// Seconds sent in `Retry-After`.
        retry_after_secs: u64,
    },
    /// Hold the request until the fault changes, then answer per the new one.
    Hang,
    /// 200 with an HTML body.
    NotJson,
    /// Pass through, but state an expiry only this far away.
    ShortLife(Duration),
    /// Pass through from a platform whose clock is this many seconds behind
    /// (negative: ahead): `Date` and `expires_at` both shifted, so the real
    /// remaining life is unchanged.
    ClockSkew(i64),
}

/// One request the platform saw.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// When it arrived.
    pub at: Instant,
    /// Request method (`GET`, `POST`).
    pub method: String,
    /// Request path.
    pub path: String,
    /// The query string as sent (without `?`), if any.
    pub query: Option<String>,
    /// The fault in force when it arrived.
    pub fault: Fault,
}

/// A token the platform handed out, with the expiry it stated.
#[derive(Debug, Clone)]
pub struct HandedOut {
    /// The token.
    pub token: String,
    /// Stated expiry.
    pub expires_at: SystemTime,
    /// The owner the platform's answer names (absent without grants).
    pub owner: Option<String>,
    /// `OWNER/NAME` of each repository it covers; `None`: all.
    pub repositories: Option<Vec<String>>,
    /// The permissions the answer states.
    pub permissions: BTreeMap<String, String>,
}

impl HandedOut {
    /// The stated expiry in whole Unix seconds (as `password_expiry_utc`).
    pub fn expires_at_secs(&self) -> u64 {
        self.expires_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs()
    }
}

/// Lets other doubles ask whether a token is one the platform issued and
/// that has not expired.
#[derive(Clone)]
pub struct TokenAuthority {
    issued: Arc<Mutex<Vec<HandedOut>>>,
    revoked: Arc<Mutex<Vec<String>>>,
}

impl TokenAuthority {
    /// Whether `token` was issued and its stated expiry is still ahead.
    pub fn is_current(&self, token: &str) -> bool {
        let now = SystemTime::now();
        !lock(&self.revoked).iter().any(|t| t == token)
            && lock(&self.issued)
                .iter()
                .any(|t| t.token == token && t.expires_at > now)
    }

    /// Whether `token` may reach the repository `owner/name` by the scope
    /// the platform stated when it issued it (an unscoped token reaches
    /// every repository), as GitHub limits an installation token.
    pub fn may_access(&self, token: &str, owner: &str, name: &str) -> bool {
        lock(&self.issued)
            .iter()
            .filter(|t| t.token == token)
            .any(|t| {
                t.owner
                    .as_deref()
                    .is_none_or(|o| o.eq_ignore_ascii_case(owner))
                    && t.repositories.as_ref().is_none_or(|list| {
                        list.iter()
                            .any(|r| r.eq_ignore_ascii_case(&format!("{owner}/{name}")))
                    })
            })
    }

    /// Makes the git server refuse `token` from now on (as GitHub would a
    /// revoked installation token).
    pub fn revoke(&self, token: &str) {
        lock(&self.revoked).push(token.to_owned());
    }
}

struct PlatformShared {
    fault: tokio::sync::watch::Sender<Fault>,
    seen: Mutex<Vec<SeenRequest>>,
    seen_cv: Condvar,
    issued: Arc<Mutex<Vec<HandedOut>>>,
    revoked: Arc<Mutex<Vec<String>>>,
    secrets: Secrets,
}

/// The path suffix of refusal reports.
const REFUSALS_SUFFIX: &str = "/github-installation-token/refusals";

/// Options for [`TestPlatform::with_options`].
#[derive(Debug, Clone)]
pub struct PlatformOptions {
    /// Lifetime of the dev tokens.
    pub token_ttl: Duration,
    /// A grants file's text (TOML, as `PLATFORM_GRANTS_FILE`); `None`: no
    /// grants, every workspace gets the unscoped token.
    pub grants: Option<String>,
    /// Owners where the App counts as not installed (404).
    pub not_installed: Vec<String>,
}

impl Default for PlatformOptions {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(3600),
            grants: None,
            not_installed: Vec::new(),
        }
    }
}

/// The bearers the test platform accepts.
#[derive(Clone)]
struct Bearers {
    admin: String,
    workspace: String,
}

/// The platform service in-process, behind a [`Fault`] switch.
pub struct TestPlatform {
    shared: Arc<PlatformShared>,
    provider: Arc<molecule_platform::DevProvider>,
    grants: Arc<molecule_platform::Grants>,
    app: Router,
    addr: SocketAddr,
    bearers: Bearers,
    server: Mutex<Option<HttpServer>>,
}

impl TestPlatform {
    /// Starts a platform with default options, serving.
    pub fn start() -> Self {
        Self::with_options(PlatformOptions::default())
    }

    /// Starts a platform whose dev tokens live `ttl`.
    pub fn with_ttl(ttl: Duration) -> Self {
        Self::with_options(PlatformOptions {
            token_ttl: ttl,
            ..PlatformOptions::default()
        })
    }

    /// Starts a platform with `options`, serving on a fresh loopback port.
    pub fn with_options(options: PlatformOptions) -> Self {
        let service = platform_service(&options);
        let (app, bearers) = (service.app, service.bearers);
        let secrets = Secrets::new();
        secrets.add("a platform bearer", bearers.admin.clone());
        secrets.add("a platform bearer", bearers.workspace.clone());
        let shared = Arc::new(PlatformShared {
            fault: tokio::sync::watch::Sender::new(Fault::PassThrough),
            seen: Mutex::default(),
            seen_cv: Condvar::new(),
            issued: Arc::default(),
            revoked: Arc::default(),
            secrets,
        });
        let app = app.layer(axum::middleware::from_fn_with_state(
            Arc::clone(&shared),
            fault_layer,
        ));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind platform");
        let addr = listener.local_addr().expect("platform addr");
        let platform = Self {
            shared,
            provider: service.provider,
            grants: service.grants,
            app,
            addr,
            bearers,
            server: Mutex::default(),
        };
        platform.serve(listener);
        platform
    }

    /// Starts a platform that is down from the start (port reserved, closed).
    pub fn start_down() -> Self {
        Self::start().with_fault(Fault::Down)
    }

    /// This platform with `fault` in force (see [`Self::set_fault`]).
    pub fn with_fault(self, fault: Fault) -> Self {
        self.set_fault(fault);
        self
    }

    fn serve(&self, listener: TcpListener) {
        *lock(&self.server) = Some(HttpServer::serve(listener, self.app.clone()));
    }

    fn shut_down_server(&self) {
        let server = lock(&self.server).take();
        if let Some(server) = server {
            server.stop();
        }
    }

    /// Base URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The admin bearer (written to `.auth_token` by
    /// [`Sandbox::use_platform`](crate::Sandbox::use_platform)).
    pub fn bearer(&self) -> &str {
        &self.bearers.admin
    }

    /// The bearer of workspace [`WORKSPACE_ID`].
    pub fn workspace_bearer(&self) -> &str {
        &self.bearers.workspace
    }

    /// Switches behaviour. `Down` closes the listener and drops open
    /// connections; leaving `Down` listens again on the same port.
    pub fn set_fault(&self, fault: Fault) {
        let was_down = *self.shared.fault.borrow() == Fault::Down;
        if fault == Fault::Down && !was_down {
            // Flip first so a hung request released by the change does not
            // get answered on its way out.
            self.shared.fault.send_replace(fault);
            self.shut_down_server();
            return;
        }
        self.shared.fault.send_replace(fault.clone());
        if was_down && fault != Fault::Down {
            let listener = TcpListener::bind(self.addr)
                .unwrap_or_else(|e| panic!("platform: cannot listen again on {}: {e}", self.addr));
            self.serve(listener);
        }
    }

    /// Requests seen so far (any fault but `Down`, which sees none).
    pub fn requests(&self) -> usize {
        lock(&self.shared.seen).len()
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        lock(&self.shared.seen).clone()
    }

    /// Blocks until at least `n` requests were seen; panics after `timeout`.
    #[track_caller]
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> usize {
        let guard = lock(&self.shared.seen);
        let (guard, result) = self
            .shared
            .seen_cv
            .wait_timeout_while(guard, timeout, |seen| seen.len() < n)
            .unwrap_or_else(|e| e.into_inner());
        assert!(
            !result.timed_out(),
            "platform: waited {timeout:?} for {n} requests, saw {}",
            guard.len()
        );
        guard.len()
    }

    /// Replaces the grants in force, as a SIGHUP with a changed grants file
    /// would (`None`: no grants file). A text that does not parse keeps the
    /// previous grants and returns the platform's error message.
    pub fn set_grants(&self, grants: Option<&str>) -> Result<usize, String> {
        self.grants.replace(grants).map_err(|e| e.to_string())
    }

    /// From now on the App counts as not installed on `owners` (only).
    pub fn set_not_installed(&self, owners: &[&str]) {
        self.provider.set_not_installed(owners.iter().copied());
    }

    /// Every mint of the platform's dev provider with the scope it was
    /// asked for (as GitHub would have been asked), oldest first.
    pub fn mints(&self) -> Vec<molecule_platform::dev::DevMint> {
        self.provider.mints()
    }

    /// Refusal reports (`POST …/refusals`) seen so far.
    pub fn refusal_reports(&self) -> usize {
        lock(&self.shared.seen)
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with(REFUSALS_SUFFIX))
            .count()
    }

    /// Token requests (`GET …/github-installation-token`) seen so far.
    pub fn token_requests(&self) -> usize {
        lock(&self.shared.seen)
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/github-installation-token"))
            .count()
    }

    /// Tokens handed out so far, oldest first.
    pub fn issued(&self) -> Vec<HandedOut> {
        lock(&self.shared.issued).clone()
    }

    /// The token most recently handed out.
    pub fn last_issued(&self) -> Option<String> {
        lock(&self.shared.issued).last().map(|t| t.token.clone())
    }

    /// Asserts `token` is the one most recently handed out (failures show
    /// fingerprints); `what` names it.
    #[track_caller]
    pub fn assert_last_issued(&self, token: &str, what: &str) {
        assert_secret(self.last_issued().as_deref(), token, true, what);
    }

    /// A handle deciding which tokens are current (for the git server).
    pub fn authority(&self) -> TokenAuthority {
        TokenAuthority {
            issued: Arc::clone(&self.shared.issued),
            revoked: Arc::clone(&self.shared.revoked),
        }
    }

    /// Its bearers and every token it issued (and will issue).
    pub fn secrets(&self) -> &Secrets {
        &self.shared.secrets
    }
}

impl Drop for TestPlatform {
    fn drop(&mut self) {
        // Release hung requests so the server thread can finish.
        self.shared.fault.send_replace(Fault::Down);
        self.shut_down_server();
    }
}

async fn fault_layer(
    State(shared): State<Arc<PlatformShared>>,
    request: Request,
    next: Next,
) -> Response {
    let mut fault_rx = shared.fault.subscribe();
    let fault = fault_rx.borrow_and_update().clone();
    {
        let mut seen = lock(&shared.seen);
        seen.push(SeenRequest {
            at: Instant::now(),
            method: request.method().as_str().to_owned(),
            path: request.uri().path().to_owned(),
            query: request.uri().query().map(str::to_owned),
            fault: fault.clone(),
        });
        shared.seen_cv.notify_all();
    }
    let mut fault = fault;
    while fault == Fault::Hang {
        if fault_rx.changed().await.is_err() {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        fault = fault_rx.borrow_and_update().clone();
    }
    let error = |status: StatusCode, headers: HeaderMap| {
        let mut response = (
            status,
            headers,
            axum::Json(serde_json::json!({"error": "injected fault"})),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    };
    match fault {
        // A request that was in flight when the platform went down.
        Fault::Down => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Fault::Hang => unreachable!("waited out above"),
        Fault::Status(code) => error(
            StatusCode::from_u16(code).expect("valid status"),
            HeaderMap::new(),
        ),
        Fault::RateLimited { retry_after_secs } => {
            let mut headers = HeaderMap::new();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            error(StatusCode::TOO_MANY_REQUESTS, headers)
        }
        Fault::NotJson => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body>502 Bad Gateway (from a proxy)</body></html>",
        )
            .into_response(),
        Fault::PassThrough => record_issued(&shared, next.run(request).await, None, 0).await,
        Fault::ShortLife(life) => {
            record_issued(&shared, next.run(request).await, Some(life), 0).await
        }
        Fault::ClockSkew(behind) => {
            record_issued(&shared, next.run(request).await, None, behind).await
        }
    }
}

/// Reads a 200 token answer, remembers the token (so the git server accepts
/// it and the secret scan looks for it), optionally rewrites its expiry.
async fn record_issued(
    shared: &PlatformShared,
    response: Response,
    short_life: Option<Duration>,
    behind_secs: i64,
) -> Response {
    if response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .expect("platform body");
    let mut json: serde_json::Value = serde_json::from_slice(&bytes).expect("platform JSON");
    let token = json["token"].as_str().expect("token field").to_owned();
    let mut expires_at: jiff::Timestamp = json["expires_at"]
        .as_str()
        .expect("expires_at field")
        .parse()
        .expect("RFC 3339 expires_at");
    if let Some(life) = short_life {
        expires_at = jiff::Timestamp::try_from(SystemTime::now() + life).expect("in range");
        json["expires_at"] = expires_at.to_string().into();
    }
    shared.secrets.add("an issued token", token.clone());
    let repositories = json["repositories"].as_array().map(|names| {
        names
            .iter()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect()
    });
    let permissions = json["permissions"]
        .as_object()
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    lock(&shared.issued).push(HandedOut {
        token,
        expires_at: SystemTime::UNIX_EPOCH
            + Duration::from_millis(expires_at.as_millisecond().max(0) as u64),
        owner: json["owner"].as_str().map(str::to_owned),
        repositories,
        permissions,
    });
    if behind_secs != 0 {
        let shift = jiff::SignedDuration::from_secs(behind_secs);
        let stated = expires_at.checked_sub(shift).expect("in range");
        json["expires_at"] = stated.to_string().into();
        let skewed_now = jiff::Timestamp::now().checked_sub(shift).expect("in range");
        let date = httpdate::fmt_http_date(
            SystemTime::UNIX_EPOCH + Duration::from_secs(skewed_now.as_second().max(0) as u64),
        );
        parts.headers.insert(
            header::DATE,
            HeaderValue::from_str(&date).expect("HTTP date"),
        );
    }
    let bytes = serde_json::to_vec(&json).expect("serialise");
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(bytes))
}

/// The platform's own HTTP service and the parts a test may steer.
struct PlatformService {
    app: Router,
    bearers: Bearers,
    provider: Arc<molecule_platform::DevProvider>,
    grants: Arc<molecule_platform::Grants>,
}

/// The platform's own HTTP service, composed as the binary composes it
/// ([`molecule_platform::Platform::from_config`]: the admin bearer, the
/// workspace bearers and the grants read from their files): the dev
/// provider, an admin bearer, one workspace bearer and the grants of
/// `options`.
fn platform_service(options: &PlatformOptions) -> PlatformService {
    use molecule_platform::config::{Config, ProviderChoice};
    use molecule_platform::{DevProvider, Platform};

    let bearers = Bearers {
        admin: random_secret("admin-bearer"),
        workspace: random_secret("workspace-bearer"),
    };
    let provider = Arc::new(DevProvider::new(options.token_ttl));
    provider.set_not_installed(options.not_installed.iter());
    let files = tempfile::tempdir().expect("tempdir");
    let workspace_tokens_file = files.path().join("workspace-tokens");
    std::fs::write(
        &workspace_tokens_file,
        format!(
            "{WORKSPACE_ID} {}\n",
            credd_core::secret::sha256_hex(bearers.workspace.as_bytes())
        ),
    )
    .expect("write the workspace tokens file");
    let grants_file = options.grants.as_ref().map(|text| {
        let file = files.path().join("grants.toml");
        std::fs::write(&file, text).expect("write the grants file");
        file
    });
    let platform = Platform::from_config(Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_token: Some(secrecy::SecretString::from(bearers.admin.clone())),
        workspace_tokens_file: Some(workspace_tokens_file),
        grants_file,
        provider: ProviderChoice::Given(Arc::clone(&provider) as _),
        dev_auth_token_file: None,
        log_format: molecule_platform::config::LogFormat::Text,
        shared: None,
    })
    .unwrap_or_else(|e| panic!("the test platform's configuration: {e:#}"));
    let grants = Arc::clone(platform.state.grants());
    PlatformService {
        app: molecule_platform::app(platform.state),
        bearers,
        provider,
        grants,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// One HTTP/1.1 exchange on a fresh connection: status and body.
    fn exchange(platform: &TestPlatform, method: &str, target: &str, body: &str) -> (u16, String) {
        let mut stream = std::net::TcpStream::connect(platform.addr).expect("connect");
        stream.set_read_timeout(Some(crate::WAIT)).expect("timeout");
        write!(
            stream,
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            platform.workspace_bearer(),
            body.len()
        )
        .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read");
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[test]
    fn grants_scope_what_it_issues_and_requests_keep_their_query() {
        let platform = TestPlatform::with_options(PlatformOptions {
            grants: Some(format!(
                "[workspace.{WORKSPACE_ID}]\nrepositories = [\"acme/api\", \"ghost/*\"]\n"
            )),
            not_installed: vec!["ghost".into()],
            ..PlatformOptions::default()
        });
        let route = format!("/workspaces/{WORKSPACE_ID}/github-installation-token");
        let (status, body) = exchange(
            &platform,
            "GET",
            &format!("{route}?repository=acme/api"),
            "",
        );
        assert_eq!(status, 200, "{body}");
        let issued = platform.issued();
        assert_eq!(issued.len(), 1);
        assert_eq!(issued[0].owner.as_deref(), Some("acme"));
        assert_eq!(issued[0].repositories, Some(vec!["acme/api".to_owned()]));
        assert_eq!(platform.mints().len(), 1);
        assert_eq!(
            platform.seen()[0].query.as_deref(),
            Some("repository=acme/api")
        );
        assert_eq!(
            exchange(&platform, "GET", &format!("{route}?owner=ghost"), "").0,
            404
        );
        assert_eq!(
            exchange(&platform, "GET", &format!("{route}?owner=evil"), "").0,
            403
        );

        let sha = crate::sha256_hex(&issued[0].token);
        let refusal = format!("{{\"sha256\": \"{sha}\"}}");
        assert_eq!(
            exchange(&platform, "POST", &format!("{route}/refusals"), &refusal).0,
            204
        );
        assert_eq!(platform.refusal_reports(), 1);
        let (status, body) = exchange(&platform, "GET", &format!("{route}?owner=acme"), "");
        assert_eq!(status, 200, "{body}");
        assert_ne!(
            platform.last_issued().as_deref(),
            Some(issued[0].token.as_str())
        );
        assert_eq!(platform.token_requests(), 4);

        platform
            .set_grants(Some(&format!(
                "[workspace.{WORKSPACE_ID}]\nrepositories = [\"other/*\"]\n"
            )))
            .expect("grants");
        assert_eq!(
            exchange(&platform, "GET", &format!("{route}?owner=acme"), "").0,
            403
        );
        assert!(platform.set_grants(Some("[workspace.x]\n")).is_err());
        assert_eq!(
            exchange(&platform, "GET", &format!("{route}?owner=other"), "").0,
            200
        );
    }
}
