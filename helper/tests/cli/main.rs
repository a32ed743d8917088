//! Integration tests of the built `credd` binary.
//!
//! Every test runs the real executable in a `testkit` sandbox against a fake
//! daemon on a real Unix socket (see [`support`]) and the workspace's test
//! platform over real HTTP on 127.0.0.1 (through `molecule-credd
//! --fetch-once`, so `cargo build --workspace` first), and checks what a
//! caller sees: stdout, the `credd: ` lines on stderr (scanned for secrets),
//! the exit code, and what the daemon and platform were asked.
#![forbid(unsafe_code)]

mod support;

mod commands;
mod get;
