//! The faults: the platform flapping on a fixed schedule, and the daemon
//! `SIGKILL`ed at random moments.
//!
//! Both run on threads of their own and write down what they did and when
//! (a [`Timeline`] of platform phases, a list of kills), because the verdict
//! judges every `get` against what the chain could have served at that
//! moment. The schedule is fixed (so every run sees every phase); the kill
//! moments are drawn from a seeded generator (so a failing run can be
//! repeated with its seed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use testkit::{Fault, TestPlatform, lock};

use crate::workspace::Workspace;

/// What the platform does during one stretch of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Serving: the real platform service.
    Up,
    /// Connection refused.
    Down,
    /// `500 Internal Server Error` to every request.
    ServerError,
    /// Serving, but every answer is held up to the slow hold first.
    Slow,
}

impl Phase {
    /// The order the schedule cycles through (up first: the daemon's first
    /// token comes from a serving platform).
    pub(crate) const CYCLE: [Phase; 6] = [
        Phase::Up,
        Phase::Down,
        Phase::Up,
        Phase::ServerError,
        Phase::Up,
        Phase::Slow,
    ];

    /// Whether the platform hands out a token during this phase (a slow
    /// answer still comes well inside every caller's deadline).
    pub(crate) fn serves(self) -> bool {
        matches!(self, Phase::Up | Phase::Slow)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Phase::Up => "up",
            Phase::Down => "down",
            Phase::ServerError => "500",
            Phase::Slow => "slow",
        }
    }
}

/// When each phase began, in order.
#[derive(Debug, Default)]
pub(crate) struct Timeline {
    changes: Vec<(Instant, Phase)>,
}

impl Timeline {
    fn record(&mut self, at: Instant, phase: Phase) {
        self.changes.push((at, phase));
    }

    /// Every phase change, in order.
    pub(crate) fn changes(&self) -> &[(Instant, Phase)] {
        &self.changes
    }

    /// The phase in force at `t` (`None` before the first).
    fn phase_at(&self, t: Instant) -> Option<usize> {
        self.changes.iter().rposition(|(at, _)| *at <= t)
    }

    /// Whether the platform was serving for the whole of `[from, to]`.
    pub(crate) fn served_throughout(&self, from: Instant, to: Instant) -> bool {
        let Some(first) = self.phase_at(from) else {
            return false;
        };
        self.changes[first..]
            .iter()
            .take_while(|(at, _)| *at <= to)
            .all(|(_, phase)| phase.serves())
    }
}

/// How the platform flaps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FlapPlan {
    /// Length of every phase.
    pub(crate) phase: Duration,
    /// How long a slow answer is held at most.
    pub(crate) slow_hold: Duration,
}

/// A background thread that runs a schedule until stopped.
pub(crate) struct Chaos<T> {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<T>,
}

impl<T> Chaos<T> {
    /// Stops the thread and returns what it recorded.
    pub(crate) fn finish(self) -> T {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("chaos thread")
    }
}

/// Sleeps `d` in short steps; `false` when `stop` was raised meanwhile.
fn sleep_unless(stop: &AtomicBool, d: Duration) -> bool {
    const STEP: Duration = Duration::from_millis(50);
    let until = Instant::now() + d;
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep(STEP.min(until - now));
    }
}

/// Flaps `platform` through [`Phase::CYCLE`] until stopped; the platform is
/// left serving. Phase changes are also written to `timeline` as they
/// happen, so the clients' verdict can read it at the end.
pub(crate) fn flap(
    platform: Arc<TestPlatform>,
    plan: FlapPlan,
    timeline: Arc<Mutex<Timeline>>,
) -> Chaos<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        'cycle: for phase in Phase::CYCLE.iter().copied().cycle() {
            let until = Instant::now() + plan.phase;
            lock(&timeline).record(Instant::now(), phase);
            match phase {
                Phase::Up => platform.set_fault(Fault::PassThrough),
                Phase::Down => platform.set_fault(Fault::Down),
                Phase::ServerError => platform.set_fault(Fault::Status(500)),
                Phase::Slow => {
                    // Hold every request for `slow_hold`, then serve for
                    // half as long (held requests see the release even on
                    // a saturated machine: the switch reads the latest
                    // value), again: no answer waits much past the hold.
                    while Instant::now() < until {
                        platform.set_fault(Fault::Hang);
                        if !sleep_unless(&stopping, plan.slow_hold) {
                            break 'cycle;
                        }
                        platform.set_fault(Fault::PassThrough);
                        if !sleep_unless(&stopping, plan.slow_hold / 2) {
                            break 'cycle;
                        }
                    }
                    continue;
                }
            }
            if !sleep_unless(&stopping, until.saturating_duration_since(Instant::now())) {
                break;
            }
        }
        platform.set_fault(Fault::PassThrough);
        lock(&timeline).record(Instant::now(), Phase::Up);
    });
    Chaos { stop, thread }
}

/// One `SIGKILL` the killer sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kill {
    pub(crate) at: Instant,
}

/// Kills the workspace's daemon at moments drawn uniformly from
/// `[min, max]` apart until stopped (skipping a moment when no daemon runs:
/// the supervisor is still waiting to respawn it).
pub(crate) fn kill_at_random(
    workspace: Arc<Workspace>,
    min: Duration,
    max: Duration,
    seed: u64,
) -> Chaos<Vec<Kill>> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut kills = Vec::new();
        loop {
            let wait = rng.random_range(min..=max);
            if !sleep_unless(&stopping, wait) {
                break;
            }
            // The daemon may be between death and respawn: try again shortly.
            let pid = loop {
                if let Some(pid) = workspace.daemon_pid() {
                    break Some(pid);
                }
                if !sleep_unless(&stopping, Duration::from_millis(200)) {
                    break None;
                }
            };
            let Some(pid) = pid else { break };
            testkit::process::signal(pid, Signal::SIGKILL);
            kills.push(Kill { at: Instant::now() });
        }
        kills
    });
    Chaos { stop, thread }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_throughout_reads_the_timeline() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut timeline = Timeline::default();
        for (at, phase) in [
            (0, Phase::Up),
            (10, Phase::Down),
            (20, Phase::Up),
            (30, Phase::ServerError),
            (40, Phase::Slow),
        ] {
            timeline.record(s(at), phase);
        }
        assert!(timeline.served_throughout(s(1), s(9)));
        assert!(!timeline.served_throughout(s(9), s(11)));
        assert!(timeline.served_throughout(s(21), s(29)));
        assert!(timeline.served_throughout(s(41), s(50)));
    }
}
