//! molecule-credd: the per-workspace token daemon.
//!
//! GitHub installation tokens live about an hour, but a workspace lives for
//! days and its environment is never updated. This daemon keeps a fresh token
//! in memory, refreshes it ahead of expiry from the platform, and hands it to
//! `credd` (git's credential helper, `gh`, scripts) over a private Unix socket
//! in well under a millisecond.
//!
//! Data flows one way: command line and environment → [`Config`] and
//! [`cache::CachePolicy`] → the platform client → [`cache::TokenCache`]
//! (which owns every platform call) → [`server`] (which owns every socket
//! connection). [`socket`] sets the socket up safely; [`systemd`] adopts a
//! socket-activated listener and talks `sd_notify`; [`on_refresh`] runs the
//! operator's hook.
//!
//! Everything that needs a single-threaded process (adopting systemd's socket
//! and cleaning its variables, the umask, binding) happens before the async
//! runtime starts.

mod bootstrap;
mod cache;
mod clock;
mod on_refresh;
mod server;
mod socket;
mod systemd;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use credd_core::config::{Config, ConfigError, vars};
use credd_core::platform::{PlatformClient, PlatformError, Timeouts};
use credd_core::protocol::{self, ErrorCode, Response, Source};
use credd_core::secret::Token;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::stat::Mode;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::cache::{CachePolicy, TokenCache};
use crate::server::{PeerCheck, ServerSettings};
use crate::socket::SocketFile;

/// Longest value any duration flag accepts; keeps monotonic-clock arithmetic
/// far from overflow and catches unit typos (`10y`).
const MAX_FLAG_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `--wait-timeout`; `credd` itself gives up after 6 s.
const MAX_WAIT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one `--on-refresh` run may take before it is killed.
const ON_REFRESH_TIMEOUT: Duration = Duration::from_secs(30);

/// Keeps a fresh GitHub installation token in memory and serves it to `credd`
/// over a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "molecule-credd", version, about, long_about = None)]
struct Cli {
    /// Platform base URL [default: http://platform:8080]
    #[arg(long, env = vars::PLATFORM_URL, value_name = "URL")]
    platform_url: Option<OsString>,
    /// Folder holding .auth_token, the platform bearer (re-read on every call) [default: /configs]
    #[arg(long, env = vars::CONFIGS_DIR, value_name = "DIR")]
    configs_dir: Option<OsString>,
    /// Workspace id; selects the workspace route instead of the admin route
    #[arg(long, env = vars::WORKSPACE_ID, value_name = "ID")]
    workspace_id: Option<OsString>,
    /// Socket path [default: $XDG_RUNTIME_DIR/molecule-credd/credd.sock, else /tmp/molecule-credd-$UID/credd.sock]
    #[arg(long, env = vars::CREDD_SOCKET, value_name = "PATH")]
    socket: Option<OsString>,
    /// Refresh this long before expiry (plus up to a quarter of it as jitter)
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    refresh_margin: Duration,
    /// Never serve a token with less life left
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    min_lifetime: Duration,
    /// How long a `get` waits for a refresh in flight before answering unavailable
    #[arg(long, value_name = "DURATION", default_value = "4s", value_parser = parse_duration)]
    wait_timeout: Duration,
    /// How long after start the provision-time GITHUB_TOKEN/GH_TOKEN may be served
    #[arg(long, value_name = "DURATION", default_value = "50m", value_parser = parse_duration)]
    bootstrap_max_age: Duration,
    /// First retry delay after a failed platform call
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    backoff_initial: Duration,
    /// Longest retry delay (also the wait after a 404)
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    backoff_max: Duration,
    /// Another uid allowed to use the socket (repeatable); the daemon's own uid always is
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uid: Vec<u32>,
    /// Connections served at once; more are answered `busy`
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_connections: u32,
    /// Log format on stderr
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Run this shell command (`sh -c`) after each refresh that brings a new token, token on its stdin
    #[arg(long, value_name = "CMD")]
    on_refresh: Option<String>,
    /// Make one platform call, print the answer as one credd protocol line on stdout and exit
    /// (what `credd` runs when no daemon answers); no socket, no logs
    #[arg(long, conflicts_with = "prepare_socket")]
    fetch_once: bool,
    /// Create (or check) the socket's folder as the daemon would, print the socket path and
    /// exit: 0 when usable, 3 when the folder is refused, 2 for any other configuration error
    /// (for entrypoints and scripts)
    #[arg(long)]
    prepare_socket: bool,
    /// Read the provision-time token from stdin (until end of file, at most 2 s) instead of
    /// GITHUB_TOKEN/GH_TOKEN, so it is in no process's environment
    #[arg(long)]
    bootstrap_from_stdin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines (no timestamps under journald).
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(value)
        .map_err(|e| format!("{e}; use a duration like 90s, 10m or 1h"))?;
    if d > MAX_FLAG_DURATION {
        return Err(format!(
            "{value} is longer than the {} this daemon accepts",
            humantime::format_duration(MAX_FLAG_DURATION)
        ));
    }
    Ok(d)
}

/// A bad flag value or combination: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.fetch_once {
        return fetch_once(&cli);
    }
    if cli.prepare_socket {
        return prepare_socket(&cli);
    }
    // Single-threaded work first (see the module docs).
    let activated = systemd::take_activated_listener();
    // Everything the daemon creates (socket folder, socket) is owner-only.
    nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
    init_logging(cli.log_format);
    let result = harden().and_then(|()| {
        let bootstrap = if cli.bootstrap_from_stdin {
            bootstrap::from_stdin()
        } else {
            bootstrap::from_env()
        };
        run(cli, activated, bootstrap)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", chain.join(" -> "));
            if is_configuration_error(&error) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Time limits for `--fetch-once`: git is waiting on `credd`, so shorter than
/// the daemon's own (a stuck platform must not hold a `git fetch` for 15 s).
const FETCH_ONCE_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    total: Duration::from_secs(8),
};

/// `--fetch-once`: `credd`'s way to the platform when no daemon answers.
///
/// Living here keeps one platform client in one binary: `credd` itself stays
/// std-only and small, which is most of its start-up time on every git
/// operation. The answer is a protocol line (a token, or an error whose
/// message is the error chain, never a secret); exit 0 only with a token.
fn fetch_once(cli: &Cli) -> ExitCode {
    let fetched = (|| -> anyhow::Result<_> {
        harden()?;
        let config = config_from(cli).context("invalid configuration")?;
        let client = PlatformClient::new(&config, FETCH_ONCE_TIMEOUTS)
            .context("cannot set up the platform client")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        Ok(runtime.block_on(client.fetch())?)
    })();
    let (response, code) = match fetched {
        Ok(grant) => (
            Response::Token {
                token: grant.token,
                expires_at: grant
                    .expires_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                source: Source::Platform,
            },
            ExitCode::SUCCESS,
        ),
        Err(error) => (
            Response::Error {
                code: ErrorCode::Unavailable,
                message: error
                    .chain()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" -> "),
            },
            ExitCode::FAILURE,
        ),
    };
    let line = Zeroizing::new(protocol::encode(&response));
    let mut out = std::io::stdout().lock();
    match out.write_all(&line).and_then(|()| out.flush()) {
        Ok(()) => code,
        Err(_) => ExitCode::FAILURE,
    }
}

/// `--prepare-socket`: the socket folder checked (and created) by the same
/// code the daemon binds with, so a shell entrypoint never re-implements the
/// path rule or the folder rule (and never follows a planted symlink).
fn prepare_socket(cli: &Cli) -> ExitCode {
    let prepared = config_from(cli)
        .context("invalid configuration")
        .and_then(|config| {
            socket::prepare_folder(&config.socket_path)?;
            Ok(config.socket_path)
        });
    match prepared {
        Ok(path) => {
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{}", path.display()).and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Err(error) => {
            let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", chain.join(" -> "));
            if error.downcast_ref::<socket::SocketError>().is_some() {
                ExitCode::from(FOLDER_REFUSED)
            } else {
                ExitCode::from(2)
            }
        }
    }
}

/// `--prepare-socket`'s exit code for a socket folder it will not use.
const FOLDER_REFUSED: u8 = 3;

fn is_configuration_error(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.is::<ConfigError>()
            || e.is::<UsageError>()
            || e.downcast_ref::<socket::SocketError>()
                .is_some_and(socket::SocketError::is_configuration)
            || matches!(
                e.downcast_ref::<PlatformError>(),
                Some(PlatformError::InvalidUrl { .. })
            )
    })
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The HTTP stack's own trace output describes connections and frames; it
    // is noise for operators and not ours to vouch for, so it stays at info
    // whatever RUST_LOG says. Our own logs carry no secret at any level.
    for quiet in [
        "hyper=info",
        "hyper_util=info",
        "reqwest=info",
        "h2=info",
        "rustls=info",
    ] {
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
        // journald stamps every line itself.
        LogFormat::Text if std::env::var_os("JOURNAL_STREAM").is_some() => {
            builder.without_time().init();
        }
        LogFormat::Text => builder.init(),
    }
}

fn harden() -> anyhow::Result<()> {
    // No core dumps and no ptrace/`/proc/PID/mem` for same-uid processes:
    // the token lives in this process's memory.
    nix::sys::prctl::set_dumpable(false).context("cannot mark the process non-dumpable")?;
    // One descriptor per waiting client: use what the hard limit allows.
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(%error, soft, hard, "could not raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::debug!(%error, "could not read the open-file limit"),
    }
    Ok(())
}

fn config_from(cli: &Cli) -> Result<Config, ConfigError> {
    // Flags (which clap already merged with their environment variables)
    // over the rest of the environment; validation is credd-core's.
    Config::from_lookup(|name| match name {
        vars::PLATFORM_URL => cli.platform_url.clone(),
        vars::CONFIGS_DIR => cli.configs_dir.clone(),
        vars::WORKSPACE_ID => cli.workspace_id.clone(),
        vars::CREDD_SOCKET => cli.socket.clone(),
        other => std::env::var_os(other),
    })
}

fn policy_from(cli: &Cli) -> Result<CachePolicy, UsageError> {
    if cli.refresh_margin <= cli.min_lifetime {
        return Err(UsageError(format!(
            "--refresh-margin ({}) must be longer than --min-lifetime ({}): a token must be refreshed before it is too old to serve",
            humantime::format_duration(cli.refresh_margin),
            humantime::format_duration(cli.min_lifetime)
        )));
    }
    if cli.wait_timeout > MAX_WAIT_TIMEOUT {
        return Err(UsageError(format!(
            "--wait-timeout ({}) is longer than {}: a waiting client holds a connection slot",
            humantime::format_duration(cli.wait_timeout),
            humantime::format_duration(MAX_WAIT_TIMEOUT)
        )));
    }
    if cli.backoff_initial.is_zero() || cli.backoff_initial > cli.backoff_max {
        return Err(UsageError(format!(
            "--backoff-initial ({}) must be above zero and at most --backoff-max ({})",
            humantime::format_duration(cli.backoff_initial),
            humantime::format_duration(cli.backoff_max)
        )));
    }
    Ok(CachePolicy {
        refresh_margin: cli.refresh_margin,
        min_lifetime: cli.min_lifetime,
        wait_timeout: cli.wait_timeout,
        bootstrap_max_age: cli.bootstrap_max_age,
        backoff_initial: cli.backoff_initial,
        backoff_max: cli.backoff_max,
    })
}

fn run(
    cli: Cli,
    activated: std::io::Result<Option<StdUnixListener>>,
    bootstrap: Option<Token>,
) -> anyhow::Result<()> {
    let config = config_from(&cli).context("invalid configuration")?;
    let policy = policy_from(&cli).context("invalid configuration")?;
    let client = PlatformClient::new(&config, Timeouts::default())
        .context("cannot set up the platform client")?;

    // Before the socket exists, so a SIGTERM from now on is a clean shutdown
    // (queued until the runtime runs) rather than a death that leaves it behind.
    let signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    let (signal_tx, signal_rx) = tokio::sync::mpsc::unbounded_channel();
    let signal_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signals = signals;
            for signal in signals.forever() {
                if signal_tx.send(signal).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the signal thread")?;

    let activated = activated.context("cannot adopt the socket systemd passed")?;
    let (listener, socket_file, socket_path) = match activated {
        Some(listener) => {
            let path = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
                .unwrap_or_else(|| config.socket_path.clone());
            (listener, None, path)
        }
        None => {
            let (listener, file) = socket::bind(&config.socket_path)?;
            (listener, Some(file), config.socket_path.clone())
        }
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("credd-worker")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(serve(
        &cli,
        policy,
        client,
        bootstrap,
        (listener, socket_file, socket_path),
        signal_rx,
    ));
    signal_handle.close();
    let _ = signal_thread.join();
    drop(runtime);
    result
}

async fn serve(
    cli: &Cli,
    policy: CachePolicy,
    client: PlatformClient,
    bootstrap: Option<Token>,
    (listener, mut socket_file, socket_path): (StdUnixListener, Option<SocketFile>, PathBuf),
    mut signals: tokio::sync::mpsc::UnboundedReceiver<i32>,
) -> anyhow::Result<()> {
    let listener = tokio::net::UnixListener::from_std(listener)
        .context("cannot register the socket with the async runtime")?;
    let mut cache = TokenCache::new(client, policy, bootstrap);
    if let Some(command) = cli.on_refresh.clone() {
        cache = cache.with_refresh_hook(on_refresh_hook(command));
    }
    let cache = Arc::new(cache);
    let notifier = systemd::Notifier::from_env();
    let stop = CancellationToken::new();

    tracing::info!("listening on {}", socket_path.display());
    let refresher = {
        let cache = Arc::clone(&cache);
        let stop = stop.clone();
        tokio::spawn(async move { cache.run_refresher(stop).await })
    };
    notifier.ready();
    if notifier.is_enabled() {
        if let Some(interval) = notifier.watchdog_interval() {
            tracing::info!(
                interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
                "systemd watchdog enabled"
            );
        }
        spawn_status_updates(Arc::clone(&cache), notifier.clone(), stop.clone());
        let cache = Arc::clone(&cache);
        let notifier = notifier.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = notifier.run_watchdog(|| cache.is_healthy()) => {}
            }
        });
    }
    {
        let cache = Arc::clone(&cache);
        let notifier = notifier.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while let Some(signal) = signals.recv().await {
                if signal == SIGHUP {
                    // Flags and environment are fixed for the process; what
                    // can change (the bearer file) is re-read on every call.
                    tracing::info!("SIGHUP: refreshing the token now");
                    cache.refresh_now();
                } else {
                    let name = if signal == SIGINT {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    };
                    tracing::info!("{name}: shutting down");
                    notifier.stopping();
                    // Unlinked while our listener still holds the address, so
                    // a daemon starting meanwhile never sees a socket that is
                    // ours but dead and takes it over (we would then remove
                    // its socket instead of ours).
                    if let Some(file) = socket_file.take() {
                        file.remove();
                    }
                    stop.cancel();
                    return;
                }
            }
        });
    }

    let settings = ServerSettings {
        max_connections: cli.max_connections as usize,
        peer_check: PeerCheck::new(nix::unistd::geteuid().as_raw(), &cli.allow_uid),
        shutdown_grace: policy.wait_timeout + server::READ_DEADLINE,
    };
    if !cli.allow_uid.is_empty() {
        tracing::info!(uids = ?cli.allow_uid, "also serving these uids");
    }
    let stopped = stop.clone();
    server::run(listener, Arc::clone(&cache), settings, async move {
        stopped.cancelled().await;
    })
    .await;
    stop.cancel();
    if refresher.await.is_err() {
        bail!("the refresher task failed");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Sends systemd a `STATUS=` line whenever it changes.
fn spawn_status_updates(
    cache: Arc<TokenCache<PlatformClient>>,
    notifier: systemd::Notifier,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut changes = cache.subscribe();
        let mut last = String::new();
        loop {
            let line = cache.status_line();
            if line != last {
                notifier.status(&line);
                last = line;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    });
}

/// Runs `--on-refresh` with the newest token, one run at a time; tokens that
/// arrive while it runs are coalesced into the next run.
fn on_refresh_hook(command: String) -> cache::RefreshHook {
    let (latest, mut updates) = tokio::sync::watch::channel::<Option<Token>>(None);
    tokio::spawn(async move {
        while updates.changed().await.is_ok() {
            let token = updates.borrow_and_update().clone();
            if let Some(token) = token {
                on_refresh::run(&command, &token, ON_REFRESH_TIMEOUT).await;
            }
        }
    });
    Box::new(move |token: &Token| {
        latest.send_replace(Some(token.clone()));
    })
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
        assert_eq!(c.refresh_margin, Duration::from_secs(600));
        assert_eq!(c.min_lifetime, Duration::from_secs(60));
        assert_eq!(c.wait_timeout, Duration::from_secs(4));
        assert_eq!(c.bootstrap_max_age, Duration::from_secs(3000));
        assert_eq!(c.backoff_initial, Duration::from_secs(1));
        assert_eq!(c.backoff_max, Duration::from_secs(300));
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(policy_from(&c).is_ok());
    }

    #[test]
    fn flags_parse_and_bad_combinations_are_usage_errors() {
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
        assert!(policy_from(&c).is_ok());

        let c = cli(&["--refresh-margin", "30s", "--min-lifetime", "1m"]).expect("parses");
        let err = anyhow::Error::new(policy_from(&c).expect_err("margin below minimum"));
        assert!(is_configuration_error(&err));
        let c = cli(&["--backoff-initial", "10m", "--backoff-max", "1m"]).expect("parses");
        assert!(policy_from(&c).is_err());
        assert!(cli(&["--wait-timeout", "soon"]).is_err());
        let c = cli(&["--wait-timeout", "10m"]).expect("parses");
        assert!(policy_from(&c).is_err());
        assert!(cli(&["--backoff-max", "30d"]).is_err());
        assert!(cli(&["--max-connections", "0"]).is_err());
        assert!(cli(&["--log-format", "xml"]).is_err());
    }
}
