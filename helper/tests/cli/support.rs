//! Test doubles speaking the real wire protocols, and a sandbox to run `credd` in.
//!
//! - [`FakeDaemon`]: a `UnixListener` on a real socket that decodes each
//!   request with `credd_core::protocol` and answers as told (a token, an
//!   error, garbage, or nothing at all), recording what it was asked.
//! - [`FakePlatform`]: an HTTP/1.1 server on 127.0.0.1 that checks the bearer
//!   and answers the token endpoint as told, counting requests.
//! - [`Sandbox`]: a temp folder with `configs/.auth_token`, the socket path,
//!   and the environment `credd` runs with; [`Run`] is one finished `credd`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use credd_core::protocol::{self, Request, Response};

/// Bearer the sandbox writes to `.auth_token`; must never appear in output.
pub(crate) const BEARER: &str = "molecule-bearer-8c1f0f2d6a7e4b39";
/// Token the fake daemon serves.
pub(crate) const DAEMON_TOKEN: &str = "ghs_fromDaemon0123456789abcdefABCDEF";
/// Token the fake platform serves.
pub(crate) const PLATFORM_TOKEN: &str = "ghs_fromPlatform0123456789abcdefABCD";
/// Expiry the fake daemon states.
pub(crate) const DAEMON_EXPIRY: u64 = 1_900_000_000;

/// What the fake daemon does with one connection.
pub(crate) enum Reply {
    /// Send this line.
    Line(Vec<u8>),
    /// Keep the connection open and never answer.
    Silence,
}

type Answerer = dyn Fn(&Request) -> Reply + Send + Sync;

/// A daemon stand-in on a real Unix socket.
pub(crate) struct FakeDaemon {
    requests: Arc<Mutex<Vec<Request>>>,
    connections: Arc<AtomicUsize>,
}

impl FakeDaemon {
    /// Listens on `path`; `answer` decides each reply.
    pub(crate) fn start(
        path: &Path,
        answer: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = UnixListener::bind(path).expect("bind fake daemon socket");
        Self::serve(listener, Arc::new(answer))
    }

    /// Answers every request with `response`.
    pub(crate) fn answering(path: &Path, response: Response) -> Self {
        let line = protocol::encode(&response);
        Self::start(path, move |_| Reply::Line(line.clone()))
    }

    /// Answers a `get` with [`DAEMON_TOKEN`], anything else with `erased`.
    pub(crate) fn with_token(path: &Path) -> Self {
        Self::start(path, |request| {
            Reply::Line(protocol::encode(&match request {
                Request::Get => Response::Token {
                    token: credd_core::secret::Token::new(DAEMON_TOKEN.into()).expect("valid"),
                    expires_at: DAEMON_EXPIRY,
                    source: protocol::Source::Platform,
                },
                Request::Erase { .. } => Response::Erased { dropped: true },
                Request::Status => Response::Error {
                    code: protocol::ErrorCode::BadRequest,
                    message: "not in this test".into(),
                },
            }))
        })
    }

    fn serve(listener: UnixListener, answer: Arc<Answerer>) -> Self {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen, count) = (Arc::clone(&requests), Arc::clone(&connections));
        std::thread::spawn(move || {
            // Silent connections are kept here so they stay open.
            let mut held = Vec::new();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                count.fetch_add(1, Ordering::SeqCst);
                let mut line = Vec::new();
                let read = BufReader::new(&stream)
                    .take(protocol::MAX_LINE as u64)
                    .read_until(b'\n', &mut line);
                if read.is_err() {
                    continue;
                }
                let request: Request = match protocol::decode(&line) {
                    Ok(request) => request,
                    Err(e) => panic!("credd sent a malformed request: {e}"),
                };
                let reply = answer(&request);
                seen.lock().expect("lock").push(request);
                match reply {
                    Reply::Line(bytes) => {
                        let _ = stream.write_all(&bytes);
                    }
                    Reply::Silence => held.push(stream),
                }
            }
        });
        Self {
            requests,
            connections,
        }
    }

    /// Requests received so far, in order.
    pub(crate) fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }

    /// Connections accepted so far.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// How the fake platform answers.
#[derive(Clone, Copy)]
pub(crate) enum PlatformMode {
    /// 200 with [`PLATFORM_TOKEN`], expiring in an hour.
    Token,
    /// This status with a JSON error body.
    Fail(u16),
}

/// The platform's token endpoint on 127.0.0.1, speaking HTTP/1.1.
pub(crate) struct FakePlatform {
    /// `http://127.0.0.1:PORT`.
    pub(crate) url: String,
    requests: Arc<AtomicUsize>,
    /// The expiry it states, Unix seconds.
    pub(crate) expires_at: u64,
}

impl FakePlatform {
    /// Starts answering in `mode`.
    pub(crate) fn start(mode: PlatformMode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake platform");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let requests = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&requests);
        let expires = SystemTime::now() + Duration::from_secs(3600);
        let expires_at = expires
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs();
        let expires_text = humantime::format_rfc3339_seconds(expires).to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                count.fetch_add(1, Ordering::SeqCst);
                answer_http(stream, mode, &expires_text);
            }
        });
        Self {
            url,
            requests,
            expires_at,
        }
    }

    /// HTTP requests received so far.
    pub(crate) fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn answer_http(stream: std::net::TcpStream, mode: PlatformMode, expires: &str) {
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    let mut authorized = false;
    let mut path_ok = false;
    for n in 0..100 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if n == 0 {
            path_ok = line.starts_with("GET /admin/github-installation-token ");
            request_line = line;
            continue;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
            && value.trim() == format!("Bearer {BEARER}")
        {
            authorized = true;
        }
    }
    let (status, body) = match mode {
        _ if !path_ok => (
            404,
            format!("{{\"error\":\"no route {}\"}}", request_line.trim()),
        ),
        _ if !authorized => (401, "{\"error\":\"bad bearer\"}".to_owned()),
        PlatformMode::Token => (
            200,
            format!("{{\"expires_at\": \"{expires}\", \"token\": \"{PLATFORM_TOKEN}\"}}"),
        ),
        PlatformMode::Fail(code) => (code, "{\"error\":\"token refresh failed\"}".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = (&stream).write_all(response.as_bytes());
}

/// A temp folder holding the bearer and the socket path, and `credd`'s environment.
pub(crate) struct Sandbox {
    dir: tempfile::TempDir,
    platform_url: String,
    hosts: String,
}

impl Sandbox {
    /// A sandbox whose platform URL points nowhere (port 9 on loopback is closed).
    pub(crate) fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("credd-cli-")
            .tempdir()
            .expect("temp dir");
        // The socket's folder: credd talks only to a socket in a private one.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod sandbox");
        std::fs::create_dir(dir.path().join("configs")).expect("configs dir");
        std::fs::write(
            dir.path().join("configs/.auth_token"),
            format!("{BEARER}\n"),
        )
        .expect("write bearer");
        std::fs::create_dir(dir.path().join("home")).expect("home dir");
        Self {
            dir,
            platform_url: "http://127.0.0.1:9".into(),
            hosts: "github.com".into(),
        }
    }

    /// Points the platform URL at `platform`.
    pub(crate) fn use_platform(&mut self, platform: &FakePlatform) {
        self.platform_url.clone_from(&platform.url);
    }

    /// Sets `CREDD_HOSTS`.
    pub(crate) fn set_hosts(&mut self, hosts: &str) {
        hosts.clone_into(&mut self.hosts);
    }

    /// The sandbox folder.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `CREDD_SOCKET`.
    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.path().join("credd.sock")
    }

    /// `credd ARGS` with the sandbox environment only.
    pub(crate) fn credd(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_credd"));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path().join("home"))
            .env("CREDD_SOCKET", self.socket())
            .env("CONFIGS_DIR", self.dir.path().join("configs"))
            .env("PLATFORM_URL", &self.platform_url)
            .env("CREDD_HOSTS", &self.hosts)
            .current_dir(self.dir.path());
        command
    }

    /// Runs `credd ARGS` with `stdin`, to completion.
    pub(crate) fn run(&self, args: &[&str], stdin: &str) -> Run {
        run(self.credd(args), stdin)
    }

    /// `credd get` for `protocol://host`.
    pub(crate) fn get(&self, protocol: &str, host: &str) -> Run {
        self.run(&["get"], &format!("protocol={protocol}\nhost={host}\n\n"))
    }
}

/// A finished process.
#[derive(Debug)]
pub(crate) struct Run {
    /// Exit code (`None` if killed by a signal).
    pub(crate) code: Option<i32>,
    /// Everything on stdout.
    pub(crate) stdout: String,
    /// Everything on stderr.
    pub(crate) stderr: String,
}

impl Run {
    /// The `credd: ` lines on stderr.
    pub(crate) fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }

    /// Panics if stderr holds a token or the bearer: stderr is never a place for them.
    pub(crate) fn assert_stderr_clean(&self) {
        for secret in [BEARER, DAEMON_TOKEN, PLATFORM_TOKEN, "ghs_", "Bearer"] {
            assert!(
                !self.stderr.contains(secret),
                "stderr contains {secret:?}:\n{}",
                self.stderr
            );
        }
    }
}

/// Runs `command` feeding it `stdin`, capturing both outputs.
pub(crate) fn run(mut command: Command, stdin: &str) -> Run {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start credd");
    let mut pipe = child.stdin.take().expect("stdin pipe");
    // credd may exit before reading everything (e.g. `store`): ignore EPIPE.
    let _ = pipe.write_all(stdin.as_bytes());
    drop(pipe);
    let output = child.wait_with_output().expect("wait for credd");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    }
}

/// Keeps a connection to `path` pending so the listener's backlog is full.
pub(crate) fn fill_backlog(path: &Path) -> UnixStream {
    UnixStream::connect(path).expect("first connection fits the backlog")
}
