//! The fallback chain behind `get`, `token` and `exec`: daemon, then — only
//! when the daemon is absent — the platform directly, then nothing.
//!
//! Each step that fails writes one `credd: ` line to stderr so a person can see
//! why git fell through to its next helper; none of them contains a secret
//! (daemon messages are secret-free by contract, platform errors are built
//! without the token, bearer or body by `credd_core::platform`).

use std::time::{Duration, UNIX_EPOCH};

use credd_core::config::Config;
use credd_core::platform::{PlatformClient, Timeouts};
use credd_core::protocol::{Request, Response};
use credd_core::secret::Token;

use crate::daemon::{self, DaemonError};

/// Platform call limits on the slow path: git is waiting, so shorter than the
/// daemon's (a stuck platform must not hold a `git fetch` for 15 s).
pub(crate) const PLATFORM_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    total: Duration::from_secs(8),
};

/// A token and its expiry (Unix seconds, git's `password_expiry_utc`).
pub(crate) struct Issued {
    /// The token.
    pub(crate) token: Token,
    /// When it expires.
    pub(crate) expires_at: u64,
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
pub(crate) fn obtain_token(config: &Config, progress: Progress) -> Result<Issued, String> {
    let failure = match daemon::round_trip(&config.socket_path, &Request::Get) {
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
    match fetch_from_platform(config) {
        Ok(issued) => {
            if progress == Progress::OneLine {
                eprintln!("credd: {described}; got a token from the platform directly");
            }
            Ok(issued)
        }
        Err(e) => {
            let platform = format!(
                "the platform gave no token either: {}",
                crate::error_chain(e.as_ref())
            );
            Err(match progress {
                Progress::EachStep => platform,
                Progress::OneLine => format!("{described}; {platform}"),
            })
        }
    }
}

/// One platform call on a throwaway current-thread runtime: the only place the
/// helper builds an HTTP client.
fn fetch_from_platform(config: &Config) -> Result<Issued, anyhow::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::Error::new(e).context("cannot start the async runtime"))?;
    let client = PlatformClient::new(config, PLATFORM_TIMEOUTS)?;
    let grant = runtime.block_on(client.fetch())?;
    let expires_at = grant
        .expires_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Issued {
        token: grant.token,
        expires_at,
    })
}
