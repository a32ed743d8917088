//! The `molecule-platform` binary's configuration: flags and environment.
//!
//! Partial configuration is the failure mode that bites in production (an
//! App ID without a key starts "fine" and answers 500 an hour later), so
//! [`Config::from_args`] checks everything up front and refuses with a
//! message naming the variable and what to do. Secrets are taken from the
//! environment or files only, never from argv (visible in `ps`).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use secrecy::SecretString;

use crate::github::{DEFAULT_API_URL, GitHubAppConfig, MAX_KEY_BYTES};

/// Default listen address in service mode.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default listen address in `--dev` mode (loopback only).
pub const DEFAULT_DEV_LISTEN: &str = "127.0.0.1:8080";

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Command-line flags; each also reads the environment variable shown.
#[derive(Debug, Parser)]
#[command(
    name = "molecule-platform",
    version,
    about = "Serves live GitHub App installation tokens to workspaces.",
    after_help = "ADMIN_TOKEN (environment only, never a flag): bearer accepted on every route."
)]
pub struct Args {
    /// Address to listen on [default: 0.0.0.0:8080, 127.0.0.1:8080 with --dev].
    #[arg(long, env = "PLATFORM_LISTEN")]
    pub listen: Option<String>,
    /// File of `WORKSPACE_ID SHA256_HEX_OF_BEARER` lines; re-read on SIGHUP.
    #[arg(long, env = "PLATFORM_WORKSPACE_TOKENS_FILE")]
    pub workspace_tokens_file: Option<PathBuf>,
    /// Grants file (TOML): the owners, repositories and permissions each
    /// workspace's tokens are scoped to; re-read on SIGHUP. Unset: every
    /// workspace gets the configured installation's token, unscoped.
    #[arg(long, env = "PLATFORM_GRANTS_FILE")]
    pub grants_file: Option<PathBuf>,
    /// GitHub App ID (JWT issuer). Unset (and no client ID): the token endpoint answers 404.
    #[arg(long, env = "GITHUB_APP_ID")]
    pub github_app_id: Option<String>,
    /// GitHub App client ID, used as the JWT issuer instead of the App ID.
    #[arg(long, env = "GITHUB_APP_CLIENT_ID")]
    pub github_app_client_id: Option<String>,
    /// Installation whose token is served.
    #[arg(long, env = "GITHUB_APP_INSTALLATION_ID")]
    pub github_app_installation_id: Option<String>,
    /// The App's private key, PEM (PKCS#1 or PKCS#8).
    #[arg(long, env = "GITHUB_APP_PRIVATE_KEY_FILE")]
    pub github_app_private_key_file: Option<PathBuf>,
    /// GitHub API base URL (GitHub Enterprise: https://HOST/api/v3).
    #[arg(long, env = "GITHUB_API_URL", default_value = DEFAULT_API_URL)]
    pub github_api_url: String,
    /// Development mode: serve random ghs_-shaped tokens on loopback, no GitHub.
    #[arg(long)]
    pub dev: bool,
    /// Lifetime of dev tokens (humantime: 90s, 10m, 1h).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub dev_token_ttl: Duration,
    /// Dev mode: write the bearer to this file (0600, folder created 0700),
    /// e.g. CONFIGS_DIR/.auth_token for a daemon.
    #[arg(long)]
    pub dev_auth_token_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Where tokens come from.
#[derive(Debug)]
pub enum ProviderChoice {
    /// No provider: the endpoint answers 404.
    Off,
    /// The dev provider, tokens living `token_ttl`.
    Dev {
        /// Lifetime of minted tokens.
        token_ttl: Duration,
    },
    /// A GitHub App.
    GitHub(GitHubAppConfig),
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Address to bind.
    pub listen: SocketAddr,
    /// `ADMIN_TOKEN`.
    pub admin_token: Option<SecretString>,
    /// `PLATFORM_WORKSPACE_TOKENS_FILE`.
    pub workspace_tokens_file: Option<PathBuf>,
    /// `PLATFORM_GRANTS_FILE`.
    pub grants_file: Option<PathBuf>,
    /// The token source.
    pub provider: ProviderChoice,
    /// Dev mode: where to write the bearer.
    pub dev_auth_token_file: Option<PathBuf>,
    /// Log format.
    pub log_format: LogFormat,
}

/// The configuration cannot work; the message says what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn non_empty<T: AsRef<str>>(value: Option<T>) -> Option<String> {
    value
        .map(|v| v.as_ref().trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn non_empty_path(value: Option<PathBuf>) -> Option<PathBuf> {
    value.filter(|p| !p.as_os_str().is_empty())
}

impl Config {
    /// Validates `args` plus `admin_token` (the `ADMIN_TOKEN` variable).
    /// Reads the private key file, bounded.
    pub fn from_args(args: Args, admin_token: Option<String>) -> Result<Self, ConfigError> {
        let fail = |m: String| Err(ConfigError(m));
        let listen_text = non_empty(args.listen.as_deref()).unwrap_or_else(|| {
            if args.dev {
                DEFAULT_DEV_LISTEN
            } else {
                DEFAULT_LISTEN
            }
            .to_owned()
        });
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError(format!(
                "PLATFORM_LISTEN / --listen must be IP:PORT such as {DEFAULT_LISTEN}, got {listen_text:?}"
            ))
        })?;
        let app_id = non_empty(args.github_app_id.as_deref());
        let client_id = non_empty(args.github_app_client_id.as_deref());
        let installation = non_empty(args.github_app_installation_id.as_deref());
        let key_file = non_empty_path(args.github_app_private_key_file);
        let github_vars_set =
            app_id.is_some() || client_id.is_some() || installation.is_some() || key_file.is_some();

        let provider = if args.dev {
            if github_vars_set {
                return fail(
                    "--dev serves fake tokens and cannot be combined with GITHUB_APP_* settings: \
                     unset them, or drop --dev to use the GitHub App"
                        .into(),
                );
            }
            if !listen.ip().is_loopback() {
                return fail(format!(
                    "--dev only listens on loopback (127.0.0.1 or ::1), got {listen}: \
                     dev tokens are for this machine only"
                ));
            }
            if args.dev_token_ttl < Duration::from_secs(1) {
                return fail("--dev-token-ttl must be at least 1s".into());
            }
            ProviderChoice::Dev {
                token_ttl: args.dev_token_ttl,
            }
        } else if app_id.is_none() && client_id.is_none() {
            if installation.is_some() || key_file.is_some() {
                return fail(
                    "GITHUB_APP_INSTALLATION_ID or GITHUB_APP_PRIVATE_KEY_FILE is set but GITHUB_APP_ID is not: \
                     set GITHUB_APP_ID (or GITHUB_APP_CLIENT_ID) to serve tokens, or unset them all to turn the feature off"
                        .into(),
                );
            }
            ProviderChoice::Off
        } else {
            let issuer = client_id.or(app_id).unwrap_or_default();
            let Some(installation) = installation else {
                return fail(
                    "GITHUB_APP_ID is set but GITHUB_APP_INSTALLATION_ID is not: set it to the installation's \
                     numeric ID (github.com/settings/installations/ID)"
                        .into(),
                );
            };
            let installation_id: u64 = installation.parse().ok().filter(|n| *n > 0).ok_or_else(
                || {
                    ConfigError(format!(
                        "GITHUB_APP_INSTALLATION_ID must be a positive number, got {installation:?}"
                    ))
                },
            )?;
            let Some(key_file) = key_file else {
                return fail(
                    "GITHUB_APP_ID is set but GITHUB_APP_PRIVATE_KEY_FILE is not: point it at the App's \
                     private key (.pem)"
                        .into(),
                );
            };
            let key = read_key(&key_file)?;
            ProviderChoice::GitHub(GitHubAppConfig::new(
                issuer,
                installation_id,
                key,
                args.github_api_url,
            ))
        };
        if !args.dev && args.dev_auth_token_file.is_some() {
            return fail("--dev-auth-token-file only makes sense with --dev".into());
        }
        Ok(Self {
            listen,
            admin_token: non_empty(admin_token).map(SecretString::from),
            workspace_tokens_file: non_empty_path(args.workspace_tokens_file),
            grants_file: non_empty_path(args.grants_file),
            provider,
            dev_auth_token_file: non_empty_path(args.dev_auth_token_file),
            log_format: args.log_format,
        })
    }
}

fn read_key(path: &Path) -> Result<SecretString, ConfigError> {
    let unreadable = |e: std::io::Error| {
        ConfigError(format!(
            "cannot read GITHUB_APP_PRIVATE_KEY_FILE {}: {e}",
            path.display()
        ))
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut text = String::new();
    file.take(MAX_KEY_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    if text.len() > MAX_KEY_BYTES {
        return Err(ConfigError(format!(
            "GITHUB_APP_PRIVATE_KEY_FILE {} is larger than {MAX_KEY_BYTES} bytes: is it the right file?",
            path.display()
        )));
    }
    Ok(SecretString::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Config, ConfigError> {
        let mut full = vec!["molecule-platform"];
        full.extend_from_slice(argv);
        Config::from_args(Args::try_parse_from(full).unwrap(), None)
    }

    #[test]
    fn defaults_turn_the_feature_off() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(matches!(c.provider, ProviderChoice::Off));
    }

    #[test]
    fn dev_defaults_to_loopback_and_refuses_other_addresses() {
        let c = parse(&["--dev", "--dev-token-ttl", "2m"]).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_DEV_LISTEN);
        assert!(
            matches!(c.provider, ProviderChoice::Dev { token_ttl } if token_ttl == Duration::from_secs(120))
        );
        let err = parse(&["--dev", "--listen", "0.0.0.0:8080"]).unwrap_err();
        assert!(err.0.contains("loopback"), "{err}");
        let err = parse(&["--dev", "--github-app-id", "1"]).unwrap_err();
        assert!(err.0.contains("cannot be combined"), "{err}");
    }

    #[test]
    fn partial_github_config_is_refused() {
        let err = parse(&["--github-app-id", "1"]).unwrap_err();
        assert!(err.0.contains("GITHUB_APP_INSTALLATION_ID is not"), "{err}");
        let err =
            parse(&["--github-app-id", "1", "--github-app-installation-id", "x"]).unwrap_err();
        assert!(err.0.contains("positive number"), "{err}");
        let err =
            parse(&["--github-app-id", "1", "--github-app-installation-id", "2"]).unwrap_err();
        assert!(
            err.0.contains("GITHUB_APP_PRIVATE_KEY_FILE is not"),
            "{err}"
        );
        let err = parse(&[
            "--github-app-id",
            "1",
            "--github-app-installation-id",
            "2",
            "--github-app-private-key-file",
            "/nonexistent/key.pem",
        ])
        .unwrap_err();
        assert!(
            err.0
                .contains("cannot read GITHUB_APP_PRIVATE_KEY_FILE /nonexistent/key.pem"),
            "{err}"
        );
        let err = parse(&["--github-app-installation-id", "2"]).unwrap_err();
        assert!(err.0.contains("GITHUB_APP_ID is not"), "{err}");
        let err = parse(&["--listen", "nowhere"]).unwrap_err();
        assert!(err.0.contains("IP:PORT"), "{err}");
    }
}
