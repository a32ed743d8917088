//! What the platform tests add to the workspace's `testkit`: App keys
//! generated at test time, the `github-stand-in` crate's GitHub (verifies
//! the App JWT, fails on command, installations on several accounts, the
//! scope of each mint) wired to the platform's provider, captured tracing output, the
//! service in-process on a loopback port, and the secret scan with the keys
//! registered. The real binary is `testkit::PlatformProcess`.
//!
//! Waits block on channels (a call counter, a stderr line), never on sleeps;
//! each has a deadline that fails the test saying what was awaited.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use jiff::{SignedDuration, Timestamp};
use molecule_platform::provider::Clock;
use molecule_platform::{GitHubAppConfig, GitHubAppProvider, ServiceLimits};
use secrecy::SecretString;
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

/// `openssl ARGS…`, which must succeed (the stand-in's own wrapper).
fn openssl(args: &[&str]) {
    if let Err(e) = github_stand_in::keys::openssl(args) {
        panic!("these tests generate RSA keys with the openssl CLI: {e:#}");
    }
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
        // Another App's key, made as the stand-in process makes its own.
        github_stand_in::keys::generate(&p("other")).expect("another App's key");
        let other = p("other").join("app.pem");
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
// GitHub stand-in (the `github-stand-in` crate, with the platform's side)
// ---------------------------------------------------------------------------

pub(crate) use github_stand_in::{INSTALLATION_ID, MintRecord, Mode};

/// The `github-stand-in` crate's stand-in, verifying JWTs against this
/// run's App key, plus how the platform's provider reaches it.
pub(crate) struct GitHubStandIn {
    inner: github_stand_in::GitHubStandIn,
    clock: Clock,
}

impl std::ops::Deref for GitHubStandIn {
    type Target = github_stand_in::GitHubStandIn;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl GitHubStandIn {
    /// Starts issuing one-hour tokens, checking time against the system clock.
    pub(crate) fn start() -> Self {
        Self::with_clock(Clock::system())
    }

    /// Starts with `clock` as "now" for JWT checks and expiries.
    pub(crate) fn with_clock(clock: Clock) -> Self {
        let reader = clock.clone();
        Self {
            inner: github_stand_in::GitHubStandIn::with_clock(&keys().public_pem, move || {
                reader.now()
            }),
            clock,
        }
    }

    /// A provider for this stand-in signing with `pem`.
    pub(crate) fn provider_config(&self, pem: &str) -> GitHubAppConfig {
        let mut config = GitHubAppConfig::new(
            self.issuer(),
            INSTALLATION_ID,
            SecretString::from(pem.to_owned()),
            format!("{}/", self.url()),
        );
        config.request_timeout = Duration::from_secs(10);
        config
    }

    /// A provider for this stand-in (PKCS#8 key, the stand-in's clock).
    pub(crate) fn provider(&self) -> GitHubAppProvider {
        GitHubAppProvider::with_clock(self.provider_config(&keys().pkcs8_pem), self.clock.clone())
            .expect("provider")
    }
}

/// A clock that starts at the real time (a whole second, as GitHub's
/// timestamps are) and moves only when told.
pub(crate) fn manual_clock() -> (Clock, Arc<std::sync::atomic::AtomicI64>) {
    use std::sync::atomic::{AtomicI64, Ordering};
    let start = Timestamp::from_second(Timestamp::now().as_second()).expect("now");
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
