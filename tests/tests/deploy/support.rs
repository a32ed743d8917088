//! What the deployment tests add to the workspace's `testkit`: `credd`
//! against a socket alone, and a folder other users can traverse.
//!
//! The entrypoint's output goes to files (`testkit::Cmd::capture_in`) rather
//! than pipes on purpose: it leaves a supervisor and a daemon running that
//! inherit its stdout/stderr, so a pipe would never reach EOF while they live.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use testkit::{Cmd, CmdOutput, bin};

/// `credd ARGS` against `socket` with nothing else configured: the platform
/// URL is unreachable on purpose, so an answer must come from the daemon.
pub(crate) fn credd(socket: &Path, configs_dir: &Path, args: &[&str]) -> CmdOutput {
    let mut command = Command::new(bin::credd());
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CREDD_SOCKET", socket)
        .env("PLATFORM_URL", "http://127.0.0.1:9")
        .env("CONFIGS_DIR", configs_dir);
    Cmd::new(command, format!("credd {}", args.join(" "))).run()
}

/// Makes `path` and its parents up to `/` traversable by other users (the
/// privilege-drop test's agent must reach files in a root-owned temp dir).
pub(crate) fn open_for_others(path: &Path) {
    let mut perms = std::fs::metadata(path).expect("metadata").permissions();
    perms.set_mode(perms.mode() | 0o755);
    std::fs::set_permissions(path, perms).expect("chmod");
}
