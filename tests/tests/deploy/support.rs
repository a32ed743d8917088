//! What the deployment tests share: binaries, the dev-mode platform, child
//! processes with deadlines and file-captured output, and the secret scan.
//!
//! Output goes to files rather than pipes on purpose: the entrypoint leaves a
//! supervisor and a daemon running that inherit its stdout/stderr, so a pipe
//! would never reach EOF while they live.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The longest any single wait may take before the test fails. Generous: the
/// CI machine has two cores shared by parallel tests; a passing run never
/// waits this long.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// The repository root.
pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_owned()
}

/// `CARGO_TARGET_DIR/debug`, else the workspace's `target/debug`.
pub(crate) fn debug_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        _ => repo_root().join("target"),
    };
    target.join("debug")
}

/// A workspace binary from `target/debug`, failing clearly when absent.
pub(crate) fn binary(name: &str) -> PathBuf {
    let path = debug_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` first (these tests run the real binaries)",
        path.display()
    );
    path
}

/// Whether `program` is on PATH; tests needing a missing tool say so and skip.
pub(crate) fn have_tool(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Prints why a test does not run here, and returns (the caller returns).
pub(crate) fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

/// Strings that must never appear in any captured output.
#[derive(Clone, Default)]
pub(crate) struct Secrets(Arc<Mutex<Vec<String>>>);

impl Secrets {
    /// Adds one secret (the bearer, a bootstrap token).
    pub(crate) fn add(&self, secret: impl Into<String>) {
        let secret = secret.into();
        if !secret.is_empty() {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(secret);
        }
    }

    /// Fails the test if `text` (named `what`) holds a secret or anything
    /// token-shaped (`ghs_`: every dev token has that prefix).
    pub(crate) fn assert_clean(&self, what: &str, text: &str) {
        assert!(
            !has_token_shape(text),
            "{what} contains a token-shaped string (ghs_…)"
        );
        for secret in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            assert!(!text.contains(secret.as_str()), "{what} contains a secret");
        }
    }
}

/// Whether `text` holds `ghs_` followed by 8+ token characters (every dev
/// token has that shape; prose such as "ghs_ tokens" does not).
fn has_token_shape(text: &str) -> bool {
    text.match_indices("ghs_").any(|(at, _)| {
        text[at + 4..]
            .bytes()
            .take(8)
            .filter(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
            .count()
            == 8
    })
}

/// Hex SHA-256, as the test scripts compute it with `sha256sum`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    credd_core::secret::sha256_hex(bytes)
}

/// Runs `command` to completion with stdout/stderr in files under `dir`
/// (named after `name`), failing the test after [`WAIT`].
pub(crate) fn run_captured(name: &str, dir: &Path, command: &mut Command) -> Finished {
    let stdout = dir.join(format!("{name}.out"));
    let stderr = dir.join(format!("{name}.err"));
    let child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: cannot start: {e}"));
    let status = wait_with_deadline(name, child, WAIT);
    Finished {
        status,
        stdout: std::fs::read_to_string(&stdout).unwrap_or_default(),
        stderr: std::fs::read_to_string(&stderr).unwrap_or_default(),
    }
}

/// Waits for `child` on a helper thread; on timeout kills it and fails.
pub(crate) fn wait_with_deadline(name: &str, mut child: Child, timeout: Duration) -> ExitStatus {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(status) => status.unwrap_or_else(|e| panic!("{name}: wait failed: {e}")),
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            panic!("{name}: did not finish within {timeout:?}");
        }
    }
}

/// A finished process's exit status and output.
#[derive(Debug)]
pub(crate) struct Finished {
    /// How it exited.
    pub(crate) status: ExitStatus,
    /// Everything it wrote to stdout.
    pub(crate) stdout: String,
    /// Everything it wrote to stderr.
    pub(crate) stderr: String,
}

impl Finished {
    /// Both streams, for failure messages.
    pub(crate) fn transcript(&self) -> String {
        format!(
            "status: {}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// The value of the first stdout line `key=value`.
    pub(crate) fn value(&self, key: &str) -> String {
        let prefix = format!("{key}=");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no `{key}=` line in:\n{}", self.transcript()))
            .to_owned()
    }
}

/// Lines of text read from a pipe by a thread, waitable with a deadline.
#[derive(Clone, Default)]
pub(crate) struct Lines(Arc<(Mutex<LineState>, std::sync::Condvar)>);

/// Lines read so far, and whether the writer closed the pipe.
#[derive(Default)]
struct LineState(Vec<String>, bool);

impl Lines {
    /// Starts copying `pipe` line by line until EOF.
    pub(crate) fn spawn(pipe: impl Read + Send + 'static) -> Self {
        let lines = Self::default();
        let shared = Arc::clone(&lines.0);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            loop {
                let mut line = String::new();
                let n = reader.read_line(&mut line).unwrap_or(0);
                let (lock, cv) = &*shared;
                let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
                if n == 0 {
                    state.1 = true;
                    cv.notify_all();
                    return;
                }
                state.0.push(line.trim_end_matches('\n').to_owned());
                cv.notify_all();
            }
        });
        lines
    }

    /// Everything read so far.
    pub(crate) fn text(&self) -> String {
        let state = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        state.0.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Blocks until a line contains `needle`; fails after [`WAIT`] or at EOF.
    pub(crate) fn wait_for(&self, what: &str, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let (lock, cv) = &*self.0;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(line) = state.0.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let now = Instant::now();
            assert!(
                !state.1 && now < deadline,
                "{what}: no line containing {needle:?} ({}); output:\n{}",
                if state.1 {
                    "stream closed"
                } else {
                    "timed out"
                },
                state.0.join("\n")
            );
            state = cv
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Blocks until the stream is closed (the process exited), bounded by [`WAIT`].
    pub(crate) fn wait_closed(&self, what: &str) {
        let deadline = Instant::now() + WAIT;
        let (lock, cv) = &*self.0;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !state.1 {
            let now = Instant::now();
            assert!(now < deadline, "{what}: still open after {WAIT:?}");
            state = cv
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// `molecule-platform --dev` on a loopback port, writing its bearer into
/// `CONFIGS_DIR/.auth_token`. Killed on drop.
pub(crate) struct Platform {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub(crate) url: String,
    /// The folder holding `.auth_token`.
    pub(crate) configs_dir: PathBuf,
    stdout: Lines,
    stderr: Lines,
    secrets: Secrets,
}

impl Platform {
    /// Starts the dev platform minting tokens that live `ttl` (humantime).
    pub(crate) fn start(configs_dir: &Path, ttl: &str, secrets: &Secrets) -> Self {
        std::fs::create_dir_all(configs_dir).expect("configs dir");
        let mut child = Command::new(binary("molecule-platform"))
            .args(["--dev", "--listen", "127.0.0.1:0", "--dev-token-ttl", ttl])
            .arg("--dev-auth-token-file")
            .arg(configs_dir.join(".auth_token"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start molecule-platform");
        let stdout = Lines::spawn(child.stdout.take().expect("stdout"));
        let stderr = Lines::spawn(child.stderr.take().expect("stderr"));
        let first = stdout.wait_for("molecule-platform", "listening on http://");
        let url = first
            .rsplit_once(' ')
            .map(|(_, url)| url.to_owned())
            .expect("listening line ends with the URL");
        let bearer = std::fs::read_to_string(configs_dir.join(".auth_token"))
            .expect("the dev platform wrote its bearer");
        secrets.add(bearer.trim());
        Self {
            child,
            url,
            configs_dir: configs_dir.to_owned(),
            stdout,
            stderr,
            secrets: secrets.clone(),
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            self.secrets
                .assert_clean("platform stdout", &self.stdout.text());
            self.secrets
                .assert_clean("platform stderr", &self.stderr.text());
        }
    }
}

/// Sends `signal` to `pid`, ignoring "no such process".
pub(crate) fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Whether `pid` is a live (non-zombie) process.
pub(crate) fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Live processes whose environment has `key=value` and, when `exe` is
/// given, whose executable it is (how the tests find "their" daemons and
/// supervisors among parallel tests).
pub(crate) fn processes_with(exe: Option<&Path>, key: &str, value: &OsStr) -> Vec<u32> {
    use std::os::unix::ffi::OsStrExt;
    let mut wanted = format!("{key}=").into_bytes();
    wanted.extend_from_slice(value.as_bytes());
    let exe = exe.map(|exe| std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_owned()));
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            exe.as_ref().is_none_or(|exe| {
                std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| &p == exe)
            }) && std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == wanted))
                && is_alive(pid)
        })
        .collect()
}

/// Polls `check` until it returns `Some`, failing with `what` after [`WAIT`].
///
/// For conditions nothing signals (another process's pid file, a socket
/// answering); each attempt is a real check, the pause only spaces them.
pub(crate) fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Makes `path` and its parents up to `/` traversable by other users (the
/// privilege-drop test's agent must reach files in a root-owned temp dir).
pub(crate) fn open_for_others(path: &Path) {
    let mut perms = std::fs::metadata(path).expect("metadata").permissions();
    perms.set_mode(perms.mode() | 0o755);
    std::fs::set_permissions(path, perms).expect("chmod");
}
