//! `credd exec -- CMD ARGS…`: replace credd with CMD, a live token in its
//! environment.
//!
//! The token goes into `GH_TOKEN` and `GITHUB_TOKEN` of the child only — never
//! its argv (visible to every user in `ps`) and never credd's own environment.
//! `exec(2)` rather than spawn-and-wait: CMD gets credd's pid, signals and
//! terminal, and its exit code is the caller's without any forwarding.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use credd_core::config::Config;

use crate::chain::{self, Progress};

/// Runs CMD; returns only when it could not be started (or no token was had).
pub(crate) fn run(program: &OsString, args: &[OsString]) -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("credd: error: configuration -> {e}");
            return ExitCode::FAILURE;
        }
    };
    let issued = match chain::obtain_token(&config, Progress::OneLine) {
        Ok(issued) => issued,
        Err(reason) => {
            eprintln!(
                "credd: error: no GitHub token to run {} with: {reason}",
                program.to_string_lossy()
            );
            return ExitCode::FAILURE;
        }
    };
    let error = Command::new(program)
        .args(args)
        .env("GH_TOKEN", issued.token.expose())
        .env("GITHUB_TOKEN", issued.token.expose())
        .exec();
    let name = program.to_string_lossy();
    // The shells' conventions: 127 not found, 126 found but not executable.
    match error.kind() {
        io::ErrorKind::NotFound => {
            eprintln!("credd: error: {name}: command not found (check the name and PATH)");
            ExitCode::from(127)
        }
        io::ErrorKind::PermissionDenied => {
            eprintln!("credd: error: {name}: permission denied (is it executable?)");
            ExitCode::from(126)
        }
        _ => {
            eprintln!("credd: error: cannot run {name}: {error}");
            ExitCode::from(126)
        }
    }
}
