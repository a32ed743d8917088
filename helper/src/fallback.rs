//! `credd fallback HELPER ACTION`: the operator's fallback helper, run as
//! git would run it, minus what it must not see.
//!
//! Why a wrapper: git sends `store` to *every* configured helper after a
//! request succeeds, with the credential that worked. A fallback such as
//! `store --file ~/.git-pat` behind credd would therefore append each
//! short-lived token credd served to its file, in clear, and after a 401
//! git's `erase` of credd's token would reach it too (git 2.39's
//! credential-store erases by host and username, not password, so that can
//! delete the operator's own `x-access-token` entry). And with
//! `credential.useHttpPath` (which credd needs) git sends the repository's
//! `path`, so a host-level entry in the fallback never matches again and the
//! fallback stops answering exactly when credd cannot. `credd configure-git
//! --fallback-helper HELPER` therefore installs `credd fallback 'HELPER'`,
//! and git appends the action:
//!
//! - `get`: passed on without `path` (everything else as git sent it); the
//!   fallback's answer goes to git untouched.
//! - `store`: passed on (without `path`) only when the credential is not
//!   credd's. credd's credentials are recognised by their username,
//!   [`credential::USERNAME`], which credd always answers with and git
//!   always hands back (it replaces the username it asked with: checked with
//!   git 2.39 and 2.47), or by a `password_expiry_utc`, which git 2.40+
//!   hands back and a stored credential never has. The username alone is
//!   enough on git 2.39, which passes no expiry back.
//! - `erase`: the same, except that an `x-access-token` credential the
//!   fallback itself answers with (asked `get` for the same host and
//!   username) is its own and is passed on: a refused PAT is still erased.
//!   This costs a run of the fallback only after a refusal.
//! - anything else: not passed on (git's protocol says helpers ignore
//!   actions they do not know; a future action might carry credentials).
//!
//! The fallback runs exactly as git runs a helper: `!CMD` through the shell,
//! an absolute path through the shell, else `git credential-NAME`, with the
//! action appended. credd waits for it as git would (no deadline: a
//! fallback may prompt on a terminal). Nothing here prints a credential.

use std::ffi::OsString;
use std::io::{self, BufReader, Write};
use std::process::{Command, ExitCode, Stdio};

use zeroize::Zeroizing;

use crate::credential::{self, InputError};

/// git's attributes in order, values zeroed when dropped.
type Attributes = Vec<(String, Zeroizing<String>)>;

/// `credd fallback HELPER ACTION`. Always exits 0 once the arguments are
/// right (git ignores a helper's exit code); problems are one line each.
pub(crate) fn run(args: &[OsString]) -> ExitCode {
    let (helper, action) = match args {
        [helper, action] => match (helper.to_str(), action.to_str()) {
            (Some(helper), Some(action)) if !helper.is_empty() => (helper, action),
            _ => return usage("HELPER and ACTION must be UTF-8 and HELPER not empty"),
        },
        _ => {
            return usage(
                "`credd fallback` takes the helper as one quoted word, then git's action: credd fallback 'store --file ~/.git-pat' get",
            );
        }
    };
    if !matches!(action, "get" | "store" | "erase") {
        return ExitCode::SUCCESS;
    }
    let attributes = match read_attributes(io::stdin().lock()) {
        Ok(attributes) => attributes,
        Err(e) => {
            eprintln!("credd fallback: {e}");
            return ExitCode::SUCCESS;
        }
    };
    let request: Attributes = attributes
        .iter()
        .filter(|(key, _)| key != "path")
        .cloned()
        .collect();
    let pass_on = match action {
        "get" => true,
        "store" => !is_credds(&attributes),
        _ => !is_credds(&attributes) || fallback_answers_with(helper, &attributes),
    };
    if pass_on && let Err(e) = run_helper(helper, action, &request, false) {
        eprintln!("credd fallback: cannot run the fallback helper {helper:?}: {e}");
    }
    ExitCode::SUCCESS
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("credd fallback: {problem}");
    ExitCode::from(2)
}

/// git's input, bounded as credd's own (see [`credential::read_attributes`]).
fn read_attributes(input: impl io::BufRead) -> Result<Attributes, InputError> {
    let mut attributes = Vec::new();
    credential::read_attributes(input, |key, value| {
        attributes.push((key.to_owned(), Zeroizing::new(value.to_owned())));
    })?;
    Ok(attributes)
}

/// The value of `key` (the last one, as git reads it).
fn value<'a>(attributes: &'a Attributes, key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Whether the credential carries credd's marks (see the module's docs).
fn is_credds(attributes: &Attributes) -> bool {
    value(attributes, "username") == Some(credential::USERNAME)
        || value(attributes, "password_expiry_utc").is_some()
}

/// Whether the fallback, asked `get` for this credential's protocol, host
/// and username, answers with its password: then it is the fallback's own.
fn fallback_answers_with(helper: &str, attributes: &Attributes) -> bool {
    let Some(password) = value(attributes, "password") else {
        return false;
    };
    let query: Attributes = attributes
        .iter()
        .filter(|(key, _)| matches!(key.as_str(), "protocol" | "host" | "username"))
        .cloned()
        .collect();
    let answer = match run_helper(helper, "get", &query, true) {
        Ok(Some(answer)) => answer,
        Ok(None) => return false,
        Err(e) => {
            eprintln!("credd fallback: cannot run the fallback helper {helper:?}: {e}");
            return false;
        }
    };
    value(&answer, "password") == Some(password)
}

/// git's command line for `helper` and `action`.
fn command_line(helper: &str, action: &str) -> String {
    if let Some(shell) = helper.strip_prefix('!') {
        format!("{shell} {action}")
    } else if helper.starts_with('/') {
        format!("{helper} {action}")
    } else {
        format!("git credential-{helper} {action}")
    }
}

/// Runs `helper action` through the shell with `request` on its stdin and
/// waits for it. With `capture`, returns what it answered (read bounded);
/// otherwise its output goes to ours (git's pipe) and the answer is `None`.
fn run_helper(
    helper: &str,
    action: &str,
    request: &Attributes,
    capture: bool,
) -> io::Result<Option<Attributes>> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command_line(helper, action))
        .stdin(Stdio::piped())
        .stdout(if capture {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        let mut text = Zeroizing::new(String::new());
        for (key, value) in request {
            text.push_str(key);
            text.push('=');
            text.push_str(value);
            text.push('\n');
        }
        // A helper that exits without reading its input is not an error.
        let _ = stdin.write_all(text.as_bytes());
    }
    let answer = match child.stdout.take() {
        Some(out) if capture => read_attributes(BufReader::new(out)).ok(),
        _ => None,
    };
    child.wait()?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attributes(text: &str) -> Attributes {
        read_attributes(text.as_bytes()).expect("valid")
    }

    #[test]
    fn credds_credentials_are_recognised_by_username_or_expiry() {
        assert!(is_credds(&attributes(
            "protocol=https\nhost=github.com\nusername=x-access-token\npassword=t\n"
        )));
        assert!(is_credds(&attributes(
            "protocol=https\nhost=github.com\nusername=bot\npassword=t\npassword_expiry_utc=1\n"
        )));
        assert!(!is_credds(&attributes(
            "protocol=https\nhost=github.com\nusername=alice\npassword=ghp_pat\n"
        )));
        assert!(!is_credds(&attributes("protocol=https\nhost=github.com\n")));
    }

    #[test]
    fn helpers_run_as_git_runs_them() {
        assert_eq!(
            command_line("store --file ~/.git-pat", "get"),
            "git credential-store --file ~/.git-pat get"
        );
        assert_eq!(
            command_line("/usr/local/bin/pat-helper -x", "erase"),
            "/usr/local/bin/pat-helper -x erase"
        );
        assert_eq!(
            command_line("!f() { echo x; }; f", "store"),
            "f() { echo x; }; f store"
        );
    }
}
