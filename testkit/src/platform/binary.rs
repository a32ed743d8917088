//! The real `molecule-platform` binary, running.
//!
//! Why: deployment tests point the real daemon at the real platform
//! (`--dev`), and the platform's own suite checks what only the binary does
//! (start-up lines, signals, hardening, configuration errors). Both start it
//! with a cleared environment, wait for its two start-up lines, and kill it
//! when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use nix::sys::signal::Signal;

use crate::process::Process;
use crate::secrets::Secrets;
use crate::{WAIT, bin};

/// Environment variables the binary reads; cleared so the caller's
/// environment cannot leak into a test.
const PLATFORM_VARS: &[&str] = &[
    "PLATFORM_LISTEN",
    "ADMIN_TOKEN",
    "PLATFORM_WORKSPACE_TOKENS_FILE",
    "PLATFORM_GRANTS_FILE",
    "GITHUB_APP_ID",
    "GITHUB_APP_CLIENT_ID",
    "GITHUB_APP_INSTALLATION_ID",
    "GITHUB_APP_PRIVATE_KEY_FILE",
    "GITHUB_API_URL",
    "LOG_FORMAT",
    "RUST_LOG",
];

/// A running `molecule-platform` with captured stdout/stderr; killed on drop.
pub struct PlatformProcess {
    process: Process,
    first_line: String,
    second_line: String,
    configs_dir: Option<PathBuf>,
    /// Scanned at drop: its bearer, for [`Self::dev`].
    secrets: Option<Secrets>,
}

impl PlatformProcess {
    /// `molecule-platform ARGS` with `env` on top of the test's environment
    /// less the variables the platform reads.
    pub fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
        configure(Command::new(bin::platform()), args, env)
    }

    /// Like [`Self::command`], started by `sh` under an open-file limit of
    /// `nofile` (soft and hard: `ulimit -n`, then `exec`, so the pid is the
    /// platform's).
    pub fn command_with_nofile(nofile: u32, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(bin::platform());
        configure(command, args, env)
    }

    /// Spawns with `args` and `env` and waits for the start-up lines.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_command(Self::command(args, env))
    }

    /// Spawns `command` (from [`Self::command`], adjusted by the caller:
    /// another uid, say) and waits for its two start-up lines on stdout,
    /// failing with its stderr when it exits first.
    pub fn spawn_command(command: Command) -> Self {
        let process = Process::spawn(command, "molecule-platform");
        let lines = process
            .stdout()
            .wait_until(WAIT, |text, closed| text.matches('\n').count() >= 2 || closed)
            .ok()
            .filter(|text| text.matches('\n').count() >= 2)
            .unwrap_or_else(|| {
                panic!(
                    "molecule-platform printed no start-up lines within {WAIT:?}; stdout:\n{}\nstderr:\n{}",
                    process.stdout().text(),
                    process.stderr().text()
                )
            });
        let mut lines = lines.lines().map(str::to_owned);
        let first_line = lines.next().expect("a first line");
        let second_line = lines.next().expect("a second line");
        Self {
            process,
            first_line,
            second_line,
            configs_dir: None,
            secrets: None,
        }
    }

    /// `molecule-platform --dev` on a loopback port, minting tokens that live
    /// `ttl` (humantime) and writing its bearer into
    /// `configs_dir/.auth_token`; the bearer is added to `secrets`, and its
    /// output is scanned for them when it is dropped.
    pub fn dev(configs_dir: &Path, ttl: &str, secrets: &Secrets) -> Self {
        Self::dev_with_args(configs_dir, ttl, secrets, &[])
    }

    /// Like [`Self::dev`] with a grants file (`--grants-file`; send
    /// [`Signal::SIGHUP`] after changing it).
    pub fn dev_with_grants(
        configs_dir: &Path,
        ttl: &str,
        secrets: &Secrets,
        grants_file: &Path,
    ) -> Self {
        let grants = grants_file.to_str().expect("UTF-8 path");
        Self::dev_with_args(configs_dir, ttl, secrets, &["--grants-file", grants])
    }

    /// Like [`Self::dev`] with `extra` arguments after the dev ones.
    pub fn dev_with_args(configs_dir: &Path, ttl: &str, secrets: &Secrets, extra: &[&str]) -> Self {
        std::fs::create_dir_all(configs_dir).expect("configs dir");
        let bearer_file = configs_dir.join(".auth_token");
        let bearer_arg = bearer_file.to_str().expect("UTF-8 path");
        let mut args = vec![
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--dev-token-ttl",
            ttl,
            "--dev-auth-token-file",
            bearer_arg,
        ];
        args.extend_from_slice(extra);
        let mut platform = Self::spawn(&args, &[]);
        let bearer =
            std::fs::read_to_string(&bearer_file).expect("the dev platform wrote its bearer");
        secrets.add("the dev platform's bearer", bearer.trim());
        platform.configs_dir = Some(configs_dir.to_owned());
        platform.secrets = Some(secrets.clone());
        platform
    }

    /// `http://ADDR` from the first line.
    pub fn url(&self) -> String {
        self.first_line
            .strip_prefix("molecule-platform listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {:?}", self.first_line))
            .to_owned()
    }

    /// Its first stdout line (`molecule-platform listening on URL`).
    pub fn first_line(&self) -> &str {
        &self.first_line
    }

    /// Its second stdout line (how to point a daemon at it).
    pub fn second_line(&self) -> &str {
        &self.second_line
    }

    /// The folder holding `.auth_token` (for [`Self::dev`]).
    pub fn configs_dir(&self) -> &Path {
        self.configs_dir
            .as_deref()
            .expect("a dev platform started with PlatformProcess::dev")
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) {
        self.process.signal(signal);
    }

    /// Stdout so far.
    pub fn stdout(&self) -> String {
        self.process.stdout().text()
    }

    /// Stderr so far.
    pub fn stderr(&self) -> String {
        self.process.stderr().text()
    }

    /// Waits until stderr has a line containing `needle`; all of stderr then.
    pub fn wait_for_stderr(&self, needle: &str) -> String {
        self.process.stderr().wait_for_line(needle, WAIT);
        self.stderr()
    }

    /// Sends `signal` and waits for the exit and for all output.
    pub fn stop(&mut self, signal: Signal) -> ExitStatus {
        self.process.stop(signal, WAIT)
    }
}

impl Drop for PlatformProcess {
    fn drop(&mut self) {
        self.process.kill();
        if let Some(secrets) = &self.secrets
            && !std::thread::panicking()
        {
            secrets.assert_clean("platform stdout", &self.stdout());
            secrets.assert_clean("platform stderr", &self.stderr());
        }
    }
}

fn configure(mut command: Command, args: &[&str], env: &[(&str, &str)]) -> Command {
    for var in PLATFORM_VARS {
        command.env_remove(var);
    }
    command.args(args).envs(env.iter().copied());
    command
}

/// The `github-stand-in` binary, running (killed on drop), and the line it
/// printed first: `github-stand-in listening on URL keys DIR`.
pub struct StandInProcess {
    /// The process.
    pub process: Process,
    /// Its first line, whole.
    pub line: String,
    /// `http://127.0.0.1:PORT`, the line's fourth word.
    pub url: String,
}

impl StandInProcess {
    /// Starts the stand-in with `args` and waits for its first line.
    pub fn spawn(args: &[&str]) -> Self {
        let mut command = Command::new(bin::github_stand_in());
        command.args(args);
        let process = Process::spawn(command, "github-stand-in");
        let line = process
            .stdout()
            .wait_until(WAIT, |text, closed| text.contains('\n') || closed)
            .expect("the stand-in's line");
        let url = line
            .split_whitespace()
            .nth(3)
            .expect("the stand-in's URL")
            .to_owned();
        Self { process, line, url }
    }
}
