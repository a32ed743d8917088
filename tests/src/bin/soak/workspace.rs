//! The workspace under test: `workspace-template/entrypoint.sh` run for real
//! outside a container (as `tests/tests/deploy/` runs it), so the daemon is
//! the one the entrypoint's supervisor starts and restarts.
//!
//! The entrypoint's runtime is a `sleep` that lives as long as the soak; the
//! supervisor writes the daemon's pid next to the socket, which is how the
//! killer finds its victim and the sampler the process to measure. Daemon,
//! supervisor and entrypoint all log to one file, scanned for secrets at the
//! end.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use testkit::bin::workspace_root;
use testkit::platform::WORKSPACE_ID;
use testkit::process::{is_alive, processes_with, signal};
use testkit::{TestPlatform, lock};

/// The daemon's executable name, as `/proc/PID/comm` shows it.
const DAEMON_COMM: &str = "molecule-credd";
/// How long the entrypoint may take to report that the daemon answers.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long the supervisor may take to stop its daemon on SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// The entrypoint's line once its daemon answers.
const ANSWERS_LINE: &str = "molecule-credd answers on";

/// One reading of the daemon's resources.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub(crate) at: Instant,
    pub(crate) pid: u32,
    /// `VmRSS`, KiB.
    pub(crate) rss_kib: u64,
    /// Open descriptors (`None` when `/proc/PID/fd` is unreadable: the
    /// daemon is non-dumpable, so only root may list it).
    pub(crate) fds: Option<usize>,
}

/// The entrypoint's workspace: folders, the runtime process, the log.
pub(crate) struct Workspace {
    socket: PathBuf,
    client_configs: PathBuf,
    bin_dir: PathBuf,
    platform_url: String,
    log: PathBuf,
    runtime: Mutex<Option<Child>>,
}

impl Workspace {
    /// Runs the entrypoint in `dir` with the binaries of `bin_dir` against
    /// `platform`; returns once it says the daemon answers.
    ///
    /// The daemon asks as workspace [`WORKSPACE_ID`] (its own configs
    /// folder), the clients' direct fallback as the admin (another one), so
    /// the platform's request log tells the two kinds of call apart.
    pub(crate) fn start(
        dir: &Path,
        bin_dir: &Path,
        platform: &TestPlatform,
    ) -> anyhow::Result<Self> {
        let home = dir.join("home");
        let daemon_configs = dir.join("daemon-configs");
        let client_configs = dir.join("client-configs");
        let run = dir.join("run");
        for folder in [&home, &daemon_configs, &client_configs, &run] {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("cannot create {}", folder.display()))?;
            std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700))?;
        }
        testkit::write_file(
            &daemon_configs.join(".auth_token"),
            platform.workspace_bearer(),
            0o600,
        );
        testkit::write_file(
            &client_configs.join(".auth_token"),
            platform.bearer(),
            0o600,
        );
        let socket = run.join("credd.sock");
        let log = dir.join("entrypoint.log");
        let log_file = std::fs::File::create(&log).context("cannot create the entrypoint log")?;

        let root = workspace_root();
        let mut command = Command::new("/bin/sh");
        command
            .arg(root.join("workspace-template/entrypoint.sh"))
            .args(["sleep", "1000000"])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            )
            .env("HOME", &home)
            .env("CONFIGS_DIR", &daemon_configs)
            .env("PLATFORM_URL", platform.url())
            .env("WORKSPACE_ID", WORKSPACE_ID)
            .env("CREDD_SOCKET", &socket)
            .env("CREDD_BIN_DIR", bin_dir)
            .env("CREDD_GH_WRAPPER_DIR", root.join("workspace-template/bin"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // As root the entrypoint would drop to the `agent` user; run its
        // user phase as ourselves (the marker it sets itself after the drop).
        if nix::unistd::geteuid().is_root() {
            command.env("CREDD_ENTRYPOINT_STAGE", "user");
        }
        let runtime = command.spawn().context("cannot run the entrypoint")?;
        let workspace = Self {
            socket,
            client_configs,
            bin_dir: bin_dir.to_owned(),
            platform_url: platform.url(),
            log,
            runtime: Mutex::new(Some(runtime)),
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let log = workspace.log();
            if log.contains(ANSWERS_LINE) {
                break;
            }
            if log.contains("ERROR") || Instant::now() > deadline {
                workspace.stop();
                bail!("the entrypoint did not start a daemon that answers; its log:\n{log}");
            }
            // Only a file to watch: the entrypoint signals nothing else.
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(workspace)
    }

    /// `credd get` as git would run it in this workspace (stdin still to
    /// be written by the caller).
    pub(crate) fn credd_get(&self) -> Command {
        let mut command = Command::new(self.bin_dir.join("credd"));
        command
            .arg("get")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("CREDD_SOCKET", &self.socket)
            .env("PLATFORM_URL", &self.platform_url)
            .env("CONFIGS_DIR", &self.client_configs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn run_dir(&self) -> &Path {
        self.socket.parent().expect("the socket has a folder")
    }

    fn pid_file(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.run_dir().join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The daemon the supervisor runs now, if one is alive.
    pub(crate) fn daemon_pid(&self) -> Option<u32> {
        let pid = self.pid_file("molecule-credd.pid")?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim_end() == DAEMON_COMM && is_alive(pid)).then_some(pid)
    }

    /// The live daemon's resident memory and descriptors.
    pub(crate) fn sample(&self) -> Option<Sample> {
        let pid = self.daemon_pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(Iterator::count);
        // Still the same process (the pid file may have moved on meanwhile)?
        (self.daemon_pid() == Some(pid)).then_some(Sample {
            at: Instant::now(),
            pid,
            rss_kib,
            fds,
        })
    }

    /// Everything the entrypoint, its supervisor and the daemons logged.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the supervisor (which stops its daemon), the runtime, and
    /// anything else of this workspace still alive.
    pub(crate) fn stop(&self) {
        if let Some(supervisor) = self.pid_file("supervisor.pid") {
            signal(supervisor, Signal::SIGTERM);
            let deadline = Instant::now() + STOP_DEADLINE;
            while is_alive(supervisor) && Instant::now() < deadline {
                // Not our child: nothing to wait on but its /proc entry.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Some(mut runtime) = lock(&self.runtime).take() {
            let _ = runtime.kill();
            let _ = runtime.wait();
        }
        for pid in processes_with(None, "CREDD_SOCKET", self.socket.as_os_str()) {
            signal(pid, Signal::SIGKILL);
        }
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        self.stop();
    }
}
