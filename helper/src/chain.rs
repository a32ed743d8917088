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
//! Each step that fails has its reason ([`NoToken`], [`Fallback`]); the
//! command says them, one `credd: ` line each, so a person can see why git
//! fell through to its next helper. None contains a secret (daemon messages
//! are secret-free by contract, platform errors are built without the
//! token, bearer or body by the daemon's platform client).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use credd_core::config::HelperConfig;
use credd_core::protocol::{self, ErrorCode, MAX_LINE, Request, Response, Which};
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

/// `molecule-credd --fetch-once`'s arguments for `which` token.
fn fetch_once_args(which: &Which) -> Vec<String> {
    match which {
        Which::Repository(repository) => vec!["--repo".into(), repository.to_string()],
        Which::Owner(owner) => vec!["--owner".into(), owner.clone()],
        Which::Default => Vec::new(),
    }
}

/// A step of the chain past the daemon, for the command to say (or not):
/// `get` says why before the platform is asked (git's user sees why a fetch
/// pauses), `token` and `exec` only when the platform then served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fallback<'a> {
    /// The daemon gave no token for `daemon`'s reason; the platform is asked.
    Asking {
        /// Why the daemon gave none.
        daemon: &'a str,
    },
    /// The platform gave the token the daemon did not.
    Served {
        /// Why the daemon gave none.
        daemon: &'a str,
    },
}

/// Why [`obtain_token`] got no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NoToken {
    /// The daemon's answer stands (a refusal, or a failure the platform
    /// cannot help with): no fallback was tried.
    Daemon(String),
    /// The daemon gave none, and the platform gave none either.
    Neither {
        /// Why the daemon gave none.
        daemon: String,
        /// Why the platform gave none.
        platform: String,
    },
}

impl NoToken {
    /// The last step's reason only (what `get` prints after having said
    /// [`Fallback::Asking`]).
    pub(crate) fn last_step(&self) -> String {
        match self {
            Self::Daemon(daemon) => daemon.clone(),
            Self::Neither { platform, .. } => {
                format!("the platform gave no token either: {platform}")
            }
        }
    }
}

/// Every step's reason, on one line (what `token` and `exec` print).
impl std::fmt::Display for NoToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Daemon(daemon) => f.write_str(daemon),
            Self::Neither { daemon, .. } => write!(f, "{daemon}; {}", self.last_step()),
        }
    }
}

/// Asks the daemon, then the platform if the daemon is unreachable or
/// unintelligible; tells `on_fallback` each step past the daemon. Prints
/// nothing: what to say is the command's.
pub(crate) fn obtain_token(
    config: &HelperConfig,
    want: &Which,
    mut on_fallback: impl FnMut(Fallback<'_>),
) -> Result<Issued, NoToken> {
    let endpoint = daemon::Endpoint::from_config(config);
    let failure = match daemon::round_trip(&endpoint, &Request::get(want)) {
        Ok(Response::Token {
            token, expires_at, ..
        }) => return Ok(Issued { token, expires_at }),
        Ok(_) => DaemonError::Unintelligible("it answered something other than a token".into()),
        Err(e) => e,
    };
    let daemon = failure.describe(&config.socket_path);
    if !failure.allows_platform_fallback() {
        return Err(NoToken::Daemon(daemon));
    }
    on_fallback(Fallback::Asking { daemon: &daemon });
    match fetch_from_platform(want) {
        Ok(issued) => {
            on_fallback(Fallback::Served { daemon: &daemon });
            Ok(issued)
        }
        Err(platform) => Err(NoToken::Neither { daemon, platform }),
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
fn fetch_from_platform(want: &Which) -> Result<Issued, String> {
    let beside_us = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name(DAEMON_BINARY))
        .filter(|path| path.is_file());
    let program = beside_us.map_or_else(|| DAEMON_BINARY.into(), PathBuf::into_os_string);
    let mut child = Command::new(&program)
        .arg("--fetch-once")
        .args(fetch_once_args(want))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_token_says_every_step_on_one_line_or_only_the_last() {
        let neither = NoToken::Neither {
            daemon: "no daemon answers on /run/credd.sock".into(),
            platform: "401 from the platform".into(),
        };
        assert_eq!(
            neither.to_string(),
            "no daemon answers on /run/credd.sock; the platform gave no token either: 401 from the platform"
        );
        assert_eq!(
            neither.last_step(),
            "the platform gave no token either: 401 from the platform"
        );
        let refused = NoToken::Daemon("the daemon refuses: not granted".into());
        assert_eq!(refused.to_string(), refused.last_step());
    }
}
