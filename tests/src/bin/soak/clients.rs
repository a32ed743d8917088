//! The clients: threads that each run the real `credd get`, paced, with
//! git's credential request on its stdin, and write down every outcome.
//!
//! A token that comes back is checked at once against what the platform
//! issued (a dead or unknown token is a failure of its own) and then only
//! its expiry is kept: the verdict needs when it stops being servable, never
//! the token. A watchdog kills a `credd` that runs past [`GET_DEADLINE`]
//! (credd bounds itself well inside it), so a wedged get is counted, not
//! waited for.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use testkit::{TokenAuthority, lock};

use crate::workspace::Workspace;

/// git's request for a github.com credential.
const GIT_REQUEST: &[u8] = b"protocol=https\nhost=github.com\n\n";
/// The daemon never serves a token with less life left: its
/// `--min-lifetime` default, which the entrypoint does not change.
pub(crate) const DAEMON_MIN_LIFETIME: Duration = Duration::from_secs(60);
/// A `credd get` running longer is killed and counted as hung. credd's own
/// worst case is its connect deadline, its read deadline and the direct
/// platform call's deadline in a row (0.25 + 6 + 12 s).
pub(crate) const GET_DEADLINE: Duration = Duration::from_secs(20);
/// credd's stderr when the daemon could not be reached and it asked the
/// platform itself (helper/src/chain.rs).
const FELL_BACK: &str = "asking the platform directly";

/// How one `get` ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// A token came back.
    Token {
        /// When the daemon stops serving it (expiry less its minimum life).
        servable_until: Instant,
        /// Whether the platform issued it and it was unexpired on arrival.
        current: bool,
    },
    /// Nothing on stdout: git would ask its next helper. The reason is
    /// credd's last stderr line, digits blanked so reasons can be counted.
    Failed { reason: String },
    /// Killed by the watchdog.
    Hung,
}

/// One `credd get`.
#[derive(Debug, Clone)]
pub(crate) struct GetRecord {
    pub(crate) start: Instant,
    pub(crate) end: Instant,
    /// credd found no daemon and asked the platform itself.
    pub(crate) fell_back: bool,
    pub(crate) outcome: Outcome,
}

impl GetRecord {
    pub(crate) fn ok(&self) -> bool {
        matches!(self.outcome, Outcome::Token { .. })
    }

    pub(crate) fn latency(&self) -> Duration {
        self.end - self.start
    }
}

/// `credd` processes running now and when each started, for the watchdog.
#[derive(Default)]
pub(crate) struct Running(Mutex<HashMap<u32, Instant>>);

impl Running {
    /// Kills every `credd` older than [`GET_DEADLINE`].
    pub(crate) fn kill_overdue(&self) {
        let now = Instant::now();
        for (&pid, &started) in lock(&self.0).iter() {
            if now - started > GET_DEADLINE {
                testkit::process::signal(pid, Signal::SIGKILL);
            }
        }
    }
}

/// What every client shares.
pub(crate) struct Clients {
    pub(crate) workspace: Arc<Workspace>,
    pub(crate) authority: TokenAuthority,
    pub(crate) running: Arc<Running>,
    /// Mean time between one client's gets (each wait is uniform in
    /// `[pace/2, 3·pace/2]`).
    pub(crate) pace: Duration,
    pub(crate) until: Instant,
}

impl Clients {
    /// One client's loop until the end of the soak.
    pub(crate) fn run(&self, seed: u64) -> Vec<GetRecord> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut records = Vec::new();
        loop {
            let wait = rng.random_range(self.pace / 2..=self.pace * 3 / 2);
            std::thread::sleep(wait);
            if Instant::now() >= self.until {
                return records;
            }
            records.push(self.get());
        }
    }

    fn get(&self) -> GetRecord {
        let start = Instant::now();
        let mut child = match self.workspace.credd_get().spawn() {
            Ok(child) => child,
            Err(e) => {
                return GetRecord {
                    start,
                    end: Instant::now(),
                    fell_back: false,
                    outcome: Outcome::Failed {
                        reason: format!("soak: cannot run credd: {e}"),
                    },
                };
            }
        };
        let pid = child.id();
        lock(&self.running.0).insert(pid, start);
        if let Some(mut stdin) = child.stdin.take() {
            // credd may have given up already; its answer says what happened.
            let _ = stdin.write_all(GIT_REQUEST);
        }
        let output = child.wait_with_output();
        lock(&self.running.0).remove(&pid);
        let end = Instant::now();
        let Ok(output) = output else {
            return GetRecord {
                start,
                end,
                fell_back: false,
                outcome: Outcome::Failed {
                    reason: "soak: lost track of credd".into(),
                },
            };
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        let fell_back = stderr.contains(FELL_BACK);
        if end - start > GET_DEADLINE {
            return GetRecord {
                start,
                end,
                fell_back,
                outcome: Outcome::Hung,
            };
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let attribute = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        };
        let outcome = match (attribute("password"), attribute("password_expiry_utc")) {
            (Some(password), Some(expiry)) => {
                let current = self.authority.is_current(password);
                let expiry: u64 = expiry.parse().unwrap_or(0);
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let left = Duration::from_secs(expiry.saturating_sub(now));
                Outcome::Token {
                    servable_until: (end + left).checked_sub(DAEMON_MIN_LIFETIME).unwrap_or(end),
                    current,
                }
            }
            _ => Outcome::Failed {
                reason: reason(&stderr),
            },
        };
        GetRecord {
            start,
            end,
            fell_back,
            outcome,
        }
    }
}

/// credd's last stderr line with digits blanked (`#`), so that the same
/// reason with other numbers (seconds, ports) counts once.
fn reason(stderr: &str) -> String {
    let last = stderr.lines().last().unwrap_or("(no output)");
    let mut reason: String = last
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    reason.truncate(200);
    reason
}
