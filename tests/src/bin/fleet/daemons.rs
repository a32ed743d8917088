//! The fleet: one real `molecule-credd` process per workspace, each with its
//! own socket, configs folder (its own `.auth_token`) and `WORKSPACE_ID`,
//! all spawned in one go as a rollout would start them.
//!
//! Daemons log to a file each (no pipe per daemon held open by the driver:
//! hundreds of daemons would otherwise cost the driver two descriptors
//! each); the logs are read back at the end and scanned for secrets.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;
use testkit::process::signal;

use crate::Options;

/// The most daemons one run starts (each is a process and a few
/// descriptors; the machine's process and file limits are far above).
pub(crate) const MAX_DAEMONS: usize = 2000;
/// How long a daemon may take to exit on SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(15);

/// A workspace of the fleet: its id and its platform bearer.
pub(crate) struct Workspace {
    pub(crate) id: String,
    pub(crate) bearer: String,
}

/// `count` workspaces `fleet-0001`… with random bearers.
pub(crate) fn workspaces(count: usize) -> Vec<Workspace> {
    (1..=count)
        .map(|n| Workspace {
            id: format!("fleet-{n:04}"),
            bearer: testkit::secrets::random_secret("fleet-bearer"),
        })
        .collect()
}

struct Daemon {
    workspace: String,
    log: PathBuf,
    child: Child,
}

/// The running daemons.
pub(crate) struct Fleet {
    daemons: Vec<Daemon>,
}

fn private_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", path.display()))
}

impl Fleet {
    /// Prepares every workspace's folders first, then spawns all daemons
    /// back to back: the rollout.
    pub(crate) fn roll_out(
        dir: &Path,
        bin_dir: &Path,
        options: &Options,
        platform_url: &str,
        workspaces: &[Workspace],
    ) -> anyhow::Result<Self> {
        let mut commands = Vec::with_capacity(workspaces.len());
        for workspace in workspaces {
            let home = dir.join(&workspace.id);
            let configs = home.join("configs");
            let run = home.join("run");
            for folder in [&home, &configs, &run] {
                private_dir(folder)?;
            }
            testkit::write_file(&configs.join(".auth_token"), &workspace.bearer, 0o600);
            let log = home.join("daemon.log");
            let log_file = std::fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))?;
            let mut command = Command::new(bin_dir.join("molecule-credd"));
            command
                .arg("--refresh-margin")
                .arg(format!("{}s", options.refresh_margin.as_secs()))
                .arg("--min-lifetime")
                .arg(format!("{}s", options.min_lifetime.as_secs()))
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .env("HOME", &home)
                .env("CONFIGS_DIR", &configs)
                .env("WORKSPACE_ID", &workspace.id)
                .env("PLATFORM_URL", platform_url)
                .env("CREDD_SOCKET", run.join("credd.sock"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file);
            commands.push((workspace.id.clone(), log, command));
        }
        let mut fleet = Self {
            daemons: Vec::with_capacity(commands.len()),
        };
        for (workspace, log, mut command) in commands {
            match command.spawn() {
                Ok(child) => fleet.daemons.push(Daemon {
                    workspace,
                    log,
                    child,
                }),
                Err(error) => {
                    fleet.stop();
                    return Err(error)
                        .with_context(|| format!("cannot start the daemon of {workspace}"));
                }
            }
        }
        Ok(fleet)
    }

    /// The first daemon found to have exited, with its status and log tail.
    pub(crate) fn first_exited(&mut self) -> Option<String> {
        self.daemons.iter_mut().find_map(|d| {
            let status = d.child.try_wait().ok().flatten()?;
            let log = std::fs::read_to_string(&d.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            Some(format!(
                "{} ({status}); its log's last lines:\n{}",
                d.workspace,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ))
        })
    }

    /// SIGTERMs every daemon, waits (SIGKILL past [`STOP_DEADLINE`]) and
    /// returns each workspace's log.
    pub(crate) fn stop(&mut self) -> Vec<(String, String)> {
        for d in &self.daemons {
            signal(d.child.id(), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        let mut logs = Vec::with_capacity(self.daemons.len());
        for mut d in self.daemons.drain(..) {
            loop {
                match d.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = d.child.kill();
                        let _ = d.child.wait();
                        break;
                    }
                    // Children of ours, but waiting on each in turn with a
                    // deadline needs polling (no waitpid with a timeout).
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            logs.push((
                d.workspace,
                std::fs::read_to_string(&d.log).unwrap_or_default(),
            ));
        }
        logs
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}
