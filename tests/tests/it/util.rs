//! The harness every integration test shares.
//!
//! The tests drive the real binaries (`target/debug/molecule-credd`,
//! `target/debug/credd`), real `git`, real Unix sockets and real HTTP on
//! loopback. This module owns the pieces that make that deterministic:
//!
//! - [`Sandbox`]: one test's temporary world (home, configs, socket path) and
//!   its [`Transcript`] of every captured output, scanned for secrets when the
//!   sandbox is dropped (or earlier with [`Sandbox::assert_no_secrets`]).
//! - [`TestPlatform`]: the platform service from the `molecule_platform`
//!   library, served in-process behind a fault switch ([`Fault`]) the test
//!   flips at run time; it counts requests and lets a test block until
//!   "N requests seen" ([`TestPlatform::wait_for_requests`]).
//! - [`Daemon`]: a spawned `molecule-credd` whose stdout/stderr are captured;
//!   ready once it logs `listening on` *and* answers a protocol `status`.
//! - [`GitServer`]: git's own `git http-backend` behind a small HTTP server
//!   that only accepts `x-access-token:<token the platform issued and that has
//!   not expired>`.
//! - [`run`] / [`Cmd`]: child processes with a deadline, output captured into
//!   the transcript.
//!
//! No helper sleeps to synchronise: waits block on a condition variable that
//! the producer (a pipe reader, the platform's request counter) signals, and
//! every wait has a deadline that fails the test with a message saying what
//! was awaited.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use credd_core::protocol::{
    self, ErrorCode, Request as DaemonRequest, Response as DaemonResponse, Source, Status,
};

/// How long any single wait in the harness may take before the test fails.
/// Generous: the CI machine has two cores shared with parallel tests.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// Back-off flags for tests that are not about back-off, so a failing call is
/// retried quickly.
pub(crate) const FAST_BACKOFF: [&str; 4] = ["--backoff-initial", "100ms", "--backoff-max", "1s"];

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// The cargo target folder: `CARGO_TARGET_DIR`, else the workspace's `target/`.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_owned()
}

/// Path of a workspace binary in `target/debug`, failing clearly when absent.
///
/// `cargo test` builds only this crate's dependencies, not other packages'
/// binaries, hence the README's `cargo build --workspace && cargo test`.
pub(crate) fn binary(name: &str) -> PathBuf {
    let path = target_dir().join("debug").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` first (the tests run the real binaries)",
        path.display()
    );
    path
}

/// `target/debug/molecule-credd`.
pub(crate) fn daemon_bin() -> PathBuf {
    binary("molecule-credd")
}

/// `target/debug/credd`.
pub(crate) fn credd_bin() -> PathBuf {
    binary("credd")
}

// ---------------------------------------------------------------------------
// Captured output
// ---------------------------------------------------------------------------

#[derive(Default)]
struct CaptureState {
    bytes: Vec<u8>,
    closed: bool,
}

/// Bytes read from a child's pipe by a background thread; waitable.
#[derive(Clone, Default)]
pub(crate) struct Captured {
    shared: Arc<(Mutex<CaptureState>, Condvar)>,
}

impl Captured {
    /// Starts a thread copying `pipe` into a new capture until EOF.
    pub(crate) fn spawn(mut pipe: impl Read + Send + 'static) -> Self {
        let captured = Self::default();
        let shared = Arc::clone(&captured.shared);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = pipe.read(&mut buf).unwrap_or(0);
                let (lock, cv) = &*shared;
                let mut state = lock_ok(lock);
                if n == 0 {
                    state.closed = true;
                    cv.notify_all();
                    return;
                }
                state.bytes.extend_from_slice(&buf[..n]);
                cv.notify_all();
            }
        });
        captured
    }

    /// Everything captured so far, lossily decoded.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&lock_ok(&self.shared.0).bytes).into_owned()
    }

    /// Blocks until `done(text, closed)` holds; `Err` with the text on timeout.
    fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&str, bool) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.shared;
        let mut state = lock_ok(lock);
        loop {
            let text = String::from_utf8_lossy(&state.bytes).into_owned();
            if done(&text, state.closed) {
                return Ok(text);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(text);
            }
            state = cv
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Blocks until the pipe is closed, failing the test after `timeout`.
    pub(crate) fn wait_closed(&self, what: &str, timeout: Duration) -> String {
        self.wait_until(timeout, |_, closed| closed)
            .unwrap_or_else(|text| {
                panic!("{what}: still open after {timeout:?}; output so far:\n{text}")
            })
    }

    /// Blocks until a line containing `needle` was captured, failing the test
    /// (with the output so far) after `timeout` or if the pipe closes first.
    pub(crate) fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_line_matching(&format!("a line containing {needle:?}"), timeout, |l| {
            l.contains(needle)
        })
    }

    /// Blocks until a line satisfying `matches` was captured; `what` describes
    /// it in the failure message.
    pub(crate) fn wait_for_line_matching(
        &self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let mut closed_early = false;
        let result = self.wait_until(timeout, |text, closed| {
            if text.lines().any(&matches) {
                return true;
            }
            closed_early = closed;
            closed
        });
        match result {
            Ok(text) if !closed_early => text
                .lines()
                .find(|l| matches(l))
                .expect("matched above")
                .to_owned(),
            Ok(text) => {
                panic!("waited for {what} but the process closed its output first:\n{text}")
            }
            Err(text) => panic!("no {what} within {timeout:?}; output so far:\n{text}"),
        }
    }
}

/// Whether `line` contains `word` delimited by non-alphanumeric characters.
pub(crate) fn has_word(line: &str, word: &str) -> bool {
    line.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| w == word)
}

fn lock_ok<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding a lock has already failed; the data
    // is still fine for reporting.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Transcript and the secret scan
// ---------------------------------------------------------------------------

/// Every output one test captured, by label, for the secret scan.
#[derive(Default)]
pub(crate) struct Transcript {
    entries: Mutex<Vec<(String, Captured)>>,
}

impl Transcript {
    fn record(&self, label: impl Into<String>, captured: &Captured) {
        lock_ok(&self.entries).push((label.into(), captured.clone()));
    }

    /// Labels and texts of everything recorded so far.
    fn snapshot(&self) -> Vec<(String, String)> {
        lock_ok(&self.entries)
            .iter()
            .map(|(label, c)| (label.clone(), c.text()))
            .collect()
    }
}

/// Panics naming the output and the kind of secret when any secret occurs in
/// any recorded text. Secrets shorter than 8 characters are ignored (they
/// would match by accident and no real token is that short).
fn scan(transcript: &Transcript, secrets: &[(String, String)]) {
    let mut leaks = Vec::new();
    let mut scanned = 0usize;
    for (label, text) in transcript.snapshot() {
        scanned += text.len();
        for (kind, secret) in secrets {
            if secret.len() >= 8 && text.contains(secret.as_str()) {
                leaks.push(format!("{kind} found in {label}"));
            }
        }
    }
    // The leaked values themselves are never printed: the panic message is
    // captured by the test runner and would leak them again.
    assert!(
        leaks.is_empty(),
        "secrets leaked into captured output ({scanned} bytes scanned): {}",
        leaks.join("; ")
    );
}

// ---------------------------------------------------------------------------
// Child processes with deadlines
// ---------------------------------------------------------------------------

/// What a finished child produced. `Debug` shows `password=` values only as
/// a fingerprint, so a failing assertion does not print a token.
pub(crate) struct CmdOutput {
    /// Exit status.
    pub(crate) status: ExitStatus,
    /// Standard output.
    pub(crate) stdout: String,
    /// Standard error.
    pub(crate) stderr: String,
}

/// `password=` values and `ghs_…` words replaced by `fp:<first 12 hex of
/// SHA-256>`, for failure messages.
pub(crate) fn redact_passwords(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("password=") {
            Some(p) => format!("password=<{}>", fingerprint(p)),
            None => l
                .split(' ')
                .map(|w| {
                    if w.starts_with("ghs_") {
                        format!("<{}>", fingerprint(w))
                    } else {
                        w.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts two secrets are equal (or, with `equal == false`, different)
/// without printing them: failures show fingerprints.
#[track_caller]
pub(crate) fn assert_secret(got: Option<&str>, expected: &str, equal: bool, what: &str) {
    let same = got == Some(expected);
    assert!(
        same == equal,
        "{what}: got {:?}, {} {}",
        got.map(fingerprint),
        if equal {
            "expected"
        } else {
            "must differ from"
        },
        fingerprint(expected)
    );
}

/// A short, printable stand-in for a secret in failure messages.
pub(crate) fn fingerprint(secret: &str) -> String {
    format!(
        "fp:{}",
        &credd_core::secret::sha256_hex(secret.as_bytes())[..12]
    )
}

impl std::fmt::Debug for CmdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmdOutput")
            .field("status", &self.status)
            .field("stdout", &redact_passwords(&self.stdout))
            .field("stderr", &self.stderr)
            .finish()
    }
}

impl CmdOutput {
    /// Panics (showing fingerprints, never the token) unless stdout has
    /// `password=<expected>`.
    #[track_caller]
    pub(crate) fn assert_password(&self, expected: &str, what: &str) {
        let got = self.attribute("password");
        assert!(
            got == Some(expected),
            "{what}: expected password <{}>, got {:?}\n{self:?}",
            fingerprint(expected),
            got.map(fingerprint)
        );
    }

    /// Panics with both outputs unless the child exited 0.
    #[track_caller]
    pub(crate) fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what}: expected exit 0, got {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            redact_passwords(&self.stdout),
            self.stderr
        );
        self
    }

    /// The value of the first `key=value` line on stdout.
    pub(crate) fn attribute(&self, key: &str) -> Option<&str> {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// A command about to be run with a deadline and captured output.
pub(crate) struct Cmd<'a> {
    command: Command,
    label: String,
    stdin: Vec<u8>,
    timeout: Duration,
    transcript: Option<&'a Transcript>,
    stdout_holds_secret: bool,
}

impl<'a> Cmd<'a> {
    /// Wraps `command`; `label` names it in failures and in the transcript.
    pub(crate) fn new(command: Command, label: impl Into<String>) -> Self {
        Self {
            command,
            label: label.into(),
            stdin: Vec::new(),
            timeout: WAIT,
            transcript: None,
            stdout_holds_secret: false,
        }
    }

    /// Bytes written to the child's stdin (then closed).
    pub(crate) fn stdin(mut self, bytes: impl AsRef<[u8]>) -> Self {
        self.stdin = bytes.as_ref().to_vec();
        self
    }

    /// Records stderr (and stdout, see [`Self::stdout_holds_secret`]) for the secret scan.
    pub(crate) fn transcript(mut self, transcript: &'a Transcript) -> Self {
        self.transcript = Some(transcript);
        self
    }

    /// stdout is where this command legitimately prints a token (`credd get`,
    /// `git credential fill`): keep it out of the secret scan.
    pub(crate) fn stdout_holds_secret(mut self) -> Self {
        self.stdout_holds_secret = true;
        self
    }

    /// Mutable access for extra env/args.
    pub(crate) fn command(&mut self) -> &mut Command {
        &mut self.command
    }

    /// Runs to completion or panics after the timeout (killing the child).
    pub(crate) fn run(mut self) -> CmdOutput {
        let label = self.label.clone();
        let mut child = self
            .command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        let stdout = Captured::spawn(child.stdout.take().expect("piped"));
        let stderr = Captured::spawn(child.stderr.take().expect("piped"));
        if let Some(t) = self.transcript {
            t.record(format!("{label} (stderr)"), &stderr);
            if !self.stdout_holds_secret {
                t.record(format!("{label} (stdout)"), &stdout);
            }
        }
        let mut stdin = child.stdin.take().expect("piped");
        let input = std::mem::take(&mut self.stdin);
        // A separate thread, so a child that never reads cannot block us.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let deadline = Instant::now() + self.timeout;
        let timed_out = stdout.wait_until(self.timeout, |_, closed| closed).is_err()
            || stderr
                .wait_until(deadline.saturating_duration_since(Instant::now()), |_, c| c)
                .is_err();
        if timed_out {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{label} did not finish within {:?}\n--- stderr\n{}",
                self.timeout,
                stderr.text()
            );
        }
        let status = child.wait().expect("wait for child");
        CmdOutput {
            status,
            stdout: stdout.text(),
            stderr: stderr.text(),
        }
    }
}

// ---------------------------------------------------------------------------
// Sandbox
// ---------------------------------------------------------------------------

/// One test's private world: temp folders, environment and transcript.
///
/// Layout under a fresh temp dir (short, so the socket path fits `sun_path`):
/// `home/` (HOME and XDG_CONFIG_HOME for git), `configs/` (CONFIGS_DIR with
/// `.auth_token`), `run/credd.sock` (the socket; `run/` is created by the
/// daemon), `repos/` (bare repositories), `work/` (clones).
pub(crate) struct Sandbox {
    dir: tempfile::TempDir,
    transcript: Arc<Transcript>,
    /// Platforms whose issued tokens and bearer are secrets in this test.
    platforms: Mutex<Vec<PlatformSecrets>>,
    extra_secrets: Mutex<Vec<(String, String)>>,
    /// Platform URL given to daemon and helper (may point nowhere).
    platform_url: Mutex<String>,
    hosts: Mutex<String>,
    workspace_id: Mutex<Option<String>>,
}

impl Sandbox {
    /// A fresh sandbox; the platform URL starts as a closed loopback port.
    pub(crate) fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("credd-it-")
            .tempdir_in("/tmp")
            .expect("create temp dir");
        for sub in ["home/.config", "configs", "repos", "work"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("create sandbox folders");
        }
        Self {
            dir,
            transcript: Arc::default(),
            platforms: Mutex::default(),
            extra_secrets: Mutex::default(),
            platform_url: Mutex::new(format!("http://{}", closed_port())),
            hosts: Mutex::new("github.com".into()),
            workspace_id: Mutex::default(),
        }
    }

    /// The sandbox's root folder.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `CONFIGS_DIR`.
    pub(crate) fn configs_dir(&self) -> PathBuf {
        self.path().join("configs")
    }

    /// Git's HOME.
    pub(crate) fn home(&self) -> PathBuf {
        self.path().join("home")
    }

    /// The folder the daemon creates for its socket.
    pub(crate) fn run_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    /// `CREDD_SOCKET`.
    pub(crate) fn socket(&self) -> PathBuf {
        self.run_dir().join("credd.sock")
    }

    /// Points daemon and helper at `platform` and writes its bearer to
    /// `configs/.auth_token`; its tokens and bearer become secrets here.
    pub(crate) fn use_platform(&self, platform: &TestPlatform) {
        *lock_ok(&self.platform_url) = platform.url();
        self.watch_platform(platform);
        write_file(
            &self.configs_dir().join(".auth_token"),
            format!("{}\n", platform.bearer()),
            0o600,
        );
    }

    /// Like [`Self::use_platform`], but as workspace [`WORKSPACE_ID`] (the
    /// workspace route, with that workspace's bearer).
    pub(crate) fn use_platform_as_workspace(&self, platform: &TestPlatform) {
        self.use_platform(platform);
        *lock_ok(&self.workspace_id) = Some(WORKSPACE_ID.to_owned());
        write_file(
            &self.configs_dir().join(".auth_token"),
            format!("  {}\n", platform.workspace_bearer()),
            0o600,
        );
    }

    /// Treats `platform`'s tokens and bearer as secrets without using it.
    pub(crate) fn watch_platform(&self, platform: &TestPlatform) {
        lock_ok(&self.platforms).push(platform.secrets());
    }

    /// Points daemon and helper at a URL (e.g. a port nothing listens on).
    pub(crate) fn set_platform_url(&self, url: String) {
        *lock_ok(&self.platform_url) = url;
    }

    /// Sets `CREDD_HOSTS`.
    pub(crate) fn set_hosts(&self, hosts: &str) {
        *lock_ok(&self.hosts) = hosts.to_owned();
    }

    /// Adds a value that must never appear in any captured output.
    pub(crate) fn add_secret(&self, kind: &str, value: &str) {
        lock_ok(&self.extra_secrets).push((kind.to_owned(), value.to_owned()));
    }

    /// The environment daemon, helper and git share (on top of a cleared env).
    pub(crate) fn base_env(&self) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = vec![
            ("PATH".into(), std::env::var_os("PATH").unwrap_or_default()),
            ("HOME".into(), self.home().into()),
            ("XDG_CONFIG_HOME".into(), self.home().join(".config").into()),
            (
                "PLATFORM_URL".into(),
                lock_ok(&self.platform_url).clone().into(),
            ),
            ("CONFIGS_DIR".into(), self.configs_dir().into()),
            ("CREDD_SOCKET".into(), self.socket().into()),
            ("CREDD_HOSTS".into(), lock_ok(&self.hosts).clone().into()),
            ("RUST_LOG".into(), "debug".into()),
            ("RUST_BACKTRACE".into(), "0".into()),
        ];
        if let Some(id) = lock_ok(&self.workspace_id).clone() {
            env.push(("WORKSPACE_ID".into(), id.into()));
        }
        if let Some(lang) = std::env::var_os("LANG") {
            env.push(("LANG".into(), lang));
        }
        env
    }

    /// `credd ARGS` with the sandbox environment, output recorded.
    pub(crate) fn credd(&self, args: &[&str]) -> Cmd<'_> {
        let mut command = Command::new(credd_bin());
        command
            .args(args)
            .env_clear()
            .envs(self.base_env())
            .current_dir(self.path());
        Cmd::new(command, format!("credd {}", args.join(" "))).transcript(&self.transcript)
    }

    /// `credd get` for `host` over `protocol`, as git would call it.
    pub(crate) fn credd_get(&self, protocol: &str, host: &str) -> CmdOutput {
        self.credd_get_with(protocol, host, &[])
    }

    /// [`Self::credd_get`] with extra environment variables.
    pub(crate) fn credd_get_with(
        &self,
        protocol: &str,
        host: &str,
        env: &[(&str, &str)],
    ) -> CmdOutput {
        let mut get = self
            .credd(&["get"])
            .stdin(format!("protocol={protocol}\nhost={host}\n\n"))
            .stdout_holds_secret();
        get.command().envs(env.iter().copied());
        get.run()
    }

    /// Writes the global git config: identity, and for `url` the helper list
    /// reset, then `credd`, then each of `fallbacks`.
    pub(crate) fn configure_git(&self, url: &str, fallbacks: &[&str]) {
        let credd = credd_bin();
        let mut helpers = vec![credd.to_str().expect("UTF-8 target path")];
        helpers.extend_from_slice(fallbacks);
        self.configure_git_helpers(url, &helpers);
    }

    /// Writes the global git config with exactly `helpers` for `url`.
    pub(crate) fn configure_git_helpers(&self, url: &str, helpers: &[&str]) {
        let mut config = format!(
            "[user]\n\tname = Credd Test\n\temail = test@example.invalid\n\
             [init]\n\tdefaultBranch = main\n\
             [credential \"{url}\"]\n\thelper =\n"
        );
        for helper in helpers {
            config.push_str(&format!("\thelper = {helper}\n"));
        }
        write_file(&self.home().join(".gitconfig"), config, 0o644);
    }

    /// `git ARGS` in `cwd` with an isolated configuration (no system config,
    /// temp HOME, no prompts), output recorded.
    pub(crate) fn git(&self, cwd: &Path, args: &[&str]) -> Cmd<'_> {
        let mut command = Command::new("git");
        command
            .args(args)
            .env_clear()
            .envs(self.base_env())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .current_dir(cwd);
        Cmd::new(command, format!("git {}", args.join(" "))).transcript(&self.transcript)
    }

    /// A protocol request straight to the daemon's socket, as the test process.
    pub(crate) fn request(&self, request: &DaemonRequest) -> Result<DaemonResponse, String> {
        request_over(&self.socket(), request)
    }

    /// The daemon's status, panicking when it does not answer one.
    pub(crate) fn status(&self) -> Status {
        match self.request(&DaemonRequest::Status) {
            Ok(DaemonResponse::Status(status)) => *status,
            other => panic!("expected a status answer, got {other:?}"),
        }
    }

    /// A protocol `get` as the test process: `Ok((token, expires_at, source))`
    /// or the daemon's other answer.
    pub(crate) fn get(&self) -> Result<(String, u64, Source), DaemonResponse> {
        match self.request(&DaemonRequest::Get) {
            Ok(DaemonResponse::Token {
                token,
                expires_at,
                source,
            }) => Ok((token.expose().to_owned(), expires_at, source)),
            Ok(other) => Err(other),
            Err(e) => panic!("protocol get failed: {e}"),
        }
    }

    /// A protocol `get` that must be answered with an error of `code`.
    #[track_caller]
    pub(crate) fn assert_get_fails(&self, code: ErrorCode) -> String {
        match self.get() {
            Err(DaemonResponse::Error { code: got, message }) if got == code => message,
            Err(other) => panic!("expected a {code:?} error, got {other:?}"),
            Ok((_, _, source)) => panic!("expected a {code:?} error, got a token from {source:?}"),
        }
    }

    /// Asks for status until `done` holds, failing after [`WAIT`]. The daemon
    /// publishes its state only on request, so this is the one wait that asks
    /// repeatedly (10 ms apart) instead of blocking on a signal.
    #[track_caller]
    pub(crate) fn wait_for_status(&self, what: &str, done: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon status never showed {what} within {WAIT:?}; last: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Protocol `get`s until one returns a token (each blocks in the daemon
    /// up to its --wait-timeout, so this is not a busy loop); fails after [`WAIT`].
    #[track_caller]
    pub(crate) fn wait_for_token(&self) -> (String, u64, Source) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.get() {
                Ok(answer) => return answer,
                Err(other) => assert!(
                    Instant::now() < deadline,
                    "the daemon served no token within {WAIT:?}; last answer: {other:?}"
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Collects every secret known to this sandbox, labelled by kind.
    fn secrets(&self) -> Vec<(String, String)> {
        let mut secrets = lock_ok(&self.extra_secrets).clone();
        for p in lock_ok(&self.platforms).iter() {
            for bearer in &p.bearers {
                secrets.push(("a platform bearer".into(), bearer.clone()));
            }
            for token in lock_ok(&p.issued).iter() {
                secrets.push(("an issued token".into(), token.token.clone()));
            }
        }
        secrets
    }

    /// Fails the test if any recorded output contains a secret.
    pub(crate) fn assert_no_secrets(&self) {
        scan(&self.transcript, &self.secrets());
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Every test is scanned, whether or not it remembered to ask. Dropped
        // daemons have already closed their pipes by then (declare the daemon
        // after the sandbox so it drops first).
        if !std::thread::panicking() {
            self.assert_no_secrets();
        }
    }
}

/// Writes `contents` to `path` with `mode`.
pub(crate) fn write_file(path: &Path, contents: impl AsRef<[u8]>, mode: u32) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Blocks until the wall clock passes `when` — only for waiting out a
/// token's life, which is the behaviour under test (not synchronisation).
pub(crate) fn wait_until_time(when: SystemTime) {
    if let Ok(left) = when.duration_since(SystemTime::now()) {
        assert!(
            left <= WAIT,
            "refusing to wait {left:?} for a token to expire"
        );
        std::thread::sleep(left);
    }
}

/// A loopback address nothing listens on (bound, then released).
pub(crate) fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.local_addr().expect("local addr")
}

/// One request line to the socket at `path`, one response line back.
pub(crate) fn request_over(path: &Path, request: &DaemonRequest) -> Result<DaemonResponse, String> {
    let line = exchange_raw(path, &protocol::encode(request))?;
    protocol::decode(line.as_bytes()).map_err(|e| format!("undecodable answer: {e}"))
}

/// Writes raw bytes to the socket at `path` and reads one line back (bounded
/// by [`protocol::MAX_LINE`] and a deadline). An empty string means the daemon
/// closed without answering.
pub(crate) fn exchange_raw(path: &Path, bytes: &[u8]) -> Result<String, String> {
    let mut stream =
        UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
    // The daemon may answer and close before reading everything (oversized
    // input); a failed write still leaves its answer to read.
    let _ = stream.write_all(bytes);
    read_line(stream)
}

/// Reads one response line from `stream` (bounded).
pub(crate) fn read_line(stream: UnixStream) -> Result<String, String> {
    let mut line = String::new();
    BufReader::new(stream)
        .take(protocol::MAX_LINE as u64 + 1)
        .read_line(&mut line)
        .map_err(|e| format!("read answer: {e}"))?;
    Ok(line)
}

// ---------------------------------------------------------------------------
// Daemon
// ---------------------------------------------------------------------------

/// A `molecule-credd` about to start.
pub(crate) struct DaemonBuilder<'a> {
    sandbox: &'a Sandbox,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    uid: Option<u32>,
}

impl<'a> DaemonBuilder<'a> {
    /// Adds command-line arguments.
    pub(crate) fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Adds (or overrides) an environment variable.
    pub(crate) fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.into(), value.as_ref().to_owned()));
        self
    }

    /// Runs the daemon as another user (tests run as root).
    pub(crate) fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// Spawns without waiting for readiness.
    pub(crate) fn spawn(self) -> Daemon {
        let mut command = Command::new(daemon_bin());
        command
            .args(&self.args)
            .env_clear()
            .envs(self.sandbox.base_env())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.sandbox.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(uid) = self.uid {
            command.uid(uid).gid(uid);
        }
        let mut child = command.spawn().expect("start molecule-credd");
        let n = lock_ok(&self.sandbox.transcript.entries).len();
        let stdout = Captured::spawn(child.stdout.take().expect("piped"));
        let stderr = Captured::spawn(child.stderr.take().expect("piped"));
        self.sandbox
            .transcript
            .record(format!("molecule-credd #{n} (stdout)"), &stdout);
        self.sandbox
            .transcript
            .record(format!("molecule-credd #{n} (stderr)"), &stderr);
        Daemon {
            child: Some(child),
            stdout,
            stderr,
            socket: self.sandbox.socket(),
        }
    }

    /// Spawns and waits until the daemon logged `listening on` and answers
    /// a `status` request on its socket.
    pub(crate) fn start(self) -> Daemon {
        let daemon = self.spawn();
        daemon.wait_ready();
        daemon
    }
}

/// A running `molecule-credd`. Dropping it kills it; [`Daemon::stop`] is the
/// clean path (SIGTERM, exit 0).
pub(crate) struct Daemon {
    child: Option<Child>,
    stdout: Captured,
    stderr: Captured,
    socket: PathBuf,
}

impl Sandbox {
    /// A daemon configured from the sandbox, with fast back-off unless the
    /// test passes its own back-off flags.
    pub(crate) fn daemon(&self) -> DaemonBuilder<'_> {
        DaemonBuilder {
            sandbox: self,
            args: Vec::new(),
            env: Vec::new(),
            uid: None,
        }
    }
}

impl Daemon {
    /// The daemon's stderr (its log).
    pub(crate) fn log(&self) -> &Captured {
        &self.stderr
    }

    /// Process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits for the `listening on` line, then for a status answer.
    pub(crate) fn wait_ready(&self) {
        self.stderr.wait_for_line("listening on", WAIT);
        // The log line is printed once the listener is bound; a status
        // round trip proves the accept loop runs too.
        match request_over(&self.socket, &DaemonRequest::Status) {
            Ok(DaemonResponse::Status(_)) => {}
            other => panic!(
                "daemon logged `listening on` but its socket does not answer a status request: {other:?}\n--- log\n{}",
                self.stderr.text()
            ),
        }
    }

    /// Sends `signal` to the daemon.
    pub(crate) fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the daemon");
    }

    /// Waits (on its closed pipes, not by polling) for the daemon to exit.
    pub(crate) fn wait_exit(mut self) -> (ExitStatus, String) {
        self.stderr.wait_closed("molecule-credd stderr", WAIT);
        self.stdout.wait_closed("molecule-credd stdout", WAIT);
        let status = self
            .child
            .take()
            .expect("running")
            .wait()
            .expect("wait for daemon");
        (status, self.stderr.text())
    }

    /// SIGTERM, then asserts exit 0 and that the socket file is gone.
    pub(crate) fn stop(self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let socket = self.socket.clone();
        let (status, log) = self.wait_exit();
        assert!(
            status.success(),
            "molecule-credd should exit 0 on SIGTERM, got {status:?}\n--- log\n{log}"
        );
        assert!(
            !socket.exists(),
            "molecule-credd left its socket {} behind after SIGTERM",
            socket.display()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Test platform with fault injection
// ---------------------------------------------------------------------------

/// What the platform does with the next request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
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
pub(crate) struct SeenRequest {
    /// When it arrived.
    pub(crate) at: Instant,
    /// Request path.
    pub(crate) path: String,
    /// The fault in force when it arrived.
    pub(crate) fault: Fault,
}

/// A token the platform handed out, with the expiry it stated.
#[derive(Debug, Clone)]
pub(crate) struct IssuedToken {
    /// The token.
    pub(crate) token: String,
    /// Stated expiry.
    pub(crate) expires_at: SystemTime,
}

#[derive(Clone)]
struct PlatformSecrets {
    bearers: Vec<String>,
    issued: Arc<Mutex<Vec<IssuedToken>>>,
}

/// Lets other harness parts ask whether a token is one the platform issued
/// and that has not expired.
#[derive(Clone)]
pub(crate) struct TokenAuthority {
    issued: Arc<Mutex<Vec<IssuedToken>>>,
    revoked: Arc<Mutex<Vec<String>>>,
}

impl TokenAuthority {
    /// Whether `token` was issued and its stated expiry is still ahead.
    pub(crate) fn is_current(&self, token: &str) -> bool {
        let now = SystemTime::now();
        !lock_ok(&self.revoked).iter().any(|t| t == token)
            && lock_ok(&self.issued)
                .iter()
                .any(|t| t.token == token && t.expires_at > now)
    }

    /// Makes the git server refuse `token` from now on (as GitHub would a
    /// revoked installation token).
    pub(crate) fn revoke(&self, token: &str) {
        lock_ok(&self.revoked).push(token.to_owned());
    }
}

struct PlatformShared {
    fault: tokio::sync::watch::Sender<Fault>,
    seen: Mutex<Vec<SeenRequest>>,
    seen_cv: Condvar,
    issued: Arc<Mutex<Vec<IssuedToken>>>,
    revoked: Arc<Mutex<Vec<String>>>,
}

/// Options for [`TestPlatform::start`].
#[derive(Debug, Clone)]
pub(crate) struct PlatformOptions {
    /// Lifetime of the dev tokens.
    pub(crate) token_ttl: Duration,
}

impl Default for PlatformOptions {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(3600),
        }
    }
}

/// One run of the HTTP server; dropping its runtime drops every connection.
struct ServerGeneration {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

/// The platform service in-process, behind a [`Fault`] switch.
pub(crate) struct TestPlatform {
    shared: Arc<PlatformShared>,
    app: Router,
    addr: SocketAddr,
    bearers: Bearers,
    server: Mutex<Option<ServerGeneration>>,
}

impl TestPlatform {
    /// Starts a platform with default options, serving.
    pub(crate) fn start() -> Self {
        Self::with_options(PlatformOptions::default())
    }

    /// Starts a platform whose dev tokens live `ttl`.
    pub(crate) fn with_ttl(ttl: Duration) -> Self {
        Self::with_options(PlatformOptions { token_ttl: ttl })
    }

    /// Starts a platform with `options`, serving on a fresh loopback port.
    pub(crate) fn with_options(options: PlatformOptions) -> Self {
        let (app, bearers) = platform_service(&options);
        let shared = Arc::new(PlatformShared {
            fault: tokio::sync::watch::Sender::new(Fault::PassThrough),
            seen: Mutex::default(),
            seen_cv: Condvar::new(),
            issued: Arc::default(),
            revoked: Arc::default(),
        });
        let app = app.layer(axum::middleware::from_fn_with_state(
            Arc::clone(&shared),
            fault_layer,
        ));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind platform");
        let addr = listener.local_addr().expect("platform addr");
        let platform = Self {
            shared,
            app,
            addr,
            bearers,
            server: Mutex::default(),
        };
        platform.serve(listener);
        platform
    }

    /// Starts a platform that is down from the start (port reserved, closed).
    pub(crate) fn start_down() -> Self {
        let platform = Self::start();
        platform.set_fault(Fault::Down);
        platform
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).expect("nonblocking");
        let app = self.app.clone();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("platform runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::select! {
                    result = axum::serve(listener, app) => {
                        result.expect("platform server");
                    }
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops every connection task: clients see
            // their connections reset, new ones are refused.
            drop(runtime);
        });
        *lock_ok(&self.server) = Some(ServerGeneration { stop, thread });
    }

    fn shut_down_server(&self) {
        let generation = lock_ok(&self.server).take();
        if let Some(generation) = generation {
            let _ = generation.stop.send(());
            generation.thread.join().expect("platform server thread");
        }
    }

    /// Base URL (`http://127.0.0.1:PORT`).
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The admin bearer (written to `.auth_token` by [`Sandbox::use_platform`]).
    pub(crate) fn bearer(&self) -> &str {
        &self.bearers.admin
    }

    /// The bearer of workspace [`WORKSPACE_ID`].
    pub(crate) fn workspace_bearer(&self) -> &str {
        &self.bearers.workspace
    }

    /// Switches behaviour. `Down` closes the listener and drops open
    /// connections; leaving `Down` listens again on the same port.
    pub(crate) fn set_fault(&self, fault: Fault) {
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
            let listener = std::net::TcpListener::bind(self.addr)
                .unwrap_or_else(|e| panic!("platform: cannot listen again on {}: {e}", self.addr));
            self.serve(listener);
        }
    }

    /// Requests seen so far (any fault but `Down`, which sees none).
    pub(crate) fn requests(&self) -> usize {
        lock_ok(&self.shared.seen).len()
    }

    /// Every request seen so far.
    pub(crate) fn seen(&self) -> Vec<SeenRequest> {
        lock_ok(&self.shared.seen).clone()
    }

    /// Blocks until at least `n` requests were seen; panics after `timeout`.
    #[track_caller]
    pub(crate) fn wait_for_requests(&self, n: usize, timeout: Duration) -> usize {
        let guard = lock_ok(&self.shared.seen);
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

    /// Tokens handed out so far, oldest first.
    pub(crate) fn issued(&self) -> Vec<IssuedToken> {
        lock_ok(&self.shared.issued).clone()
    }

    /// The token most recently handed out.
    pub(crate) fn last_issued(&self) -> Option<String> {
        lock_ok(&self.shared.issued).last().map(|t| t.token.clone())
    }

    /// A handle deciding which tokens are current (for the git server).
    pub(crate) fn authority(&self) -> TokenAuthority {
        TokenAuthority {
            issued: Arc::clone(&self.shared.issued),
            revoked: Arc::clone(&self.shared.revoked),
        }
    }

    fn secrets(&self) -> PlatformSecrets {
        PlatformSecrets {
            bearers: vec![self.bearers.admin.clone(), self.bearers.workspace.clone()],
            issued: Arc::clone(&self.shared.issued),
        }
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
        let mut seen = lock_ok(&shared.seen);
        seen.push(SeenRequest {
            at: Instant::now(),
            path: request.uri().path().to_owned(),
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
    lock_ok(&shared.issued).push(IssuedToken {
        token,
        expires_at: SystemTime::UNIX_EPOCH
            + Duration::from_millis(expires_at.as_millisecond().max(0) as u64),
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

/// The workspace id the test platform knows (see [`Sandbox::use_platform_as_workspace`]).
pub(crate) const WORKSPACE_ID: &str = "ws-credd-test";

/// A random printable string for bearers (tests only: not cryptographic
/// quality, but unique per process, call and instant).
fn random_secret(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let hex = credd_core::secret::sha256_hex(
        format!("{prefix}/{seq}/{nanos}/{}", std::process::id()).as_bytes(),
    );
    format!("{prefix}-{}", &hex[..40])
}

/// The platform's own HTTP service (`molecule_platform::app`) with the dev
/// provider, an admin bearer and one workspace bearer.
fn platform_service(options: &PlatformOptions) -> (Router, Bearers) {
    use molecule_platform::{AppState, Auth, DevProvider, Registry, WorkspaceTokens};
    use secrecy::SecretString;

    let bearers = Bearers {
        admin: random_secret("admin-bearer"),
        workspace: random_secret("workspace-bearer"),
    };
    let registry = Arc::new(Registry::new());
    registry.register(Arc::new(DevProvider::new(options.token_ttl)));
    let auth = Auth::new(
        Some(SecretString::from(bearers.admin.clone())),
        WorkspaceTokens::from_bearers([(
            WORKSPACE_ID,
            SecretString::from(bearers.workspace.clone()),
        )]),
    );
    (
        molecule_platform::app(AppState::new(registry, auth)),
        bearers,
    )
}

/// The bearers the test platform accepts.
#[derive(Clone)]
struct Bearers {
    admin: String,
    workspace: String,
}

// ---------------------------------------------------------------------------
// Git smart-HTTP server
// ---------------------------------------------------------------------------

struct GitShared {
    root: PathBuf,
    authority: TokenAuthority,
    /// 401s to requests without credentials (git's first, anonymous try).
    anonymous: Mutex<usize>,
    /// 401s to requests that carried a token that was not current.
    rejected: Mutex<usize>,
    accepted: Mutex<Vec<String>>,
}

/// `git http-backend` behind Basic auth `x-access-token:<current token>`.
pub(crate) struct GitServer {
    shared: Arc<GitShared>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl GitServer {
    /// Serves bare repositories under `root`, accepting tokens `authority`
    /// considers current.
    pub(crate) fn start(root: &Path, authority: TokenAuthority) -> Self {
        let shared = Arc::new(GitShared {
            root: root.to_owned(),
            authority,
            anonymous: Mutex::new(0),
            rejected: Mutex::new(0),
            accepted: Mutex::default(),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind git server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("git server addr");
        let app = Router::new()
            .fallback(git_cgi)
            .with_state(Arc::clone(&shared));
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("git server runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::select! {
                    result = axum::serve(listener, app) => result.expect("git server"),
                    _ = stop_rx => {}
                }
            });
        });
        Self {
            shared,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT` (the credential context for git config).
    pub(crate) fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT` (for `CREDD_HOSTS`).
    pub(crate) fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Creates a bare repository `name.git` that accepts pushes; returns its URL.
    pub(crate) fn create_repo(&self, name: &str) -> String {
        let path = self.shared.root.join(format!("{name}.git"));
        let out = Command::new("git")
            .args(["init", "--bare", "--quiet", "--initial-branch=main"])
            .arg(&path)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", &self.shared.root)
            .output()
            .expect("run git init");
        assert!(out.status.success(), "git init --bare failed: {out:?}");
        let out = Command::new("git")
            .args(["config", "http.receivepack", "true"])
            .current_dir(&path)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", &self.shared.root)
            .output()
            .expect("run git config");
        assert!(out.status.success(), "git config failed: {out:?}");
        format!("{}/{name}.git", self.base_url())
    }

    /// How many requests were refused with 401 (anonymous or not).
    pub(crate) fn unauthorized(&self) -> usize {
        *lock_ok(&self.shared.anonymous) + *lock_ok(&self.shared.rejected)
    }

    /// How many requests carried a token that was not (or no longer) current.
    pub(crate) fn rejected_credentials(&self) -> usize {
        *lock_ok(&self.shared.rejected)
    }

    /// Distinct tokens accepted so far, in first-seen order.
    pub(crate) fn accepted_tokens(&self) -> Vec<String> {
        lock_ok(&self.shared.accepted).clone()
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The token in `Authorization: Basic base64(x-access-token:TOKEN)`.
fn basic_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let decoded = base64_decode(value.strip_prefix("Basic ")?.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, token) = text.split_once(':')?;
    (user == "x-access-token").then(|| token.to_owned())
}

fn base64_decode(input: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in input.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

async fn git_cgi(State(shared): State<Arc<GitShared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let offered = basic_token(&parts.headers);
    let token = offered.clone().filter(|t| shared.authority.is_current(t));
    let Some(token) = token else {
        match offered {
            Some(_) => *lock_ok(&shared.rejected) += 1,
            None => *lock_ok(&shared.anonymous) += 1,
        }
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"credd-test-git\"")],
            "authentication required\n",
        )
            .into_response();
    };
    {
        let mut accepted = lock_ok(&shared.accepted);
        if !accepted.contains(&token) {
            accepted.push(token);
        }
    }
    let body = match axum::body::to_bytes(body, 256 << 20).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let mut env: HashMap<&str, String> = HashMap::new();
    env.insert("GIT_PROJECT_ROOT", shared.root.display().to_string());
    env.insert("GIT_HTTP_EXPORT_ALL", "1".into());
    env.insert("REQUEST_METHOD", parts.method.to_string());
    env.insert("PATH_INFO", parts.uri.path().to_owned());
    env.insert("QUERY_STRING", parts.uri.query().unwrap_or("").to_owned());
    env.insert("REMOTE_USER", "x-access-token".into());
    env.insert("REMOTE_ADDR", "127.0.0.1".into());
    env.insert("CONTENT_LENGTH", body.len().to_string());
    for (name, var) in [
        (header::CONTENT_TYPE, "CONTENT_TYPE"),
        (header::CONTENT_ENCODING, "HTTP_CONTENT_ENCODING"),
    ] {
        if let Some(v) = parts.headers.get(name).and_then(|v| v.to_str().ok()) {
            env.insert(var, v.to_owned());
        }
    }
    if let Some(v) = parts
        .headers
        .get("git-protocol")
        .and_then(|v| v.to_str().ok())
    {
        env.insert("GIT_PROTOCOL", v.to_owned());
    }
    let output = async {
        let mut child = tokio::process::Command::new("git")
            .arg("http-backend")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", &shared.root)
            .envs(&env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped");
        let writer = async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&body).await;
        };
        let (_, output) = tokio::join!(writer, child.wait_with_output());
        output
    };
    let output = match tokio::time::timeout(WAIT, output).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("http-backend: {e}\n"),
            )
                .into_response();
        }
        Err(_) => {
            return (StatusCode::GATEWAY_TIMEOUT, "http-backend timed out\n").into_response();
        }
    };
    cgi_response(&output.stdout)
}

/// Turns CGI output (headers, blank line, body) into an HTTP response.
fn cgi_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| {
            raw.windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, i + 2))
        });
    let Some((head_end, body_start)) = split else {
        return (StatusCode::BAD_GATEWAY, "malformed CGI output\n").into_response();
    };
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut response = Response::new(Body::from(raw[body_start..].to_vec()));
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().and_then(|c| c.parse().ok());
            *response.status_mut() = code
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}
