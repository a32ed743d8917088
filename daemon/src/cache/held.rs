//! What a keeper holds: the platform's token, the provision-time one, and
//! what the platform's last answer said about accounts, with the pure
//! transitions that read and drop them.

use std::time::Duration;

use credd_core::protocol::{Scope, Source};
use credd_core::secret::Token;

use super::Sha256Hex;
use super::policy::{CachePolicy, MIN_REMAINING_HEADROOM};
use super::state::{Deadline, Now};
use crate::platform::Grant;

/// A token the cache holds (the platform's or the bootstrap one) and when it
/// stops living.
pub(super) struct HeldToken {
    pub(super) token: Token,
    pub(super) deadline: Deadline,
    /// What it may reach, as the platform stated it.
    pub(super) scope: Scope,
}

/// A token that may be served now.
pub(super) struct Usable {
    pub(super) token: Token,
    /// Life left (the lesser of both clocks).
    pub(super) left: Duration,
    pub(super) source: Source,
    pub(super) scope: Scope,
}

/// The tokens held and what the last platform answer said of them.
pub(super) struct Held {
    pub(super) cached: Option<HeldToken>,
    /// Dropped (and zeroed) once a platform token arrives or its age is up.
    pub(super) bootstrap: Option<HeldToken>,
    /// The account of the last platform token, kept after it expires.
    pub(super) owner_seen: Option<String>,
    /// The last platform token stated no account (a platform without
    /// grants, or an older one), kept after it expires or is erased.
    pub(super) unscoped_seen: bool,
    /// The SHA-256 of a dropped token, for the refresher to report.
    pub(super) refusal_to_report: Option<String>,
}

/// Life left until `deadline` at `now`: the lesser of the two clocks' answers.
pub(super) fn life_left(deadline: Deadline, now: Now) -> Duration {
    deadline
        .mono
        .saturating_duration_since(now.mono)
        .min(deadline.boot.saturating_sub(now.boot))
}

/// Drops `held` if its SHA-256 is `sha256`; its fingerprint when it did.
fn take_matching(held: &mut Option<HeldToken>, sha256: &str) -> Option<String> {
    held.take_if(|h| h.token.matches_sha256_hex(sha256))
        .map(|h| h.token.fingerprint())
}

impl Held {
    /// Nothing held yet but the provision-time token, if any.
    pub(super) fn new(bootstrap: Option<HeldToken>) -> Self {
        Self {
            cached: None,
            bootstrap,
            owner_seen: None,
            unscoped_seen: false,
            refusal_to_report: None,
        }
    }

    /// The token to serve now, if any, with its life left: the platform's
    /// while it has at least `min_lifetime` left, else the bootstrap token
    /// while it may be served.
    pub(super) fn usable(&self, policy: &CachePolicy, now: Now) -> Option<Usable> {
        if let Some(c) = &self.cached {
            let left = life_left(c.deadline, now);
            if left >= policy.min_lifetime {
                return Some(Usable {
                    token: c.token.clone(),
                    left,
                    source: Source::Platform,
                    scope: c.scope.clone(),
                });
            }
        }
        let b = self.bootstrap.as_ref()?;
        let left = life_left(b.deadline, now);
        (!left.is_zero()).then(|| Usable {
            token: b.token.clone(),
            left,
            source: Source::Env,
            scope: b.scope.clone(),
        })
    }

    /// How much life the platform's cached token must have for the next
    /// call to be worth answering with it: more than the token held now, so
    /// a refresh never gets back the very token it is replacing (which
    /// would cost a second call before expiry). `None` without a token.
    pub(super) fn min_remaining_to_ask(&self, now: Now) -> Option<Duration> {
        let held = life_left(self.cached.as_ref()?.deadline, now);
        Some(held + (held / 4).max(MIN_REMAINING_HEADROOM))
    }

    /// Drops the cached or bootstrap token whose SHA-256 is `sha256` (a
    /// client was refused with it); whether one was dropped.
    pub(super) fn erase(&mut self, sha256: &Sha256Hex) -> bool {
        let sha256 = sha256.0.as_str();
        if let Some(gone) = take_matching(&mut self.cached, sha256) {
            tracing::info!(
                fingerprint = gone,
                "dropped the cached token: a client reported it was refused"
            );
            self.refusal_to_report = Some(sha256.to_owned());
            true
        } else if let Some(gone) = take_matching(&mut self.bootstrap, sha256) {
            tracing::info!(
                fingerprint = gone,
                "dropped the bootstrap token: a client reported it was refused"
            );
            // The platform may still hold the provision-time token too.
            self.refusal_to_report = Some(sha256.to_owned());
            true
        } else {
            tracing::debug!("erase for a token that is not cached: kept the cached one");
            false
        }
    }

    /// Whether `token` is the platform's token held now.
    pub(super) fn holds(&self, token: &Token) -> bool {
        self.cached.as_ref().is_some_and(|c| &c.token == token)
    }

    /// Holds `grant`'s token until `deadline`; the bootstrap token goes.
    pub(super) fn hold(&mut self, grant: Grant, deadline: Deadline) {
        // A platform that states no account (no grants) speaks for every
        // account through this token, while it has one and after.
        self.owner_seen.clone_from(&grant.scope.owner);
        self.unscoped_seen = grant.scope.owner.is_none();
        self.cached = Some(HeldToken {
            token: grant.token,
            deadline,
            scope: grant.scope,
        });
        if self.bootstrap.take().is_some() {
            tracing::info!(
                "the platform's token replaces the bootstrap token from the environment"
            );
        }
    }

    /// The platform refuses this workspace the token now (a grant revoked
    /// or narrowed, the App uninstalled): neither held token is served again.
    pub(super) fn drop_refused(&mut self) {
        for (held, what) in [
            (&mut self.cached, "cached"),
            (&mut self.bootstrap, "bootstrap"),
        ] {
            if let Some(gone) = held.take() {
                tracing::warn!(
                    fingerprint = gone.token.fingerprint(),
                    "dropped the {what} token: the platform refuses this workspace that token now"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use tokio::time::Instant;

    use super::*;

    fn token(text: &str) -> Token {
        Token::new(text.to_owned()).expect("a token")
    }

    fn deadline(now: Now, secs: u64) -> Deadline {
        Deadline {
            mono: now.mono + Duration::from_secs(secs),
            boot: now.boot + Duration::from_secs(secs),
        }
    }

    fn grant(text: &str, owner: Option<&str>) -> Grant {
        Grant {
            token: token(text),
            expires_at: SystemTime::now(),
            lifetime: Duration::from_secs(3600),
            scope: Scope {
                owner: owner.map(str::to_owned),
                ..Scope::default()
            },
        }
    }

    #[test]
    fn the_platforms_token_replaces_the_bootstrap_one_and_is_served_while_it_may_be() {
        let now = Now {
            mono: Instant::now(),
            boot: Duration::from_secs(1000),
        };
        let policy = CachePolicy::DEFAULT;
        let mut held = Held::new(Some(HeldToken {
            token: token("ghs_bootstrap0000"),
            deadline: deadline(now, 3000),
            scope: Scope::default(),
        }));
        assert_eq!(
            held.usable(&policy, now).map(|u| u.source),
            Some(Source::Env)
        );
        held.hold(grant("ghs_platform0000", Some("acme")), deadline(now, 3600));
        assert!(held.bootstrap.is_none(), "the bootstrap token is gone");
        assert!(held.holds(&token("ghs_platform0000")));
        assert_eq!(held.owner_seen.as_deref(), Some("acme"));
        let usable = held.usable(&policy, now).expect("servable");
        assert_eq!(
            (usable.source, usable.left),
            (Source::Platform, Duration::from_secs(3600))
        );
        // Under --min-lifetime on either clock it is not served.
        let late = Now {
            mono: now.mono + Duration::from_secs(3600 - 59),
            boot: now.boot,
        };
        assert!(held.usable(&policy, late).is_none());
        let suspended = Now {
            mono: now.mono,
            boot: now.boot + Duration::from_secs(3600 - 59),
        };
        assert!(held.usable(&policy, suspended).is_none());
    }

    #[test]
    fn erase_takes_only_the_matching_token_and_a_refusal_drops_both() {
        let now = Now {
            mono: Instant::now(),
            boot: Duration::ZERO,
        };
        let mut held = Held::new(None);
        held.hold(grant("ghs_platform0000", None), deadline(now, 3600));
        assert!(held.unscoped_seen);
        assert!(!held.erase(&Sha256Hex::of(&token("ghs_other"))));
        assert!(held.erase(&Sha256Hex::of(&token("ghs_platform0000"))));
        assert!(held.cached.is_none());
        assert_eq!(
            held.refusal_to_report.as_deref(),
            Some(credd_core::secret::sha256_hex(b"ghs_platform0000").as_str())
        );
        held.hold(grant("ghs_platform0001", None), deadline(now, 3600));
        held.drop_refused();
        assert!(held.usable(&CachePolicy::DEFAULT, now).is_none());
    }
}
