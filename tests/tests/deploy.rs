//! Deployment tests: the systemd units, socket activation and
//! `sd_notify` as systemd's own tools see them, and the workspace entrypoint
//! run for real (no Docker: the pieces the image is made of).
//!
//! They run the real binaries from `target/debug` — `cargo build --workspace`
//! first — against `molecule-platform --dev` on loopback, with real git and
//! real Unix sockets. Tests needing a tool the machine lacks
//! (`systemd-analyze`, `systemd-socket-activate`, `shellcheck`) print
//! `SKIPPED … : reason` and pass; the root-only test does the same when not root.
#![forbid(unsafe_code)]

#[path = "deploy/activation.rs"]
mod activation;
#[path = "deploy/entrypoint.rs"]
mod entrypoint;
#[path = "deploy/support.rs"]
mod support;
#[path = "deploy/units.rs"]
mod units;
