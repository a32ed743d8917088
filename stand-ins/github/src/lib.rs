//! A stand-in of the parts of GitHub's REST API the platform uses, speaking
//! the real wire protocol on 127.0.0.1 and failing on command.
//!
//! Why a crate of its own: the platform's integration tests, the cross-crate
//! tests in `tests/` and scripts (a fleet simulation with the real
//! `molecule-platform` in GitHub mode) all need the same GitHub, and it must
//! not depend on the platform it stands in for (no dependency cycle, and a
//! stand-in that shares the platform's code would share its bugs).
//!
//! What it serves:
//! - `POST /app/installations/{id}/access_tokens`: checks headers and the
//!   App JWT (RS256 against the App's public key, `iss`, `iat` about 60 s
//!   back, `exp` within 10 min) as GitHub does, records the scope the body
//!   asks for ([`MintRecord`]) and answers per the [`Mode`] in force;
//! - `GET /app/installations`: the App's installations on several accounts,
//!   paginated with a `Link: <…>; rel="next"` header;
//! - `/_stand-in/…` inspection routes (see [`inspect`]) for processes that
//!   cannot call the methods: the record (never a token or JWT), the mode,
//!   installations.
//!
//! The server runs on its own thread and runtime so tests may block without
//! stalling it. Waits block on a channel, never on sleeps.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use jiff::{SignedDuration, Timestamp};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

pub mod inspect;

/// How long [`GitHubStandIn::wait_for_calls`] waits before failing.
pub const WAIT: Duration = Duration::from_secs(30);

/// Where "now" comes from.
pub type StandInClock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Locks `m`, poisoned or not (a panicking test has already failed).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the stand-in answers to the next calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
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
pub const APP_ID: &str = "4242";
/// Installation the stand-in serves.
pub const INSTALLATION_ID: u64 = 777;
/// The account of [`INSTALLATION_ID`].
pub const DEFAULT_ACCOUNT: &str = "default-org";

struct StandInState {
    issuer: Mutex<String>,
    mode: Mutex<Mode>,
    clock: StandInClock,
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
pub struct MintRecord {
    /// The installation.
    pub installation: u64,
    /// `repositories` of the body (names without owner); `None`: absent.
    pub repositories: Option<Vec<String>>,
    /// `permissions` of the body; `None`: absent.
    pub permissions: Option<BTreeMap<String, String>>,
}

/// A stand-in of `POST /app/installations/{id}/access_tokens`, on its own
/// thread and runtime so tests may block without stalling it.
pub struct GitHubStandIn {
    state: Arc<StandInState>,
    url: String,
    server: Option<Server>,
}

impl GitHubStandIn {
    /// Starts issuing one-hour tokens, verifying JWTs with
    /// `public_key_pem` (the App's public key, SubjectPublicKeyInfo PEM) and
    /// checking time against the system clock.
    pub fn start(public_key_pem: &str) -> Self {
        Self::with_clock(public_key_pem, Timestamp::now)
    }

    /// Starts with `clock` as "now" for JWT checks and expiries.
    pub fn with_clock(
        public_key_pem: &str,
        clock: impl Fn() -> Timestamp + Send + Sync + 'static,
    ) -> Self {
        Self::on(public_key_pem, Arc::new(clock), "127.0.0.1:0")
    }

    /// Starts on `addr` (`127.0.0.1:0`: a fresh port).
    pub fn on(public_key_pem: &str, clock: StandInClock, addr: &str) -> Self {
        let state = Arc::new(StandInState {
            issuer: Mutex::new(APP_ID.to_owned()),
            mode: Mutex::new(Mode::Issue(SignedDuration::from_mins(60))),
            clock,
            decoding: DecodingKey::from_rsa_pem(public_key_pem.as_bytes())
                .expect("the stand-in needs an RSA public key in PEM form"),
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
        let app = crate::inspect::routes(app, Arc::clone(&state));
        let server = Server::start(app, addr);
        Self {
            state,
            url: format!("http://{}", server.addr),
            server: Some(server),
        }
    }

    /// The clock the stand-in reads.
    pub fn clock(&self) -> StandInClock {
        Arc::clone(&self.state.clock)
    }

    /// The expected JWT issuer.
    pub fn issuer(&self) -> String {
        lock(&self.state.issuer).clone()
    }

    /// Base URL, usable as `GITHUB_API_URL`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Expect this JWT issuer (App ID or client ID).
    pub fn expect_issuer(&self, issuer: &str) {
        *lock(&self.state.issuer) = issuer.to_owned();
    }

    /// Switches what the next calls get.
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.state.mode) = mode;
    }

    /// Holds answers (all but `Hang`) until [`GitHubStandIn::release`].
    pub fn hold(&self) {
        self.state.open.send_replace(false);
    }

    /// Lets held answers go.
    pub fn release(&self) {
        self.state.open.send_replace(true);
    }

    /// Calls seen so far.
    pub fn calls(&self) -> u64 {
        *self.state.calls.borrow()
    }

    /// Waits until at least `n` calls were seen.
    pub async fn wait_for_calls(&self, n: u64) {
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
    pub fn rejections(&self) -> Vec<String> {
        lock(&self.state.rejections).clone()
    }

    /// Tokens issued so far with their stated expiry.
    pub fn issued(&self) -> Vec<(String, Timestamp)> {
        lock(&self.state.issued).clone()
    }

    /// Installs the App on account `login` as installation `id`.
    pub fn add_installation(&self, login: &str, id: u64) {
        lock(&self.state.installations).push((login.to_owned(), id));
    }

    /// Serves `GET /app/installations` at most `n` per page.
    pub fn set_page_size(&self, n: usize) {
        *lock(&self.state.page_size) = n.max(1);
    }

    /// Pages of `GET /app/installations` served so far.
    pub fn listings(&self) -> u64 {
        *lock(&self.state.listings)
    }

    /// The scope each mint asked for, oldest first.
    pub fn mints(&self) -> Vec<MintRecord> {
        lock(&self.state.mints).clone()
    }

    /// Every JWT received and token issued.
    pub fn secrets(&self) -> Vec<String> {
        lock(&self.state.secrets).clone()
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
    let now = (state.clock)().as_second();
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
            Timestamp::from_second(((state.clock)() + life).as_second()).expect("time");
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
pub fn random_alnum(n: usize) -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// The HTTP server on its own thread; stopped on drop.
struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(app: Router, addr: &str) -> Self {
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("stand-in: cannot listen on {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("github-stand-in".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })
            .expect("thread");
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Held or hung answers never finish: do not wait for the thread.
        drop(self.thread.take());
    }
}

impl Drop for GitHubStandIn {
    fn drop(&mut self) {
        // Release held answers so connections can close.
        self.state.open.send_replace(true);
        drop(self.server.take());
    }
}

/// Whether `login` could be an account GitHub has: 1-39 letters, digits,
/// `-` and (for Enterprise Managed Users' `handle_shortcode`) `_`. Loose on
/// purpose: the stand-in plays GitHub, whose accounts the platform must
/// cope with, so it does not share the platform's rule.
fn valid_login(login: &str) -> bool {
    !login.is_empty()
        && login.len() <= 39
        && !login.starts_with('-')
        && login
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
