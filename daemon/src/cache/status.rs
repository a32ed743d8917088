//! What the cache reports: `credd status`, systemd's `STATUS=` line and the
//! watchdog's health — all read from the state, never the token itself.

use std::fmt::Write as _;

use credd_core::protocol::{PlatformHealth, Source, TokenState, TokenStatus};

use super::{Fetch, TokenKeeper, human_secs, local_expiry, scope_of_owner};

impl<F: Fetch> TokenKeeper<F> {
    /// This token's state for `credd status` (never the token).
    pub(crate) fn status(&self) -> TokenStatus {
        let now = self.now();
        let st = self.lock();
        let current = st.usable(&self.policy, now);
        let scope = current.as_ref().map_or_else(
            || scope_of_owner(self.lifecycle.owner().or(st.held.owner_seen.as_deref())),
            |c| c.scope.clone(),
        );
        TokenStatus {
            state: Some(if current.is_some() {
                TokenState::Valid
            } else {
                TokenState::Missing
            }),
            source: current.as_ref().map(|c| c.source),
            fingerprint: current.as_ref().map(|c| c.token.fingerprint()),
            expires_at: current.as_ref().map(|c| local_expiry(c.left)),
            expires_in_secs: current.as_ref().map(|c| c.left.as_secs()),
            next_refresh_in_secs: Some(if st.schedule.in_flight {
                0
            } else {
                st.schedule
                    .next_attempt
                    .saturating_duration_since(now.mono)
                    .as_secs()
            }),
            last_refresh_at: st.report.last_refresh_at,
            last_error: st.report.last_error.clone(),
            platform: st.report.health,
            platform_calls: st.report.platform_calls,
            served: st.report.served,
            scope,
            repositories_total: None,
        }
        .bounded()
    }

    /// Healthy for the systemd watchdog: a token can be served, or the
    /// platform has not (yet) failed.
    pub(crate) fn is_healthy(&self) -> bool {
        let st = self.lock();
        st.usable(&self.policy, self.now()).is_some()
            || matches!(
                st.report.health,
                PlatformHealth::Unknown | PlatformHealth::Ok | PlatformHealth::ShortLived
            )
    }
}

/// One line for systemd's `STATUS=`: the default token, then each account's
/// (`acme expires in 48m`, `labs no token (platform not_granted)`).
pub(super) fn line(default: &TokenStatus, owners: &[TokenStatus]) -> String {
    let mut line = match (default.source, default.expires_in_secs) {
        (Some(Source::Platform), Some(secs)) => {
            format!("token from platform, expires in {}", human_secs(secs))
        }
        (Some(Source::Env), Some(secs)) => {
            format!("bootstrap token from env, served for {}", human_secs(secs))
        }
        _ => "no usable token".to_owned(),
    };
    let _ = write!(line, "; platform {}", default.platform);
    if default.platform != PlatformHealth::Ok
        && let Some(error) = &default.last_error
    {
        let _ = write!(line, ": {error}");
    }
    for (i, owner) in owners.iter().enumerate() {
        let name = owner.scope.owner.as_deref().unwrap_or("-");
        let _ = write!(
            line,
            "{}{name} ",
            if i == 0 { "; accounts: " } else { ", " }
        );
        match owner.expires_in_secs {
            Some(secs) => {
                let _ = write!(line, "expires in {}", human_secs(secs));
            }
            None => {
                let _ = write!(line, "no token (platform {})", owner.platform);
            }
        }
    }
    line
}
