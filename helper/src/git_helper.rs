//! `credd get | store | erase`: the actions git execs the helper with.
//!
//! git ignores a helper's exit code and stderr goes to the user, so every
//! failure here is one `credd: ` line and exit 0 with nothing on stdout — git
//! then asks its next helper. Configuration is read only after git's input,
//! and only when the host could be ours.

use std::io::{self, Write};

use credd_core::config::HelperConfig;
use credd_core::protocol::Request;
use credd_core::secret::sha256_hex;

use credd_core::repository::RepositoryRef;

use credd_core::protocol::Which;

use crate::chain::{self, Fallback};
use crate::credential::{self, GitRequest};
use crate::daemon;

/// `credd get`: print git's credential when the host is ours — the token of
/// the repository's owner when git sends the path (`useHttpPath`), else the
/// default token.
pub(crate) fn get() {
    let Some((config, request)) = read_served_request() else {
        return;
    };
    // A path that does not start with OWNER/NAME (a proxy prefix, say) is
    // not a repository we can name: the default token, as before.
    let want = request
        .path
        .as_deref()
        .and_then(RepositoryRef::from_git_path)
        .map_or(Which::Default, Which::Repository);
    // Said before the platform is asked: git's user sees why a fetch pauses.
    let said = |step: Fallback<'_>| {
        if let Fallback::Asking { daemon } = step {
            eprintln!("credd: {daemon}; asking the platform directly");
        }
    };
    let issued = match chain::obtain_token(&config, &want, said) {
        Ok(issued) => issued,
        // The earlier step is said already.
        Err(reason) => {
            eprintln!("credd: {}", reason.last_step());
            return;
        }
    };
    let answer = credential::format_answer(&issued.token, issued.expires_at);
    // One write: git reads the answer whole, and a half-written credential
    // must not look like a complete one. EPIPE (git gave up) is not an error.
    let mut out = io::stdout().lock();
    let _ = out.write_all(answer.as_bytes()).and_then(|()| out.flush());
}

/// `credd erase`: git was refused with `password`; tell the daemon to drop that
/// token if it is the cached one. Best effort and silent: git does not wait on
/// the outcome, and the next `get` finds out anyway.
pub(crate) fn erase() {
    let Some((config, request)) = read_served_request() else {
        return;
    };
    let Some(password) = request.password.as_ref().filter(|p| !p.is_empty()) else {
        return;
    };
    let sha256 = sha256_hex(password.as_bytes());
    // Only to a verified daemon (round_trip checks), and never elsewhere.
    let _ = daemon::round_trip(
        &daemon::Endpoint::from_config(&config),
        &Request::Erase { sha256 },
    );
}

/// Reads git's input and the configuration; `Some` only when credd answers
/// for this host. Problems are reported in one line each.
fn read_served_request() -> Option<(HelperConfig, GitRequest)> {
    let request = match credential::read_request(io::stdin().lock()) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("credd: {e}");
            return None;
        }
    };
    let config = match HelperConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("credd: configuration error: {e}; answering nothing");
            return None;
        }
    };
    credential::is_served(&config, &request).then_some((config, request))
}
