//! Cross-crate integration tests for molecule-credd, credd and the platform.
//!
//! The tests are one integration-test binary, `tests/it/` (module per area,
//! shared harness in `tests/it/util.rs`), so the harness compiles once. They
//! run the workspace's real binaries from `target/debug`, hence the README's
//! `cargo build --workspace && cargo test --workspace`. This library is
//! intentionally empty: nothing here is meant for other crates.
#![forbid(unsafe_code)]
