//! A stand-in of the parts of GitHub's REST API the platform uses, speaking
//! GitHub's documented shapes on 127.0.0.1 and failing as GitHub fails.
//!
//! Why a crate of its own: the platform's integration tests, the cross-crate
//! tests in `tests/` and scripts (a fleet simulation with the real
//! `molecule-platform` in GitHub mode) all need the same GitHub, and it must
//! not depend on the platform it stands in for (no dependency cycle, and a
//! stand-in that shares the platform's code would share its bugs).
//!
//! It is checked mechanically against GitHub's published API description
//! ([`spec`]): every request it receives is validated against the request
//! schema as GitHub applies it (permission names and levels, `repositories`
//! as names, at most 500), and every answer it gives against the answer
//! schema before it is sent. What fails goes to [`GitHubStandIn::violations`]
//! (and `/_stand-in/record`); dropping a stand-in with violations fails the
//! test, so a wrong request fails the test that made it.
//!
//! What it serves:
//! - `POST /app/installations/{id}/access_tokens`: checks headers and the
//!   App JWT (RS256 against the App's public key, `iss`, `iat` about 60 s
//!   back, `exp` within 10 min) as GitHub does, then answers as GitHub
//!   would for the installation: 201 with every field of `installation-token`
//!   (a full `repository` object per repository asked for,
//!   `repository_selection`, `single_file` for a `single_file` permission);
//!   404 for an installation that does not exist (or was removed); 403 for a
//!   suspended one; 422 with GitHub's `message` for a repository the
//!   installation does not reach or a permission it does not have. Tokens
//!   are classic (`ghs_` and 36 characters) or stateless (`ghs_<APPID>_<JWT>`,
//!   about 520 characters and variable), per [`TokenFormat`] or the request's
//!   `X-GitHub-Stateless-S2S-Token: enabled|disabled` header, as GitHub;
//! - `GET /app/installations`: full `installation` objects on accounts that
//!   are users, organisations, enterprises, or `null`, paginated with a
//!   `Link: <…>; rel="next"` header;
//! - rate limits ([`RateLimit`]): primary (403 with `x-ratelimit-remaining:
//!   0` and `x-ratelimit-reset`) and secondary (403 or 429 with
//!   `retry-after`, or with neither), GitHub's bodies; every request that
//!   arrives before the limit's end is a violation. Every answer carries
//!   `x-ratelimit-*` headers, as GitHub's do;
//! - `/_stand-in/…` inspection routes (see [`inspect`]) for processes that
//!   cannot call the methods.
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
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jiff::{SignedDuration, Timestamp};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

pub mod inspect;
pub mod keys;
pub mod spec;

/// How long [`GitHubStandIn::wait_for_calls`] waits before failing.
pub const WAIT: Duration = Duration::from_secs(30);

/// Where "now" comes from.
pub type StandInClock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Locks `m`, poisoned or not (a panicking test has already failed).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the stand-in answers to the next mints (beyond what each
/// installation's state decides).
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

/// The format of the installation tokens issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFormat {
    /// `ghs_` and 36 letters and digits (40 characters).
    Classic,
    /// `ghs_<APPID>_<JWT>`: about 520 characters, variable.
    Stateless,
}

/// The request header that chooses the token format, as GitHub's.
pub const TOKEN_FORMAT_HEADER: &str = "x-github-stateless-s2s-token";

/// A rate limit GitHub answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimit {
    /// The primary limit: 403, `x-ratelimit-remaining: 0`,
    /// `x-ratelimit-reset` this long from now.
    Primary(SignedDuration),
    /// A secondary limit with `retry-after` (whole seconds), answered with
    /// this status (403 or 429).
    Secondary {
        /// 403 or 429.
        status: u16,
        /// `retry-after`.
        retry_after: SignedDuration,
    },
    /// A secondary limit with neither header: GitHub says to wait at least
    /// a minute. The stand-in holds it this long.
    SecondaryWithoutHeaders(SignedDuration),
}

/// App identity the stand-in expects.
pub const APP_ID: &str = "4242";
/// Installation the stand-in serves.
pub const INSTALLATION_ID: u64 = 777;
/// The account of [`INSTALLATION_ID`].
pub const DEFAULT_ACCOUNT: &str = "default-org";

/// The account an installation is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Account {
    /// A user (`type: User`), by login.
    User(String),
    /// An organisation (`type: Organization`), by login.
    Organization(String),
    /// An enterprise (no login: `slug` and `name`).
    Enterprise(String),
    /// `account: null`.
    Missing,
}

/// One installation of the App.
#[derive(Clone, Debug)]
pub struct Installation {
    /// Its id.
    pub id: u64,
    /// Its account.
    pub account: Account,
    /// The repositories it reaches (names); `None`: every one (`all`).
    pub repositories: Option<Vec<String>>,
    /// What the App was granted there.
    pub permissions: BTreeMap<String, String>,
    /// Whether GitHub suspended it.
    pub suspended: bool,
}

impl Installation {
    /// An installation on an organisation reaching every repository, with
    /// the permissions [`default_permissions`] lists.
    pub fn organization(login: &str, id: u64) -> Self {
        Self {
            id,
            account: Account::Organization(login.to_owned()),
            repositories: None,
            permissions: default_permissions(),
            suspended: false,
        }
    }

    /// The same on `account` (a user, an enterprise, none).
    pub fn on(account: Account, id: u64) -> Self {
        Self {
            account,
            ..Self::organization("", id)
        }
    }
}

/// What an installation is granted unless a test says otherwise: the
/// permissions the platform's tests ask for, at their highest levels.
pub fn default_permissions() -> BTreeMap<String, String> {
    [
        ("actions", "write"),
        ("checks", "write"),
        ("contents", "write"),
        ("issues", "write"),
        ("metadata", "read"),
        ("pull_requests", "write"),
        ("repository_projects", "admin"),
        ("single_file", "write"),
        ("statuses", "write"),
        ("workflows", "write"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// One request the stand-in received (no secret: method, path, when).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET` or `POST`.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The stand-in's clock when it arrived.
    pub at: Timestamp,
}

pub(crate) struct Limit {
    pub(crate) kind: RateLimit,
    /// Set by the first request after [`GitHubStandIn::rate_limit`].
    pub(crate) until: Option<Timestamp>,
}

struct StandInState {
    issuer: Mutex<String>,
    mode: Mutex<Mode>,
    format: Mutex<TokenFormat>,
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
    /// Requests GitHub's description refuses, requests made during a rate
    /// limit, and answers of ours that do not match the description.
    violations: Mutex<Vec<String>>,
    issued: Mutex<Vec<(String, Timestamp)>>,
    installations: Mutex<Vec<Installation>>,
    /// Installations per page of `GET /app/installations` at most.
    page_size: Mutex<usize>,
    /// Pages of `GET /app/installations` served.
    listings: Mutex<u64>,
    /// The scope each mint asked for.
    mints: Mutex<Vec<MintRecord>>,
    requests: Mutex<Vec<RequestRecord>>,
    limit: Mutex<Option<Limit>>,
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

/// A stand-in of GitHub's App installation API, on its own thread and
/// runtime so tests may block without stalling it.
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
            format: Mutex::new(TokenFormat::Classic),
            clock,
            decoding: DecodingKey::from_rsa_pem(public_key_pem.as_bytes())
                .expect("the stand-in needs an RSA public key in PEM form"),
            calls: tokio::sync::watch::Sender::new(0),
            open: tokio::sync::watch::Sender::new(true),
            secrets: Mutex::default(),
            rejections: Mutex::default(),
            violations: Mutex::default(),
            issued: Mutex::default(),
            installations: Mutex::new(vec![Installation::organization(
                DEFAULT_ACCOUNT,
                INSTALLATION_ID,
            )]),
            page_size: Mutex::new(100),
            listings: Mutex::new(0),
            mints: Mutex::default(),
            requests: Mutex::default(),
            limit: Mutex::new(None),
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

    /// The format of tokens issued to requests without
    /// [`TOKEN_FORMAT_HEADER`] (default: classic).
    pub fn set_token_format(&self, format: TokenFormat) {
        *lock(&self.state.format) = format;
    }

    /// The next request (mint or listing) is answered with `limit`, and
    /// every request until the limit ends is a violation.
    pub fn rate_limit(&self, limit: RateLimit) {
        *lock(&self.state.limit) = Some(Limit {
            kind: limit,
            until: None,
        });
    }

    /// When the rate limit in force ends, if one was answered.
    pub fn limited_until(&self) -> Option<Timestamp> {
        lock(&self.state.limit).as_ref().and_then(|l| l.until)
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

    /// Requests GitHub's description refuses or that came during a rate
    /// limit, and answers that do not match the description. Dropping a
    /// stand-in with violations fails the test; this takes them (so a test
    /// that provokes one on purpose can check and clear it).
    pub fn take_violations(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.state.violations))
    }

    /// The violations so far (see [`GitHubStandIn::take_violations`]).
    pub fn violations(&self) -> Vec<String> {
        lock(&self.state.violations).clone()
    }

    /// Every request received, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.state.requests).clone()
    }

    /// Tokens issued so far with their stated expiry.
    pub fn issued(&self) -> Vec<(String, Timestamp)> {
        lock(&self.state.issued).clone()
    }

    /// Installs the App on organisation `login` as installation `id`.
    pub fn add_installation(&self, login: &str, id: u64) {
        self.install(Installation::organization(login, id));
    }

    /// Adds `installation` (replacing one with its id).
    pub fn install(&self, installation: Installation) {
        let mut all = lock(&self.state.installations);
        all.retain(|i| i.id != installation.id);
        all.push(installation);
    }

    /// Removes installation `id` (the App is uninstalled there): its mints
    /// are 404 and it leaves the listing.
    pub fn uninstall(&self, id: u64) {
        lock(&self.state.installations).retain(|i| i.id != id);
    }

    /// Suspends (or unsuspends) installation `id`.
    pub fn suspend(&self, id: u64, suspended: bool) {
        for i in lock(&self.state.installations).iter_mut() {
            if i.id == id {
                i.suspended = suspended;
            }
        }
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

const DOCS: &str =
    "https://docs.github.com/rest/apps/apps#create-an-installation-access-token-for-an-app";
const RATE_LIMIT_DOCS: &str =
    "https://docs.github.com/rest/using-the-rest-api/rate-limits-for-the-rest-api";

/// GitHub's error body (`basic-error`, or `validation-error` with errors).
fn github_error(status: StatusCode, message: &str) -> (StatusCode, Value) {
    (
        status,
        json!({
            "message": message,
            "documentation_url": DOCS,
            "status": status.as_u16().to_string(),
        }),
    )
}

#[derive(serde::Deserialize)]
struct JwtClaims {
    iat: i64,
    exp: i64,
    iss: String,
}

/// Checks headers and the JWT as GitHub does; `Err` says what is wrong.
fn check_request(state: &StandInState, headers: &HeaderMap) -> Result<String, String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
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

/// Records a request; a rate-limit answer when one is due (the first
/// request after [`GitHubStandIn::rate_limit`] starts it; any request
/// before its end is a violation and is answered the same).
fn arrive(state: &StandInState, method: &str, path: &str) -> Option<Response> {
    let now = (state.clock)();
    lock(&state.requests).push(RequestRecord {
        method: method.to_owned(),
        path: path.to_owned(),
        at: now,
    });
    let mut limit = lock(&state.limit);
    let active = limit.as_mut()?;
    let (status, headers, message, length) = match active.kind {
        RateLimit::Primary(reset) => (
            StatusCode::FORBIDDEN,
            true,
            format!("API rate limit exceeded for installation ID {INSTALLATION_ID}."),
            reset,
        ),
        RateLimit::Secondary {
            status,
            retry_after,
        } => (
            StatusCode::from_u16(status).expect("403 or 429"),
            true,
            "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.".to_owned(),
            retry_after,
        ),
        RateLimit::SecondaryWithoutHeaders(hold) => (
            StatusCode::FORBIDDEN,
            false,
            "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.".to_owned(),
            hold,
        ),
    };
    let until = match active.until {
        None => {
            let until = Timestamp::from_second((now + length).as_second()).expect("time");
            active.until = Some(until);
            until
        }
        Some(until) if now < until => {
            lock(&state.violations).push(format!(
                "{method} {path} during a rate limit ({}s before its end)",
                until.duration_since(now).as_secs()
            ));
            until
        }
        Some(_) => {
            *limit = None;
            return None;
        }
    };
    let body = json!({"message": message, "documentation_url": RATE_LIMIT_DOCS, "status": status.as_u16().to_string()});
    let mut response = (status, axum::Json(body)).into_response();
    let h = response.headers_mut();
    // Whole seconds, rounded up as GitHub's header promises: a client that
    // waits exactly this long must not arrive before the end.
    let remaining = until.duration_since(now);
    let left = (remaining.as_secs() + i64::from(remaining.subsec_nanos() > 0)).max(0);
    match active.kind {
        RateLimit::Primary(_) => {
            h.insert("x-ratelimit-limit", HeaderValue::from(5000));
            h.insert("x-ratelimit-remaining", HeaderValue::from(0));
            h.insert("x-ratelimit-used", HeaderValue::from(5000));
            h.insert("x-ratelimit-reset", HeaderValue::from(until.as_second()));
            h.insert("x-ratelimit-resource", HeaderValue::from_static("core"));
        }
        RateLimit::Secondary { .. } if headers => {
            h.insert("retry-after", HeaderValue::from(left));
        }
        _ => {}
    }
    Some(response)
}

/// An answer `(status, body)` checked against the description for
/// `operation`, with GitHub's `x-ratelimit-*` headers.
fn answer(state: &StandInState, operation: &str, status: StatusCode, body: Value) -> Response {
    if let Err(errors) = spec::check_answer(operation, status.as_u16(), &body) {
        lock(&state.violations).push(format!(
            "the stand-in's {operation} answer {status} does not match GitHub's description: {}",
            errors.join("; ")
        ));
    }
    with_rate_limit_headers(state, (status, axum::Json(body)).into_response())
}

/// What every App route does first: records the request ([`arrive`]),
/// answers a rate limit that is due, and refuses with GitHub's 401 a
/// request GitHub would refuse (the reason kept in `rejections`). The
/// answer is the refusal, if the request is not admitted. Where the
/// description documents `operation`'s 401 (the mint does, the listing
/// does not), the refusal is checked against it like every answer.
fn admit(
    state: &StandInState,
    operation: &str,
    method: &str,
    path: &str,
    headers: &HeaderMap,
) -> Option<Response> {
    if let Some(limited) = arrive(state, method, path) {
        return Some(limited);
    }
    check_request(state, headers).err().map(|reason| {
        lock(&state.rejections).push(reason);
        let (status, body) = github_error(
            StatusCode::UNAUTHORIZED,
            "A JSON web token could not be decoded",
        );
        if spec::answer_schema(operation, status.as_u16()).is_some() {
            answer(state, operation, status, body)
        } else {
            with_rate_limit_headers(state, (status, axum::Json(body)).into_response())
        }
    })
}

/// `response` with GitHub's `x-ratelimit-*` headers, as on every answer.
fn with_rate_limit_headers(state: &StandInState, mut response: Response) -> Response {
    let served = lock(&state.requests).len() as i64;
    let reset = (state.clock)().as_second() + 3600;
    let h = response.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(5000));
    h.insert(
        "x-ratelimit-remaining",
        HeaderValue::from((5000 - served).max(1)),
    );
    h.insert("x-ratelimit-used", HeaderValue::from(served));
    h.insert("x-ratelimit-reset", HeaderValue::from(reset));
    h.insert("x-ratelimit-resource", HeaderValue::from_static("core"));
    response
}

#[derive(serde::Deserialize)]
struct ListQuery {
    per_page: Option<i64>,
    page: Option<i64>,
}

/// `GET /app/installations`: this App's installations, paginated with a
/// `Link` header as GitHub does.
async fn list_installations(
    State(state): State<Arc<StandInState>>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    *lock(&state.listings) += 1;
    if let Some(refused) = admit(&state, spec::LIST, "GET", "/app/installations", &headers) {
        return refused;
    }
    let Ok(axum::extract::Query(query)) = query else {
        lock(&state.violations)
            .push("GET /app/installations: a query that is not per_page/page integers".into());
        let (status, body) = github_error(StatusCode::BAD_REQUEST, "Invalid request.");
        return (status, axum::Json(body)).into_response();
    };
    if query.per_page.is_some_and(|n| !(1..=100).contains(&n)) {
        lock(&state.violations).push(format!(
            "GET /app/installations: per_page {:?} (GitHub documents at most 100)",
            query.per_page
        ));
    }
    let per_page = query
        .per_page
        .unwrap_or(30)
        .clamp(1, 100)
        .min(*lock(&state.page_size) as i64) as usize;
    let page = query.page.unwrap_or(1).max(1) as usize;
    let all = lock(&state.installations).clone();
    let items: Vec<Value> = all
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|i| installation_object(&state, i))
        .collect();
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned();
    let mut response = answer(&state, spec::LIST, StatusCode::OK, Value::Array(items));
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

/// A user or organisation account object (`simple-user`), from GitHub's
/// own example with the login put in.
fn user_object(login: &str, kind: &str, id: u64) -> Value {
    let mut account = spec::example("list-installations.200")[0]["account"].clone();
    let text = serde_json::to_string(&account)
        .expect("JSON")
        .replace("/users/octocat", &format!("/users/{login}"))
        .replace("github.com/octocat", &format!("github.com/{login}"));
    account = serde_json::from_str(&text).expect("JSON");
    account["login"] = json!(login);
    account["id"] = json!(id);
    account["type"] = json!(kind);
    account
}

/// An enterprise account object (`enterprise`): no login.
fn enterprise_object(slug: &str, id: u64) -> Value {
    json!({
        "id": id,
        "node_id": "E_kgDNAXM",
        "name": format!("{slug} (enterprise)"),
        "slug": slug,
        "description": null,
        "website_url": null,
        "html_url": format!("https://github.com/enterprises/{slug}"),
        "created_at": "2019-01-26T19:01:12Z",
        "updated_at": "2019-01-26T19:14:43Z",
        "avatar_url": "https://avatars.githubusercontent.com/b/1?v=4",
    })
}

/// A full `installation` object, from GitHub's own example.
fn installation_object(state: &StandInState, installation: &Installation) -> Value {
    let mut object = spec::example("list-installations.200")[0].clone();
    let id = installation.id;
    let (account, target_type) = match &installation.account {
        Account::User(login) => (user_object(login, "User", id + 10_000), "User"),
        Account::Organization(login) => (
            user_object(login, "Organization", id + 10_000),
            "Organization",
        ),
        Account::Enterprise(slug) => (enterprise_object(slug, id + 10_000), "Enterprise"),
        Account::Missing => (Value::Null, "Organization"),
    };
    object["id"] = json!(id);
    object["app_id"] = json!(lock(&state.issuer).parse::<u64>().unwrap_or(4242));
    object["app_slug"] = json!("molecule-test-app");
    object["account"] = account;
    object["target_id"] = json!(id + 10_000);
    object["target_type"] = json!(target_type);
    object["access_tokens_url"] = json!(format!(
        "https://api.github.com/app/installations/{id}/access_tokens"
    ));
    object["repository_selection"] = json!(if installation.repositories.is_some() {
        "selected"
    } else {
        "all"
    });
    object["permissions"] = json!(installation.permissions);
    if installation.suspended {
        object["suspended_at"] = json!("2026-01-01T00:00:00Z");
        object["suspended_by"] = user_object("site-admin", "User", 1);
    }
    object
}

/// A full `repository` object for `owner/name`, from GitHub's own example.
pub fn repository_object(owner: &str, name: &str, id: u64) -> Value {
    let template = &spec::example("create-installation-access-token.201")["repositories"][0];
    let text = serde_json::to_string(template)
        .expect("JSON")
        .replace("octocat/Hello-World", &format!("{owner}/{name}"))
        .replace("/users/octocat", &format!("/users/{owner}"))
        .replace("github.com/octocat", &format!("github.com/{owner}"));
    let mut object: Value = serde_json::from_str(&text).expect("JSON");
    object["id"] = json!(id);
    object["name"] = json!(name);
    object["full_name"] = json!(format!("{owner}/{name}"));
    object["owner"]["login"] = json!(owner);
    object
}

/// A token of `format` for installation `installation`.
fn new_token(state: &StandInState, format: TokenFormat, installation: u64, life: i64) -> String {
    match format {
        TokenFormat::Classic => format!("ghs_{}", random_alnum(36)),
        TokenFormat::Stateless => {
            let b64 = base64_url;
            let header = b64(br#"{"alg":"RS256","typ":"JWT","kid":"stateless-s2s"}"#);
            let claims = json!({
                "iss": lock(&state.issuer).clone(),
                "sub": format!("installation:{installation}"),
                "jti": random_alnum(24),
                "iat": (state.clock)().as_second(),
                "exp": (state.clock)().as_second() + life,
                "ver": 1,
            });
            let payload = b64(claims.to_string().as_bytes());
            let signature = b64(random_alnum(256).as_bytes());
            format!("ghs_{APP_ID}_{header}.{payload}.{signature}")
        }
    }
}

/// Base64url without padding (JWT's encoding).
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// GitHub's permission levels, lowest first.
fn level_rank(level: &str) -> u8 {
    match level {
        "read" => 1,
        "write" => 2,
        "admin" => 3,
        _ => 0,
    }
}

async fn access_tokens(
    State(state): State<Arc<StandInState>>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    state.calls.send_modify(|c| *c += 1);
    let path = format!("/app/installations/{id}/access_tokens");
    if let Some(refused) = admit(&state, spec::MINT, "POST", &path, &headers) {
        return refused;
    }
    let asked: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(value) => value,
            Err(_) => {
                lock(&state.violations).push(format!("POST {path}: the body is not JSON"));
                let (status, body) = github_error(StatusCode::BAD_REQUEST, "Problems parsing JSON");
                return (status, axum::Json(body)).into_response();
            }
        }
    };
    if let Err(errors) = spec::check_request(spec::MINT, &asked) {
        lock(&state.violations).push(format!(
            "POST {path}: GitHub's description refuses the body: {}",
            errors.join("; ")
        ));
        let (status, mut body) = github_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request.");
        body["errors"] = json!(
            errors
                .iter()
                .map(|e| json!({"resource": "Installation", "code": "invalid", "message": e}))
                .collect::<Vec<_>>()
        );
        return answer(&state, spec::MINT, status, body);
    }
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
    lock(&state.mints).push(record.clone());
    let mode = lock(&state.mode).clone();
    if mode != Mode::Hang {
        let mut open = state.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
    }
    let Some(installation) = lock(&state.installations)
        .iter()
        .find(|i| i.id == id)
        .cloned()
    else {
        let (status, body) = github_error(StatusCode::NOT_FOUND, "Not Found");
        return answer(&state, spec::MINT, status, body);
    };
    if installation.suspended {
        let (status, body) = github_error(
            StatusCode::FORBIDDEN,
            "This installation has been suspended",
        );
        return answer(&state, spec::MINT, status, body);
    }
    if let (Some(asked), Some(reached)) = (&record.repositories, &installation.repositories)
        && asked
            .iter()
            .any(|a| !reached.iter().any(|r| r.eq_ignore_ascii_case(a)))
    {
        let (status, body) = github_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "There is at least one repository that does not exist or is not accessible to the parent installation.",
        );
        return answer(&state, spec::MINT, status, body);
    }
    if let Some(asked) = &record.permissions
        && asked.iter().any(|(name, level)| {
            installation
                .permissions
                .get(name)
                .is_none_or(|granted| level_rank(granted) < level_rank(level))
        })
    {
        let (status, body) = github_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "The permissions requested are not granted to this installation.",
        );
        return answer(&state, spec::MINT, status, body);
    }
    let format = match headers
        .get(TOKEN_FORMAT_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some("enabled") => TokenFormat::Stateless,
        Some("disabled") => TokenFormat::Classic,
        Some(other) => {
            lock(&state.violations).push(format!(
                "{TOKEN_FORMAT_HEADER}: {other:?} (GitHub knows enabled and disabled)"
            ));
            *lock(&state.format)
        }
        None => *lock(&state.format),
    };
    let answered_permissions = record
        .permissions
        .clone()
        .unwrap_or_else(|| installation.permissions.clone());
    let owner = match &installation.account {
        Account::User(login) | Account::Organization(login) => login.clone(),
        Account::Enterprise(slug) => slug.clone(),
        Account::Missing => "ghost".to_owned(),
    };
    let issue = |life: SignedDuration| {
        let token = new_token(&state, format, id, life.as_secs());
        let expires_at =
            Timestamp::from_second(((state.clock)() + life).as_second()).expect("time");
        lock(&state.secrets).push(token.clone());
        lock(&state.issued).push((token.clone(), expires_at));
        let mut body = json!({
            "token": token,
            "expires_at": expires_at.to_string(),
            "permissions": answered_permissions,
            "repository_selection": if record.repositories.is_some() || installation.repositories.is_some() { "selected" } else { "all" },
            "has_multiple_single_files": false,
            "single_file_paths": [],
        });
        if answered_permissions.contains_key("single_file") {
            body["single_file"] = json!("config.yaml");
        }
        if let Some(names) = &record.repositories {
            body["repositories"] = Value::Array(
                names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| repository_object(&owner, name, 1_000_000 + i as u64))
                    .collect(),
            );
        }
        answer(&state, spec::MINT, StatusCode::CREATED, body)
    };
    match mode {
        Mode::Issue(life) => issue(life),
        Mode::Expired => issue(SignedDuration::from_secs(-30)),
        Mode::Status(code) => {
            let status = StatusCode::from_u16(code).expect("status");
            let (status, body) = github_error(
                status,
                if code == 401 {
                    "Bad credentials"
                } else {
                    "Server Error"
                },
            );
            answer(&state, spec::MINT, status, body)
        }
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
                "x".repeat(16 * 1024 * 1024)
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
        let violations = self.take_violations();
        if !violations.is_empty() && !std::thread::panicking() {
            panic!(
                "the GitHub stand-in saw what GitHub's description ({}) refuses: {}",
                spec::source(),
                violations.join(" | ")
            );
        }
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
