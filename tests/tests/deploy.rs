//! Deployment tests: the systemd units, socket activation and
//! `sd_notify` as systemd's own tools see them, and the workspace entrypoint
//! run for real (no Docker: the pieces the image is made of).
//!
//! They run the real binaries from `target/debug` (`scripts/test.sh` builds
//! them all) against `molecule-platform --dev` on loopback, with real git and
//! real Unix sockets. A test whose tool is missing
//! (`systemd-analyze`, `systemd-socket-activate`, `shellcheck`, `setpriv`) or
//! that needs root and lacks it fails, naming the package: `scripts/test.sh`
//! installs them, and a skipped check is a check nobody ran.
#![forbid(unsafe_code)]

#[path = "deploy/activation.rs"]
mod activation;
#[path = "deploy/entrypoint.rs"]
mod entrypoint;
#[path = "deploy/support.rs"]
mod support;
#[path = "deploy/units.rs"]
mod units;
