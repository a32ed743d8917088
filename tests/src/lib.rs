//! Cross-crate integration tests for molecule-credd, credd and the platform.
//!
//! The tests live in `tests/tests/`: `it/` (behaviour, one integration-test
//! binary with a module per area, so it compiles once), `deploy.rs` (the
//! systemd units and the workspace entrypoint) and `tidy.rs` (the docs
//! checked against the tree); the helpers they share are the workspace's
//! `testkit`. They run the workspace's real binaries from `target/debug`,
//! which `cargo test --workspace` (the README's `scripts/test.sh`) builds.
//! This library is intentionally empty: nothing here is meant for other
//! crates; the drivers in `src/bin/` (soak, fleet, exec-bench,
//! forged-daemon) are the package's binaries.
#![forbid(unsafe_code)]
