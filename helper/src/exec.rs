//! `credd exec -- CMD ARGS…`: replace credd with CMD, a live token in its
//! environment.
//!
//! The token goes into `GH_TOKEN` and `GITHUB_TOKEN` of the child only — never
//! its argv (visible to every user in `ps`) and never credd's own environment.
//! For a GitHub Enterprise host gh reads only `GH_ENTERPRISE_TOKEN` (with
//! `GH_HOST` naming the host), so when the host is an Enterprise one credd
//! answers for — the caller's `GH_HOST` if it is in `CREDD_HOSTS`, or the
//! only host in `CREDD_HOSTS` when that is not github.com — the child also
//! gets `GH_HOST`, `GH_ENTERPRISE_TOKEN` and `GITHUB_ENTERPRISE_TOKEN`.
//! Inherited token variables never win: each is set to the live token or
//! removed.
//! `exec(2)` rather than spawn-and-wait: CMD gets credd's pid, signals and
//! terminal, and its exit code is the caller's without any forwarding.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use credd_core::config::Config;

use crate::chain::{self, Progress, TokenFor};

/// GitHub's own host, for which gh reads `GH_TOKEN`.
const GITHUB_COM: &str = "github.com";

/// What one variable of the child's environment becomes.
#[derive(Debug, PartialEq, Eq)]
enum TokenVar {
    /// The live token.
    Token,
    /// This host name.
    Host(String),
    /// Removed (a stale inherited value must not win).
    Unset,
}

/// The token variables of the child's environment. `gh_host` is the
/// caller's `GH_HOST`.
fn token_env(config: &Config, gh_host: Option<&str>) -> Vec<(&'static str, TokenVar)> {
    // Only a host credd answers for: the token must never go to a GH_HOST
    // that merely happens to be set.
    let enterprise = match gh_host.map(str::trim).filter(|h| !h.is_empty()) {
        Some(host) => (!host.eq_ignore_ascii_case(GITHUB_COM) && config.serves_host(host))
            .then(|| host.to_ascii_lowercase()),
        None => match config.hosts.as_slice() {
            [only] if only != GITHUB_COM => Some(only.clone()),
            _ => None,
        },
    };
    let mut vars = vec![
        ("GH_TOKEN", TokenVar::Token),
        ("GITHUB_TOKEN", TokenVar::Token),
    ];
    match enterprise {
        Some(host) => vars.extend([
            ("GH_HOST", TokenVar::Host(host)),
            ("GH_ENTERPRISE_TOKEN", TokenVar::Token),
            ("GITHUB_ENTERPRISE_TOKEN", TokenVar::Token),
        ]),
        None => vars.extend([
            ("GH_ENTERPRISE_TOKEN", TokenVar::Unset),
            ("GITHUB_ENTERPRISE_TOKEN", TokenVar::Unset),
        ]),
    }
    vars
}

/// Runs CMD; returns only when it could not be started (or no token was had).
pub(crate) fn run(program: &OsString, args: &[OsString], want: &TokenFor) -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("credd: error: configuration -> {e}");
            return ExitCode::FAILURE;
        }
    };
    let issued = match chain::obtain_token(&config, Progress::OneLine, want) {
        Ok(issued) => issued,
        Err(reason) => {
            eprintln!(
                "credd: error: no GitHub token to run {} with: {reason}",
                program.to_string_lossy()
            );
            return ExitCode::FAILURE;
        }
    };
    let mut command = Command::new(program);
    command.args(args);
    let gh_host = std::env::var("GH_HOST").ok();
    for (name, value) in token_env(&config, gh_host.as_deref()) {
        match value {
            TokenVar::Token => command.env(name, issued.token.expose()),
            TokenVar::Host(host) => command.env(name, host),
            TokenVar::Unset => command.env_remove(name),
        };
    }
    let error = command.exec();
    let name = program.to_string_lossy();
    // The shells' conventions: 127 not found, 126 found but not executable.
    match error.kind() {
        io::ErrorKind::NotFound => {
            eprintln!("credd: error: {name}: command not found (check the name and PATH)");
            ExitCode::from(127)
        }
        io::ErrorKind::PermissionDenied => {
            eprintln!("credd: error: {name}: permission denied (is it executable?)");
            ExitCode::from(126)
        }
        _ => {
            eprintln!("credd: error: cannot run {name}: {error}");
            ExitCode::from(126)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hosts: &str) -> Config {
        Config::from_lookup(|name| (name == "CREDD_HOSTS").then(|| hosts.into())).expect("valid")
    }

    fn value<'a>(vars: &'a [(&str, TokenVar)], name: &str) -> Option<&'a TokenVar> {
        vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    #[test]
    fn github_com_gets_gh_token_and_stale_enterprise_tokens_are_removed() {
        let vars = token_env(&config("github.com"), None);
        assert_eq!(value(&vars, "GH_TOKEN"), Some(&TokenVar::Token));
        assert_eq!(value(&vars, "GITHUB_TOKEN"), Some(&TokenVar::Token));
        assert_eq!(value(&vars, "GH_ENTERPRISE_TOKEN"), Some(&TokenVar::Unset));
        assert_eq!(
            value(&vars, "GH_HOST"),
            None,
            "the caller's GH_HOST is kept"
        );
        let vars = token_env(&config("github.com,ghe.example.com"), Some("github.com"));
        assert_eq!(value(&vars, "GH_ENTERPRISE_TOKEN"), Some(&TokenVar::Unset));
        // A GH_HOST credd does not answer for never gets the token.
        let vars = token_env(&config("github.com"), Some("other-ghes.example"));
        assert_eq!(value(&vars, "GH_ENTERPRISE_TOKEN"), Some(&TokenVar::Unset));
        assert_eq!(value(&vars, "GH_HOST"), None);
    }

    #[test]
    fn an_enterprise_host_gets_gh_enterprise_token_and_gh_host() {
        let vars = token_env(
            &config("github.com,ghe.example.com"),
            Some("ghe.example.com"),
        );
        assert_eq!(
            value(&vars, "GH_HOST"),
            Some(&TokenVar::Host("ghe.example.com".into()))
        );
        assert_eq!(value(&vars, "GH_ENTERPRISE_TOKEN"), Some(&TokenVar::Token));
        assert_eq!(
            value(&vars, "GITHUB_ENTERPRISE_TOKEN"),
            Some(&TokenVar::Token)
        );
        // The only configured host, not github.com: that one.
        let vars = token_env(&config("ghe.example.com"), None);
        assert_eq!(
            value(&vars, "GH_HOST"),
            Some(&TokenVar::Host("ghe.example.com".into()))
        );
        assert_eq!(value(&vars, "GH_TOKEN"), Some(&TokenVar::Token));
    }
}
