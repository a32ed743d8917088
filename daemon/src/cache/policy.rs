//! The cache's timing knobs and the limits no knob can move.
//!
//! The defaults are defined here once; the command line shows and uses
//! these same values.

use std::time::Duration;

use credd_core::deadlines;

/// Never schedule a refresh sooner than this after the previous one, whatever
/// the platform hands out: the bound that rules out a refresh loop.
pub(crate) const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);
/// A grant whose schedule calls again sooner than this is "short-lived";
/// from the second in a row the next call waits at least the back-off.
pub(crate) const SHORT_LIVED_DELAY: Duration = Duration::from_secs(10);
/// The least extra life a refresh asks the platform for beyond the token it
/// holds (see `State::min_remaining_to_ask`): whole-second rounding of the
/// stated expiry must not make the platform's current token look new enough.
pub(crate) const MIN_REMAINING_HEADROOM: Duration = Duration::from_secs(5);
/// Platform calls that clients may cause per [`CLIENT_CALL_WINDOW`].
pub(crate) const CLIENT_CALLS_PER_WINDOW: usize = 4;
/// The sliding window of [`CLIENT_CALLS_PER_WINDOW`].
pub(crate) const CLIENT_CALL_WINDOW: Duration = Duration::from_secs(60);
/// Longest lifetime believed: a platform claiming more (a bad clock, a bug)
/// still gets asked again within a day.
pub(crate) const MAX_TRUSTED_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Longest error text kept for status (chains of transport errors can be long).
pub(crate) const MAX_ERROR_TEXT: usize = 300;

/// Timing knobs, from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CachePolicy {
    /// Refresh this long before expiry (plus jitter).
    pub(crate) refresh_margin: Duration,
    /// Never serve a token with less life left.
    pub(crate) min_lifetime: Duration,
    /// How long a `get` waits for a usable token.
    pub(crate) wait_timeout: Duration,
    /// How long after start the bootstrap (env) token may be served.
    pub(crate) bootstrap_max_age: Duration,
    /// First back-off step.
    pub(crate) backoff_initial: Duration,
    /// Largest back-off step.
    pub(crate) backoff_max: Duration,
}

impl CachePolicy {
    /// The production defaults (`molecule-credd --help` shows them).
    pub(crate) const DEFAULT: Self = Self {
        refresh_margin: Duration::from_secs(10 * 60),
        min_lifetime: Duration::from_secs(60),
        wait_timeout: deadlines::DAEMON_WAIT_DEFAULT,
        bootstrap_max_age: Duration::from_secs(50 * 60),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(5 * 60),
    };
}
