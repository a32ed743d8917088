//! The fallback chain behind `get`, `token` and `exec`: daemon, then — only
//! when the daemon is absent — the platform directly, then nothing.
//!
//! The platform is asked through `molecule-credd --fetch-once`, found next to
//! this executable (else on `PATH`): the one platform client lives in the
//! daemon's binary, and credd stays std-only. Linking the HTTP and TLS stack
//! into credd would cost every git operation about a third of a millisecond of
//! start-up (an 8 MB static binary relocating itself) for a path taken only
//! when the daemon is down.
//!
//! Each step that fails writes one `credd: ` line to stderr so a person can see
//! why git fell through to its next helper; none of them contains a secret
//! (daemon messages are secret-free by contract, platform errors are built
//! without the token, bearer or body by the daemon's platform client).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use credd_core::config::HelperConfig;
use credd_core::protocol::{self, ErrorCode, MAX_LINE, Request, Response};
use credd_core::repository::RepositoryRef;
use credd_core::secret::Token;
use zeroize::Zeroizing;

use crate::daemon::{self, DaemonError};

/// A token and its expiry (Unix seconds, git's `password_expiry_utc`).
pub(crate) struct Issued {
    /// The token.
    pub(crate) token: Token,
    /// When it expires.
    pub(crate) expires_at: u64,
}

/// Which token to obtain: for a repository, for an account, or (neither)
/// the workspace's default one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TokenFor {
    /// The repository (`--repo`, git's `path`).
    pub(crate) repository: Option<RepositoryRef>,
    /// The account (`--owner`).
    pub(crate) owner: Option<String>,
}

impl TokenFor {
    fn request(&self) -> Request {
        Request::Get {
            repository: self.repository.as_ref().map(ToString::to_string),
            owner: self.owner.clone(),
        }
    }

    /// `molecule-credd --fetch-once`'s arguments for the same token.
    fn fetch_once_args(&self) -> Vec<String> {
        match (&self.repository, &self.owner) {
            (Some(repository), _) => vec!["--repo".into(), repository.to_string()],
            (None, Some(owner)) => vec!["--owner".into(), owner.clone()],
            (None, None) => Vec::new(),
        }
    }
}

/// How [`obtain_token`] reports the steps it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    /// `get`: a line as each step fails, before the next one starts (git's
    /// user sees why a fetch pauses while the platform is asked).
    EachStep,
    /// `token`/`exec`: their contract is one line of reason, so the steps are
    /// joined into the error; a successful fallback still gets its line.
    OneLine,
}

/// Asks the daemon, then the platform if the daemon is unreachable or
/// unintelligible. `Err` is the reason, for the caller to print after `credd: `
/// (with [`Progress::EachStep`], only the last step's; earlier ones are out).
pub(crate) fn obtain_token(
    config: &HelperConfig,
    progress: Progress,
    want: &TokenFor,
) -> Result<Issued, String> {
    let endpoint = daemon::Endpoint::from_config(config);
    let failure = match daemon::round_trip(&endpoint, &want.request()) {
        Ok(Response::Token {
            token, expires_at, ..
        }) => return Ok(Issued { token, expires_at }),
        Ok(_) => DaemonError::Unintelligible("it answered something other than a token".into()),
        Err(e) => e,
    };
    let described = failure.describe(&config.socket_path);
    if !failure.allows_platform_fallback() {
        return Err(described);
    }
    if progress == Progress::EachStep {
        eprintln!("credd: {described}; asking the platform directly");
    }
    match fetch_from_platform(want) {
        Ok(issued) => {
            if progress == Progress::OneLine {
                eprintln!("credd: {described}; got a token from the platform directly");
            }
            Ok(issued)
        }
        Err(e) => {
            let platform = format!("the platform gave no token either: {e}");
            Err(match progress {
                Progress::EachStep => platform,
                Progress::OneLine => format!("{described}; {platform}"),
            })
        }
    }
}

/// The daemon's binary, whose `--fetch-once` makes the platform call.
const DAEMON_BINARY: &str = "molecule-credd";

/// How long `credd` waits for `molecule-credd --fetch-once` before killing
/// it. That process bounds itself (2 s for the bearer file, 8 s for the HTTP
/// call); this is the hard stop for when it cannot (a stalled filesystem
/// under its executable, a wedged process), so git is never held longer.
pub(crate) const FETCH_ONCE_DEADLINE: Duration = credd_core::deadlines::HELPER_FETCH_ONCE;

/// One platform call through `molecule-credd --fetch-once`, which inherits
/// this process's environment (the same configuration). Its answer is one
/// protocol line, read with the protocol's cap within [`FETCH_ONCE_DEADLINE`];
/// the child is killed and reaped whatever happens.
fn fetch_from_platform(want: &TokenFor) -> Result<Issued, String> {
    let beside_us = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name(DAEMON_BINARY))
        .filter(|path| path.is_file());
    let program = beside_us.map_or_else(|| DAEMON_BINARY.into(), PathBuf::into_os_string);
    let mut child = Command::new(&program)
        .arg("--fetch-once")
        .args(want.fetch_once_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot run {} --fetch-once ({e}); install it next to credd",
                Path::new(&program).display()
            )
        })?;
    let (done, answer) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        // A reader thread, so the wait below has a deadline with std alone.
        let _ = std::thread::Builder::new().spawn(move || {
            let mut line = Zeroizing::new(Vec::new());
            let read = out.take(MAX_LINE as u64 + 1).read_to_end(&mut line);
            let _ = done.send(read.map(|_| line));
        });
    }
    let received = answer.recv_timeout(FETCH_ONCE_DEADLINE);
    // Done with it either way; killing an exited child is harmless.
    let _ = child.kill();
    let _ = child.wait();
    let line = match received {
        Ok(Ok(line)) => line,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            return Err(format!(
                "{DAEMON_BINARY} --fetch-once gave no answer within {} s; killed it",
                FETCH_ONCE_DEADLINE.as_secs()
            ));
        }
        Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => Zeroizing::new(Vec::new()),
    };
    if line.is_empty() {
        return Err(format!("{DAEMON_BINARY} --fetch-once gave no answer"));
    }
    match protocol::decode::<Response>(&line) {
        Ok(Response::Token {
            token, expires_at, ..
        }) => Ok(Issued { token, expires_at }),
        Ok(Response::Error {
            code: ErrorCode::NotGranted,
            message,
        }) => Err(format!("not granted: {message}")),
        Ok(Response::Error { message, .. }) => Err(message),
        Ok(_) => Err(format!(
            "{DAEMON_BINARY} --fetch-once answered something other than a token"
        )),
        Err(e) => Err(format!("{DAEMON_BINARY} --fetch-once: {e}")),
    }
}
