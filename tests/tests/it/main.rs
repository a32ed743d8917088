//! Cross-crate integration tests for molecule-credd and credd.
//!
//! One test binary, one module per area, on the workspace's `testkit`. Every
//! test runs the real binaries from `target/debug` — run `cargo build
//! --workspace` first — against real git, real Unix sockets and the platform
//! service on loopback, and every test's captured output is scanned for
//! tokens and bearers.
#![forbid(unsafe_code)]

mod daemon;
mod fallback;
mod gh;
mod git;
mod git_versions;
mod github;
mod harness;
mod metrics;
mod owners;
mod sealed;
mod secrets;
mod socket;
mod trust;
