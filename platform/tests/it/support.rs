//! Shared test pieces: App keys generated at test time, a stand-in of
//! GitHub's installation-token API that verifies the App JWT and fails on
//! command, captured tracing output, and a spawned `molecule-platform`.
//!
//! Waits block on channels (a call counter, a stderr line), never on sleeps;
//! each has a deadline that fails the test saying what was awaited.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use jiff::{SignedDuration, Timestamp};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use molecule_platform::provider::Clock;
use molecule_platform::{GitHubAppConfig, GitHubAppProvider};
use secrecy::SecretString;
use tokio::io::{AsyncBufReadExt, BufReader};
use tower::ServiceExt;

/// How long any wait may take before the test fails (shared, slow CI cores).
pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

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
}

/// A stand-in of `POST /app/installations/{id}/access_tokens`, on its own
/// thread and runtime so tests may block without stalling it.
pub(crate) struct GitHubStandIn {
    state: Arc<StandInState>,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
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
        });
        let app = Router::new()
            .route(
                "/app/installations/{id}/access_tokens",
                axum::routing::post(access_tokens),
            )
            .with_state(Arc::clone(&state));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind stand-in");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::select! {
                    r = axum::serve(listener, app) => r.expect("stand-in server"),
                    _ = stop_rx => {}
                }
            });
        });
        Self {
            state,
            url,
            stop: Some(stop),
            thread: Some(thread),
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

impl Drop for GitHubStandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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
fn check_request(state: &StandInState, id: u64, headers: &HeaderMap) -> Result<String, String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    if id != INSTALLATION_ID {
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

async fn access_tokens(
    State(state): State<Arc<StandInState>>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
) -> Response {
    state.calls.send_modify(|c| *c += 1);
    if let Err(reason) = check_request(&state, id, &headers) {
        lock(&state.rejections).push(reason);
        return github_error(
            StatusCode::UNAUTHORIZED,
            "A JSON web token could not be decoded",
        );
    }
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
                "permissions": {"contents": "write"},
                "repository_selection": "all",
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

/// Fails when `text` contains any of `secrets` (or the private key body).
#[track_caller]
pub(crate) fn assert_no_secrets(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(
            !text.contains(secret.as_str()),
            "{what} contains a secret ({} characters starting {:?})",
            secret.len(),
            &secret[..4]
        );
    }
    for pem in [
        &keys().pkcs1_pem,
        &keys().pkcs8_pem,
        &keys().other_pkcs8_pem,
    ] {
        for line in pem.lines().filter(|l| !l.starts_with("-----")).take(3) {
            assert!(!text.contains(line), "{what} contains private key material");
        }
    }
}

// ---------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------

/// A running `molecule-platform` with captured stdout/stderr.
pub(crate) struct PlatformProcess {
    child: tokio::process::Child,
    /// Its first stdout line.
    pub(crate) first_line: String,
    /// Its second stdout line (how to point a daemon at it).
    pub(crate) second_line: String,
    /// The rest of stdout so far.
    pub(crate) stdout: Arc<Mutex<String>>,
    stderr: tokio::sync::watch::Sender<String>,
    /// The pipe readers; they end at EOF, after the process exits.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

/// Environment variables the binary reads; cleared so the caller's
/// environment cannot leak into a test.
const PLATFORM_VARS: &[&str] = &[
    "PLATFORM_LISTEN",
    "ADMIN_TOKEN",
    "PLATFORM_WORKSPACE_TOKENS_FILE",
    "GITHUB_APP_ID",
    "GITHUB_APP_CLIENT_ID",
    "GITHUB_APP_INSTALLATION_ID",
    "GITHUB_APP_PRIVATE_KEY_FILE",
    "GITHUB_API_URL",
    "LOG_FORMAT",
    "RUST_LOG",
];

/// `molecule-platform` with `args` and `env`, output piped.
pub(crate) fn platform_command(args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_molecule-platform"));
    configure(cmd, args, env)
}

/// Like [`platform_command`], started by `sh` under an open-file limit of
/// `nofile` (soft and hard: `ulimit -n`, then `exec`, so the pid is the
/// platform's).
pub(crate) fn platform_command_with_nofile(
    nofile: u32,
    args: &[&str],
    env: &[(&str, &str)],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_molecule-platform"));
    configure(cmd, args, env)
}

fn configure(
    mut cmd: tokio::process::Command,
    args: &[&str],
    env: &[(&str, &str)],
) -> tokio::process::Command {
    for var in PLATFORM_VARS {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

impl PlatformProcess {
    /// Spawns and waits for the `listening on` line (failing with stderr
    /// when the process exits first).
    pub(crate) async fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_command(platform_command(args, env)).await
    }

    /// Like [`PlatformProcess::spawn`], for a command from
    /// [`platform_command`] the caller adjusted (another uid, say).
    pub(crate) async fn spawn_command(mut command: tokio::process::Command) -> Self {
        let mut child = command.spawn().expect("spawn molecule-platform");
        let stderr_tx = tokio::sync::watch::Sender::new(String::new());
        let mut err_lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let tx = stderr_tx.clone();
        let stderr_reader = tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                tx.send_modify(|s| {
                    s.push_str(&line);
                    s.push('\n');
                });
            }
        });
        let mut out_lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first_line = match tokio::time::timeout(WAIT, out_lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => {
                let _ = child.wait().await;
                panic!(
                    "molecule-platform printed no first line ({other:?}); stderr:\n{}",
                    stderr_tx.borrow().as_str()
                )
            }
        };
        let second_line = match tokio::time::timeout(WAIT, out_lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => panic!("molecule-platform printed no second line ({other:?})"),
        };
        let stdout = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stdout);
        let stdout_reader = tokio::spawn(async move {
            while let Ok(Some(line)) = out_lines.next_line().await {
                let mut s = lock(&sink);
                s.push_str(&line);
                s.push('\n');
            }
        });
        Self {
            child,
            first_line,
            second_line,
            stdout,
            stderr: stderr_tx,
            readers: vec![stderr_reader, stdout_reader],
        }
    }

    /// `http://ADDR` from the first line.
    pub(crate) fn url(&self) -> String {
        self.first_line
            .strip_prefix("molecule-platform listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {:?}", self.first_line))
            .to_owned()
    }

    /// The process id.
    pub(crate) fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id().expect("running") as i32)
    }

    /// Stderr so far.
    pub(crate) fn stderr(&self) -> String {
        self.stderr.borrow().clone()
    }

    /// Waits until stderr has a line containing `needle` `count` times.
    pub(crate) async fn wait_for_stderr(&self, needle: &str, count: usize) -> String {
        let mut rx = self.stderr.subscribe();
        let found =
            tokio::time::timeout(WAIT, rx.wait_for(|s| s.matches(needle).count() >= count)).await;
        match found {
            Ok(Ok(text)) => text.clone(),
            _ => panic!(
                "stderr: no {count}x {needle:?} within {WAIT:?}:\n{}",
                self.stderr()
            ),
        }
    }

    /// Sends `signal` and waits for the exit.
    pub(crate) async fn signal_and_wait(
        &mut self,
        signal: nix::sys::signal::Signal,
    ) -> std::process::ExitStatus {
        nix::sys::signal::kill(self.pid(), signal).expect("kill");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("molecule-platform exits after the signal")
            .expect("wait");
        // All output read: the pipe readers end at EOF, after the exit.
        for reader in self.readers.drain(..) {
            tokio::time::timeout(WAIT, reader)
                .await
                .expect("output pipes close after the exit")
                .expect("reader task");
        }
        status
    }
}

/// Runs the binary to completion (it is expected to refuse to start).
pub(crate) async fn run_to_exit(
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String, String) {
    let out = tokio::time::timeout(WAIT, platform_command(args, env).output())
        .await
        .expect("molecule-platform exits")
        .expect("run molecule-platform");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An HTTP client for the real binary (no proxy, short timeouts).
pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("client")
}

/// `printf %s BEARER | sha256sum` in hex.
pub(crate) fn sha256_hex(bearer: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bearer.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
