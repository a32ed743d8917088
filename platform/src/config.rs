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
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use secrecy::SecretString;

use crate::TokenProvider;
use crate::github::{DEFAULT_API_URL, GitHubAppConfig, MAX_KEY_BYTES};
use crate::shared::{SealKey, SharedConfig};

/// Default listen address in service mode.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default listen address in `--dev` mode (loopback only).
pub const DEFAULT_DEV_LISTEN: &str = "127.0.0.1:8080";

/// Log line format: the daemon's, defined once.
pub use credd_core::logging::LogFormat;

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
    /// Replicas: share minted tokens through this Redis
    /// (`redis://[:PASSWORD@]HOST:PORT[/DB]`; give a password through the
    /// environment, not the flag). Unset: this process's own cache only.
    #[arg(long, env = "PLATFORM_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// With --redis-url: every Redis key and channel starts with this.
    #[arg(long, env = "PLATFORM_REDIS_KEY_PREFIX", default_value = crate::shared::DEFAULT_PREFIX)]
    pub redis_key_prefix: String,
    /// With --redis-url: file of 64 hex digits (`openssl rand -hex 32`), the
    /// AES-256-GCM key sealing tokens in Redis; the same on every replica.
    #[arg(long, env = "PLATFORM_CACHE_KEY_FILE")]
    pub cache_key_file: Option<PathBuf>,
    /// With --redis-url: deadline of each Redis operation (humantime).
    #[arg(long, env = "PLATFORM_REDIS_TIMEOUT", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,
    /// With --redis-url: expiry of the cross-replica mint lock (humantime);
    /// a replica dying mid-mint delays the others at most this long.
    #[arg(long, env = "PLATFORM_REDIS_LOCK_TTL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub redis_lock_ttl: Duration,
}

/// Where tokens come from.
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
    /// A provider the embedder built (the test kit, a bench, a test that
    /// steers its provider): served as given. No flag chooses it.
    Given(Arc<dyn TokenProvider>),
}

impl std::fmt::Debug for ProviderChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("Off"),
            Self::Dev { token_ttl } => f.debug_struct("Dev").field("token_ttl", token_ttl).finish(),
            Self::GitHub(github) => f.debug_tuple("GitHub").field(github).finish(),
            Self::Given(_) => f.write_str("Given(..)"),
        }
    }
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
    /// `PLATFORM_REDIS_URL` and friends: the replicas' shared cache.
    pub shared: Option<SharedConfig>,
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
        let shared = shared_config(&args)?;
        let provider = provider_choice(&args, listen)?;
        if args.dev && shared.is_some() {
            return fail(
                "--dev is a single process on loopback: unset PLATFORM_REDIS_URL / --redis-url"
                    .into(),
            );
        }
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
            shared,
        })
    }
}

/// Which provider `args` ask for: dev (loopback only, never with GitHub
/// App settings), a GitHub App (every setting it needs present and sane,
/// the key read, bounded), or none.
fn provider_choice(args: &Args, listen: SocketAddr) -> Result<ProviderChoice, ConfigError> {
    let fail = |m: String| Err(ConfigError(m));
    let app_id = non_empty(args.github_app_id.as_deref());
    let client_id = non_empty(args.github_app_client_id.as_deref());
    let installation = non_empty(args.github_app_installation_id.as_deref());
    let key_file = non_empty_path(args.github_app_private_key_file.clone());
    let github_vars_set =
        app_id.is_some() || client_id.is_some() || installation.is_some() || key_file.is_some();

    if args.dev {
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
        Ok(ProviderChoice::Dev {
            token_ttl: args.dev_token_ttl,
        })
    } else if app_id.is_none() && client_id.is_none() {
        if installation.is_some() || key_file.is_some() {
            return fail(
                "GITHUB_APP_INSTALLATION_ID or GITHUB_APP_PRIVATE_KEY_FILE is set but GITHUB_APP_ID is not: \
                 set GITHUB_APP_ID (or GITHUB_APP_CLIENT_ID) to serve tokens, or unset them all to turn the feature off"
                    .into(),
            );
        }
        Ok(ProviderChoice::Off)
    } else {
        let issuer = client_id.or(app_id).unwrap_or_default();
        let Some(installation) = installation else {
            return fail(
                "GITHUB_APP_ID is set but GITHUB_APP_INSTALLATION_ID is not: set it to the installation's \
                 numeric ID (github.com/settings/installations/ID)"
                    .into(),
            );
        };
        let installation_id: u64 =
            installation
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    ConfigError(format!(
                        "GITHUB_APP_INSTALLATION_ID must be a positive number, got {installation:?}"
                    ))
                })?;
        let Some(key_file) = key_file else {
            return fail(
                "GITHUB_APP_ID is set but GITHUB_APP_PRIVATE_KEY_FILE is not: point it at the App's \
                 private key (.pem)"
                    .into(),
            );
        };
        let key = read_key(&key_file)?;
        Ok(ProviderChoice::GitHub(GitHubAppConfig::new(
            issuer,
            installation_id,
            key,
            args.github_api_url.clone(),
        )))
    }
}

/// The replicated-cache settings, checked: `None` without a Redis URL.
fn shared_config(args: &Args) -> Result<Option<SharedConfig>, ConfigError> {
    let Some(url) = non_empty(args.redis_url.as_deref()) else {
        if args.cache_key_file.is_some() {
            return Err(ConfigError(
                "PLATFORM_CACHE_KEY_FILE is set but PLATFORM_REDIS_URL is not: set both to share tokens between replicas, or neither"
                    .into(),
            ));
        }
        return Ok(None);
    };
    if url.starts_with("rediss://") {
        return Err(ConfigError(
            "PLATFORM_REDIS_URL: rediss:// (TLS) is not supported: reach Redis over loopback, a private network or a TLS tunnel with redis://"
                .into(),
        ));
    }
    if !(url.starts_with("redis://")
        || url.starts_with("unix://")
        || url.starts_with("redis+unix://"))
    {
        return Err(ConfigError(
            "PLATFORM_REDIS_URL must be redis://HOST:PORT (or unix:///PATH)".into(),
        ));
    }
    let prefix = args.redis_key_prefix.trim().to_owned();
    if !crate::shared::valid_prefix(&prefix) {
        return Err(ConfigError(
            "PLATFORM_REDIS_KEY_PREFIX must be 1-64 printable characters without spaces".into(),
        ));
    }
    let Some(key_file) = non_empty_path(args.cache_key_file.clone()) else {
        return Err(ConfigError(
            "PLATFORM_REDIS_URL is set but PLATFORM_CACHE_KEY_FILE is not: tokens are sealed in Redis under that key \
             (64 hex digits, e.g. `openssl rand -hex 32 > FILE`, the same file on every replica)"
                .into(),
        ));
    };
    let seal_key = SealKey::read(&key_file).map_err(|why| {
        ConfigError(format!(
            "PLATFORM_CACHE_KEY_FILE {}: {why}",
            key_file.display()
        ))
    })?;
    if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&args.redis_timeout) {
        return Err(ConfigError(
            "PLATFORM_REDIS_TIMEOUT must be 10ms to 10s".into(),
        ));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&args.redis_lock_ttl) {
        return Err(ConfigError(
            "PLATFORM_REDIS_LOCK_TTL must be 1s to 10m".into(),
        ));
    }
    Ok(Some(SharedConfig {
        url: SecretString::from(url),
        prefix,
        seal_key,
        op_timeout: args.redis_timeout,
        lock_ttl: args.redis_lock_ttl,
    }))
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
    fn redis_needs_a_key_file_and_a_redis_url() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cache.key");
        std::fs::write(&key, "0f".repeat(32)).unwrap();
        let key = key.to_str().unwrap();
        let c = parse(&[
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--cache-key-file",
            key,
        ])
        .unwrap();
        let shared = c.shared.expect("shared");
        assert_eq!(shared.prefix, crate::shared::DEFAULT_PREFIX);
        assert!(
            !format!("{shared:?}").contains("6379"),
            "the URL stays out of Debug"
        );
        assert!(parse(&[]).unwrap().shared.is_none());
        for (argv, expected) in [
            (
                vec!["--redis-url", "redis://h:1"],
                "PLATFORM_CACHE_KEY_FILE is not",
            ),
            (vec!["--cache-key-file", key], "PLATFORM_REDIS_URL is not"),
            (
                vec!["--redis-url", "rediss://h:1", "--cache-key-file", key],
                "TLS",
            ),
            (
                vec!["--redis-url", "http://h:1", "--cache-key-file", key],
                "redis://HOST:PORT",
            ),
            (
                vec![
                    "--redis-url",
                    "redis://h:1",
                    "--cache-key-file",
                    key,
                    "--redis-key-prefix",
                    "a b",
                ],
                "PREFIX",
            ),
            (
                vec![
                    "--redis-url",
                    "redis://h:1",
                    "--cache-key-file",
                    "/nonexistent",
                ],
                "PLATFORM_CACHE_KEY_FILE /nonexistent",
            ),
            (
                vec![
                    "--dev",
                    "--redis-url",
                    "redis://h:1",
                    "--cache-key-file",
                    key,
                ],
                "single process",
            ),
        ] {
            let err = parse(&argv).unwrap_err();
            assert!(err.0.contains(expected), "{argv:?}: {err}");
        }
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
