//! The command line: the low level of the daemon's configuration.
//!
//! Flags are layered over the environment (clap reads each flag's variable),
//! then checked once into [`Settings`](crate::settings::Settings) by
//! credd-core's rules, the ones the helper reads the same variables by, so
//! the two binaries can never disagree about a value. Every default shown in
//! `--help` is the constant that defines it, not a copy.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use credd_core::config::{self, vars};
use credd_core::repository::{NameError, RepositoryRef, is_valid_owner};

use crate::cache::CachePolicy;
use crate::server;

/// Longest value any duration flag accepts; keeps monotonic-clock arithmetic
/// far from overflow and catches unit typos (`10y`).
pub const MAX_FLAG_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Keeps a fresh GitHub installation token in memory and serves it to `credd`
/// over a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "molecule-credd", version, about, long_about = None)]
pub struct Cli {
    /// Platform base URL
    #[arg(long, env = vars::PLATFORM_URL, value_name = "URL",
          default_value = config::DEFAULT_PLATFORM_URL)]
    pub platform_url: OsString,
    /// Folder holding .auth_token, the platform bearer (re-read on every call)
    #[arg(long, env = vars::CONFIGS_DIR, value_name = "DIR",
          default_value = config::DEFAULT_CONFIGS_DIR)]
    pub configs_dir: OsString,
    /// Workspace id; selects the workspace route instead of the admin route
    #[arg(long, env = vars::WORKSPACE_ID, value_name = "ID")]
    pub workspace_id: Option<OsString>,
    /// Socket path (the default follows XDG_RUNTIME_DIR, else /tmp/molecule-credd-$UID)
    #[arg(long, env = vars::CREDD_SOCKET, value_name = "PATH",
          default_value_os_t = config::default_socket_path_from_env().into_os_string())]
    pub socket: OsString,
    /// Refresh this long before expiry (plus up to a quarter of it as jitter)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          default_value_t = CachePolicy::DEFAULT.refresh_margin.into())]
    pub refresh_margin: humantime::Duration,
    /// Never serve a token with less life left
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          default_value_t = CachePolicy::DEFAULT.min_lifetime.into())]
    pub min_lifetime: humantime::Duration,
    /// How long a `get` waits for a refresh in flight before answering unavailable
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          default_value_t = CachePolicy::DEFAULT.wait_timeout.into())]
    pub wait_timeout: humantime::Duration,
    /// How long after start the provision-time token may be served
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          default_value_t = CachePolicy::DEFAULT.bootstrap_max_age.into())]
    pub bootstrap_max_age: humantime::Duration,
    /// First retry delay after a failed platform call
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          default_value_t = CachePolicy::DEFAULT.backoff_initial.into())]
    pub backoff_initial: humantime::Duration,
    /// Longest retry delay (also the wait after a 404)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          default_value_t = CachePolicy::DEFAULT.backoff_max.into())]
    pub backoff_max: humantime::Duration,
    /// Another uid allowed to use the socket (repeatable); the daemon's own uid always is
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Connections served at once; more are answered `busy`
    #[arg(long, value_name = "N", default_value_t = server::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_connections: u32,
    /// Log format on stderr
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Run this shell command (`sh -c`) after each refresh that brings a new token, token on its stdin
    #[arg(long, value_name = "CMD")]
    pub on_refresh: Option<String>,
    /// Make one platform call, print the answer as one credd protocol line on stdout and exit
    /// (what `credd` runs when no daemon answers); no socket, no logs
    #[arg(long, conflicts_with = "prepare_socket")]
    pub fetch_once: bool,
    /// With --fetch-once: a token for this repository (OWNER/NAME)
    #[arg(long, value_name = "OWNER/NAME", requires = "fetch_once", conflicts_with = "owner",
          value_parser = parse_repository)]
    pub repo: Option<RepositoryRef>,
    /// With --fetch-once: a token for this account
    #[arg(long, value_name = "OWNER", requires = "fetch_once", value_parser = parse_owner)]
    pub owner: Option<String>,
    /// Create (or check) the socket's folder as the daemon would, print the socket path and
    /// exit: 0 when usable, 3 when the folder is refused, 2 for any other configuration error
    /// (for entrypoints and scripts)
    #[arg(long)]
    pub prepare_socket: bool,
    /// As root: bind the socket (--socket) for uid UID in that uid's private folder (created
    /// 0700 when missing), owned by it, then run COMMAND (after --) with it socket-activated
    /// (fd 3, LISTEN_FDS, LISTEN_PID) — how a sealed workspace hands the agent's socket to a
    /// daemon under a uid of its own; start with fd 3 closed
    #[arg(long, value_name = "UID", requires = "command",
          conflicts_with_all = ["fetch_once", "prepare_socket"])]
    pub bind_socket_for: Option<u32>,
    /// With --bind-socket-for: the command given the socket
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
    /// Read the provision-time token from stdin (until end of file, at most 2 s) instead of
    /// GITHUB_TOKEN/GH_TOKEN, so it is in no process's environment
    #[arg(long)]
    pub bootstrap_from_stdin: bool,
    /// Sealed mode: the socket answers status (and so metrics) only and refuses every request
    /// that would hand out a token (get, and so `credd token` and `credd exec`) with `sealed`;
    /// tokens leave the daemon only stamped onto requests by --gateway
    #[arg(long)]
    pub sealed: bool,
    /// Run the credential gateway on this loopback address (HOST:PORT): an HTTPS proxy for
    /// the CREDD_HOSTS hosts (and api.github.com) that stamps the token onto each request
    #[arg(long, value_name = "ADDR", requires = "gateway_ca_file")]
    pub gateway: Option<SocketAddr>,
    /// With --gateway: write the gateway's CA certificate here (made at start, its key only in
    /// memory) for the tools to trust
    #[arg(long, value_name = "PATH", requires = "gateway")]
    pub gateway_ca_file: Option<PathBuf>,
    /// With --gateway: also trust this CA (PEM) when connecting to GitHub (a private
    /// Enterprise CA; tests)
    #[arg(long, value_name = "PATH", requires = "gateway")]
    pub gateway_extra_ca: Option<PathBuf>,
    /// With --gateway: connect to ADDR for HOST instead of resolving it (repeatable; tests)
    #[arg(long, value_name = "HOST=ADDR", requires = "gateway", value_parser = parse_upstream)]
    pub gateway_upstream: Vec<(String, SocketAddr)>,
}

/// How log lines are written on stderr: the platform's format, defined once.
pub use credd_core::logging::LogFormat;

fn parse_duration(value: &str) -> Result<humantime::Duration, String> {
    let d: humantime::Duration = value
        .parse()
        .map_err(|e| format!("{e}; use a duration like 90s, 10m or 1h"))?;
    if *d > MAX_FLAG_DURATION {
        return Err(format!(
            "{value} is longer than the {} this daemon accepts",
            humantime::format_duration(MAX_FLAG_DURATION)
        ));
    }
    Ok(d)
}

fn parse_upstream(text: &str) -> Result<(String, SocketAddr), String> {
    let (host, addr) = text
        .split_once('=')
        .ok_or_else(|| "write HOST=ADDR, like github.com=127.0.0.1:8443".to_owned())?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an address: {e}"))?;
    if host.is_empty() {
        return Err("HOST is empty".into());
    }
    Ok((host.to_ascii_lowercase(), addr))
}

fn parse_repository(text: &str) -> Result<RepositoryRef, String> {
    RepositoryRef::parse(text).map_err(|e| e.to_string())
}

fn parse_owner(text: &str) -> Result<String, String> {
    if is_valid_owner(text) {
        Ok(text.to_owned())
    } else {
        Err(NameError::BadOwner.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("molecule-credd").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = cli(&[]).expect("defaults parse");
        assert_eq!(*c.refresh_margin, Duration::from_secs(600));
        assert_eq!(*c.min_lifetime, Duration::from_secs(60));
        assert_eq!(*c.wait_timeout, Duration::from_secs(4));
        assert_eq!(*c.bootstrap_max_age, Duration::from_secs(3000));
        assert_eq!(*c.backoff_initial, Duration::from_secs(1));
        assert_eq!(*c.backoff_max, Duration::from_secs(300));
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn help_shows_the_defaults_the_constants_define() {
        let help = <Cli as clap::CommandFactory>::command()
            .render_help()
            .to_string();
        for shown in [
            "[default: 10m]",
            "[default: 1m]",
            "[default: 4s]",
            "[default: 50m]",
            "[default: 1024]",
        ] {
            assert!(help.contains(shown), "{shown} in\n{help}");
        }
        assert!(help.contains(config::DEFAULT_PLATFORM_URL), "{help}");
    }

    #[test]
    fn flags_parse_and_bad_values_are_refused() {
        let c = cli(&[
            "--allow-uid",
            "0",
            "--allow-uid",
            "1000",
            "--refresh-margin",
            "3s",
            "--min-lifetime",
            "1s",
            "--log-format",
            "json",
            "--socket",
            "/tmp/x/credd.sock",
        ])
        .expect("parses");
        assert_eq!(c.allow_uid, [0, 1000]);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(cli(&["--wait-timeout", "soon"]).is_err());
        assert!(cli(&["--backoff-max", "30d"]).is_err());
        assert!(cli(&["--max-connections", "0"]).is_err());
        assert!(cli(&["--log-format", "xml"]).is_err());
    }
}
