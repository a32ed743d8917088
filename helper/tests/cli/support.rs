//! What the `credd` tests add to the workspace's `testkit`: a daemon
//! stand-in speaking the real wire protocol, and `credd` runs in a sandbox.
//!
//! - [`FakeDaemon`]: a `UnixListener` on a real socket that decodes each
//!   request with `credd_core::protocol` and answers as told (a token, an
//!   error, garbage, or nothing at all), recording what it was asked.
//! - [`credd_sandbox`]: a `testkit::Sandbox` with the socket's private folder in
//!   place and the fake daemon's token registered as a secret; [`Credd::run`]
//!   runs `credd` in it. The platform is `testkit::TestPlatform`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use credd_core::protocol::{self, Request, Response};
use testkit::{CmdOutput, Sandbox, TestPlatform};

/// Token the fake daemon serves.
pub(crate) const DAEMON_TOKEN: &str = "ghs_fromDaemon0123456789abcdefABCDEF";
/// Expiry the fake daemon states.
pub(crate) const DAEMON_EXPIRY: u64 = 1_900_000_000;

/// A sandbox for `credd`: its socket folder exists (private, as the daemon
/// makes it), and the fake daemon's token is a secret there.
pub(crate) fn credd_sandbox() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.create_run_dir(0o700);
    sandbox.add_secret("the fake daemon's token", DAEMON_TOKEN);
    sandbox
}

/// A [`credd_sandbox`] using `platform` (the platform drops first).
pub(crate) fn credd_sandbox_with(platform: TestPlatform) -> (Sandbox, TestPlatform) {
    let sandbox = credd_sandbox();
    sandbox.use_platform(&platform);
    (sandbox, platform)
}

/// `credd` runs in a [`Sandbox`].
pub(crate) trait Credd {
    /// Runs `credd ARGS` with `stdin`, to completion (stdout may hold a
    /// token: it stays out of the secret scan; stderr is scanned).
    fn run(&self, args: &[&str], stdin: &str) -> CmdOutput;
}

impl Credd for Sandbox {
    fn run(&self, args: &[&str], stdin: &str) -> CmdOutput {
        self.credd(args).stdin(stdin).stdout_holds_secret().run()
    }
}

/// What git reads from `credd get` for `token` expiring at `expiry`.
pub(crate) fn expected_answer(token: &str, expiry: u64) -> String {
    format!("username=x-access-token\npassword={token}\npassword_expiry_utc={expiry}\n")
}

/// Asserts `run` printed exactly git's answer with the platform's latest
/// token. Its expiry is this machine's clock plus the life the platform
/// stated against its `Date` header (whole seconds), so it is the stated
/// expiry or the second after it.
#[track_caller]
pub(crate) fn assert_platform_answer(run: &CmdOutput, platform: &TestPlatform) {
    let issued = platform.issued();
    let issued = issued.last().expect("the platform issued a token");
    let stated = issued.expires_at_secs();
    assert!(
        [stated, stated + 1]
            .iter()
            .any(|&expiry| run.stdout == expected_answer(&issued.token, expiry)),
        "expected the platform's token expiring at {stated} (or a second later): {run:?}"
    );
}

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
                Request::Get { .. } => Response::Token {
                    token: credd_core::secret::Token::new(DAEMON_TOKEN.into()).expect("valid"),
                    expires_at: DAEMON_EXPIRY,
                    source: protocol::Source::Platform,
                    scope: protocol::Scope::default(),
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
                testkit::lock(&seen).push(request);
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
        testkit::lock(&self.requests).clone()
    }

    /// Connections accepted so far.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Keeps a connection to `path` pending so the listener's backlog is full.
pub(crate) fn fill_backlog(path: &Path) -> UnixStream {
    UnixStream::connect(path).expect("first connection fits the backlog")
}
