//! `molecule-credd` started in a sandbox.
//!
//! Why: the daemon is a real process in the tests, with the sandbox's
//! environment and nothing else; its output goes into the sandbox's
//! transcript (so the secret scan sees its log), and it is ready only once
//! it logged `listening on` *and* answers a protocol `status`, so no test
//! races its start-up.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitStatus;

use credd_core::protocol::{Request, Response};
use nix::sys::signal::Signal;

use crate::client::request_over;
use crate::process::Process;
use crate::sandbox::Sandbox;
use crate::{WAIT, bin};

/// Back-off flags for tests that are not about back-off, so a failing call is
/// retried quickly.
pub const FAST_BACKOFF: [&str; 4] = ["--backoff-initial", "100ms", "--backoff-max", "1s"];

/// A `molecule-credd` about to start.
pub struct DaemonBuilder<'a> {
    sandbox: &'a Sandbox,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    uid: Option<u32>,
    open_files: Option<(u32, u32)>,
}

impl Sandbox {
    /// A daemon configured from the sandbox (its flags are the test's).
    pub fn daemon(&self) -> DaemonBuilder<'_> {
        DaemonBuilder {
            sandbox: self,
            args: Vec::new(),
            env: Vec::new(),
            uid: None,
            open_files: None,
        }
    }
}

impl DaemonBuilder<'_> {
    /// Adds command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Whether the arguments so far include `flag`.
    pub fn has_arg(&self, flag: &str) -> bool {
        self.args.iter().any(|a| a == flag)
    }

    /// Adds (or overrides) an environment variable.
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.into(), value.as_ref().to_owned()));
        self
    }

    /// Runs the daemon as another user (tests run as root).
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// Starts the daemon with `RLIMIT_NOFILE` at `soft` and `hard` (through
    /// the shell's `ulimit`, which then execs it: same pid).
    pub fn open_files(mut self, soft: u32, hard: u32) -> Self {
        self.open_files = Some((soft, hard));
        self
    }

    /// Spawns without waiting for readiness.
    pub fn spawn(self) -> Daemon {
        let mut command = match self.open_files {
            None => self.sandbox.command(bin::daemon()),
            Some((soft, hard)) => {
                let mut shell = self.sandbox.command("/bin/sh");
                // Soft first: a hard limit below the current soft one fails.
                shell
                    .arg("-c")
                    .arg(format!(
                        "ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\""
                    ))
                    .arg(bin::daemon());
                shell
            }
        };
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(uid) = self.uid {
            command.uid(uid).gid(uid);
        }
        let transcript = self.sandbox.transcript();
        // Two entries per daemon: the n-th daemon of this test is #n/2.
        let label = format!("molecule-credd #{}", transcript.len() / 2);
        let process = Process::spawn(command, label);
        process.record(transcript);
        Daemon {
            process,
            socket: self.sandbox.socket(),
        }
    }

    /// Spawns and waits until the daemon logged `listening on` and answers
    /// a `status` request on its socket.
    pub fn start(self) -> Daemon {
        let daemon = self.spawn();
        daemon.wait_ready();
        daemon
    }
}

/// A running `molecule-credd`. Dropping it kills it; [`Daemon::stop`] is the
/// clean path (SIGTERM, exit 0).
pub struct Daemon {
    process: Process,
    socket: PathBuf,
}

impl Daemon {
    /// The daemon's stderr (its log).
    pub fn log(&self) -> &crate::capture::Captured {
        self.process.stderr()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits for the `listening on` line, then for a status answer.
    pub fn wait_ready(&self) {
        self.log().wait_for_line("listening on", WAIT);
        // The log line is printed once the listener is bound; a status
        // round trip proves the accept loop runs too.
        match request_over(&self.socket, &Request::Status) {
            Ok(Response::Status(_)) => {}
            other => panic!(
                "daemon logged `listening on` but its socket does not answer a status request: {other:?}\n--- log\n{}",
                self.log().text()
            ),
        }
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: Signal) {
        self.process.signal(signal);
    }

    /// Waits (on its exit and closed pipes) for the daemon to exit; its
    /// status and log.
    pub fn wait_exit(mut self) -> (ExitStatus, String) {
        let status = self.process.wait(WAIT);
        (status, self.log().text())
    }

    /// SIGTERM, then asserts exit 0 and that the socket file is gone.
    pub fn stop(self) {
        self.signal(Signal::SIGTERM);
        let socket = self.socket.clone();
        let (status, log) = self.wait_exit();
        assert!(
            status.success(),
            "molecule-credd should exit 0 on SIGTERM, got {status:?}\n--- log\n{log}"
        );
        assert!(
            !socket.exists(),
            "molecule-credd left its socket {} behind after SIGTERM",
            socket.display()
        );
    }
}
