//! The composition root: a [`Platform`] from its [`Config`].
//!
//! Why in the library: the binary (`main.rs`) keeps only what is the
//! process's (the admin bearer out of the environment, signals, the
//! listening socket, the start-up lines); what a configuration means — which
//! provider, shared through Redis or not, whose bearers, which grants — is
//! built here once, so an embedder gets the same platform the binary serves.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use credd_core::platform_api::{ADMIN_TOKEN_ROUTE, TOKEN_ROUTE};
use rand::Rng;
use rand::distr::Alphanumeric;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{Config, ProviderChoice};
use crate::shared::{SharedConfig, SharedStore};
use crate::{
    AppState, Auth, DevProvider, GitHubAppProvider, Grants, TokenProvider, WorkspaceTokens,
};

/// A platform ready to serve: its state (provider, bearers, grants) and,
/// in dev mode, where its random bearer was written.
#[derive(Debug)]
pub struct Platform {
    /// What the router serves ([`crate::app`]).
    pub state: AppState,
    /// Dev mode: the file holding the bearer a daemon should use.
    pub dev_bearer_file: Option<PathBuf>,
}

impl Platform {
    /// The provider, the bearers and the grants `config` names, each logged
    /// once as it is set up.
    pub fn from_config(config: Config) -> anyhow::Result<Self> {
        let dev = matches!(config.provider, ProviderChoice::Dev { .. });
        let provider = configured_provider(config.provider, config.shared)?;
        let (auth, dev_bearer_file) = bearers(
            config.admin_token,
            config.workspace_tokens_file.as_deref(),
            config.dev_auth_token_file.as_deref(),
            dev,
        )?;
        let grants = load_grants(config.grants_file.as_deref(), &auth)?;
        Ok(Self {
            state: AppState::new(provider, auth).with_grants(Arc::new(grants)),
            dev_bearer_file,
        })
    }
}

/// The configured provider: none, dev, or a GitHub App (shared through
/// Redis when `shared` is set).
fn configured_provider(
    provider: ProviderChoice,
    shared: Option<SharedConfig>,
) -> anyhow::Result<Option<Arc<dyn TokenProvider>>> {
    Ok(match provider {
        ProviderChoice::Off => {
            tracing::warn!(
                "no GitHub App configured (GITHUB_APP_ID unset): the token endpoints answer 404"
            );
            None
        }
        ProviderChoice::Dev { token_ttl } => {
            tracing::info!(
                "dev mode: minting fake ghs_ tokens living {}",
                humantime::format_duration(token_ttl)
            );
            Some(Arc::new(DevProvider::new(token_ttl)))
        }
        ProviderChoice::GitHub(github) => {
            let issuer = github.issuer.clone();
            let mut provider =
                GitHubAppProvider::new(github).context("GitHub App configuration")?;
            if let Some(shared) = shared {
                let prefix = shared.prefix.clone();
                let store = SharedStore::new(shared, provider.metrics())
                    .map_err(|why| anyhow::anyhow!("PLATFORM_REDIS_URL: {why}"))?;
                store.start();
                tracing::info!(
                    "replicas: tokens shared through Redis under the prefix {prefix:?}, sealed with PLATFORM_CACHE_KEY_FILE"
                );
                provider = provider.with_shared(store);
            }
            tracing::info!("GitHub App {issuer}: tokens from {}", provider.endpoint());
            Some(Arc::new(provider))
        }
        ProviderChoice::Given(provider) => Some(provider),
    })
}

/// The admin bearer (from `ADMIN_TOKEN`, or random in dev mode) and the
/// workspace bearers; in dev mode, where the random bearer was written.
fn bearers(
    admin_token: Option<SecretString>,
    workspace_tokens_file: Option<&Path>,
    dev_auth_token_file: Option<&Path>,
    dev: bool,
) -> anyhow::Result<(Auth, Option<PathBuf>)> {
    let workspaces = match workspace_tokens_file {
        Some(path) => WorkspaceTokens::load(path).context("PLATFORM_WORKSPACE_TOKENS_FILE")?,
        None => WorkspaceTokens::empty(),
    };
    let admin_from_env = admin_token.is_some();
    let admin = match (admin_token, dev) {
        (Some(admin), _) => Some(admin),
        (None, true) => Some(random_bearer()),
        (None, false) => None,
    };
    if admin.is_none() && workspaces.is_empty() {
        tracing::warn!(
            "neither ADMIN_TOKEN nor PLATFORM_WORKSPACE_TOKENS_FILE entries: every token request will be refused"
        );
    }
    // A random dev bearer is useless unless written somewhere; one from
    // ADMIN_TOKEN is already known to the user, so only an explicit file.
    let dev_bearer_file = match (&admin, dev, dev_auth_token_file) {
        (Some(admin), true, Some(file)) => Some(write_dev_bearer(Some(file), admin)?),
        (Some(admin), true, None) if !admin_from_env => Some(write_dev_bearer(None, admin)?),
        _ => None,
    };
    let auth = Auth::new(admin, workspaces);
    tracing::info!(
        "auth: admin bearer {}, {} workspace bearer(s)",
        if auth.has_admin() { "set" } else { "unset" },
        auth.workspaces().len()
    );
    Ok((auth, dev_bearer_file))
}

/// The grants file, when one is configured, and what it means for the
/// admin route.
fn load_grants(grants_file: Option<&Path>, auth: &Auth) -> anyhow::Result<Grants> {
    let grants = match grants_file {
        Some(path) => Grants::load(path).context("PLATFORM_GRANTS_FILE")?,
        None => Grants::none(),
    };
    match grants.current() {
        Some(table) => tracing::info!(
            "grants: {} workspace(s); tokens are scoped to each workspace's grant",
            table.len()
        ),
        None => tracing::info!(
            "grants: none (PLATFORM_GRANTS_FILE unset): every workspace gets the configured installation's token"
        ),
    }
    if grants.current().is_some() && !auth.has_admin() {
        tracing::warn!(
            "admin route closed to workspace bearers: a grants file is in force and ADMIN_TOKEN is unset, \
             so GET {ADMIN_TOKEN_ROUTE} answers 403 (set ADMIN_TOKEN to open it to the admin only); \
             workspaces get their scoped tokens from {TOKEN_ROUTE}"
        );
    }
    Ok(grants)
}

/// A random dev bearer: `dev-` and 40 letters or digits.
fn random_bearer() -> SecretString {
    let random: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    SecretString::from(format!("dev-{random}"))
}

/// Writes the dev bearer where a daemon can read it: `file` when given, else
/// `$TMPDIR/molecule-platform-dev-UID/.auth_token`. The folder is created
/// 0700 and must belong to us; the file is 0600. The bearer is never printed.
fn write_dev_bearer(file: Option<&Path>, bearer: &SecretString) -> anyhow::Result<PathBuf> {
    let file = match file {
        Some(file) => file.to_owned(),
        None => std::env::temp_dir()
            .join(format!("molecule-platform-dev-{}", nix::unistd::getuid()))
            .join(".auth_token"),
    };
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let meta =
        std::fs::metadata(dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    if meta.uid() != nix::unistd::getuid().as_raw() {
        bail!(
            "{} belongs to uid {}, not us: choose another --dev-auth-token-file",
            dir.display(),
            meta.uid()
        );
    }
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&file)
        .with_context(|| format!("cannot write {}", file.display()))?;
    // An existing file keeps its mode on open: tighten it before writing.
    out.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", file.display()))?;
    out.write_all(bearer.expose_secret().as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .with_context(|| format!("cannot write {}", file.display()))?;
    tracing::info!("dev bearer written to {}", file.display());
    Ok(file)
}
