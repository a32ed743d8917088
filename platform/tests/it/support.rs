//! What the platform tests add to the workspace's `testkit`: App keys
//! generated at test time, a stand-in of GitHub's installation-token API that
//! verifies the App JWT and fails on command, knows installations on several
//! accounts (`GET /app/installations`, paginated with `Link`) and records
//! the scope each mint asked for, captured tracing output, the
//! service in-process on a loopback port, and the secret scan with the keys
//! registered. The real binary is `testkit::PlatformProcess`.
//!
//! Waits block on channels (a call counter, a stderr line), never on sleeps;
//! each has a deadline that fails the test saying what was awaited.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use jiff::{SignedDuration, Timestamp};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use molecule_platform::provider::Clock;
use molecule_platform::{GitHubAppConfig, GitHubAppProvider, ServiceLimits};
use secrecy::SecretString;
use testkit::http::HttpServer;
use testkit::{Cmd, PlatformProcess, Secrets, lock};
use tower::ServiceExt;

pub(crate) use testkit::{WAIT, sha256_hex};

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// An RSA key pair generated with `openssl` for this test run.
pub(crate) struct AppKeys {
    _dir: tempfile::TempDir,
    /// `-----BEGIN RSA PRIVATE KEY-----`.
    pub(crate) pkcs1_pem: String,
    /// `-----BEGIN PRIVATE KEY-----`.
    pub(crate) pkcs8_pem: String,
    /// A different key (not the App's): GitHub must refuse its JWTs.
    pub(crate) other_pkcs8_pem: String,
    /// SubjectPublicKeyInfo PEM.
    pub(crate) public_pem: String,
    /// File holding the PKCS#1 key.
    pub(crate) pkcs1_file: PathBuf,
    /// File holding the PKCS#8 key.
    pub(crate) pkcs8_file: PathBuf,
}

fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("these tests generate RSA keys with the openssl CLI: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The keys, generated once per test binary (2048-bit RSA).
pub(crate) fn keys() -> &'static AppKeys {
    static KEYS: OnceLock<AppKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |name: &str| dir.path().join(name);
        let s = |path: &Path| path.to_str().expect("utf-8 path").to_owned();
        let (pkcs1, pkcs8, public) = (p("app.pkcs1.pem"), p("app.pkcs8.pem"), p("app.pub.pem"));
        openssl(&["genrsa", "-traditional", "-out", &s(&pkcs1), "2048"]);
        openssl(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            &s(&pkcs1),
            "-out",
            &s(&pkcs8),
        ]);
        openssl(&["rsa", "-in", &s(&pkcs1), "-pubout", "-out", &s(&public)]);
        let other = p("other.pkcs8.pem");
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &s(&other),
        ]);
        let read = |path: &Path| std::fs::read_to_string(path).expect("read key");
        let keys = AppKeys {
            pkcs1_pem: read(&pkcs1),
            pkcs8_pem: read(&pkcs8),
            public_pem: read(&public),
            other_pkcs8_pem: read(&other),
            pkcs1_file: pkcs1,
            pkcs8_file: pkcs8,
            _dir: dir,
        };
        assert!(
            keys.pkcs1_pem
                .starts_with("-----BEGIN RSA PRIVATE KEY-----")
        );
        assert!(keys.pkcs8_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        keys
    })
}

// ---------------------------------------------------------------------------
// GitHub stand-in
// ---------------------------------------------------------------------------

/// What the stand-in answers to the next calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// 201 with a fresh token living this long.
    Issue(SignedDuration),
    /// This status with a GitHub-style `{"message": …}` body.
    Status(u16),
    /// 201 with a body that is not JSON.
    Garbage,
    /// Never answer (until the stand-in is dropped).
    Hang,
    /// 307 to this same endpoint (followed, it would succeed).
    Redirect,
    /// 201 with a body far larger than any real answer.
    Huge,
    /// 201 with a token that already expired.
    Expired,
}

/// App identity the stand-in expects.
pub(crate) const APP_ID: &str = "4242";
/// Installation the stand-in serves.
pub(crate) const INSTALLATION_ID: u64 = 777;
/// The account of [`INSTALLATION_ID`].
pub(crate) const DEFAULT_ACCOUNT: &str = "default-org";

struct StandInState {
    issuer: Mutex<String>,
    mode: Mutex<Mode>,
    clock: Clock,
    decoding: DecodingKey,
    /// Calls to the token endpoint, as a channel tests can wait on.
    calls: tokio::sync::watch::Sender<u64>,
    /// Released answers (for `hold`): while false, answers wait.
    open: tokio::sync::watch::Sender<bool>,
    /// JWTs and tokens seen or issued: secrets no output may contain.
    secrets: Mutex<Vec<String>>,
    /// Why a call's JWT or headers were refused (must stay empty in tests
    /// that expect success).
    rejections: Mutex<Vec<String>>,
    issued: Mutex<Vec<(String, Timestamp)>>,
    /// Account login → installation id, in listing order.
    installations: Mutex<Vec<(String, u64)>>,
    /// Installations per page of `GET /app/installations` at most.
    page_size: Mutex<usize>,
    /// Pages of `GET /app/installations` served.
    listings: Mutex<u64>,
    /// The scope each mint asked for.
    mints: Mutex<Vec<MintRecord>>,
}

/// What one `POST /app/installations/{id}/access_tokens` asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MintRecord {
    /// The installation.
    pub(crate) installation: u64,
    /// `repositories` of the body (names without owner); `None`: absent.
    pub(crate) repositories: Option<Vec<String>>,
    /// `permissions` of the body; `None`: absent.
    pub(crate) permissions: Option<BTreeMap<String, String>>,
}

/// A stand-in of `POST /app/installations/{id}/access_tokens`, on its own
/// thread and runtime so tests may block without stalling it.
pub(crate) struct GitHubStandIn {
    state: Arc<StandInState>,
    url: String,
    _server: HttpServer,
}

impl GitHubStandIn {
    /// Starts issuing one-hour tokens, checking time against the system clock.
    pub(crate) fn start() -> Self {
        Self::with_clock(Clock::system())
    }

    /// Starts with `clock` as "now" for JWT checks and expiries.
    pub(crate) fn with_clock(clock: Clock) -> Self {
        let state = Arc::new(StandInState {
            issuer: Mutex::new(APP_ID.to_owned()),
            mode: Mutex::new(Mode::Issue(SignedDuration::from_mins(60))),
            clock,
            decoding: DecodingKey::from_rsa_pem(keys().public_pem.as_bytes()).expect("public key"),
            calls: tokio::sync::watch::Sender::new(0),
            open: tokio::sync::watch::Sender::new(true),
            secrets: Mutex::default(),
            rejections: Mutex::default(),
            issued: Mutex::default(),
            installations: Mutex::new(vec![(DEFAULT_ACCOUNT.to_owned(), INSTALLATION_ID)]),
            page_size: Mutex::new(100),
            listings: Mutex::new(0),
            mints: Mutex::default(),
        });
        let app = Router::new()
            .route(
                "/app/installations/{id}/access_tokens",
                axum::routing::post(access_tokens),
            )
            .route("/app/installations", axum::routing::get(list_installations))
            .with_state(Arc::clone(&state));
        let server = HttpServer::start(app);
        Self {
            state,
            url: server.url(),
            _server: server,
        }
    }

    /// Base URL, usable as `GITHUB_API_URL`.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Expect this JWT issuer (App ID or client ID).
    pub(crate) fn expect_issuer(&self, issuer: &str) {
        *lock(&self.state.issuer) = issuer.to_owned();
    }

    /// Switches what the next calls get.
    pub(crate) fn set_mode(&self, mode: Mode) {
        *lock(&self.state.mode) = mode;
    }

    /// Holds answers (all but `Hang`) until [`GitHubStandIn::release`].
    pub(crate) fn hold(&self) {
        self.state.open.send_replace(false);
    }

    /// Lets held answers go.
    pub(crate) fn release(&self) {
        self.state.open.send_replace(true);
    }

    /// Calls seen so far.
    pub(crate) fn calls(&self) -> u64 {
        *self.state.calls.borrow()
    }

    /// Waits until at least `n` calls were seen.
    pub(crate) async fn wait_for_calls(&self, n: u64) {
        let mut rx = self.state.calls.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "stand-in: waited {WAIT:?} for {n} calls, saw {}",
                    self.calls()
                )
            })
            .expect("stand-in alive");
    }

    /// Calls whose JWT or headers were refused, with the reason.
    pub(crate) fn rejections(&self) -> Vec<String> {
        lock(&self.state.rejections).clone()
    }

    /// Tokens issued so far with their stated expiry.
    pub(crate) fn issued(&self) -> Vec<(String, Timestamp)> {
        lock(&self.state.issued).clone()
    }

    /// Installs the App on account `login` as installation `id`.
    pub(crate) fn add_installation(&self, login: &str, id: u64) {
        lock(&self.state.installations).push((login.to_owned(), id));
    }

    /// Serves `GET /app/installations` at most `n` per page.
    pub(crate) fn set_page_size(&self, n: usize) {
        *lock(&self.state.page_size) = n.max(1);
    }

    /// Pages of `GET /app/installations` served so far.
    pub(crate) fn listings(&self) -> u64 {
        *lock(&self.state.listings)
    }

    /// The scope each mint asked for, oldest first.
    pub(crate) fn mints(&self) -> Vec<MintRecord> {
        lock(&self.state.mints).clone()
    }

    /// Every JWT received and token issued.
    pub(crate) fn secrets(&self) -> Vec<String> {
        lock(&self.state.secrets).clone()
    }

    /// A provider for this stand-in signing with `pem`.
    pub(crate) fn provider_config(&self, pem: &str) -> GitHubAppConfig {
        let mut config = GitHubAppConfig::new(
            lock(&self.state.issuer).clone(),
            INSTALLATION_ID,
            SecretString::from(pem.to_owned()),
            format!("{}/", self.url),
        );
        config.request_timeout = Duration::from_secs(10);
        config
    }

    /// A provider for this stand-in (PKCS#8 key, the stand-in's clock).
    pub(crate) fn provider(&self) -> GitHubAppProvider {
        GitHubAppProvider::with_clock(
            self.provider_config(&keys().pkcs8_pem),
            self.state.clock.clone(),
        )
        .expect("provider")
    }
}

fn github_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({
            "message": message,
            "documentation_url": "https://docs.github.com/rest",
        })),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct JwtClaims {
    iat: i64,
    exp: i64,
    iss: String,
}

/// Checks headers and the JWT as GitHub does; `Err` says what is wrong.
fn check_request(
    state: &StandInState,
    id: Option<u64>,
    headers: &HeaderMap,
) -> Result<String, String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    if let Some(id) = id
        && !lock(&state.installations).iter().any(|(_, i)| *i == id)
    {
        return Err(format!("unknown installation {id}"));
    }
    if header("accept") != "application/vnd.github+json" {
        return Err(format!("Accept is {:?}", header("accept")));
    }
    if header("x-github-api-version") != "2022-11-28" {
        return Err(format!(
            "X-GitHub-Api-Version is {:?}",
            header("x-github-api-version")
        ));
    }
    if header("user-agent").is_empty() {
        return Err("no User-Agent".into());
    }
    let jwt = header("authorization")
        .strip_prefix("Bearer ")
        .ok_or("no Bearer JWT")?
        .to_owned();
    lock(&state.secrets).push(jwt.clone());
    let mut validation = Validation::new(Algorithm::RS256);
    // Time is checked below against the stand-in's own clock.
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["exp", "iat", "iss"]);
    let data = jsonwebtoken::decode::<JwtClaims>(&jwt, &state.decoding, &validation)
        .map_err(|e| format!("JWT signature/shape refused: {e}"))?;
    let claims = data.claims;
    let now = state.clock.now().as_second();
    let expected = lock(&state.issuer).clone();
    if claims.iss != expected {
        return Err(format!("iss is {:?}, expected {expected:?}", claims.iss));
    }
    if !(now - 120..=now - 30).contains(&claims.iat) {
        return Err(format!(
            "iat {} is not about 60 s before now {now}",
            claims.iat
        ));
    }
    if claims.exp <= now || claims.exp > now + 600 {
        return Err(format!(
            "exp {} is not within 10 minutes after now {now}",
            claims.exp
        ));
    }
    Ok(jwt)
}

#[derive(serde::Deserialize)]
struct ListQuery {
    per_page: Option<usize>,
    page: Option<usize>,
}

/// `GET /app/installations`: this App's installations, paginated with a
/// `Link` header as GitHub does.
async fn list_installations(
    State(state): State<Arc<StandInState>>,
    axum::extract::Query(query): axum::extract::Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    *lock(&state.listings) += 1;
    if let Err(reason) = check_request(&state, None, &headers) {
        lock(&state.rejections).push(reason);
        return github_error(
            StatusCode::UNAUTHORIZED,
            "A JSON web token could not be decoded",
        );
    }
    let per_page = query
        .per_page
        .unwrap_or(30)
        .min(*lock(&state.page_size))
        .max(1);
    let page = query.page.unwrap_or(1).max(1);
    let all = lock(&state.installations).clone();
    let items: Vec<serde_json::Value> = all
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|(login, id)| {
            serde_json::json!({
                "id": id,
                "account": {"login": login, "type": "Organization"},
                "repository_selection": "all",
            })
        })
        .collect();
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned();
    let mut response = axum::Json(items).into_response();
    if page * per_page < all.len() {
        let link = format!(
            "<http://{host}/app/installations?per_page={per_page}&page={}>; rel=\"next\"",
            page + 1
        );
        response
            .headers_mut()
            .insert("link", link.parse().expect("header"));
    }
    response
}

async fn access_tokens(
    State(state): State<Arc<StandInState>>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    state.calls.send_modify(|c| *c += 1);
    if let Err(reason) = check_request(&state, Some(id), &headers) {
        lock(&state.rejections).push(reason);
        return github_error(
            StatusCode::UNAUTHORIZED,
            "A JSON web token could not be decoded",
        );
    }
    let asked: serde_json::Value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(value) => value,
            Err(_) => {
                lock(&state.rejections).push("the mint body is not JSON".into());
                return github_error(StatusCode::BAD_REQUEST, "Problems parsing JSON");
            }
        }
    };
    let record = MintRecord {
        installation: id,
        repositories: asked["repositories"].as_array().map(|names| {
            names
                .iter()
                .map(|n| n.as_str().unwrap_or("<not a string>").to_owned())
                .collect()
        }),
        permissions: asked["permissions"].as_object().map(|map| {
            map.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("<not a string>").to_owned()))
                .collect()
        }),
    };
    let answered_permissions = record.permissions.clone().unwrap_or_else(|| {
        BTreeMap::from([
            ("contents".to_owned(), "write".to_owned()),
            ("metadata".to_owned(), "read".to_owned()),
        ])
    });
    let selection = if record.repositories.is_some() {
        "selected"
    } else {
        "all"
    };
    lock(&state.mints).push(record);
    let mode = lock(&state.mode).clone();
    if mode != Mode::Hang {
        let mut open = state.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
    }
    let issue = |life: SignedDuration| {
        let n = lock(&state.issued).len();
        let token = format!("ghs_standin{n:03}{}", random_alnum(28));
        let expires_at =
            Timestamp::from_second((state.clock.now() + life).as_second()).expect("time");
        lock(&state.secrets).push(token.clone());
        lock(&state.issued).push((token.clone(), expires_at));
        (
            StatusCode::CREATED,
            axum::Json(serde_json::json!({
                "token": token,
                "expires_at": expires_at.to_string(),
                "permissions": answered_permissions,
                "repository_selection": selection,
            })),
        )
            .into_response()
    };
    match mode {
        Mode::Issue(life) => issue(life),
        Mode::Expired => issue(SignedDuration::from_secs(-30)),
        Mode::Status(code) => github_error(
            StatusCode::from_u16(code).expect("status"),
            if code == 401 {
                "Bad credentials"
            } else {
                "Server Error"
            },
        ),
        Mode::Garbage => {
            (StatusCode::CREATED, "<html>rate limited, try later</html>").into_response()
        }
        Mode::Hang => std::future::pending().await,
        Mode::Redirect => {
            *lock(&state.mode) = Mode::Issue(SignedDuration::from_mins(60));
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(
                    "location",
                    format!("/app/installations/{INSTALLATION_ID}/access_tokens"),
                )],
            )
                .into_response()
        }
        Mode::Huge => (
            StatusCode::CREATED,
            format!(
                r#"{{"token":"ghs_x","expires_at":"2099-01-01T00:00:00Z","pad":"{}"}}"#,
                "x".repeat(200_000)
            ),
        )
            .into_response(),
    }
}

/// `n` random letters and digits.
pub(crate) fn random_alnum(n: usize) -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// A clock that starts at the real time and moves only when told.
pub(crate) fn manual_clock() -> (Clock, Arc<std::sync::atomic::AtomicI64>) {
    use std::sync::atomic::{AtomicI64, Ordering};
    let start = Timestamp::now();
    let offset = Arc::new(AtomicI64::new(0));
    let o = Arc::clone(&offset);
    let clock = Clock::from_fn(move || start + SignedDuration::from_secs(o.load(Ordering::SeqCst)));
    (clock, offset)
}

// ---------------------------------------------------------------------------
// In-process requests and captured logs
// ---------------------------------------------------------------------------

/// An answer from the router.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: serde_json::Value,
}

/// `GET path` with an optional bearer through `app` (tower `oneshot`).
pub(crate) async fn get(app: &Router, path: &str, bearer: Option<&str>) -> Answer {
    let mut request = Request::get(path);
    if let Some(bearer) = bearer {
        request = request.header("authorization", format!("Bearer {bearer}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    Answer {
        status,
        headers,
        body,
    }
}

/// Tracing output of the current thread while the guard lives (use with a
/// current-thread runtime so every task of the test runs on its thread).
///
/// One global subscriber routes events to the capturing thread's buffer:
/// per-test `set_default` subscribers race on tracing's global callsite
/// interest cache when tests run in parallel, and lose events.
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Arc<Mutex<Vec<u8>>>>> = const { std::cell::RefCell::new(None) };
}

/// Ends a [`Logs`] capture on drop.
pub(crate) struct CaptureGuard(());

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|c| c.borrow_mut().take());
    }
}

impl Logs {
    /// Captures DEBUG and above from this thread.
    pub(crate) fn capture() -> (Self, CaptureGuard) {
        static INIT: std::sync::Once = std::sync::Once::new();
        INIT.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(|| ThreadLogWriter)
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("global subscriber");
        });
        let logs = Self::default();
        CAPTURE.with(|c| *c.borrow_mut() = Some(Arc::clone(&logs.0)));
        (logs, CaptureGuard(()))
    }

    /// Everything captured so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }
}

/// Writes to the current thread's capture, if any.
struct ThreadLogWriter;

impl std::io::Write for ThreadLogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(sink) = c.borrow().as_ref() {
                lock(sink).extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fails when `text` leaks any of `secrets` or the private keys' material
/// (their first body lines), under testkit's one rule.
#[track_caller]
pub(crate) fn assert_no_secrets(what: &str, text: &str, secrets: &[String]) {
    let known = Secrets::new();
    for secret in secrets {
        known.add("a secret of this test", secret.as_str());
    }
    for pem in [
        &keys().pkcs1_pem,
        &keys().pkcs8_pem,
        &keys().other_pkcs8_pem,
    ] {
        for line in pem.lines().filter(|l| !l.starts_with("-----")).take(3) {
            known.add("private key material", line);
        }
    }
    known.assert_clean(what, text);
}

// ---------------------------------------------------------------------------
// The real binary and the in-process server
// ---------------------------------------------------------------------------

/// Runs the binary to completion (it is expected to refuse to start, or to
/// print and exit): status, stdout, stderr.
pub(crate) fn run_to_exit(
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String, String) {
    let out = Cmd::new(PlatformProcess::command(args, env), "molecule-platform").run();
    (out.status, out.stdout, out.stderr)
}

/// Makes a test's `TokenProvider` a plugin of the registry: named `$name`,
/// its own token provider, changing no environment.
macro_rules! token_plugin {
    ($provider:ty, $name:literal) => {
        impl molecule_platform::ProvisionPlugin for $provider {
            fn name(&self) -> &str {
                $name
            }
            fn mutate_env<'a>(
                &'a self,
                _env: &'a mut std::collections::BTreeMap<String, String>,
            ) -> molecule_platform::registry::EnvFuture<'a> {
                Box::pin(async { Ok(()) })
            }
            fn as_token_provider(
                self: std::sync::Arc<Self>,
            ) -> Option<std::sync::Arc<dyn molecule_platform::TokenProvider>> {
                Some(self)
            }
        }
    };
}
pub(crate) use token_plugin;

/// An HTTP client for the real binary (no proxy, short timeouts).
pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("client")
}

/// The service (`serve_with_limits`) on the current runtime; `stop` shuts
/// it down.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Serves `app` on a fresh loopback port under `limits`.
    pub(crate) async fn start(app: Router, limits: ServiceLimits) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            molecule_platform::service::serve_with_limits(
                listener,
                app,
                async move {
                    let _ = stop_rx.await;
                },
                &limits,
            )
            .await
        });
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Sends the shutdown signal and waits for the server to finish.
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the server stops after the shutdown signal")
            .expect("server task")
            .expect("serve");
    }
}
