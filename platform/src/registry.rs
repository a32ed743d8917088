//! Provision-time plugins and the lookup of the token provider among them.
//!
//! At provision time each plugin may add environment variables to a new
//! workspace (the GitHub App plugin adds `GITHUB_TOKEN`/`GH_TOKEN`). A plugin
//! that can also hand out tokens on demand says so through
//! [`ProvisionPlugin::as_token_provider`]; the service asks the registry for
//! the first such plugin on every request, so registering one later turns the
//! endpoint on without a restart.
//!
//! Reads and registrations may race: the plugin list sits behind an `RwLock`
//! that is only held to clone a snapshot, never across an `.await`.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};

use crate::provider::{ProviderError, TokenProvider};

/// The future [`ProvisionPlugin::mutate_env`] returns.
pub type EnvFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ProviderError>> + Send + 'a>>;

/// The env mutation every GitHub token provider performs: its current token
/// as `GITHUB_TOKEN` and `GH_TOKEN`, the names git tooling and `gh` read.
pub fn set_github_token_env<'a>(
    provider: &'a dyn TokenProvider,
    env: &'a mut BTreeMap<String, String>,
) -> EnvFuture<'a> {
    Box::pin(async move {
        let issued = provider.token().await?;
        let token = secrecy::ExposeSecret::expose_secret(&issued.token);
        env.insert("GITHUB_TOKEN".into(), token.to_owned());
        env.insert("GH_TOKEN".into(), token.to_owned());
        Ok(())
    })
}

/// A plugin run when a workspace is provisioned.
pub trait ProvisionPlugin: Send + Sync {
    /// A short name for logs and errors.
    fn name(&self) -> &str;

    /// Adds or changes environment variables of the workspace being
    /// provisioned.
    fn mutate_env<'a>(&'a self, env: &'a mut BTreeMap<String, String>) -> EnvFuture<'a>;

    /// This plugin as a token provider, when it is one.
    fn as_token_provider(self: Arc<Self>) -> Option<Arc<dyn TokenProvider>> {
        None
    }
}

/// Implements [`ProvisionPlugin`] for a GitHub [`TokenProvider`] named
/// `$name`: it sets the token env ([`set_github_token_env`]) and is its own
/// token provider. One definition for every such provider.
macro_rules! github_token_plugin {
    ($provider:ty, $name:literal) => {
        impl $crate::registry::ProvisionPlugin for $provider {
            fn name(&self) -> &str {
                $name
            }

            fn mutate_env<'a>(
                &'a self,
                env: &'a mut std::collections::BTreeMap<String, String>,
            ) -> $crate::registry::EnvFuture<'a> {
                $crate::registry::set_github_token_env(self, env)
            }

            fn as_token_provider(
                self: std::sync::Arc<Self>,
            ) -> Option<std::sync::Arc<dyn $crate::provider::TokenProvider>> {
                Some(self)
            }
        }
    };
}
pub(crate) use github_token_plugin;

/// A plugin failed while provisioning.
#[derive(Debug, thiserror::Error)]
#[error("provision plugin {plugin}")]
pub struct PluginError {
    /// The failing plugin's name.
    pub plugin: String,
    /// Why it failed.
    #[source]
    pub source: ProviderError,
}

/// The ordered set of provision-time plugins.
#[derive(Default)]
pub struct Registry {
    plugins: RwLock<Vec<Arc<dyn ProvisionPlugin>>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.snapshot().iter().map(|p| p.name().to_owned()))
            .finish()
    }
}

impl Registry {
    /// An empty registry (no token provider: the endpoint answers 404).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `plugin`; plugins run, and are searched, in registration order.
    pub fn register(&self, plugin: Arc<dyn ProvisionPlugin>) {
        self.plugins
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(plugin);
    }

    /// The plugins registered so far, in order.
    pub fn snapshot(&self) -> Vec<Arc<dyn ProvisionPlugin>> {
        self.plugins
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The first registered plugin that is also a token provider.
    pub fn first_token_provider(&self) -> Option<Arc<dyn TokenProvider>> {
        self.snapshot()
            .into_iter()
            .find_map(|plugin| plugin.as_token_provider())
    }

    /// Runs every plugin's [`ProvisionPlugin::mutate_env`] on `env`, in
    /// order, stopping at the first failure.
    pub async fn mutate_env(&self, env: &mut BTreeMap<String, String>) -> Result<(), PluginError> {
        for plugin in self.snapshot() {
            plugin.mutate_env(env).await.map_err(|source| PluginError {
                plugin: plugin.name().to_owned(),
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::DevProvider;
    use std::time::Duration;

    struct Labeller;

    impl ProvisionPlugin for Labeller {
        fn name(&self) -> &str {
            "labeller"
        }
        fn mutate_env<'a>(&'a self, env: &'a mut BTreeMap<String, String>) -> EnvFuture<'a> {
            Box::pin(async move {
                env.insert("LABEL".into(), "yes".into());
                Ok(())
            })
        }
    }

    #[test]
    fn plain_plugins_are_not_token_providers() {
        let registry = Registry::new();
        assert!(registry.first_token_provider().is_none());
        registry.register(Arc::new(Labeller));
        assert!(registry.first_token_provider().is_none());
        registry.register(Arc::new(DevProvider::new(Duration::from_secs(600))));
        assert!(registry.first_token_provider().is_some());
    }

    #[tokio::test]
    async fn mutate_env_runs_every_plugin_in_order() {
        let registry = Registry::new();
        registry.register(Arc::new(Labeller));
        registry.register(Arc::new(DevProvider::new(Duration::from_secs(600))));
        let mut env = BTreeMap::new();
        registry.mutate_env(&mut env).await.unwrap();
        assert_eq!(env.get("LABEL").map(String::as_str), Some("yes"));
        let gh = env.get("GH_TOKEN").expect("GH_TOKEN set");
        assert!(gh.starts_with("ghs_"));
        assert_eq!(env.get("GITHUB_TOKEN"), Some(gh));
    }

    #[test]
    fn concurrent_registration_and_lookup() {
        let registry = Arc::new(Registry::new());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let registry = Arc::clone(&registry);
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        if i % 2 == 0 {
                            registry.register(Arc::new(Labeller));
                        } else {
                            let _ = registry.first_token_provider();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(registry.snapshot().len(), 4 * 200);
        assert!(registry.first_token_provider().is_none());
    }
}
