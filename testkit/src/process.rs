//! Child processes that cannot hang a test.
//!
//! Why: every suite runs children — `credd`, git, the daemon, the platform,
//! systemd's tools, the workspace entrypoint — and a child that never exits
//! must fail its test after [`WAIT`](crate::WAIT), not stall the run. A
//! [`Cmd`] runs to completion within a deadline with its output captured
//! (into the test's [`Transcript`] for the secret scan); a [`Process`] is a
//! long-running child whose output is waitable and which is killed when
//! dropped, so a failing test leaves nothing behind.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::WAIT;
use crate::capture::{Captured, Transcript};
use crate::secrets::{fingerprint, redact_passwords};

/// What a finished child produced. `Debug` shows `password=` values only as
/// a fingerprint, so a failing assertion does not print a token.
pub struct CmdOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl std::fmt::Debug for CmdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmdOutput")
            .field("status", &self.status)
            .field("stdout", &redact_passwords(&self.stdout))
            .field("stderr", &self.stderr)
            .finish()
    }
}

impl CmdOutput {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }

    /// Status and both streams, for failure messages (passwords redacted).
    pub fn transcript(&self) -> String {
        format!(
            "status: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            redact_passwords(&self.stdout),
            self.stderr
        )
    }

    /// Panics (showing fingerprints, never the token) unless stdout has
    /// `password=<expected>`.
    #[track_caller]
    pub fn assert_password(&self, expected: &str, what: &str) {
        let got = self.attribute("password");
        assert!(
            got == Some(expected),
            "{what}: expected password <{}>, got {:?}\n{self:?}",
            fingerprint(expected),
            got.map(fingerprint)
        );
    }

    /// Panics with both outputs unless the child exited 0.
    #[track_caller]
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what}: expected exit 0, got {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            redact_passwords(&self.stdout),
            self.stderr
        );
        self
    }

    /// The value of the first `key=value` line on stdout.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }

    /// Like [`Self::attribute`], failing the test when there is none.
    #[track_caller]
    pub fn value(&self, key: &str) -> String {
        self.attribute(key)
            .unwrap_or_else(|| panic!("no `{key}=` line in:\n{}", self.transcript()))
            .to_owned()
    }
    /// Whether stderr has a line saying `ERROR` and `needle` (the
    /// entrypoint's error lines).
    pub fn has_error_line(&self, needle: &str) -> bool {
        self.stderr
            .lines()
            .any(|l| l.contains("ERROR") && l.contains(needle))
    }
}

/// A command about to be run with a deadline and captured output.
pub struct Cmd<'a> {
    command: Command,
    label: String,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    transcript: Option<&'a Transcript>,
    stdout_holds_secret: bool,
    stdout: Option<Stdio>,
    files: Option<PathBuf>,
}

impl<'a> Cmd<'a> {
    /// Wraps `command`; `label` names it in failures and in the transcript.
    pub fn new(command: Command, label: impl Into<String>) -> Self {
        Self {
            command,
            label: label.into(),
            stdin: None,
            timeout: WAIT,
            transcript: None,
            stdout_holds_secret: false,
            stdout: None,
            files: None,
        }
    }

    /// Bytes written to the child's stdin (then closed); without this, stdin
    /// is `/dev/null`.
    pub fn stdin(mut self, bytes: impl AsRef<[u8]>) -> Self {
        self.stdin = Some(bytes.as_ref().to_vec());
        self
    }

    /// A deadline other than [`WAIT`]: a hang guard for work whose length
    /// is the load (a 200 MB transfer in a debug build on a busy machine),
    /// never a speed check.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Records stderr (and stdout, see [`Self::stdout_holds_secret`]) for the
    /// secret scan.
    pub fn transcript(mut self, transcript: &'a Transcript) -> Self {
        self.transcript = Some(transcript);
        self
    }

    /// stdout is where this command legitimately prints a token (`credd get`,
    /// `git credential fill`): keep it out of the secret scan.
    pub fn stdout_holds_secret(mut self) -> Self {
        self.stdout_holds_secret = true;
        self
    }

    /// Gives the child this stdout instead of capturing it (a pipe whose
    /// reader is gone, say); [`CmdOutput::stdout`] is then empty.
    pub fn stdout(mut self, stdout: impl Into<Stdio>) -> Self {
        self.stdout = Some(stdout.into());
        self
    }

    /// Captures stdout and stderr in files `dir/LABEL.out` and `.err`
    /// instead of pipes: for a child that leaves processes running that
    /// inherit its output, so a pipe would not reach EOF while they live.
    /// The deadline then bounds the child's own exit.
    pub fn capture_in(mut self, dir: &Path) -> Self {
        self.files = Some(dir.to_owned());
        self
    }

    /// Mutable access for extra environment variables and arguments.
    pub fn command(&mut self) -> &mut Command {
        &mut self.command
    }

    /// Runs to completion, or panics after the deadline (killing the child).
    pub fn run(mut self) -> CmdOutput {
        if let Some(dir) = self.files.take() {
            return self.run_with_files(&dir);
        }
        let label = self.label.clone();
        let captures_stdout = self.stdout.is_none();
        let stdout = self.stdout.take().unwrap_or_else(Stdio::piped);
        let mut child = self.start(stdout, Stdio::piped());
        let stdout = child.stdout.take().map(Captured::spawn).unwrap_or_default();
        let stderr = Captured::spawn(child.stderr.take().expect("piped"));
        if let Some(t) = self.transcript {
            t.record(format!("{label} (stderr)"), &stderr);
            if captures_stdout && !self.stdout_holds_secret {
                t.record(format!("{label} (stdout)"), &stdout);
            }
        }
        let deadline = Instant::now() + self.timeout;
        let closed = |c: &Captured| {
            c.wait_until(
                deadline.saturating_duration_since(Instant::now()),
                |_, closed| closed,
            )
            .is_ok()
        };
        let finished = (!captures_stdout || closed(&stdout)) && closed(&stderr);
        if !finished {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{label} did not finish within {:?}\n--- stderr\n{}",
                self.timeout,
                stderr.text()
            );
        }
        let status = child.wait().expect("wait for child");
        CmdOutput {
            status,
            stdout: stdout.text(),
            stderr: stderr.text(),
        }
    }

    /// Spawns with `stdout` and `stderr`, and feeds stdin from a thread of
    /// its own, so a child that never reads cannot block the test.
    fn start(&mut self, stdout: Stdio, stderr: Stdio) -> Child {
        let stdin = if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        self.command.stdin(stdin).stdout(stdout).stderr(stderr);
        let mut child = spawn(&mut self.command, &self.label);
        if let (Some(mut pipe), Some(input)) = (child.stdin.take(), self.stdin.take()) {
            std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
        child
    }

    fn run_with_files(mut self, dir: &Path) -> CmdOutput {
        let label = self.label.clone();
        let out = dir.join(format!("{label}.out"));
        let err = dir.join(format!("{label}.err"));
        let stdout = self
            .stdout
            .take()
            .unwrap_or_else(|| std::fs::File::create(&out).expect("stdout file").into());
        let stderr = std::fs::File::create(&err).expect("stderr file");
        let child = self.start(stdout, stderr.into());
        let status = wait_with_deadline(&label, child, self.timeout);
        CmdOutput {
            status,
            stdout: std::fs::read_to_string(&out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        }
    }
}

/// Starts `command`, failing the test when it cannot be.
///
/// A program the test has just written (a copied binary, a script) can be
/// refused as busy (`ETXTBSY`) for a moment: another test's freshly forked
/// child still holds the writer's descriptor until it execs. Nothing
/// signals that moment's end, so that one error is retried, briefly.
fn spawn(command: &mut Command, label: &str) -> Child {
    let mut busy = 0;
    loop {
        match command.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32) && busy < 100 => {
                busy += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot start {label}: {e}"),
        }
    }
}

/// Waits for `child` on a helper thread; on timeout kills it and fails.
pub fn wait_with_deadline(what: &str, mut child: Child, timeout: Duration) -> ExitStatus {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(status) => status.unwrap_or_else(|e| panic!("{what}: wait failed: {e}")),
        Err(_) => {
            signal(pid, Signal::SIGKILL);
            panic!("{what}: did not finish within {timeout:?}");
        }
    }
}

/// A long-running child with both outputs captured; killed on drop.
pub struct Process {
    child: Option<Child>,
    pid: u32,
    label: String,
    stdout: Captured,
    stderr: Captured,
}

impl Process {
    /// Starts `command` with stdin `/dev/null` and stdout/stderr captured.
    pub fn spawn(mut command: Command, label: impl Into<String>) -> Self {
        let label = label.into();
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn(&mut command, &label);
        let stdout = Captured::spawn(child.stdout.take().expect("piped"));
        let stderr = Captured::spawn(child.stderr.take().expect("piped"));
        Self {
            pid: child.id(),
            child: Some(child),
            label,
            stdout,
            stderr,
        }
    }

    /// Records both outputs in `transcript` for the secret scan.
    pub fn record(&self, transcript: &Transcript) {
        transcript.record(format!("{} (stdout)", self.label), &self.stdout);
        transcript.record(format!("{} (stderr)", self.label), &self.stderr);
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its stdout.
    pub fn stdout(&self) -> &Captured {
        &self.stdout
    }

    /// Its stderr.
    pub fn stderr(&self) -> &Captured {
        &self.stderr
    }

    /// Sends `signal` (ignoring "no such process").
    pub fn signal(&self, signal: Signal) {
        self::signal(self.pid, signal);
    }

    /// Waits for the exit and for both pipes to close, failing the test
    /// (and killing the child) after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} was already waited for", self.label));
        let status = wait_with_deadline(&self.label, child, timeout);
        self.stdout
            .wait_closed(&format!("{} stdout", self.label), timeout);
        self.stderr
            .wait_closed(&format!("{} stderr", self.label), timeout);
        status
    }

    /// Sends `signal` and waits for the exit (see [`Self::wait`]).
    pub fn stop(&mut self, signal: Signal, timeout: Duration) -> ExitStatus {
        self.signal(signal);
        self.wait(timeout)
    }

    /// Kills and reaps the child (what dropping does).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `signal` to `pid`, ignoring "no such process".
pub fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Whether `pid` is a live (non-zombie) process.
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Live processes whose environment has `key=value` and, when `exe` is
/// given, whose executable it is (how a test finds "its" daemons among
/// parallel tests).
pub fn processes_with(exe: Option<&Path>, key: &str, value: &OsStr) -> Vec<u32> {
    use std::os::unix::ffi::OsStrExt;
    let mut wanted = format!("{key}=").into_bytes();
    wanted.extend_from_slice(value.as_bytes());
    let exe = exe.map(|exe| std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_owned()));
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            exe.as_ref().is_none_or(|exe| {
                std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| &p == exe)
            }) && std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == wanted))
                && is_alive(pid)
        })
        .collect()
}

/// Polls `check` until it returns `Some`, failing with `what` after
/// [`WAIT`].
///
/// Only for conditions nothing signals (another process's pid file, a
/// socket answering); each attempt is a real check, the pause only spaces
/// them.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
