//! The platform side: the real `molecule-platform` binary, in GitHub mode
//! against the `github-stand-in` process (or in `--dev` mode), and what its
//! own log says it served.
//!
//! Every workspace has a bearer of its own in the platform's workspace
//! tokens file, so each daemon asks on its own route as itself. The platform
//! logs one JSON line per token served (`token served to workspace ID
//! (fingerprint F, …)`, at debug level, never the token); each line is
//! timestamped by the driver as it is read from the platform's stderr pipe,
//! which is the platform-side request timeline. In GitHub mode the stand-in's
//! record (`GET /_stand-in/record`, counts and scopes only) says how many
//! tokens were minted for which installation.
//!
//! With `--replicas N` (N > 1, GitHub mode) the platform is the replicated
//! deployment: N real `molecule-platform` processes sharing one real
//! `redis-server` (`PLATFORM_REDIS_URL`, a fresh sealing key), behind a real
//! HAProxy balancing round robin; the daemons know only HAProxy's URL. Every
//! replica's log feeds the one timeline, so calls and mints are counted for
//! the whole fleet.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use testkit::process::signal;
use testkit::{Secrets, lock};

use crate::Options;
use crate::daemons::Workspace;

/// How long a process may take to print its start-up line.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long the platform and the stand-in may take to exit on SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// Connect, read and write timeout of the calls to the stand-in.
const STAND_IN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read from the stand-in's inspection routes.
const MAX_STAND_IN_ANSWER: u64 = 4 << 20;
/// The platform's log line for a token it served to a workspace.
const SERVED_PREFIX: &str = "token served to workspace ";
/// The platform's start-up line, before its URL.
const LISTENING_PREFIX: &str = "molecule-platform listening on ";
/// The stand-in's start-up line, before its URL.
const STAND_IN_PREFIX: &str = "github-stand-in listening on ";
/// What the platform is told to log: info, plus each token served.
const PLATFORM_LOG_FILTER: &str = "info,molecule_platform::service=debug";

/// Where the platform's tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A GitHub App, against the `github-stand-in` process.
    GitHub,
    /// `--dev`: the platform mints fake tokens itself.
    Dev,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::GitHub => "github",
            Self::Dev => "dev",
        }
    }
}

/// One token the platform served to a workspace.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    /// Since the rollout began.
    pub(crate) at: Duration,
    pub(crate) workspace: String,
    /// The platform's fingerprint of the token (tells tokens apart).
    pub(crate) fingerprint: String,
}

#[derive(Default)]
struct LogState {
    origin: Option<Instant>,
    lines: Vec<String>,
    served: Vec<Served>,
    failures: Vec<String>,
}

/// The platform's stderr, as read so far.
#[derive(Clone, Default)]
pub(crate) struct PlatformLog(Arc<Mutex<LogState>>);

impl PlatformLog {
    /// Times are counted from `origin` (the rollout) from now on.
    pub(crate) fn set_origin(&self, origin: Instant) {
        lock(&self.0).origin = Some(origin);
    }

    pub(crate) fn served(&self) -> Vec<Served> {
        lock(&self.0).served.clone()
    }

    /// Warnings and errors the platform logged (refusals, failed mints).
    pub(crate) fn failures(&self) -> Vec<String> {
        lock(&self.0).failures.clone()
    }

    /// How many distinct workspaces were served at least once.
    pub(crate) fn workspaces_served(&self) -> usize {
        let state = lock(&self.0);
        let mut seen: Vec<&str> = state.served.iter().map(|s| s.workspace.as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }

    /// The last `n` lines.
    pub(crate) fn tail(&self, n: usize) -> String {
        let state = lock(&self.0);
        let from = state.lines.len().saturating_sub(n);
        state.lines[from..].join("\n")
    }

    fn text(&self) -> String {
        lock(&self.0).lines.join("\n")
    }

    fn record(&self, line: String) {
        let now = Instant::now();
        let mut state = lock(&self.0);
        let at = state
            .origin
            .map_or(Duration::ZERO, |o| now.saturating_duration_since(o));
        if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) {
            let level = entry["level"].as_str().unwrap_or("");
            let message = entry["fields"]["message"].as_str().unwrap_or("");
            if let Some(rest) = message.strip_prefix(SERVED_PREFIX) {
                let workspace = rest.split(' ').next().unwrap_or("").to_owned();
                let fingerprint = rest
                    .split("(fingerprint ")
                    .nth(1)
                    .and_then(|f| f.split([',', ')']).next())
                    .unwrap_or("")
                    .to_owned();
                state.served.push(Served {
                    at,
                    workspace,
                    fingerprint,
                });
            } else if matches!(level, "WARN" | "ERROR") {
                state.failures.push(message.to_owned());
            }
        }
        state.lines.push(line);
    }
}

/// Reads `reader` line by line on a thread of its own, sending each line.
fn lines_of(reader: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for the line starting with `prefix` on `lines`; the rest of it.
fn start_line(lines: &mpsc::Receiver<String>, prefix: &str, what: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Ok(rest.to_owned());
                }
            }
            Err(_) => bail!("{what} printed no start-up line within {START_DEADLINE:?}"),
        }
    }
}

/// Keeps reading `stdout` so the process never blocks on a full pipe.
fn drain(lines: mpsc::Receiver<String>) {
    std::thread::spawn(move || for _ in lines {});
}

fn stop_child(child: &mut Child) {
    signal(child.id(), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_DEADLINE;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        // Our child, but std has no wait with a timeout.
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The GitHub stand-in process.
struct StandIn {
    child: Child,
    /// `127.0.0.1:PORT`.
    addr: String,
}

impl StandIn {
    /// A tiny HTTP/1.1 exchange with the stand-in: its status and body.
    fn call(&self, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
        let addr = self.addr.parse().context("the stand-in's address")?;
        let mut stream = TcpStream::connect_timeout(&addr, STAND_IN_TIMEOUT)
            .context("cannot reach the GitHub stand-in")?;
        stream.set_read_timeout(Some(STAND_IN_TIMEOUT))?;
        stream.set_write_timeout(Some(STAND_IN_TIMEOUT))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )?;
        let mut answer = String::new();
        stream
            .take(MAX_STAND_IN_ANSWER)
            .read_to_string(&mut answer)
            .context("cannot read the stand-in's answer")?;
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("the stand-in's answer has no status line")?;
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }
}

/// What the stand-in minted.
#[derive(Debug, Clone)]
pub(crate) struct Mints {
    /// Mints per installation id.
    pub(crate) per_installation: BTreeMap<u64, usize>,
    /// Requests the stand-in rejected (bad JWTs and the like).
    pub(crate) rejections: usize,
}

/// The platform processes (one, or the replicas), their one log, the
/// stand-in behind them and, replicated, Redis and the load balancer.
pub(crate) struct Platform {
    children: Mutex<Vec<Child>>,
    stand_in: Mutex<Option<StandIn>>,
    url: String,
    log: PlatformLog,
    stderr_readers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Replicated: HAProxy in front, then Redis (stopped in that order,
    /// after the replicas).
    shared: Mutex<Option<(testkit::HaProxy, testkit::RedisServer)>>,
}

impl Platform {
    pub(crate) fn start(
        dir: &Path,
        bin_dir: &Path,
        options: &Options,
        workspaces: &[Workspace],
    ) -> anyhow::Result<Self> {
        let tokens_file = dir.join("workspace-tokens");
        let lines: String = workspaces
            .iter()
            .map(|w| format!("{} {}\n", w.id, testkit::sha256_hex(&w.bearer)))
            .collect();
        testkit::write_file(&tokens_file, &lines, 0o600);

        let ttl = options.token_ttl.as_secs();
        let mut command = Command::new(bin_dir.join("molecule-platform"));
        command
            .args(["--listen", "127.0.0.1:0"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", PLATFORM_LOG_FILTER)
            .env("PLATFORM_WORKSPACE_TOKENS_FILE", &tokens_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let stand_in = match options.mode {
            Mode::Dev => {
                command.args(["--dev", "--dev-token-ttl", &format!("{ttl}s")]);
                None
            }
            Mode::GitHub => {
                let (stand_in, keys, app_id, installation) = start_stand_in(dir, bin_dir)?;
                let (status, body) = stand_in.call(
                    "PUT",
                    "/_stand-in/mode",
                    &format!(r#"{{"issue_secs":{ttl}}}"#),
                )?;
                if !(200..300).contains(&status) {
                    bail!("the stand-in refused to issue {ttl}s tokens: HTTP {status} {body}");
                }
                command
                    .env("GITHUB_APP_ID", app_id)
                    .env("GITHUB_APP_INSTALLATION_ID", installation)
                    .env("GITHUB_APP_PRIVATE_KEY_FILE", keys.join("app.pem"))
                    .env("GITHUB_API_URL", format!("http://{}", stand_in.addr));
                Some(stand_in)
            }
        };
        let mut platform = Self {
            children: Mutex::new(Vec::new()),
            stand_in: Mutex::new(stand_in),
            url: String::new(),
            log: PlatformLog::default(),
            stderr_readers: Mutex::new(Vec::new()),
            shared: Mutex::new(None),
        };
        let mut redis = None;
        if options.replicas > 1 {
            let server = testkit::RedisServer::start();
            let key_file = dir.join("cache.key");
            let key: String = (0..32)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            testkit::write_file(&key_file, &key, 0o600);
            command
                .env("PLATFORM_REDIS_URL", server.url())
                .env("PLATFORM_CACHE_KEY_FILE", &key_file);
            redis = Some(server);
        }
        let mut urls = Vec::new();
        for replica in 0..options.replicas {
            match platform.spawn(&mut command) {
                Ok(url) => urls.push(url),
                Err(error) => {
                    platform.stop();
                    return Err(error.context(format!(
                        "replica {replica} of {}; the log:\n{}",
                        options.replicas,
                        platform.log.tail(20)
                    )));
                }
            }
        }
        platform.url = match redis {
            None => urls.swap_remove(0),
            Some(redis) => {
                let backends: Vec<String> = urls
                    .iter()
                    .map(|u| u.trim_start_matches("http://").to_owned())
                    .collect();
                let balancer = testkit::HaProxy::start(&backends);
                let url = balancer.url();
                *lock(&platform.shared) = Some((balancer, redis));
                url
            }
        };
        Ok(platform)
    }

    /// Starts one platform process from `command`, its stderr feeding the
    /// log; its URL.
    fn spawn(&self, command: &mut Command) -> anyhow::Result<String> {
        let mut child = command.spawn().context("cannot start molecule-platform")?;
        let stdout = lines_of(child.stdout.take().context("stdout")?);
        let stderr = lines_of(child.stderr.take().context("stderr")?);
        let log = self.log.clone();
        lock(&self.stderr_readers).push(std::thread::spawn(move || {
            for line in stderr {
                log.record(line);
            }
        }));
        lock(&self.children).push(child);
        let url = start_line(&stdout, LISTENING_PREFIX, "molecule-platform")?;
        drain(stdout);
        Ok(url)
    }

    pub(crate) fn url(&self) -> String {
        self.url.clone()
    }

    pub(crate) fn log(&self) -> &PlatformLog {
        &self.log
    }

    /// The stand-in's mint record (GitHub mode), `None` in dev mode.
    pub(crate) fn mints(&self) -> anyhow::Result<Option<Mints>> {
        let guard = lock(&self.stand_in);
        let Some(stand_in) = guard.as_ref() else {
            return Ok(None);
        };
        let (status, body) = stand_in.call("GET", "/_stand-in/record", "")?;
        if status != 200 {
            bail!("the stand-in's record: HTTP {status}");
        }
        let record: serde_json::Value =
            serde_json::from_str(&body).context("the stand-in's record is not JSON")?;
        let mut per_installation = BTreeMap::new();
        for mint in record["mints"].as_array().context("record without mints")? {
            let id = mint["installation"]
                .as_u64()
                .context("a mint without installation")?;
            *per_installation.entry(id).or_insert(0) += 1;
        }
        Ok(Some(Mints {
            per_installation,
            // Refused JWTs, and requests GitHub's description refuses or
            // that came during a rate limit: none may happen.
            rejections: record["rejections"].as_array().map_or(0, Vec::len)
                + record["violations"].as_array().map_or(0, Vec::len),
        }))
    }

    /// The secrets no log may hold: every workspace's bearer (tokens are
    /// caught by their `ghs_` shape).
    pub(crate) fn secrets(&self, workspaces: &[Workspace]) -> Secrets {
        let secrets = Secrets::new();
        for w in workspaces {
            secrets.add("a workspace bearer", &w.bearer);
        }
        secrets
    }

    /// Stops the platform and the stand-in; everything the platform logged.
    pub(crate) fn stop(&self) -> String {
        let shared = lock(&self.shared).take();
        let (balancer, redis) = shared.unzip();
        drop(balancer);
        for mut child in std::mem::take(&mut *lock(&self.children)) {
            stop_child(&mut child);
        }
        drop(redis);
        for reader in std::mem::take(&mut *lock(&self.stderr_readers)) {
            let _ = reader.join();
        }
        if let Some(mut stand_in) = lock(&self.stand_in).take() {
            stop_child(&mut stand_in.child);
        }
        self.log.text()
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `github-stand-in` with its keys in `dir/github-keys`; it, the
/// keys folder, the App id and the installation id it printed.
fn start_stand_in(
    dir: &Path,
    bin_dir: &Path,
) -> anyhow::Result<(StandIn, PathBuf, String, String)> {
    let keys = dir.join("github-keys");
    let mut child = Command::new(bin_dir.join("github-stand-in"))
        .args(["--listen", "127.0.0.1:0", "--keys-dir"])
        .arg(&keys)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start github-stand-in")?;
    let stdout: ChildStdout = child.stdout.take().context("stdout")?;
    let lines = lines_of(stdout);
    let line = match start_line(&lines, STAND_IN_PREFIX, "github-stand-in") {
        Ok(line) => line,
        Err(error) => {
            stop_child(&mut child);
            return Err(error);
        }
    };
    drain(lines);
    // `http://127.0.0.1:PORT keys DIR app-id N installation M`
    let words: Vec<&str> = line.split(' ').collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .map(|w| (*w).to_owned())
    };
    let (Some(addr), Some(app_id), Some(installation)) = (
        words
            .first()
            .and_then(|u| u.strip_prefix("http://"))
            .map(str::to_owned),
        after("app-id"),
        after("installation"),
    ) else {
        stop_child(&mut child);
        bail!("unexpected github-stand-in start-up line: {line}");
    };
    Ok((StandIn { child, addr }, keys, app_id, installation))
}
