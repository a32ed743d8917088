//! The workspace's binaries, and other programs on `PATH`.
//!
//! Why: the suites run the real `molecule-credd`, `credd` and
//! `molecule-platform` from `target/debug`. `cargo test -p X` builds only
//! X's own binaries, so a suite can find another package's binary missing
//! (or stale); `cargo test --workspace` (the README's `scripts/test.sh`)
//! builds them all, and a missing binary says so instead of failing
//! somewhere obscure.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The workspace root (the folder holding this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testkit crate lives inside the workspace")
        .to_owned()
}

/// The cargo target folder: `CARGO_TARGET_DIR`, else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// `target/debug`.
pub fn debug_dir() -> PathBuf {
    target_dir().join("debug")
}

/// A workspace binary in `target/debug`, failing clearly when it is absent.
pub fn binary(name: &str) -> PathBuf {
    let path = debug_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the tests with scripts/test.sh (`cargo test --workspace` builds every binary the tests run)",
        path.display()
    );
    path
}

/// `target/debug/molecule-credd`.
pub fn daemon() -> PathBuf {
    binary("molecule-credd")
}

/// `target/debug/credd`.
pub fn credd() -> PathBuf {
    binary("credd")
}

/// `target/debug/molecule-platform`.
pub fn platform() -> PathBuf {
    binary("molecule-platform")
}

/// `target/debug/github-stand-in` (the GitHub stand-in as a process).
pub fn github_stand_in() -> PathBuf {
    binary("github-stand-in")
}

/// Whether `program` is an executable on `PATH`.
pub fn have_tool(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Fails the test unless `program` is on `PATH`, naming the Debian package
/// that brings it and the script that installs it.
///
/// Why not skip: a skipped check is a check nobody ran, and a green run that
/// skipped half the deployment tests says nothing. `scripts/test.sh` (the
/// README's test command) installs every tool the tests use, so a missing
/// one means the suite was started some other way.
pub fn require_tool(program: &str, package: &str) {
    assert!(
        have_tool(program),
        "{program} is not installed: run the tests with scripts/test.sh, which installs it \
         (Debian package {package})"
    );
}

/// Fails the test unless it runs as root (processes under other uids, users
/// made with useradd); `scripts/test.sh` refuses to start otherwise.
pub fn require_root(what: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{what} needs root: run the tests with scripts/test.sh as root"
    );
}
