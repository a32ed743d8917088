//! What a workspace gets at provision time: the provider's current token as
//! `GITHUB_TOKEN` and `GH_TOKEN`, the names git tooling and `gh` read.
//!
//! The daemon keeps the token alive afterwards; this is the first token it
//! starts from (and the one it serves while the platform cannot be reached
//! at start).

use std::collections::BTreeMap;

use secrecy::ExposeSecret;

use crate::provider::{ProviderError, TokenProvider};

/// Sets `GITHUB_TOKEN` and `GH_TOKEN` in `env` to `provider`'s current
/// token; `env` is unchanged when the provider fails.
pub async fn set_github_token_env(
    provider: &dyn TokenProvider,
    env: &mut BTreeMap<String, String>,
) -> Result<(), ProviderError> {
    let issued = provider.token().await?;
    let token = issued.token.expose_secret();
    env.insert("GITHUB_TOKEN".into(), token.to_owned());
    env.insert("GH_TOKEN".into(), token.to_owned());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::DevProvider;
    use std::time::Duration;

    #[tokio::test]
    async fn both_names_get_the_providers_token_and_nothing_else_changes() {
        let provider = DevProvider::new(Duration::from_secs(600));
        let mut env = BTreeMap::from([("HOME".to_owned(), "/home/agent".to_owned())]);
        set_github_token_env(&provider, &mut env).await.unwrap();
        let gh = env.get("GH_TOKEN").expect("GH_TOKEN set");
        assert!(gh.starts_with("ghs_"));
        assert_eq!(env.get("GITHUB_TOKEN"), Some(gh));
        assert_eq!(env.get("HOME").map(String::as_str), Some("/home/agent"));
        assert_eq!(env.len(), 3);
    }
}
