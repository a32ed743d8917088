//! `soak`: many clients running the real `credd get` for minutes while the
//! platform flaps and the daemon is `SIGKILL`ed, then a verdict.
//!
//! Why: the unit and integration tests show each fault handled once; a soak
//! shows them handled in any order, under a crowd, for a long time, with the
//! real pieces — `credd` on git's credential protocol, the daemon started
//! and restarted by the workspace entrypoint's supervisor, the platform
//! service behind the test kit's fault switch handing out short tokens. What
//! it judges, and how precisely, is in [`verdict`]; `scripts/soak.sh` builds
//! the release binaries and runs it.
//!
//! ```text
//! soak --bin-dir target/release [--seconds 600] [--clients 100] [--pace-ms 500]
//!      [--phase-secs 30] [--slow-hold-ms 3000] [--kill-min-secs 20]
//!      [--kill-max-secs 90] [--token-ttl-secs 120] [--seed N]
//! ```
//!
//! Prints a plain-text report, then one line `SOAK_RESULT {json}`; exits 1
//! when a target is missed, 2 when the soak could not run.
#![forbid(unsafe_code)]

mod chaos;
mod clients;
mod verdict;
mod workspace;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testkit::platform::WORKSPACE_ID;
use testkit::{Secrets, TestPlatform, lock};

use crate::chaos::{FlapPlan, Timeline};
use crate::clients::{Clients, Running};
use crate::workspace::{Sample, Workspace};

/// How often the daemon's memory and descriptors are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// The watchdog's period (see [`clients::GET_DEADLINE`]).
const WATCHDOG_EVERY: Duration = Duration::from_millis(500);

/// The command line.
#[derive(Debug)]
struct Options {
    bin_dir: PathBuf,
    seconds: u64,
    clients: usize,
    pace: Duration,
    plan: FlapPlan,
    kill_min: Duration,
    kill_max: Duration,
    token_ttl: Duration,
    seed: u64,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let value = |name: &str| -> anyhow::Result<Option<String>> {
            match args.iter().position(|a| a == name) {
                Some(i) => args
                    .get(i + 1)
                    .cloned()
                    .map(Some)
                    .with_context(|| format!("{name} needs a value")),
                None => Ok(None),
            }
        };
        let number = |name: &str, default: u64| -> anyhow::Result<u64> {
            value(name)?.map_or(Ok(default), |v| {
                v.parse()
                    .with_context(|| format!("{name}: not a number: {v}"))
            })
        };
        let options = Self {
            bin_dir: PathBuf::from("target/release"),
            seconds: number("--seconds", 600)?,
            clients: number("--clients", 100)? as usize,
            pace: Duration::from_millis(number("--pace-ms", 500)?),
            plan: FlapPlan {
                phase: Duration::from_secs(number("--phase-secs", 30)?),
                slow_hold: Duration::from_millis(number("--slow-hold-ms", 3000)?),
            },
            kill_min: Duration::from_secs(number("--kill-min-secs", 20)?),
            kill_max: Duration::from_secs(number("--kill-max-secs", 90)?),
            token_ttl: Duration::from_secs(number("--token-ttl-secs", 120)?),
            seed: number(
                "--seed",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs(),
            )?,
        };
        let bin_dir = value("--bin-dir")?.map_or(options.bin_dir.clone(), PathBuf::from);
        let options = Self { bin_dir, ..options };
        for name in ["credd", "molecule-credd"] {
            if !options.bin_dir.join(name).is_file() {
                bail!(
                    "{} has no {name}: build the release binaries first (scripts/build-release.sh)",
                    options.bin_dir.display()
                );
            }
        }
        if options.clients == 0 || options.pace.is_zero() || options.kill_min > options.kill_max {
            bail!(
                "--clients and --pace-ms must be above 0, --kill-min-secs at most --kill-max-secs"
            );
        }
        Ok(options)
    }
}

/// Runs `work` every `period` on a thread until the returned flag is raised.
fn every(
    period: Duration,
    mut work: impl FnMut() + Send + 'static,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        while !stopping.load(Ordering::SeqCst) {
            work();
            std::thread::sleep(period);
        }
    });
    (stop, thread)
}

fn soak(options: &Options) -> anyhow::Result<bool> {
    let dir = tempfile::Builder::new()
        .prefix("credd-soak.")
        .tempdir()
        .context("cannot create the soak folder")?;
    let bin_dir = std::fs::canonicalize(&options.bin_dir)?;
    let platform = Arc::new(TestPlatform::with_ttl(options.token_ttl));
    let workspace = Arc::new(Workspace::start(dir.path(), &bin_dir, &platform)?);
    eprintln!(
        "soak: {}s, {} clients every ~{} ms, platform phases of {}s, kills {}-{}s apart, seed {}",
        options.seconds,
        options.clients,
        options.pace.as_millis(),
        options.plan.phase.as_secs(),
        options.kill_min.as_secs(),
        options.kill_max.as_secs(),
        options.seed
    );

    let started = Instant::now();
    let until = started + Duration::from_secs(options.seconds);
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let flapper = chaos::flap(Arc::clone(&platform), options.plan, Arc::clone(&timeline));
    let killer = chaos::kill_at_random(
        Arc::clone(&workspace),
        options.kill_min,
        options.kill_max,
        options.seed,
    );
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let (sampling, sampler) = {
        let workspace = Arc::clone(&workspace);
        let samples = Arc::clone(&samples);
        every(SAMPLE_EVERY, move || {
            if let Some(sample) = workspace.sample() {
                lock(&samples).push(sample);
            }
        })
    };
    let running = Arc::new(Running::default());
    let (watching, watchdog) = {
        let running = Arc::clone(&running);
        every(WATCHDOG_EVERY, move || running.kill_overdue())
    };
    let clients = Arc::new(Clients {
        workspace: Arc::clone(&workspace),
        authority: platform.authority(),
        running,
        pace: options.pace,
        until,
    });
    let threads: Vec<_> = (0..options.clients)
        .map(|i| {
            let clients = Arc::clone(&clients);
            let seed = options.seed.wrapping_add(1 + i as u64);
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || clients.run(seed))
                .context("cannot start a client thread")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut records = Vec::new();
    for thread in threads {
        records.extend(thread.join().expect("client thread"));
    }
    let elapsed = started.elapsed();
    let kills = killer.finish();
    flapper.finish();
    sampling.store(true, Ordering::SeqCst);
    sampler.join().expect("sampler");
    watching.store(true, Ordering::SeqCst);
    watchdog.join().expect("watchdog");
    workspace.stop();

    // The log is scanned for the bearers and for token shapes (every token
    // the platform issued is ghs_-shaped; registering tens of thousands of
    // them one by one would only slow the scan down).
    let bearers = Secrets::new();
    bearers.add("the admin bearer", platform.bearer());
    bearers.add("the workspace bearer", platform.workspace_bearer());
    let log_leaks = bearers.leaks(&workspace.log());

    records.sort_by_key(|r| r.start);
    let timeline = lock(&timeline);
    let samples = lock(&samples);
    let seen = platform.seen();
    let daemon_route = format!("/workspaces/{WORKSPACE_ID}/github-installation-token");
    let verdict = verdict::judge(&verdict::Run {
        records: &records,
        kills: &kills,
        timeline: &timeline,
        samples: &samples,
        seen: &seen,
        daemon_route: &daemon_route,
        elapsed,
        token_ttl: options.token_ttl,
        clients: options.clients,
        pace: options.pace,
        log_leaks,
    });
    print!("{}", verdict.text);
    println!("SOAK_RESULT {}", verdict.json);
    if !verdict.passed {
        let log = workspace.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("soak: the workspace log's last lines:");
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
    }
    Ok(verdict.passed)
}

fn main() -> ExitCode {
    let outcome = Options::parse().and_then(|options| soak(&options));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("soak: error: {error:#}");
            ExitCode::from(2)
        }
    }
}
