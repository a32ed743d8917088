//! The platform side of GitHub token delivery.
//!
//! Workspaces get a GitHub App installation token at provision time, but such
//! a token dies after about an hour while workspaces live much longer. This
//! crate is the broker that hands out a live token on demand:
//!
//! - [`provider`]: the [`TokenProvider`](provider::TokenProvider) contract
//!   (never an expired token, refresh ahead of expiry, single flight).
//! - [`token_cache`]: the [`TokenCache`] that keeps that contract for every
//!   provider.
//! - [`provision`]: the token a workspace gets at provision time.
//! - [`github`]: the GitHub App provider (JWT → installation access token).
//! - [`github_permissions`]: GitHub's permission names and levels, generated
//!   from GitHub's API description.
//! - [`answer`]: each provider failure mapped to its one HTTP answer.
//! - [`grants`]: the grants file: which owners, repositories and
//!   permissions each workspace's tokens are scoped to.
//! - [`scope`]: what one token is minted for ([`MintScope`]) and GitHub's
//!   permission names and levels.
//! - [`scoped`]: one token cache per (installation, repositories,
//!   permissions), bounded, and the refusal rate limit; the
//!   [`ScopedProvider`](scoped::ScopedProvider) trait both providers
//!   implement to be a `TokenProvider`.
//! - [`shared`]: the token cache replicas share through Redis (sealed
//!   tokens, a mint lock, refusals announced to every replica).
//! - [`dev`]: a provider minting fake `ghs_` tokens for local runs and tests.
//! - [`auth`]: admin and per-workspace bearer checks.
//! - [`table_file`]: an operator's file (bearers, grants) read bounded,
//!   parsed whole and swapped whole on SIGHUP.
//! - [`metrics`]: the Prometheus metrics behind `GET /metrics`.
//! - [`service`]: the HTTP endpoints (axum) and, in `service/accept.rs`, a
//!   bounded server loop.
//! - [`config`]: the `molecule-platform` binary's configuration, and
//!   [`compose`]: the [`Platform`] it describes (provider, bearers,
//!   grants), the one composition root.

#![forbid(unsafe_code)]

pub mod answer;
pub mod auth;
pub mod compose;
pub mod config;
pub mod dev;
pub mod github;
pub mod github_permissions;
pub mod grants;
pub mod metrics;
pub mod provider;
pub mod provision;
pub mod scope;
pub mod scoped;
pub mod service;
pub mod shared;
pub mod table_file;
pub mod token_cache;

pub use auth::{Auth, WorkspaceTokens};
pub use compose::Platform;
pub use dev::DevProvider;
pub use github::{GitHubAppConfig, GitHubAppProvider};
pub use grants::{GrantError, GrantTable, Grants, GrantsFileError};
pub use provider::{
    Clock, IssuedToken, ProviderError, Refusal, RefusalOutcome, ServedToken, TokenProvider,
    TokenRequest,
};
pub use scope::MintScope;
pub use service::{AppState, ServiceLimits, app, serve};
pub use token_cache::TokenCache;
