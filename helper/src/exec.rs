//! `credd exec -- CMD ARGS…`: replace credd with CMD, a live token in its
//! environment.
//!
//! The token goes into the child's environment only — never its argv
//! (visible to every user in `ps`) and never credd's own environment — and
//! only under the names of a host `CREDD_HOSTS` lists, because `CREDD_HOSTS`
//! is the operator's statement of where the workspace's token is good:
//! `GH_TOKEN` and `GITHUB_TOKEN` (gh's variables for github.com) only when
//! github.com is one of them, so a GitHub Enterprise token never reaches
//! github.com through a stray `GH_HOST=github.com`. For an Enterprise host gh
//! reads only `GH_ENTERPRISE_TOKEN` (with `GH_HOST` naming the host): the
//! caller's `GH_HOST` if `CREDD_HOSTS` lists it, or — without a `GH_HOST` —
//! the one Enterprise host in a `CREDD_HOSTS` without github.com; the child
//! then gets `GH_HOST`, `GH_ENTERPRISE_TOKEN` and `GITHUB_ENTERPRISE_TOKEN`.
//! When no variable may carry the token (a `GH_HOST` credd does not answer
//! for and no github.com, or several Enterprise hosts and no `GH_HOST`), CMD
//! is not run: exit 1 with the reason.
//! Inherited token variables never win: each is set to the live token or
//! removed.
//! `exec(2)` rather than spawn-and-wait: CMD gets credd's pid, signals and
//! terminal, and its exit code is the caller's without any forwarding.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use credd_core::config::HelperConfig;

use credd_core::protocol::Which;

use crate::chain;

/// GitHub's own host, for which gh reads `GH_TOKEN`.
const GITHUB_COM: &str = "github.com";

/// What one variable of the child's environment becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TokenVar {
    /// The live token.
    Token,
    /// This host name.
    Host(String),
    /// Removed (a stale inherited value must not win).
    Unset,
}

/// The token variables of the child's environment. `gh_host` is the
/// caller's `GH_HOST`. `Err`: no variable may carry the token (the reason).
fn token_env(
    config: &HelperConfig,
    gh_host: Option<&str>,
) -> Result<Vec<(&'static str, TokenVar)>, String> {
    let github_com = config.serves_host(GITHUB_COM);
    // Only a host credd answers for: the token must never go to a GH_HOST
    // that merely happens to be set.
    let enterprise = match gh_host.map(str::trim).filter(|h| !h.is_empty()) {
        Some(host) => (!host.eq_ignore_ascii_case(GITHUB_COM) && config.serves_host(host))
            .then(|| host.to_ascii_lowercase()),
        None if github_com => None,
        None => match config.hosts.as_slice() {
            [only] => Some(only.clone()),
            _ => {
                return Err(format!(
                    "CREDD_HOSTS lists several GitHub Enterprise hosts ({}); set GH_HOST to the one the command is for",
                    config.hosts.join(", ")
                ));
            }
        },
    };
    if !github_com && enterprise.is_none() {
        return Err(format!(
            "GH_HOST={} is not one of CREDD_HOSTS ({}): the workspace's token is not for it",
            gh_host.unwrap_or_default().trim(),
            config.hosts.join(", ")
        ));
    }
    let for_github_com = if github_com {
        TokenVar::Token
    } else {
        TokenVar::Unset
    };
    let mut vars = vec![
        ("GH_TOKEN", for_github_com.clone()),
        ("GITHUB_TOKEN", for_github_com),
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
    Ok(vars)
}

/// Runs CMD; returns only when it could not be started (or no token was had).
pub(crate) fn run(program: &OsString, args: &[OsString], want: &Which) -> ExitCode {
    let config = match HelperConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("credd: error: configuration -> {e}");
            return ExitCode::FAILURE;
        }
    };
    // Decided before the token is fetched: a command that may not have it
    // does not cost a token.
    let gh_host = std::env::var("GH_HOST").ok();
    let vars = match token_env(&config, gh_host.as_deref()) {
        Ok(vars) => vars,
        Err(reason) => {
            eprintln!(
                "credd: error: not running {}: {reason}",
                program.to_string_lossy()
            );
            return ExitCode::FAILURE;
        }
    };
    let issued = match chain::obtain_token(&config, want, crate::say_served) {
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
    for (name, value) in vars {
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

    fn config(hosts: &str) -> HelperConfig {
        HelperConfig::from_lookup(|name| (name == "CREDD_HOSTS").then(|| hosts.into()))
            .expect("valid")
    }

    fn vars(hosts: &str, gh_host: Option<&str>) -> Vec<(&'static str, TokenVar)> {
        token_env(&config(hosts), gh_host).expect("a variable for the token")
    }

    fn value<'a>(vars: &'a [(&str, TokenVar)], name: &str) -> Option<&'a TokenVar> {
        vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    #[test]
    fn github_com_gets_gh_token_and_stale_enterprise_tokens_are_removed() {
        let vars = vars("github.com", None);
        assert_eq!(value(&vars, "GH_TOKEN"), Some(&TokenVar::Token));
        assert_eq!(value(&vars, "GITHUB_TOKEN"), Some(&TokenVar::Token));
        assert_eq!(value(&vars, "GH_ENTERPRISE_TOKEN"), Some(&TokenVar::Unset));
        assert_eq!(
            value(&vars, "GH_HOST"),
            None,
            "the caller's GH_HOST is kept"
        );
        let vars = self::vars("github.com,ghe.example.com", Some("github.com"));
        assert_eq!(value(&vars, "GH_ENTERPRISE_TOKEN"), Some(&TokenVar::Unset));
        // A GH_HOST credd does not answer for never gets the token.
        let vars = self::vars("github.com", Some("other-ghes.example"));
        assert_eq!(value(&vars, "GH_ENTERPRISE_TOKEN"), Some(&TokenVar::Unset));
        assert_eq!(value(&vars, "GH_HOST"), None);
    }

    #[test]
    fn an_enterprise_host_gets_gh_enterprise_token_and_gh_host() {
        let vars = vars("github.com,ghe.example.com", Some("ghe.example.com"));
        assert_eq!(
            value(&vars, "GH_HOST"),
            Some(&TokenVar::Host("ghe.example.com".into()))
        );
        assert_eq!(value(&vars, "GH_ENTERPRISE_TOKEN"), Some(&TokenVar::Token));
        assert_eq!(
            value(&vars, "GITHUB_ENTERPRISE_TOKEN"),
            Some(&TokenVar::Token)
        );
        // The only configured host, not github.com: that one, and nothing
        // for github.com.
        let vars = self::vars("ghe.example.com", None);
        assert_eq!(
            value(&vars, "GH_HOST"),
            Some(&TokenVar::Host("ghe.example.com".into()))
        );
        assert_eq!(value(&vars, "GH_ENTERPRISE_TOKEN"), Some(&TokenVar::Token));
        assert_eq!(value(&vars, "GH_TOKEN"), Some(&TokenVar::Unset));
        assert_eq!(value(&vars, "GITHUB_TOKEN"), Some(&TokenVar::Unset));
    }

    /// Issue 20, item 9: an Enterprise token never goes to github.com.
    #[test]
    fn gh_token_is_set_only_when_github_com_is_served() {
        // A stray GH_HOST=github.com with only an Enterprise host: nothing.
        let refused = token_env(&config("ghe.example.com"), Some("github.com"))
            .expect_err("no variable for the Enterprise token");
        assert!(refused.contains("GH_HOST=github.com"), "{refused}");
        // Two Enterprise hosts and no GH_HOST: which one is unknown.
        let refused =
            token_env(&config("ghe-a.example.com,ghe-b.example.com"), None).expect_err("ambiguous");
        assert!(refused.contains("set GH_HOST"), "{refused}");
        // Two Enterprise hosts and a GH_HOST naming one: that one only.
        let vars = vars(
            "ghe-a.example.com,ghe-b.example.com",
            Some("GHE-B.example.com"),
        );
        assert_eq!(value(&vars, "GH_TOKEN"), Some(&TokenVar::Unset));
        assert_eq!(value(&vars, "GITHUB_TOKEN"), Some(&TokenVar::Unset));
        assert_eq!(
            value(&vars, "GH_HOST"),
            Some(&TokenVar::Host("ghe-b.example.com".into()))
        );
    }
}
