//! The test kit every test suite of the workspace uses.
//!
//! Why it exists: the suites drive the real binaries, real git, real Unix
//! sockets and real HTTP on loopback, and each used to bring its own way of
//! finding binaries, capturing output, scanning for secrets, bounding a
//! child's run time, serving HTTP and standing in for the platform. Here each
//! of those exists once, so a fix to a wait or to the secret rule reaches
//! every suite:
//!
//! - [`bin`]: the workspace's binaries in `target/debug`, and tools on `PATH`;
//! - [`capture`]: a child's pipe read into memory, waitable line by line,
//!   and the [`capture::Transcript`] of everything one test captured;
//! - [`secrets`]: the one rule that says whether a text leaks a secret;
//! - [`process`]: children with deadlines ([`process::Cmd`]) and long-running
//!   ones killed on drop ([`process::Process`]);
//! - [`http`]: a loopback HTTP server on its own thread (TLS with [`tls`]'s
//!   test CA);
//! - [`platform`]: the platform doubles, in-process ([`TestPlatform`]) and the
//!   real binary ([`PlatformProcess`]);
//! - [`git`]: git's own smart-HTTP backend behind token auth;
//! - [`github_stand_in`]: GitHub's App API on loopback (re-exported crate),
//!   for tests running the platform in GitHub mode;
//! - [`client`]: raw protocol exchanges with a daemon's socket;
//! - [`prometheus`]: `promtool check metrics` and a reader for the samples;
//! - [`sandbox`], [`daemon`] and [`fixture`]: one test's private world, the
//!   daemon started in it, and the setup most daemon tests share.
//!
//! No helper sleeps to synchronise: waits block on a condition variable or a
//! channel the producer signals, and every wait has a deadline ([`WAIT`])
//! that fails the test saying what was awaited.
#![forbid(unsafe_code)]

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

pub mod bin;
pub mod capture;
pub mod client;
pub mod daemon;
pub mod fixture;
pub mod git;
pub mod haproxy;
pub mod http;
pub mod platform;
pub mod process;
pub mod prometheus;
pub mod redis;
pub mod sandbox;
pub mod secrets;
pub mod tls;

pub use self::redis::RedisServer;
pub use capture::{Captured, Transcript, has_word};
pub use daemon::{Daemon, DaemonBuilder, FAST_BACKOFF};
pub use fixture::{granted_platform, start_daemon, start_daemon_with, with_platform};
pub use git::GitServer;
pub use github_stand_in;
pub use haproxy::HaProxy;
pub use platform::{
    Fault, HandedOut, PlatformOptions, PlatformProcess, StandInProcess, TestPlatform,
    TokenAuthority,
};
pub use process::{Cmd, CmdOutput, Process};
pub use sandbox::{Sandbox, write_file};
pub use secrets::{Secrets, assert_secret, fingerprint, sha256_hex};
pub use tls::TestCa;

/// How long any single wait may take before the test fails. Generous: the CI
/// machine has two cores shared with parallel tests; a passing run never
/// waits this long.
pub const WAIT: Duration = Duration::from_secs(30);

/// Locks `m`, poisoned or not: a test that panicked while holding a lock has
/// already failed, and the data is still fine for reporting.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Blocks until the wall clock passes `when` — only for waiting out a
/// token's life, which is the behaviour under test (not synchronisation).
pub fn wait_until_time(when: SystemTime) {
    if let Ok(left) = when.duration_since(SystemTime::now()) {
        assert!(
            left <= WAIT,
            "refusing to wait {left:?} for a token to expire"
        );
        std::thread::sleep(left);
    }
}
