//! `credd status [--json]`: what the daemon holds, never the token itself.
//!
//! The daemon reports durations as seconds and instants as Unix seconds; this
//! renders them for people ("expires in 52m 10s (at 2026-…Z)") or passes them
//! through as JSON for scripts.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use credd_core::config::HelperConfig;
use credd_core::protocol::{Request, Response, Source, Status, TokenState, TokenStatus};

use crate::daemon;

/// Runs `credd status`: the text to print, or `Err` when the daemon cannot
/// be asked.
pub(crate) fn run(json: bool) -> anyhow::Result<String> {
    let config = HelperConfig::from_env().context("configuration")?;
    let status = match daemon::round_trip(&daemon::Endpoint::from_config(&config), &Request::Status)
    {
        Ok(Response::Status(status)) => status,
        Ok(_) => bail!(
            "molecule-credd at {} answered a status request with something else",
            config.socket_path.display()
        ),
        Err(e) => bail!("{}", e.describe(&config.socket_path)),
    };
    let text = if json {
        let mut text = serde_json::to_string_pretty(&*status).context("encoding the status")?;
        text.push('\n');
        text
    } else {
        render(&status, &config, SystemTime::now())
    };
    Ok(text)
}

/// The human form, one `label: value` per line: the default token, the
/// daemon, then a block per per-owner token.
pub(crate) fn render(status: &Status, config: &HelperConfig, now: SystemTime) -> String {
    let mut out = String::new();
    render_token(&mut out, "", &status.token, now);
    let mut line = |label: &str, value: &str| {
        let _ = writeln!(out, "{label:<16}{value}");
    };
    line("uptime:", &human(status.uptime_secs));
    line(
        "daemon:",
        &format!(
            "molecule-credd {} (pid {}) at {}",
            daemon::printable(&status.version),
            status.pid,
            config.socket_path.display()
        ),
    );
    for token in &status.owners {
        let owner = token.scope.owner.as_deref().unwrap_or("?");
        let _ = writeln!(out, "\ntoken for {}:", daemon::printable(owner));
        render_token(&mut out, "  ", token, now);
    }
    out
}

fn human(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// One held token's lines, each prefixed by `indent`.
fn render_token(out: &mut String, indent: &str, status: &TokenStatus, now: SystemTime) {
    let at = |unix: u64| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
    };
    let ago = |unix: u64| {
        let then = UNIX_EPOCH + Duration::from_secs(unix);
        match now.duration_since(then) {
            Ok(d) => format!("{} ago ({})", human(d.as_secs()), at(unix)),
            Err(_) => at(unix),
        }
    };
    let none = || "-".to_owned();

    let state = match status.state {
        Some(TokenState::Valid) => "valid",
        Some(TokenState::Missing) => "no usable token",
        None => "unknown",
    };
    let source = match status.source {
        Some(Source::Platform) => "platform",
        Some(Source::Env) => "env (provision-time GITHUB_TOKEN/GH_TOKEN)",
        None => "-",
    };
    let expires = match (status.expires_in_secs, status.expires_at) {
        (Some(left), Some(unix)) => format!("in {} (at {})", human(left), at(unix)),
        (Some(left), None) => format!("in {}", human(left)),
        (None, Some(unix)) => at(unix),
        (None, None) => none(),
    };
    let mut line = |label: &str, value: &str| {
        let label = format!("{indent}{label}");
        let _ = writeln!(out, "{label:<16}{value}");
    };
    line("state:", state);
    if let Some(owner) = &status.scope.owner {
        line("owner:", &daemon::printable(owner));
        line("repositories:", &repositories_text(status));
        line("permissions:", &permissions_text(status));
    }
    line("source:", source);
    line("fingerprint:", status.fingerprint.as_deref().unwrap_or("-"));
    line("expires:", &expires);
    line(
        "next refresh:",
        &status
            .next_refresh_in_secs
            .map_or_else(none, |s| format!("in {}", human(s))),
    );
    line(
        "last refresh:",
        &status
            .last_refresh_at
            .map_or_else(|| "never".to_owned(), ago),
    );
    line(
        "last error:",
        &status
            .last_error
            .as_deref()
            .map_or_else(|| "none".to_owned(), daemon::printable),
    );
    line("platform:", status.platform.as_str());
    line("platform calls:", &status.platform_calls.to_string());
    line("served:", &status.served.to_string());
}

/// The token's repositories in words: all of the account's, or the list
/// (with the count first when the daemon sent only the first few).
fn repositories_text(status: &TokenStatus) -> String {
    status.scope.repositories.as_ref().map_or_else(
        || "all of the account's".to_owned(),
        |list| match status.repositories_total {
            // The count first: a long list is cut at the line's end.
            Some(total) => daemon::printable(&format!("{total} in all: {}, …", list.join(", "))),
            None => daemon::printable(&list.join(", ")),
        },
    )
}

/// The token's permissions in words: the installation's, or `name=level`
/// pairs.
fn permissions_text(status: &TokenStatus) -> String {
    status.scope.permissions.as_ref().map_or_else(
        || "the installation's".to_owned(),
        |map| {
            let pairs: Vec<String> = map
                .iter()
                .map(|(name, level)| format!("{name}={level}"))
                .collect();
            daemon::printable(&pairs.join(", "))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_field_for_people() {
        let config = HelperConfig::from_lookup(|name| {
            (name == "CREDD_SOCKET").then(|| "/run/credd.sock".into())
        })
        .expect("valid");
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let token = TokenStatus {
            state: Some(TokenState::Valid),
            source: Some(Source::Platform),
            fingerprint: Some("0123456789ab".into()),
            expires_at: Some(1_800_003_130),
            expires_in_secs: Some(3_130),
            next_refresh_in_secs: Some(2_530),
            last_refresh_at: Some(1_799_999_880),
            last_error: Some("the platform failed (HTTP 500)\nsecond line".into()),
            platform: credd_core::protocol::PlatformHealth::Ok,
            platform_calls: 7,
            served: 99,
            scope: credd_core::protocol::Scope::default(),
            repositories_total: None,
        };
        let labs = TokenStatus {
            scope: credd_core::protocol::Scope {
                owner: Some("labs".into()),
                repositories: Some(vec!["labs/a".into(), "labs/b".into()]),
                permissions: Some([("contents".to_owned(), "read".to_owned())].into()),
            },
            ..token.clone()
        };
        let big = TokenStatus {
            scope: credd_core::protocol::Scope {
                owner: Some("big".into()),
                repositories: Some((0..500).map(|i| format!("big/r{i}")).collect()),
                permissions: None,
            },
            ..token.clone()
        }
        .bounded();
        let status = Status {
            version: "0.1.0".into(),
            pid: 42,
            uptime_secs: 3_723,
            token,
            owners: vec![labs, big],
            counters: None,
        };
        let text = render(&status, &config, now);
        for expected in [
            "state:          valid\n",
            "source:         platform\n",
            "fingerprint:    0123456789ab\n",
            "expires:        in 52m 10s (at 2027-01-15T08:52:10Z)\n",
            "next refresh:   in 42m 10s\n",
            "last refresh:   2m ago (2027-01-15T07:58:00Z)\n",
            "last error:     the platform failed (HTTP 500) second line\n",
            "platform:       ok\n",
            "platform calls: 7\n",
            "served:         99\n",
            "uptime:         1h 2m 3s\n",
            "daemon:         molecule-credd 0.1.0 (pid 42) at /run/credd.sock\n",
            "\ntoken for labs:\n  state:        valid\n  owner:        labs\n",
            "  repositories: labs/a, labs/b\n  permissions:  contents=read\n",
            "  repositories: 500 in all: big/r0, big/r1, big/r2, big/r3, big/r4, big/r5, big/r6, big/r7, big/r8, big/r9, …\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        let empty = render(&Status::default(), &config, now);
        assert!(empty.contains("last refresh:   never\n"), "{empty}");
        assert!(empty.contains("expires:        -\n"), "{empty}");
    }
}
