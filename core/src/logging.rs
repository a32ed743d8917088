//! How the long-running binaries write their log: one format flag, one
//! setup, so the daemon and the platform cannot drift apart.
//!
//! Behind the `logging` feature: the helper links neither clap nor
//! tracing-subscriber, and its build never enables the feature.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written on stderr (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (no timestamps under journald, which stamps
    /// every line itself).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The HTTP and TLS stacks' own trace output describes connections and
/// frames: noise for operators and not ours to vouch for, so it stays at
/// `info` whatever `RUST_LOG` says. Our own logs carry no secret at any
/// level.
const QUIET: [&str; 5] = [
    "hyper=info",
    "hyper_util=info",
    "reqwest=info",
    "h2=info",
    "rustls=info",
];

/// Logs to stderr in `format`, at `RUST_LOG` (default `info`). Call once,
/// at start.
pub fn init(format: LogFormat) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    for quiet in QUIET {
        if let Ok(directive) = quiet.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text if std::env::var_os("JOURNAL_STREAM").is_some() => {
            builder.without_time().init();
        }
        LogFormat::Text => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_quiet_directive_parses() {
        for quiet in QUIET {
            assert!(
                quiet
                    .parse::<tracing_subscriber::filter::Directive>()
                    .is_ok(),
                "{quiet}"
            );
        }
    }
}
