//! The setup most daemon tests share: sandbox, platform, daemon.
//!
//! Why: dozens of tests begin the same way — a sandbox using a test
//! platform, and a daemon on it started and ready — and differ only in the
//! platform's fault and the daemon's flags. [`start_daemon`] is that
//! beginning in one line; [`with_platform`] is its first half, for tests
//! that start the daemon their own way (or test the helper without one).
//!
//! Bind the results in the order they come — `let (sandbox, platform,
//! daemon) = …` — so they drop in reverse: the daemon first and the sandbox
//! (which scans every captured output) last. Bind an unused one to `_name`,
//! not `_`, which would drop it at once.

use crate::daemon::{Daemon, DaemonBuilder, FAST_BACKOFF};
use crate::platform::{PlatformOptions, TestPlatform};
use crate::sandbox::Sandbox;

/// A fresh sandbox using `platform`, and the platform.
pub fn with_platform(platform: TestPlatform) -> (Sandbox, TestPlatform) {
    let sandbox = Sandbox::new();
    sandbox.use_platform(&platform);
    (sandbox, platform)
}

/// A platform with `grants` (a grants file's TOML) and a fresh sandbox using
/// it as the granted workspace ([`Sandbox::use_platform_as_workspace`]).
pub fn granted_platform(grants: &str) -> (Sandbox, TestPlatform) {
    let platform = TestPlatform::with_options(PlatformOptions {
        grants: Some(grants.to_owned()),
        ..PlatformOptions::default()
    });
    let (sandbox, platform) = with_platform(platform);
    sandbox.use_platform_as_workspace(&platform);
    (sandbox, platform)
}

/// A fresh sandbox using `platform`, and a daemon started (ready) on it
/// with `args` and [`FAST_BACKOFF`] (unless `args` set their own back-off).
pub fn start_daemon(platform: TestPlatform, args: &[&str]) -> (Sandbox, TestPlatform, Daemon) {
    start_daemon_with(platform, |daemon| daemon.args(args))
}

/// Like [`start_daemon`], the daemon's builder adjusted by `adjust` (flags,
/// environment, another uid).
pub fn start_daemon_with(
    platform: TestPlatform,
    adjust: impl FnOnce(DaemonBuilder<'_>) -> DaemonBuilder<'_>,
) -> (Sandbox, TestPlatform, Daemon) {
    let (sandbox, platform) = with_platform(platform);
    let mut builder = adjust(sandbox.daemon());
    if !builder.has_arg("--backoff-initial") {
        builder = builder.args(FAST_BACKOFF);
    }
    let daemon = builder.start();
    (sandbox, platform, daemon)
}
