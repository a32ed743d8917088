//! Integration tests of the built `credd` binary.
//!
//! Every test runs the real executable (`CARGO_BIN_EXE_credd`) against a fake
//! daemon on a real Unix socket and a fake platform over real HTTP on
//! 127.0.0.1 (see [`support`]), and checks what a caller sees: stdout, the
//! `credd: ` lines on stderr (scanned for secrets), the exit code, and what
//! the daemon and platform were asked.
#![forbid(unsafe_code)]

mod support;

mod commands;
mod get;
