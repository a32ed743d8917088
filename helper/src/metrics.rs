//! `credd metrics`: the daemon's state and counters in Prometheus' text
//! exposition format (0.0.4), for node_exporter's textfile collector.
//!
//! Why written by hand: credd is exec'd by every git operation and stays std
//! plus the protocol crate, so no metrics library is linked in; the format
//! is a few lines of `# HELP`, `# TYPE` and `name{label="value"} number`.
//! Label values are escaped as the format says (`\\`, `\"`, `\n`); numbers
//! are integers or exact decimals (no float rounding in bucket bounds).
//!
//! The daemon reports everything in its `status` answer (one round trip,
//! never a token). What it cannot see is not here: when the daemon is
//! unreachable credd asks the platform itself, in a process that ends right
//! after and keeps nothing, so fallbacks are not counted anywhere.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use anyhow::{Context, bail};
use credd_core::config::HelperConfig;
use credd_core::protocol::{
    Counters, Histogram, PlatformHealth, Request, Response, Status, TokenState, TokenStatus,
};

use crate::daemon;

/// The `owner` label of the workspace's default token.
const DEFAULT_OWNER_LABEL: &str = "default";

/// Runs `credd metrics`: the exposition text, or `Err` when the daemon cannot
/// be asked (the caller exits 1, so a textfile job keeps the last good file).
pub(crate) fn run() -> anyhow::Result<String> {
    let config = HelperConfig::from_env().context("configuration")?;
    match daemon::round_trip(&daemon::Endpoint::from_config(&config), &Request::Status) {
        Ok(Response::Status(status)) => render(&status),
        Ok(_) => bail!(
            "molecule-credd at {} answered a status request with something else",
            config.socket_path.display()
        ),
        Err(e) => bail!("{}", e.describe(&config.socket_path)),
    }
}

/// Metric types used here.
#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Gauge => "gauge",
            Self::Counter => "counter",
            Self::Histogram => "histogram",
        }
    }
}

/// The text being written.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    /// `# HELP` and `# TYPE` for a family (`help` is constant text here:
    /// no backslash, no newline).
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample; `value` is already a valid number.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, text)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label_value(text));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value as the text format wants it: backslash, double quote and
/// line feed escaped, everything else as is.
fn escape_label_value(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// `units / 10^digits` as an exact decimal: `2500, 3` → `2.5`.
fn decimal(units: u64, digits: u32) -> String {
    let scale = 10u64.pow(digits);
    let (whole, frac) = (units / scale, units % scale);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:0width$}", width = digits as usize);
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// The exposition text for `status`; `Err` when its histogram is not one
/// (Prometheus would misread it).
pub(crate) fn render(status: &Status) -> anyhow::Result<String> {
    let mut x = Exposition::default();
    x.family(
        "credd_daemon_info",
        Kind::Gauge,
        "The molecule-credd answering, by version (always 1).",
    );
    x.sample(
        "credd_daemon_info",
        &[("version", &daemon::printable(&status.version))],
        1,
    );
    x.family(
        "credd_daemon_uptime_seconds",
        Kind::Gauge,
        "Seconds since molecule-credd started.",
    );
    x.sample("credd_daemon_uptime_seconds", &[], status.uptime_secs);

    // The default token first; an owner whose label is taken (an account
    // literally named "default") is left out rather than made a duplicate.
    let mut seen = BTreeSet::new();
    let tokens: Vec<(String, &TokenStatus)> =
        std::iter::once((DEFAULT_OWNER_LABEL.to_owned(), &status.token))
            .chain(status.owners.iter().map(|t| {
                let owner = t.scope.owner.as_deref().unwrap_or("?");
                (daemon::printable(owner), t)
            }))
            .filter(|(label, _)| seen.insert(label.to_ascii_lowercase()))
            .collect();

    x.family(
        "credd_token_valid",
        Kind::Gauge,
        "Whether a usable token is held (1) or not (0), per owner; owner=\"default\" is the workspace's default token.",
    );
    for (owner, token) in &tokens {
        let valid = u8::from(token.state == Some(TokenState::Valid));
        x.sample("credd_token_valid", &[("owner", owner)], valid);
    }
    x.family(
        "credd_token_expires_in_seconds",
        Kind::Gauge,
        "Seconds of life the held token has left, per owner; absent while no usable token is held.",
    );
    for (owner, token) in &tokens {
        if let (Some(TokenState::Valid), Some(secs)) = (token.state, token.expires_in_secs) {
            x.sample("credd_token_expires_in_seconds", &[("owner", owner)], secs);
        }
    }
    x.family(
        "credd_platform_health",
        Kind::Gauge,
        "The platform's health as each token's last call saw it: 1 for the current word, 0 for the others.",
    );
    for (owner, token) in &tokens {
        for health in PlatformHealth::ALL {
            x.sample(
                "credd_platform_health",
                &[("owner", owner), ("health", health.as_str())],
                u8::from(token.platform == *health),
            );
        }
    }

    match &status.counters {
        Some(counters) => render_counters(&mut x, counters)?,
        None => x.out.push_str(
            "# This molecule-credd reports no counters (it predates them); upgrade it for requests and platform calls.\n",
        ),
    }
    Ok(x.out)
}

fn render_counters(x: &mut Exposition, c: &Counters) -> anyhow::Result<()> {
    let labelled = |x: &mut Exposition, name: &str, label: &str, help: &str, map: &_| {
        let map: &std::collections::BTreeMap<String, u64> = map;
        x.family(name, Kind::Counter, help);
        for (word, n) in map {
            x.sample(name, &[(label, &daemon::printable(word))], n);
        }
    };
    labelled(
        x,
        "credd_requests_total",
        "answer",
        "Requests answered on the socket, by answer: token (served), erased, kept, status, or the refusal's code (forbidden, busy, bad_request, not_granted, unavailable, unsupported_version).",
        &c.answers,
    );
    x.family(
        "credd_platform_calls_total",
        Kind::Counter,
        "Token calls to the platform the daemon started (fallbacks by credd while the daemon is down are not seen here).",
    );
    x.sample("credd_platform_calls_total", &[], c.platform_calls);
    labelled(
        x,
        "credd_platform_failures_total",
        "cause",
        "Platform calls that produced no servable token, by cause: bearer (local bearer file unusable), unauthorized, not_configured, not_granted, transient (network, timeout, 5xx, 429, garbage), short_lived (less life than --min-lifetime).",
        &c.platform_failures,
    );
    labelled(
        x,
        "credd_platform_responses_total",
        "code",
        "HTTP answers to the platform calls, by status class.",
        &c.platform_responses,
    );
    histogram(
        x,
        "credd_platform_call_duration_seconds",
        "How long the daemon's token calls to the platform took (bearer read included).",
        &c.platform_latency,
    )
}

/// A histogram family: `_bucket{le=…}` cumulative, `+Inf`, `_sum`, `_count`.
fn histogram(x: &mut Exposition, name: &str, help: &str, h: &Histogram) -> anyhow::Result<()> {
    let ascending = h.le_ms.windows(2).all(|w| w[0] < w[1]);
    let cumulative = h.counts.windows(2).all(|w| w[0] <= w[1]);
    if h.le_ms.len() != h.counts.len()
        || !ascending
        || !cumulative
        || h.counts.last().is_some_and(|&last| last > h.count)
    {
        bail!("molecule-credd sent an inconsistent latency histogram; is it a matching release?");
    }
    x.family(name, Kind::Histogram, help);
    let bucket = format!("{name}_bucket");
    for (&ms, &n) in h.le_ms.iter().zip(&h.counts) {
        x.sample(&bucket, &[("le", &decimal(ms, 3))], n);
    }
    x.sample(&bucket, &[("le", "+Inf")], h.count);
    x.sample(&format!("{name}_sum"), &[], decimal(h.sum_us, 6));
    x.sample(&format!("{name}_count"), &[], h.count);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use credd_core::protocol::Scope;

    use super::*;

    #[test]
    fn label_values_are_escaped_per_the_format() {
        assert_eq!(escape_label_value(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label_value("two\nlines"), r"two\nlines");
        assert_eq!(escape_label_value("acme-labs"), "acme-labs");
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(decimal(5, 3), "0.005");
        assert_eq!(decimal(2_500, 3), "2.5");
        assert_eq!(decimal(30_000, 3), "30");
        assert_eq!(decimal(60_053_000, 6), "60.053");
        assert_eq!(decimal(0, 6), "0");
    }

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            uptime_secs: 9,
            token: TokenStatus {
                state: Some(TokenState::Valid),
                expires_in_secs: Some(3_000),
                platform: PlatformHealth::Ok,
                ..TokenStatus::default()
            },
            owners: vec![
                TokenStatus {
                    state: Some(TokenState::Missing),
                    platform: PlatformHealth::NotGranted,
                    scope: Scope {
                        owner: Some("evil\"co".into()),
                        ..Scope::default()
                    },
                    ..TokenStatus::default()
                },
                TokenStatus {
                    state: Some(TokenState::Valid),
                    expires_in_secs: Some(5),
                    scope: Scope {
                        owner: Some("Default".into()),
                        ..Scope::default()
                    },
                    ..TokenStatus::default()
                },
            ],
            counters: Some(Counters {
                answers: BTreeMap::from([("token".into(), 4), ("busy".into(), 1)]),
                platform_calls: 2,
                platform_failures: BTreeMap::from([("transient".into(), 1)]),
                platform_responses: BTreeMap::from([("2xx".into(), 1)]),
                platform_latency: Histogram {
                    le_ms: vec![5, 1_000],
                    counts: vec![1, 1],
                    count: 2,
                    sum_us: 20_004_000,
                },
            }),
            ..Status::default()
        }
    }

    #[test]
    fn renders_tokens_counters_and_the_histogram() {
        let text = render(&status()).expect("renders");
        testkit::prometheus::check_metrics(&text);
        for expected in [
            "credd_daemon_info{version=\"0.1.0\"} 1\n",
            "credd_token_valid{owner=\"default\"} 1\n",
            "credd_token_valid{owner=\"evil\\\"co\"} 0\n",
            "credd_token_expires_in_seconds{owner=\"default\"} 3000\n",
            "credd_platform_health{owner=\"evil\\\"co\",health=\"not_granted\"} 1\n",
            "credd_platform_health{owner=\"evil\\\"co\",health=\"ok\"} 0\n",
            "# TYPE credd_requests_total counter\n",
            "credd_requests_total{answer=\"busy\"} 1\n",
            "credd_platform_failures_total{cause=\"transient\"} 1\n",
            "credd_platform_call_duration_seconds_bucket{le=\"0.005\"} 1\n",
            "credd_platform_call_duration_seconds_bucket{le=\"1\"} 1\n",
            "credd_platform_call_duration_seconds_bucket{le=\"+Inf\"} 2\n",
            "credd_platform_call_duration_seconds_sum 20.004\n",
            "credd_platform_call_duration_seconds_count 2\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(
            !text.contains("credd_token_expires_in_seconds{owner=\"evil"),
            "no expiry without a token:\n{text}"
        );
        assert_eq!(
            text.matches("credd_token_valid{owner=\"default\"}").count(),
            1,
            "an account named like the default token's label is not a duplicate:\n{text}"
        );
    }

    #[test]
    fn an_inconsistent_histogram_is_refused_and_an_old_daemon_gets_tokens_only() {
        let mut bad = status();
        if let Some(c) = bad.counters.as_mut() {
            c.platform_latency.counts = vec![2, 1];
        }
        assert!(render(&bad).is_err());
        let mut old = status();
        old.counters = None;
        let text = render(&old).expect("renders");
        assert!(
            text.contains("credd_token_valid{owner=\"default\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("credd_requests_total"), "{text}");
    }
}
