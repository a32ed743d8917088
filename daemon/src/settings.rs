//! The daemon's one validated configuration, and how starting can fail.
//!
//! Why one type: flags and environment ([`Cli`], the low level) are read and
//! checked once, here, into [`Settings`] (the high level), which the library
//! takes whole; no component of the library parses a flag of its own (the
//! process's own inputs stay with `main` and the modules that own them: the
//! log format, the provision-time token, systemd's `NOTIFY_SOCKET`). The
//! daemon reads only what it uses: the platform's variables, the socket,
//! and `CREDD_HOSTS` only with `--gateway` (a helper-only value must not
//! stop the daemon). Every way of failing to start is a [`StartError`]
//! whose kind decides the exit code, so `main` downcasts nothing.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use credd_core::config::{self, ConfigError, PlatformConfig, vars};
use credd_core::deadlines;

use crate::cache::CachePolicy;
use crate::cli::Cli;
use crate::gateway::GatewayOptions;
use crate::platform::PlatformError;
use crate::socket::SocketError;

/// Exit code for a configuration the daemon refuses: restarting cannot help.
pub const EXIT_CONFIGURATION: u8 = 2;

/// Everything the daemon runs by, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the platform is and which workspace asks.
    pub(crate) platform: PlatformConfig,
    /// The socket to bind when systemd passes none.
    pub socket_path: PathBuf,
    /// The cache's timing.
    pub(crate) policy: CachePolicy,
    /// Connections served at once.
    pub(crate) max_connections: usize,
    /// Uids besides the daemon's own that may use the socket.
    pub(crate) allow_uids: Vec<u32>,
    /// `--sealed`: the socket answers status only.
    pub(crate) sealed: bool,
    /// `--on-refresh`: the operator's command.
    pub(crate) on_refresh: Option<String>,
    /// `--gateway`: its options and the hosts it tunnels.
    pub(crate) gateway: Option<GatewaySettings>,
}

/// The gateway's part of [`Settings`].
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Where it listens, its CA file, its upstream overrides.
    pub(crate) options: GatewayOptions,
    /// The hosts it tunnels (`CREDD_HOSTS`, as the helper reads it).
    pub(crate) hosts: Vec<String>,
}

impl Settings {
    /// Checks `cli` (flags over the environment; clap has read each flag's
    /// variable) and reads the rest of the environment the daemon uses.
    pub fn from_cli(cli: &Cli) -> Result<Self, StartError> {
        Self::from_cli_and_env(cli, |name| std::env::var_os(name))
    }

    /// [`Self::from_cli`] with the environment read through `env`.
    fn from_cli_and_env(
        cli: &Cli,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, StartError> {
        let platform = platform_config(cli)?;
        let socket_path = config::socket_path_from_lookup(|name| match name {
            vars::CREDD_SOCKET => Some(cli.socket.clone()),
            other => env(other),
        })?;
        let gateway = match cli.gateway {
            None => None,
            Some(listen) => Some(GatewaySettings {
                options: GatewayOptions {
                    listen,
                    ca_file: cli.gateway_ca_file.clone().ok_or_else(|| {
                        StartError::Usage("--gateway needs --gateway-ca-file".into())
                    })?,
                    extra_ca: cli.gateway_extra_ca.clone(),
                    upstream: cli.gateway_upstream.clone(),
                },
                hosts: config::hosts_from_lookup(&env)?,
            }),
        };
        Ok(Self {
            platform,
            socket_path,
            policy: policy(cli)?,
            max_connections: cli.max_connections as usize,
            allow_uids: cli.allow_uid.clone(),
            sealed: cli.sealed,
            on_refresh: cli.on_refresh.clone(),
            gateway,
        })
    }
}

/// The platform's variables, the flags over the environment (`--fetch-once`
/// reads only these).
pub fn platform_config(cli: &Cli) -> Result<PlatformConfig, StartError> {
    Ok(PlatformConfig::from_lookup(|name| match name {
        vars::PLATFORM_URL => Some(cli.platform_url.clone()),
        vars::CONFIGS_DIR => Some(cli.configs_dir.clone()),
        vars::WORKSPACE_ID => cli.workspace_id.clone(),
        _ => None,
    })?)
}

/// The cache's timing, checked for combinations that cannot work.
fn policy(cli: &Cli) -> Result<CachePolicy, StartError> {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    let policy = CachePolicy {
        refresh_margin: *cli.refresh_margin,
        min_lifetime: *cli.min_lifetime,
        wait_timeout: *cli.wait_timeout,
        bootstrap_max_age: *cli.bootstrap_max_age,
        backoff_initial: *cli.backoff_initial,
        backoff_max: *cli.backoff_max,
    };
    if policy.refresh_margin <= policy.min_lifetime {
        return Err(StartError::Usage(format!(
            "--refresh-margin ({}) must be longer than --min-lifetime ({}): a token must be refreshed before it is too old to serve",
            show(policy.refresh_margin),
            show(policy.min_lifetime)
        )));
    }
    if policy.wait_timeout > deadlines::DAEMON_WAIT_MAX {
        return Err(StartError::Usage(format!(
            "--wait-timeout ({}) is longer than {}: credd stops reading after {}",
            show(policy.wait_timeout),
            show(deadlines::DAEMON_WAIT_MAX),
            show(deadlines::HELPER_READ)
        )));
    }
    if policy.backoff_initial.is_zero() || policy.backoff_initial > policy.backoff_max {
        return Err(StartError::Usage(format!(
            "--backoff-initial ({}) must be above zero and at most --backoff-max ({})",
            show(policy.backoff_initial),
            show(policy.backoff_max)
        )));
    }
    Ok(policy)
}

/// Why the daemon did not start (or stopped with an error).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A variable or flag is unusable.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// Flags that do not work together.
    #[error("invalid configuration: {0}")]
    Usage(String),
    /// The socket (its folder, or what is at its path) is refused.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The platform client cannot be built from the configuration.
    #[error("cannot set up the platform client")]
    Platform(#[from] PlatformError),
    /// Anything else (the runtime, the gateway, a task): a restart may help.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl StartError {
    /// Whether only a change of configuration (or of the filesystem) can
    /// fix it, so a supervisor should stop restarting.
    pub fn is_configuration(&self) -> bool {
        match self {
            Self::Config(_) | Self::Usage(_) => true,
            Self::Socket(error) => error.is_configuration(),
            Self::Platform(error) => matches!(error, PlatformError::InvalidUrl { .. }),
            Self::Failed(_) => false,
        }
    }

    /// [`EXIT_CONFIGURATION`] when only a change of configuration can fix
    /// it, else 1.
    pub fn exit_code(&self) -> ExitCode {
        if self.is_configuration() {
            ExitCode::from(EXIT_CONFIGURATION)
        } else {
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn settings(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, StartError> {
        let cli =
            Cli::try_parse_from(std::iter::once("molecule-credd").chain(args.iter().copied()))
                .expect("parses");
        Settings::from_cli_and_env(&cli, |name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn the_defaults_are_the_contracts() {
        let s = settings(&[], &[("XDG_RUNTIME_DIR", "/run/user/1000")]).expect("valid");
        assert_eq!(s.policy, CachePolicy::DEFAULT);
        assert_eq!(s.platform.platform_url, config::DEFAULT_PLATFORM_URL);
        assert_eq!(s.max_connections, 1024);
        assert!(s.gateway.is_none());
    }

    #[test]
    fn bad_combinations_are_configuration_errors() {
        assert!(settings(&["--refresh-margin", "3s", "--min-lifetime", "1s"], &[]).is_ok());
        for args in [
            &["--refresh-margin", "30s", "--min-lifetime", "1m"][..],
            &["--backoff-initial", "10m", "--backoff-max", "1m"],
            &["--wait-timeout", "10m"],
            &["--platform-url", "platform:8080"],
            &["--workspace-id", "../admin"],
        ] {
            let error = settings(args, &[]).expect_err("refused");
            assert!(error.is_configuration(), "{args:?}: {error}");
            assert_eq!(error.exit_code(), ExitCode::from(EXIT_CONFIGURATION));
        }
    }

    /// `CREDD_HOSTS` is the helper's (and the gateway's): a value the
    /// helper would refuse must not stop a daemon without `--gateway`.
    #[test]
    fn the_daemon_reads_the_hosts_only_for_its_gateway() {
        let bad = [("CREDD_HOSTS", " , "), ("CREDD_DAEMON_UID", "nobody")];
        assert!(settings(&[], &bad).is_ok());
        let gateway = [
            "--gateway",
            "127.0.0.1:0",
            "--gateway-ca-file",
            "/tmp/ca.pem",
        ];
        let error = settings(&gateway, &bad).expect_err("the gateway needs its hosts");
        assert!(error.is_configuration(), "{error}");
        let good =
            settings(&gateway, &[("CREDD_HOSTS", "GitHub.com,ghe.example.com")]).expect("valid");
        assert_eq!(
            good.gateway.expect("a gateway").hosts,
            ["github.com", "ghe.example.com"]
        );
    }
}
