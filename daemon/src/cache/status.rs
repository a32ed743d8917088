//! What the cache reports: `credd status`, systemd's `STATUS=` line and the
//! watchdog's health — all read from the state, never the token itself.

use std::fmt::Write as _;

use credd_core::protocol::{PlatformHealth, Source, TokenState, TokenStatus};

use super::{Fetch, TokenCache, human_secs, local_expiry, scope_of_owner};

impl<F: Fetch> TokenCache<F> {
    /// Seconds since this cache was made (the default one's: the daemon's uptime).
    pub(crate) fn uptime_secs(&self) -> u64 {
        self.now().mono.duration_since(self.started).as_secs()
    }

    /// This token's state for `credd status` (never the token).
    pub(crate) fn status(&self) -> TokenStatus {
        let now = self.now();
        let st = self.lock();
        let current = st.usable(&self.policy, now);
        let scope = current.as_ref().map_or_else(
            || scope_of_owner(self.owner.as_deref().or(st.owner_seen.as_deref())),
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
            next_refresh_in_secs: Some(if st.in_flight {
                0
            } else {
                st.next_attempt
                    .saturating_duration_since(now.mono)
                    .as_secs()
            }),
            last_refresh_at: st.last_refresh_at,
            last_error: st.last_error.clone(),
            platform: st.health,
            platform_calls: st.platform_calls,
            served: st.served,
            scope,
            repositories_total: None,
        }
        .bounded()
    }

    /// One line for systemd's `STATUS=`.
    pub(crate) fn status_line(&self) -> String {
        let status = self.status();
        let mut line = match (status.source, status.expires_in_secs) {
            (Some(Source::Platform), Some(secs)) => {
                format!("token from platform, expires in {}", human_secs(secs))
            }
            (Some(Source::Env), Some(secs)) => {
                format!("bootstrap token from env, served for {}", human_secs(secs))
            }
            _ => "no usable token".to_owned(),
        };
        let _ = write!(line, "; platform {}", status.platform);
        if status.platform != PlatformHealth::Ok
            && let Some(error) = &status.last_error
        {
            let _ = write!(line, ": {error}");
        }
        line
    }

    /// Healthy for the systemd watchdog: a token can be served, or the
    /// platform has not (yet) failed.
    pub(crate) fn is_healthy(&self) -> bool {
        let st = self.lock();
        st.usable(&self.policy, self.now()).is_some()
            || matches!(
                st.health,
                PlatformHealth::Unknown | PlatformHealth::Ok | PlatformHealth::ShortLived
            )
    }
}
