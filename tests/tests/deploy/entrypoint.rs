//! `workspace-template/entrypoint.sh`, run for real with a fake runtime
//! (`runtime.sh`) against `molecule-platform --dev`, in a temporary HOME,
//! CONFIGS_DIR and socket folder.
//!
//! When the tests run as root (CI does), the plain tests set
//! `CREDD_ENTRYPOINT_STAGE=user` — the marker the script sets itself after
//! dropping privileges — so they exercise the user phase as the current user;
//! `the_root_phase_drops_to_the_agent_user` runs the root phase for real.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;
use testkit::bin::{binary, debug_dir, require_root, require_tool, workspace_root as repo_root};
use testkit::process::{eventually, is_alive, processes_with, signal};
use testkit::{Cmd, CmdOutput, PlatformProcess, Secrets, sha256_hex};

use crate::support::open_for_others;

/// The provision-time token the entrypoint receives: stale by design.
const BOOTSTRAP: &str = "ghs_provisionTimeBootstrapToken0123456789xyz";

/// One test's workspace: folders, the platform, and the cleanup of whatever
/// the entrypoint left running (supervisor and daemon).
struct Workspace {
    dir: tempfile::TempDir,
    home: PathBuf,
    socket: PathBuf,
    platform: Option<PlatformProcess>,
    secrets: Secrets,
    runs: u32,
}

impl Workspace {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        std::fs::create_dir(&home).expect("home");
        let secrets = Secrets::new();
        secrets.add("the provision-time token", BOOTSTRAP);
        let platform = PlatformProcess::dev(&dir.path().join("configs"), "10m", &secrets);
        let socket = dir.path().join("run").join("credd.sock");
        Self {
            dir,
            home,
            socket,
            platform: Some(platform),
            secrets,
            runs: 0,
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.socket.parent().expect("socket folder").to_owned()
    }

    fn platform(&self) -> &PlatformProcess {
        self.platform.as_ref().expect("platform running")
    }

    /// The entrypoint with a clean, explicit environment.
    fn command(&self, bin_dir: &Path, runtime_exit: i32) -> Command {
        let runtime = repo_root().join("tests/tests/deploy/runtime.sh");
        self.command_with_runtime(bin_dir, &runtime, runtime_exit)
    }

    /// [`Self::command`] with another runtime script.
    fn command_with_runtime(&self, bin_dir: &Path, runtime: &Path, runtime_exit: i32) -> Command {
        let deploy = repo_root().join("tests/tests/deploy");
        let path = format!(
            "{}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            deploy.join("fake-gh").display()
        );
        let mut command = Command::new("/bin/sh");
        command
            .arg(repo_root().join("workspace-template/entrypoint.sh"))
            .arg(runtime)
            .env_clear()
            .env("PATH", path)
            .env("HOME", &self.home)
            .env("CONFIGS_DIR", self.platform().configs_dir())
            .env("PLATFORM_URL", self.platform().url())
            .env("CREDD_SOCKET", &self.socket)
            .env("CREDD_BIN_DIR", bin_dir)
            .env(
                "CREDD_GH_WRAPPER_DIR",
                repo_root().join("workspace-template/bin"),
            )
            .env("GITHUB_TOKEN", BOOTSTRAP)
            .env("GH_TOKEN", BOOTSTRAP)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("RUNTIME_EXIT", runtime_exit.to_string());
        if nix::unistd::geteuid().is_root() {
            command.env("CREDD_ENTRYPOINT_STAGE", "user");
        }
        command
    }

    /// Runs the entrypoint to completion (the runtime's exit); scans its output.
    fn run(&mut self, command: Command) -> CmdOutput {
        self.runs += 1;
        let result = Cmd::new(command, format!("entrypoint-{}", self.runs))
            .capture_in(self.dir.path())
            .run();
        self.secrets
            .assert_clean("entrypoint stdout", &result.stdout);
        self.secrets
            .assert_clean("entrypoint stderr", &result.stderr);
        result
    }

    /// `credd ARGS` against this workspace's daemon, as the current user.
    fn credd(&self, args: &[&str]) -> CmdOutput {
        crate::support::credd(&self.socket, self.dir.path(), args)
    }

    fn pid_file(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.run_dir().join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// This workspace's live daemons (by their CREDD_SOCKET).
    fn daemons(&self) -> Vec<u32> {
        processes_with(
            Some(&debug_dir().join("molecule-credd")),
            "CREDD_SOCKET",
            self.socket.as_os_str(),
        )
    }

    /// The helper list git has for github.com in `home`'s global config.
    fn helpers(&self, home: &Path) -> Vec<String> {
        let out = Command::new("git")
            .args(["config", "--file"])
            .arg(home.join(".gitconfig"))
            .args(["--get-all", "credential.https://github.com.helper"])
            .output()
            .expect("git config");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        // Everything started for this workspace carries its CREDD_SOCKET:
        // supervisors first (they would respawn a daemon), then daemons.
        let ours = || processes_with(None, "CREDD_SOCKET", self.socket.as_os_str());
        let daemons = self.daemons();
        for pid in ours().into_iter().filter(|pid| !daemons.contains(pid)) {
            signal(pid, Signal::SIGKILL);
        }
        for pid in ours() {
            signal(pid, Signal::SIGKILL);
        }
        let log = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("entrypoint-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>();
        if !std::thread::panicking() {
            // Daemon and supervisor logs land in the entrypoint's files later.
            self.secrets.assert_clean("workspace logs", &log);
        }
    }
}

fn credd_path() -> String {
    binary("credd").to_str().expect("utf-8 path").to_owned()
}

#[test]
fn git_and_gh_get_the_live_token_and_the_runtime_never_sees_the_env_one() {
    let mut ws = Workspace::new();
    let result = ws.run(ws.command(&debug_dir(), 7));
    let transcript = result.transcript();

    assert_eq!(
        result.status.code(),
        Some(7),
        "exit code passes through:\n{transcript}"
    );
    assert!(!result.stderr.contains("ERROR"), "{transcript}");
    assert_eq!(result.value("runtime-gh-token"), "unset", "{transcript}");
    assert_eq!(
        result.value("runtime-github-token"),
        "unset",
        "{transcript}"
    );
    assert_eq!(result.value("credd-status"), "ok", "{transcript}");

    // The daemon's current token, from the platform (not the bootstrap).
    let token = ws.credd(&["token"]);
    assert!(token.status.success(), "{}", token.stderr);
    let live = token.stdout.trim_end().to_owned();
    ws.secrets.add("the live token", live.clone());
    let live_sha = sha256_hex(live.as_bytes());
    assert_ne!(live_sha, sha256_hex(BOOTSTRAP.as_bytes()));
    let status = ws.credd(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&status.stdout)
        .unwrap_or_else(|e| panic!("status --json ({e}):\n{}", status.transcript()));
    assert_eq!(json["source"], "platform", "{json}");

    assert_eq!(
        result.value("git-token-sha"),
        live_sha,
        "git got the live token"
    );
    assert_eq!(
        result.value("gh-token-sha"),
        live_sha,
        "gh got the live token"
    );
    assert_eq!(result.value("gh-github-token"), "same");
    assert_eq!(result.value("gh-args"), "pr list");
    assert_eq!(result.value("gh-exit"), "0");

    // Helper list: reset, then credd — exactly once.
    assert_eq!(ws.helpers(&ws.home), ["".to_owned(), credd_path()]);
}

#[test]
fn a_second_run_starts_no_second_daemon_and_a_killed_daemon_comes_back() {
    let mut ws = Workspace::new();
    let first = ws.run(ws.command(&debug_dir(), 0));
    assert!(first.status.success(), "{}", first.transcript());
    assert_eq!(first.value("credd-status"), "ok", "{}", first.transcript());
    let config = std::fs::read(ws.home.join(".gitconfig")).expect("git config written");
    let killed = ws.pid_file("molecule-credd.pid").expect("daemon pid file");
    assert!(is_alive(killed));
    assert_eq!(ws.daemons(), [killed]);

    // SIGKILL: the supervisor respawns it and the socket answers again.
    signal(killed, Signal::SIGKILL);
    let respawned = eventually("a respawned daemon answering", || {
        let pid = ws.pid_file("molecule-credd.pid")?;
        (pid != killed && is_alive(pid) && ws.credd(&["status"]).status.success()).then_some(pid)
    });
    assert_eq!(ws.daemons(), [respawned]);

    // Second run: same config, same daemon.
    let second = ws.run(ws.command(&debug_dir(), 0));
    assert!(second.status.success(), "{}", second.transcript());
    assert_eq!(second.value("credd-status"), "ok");
    assert!(
        second.stderr.contains("already supervised"),
        "{}",
        second.transcript()
    );
    assert_eq!(
        std::fs::read(ws.home.join(".gitconfig")).expect("git config"),
        config,
        "a second run changes nothing in the git config"
    );
    assert_eq!(ws.helpers(&ws.home), ["".to_owned(), credd_path()]);
    assert_eq!(ws.pid_file("molecule-credd.pid"), Some(respawned));
    assert_eq!(ws.daemons(), [respawned], "one daemon per socket");
}

#[test]
fn the_provision_time_token_reaches_the_daemon_and_not_the_runtime() {
    let mut ws = Workspace::new();
    let mut command = ws.command(&debug_dir(), 0);
    // The platform is unreachable at start: the daemon serves its bootstrap.
    command.env("PLATFORM_URL", "http://127.0.0.1:9");
    let result = ws.run(command);
    let transcript = result.transcript();
    assert!(result.status.success(), "{transcript}");
    assert!(!result.stderr.contains("ERROR"), "{transcript}");
    assert_eq!(result.value("runtime-gh-token"), "unset", "{transcript}");
    assert_eq!(
        result.value("runtime-github-token"),
        "unset",
        "{transcript}"
    );
    let bootstrap = sha256_hex(BOOTSTRAP.as_bytes());
    assert_eq!(result.value("git-token-sha"), bootstrap, "{transcript}");
    assert_eq!(result.value("gh-token-sha"), bootstrap, "{transcript}");
    let status = ws.credd(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&status.stdout)
        .unwrap_or_else(|e| panic!("status --json ({e}):\n{}", status.transcript()));
    assert_eq!(json["source"], "env", "{json}");
}

#[test]
fn missing_binaries_are_an_error_line_and_the_runtime_still_runs() {
    let mut ws = Workspace::new();
    let empty = ws.dir.path().join("empty-bin");
    std::fs::create_dir(&empty).expect("empty bin dir");
    let result = ws.run(ws.command(&empty, 3));
    let transcript = result.transcript();
    assert_eq!(result.status.code(), Some(3), "{transcript}");
    assert!(
        result.has_error_line("molecule-credd not found at"),
        "{transcript}"
    );
    assert!(result.has_error_line("credd not found at"), "{transcript}");
    assert_eq!(result.value("runtime-gh-token"), "unset", "{transcript}");
    assert_eq!(result.value("git-token-sha"), "none");
    assert!(ws.daemons().is_empty());
}

#[test]
fn a_daemon_that_will_not_come_up_is_an_error_line_and_the_runtime_still_runs() {
    let mut ws = Workspace::new();
    let mut command = ws.command(&debug_dir(), 0);
    // A configuration error: molecule-credd refuses it (exit 2) already when
    // asked for the socket, so no daemon is started at all.
    command.env("PLATFORM_URL", "ftp://nowhere");
    let result = ws.run(command);
    let transcript = result.transcript();
    assert!(result.status.success(), "{transcript}");
    assert!(result.has_error_line("PLATFORM_URL"), "{transcript}");
    assert_eq!(result.value("runtime-gh-token"), "unset", "{transcript}");
    assert_eq!(
        result.value("runtime-credd-socket"),
        "unset",
        "a path molecule-credd refused is never exported: {transcript}"
    );
    assert!(ws.daemons().is_empty(), "{transcript}");
}

#[test]
fn a_daemon_exiting_with_a_configuration_error_is_not_restarted() {
    let mut ws = Workspace::new();
    // molecule-credd answers --prepare-socket for real, then exits 2 (a
    // configuration error) whenever it is started as a daemon.
    let bin = ws.dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    std::os::unix::fs::symlink(binary("credd"), bin.join("credd")).expect("symlink credd");
    let starts = ws.dir.path().join("starts");
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in --prepare-socket) exec {} \"$@\" ;; esac\necho start >>{}\necho 'error: refused' >&2\nexit 2\n",
        binary("molecule-credd").display(),
        starts.display()
    );
    std::fs::write(bin.join("molecule-credd"), script).expect("script");
    std::fs::set_permissions(bin.join("molecule-credd"), PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let result = ws.run(ws.command(&bin, 0));
    let transcript = result.transcript();
    assert!(result.status.success(), "{transcript}");
    // The supervisor gives up after the first exit 2 and removes its pid file.
    eventually("the supervisor to give up", || {
        ws.pid_file("supervisor.pid").is_none().then_some(())
    });
    let started = std::fs::read_to_string(&starts).unwrap_or_default();
    assert_eq!(
        started.lines().count(),
        1,
        "started once only: {transcript}"
    );
    let supervisors = processes_with(None, "CREDD_SOCKET", ws.socket.as_os_str());
    assert!(
        supervisors.is_empty(),
        "nothing left running: {supervisors:?}"
    );
}

#[test]
fn no_process_but_the_daemon_holds_the_provision_time_token() {
    let mut ws = Workspace::new();
    let mut command = ws.command(&debug_dir(), 0);
    // The platform is unreachable: the daemon must serve the bootstrap token.
    command.env("PLATFORM_URL", "http://127.0.0.1:9");
    let result = ws.run(command);
    let transcript = result.transcript();
    assert!(result.status.success(), "{transcript}");
    assert_eq!(
        result.value("git-token-sha"),
        sha256_hex(BOOTSTRAP.as_bytes()),
        "the daemon has it: {transcript}"
    );
    // Everything the entrypoint left running: the supervisor and the daemon.
    let left = processes_with(None, "CREDD_SOCKET", ws.socket.as_os_str());
    assert!(left.len() >= 2, "supervisor and daemon: {left:?}");
    for pid in left {
        // Root reads even a non-dumpable process's environment.
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let text = String::from_utf8_lossy(&environ);
        assert!(
            !text.contains(BOOTSTRAP),
            "pid {pid} keeps the provision-time token in its environment"
        );
        assert!(
            !text
                .split('\0')
                .any(|v| v.starts_with("GITHUB_TOKEN=") || v.starts_with("GH_TOKEN=")),
            "pid {pid} has a token variable"
        );
    }
}

#[test]
fn a_symlinked_socket_folder_is_refused_and_a_private_one_used_instead() {
    let mut ws = Workspace::new();
    // Another user planted the default socket folder as a symlink into the
    // agent's home, hoping the entrypoint writes through it.
    let runtime_dir = ws.dir.path().join("xdg");
    std::fs::create_dir(&runtime_dir).expect("xdg");
    std::fs::set_permissions(&runtime_dir, PermissionsExt::from_mode(0o700)).expect("chmod");
    let planted = runtime_dir.join("molecule-credd");
    std::os::unix::fs::symlink(&ws.home, &planted).expect("plant the symlink");
    let tmp = ws.dir.path().join("tmp");
    std::fs::create_dir(&tmp).expect("tmp");
    let mut command = ws.command(&debug_dir(), 0);
    command
        .env_remove("CREDD_SOCKET")
        .env("XDG_RUNTIME_DIR", &runtime_dir)
        .env("TMPDIR", &tmp);
    let result = ws.run(command);
    let transcript = result.transcript();
    assert!(result.status.success(), "{transcript}");
    assert!(result.has_error_line("symbolic link"), "{transcript}");
    let exported = PathBuf::from(result.value("runtime-credd-socket"));
    // Cleanup and `credd` calls follow the socket the runtime was given.
    ws.socket.clone_from(&exported);
    assert!(
        exported.starts_with(&tmp),
        "a private mktemp folder: {transcript}"
    );
    for name in [
        "supervisor.lock",
        "supervisor.pid",
        "molecule-credd.pid",
        "credd.sock",
    ] {
        assert!(
            !ws.home.join(name).exists(),
            "{name} written through the planted symlink"
        );
    }
    assert_ne!(result.value("git-token-sha"), "none", "{transcript}");
    assert_eq!(result.value("credd-status"), "ok", "{transcript}");
}

const TEST_AGENT: &str = "credd-deploy-agent";

/// Held by each test that runs as [`TEST_AGENT`]: they share the user and
/// its home (each starts from a fresh one), so two at once would remove
/// each other's git configuration mid-run.
static AGENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The test agent's uid, gid and home, creating the account if needed.
fn test_agent() -> (u32, u32, PathBuf) {
    let home = PathBuf::from(format!("/tmp/{TEST_AGENT}-home"));
    let user = system_user(TEST_AGENT, &home);
    (user.uid.as_raw(), user.gid.as_raw(), user.dir)
}

/// The system account `name` (no shell; `home` recorded, not created),
/// made with useradd if it does not exist yet.
fn system_user(name: &str, home: &std::path::Path) -> nix::unistd::User {
    if nix::unistd::User::from_name(name).ok().flatten().is_none() {
        let status = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--shell", "/usr/sbin/nologin", "--home-dir"])
            .arg(home)
            .arg(name)
            .status()
            .expect("run useradd");
        assert!(status.success(), "useradd {name}");
    }
    nix::unistd::User::from_name(name)
        .expect("getpwnam")
        .expect("the account exists")
}

#[test]
fn the_root_phase_drops_to_the_agent_user() {
    let _agent = AGENT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    require_root("the root phase");
    require_tool("setpriv", "util-linux");
    let (uid, gid, home) = test_agent();
    // A fresh home for the agent, as a new container has.
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).expect("agent home");
    nix::unistd::chown(&home, Some(uid.into()), Some(gid.into())).expect("chown home");

    let mut ws = Workspace::new();
    open_for_others(ws.dir.path());
    let run_dir = ws.run_dir();
    std::fs::create_dir(&run_dir).expect("socket folder");
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    nix::unistd::chown(&run_dir, Some(uid.into()), Some(gid.into())).expect("chown run dir");

    let mut command = ws.command(&debug_dir(), 5);
    command
        .env_remove("CREDD_ENTRYPOINT_STAGE")
        .env("CREDD_AGENT_USER", TEST_AGENT)
        .env("HOME", "/root");
    let result = ws.run(command);
    let transcript = result.transcript();
    assert_eq!(result.status.code(), Some(5), "{transcript}");
    assert!(!result.stderr.contains("ERROR"), "{transcript}");
    assert_eq!(result.value("runtime-uid"), uid.to_string(), "{transcript}");
    assert_eq!(result.value("runtime-home"), home.display().to_string());
    assert_eq!(result.value("runtime-gh-token"), "unset");
    assert_eq!(result.value("credd-status"), "ok", "{transcript}");
    let git = result.value("git-token-sha");
    assert_ne!(git, "none", "{transcript}");
    assert_ne!(git, sha256_hex(BOOTSTRAP.as_bytes()));
    assert_eq!(result.value("gh-token-sha"), git);

    // The root phase's work: configs and git config belong to the agent.
    let configs = std::fs::metadata(ws.platform().configs_dir()).expect("configs");
    assert_eq!(configs.uid(), uid, "CONFIGS_DIR given to the agent");
    let auth = std::fs::metadata(ws.platform().configs_dir().join(".auth_token")).expect("auth");
    assert_eq!(auth.uid(), uid, ".auth_token given to the agent");
    let gitconfig = std::fs::metadata(home.join(".gitconfig")).expect("agent's git config");
    assert_eq!(gitconfig.uid(), uid, "git config written as the agent");
    assert_eq!(ws.helpers(&home), ["".to_owned(), credd_path()]);
    assert!(
        !Path::new("/root/.gitconfig").exists()
            || !std::fs::read_to_string("/root/.gitconfig")
                .unwrap_or_default()
                .contains(&credd_path()),
        "root's own git config was not touched"
    );
    // The daemon runs as the agent.
    let daemons = ws.daemons();
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    let daemon = std::fs::metadata(format!("/proc/{}", daemons[0])).expect("daemon proc");
    assert_eq!(daemon.uid(), uid);
}

const TEST_DAEMON_USER: &str = "credd-deploy-sealed";

/// A system account `name` (no home, no shell): uid and gid.
fn test_user(name: &str) -> (u32, u32) {
    let user = system_user(name, std::path::Path::new("/nonexistent"));
    (user.uid.as_raw(), user.gid.as_raw())
}

#[test]
fn sealed_the_agent_uses_github_through_the_gateway_and_can_never_read_the_token() {
    let _agent = AGENT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    require_root("the sealed root phase");
    require_tool("setpriv", "util-linux");
    let (agent_uid, agent_gid, home) = test_agent();
    let (daemon_uid, _) = test_user(TEST_DAEMON_USER);
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).expect("agent home");
    nix::unistd::chown(&home, Some(agent_uid.into()), Some(agent_gid.into())).expect("chown");

    let mut ws = Workspace::new();
    open_for_others(ws.dir.path());
    let sealed_dir = ws.dir.path().join("sealed");
    let agent_run = ws.dir.path().join("agent-run");
    let ca = ws.dir.path().join("ca").join("gateway-ca.pem");
    let gateway = testkit::http::closed_port();
    let runtime = repo_root().join("tests/tests/deploy/sealed-runtime.sh");
    let mut command = ws.command_with_runtime(&debug_dir(), &runtime, 0);
    command
        .env_remove("CREDD_ENTRYPOINT_STAGE")
        .env_remove("CREDD_SOCKET")
        .env("CREDD_SEALED", "1")
        .env("CREDD_AGENT_USER", TEST_AGENT)
        .env("CREDD_DAEMON_USER", TEST_DAEMON_USER)
        .env("CREDD_SEALED_DIR", &sealed_dir)
        .env("CREDD_AGENT_SOCKET_DIR", &agent_run)
        .env("CREDD_GATEWAY", gateway.to_string())
        .env("CREDD_GATEWAY_CA", &ca)
        .env("HOME", "/root");
    let sealed_socket = sealed_dir.join("run").join("credd.sock");
    let result = ws.run(command);
    // Whatever happens next, the sealed supervisor and daemon go with the
    // test (supervisor first: it would respawn the daemon).
    struct Reap(PathBuf);
    impl Drop for Reap {
        fn drop(&mut self) {
            let daemon = debug_dir().join("molecule-credd");
            let all = processes_with(None, "CREDD_SOCKET", self.0.as_os_str());
            let daemons = processes_with(Some(&daemon), "CREDD_SOCKET", self.0.as_os_str());
            for pid in all.iter().filter(|p| !daemons.contains(p)) {
                signal(*pid, Signal::SIGKILL);
            }
            for pid in daemons {
                signal(pid, Signal::SIGKILL);
            }
        }
    }
    let _reap = Reap(sealed_socket.clone());
    let transcript = result.transcript();
    assert_eq!(result.status.code(), Some(0), "{transcript}");
    assert!(!result.stderr.contains("ERROR"), "{transcript}");

    // The agent runs, and reaches nothing that holds a token.
    assert_eq!(
        result.value("runtime-uid"),
        agent_uid.to_string(),
        "{transcript}"
    );
    assert_eq!(result.value("bearer-readable"), "no", "{transcript}");
    assert_eq!(result.value("sealed-dir-listable"), "no", "{transcript}");
    assert_ne!(result.value("credd-token-exit"), "0", "{transcript}");
    assert_eq!(result.value("credd-token-lines"), "1", "{transcript}");
    assert_eq!(result.value("credd-token-sealed"), "yes", "{transcript}");
    // ... but reaches the daemon's status and metrics, on a socket root
    // bound in a folder of the agent's own and handed to the daemon.
    let agent_socket = agent_run.join("credd.sock");
    assert_eq!(
        result.value("credd-socket"),
        agent_socket.display().to_string(),
        "{transcript}"
    );
    assert_eq!(result.value("credd-status-exit"), "0", "{transcript}");
    assert_eq!(result.value("credd-metrics-exit"), "0", "{transcript}");
    let folder = std::fs::metadata(&agent_run).expect("the agent's socket folder");
    assert_eq!((folder.uid(), folder.mode() & 0o777), (agent_uid, 0o700));
    let socket = std::fs::symlink_metadata(&agent_socket).expect("the agent's socket");
    assert!(socket.file_type().is_socket());
    assert_eq!((socket.uid(), socket.mode() & 0o777), (agent_uid, 0o600));
    assert!(
        !sealed_dir.join("run").join("credd.sock").exists(),
        "the daemon binds no socket of its own"
    );
    assert_eq!(result.value("su-root"), "failed", "{transcript}");
    assert_eq!(result.value("sudo"), "failed", "{transcript}");
    assert_eq!(
        result.value("git-password"),
        "",
        "git has no credential for GitHub"
    );
    assert_eq!(
        result.value("git-helper"),
        "[]",
        "no credential helper for GitHub"
    );
    assert_eq!(result.value("git-proxy"), format!("http://{gateway}"));
    assert_eq!(result.value("git-cainfo"), ca.display().to_string());
    assert_eq!(
        result.value("https-proxy"),
        "unset",
        "other tools are untouched"
    );
    assert_eq!(
        result.value("gh-https-proxy"),
        format!("http://{gateway}"),
        "{transcript}"
    );
    assert_eq!(result.value("gh-ssl-cert-file"), ca.display().to_string());
    assert_ne!(
        result.value("gh-token-sha"),
        sha256_hex(BOOTSTRAP.as_bytes())
    );
    assert!(
        result
            .stdout
            .lines()
            .any(|l| l.starts_with("agent-process: ")),
        "the runtime listed its processes: {transcript}"
    );
    // (ws.run scanned all of it, the agent's processes' environments and
    // arguments included, for the provision-time token and the bearer.)

    // The daemon runs as its own user, sealed, with the gateway; the bearer
    // and the socket folder are its alone; the CA is readable by all.
    let daemons = processes_with(
        Some(&debug_dir().join("molecule-credd")),
        "CREDD_SOCKET",
        sealed_socket.as_os_str(),
    );
    assert_eq!(daemons.len(), 1, "{daemons:?}\n{transcript}");
    let proc_dir = std::fs::metadata(format!("/proc/{}", daemons[0])).expect("daemon proc");
    assert_eq!(proc_dir.uid(), daemon_uid, "the daemon is not the agent");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", daemons[0])).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("--sealed") && cmdline.contains("--gateway"),
        "{cmdline}"
    );
    let configs = std::fs::metadata(ws.platform().configs_dir()).expect("configs");
    assert_eq!(configs.uid(), daemon_uid);
    assert_eq!(configs.mode() & 0o777, 0o700);
    let sealed_meta = std::fs::metadata(&sealed_dir).expect("sealed dir");
    assert_eq!(
        (sealed_meta.uid(), sealed_meta.mode() & 0o777),
        (daemon_uid, 0o700)
    );
    let ca_meta = std::fs::metadata(&ca).expect("the gateway CA");
    assert_eq!(ca_meta.mode() & 0o777, 0o644);

    // A bearer the platform rotates in later is out of the agent's reach too.
    std::fs::write(
        ws.platform().configs_dir().join(".auth_token.new"),
        "rotated",
    )
    .expect("write");
    let read = Command::new("setpriv")
        .args([
            &format!("--reuid={agent_uid}"),
            &format!("--regid={agent_gid}"),
            "--init-groups",
            "--",
            "cat",
        ])
        .arg(ws.platform().configs_dir().join(".auth_token.new"))
        .output()
        .expect("run cat as the agent");
    assert!(!read.status.success(), "the agent read a rotated bearer");
}

/// Sealed, but the entrypoint is not started as root (`docker exec -u
/// agent … workspace-entrypoint`, `docker run --user`): no daemon of the
/// caller's uid is started (it would get the provision-time token, which
/// that uid could then read from it), the tokens are dropped, and the
/// runtime still runs, with gh pointed at the gateway.
#[test]
fn sealed_but_not_root_starts_no_daemon_and_hands_the_caller_no_token() {
    require_root("running the entrypoint as another uid");
    require_tool("setpriv", "util-linux");
    let (uid, gid, _) = test_agent();
    let mut ws = Workspace::new();
    open_for_others(ws.dir.path());
    let gateway = testkit::http::closed_port().to_string();
    let base = ws.command(&debug_dir(), 4);
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
        .args(["--clear-groups", "--", "/bin/sh"])
        .args(base.get_args())
        .env_clear();
    for (name, value) in base.get_envs() {
        if let Some(value) = value {
            command.env(name, value);
        }
    }
    command
        .env_remove("CREDD_ENTRYPOINT_STAGE")
        .env("CREDD_SEALED", "1")
        .env("CREDD_GATEWAY", &gateway);
    let result = ws.run(command);
    let transcript = result.transcript();
    assert_eq!(result.status.code(), Some(4), "{transcript}");
    assert!(
        result.has_error_line("sealed mode: not started as root"),
        "{transcript}"
    );
    assert_eq!(result.value("runtime-uid"), uid.to_string(), "{transcript}");
    assert_eq!(result.value("runtime-gh-token"), "unset", "{transcript}");
    assert_eq!(
        result.value("runtime-github-token"),
        "unset",
        "{transcript}"
    );
    let bootstrap = sha256_hex(BOOTSTRAP.as_bytes());
    assert_ne!(result.value("git-token-sha"), bootstrap, "{transcript}");
    // gh got the placeholder and the gateway, never a token.
    assert_eq!(
        result.value("gh-token-sha"),
        sha256_hex(b"sealed-by-molecule-credd"),
        "{transcript}"
    );
    assert_eq!(
        result.value("gh-https-proxy"),
        format!("http://{gateway}"),
        "{transcript}"
    );
    assert!(ws.daemons().is_empty(), "{transcript}");
    assert!(
        !ws.socket.exists(),
        "a daemon's socket appeared: {transcript}"
    );
}
