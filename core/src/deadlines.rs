//! Time limits that span both processes, defined together so they fit.
//!
//! git waits on `credd`, which waits on the daemon, which may wait on a
//! refresh in flight. Each wait must end before the one around it, or the
//! outer side gives up first and the inner side's clear answer ("the
//! platform is failing: …") is lost as a bare timeout. The checks at the
//! bottom make a change that breaks that order fail to compile.

use std::time::Duration;

/// `credd`: connecting to the daemon and writing the request.
pub const HELPER_CONNECT: Duration = Duration::from_millis(250);
/// `credd`: reading the daemon's whole answer.
pub const HELPER_READ: Duration = Duration::from_secs(6);
/// The daemon: how long a `get` waits for a refresh in flight (default).
pub const DAEMON_WAIT_DEFAULT: Duration = Duration::from_secs(4);
/// The daemon: the longest `--wait-timeout` it accepts.
pub const DAEMON_WAIT_MAX: Duration = Duration::from_secs(5);
/// `molecule-credd --fetch-once`: reading `.auth_token`.
pub const BEARER_READ: Duration = Duration::from_secs(2);
/// `molecule-credd --fetch-once`: establishing the connection.
pub const FETCH_ONCE_CONNECT: Duration = Duration::from_secs(2);
/// `molecule-credd --fetch-once`: the whole HTTP call.
pub const FETCH_ONCE_TOTAL: Duration = Duration::from_secs(8);
/// `credd`: the hard stop for `molecule-credd --fetch-once`.
pub const HELPER_FETCH_ONCE: Duration = Duration::from_secs(12);

const fn shorter(inner: Duration, outer: Duration) -> bool {
    inner.as_nanos() < outer.as_nanos()
}

const _: () = assert!(
    shorter(DAEMON_WAIT_DEFAULT, HELPER_READ) && shorter(DAEMON_WAIT_MAX, HELPER_READ),
    "the daemon's wait must end before credd stops reading"
);
const _: () = assert!(
    shorter(DAEMON_WAIT_DEFAULT, DAEMON_WAIT_MAX),
    "the default wait is within the maximum"
);
const _: () = assert!(
    shorter(
        Duration::from_nanos((BEARER_READ.as_nanos() + FETCH_ONCE_TOTAL.as_nanos()) as u64),
        HELPER_FETCH_ONCE
    ),
    "--fetch-once bounds itself before credd kills it"
);
