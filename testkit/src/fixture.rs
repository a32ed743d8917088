//! The setup most daemon tests share: sandbox, platform, daemon.
//!
//! Why: dozens of tests begin the same way — a sandbox using a test
//! platform, and a daemon on it started and ready — and differ only in the
//! platform's fault and the daemon's flags. [`Running::start`] is that
//! beginning in one line; the test then destructures it.

use crate::daemon::{Daemon, DaemonBuilder, FAST_BACKOFF};
use crate::platform::TestPlatform;
use crate::sandbox::Sandbox;

/// A sandbox using `platform`, with a ready daemon.
///
/// Destructure it in field order — `let Running { sandbox, platform,
/// daemon } = …` — so the daemon drops first and the sandbox (which scans
/// every captured output) last; bind an unused field to `_name`, not `_`,
/// which would drop it at once.
pub struct Running {
    /// The test's world.
    pub sandbox: Sandbox,
    /// The platform the sandbox (and so the daemon) uses.
    pub platform: TestPlatform,
    /// The daemon, ready.
    pub daemon: Daemon,
}

impl Running {
    /// `platform` in a fresh sandbox, and a daemon started on it with `args`
    /// and [`FAST_BACKOFF`] (unless `args` set their own back-off).
    pub fn start(platform: TestPlatform, args: &[&str]) -> Self {
        Self::start_with(platform, |daemon| daemon.args(args))
    }

    /// Like [`Self::start`], the daemon's builder adjusted by `adjust`
    /// (flags, environment, another uid).
    pub fn start_with(
        platform: TestPlatform,
        adjust: impl FnOnce(DaemonBuilder<'_>) -> DaemonBuilder<'_>,
    ) -> Self {
        let sandbox = Sandbox::new();
        sandbox.use_platform(&platform);
        let mut builder = adjust(sandbox.daemon());
        if !builder.has_arg("--backoff-initial") {
            builder = builder.args(FAST_BACKOFF);
        }
        let daemon = builder.start();
        Self {
            sandbox,
            platform,
            daemon,
        }
    }
}
