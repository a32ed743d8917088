//! One test's private world: folders, environment, and everything captured.
//!
//! Why: tests run in parallel, each with its own HOME, git config,
//! `CONFIGS_DIR` and socket, and nothing inherited from the developer's
//! environment. A sandbox also holds the test's [`Transcript`] and
//! [`Secrets`], and scans the one for the other when it is dropped, so
//! every test is checked for leaks whether or not it remembered to ask.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credd_core::protocol::{ErrorCode, Request, Response, Source, Status};

use crate::capture::Transcript;
use crate::client::request_over;
use crate::http::closed_port;
use crate::platform::{TestPlatform, WORKSPACE_ID};
use crate::process::{Cmd, CmdOutput};
use crate::secrets::{Secrets, random_secret};
use crate::{WAIT, bin, lock};

/// One test's private world: temp folders, environment, transcript, secrets.
///
/// Layout under a fresh temp dir (short, so the socket path fits `sun_path`):
/// `home/` (HOME and XDG_CONFIG_HOME for git), `configs/` (CONFIGS_DIR with
/// `.auth_token`), `run/credd.sock` (the socket; `run/` is created by the
/// daemon), `repos/` (bare repositories), `work/` (clones).
pub struct Sandbox {
    dir: tempfile::TempDir,
    transcript: Arc<Transcript>,
    secrets: Secrets,
    /// Platform URL given to daemon and helper (may point nowhere).
    platform_url: Mutex<String>,
    hosts: Mutex<String>,
    workspace_id: Mutex<Option<String>>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// A fresh sandbox: the platform URL is a closed loopback port, and
    /// `configs/.auth_token` holds a bearer of its own (a secret here).
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("credd-it-")
            .tempdir_in("/tmp")
            .expect("create temp dir");
        for sub in ["home/.config", "configs", "repos", "work"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("create sandbox folders");
        }
        let sandbox = Self {
            dir,
            transcript: Arc::default(),
            secrets: Secrets::new(),
            platform_url: Mutex::new(format!("http://{}", closed_port())),
            hosts: Mutex::new("github.com".into()),
            workspace_id: Mutex::default(),
        };
        let bearer = random_secret("sandbox-bearer");
        sandbox.write_bearer(&bearer);
        sandbox.add_secret("the sandbox's bearer", &bearer);
        sandbox
    }

    /// The sandbox's root folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `CONFIGS_DIR`.
    pub fn configs_dir(&self) -> PathBuf {
        self.path().join("configs")
    }

    /// Git's HOME.
    pub fn home(&self) -> PathBuf {
        self.path().join("home")
    }

    /// The folder the daemon creates for its socket.
    pub fn run_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    /// Creates the socket's folder with `mode` (as a daemon, or somebody
    /// else, would have before); returns it.
    pub fn create_run_dir(&self, mode: u32) -> PathBuf {
        let run = self.run_dir();
        std::fs::create_dir(&run).expect("mkdir the socket folder");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(mode)).expect("chmod");
        run
    }

    /// `CREDD_SOCKET`.
    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("credd.sock")
    }

    /// Writes `bearer` (and a newline) to `configs/.auth_token`.
    pub fn write_bearer(&self, bearer: &str) {
        write_file(
            &self.configs_dir().join(".auth_token"),
            format!("{bearer}\n"),
            0o600,
        );
    }

    /// Points daemon and helper at `platform` and writes its bearer to
    /// `configs/.auth_token`; its tokens and bearer become secrets here.
    pub fn use_platform(&self, platform: &TestPlatform) {
        *lock(&self.platform_url) = platform.url();
        self.watch_platform(platform);
        self.write_bearer(platform.bearer());
    }

    /// Like [`Self::use_platform`], but as workspace [`WORKSPACE_ID`] (the
    /// workspace route, with that workspace's bearer).
    pub fn use_platform_as_workspace(&self, platform: &TestPlatform) {
        self.use_platform(platform);
        *lock(&self.workspace_id) = Some(WORKSPACE_ID.to_owned());
        write_file(
            &self.configs_dir().join(".auth_token"),
            format!("  {}\n", platform.workspace_bearer()),
            0o600,
        );
    }

    /// Points daemon and helper at a platform started another way (the real
    /// binary in GitHub mode) at `url`, as workspace `id` with `bearer`
    /// (written to `configs/.auth_token`, and a secret here).
    pub fn use_workspace(&self, url: String, id: &str, bearer: &str) {
        *lock(&self.platform_url) = url;
        *lock(&self.workspace_id) = Some(id.to_owned());
        self.add_secret("the workspace bearer", bearer);
        self.write_bearer(bearer);
    }

    /// Treats `platform`'s tokens and bearer as secrets without using it.
    pub fn watch_platform(&self, platform: &TestPlatform) {
        self.secrets.include(platform.secrets());
    }

    /// Points daemon and helper at a URL (e.g. a port nothing listens on).
    pub fn set_platform_url(&self, url: String) {
        *lock(&self.platform_url) = url;
    }

    /// Sets `CREDD_HOSTS`.
    pub fn set_hosts(&self, hosts: &str) {
        *lock(&self.hosts) = hosts.to_owned();
    }

    /// Adds a value that must never appear in any captured output.
    pub fn add_secret(&self, kind: &str, value: &str) {
        self.secrets.add(kind, value);
    }

    /// Everything captured in this sandbox so far.
    pub fn transcript(&self) -> &Transcript {
        &self.transcript
    }

    /// The environment daemon, helper and git share (on top of a cleared env).
    pub fn base_env(&self) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = vec![
            ("PATH".into(), std::env::var_os("PATH").unwrap_or_default()),
            ("HOME".into(), self.home().into()),
            ("XDG_CONFIG_HOME".into(), self.home().join(".config").into()),
            (
                "PLATFORM_URL".into(),
                lock(&self.platform_url).clone().into(),
            ),
            ("CONFIGS_DIR".into(), self.configs_dir().into()),
            ("CREDD_SOCKET".into(), self.socket().into()),
            ("CREDD_HOSTS".into(), lock(&self.hosts).clone().into()),
            ("RUST_LOG".into(), "debug".into()),
            ("RUST_BACKTRACE".into(), "0".into()),
        ];
        if let Some(id) = lock(&self.workspace_id).clone() {
            env.push(("WORKSPACE_ID".into(), id.into()));
        }
        if let Some(lang) = std::env::var_os("LANG") {
            env.push(("LANG".into(), lang));
        }
        env
    }

    /// `program` with the sandbox environment only, run in the sandbox.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .env_clear()
            .envs(self.base_env())
            .current_dir(self.path());
        command
    }

    /// `credd ARGS` with the sandbox environment, output recorded.
    pub fn credd(&self, args: &[&str]) -> Cmd<'_> {
        let mut command = self.command(bin::credd());
        command.args(args);
        Cmd::new(command, format!("credd {}", args.join(" "))).transcript(&self.transcript)
    }

    /// `credd get` for `host` over `protocol`, as git would call it.
    pub fn credd_get(&self, protocol: &str, host: &str) -> CmdOutput {
        self.credd_get_with(protocol, host, &[])
    }

    /// [`Self::credd_get`] with extra environment variables.
    pub fn credd_get_with(&self, protocol: &str, host: &str, env: &[(&str, &str)]) -> CmdOutput {
        let mut get = self
            .credd(&["get"])
            .stdin(format!("protocol={protocol}\nhost={host}\n\n"))
            .stdout_holds_secret();
        get.command().envs(env.iter().copied());
        get.run()
    }

    /// Writes the global git config: identity, and for `url` the helper list
    /// reset, then `credd`, then each of `fallbacks`.
    pub fn configure_git(&self, url: &str, fallbacks: &[&str]) {
        let credd = bin::credd();
        let mut helpers = vec![credd.to_str().expect("UTF-8 target path")];
        helpers.extend_from_slice(fallbacks);
        self.configure_git_helpers(url, &helpers);
    }

    /// Writes the global git config with exactly `helpers` for `url`.
    pub fn configure_git_helpers(&self, url: &str, helpers: &[&str]) {
        let mut config = format!(
            "[user]\n\tname = Credd Test\n\temail = test@example.invalid\n\
             [init]\n\tdefaultBranch = main\n\
             [credential \"{url}\"]\n\thelper =\n"
        );
        for helper in helpers {
            config.push_str(&format!("\thelper = {helper}\n"));
        }
        write_file(&self.home().join(".gitconfig"), config, 0o644);
    }

    /// `git ARGS` in `cwd` with an isolated configuration (no system config,
    /// temp HOME, no prompts), output recorded.
    pub fn git(&self, cwd: &Path, args: &[&str]) -> Cmd<'_> {
        self.git_binary("git", cwd, args)
    }

    /// [`Self::git`] with the git binary at `git` (another version, say).
    pub fn git_binary(&self, git: &str, cwd: &Path, args: &[&str]) -> Cmd<'_> {
        let mut command = self.command(git);
        command
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .current_dir(cwd);
        Cmd::new(command, format!("{git} {}", args.join(" "))).transcript(&self.transcript)
    }

    /// `git credential fill` for `https://github.com`, as git asks before a
    /// fetch (stdout holds the token); not checked for success.
    pub fn credential_fill(&self) -> CmdOutput {
        self.git(self.path(), &["credential", "fill"])
            .stdin("protocol=https\nhost=github.com\n\n")
            .stdout_holds_secret()
            .run()
    }

    /// A protocol request straight to the daemon's socket, as the test process.
    pub fn request(&self, request: &Request) -> Result<Response, String> {
        request_over(&self.socket(), request)
    }

    /// The daemon's status, panicking when it does not answer one.
    pub fn status(&self) -> Status {
        match self.request(&Request::Status) {
            Ok(Response::Status(status)) => *status,
            other => panic!("expected a status answer, got {other:?}"),
        }
    }

    /// A protocol `get` as the test process: `Ok((token, expires_at, source))`
    /// or the daemon's other answer.
    pub fn get(&self) -> Result<(String, u64, Source), Response> {
        match self.request(&Request::GET_DEFAULT) {
            Ok(Response::Token {
                token,
                expires_at,
                source,
                ..
            }) => Ok((token.expose().to_owned(), expires_at, source)),
            Ok(other) => Err(other),
            Err(e) => panic!("protocol get failed: {e}"),
        }
    }

    /// A protocol `get` that must be answered with an error of `code`.
    #[track_caller]
    pub fn assert_get_fails(&self, code: ErrorCode) -> String {
        match self.get() {
            Err(Response::Error { code: got, message }) if got == code => message,
            Err(other) => panic!("expected a {code:?} error, got {other:?}"),
            Ok((_, _, source)) => panic!("expected a {code:?} error, got a token from {source:?}"),
        }
    }

    /// Asks for status until `done` holds, failing after [`WAIT`]. The daemon
    /// publishes its state only on request, so this is the one wait that asks
    /// repeatedly (10 ms apart) instead of blocking on a signal.
    #[track_caller]
    pub fn wait_for_status(&self, what: &str, done: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon status never showed {what} within {WAIT:?}; last: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Protocol `get`s until one returns a token (each blocks in the daemon
    /// up to its --wait-timeout, so this is not a busy loop); fails after [`WAIT`].
    #[track_caller]
    pub fn wait_for_token(&self) -> (String, u64, Source) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.get() {
                Ok(answer) => return answer,
                Err(other) => assert!(
                    Instant::now() < deadline,
                    "the daemon served no token within {WAIT:?}; last answer: {other:?}"
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails the test if any recorded output contains a secret.
    #[track_caller]
    pub fn assert_no_secrets(&self) {
        self.transcript.assert_clean(&self.secrets);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Every test is scanned, whether or not it remembered to ask. Dropped
        // daemons have already closed their pipes by then (declare the daemon
        // after the sandbox so it drops first).
        if !std::thread::panicking() {
            self.assert_no_secrets();
        }
    }
}

/// Writes `contents` to `path` with `mode`.
pub fn write_file(path: &Path, contents: impl AsRef<[u8]>, mode: u32) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}
