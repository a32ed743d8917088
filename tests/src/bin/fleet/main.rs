//! `fleet`: hundreds of real `molecule-credd` processes, started together as
//! a fleet rollout would start them, against one real `molecule-platform`,
//! for several token lifetimes; then what the platform saw.
//!
//! Why: one daemon calling once per token lifetime says nothing about a
//! fleet. What an operator needs to know is the load the platform (and
//! GitHub behind it) sees when thousands of workspaces refresh: whether the
//! refresh jitter spreads them or they call in bursts, whether any daemon
//! calls more than once per token, whether the platform mints more than once
//! per round. Every daemon is a real process with its own socket, configs
//! folder and workspace bearer; the platform is the real binary, in GitHub
//! mode against the `github-stand-in` process or in `--dev` mode; the
//! platform's own log says which workspace it served which token when. What
//! is judged is in [`verdict`], the chart in [`chart`]; `scripts/fleet.sh`
//! builds the release binaries and runs it.
//!
//! ```text
//! fleet --bin-dir target/release [--daemons 200] [--seconds 1500]
//!       [--token-ttl-secs 300] [--refresh-margin-secs 60] [--min-lifetime-secs 20]
//!       [--platform github|dev] [--replicas 1] [--out DIR]
//! ```
//!
//! `--replicas N` (GitHub mode): N platform replicas sharing one Redis
//! behind HAProxy instead of one platform (see [`platform`]).
//!
//! Prints a plain-text report, then one line `FLEET_RESULT {json}`; with
//! `--out`, writes `fleet.svg` and `fleet.json` there. Exits 1 when a target
//! is missed, 2 when the fleet could not run.
#![forbid(unsafe_code)]

mod chart;
mod daemons;
mod platform;
mod verdict;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::daemons::Fleet;
use crate::platform::{Mode, Platform};

/// How often the driver checks that every daemon is still alive.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long after the rollout every daemon must have been served once.
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(60);

/// The command line.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) bin_dir: PathBuf,
    pub(crate) daemons: usize,
    pub(crate) seconds: u64,
    pub(crate) token_ttl: Duration,
    pub(crate) refresh_margin: Duration,
    pub(crate) min_lifetime: Duration,
    pub(crate) mode: Mode,
    /// Platform processes: 1, or replicas sharing Redis behind HAProxy.
    pub(crate) replicas: usize,
    pub(crate) out: Option<PathBuf>,
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
        let mode = match value("--platform")?.as_deref() {
            None | Some("github") => Mode::GitHub,
            Some("dev") => Mode::Dev,
            Some(other) => bail!("--platform is github or dev, got {other:?}"),
        };
        let options = Self {
            bin_dir: value("--bin-dir")?
                .map_or_else(|| PathBuf::from("target/release"), PathBuf::from),
            daemons: number("--daemons", 200)? as usize,
            seconds: number("--seconds", 1500)?,
            token_ttl: Duration::from_secs(number("--token-ttl-secs", 300)?),
            refresh_margin: Duration::from_secs(number("--refresh-margin-secs", 60)?),
            min_lifetime: Duration::from_secs(number("--min-lifetime-secs", 20)?),
            mode,
            replicas: number("--replicas", 1)? as usize,
            out: value("--out")?.map(PathBuf::from),
        };
        if !(1..=8).contains(&options.replicas) {
            bail!("--replicas must be 1-8");
        }
        if options.replicas > 1 && options.mode != Mode::GitHub {
            bail!("--replicas shares GitHub tokens: it needs --platform github");
        }
        let mut needed = vec!["molecule-credd", "molecule-platform"];
        if options.mode == Mode::GitHub {
            needed.push("github-stand-in");
        }
        for name in needed {
            if !options.bin_dir.join(name).is_file() {
                bail!(
                    "{} has no {name}: build the release binaries first (scripts/build-release.sh)",
                    options.bin_dir.display()
                );
            }
        }
        if options.daemons == 0 || options.daemons > daemons::MAX_DAEMONS {
            bail!("--daemons must be 1-{}", daemons::MAX_DAEMONS);
        }
        if options.min_lifetime >= options.refresh_margin
            || options.refresh_margin >= options.token_ttl
        {
            bail!("need --min-lifetime-secs < --refresh-margin-secs < --token-ttl-secs");
        }
        if options.seconds < 2 * options.token_ttl.as_secs() {
            bail!(
                "--seconds must cover at least two token lifetimes (the first is the rollout, not judged)"
            );
        }
        Ok(options)
    }
}

fn run(options: &Options) -> anyhow::Result<bool> {
    let dir = tempfile::Builder::new()
        .prefix("credd-fleet.")
        .tempdir()
        .context("cannot create the fleet folder")?;
    let bin_dir = std::fs::canonicalize(&options.bin_dir)?;
    let workspaces = daemons::workspaces(options.daemons);
    let platform = Platform::start(dir.path(), &bin_dir, options, &workspaces)?;
    eprintln!(
        "fleet: {} daemons, {}s, {} platform x{} ({}), tokens of {}s, --refresh-margin {}s --min-lifetime {}s",
        options.daemons,
        options.seconds,
        options.mode.name(),
        options.replicas,
        platform.url(),
        options.token_ttl.as_secs(),
        options.refresh_margin.as_secs(),
        options.min_lifetime.as_secs()
    );

    let started = Instant::now();
    platform.log().set_origin(started);
    let mut fleet = Fleet::roll_out(dir.path(), &bin_dir, options, &platform.url(), &workspaces)?;
    let rolled_out = started.elapsed();
    eprintln!(
        "fleet: {} daemons started in {:.1}s",
        options.daemons,
        rolled_out.as_secs_f64()
    );
    let until = started + Duration::from_secs(options.seconds);
    let mut all_served_at = None;
    let mut next_report = started + Duration::from_secs(60);
    while Instant::now() < until {
        std::thread::sleep(CHECK_EVERY.min(until.saturating_duration_since(Instant::now())));
        if let Some(dead) = fleet.first_exited() {
            fleet.stop();
            bail!("a daemon exited during the run: {dead}");
        }
        if all_served_at.is_none() {
            if platform.log().workspaces_served() == options.daemons {
                all_served_at = Some(started.elapsed());
            } else if started.elapsed() > ROLLOUT_DEADLINE {
                fleet.stop();
                bail!(
                    "only {} of {} daemons were served within {}s of the rollout; platform log tail:\n{}",
                    platform.log().workspaces_served(),
                    options.daemons,
                    ROLLOUT_DEADLINE.as_secs(),
                    platform.log().tail(20)
                );
            }
        }
        if Instant::now() >= next_report {
            eprintln!(
                "fleet: +{:.0}s, {} platform calls served so far",
                started.elapsed().as_secs_f64(),
                platform.log().served().len()
            );
            next_report += Duration::from_secs(60);
        }
    }
    let elapsed = started.elapsed();
    let daemon_logs = fleet.stop();
    let mints = platform.mints()?;
    let platform_text = platform.stop();

    let secrets = platform.secrets(&workspaces);
    let mut leaks = secrets.leaks(&platform_text);
    for (workspace, log) in &daemon_logs {
        for kind in secrets.leaks(log) {
            leaks.push(format!("{kind} in the log of {workspace}"));
        }
    }
    let served = platform.log().served();
    let failed = platform.log().failures();
    let verdict = verdict::judge(&verdict::Run {
        options,
        served: &served,
        failed: &failed,
        mints: mints.as_ref(),
        elapsed,
        rolled_out,
        all_served_at,
        leaks,
    });
    print!("{}", verdict.text);
    println!("FLEET_RESULT {}", verdict.json);
    if let Some(out) = &options.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        chart::draw(&out.join("fleet.svg"), &verdict.chart)?;
        let mut json = serde_json::to_string_pretty(&verdict.json)?;
        json.push('\n');
        std::fs::write(out.join("fleet.json"), json)
            .with_context(|| format!("cannot write {}/fleet.json", out.display()))?;
        eprintln!(
            "fleet: wrote {0}/fleet.svg and {0}/fleet.json",
            out.display()
        );
    }
    Ok(verdict.passed)
}

fn main() -> ExitCode {
    match Options::parse().and_then(|options| run(&options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("fleet: error: {error:#}");
            ExitCode::from(2)
        }
    }
}
