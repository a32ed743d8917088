//! The verdict: every `get` judged against what the chain could have served
//! at that moment, and the daemon's resources over its lives.
//!
//! **Unexcused failure** (target 0): a `get` that printed no token although
//! a usable token existed in the chain for its whole run `[start, end]`:
//! - *the daemon held one*: no kill fell inside the get, and the daemon
//!   alive then (the same incarnation, between two kills) had already
//!   answered another get, before this one started, with a token still
//!   servable (expiry less `--min-lifetime`) after this one ended. The
//!   daemon never drops a servable token (no `erase` is sent here), so it
//!   held one the whole time; or
//! - *the platform would have served*: credd found no daemon and asked the
//!   platform itself, and the platform was serving (up, or slow within
//!   every deadline) for the whole get.
//!
//! Reported beside it, not a target: **daemon-side gaps**, gets the daemon
//! answered "no usable token" while the platform was serving. Two causes,
//! both by design: the daemon's back-off after an outage had not run out
//! yet (a reachable daemon without a token is not bypassed, and clients
//! never cut a back-off short: README, "The fallback chain"), or the
//! platform handed back its cached token with barely `--min-lifetime` left
//! (with 2-minute tokens the platform's refresh window, half the life, and
//! the daemon's minimum life, 60 s, meet). The figure shows what they cost,
//! with the time from each recovery to the daemon's next served call.
//!
//! **Flat** (target): for every daemon that lived long enough, resident
//! memory (median over a window) grew by at most [`RSS_TOLERANCE_KIB`] and
//! open descriptors (minimum over a window: connections in flight come and
//! go) by at most [`FD_TOLERANCE`] from its first to its last window; the
//! same between the first daemon's first window and the last daemon's last
//! (restarts must not accumulate anything, say descriptors the supervisor
//! hands down).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::platform::SeenRequest;

use crate::chaos::{Kill, Timeline};
use crate::clients::{GetRecord, Outcome};
use crate::workspace::Sample;

/// Resident-memory growth still counted as flat, KiB.
pub(crate) const RSS_TOLERANCE_KIB: u64 = 1024;
/// Descriptor growth still counted as flat.
pub(crate) const FD_TOLERANCE: usize = 2;
/// A daemon's first seconds (first fetch, a crowd of waiting clients) are
/// not its steady state; its first window starts after this.
const WARM_UP: Duration = Duration::from_secs(2);
/// Length of the first and the last window of a daemon's life.
const WINDOW: Duration = Duration::from_secs(5);
/// `password_expiry_utc` is whole seconds.
const EXPIRY_ROUNDING: Duration = Duration::from_secs(1);

/// Everything the soak recorded.
pub(crate) struct Run<'a> {
    pub(crate) records: &'a [GetRecord],
    pub(crate) kills: &'a [Kill],
    pub(crate) timeline: &'a Timeline,
    pub(crate) samples: &'a [Sample],
    pub(crate) seen: &'a [SeenRequest],
    /// The platform route the daemon asks on (the clients' fallback uses
    /// another).
    pub(crate) daemon_route: &'a str,
    pub(crate) elapsed: Duration,
    pub(crate) token_ttl: Duration,
    pub(crate) clients: usize,
    pub(crate) pace: Duration,
    pub(crate) log_leaks: Vec<String>,
}

/// A daemon's resources at the start and the end of a window of its life.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    rss_kib: u64,
    fds: Option<usize>,
}

fn footprint(samples: &[&Sample]) -> Option<Footprint> {
    if samples.is_empty() {
        return None;
    }
    let mut rss: Vec<u64> = samples.iter().map(|s| s.rss_kib).collect();
    rss.sort_unstable();
    Some(Footprint {
        rss_kib: rss[rss.len() / 2],
        fds: samples.iter().filter_map(|s| s.fds).min(),
    })
}

/// One daemon's first and last window.
struct Life {
    pid: u32,
    lived: Duration,
    first: Footprint,
    last: Footprint,
}

fn lives(samples: &[Sample]) -> Vec<Life> {
    let mut by_pid: Vec<(u32, Vec<&Sample>)> = Vec::new();
    for sample in samples {
        match by_pid.last_mut() {
            Some((pid, group)) if *pid == sample.pid => group.push(sample),
            _ => by_pid.push((sample.pid, vec![sample])),
        }
    }
    by_pid
        .into_iter()
        .filter_map(|(pid, group)| {
            let born = group.first()?.at;
            let died = group.last()?.at;
            let lived = died - born;
            if lived < WARM_UP + WINDOW * 2 {
                return None;
            }
            let in_window = |from: Instant, to: Instant| -> Vec<&Sample> {
                group
                    .iter()
                    .copied()
                    .filter(|s| s.at >= from && s.at <= to)
                    .collect()
            };
            Some(Life {
                pid,
                lived,
                first: footprint(&in_window(born + WARM_UP, born + WARM_UP + WINDOW))?,
                last: footprint(&in_window(died - WINDOW, died))?,
            })
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}

/// The judged run: the report's text, its one JSON line, and whether every
/// target held.
pub(crate) struct Verdict {
    pub(crate) text: String,
    pub(crate) json: serde_json::Value,
    pub(crate) passed: bool,
}

pub(crate) fn judge(run: &Run<'_>) -> Verdict {
    let records = run.records;
    let kills_before = |t: Instant| run.kills.partition_point(|k| k.at < t);
    let kill_inside =
        |from: Instant, to: Instant| run.kills.iter().any(|k| k.at >= from && k.at <= to);

    // Per daemon life (index = kills before), the gets it answered with a
    // token: (end, servable until), in order of end.
    let mut served: BTreeMap<usize, Vec<(Instant, Instant)>> = BTreeMap::new();
    for r in records {
        if let Outcome::Token { servable_until, .. } = r.outcome
            && !r.fell_back
            && kills_before(r.start) == kills_before(r.end)
        {
            served
                .entry(kills_before(r.start))
                .or_default()
                .push((r.end, servable_until));
        }
    }
    // Running maximum of "servable until" over each life's answers.
    let held_until: BTreeMap<usize, (Vec<Instant>, Vec<Instant>)> = served
        .into_iter()
        .map(|(life, mut answers)| {
            answers.sort_by_key(|(end, _)| *end);
            let ends = answers.iter().map(|(end, _)| *end).collect();
            let mut best: Option<Instant> = None;
            let until = answers
                .iter()
                .map(|(_, until)| {
                    let b = best.map_or(*until, |b| b.max(*until));
                    best = Some(b);
                    b
                })
                .collect();
            (life, (ends, until))
        })
        .collect();
    let daemon_held = |r: &GetRecord| -> bool {
        if kill_inside(r.start, r.end) {
            return false;
        }
        let Some((ends, until)) = held_until.get(&kills_before(r.start)) else {
            return false;
        };
        let before = ends.partition_point(|end| *end < r.start);
        before > 0 && until[before - 1] > r.end + EXPIRY_ROUNDING
    };

    let mut unexcused_held = 0usize;
    let mut unexcused_platform = 0usize;
    let mut daemon_gap = 0usize;
    let mut excused = 0usize;
    let mut hung = 0usize;
    let mut dead_tokens = 0usize;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut examples: Vec<String> = Vec::new();
    for r in records {
        match &r.outcome {
            Outcome::Token { current, .. } => {
                if !current {
                    dead_tokens += 1;
                }
                continue;
            }
            Outcome::Hung => hung += 1,
            Outcome::Failed { reason } => *reasons.entry(reason.clone()).or_default() += 1,
        }
        let platform_served = run.timeline.served_throughout(r.start, r.end);
        let class = if daemon_held(r) {
            unexcused_held += 1;
            "UNEXCUSED (the daemon held a servable token)"
        } else if r.fell_back && platform_served {
            unexcused_platform += 1;
            "UNEXCUSED (no daemon; the platform was serving)"
        } else if !r.fell_back && platform_served && !matches!(r.outcome, Outcome::Hung) {
            daemon_gap += 1;
            continue;
        } else {
            excused += 1;
            continue;
        };
        if examples.len() < 10 {
            let reason = match &r.outcome {
                Outcome::Failed { reason } => reason.as_str(),
                _ => "hung",
            };
            examples.push(format!(
                "  {class} at +{:.1}s for {:.0} ms: {reason}",
                (r.start - run.timeline.changes()[0].0).as_secs_f64(),
                ms(r.latency())
            ));
        }
    }
    let unexcused = unexcused_held + unexcused_platform;

    // Time from each recovery of the platform to the daemon's next
    // successful call (a call on the daemon's route the platform served).
    let daemon_calls: Vec<&SeenRequest> = run
        .seen
        .iter()
        .filter(|s| s.path == run.daemon_route)
        .collect();
    let fallback_calls = run.seen.len() - daemon_calls.len();
    let mut recoveries: Vec<Duration> = Vec::new();
    let changes = run.timeline.changes();
    for pair in changes.windows(2) {
        let ((_, before), (at, now)) = (pair[0], pair[1]);
        if !before.serves()
            && now.serves()
            && let Some(call) = daemon_calls.iter().find(|s| {
                s.at >= at && matches!(s.fault, testkit::Fault::PassThrough | testkit::Fault::Hang)
            })
        {
            recoveries.push(call.at - at);
        }
    }
    let longest_recovery = recoveries.iter().max().copied().unwrap_or_default();

    let lifetimes = run.elapsed.as_secs_f64() / run.token_ttl.as_secs_f64();
    let daemon_calls_per_lifetime = daemon_calls.len() as f64 / lifetimes;

    let mut latencies: Vec<Duration> = records.iter().map(GetRecord::latency).collect();
    latencies.sort_unstable();
    let mut daemon_latencies: Vec<Duration> = records
        .iter()
        .filter(|r| r.ok() && !r.fell_back)
        .map(GetRecord::latency)
        .collect();
    daemon_latencies.sort_unstable();
    let mut fallback_latencies: Vec<Duration> = records
        .iter()
        .filter(|r| r.fell_back)
        .map(GetRecord::latency)
        .collect();
    fallback_latencies.sort_unstable();
    let ok = records.iter().filter(|r| r.ok()).count();
    let fell_back = records.iter().filter(|r| r.fell_back).count();

    let lives = lives(run.samples);
    let first = lives.first().map(|l| l.first);
    let last = lives.last().map(|l| l.last);
    let grew = |from: Footprint, to: Footprint| -> (i64, Option<i64>) {
        (
            to.rss_kib as i64 - from.rss_kib as i64,
            from.fds.zip(to.fds).map(|(a, b)| b as i64 - a as i64),
        )
    };
    let flat = |(rss, fds): (i64, Option<i64>)| {
        rss <= RSS_TOLERANCE_KIB as i64 && fds.is_none_or(|f| f <= FD_TOLERANCE as i64)
    };
    let worst_life = lives
        .iter()
        .map(|l| (l, grew(l.first, l.last)))
        .max_by_key(|(_, (rss, fds))| (*rss, fds.unwrap_or(0)));
    let across = first.zip(last).map(|(a, b)| grew(a, b));
    let fds_known = lives.iter().all(|l| l.first.fds.is_some());

    let kills = run.kills.len();
    let mut phases_seen: Vec<&str> = Vec::new();
    for (_, phase) in changes {
        if !phases_seen.contains(&phase.name()) {
            phases_seen.push(phase.name());
        }
    }
    let chaos_happened = kills > 0 && phases_seen.len() == 4;

    let mut failures: Vec<String> = Vec::new();
    if unexcused > 0 {
        failures.push(format!("{unexcused} unexcused failed gets (target 0)"));
    }
    if dead_tokens > 0 {
        failures.push(format!(
            "{dead_tokens} gets returned a token the platform does not consider current (target 0)"
        ));
    }
    if hung > 0 {
        failures.push(format!(
            "{hung} gets ran past {}s (target 0)",
            crate::clients::GET_DEADLINE.as_secs()
        ));
    }
    if let Some((life, growth)) = &worst_life
        && !flat(*growth)
    {
        failures.push(format!(
            "daemon {} grew {:+} KiB RSS / {:+?} fds over {:.0}s (tolerance {RSS_TOLERANCE_KIB} KiB / {FD_TOLERANCE})",
            life.pid,
            growth.0,
            growth.1,
            life.lived.as_secs_f64()
        ));
    }
    match across {
        Some(growth) if !flat(growth) => failures.push(format!(
            "first to last daemon: {:+} KiB RSS / {:+?} fds (tolerance {RSS_TOLERANCE_KIB} KiB / {FD_TOLERANCE})",
            growth.0, growth.1
        )),
        Some(_) => {}
        None => failures.push("no daemon lived long enough to measure".into()),
    }
    if !fds_known {
        failures
            .push("open descriptors unreadable (run as root: the daemon is non-dumpable)".into());
    }
    if !chaos_happened {
        failures.push(format!(
            "the chaos did not happen: {kills} kills, phases {phases_seen:?}"
        ));
    }
    if !run.log_leaks.is_empty() {
        failures.push(format!(
            "the workspace log leaks: {}",
            run.log_leaks.join(", ")
        ));
    }
    let passed = failures.is_empty();

    let show_fp = |f: Option<Footprint>| match f {
        Some(f) => format!(
            "{:.2} MiB RSS, {} fds",
            f.rss_kib as f64 / 1024.0,
            f.fds.map_or("?".into(), |n| n.to_string())
        ),
        None => "n/a".into(),
    };
    let rate = records.len() as f64 / run.elapsed.as_secs_f64();
    let mut text = String::new();
    let mut line = |s: String| {
        text.push_str(&s);
        text.push('\n');
    };
    line(format!(
        "soak: {:.0}s, {} clients, one `credd get` each per {} ms on average ({rate:.0} gets/s), tokens of {}s",
        run.elapsed.as_secs_f64(),
        run.clients,
        run.pace.as_millis(),
        run.token_ttl.as_secs()
    ));
    line(format!(
        "chaos: {kills} SIGKILLs of the daemon; platform phases {}",
        phases_seen.join(", ")
    ));
    line(format!(
        "gets attempted: {}; ok {ok}; failed {} (excused: no token anywhere {excused}; daemon-side gaps {daemon_gap}; hung {hung})",
        records.len(),
        records.len() - ok
    ));
    line(format!(
        "unexcused failures (a usable token existed in the chain): {unexcused} (daemon held {unexcused_held}, platform serving {unexcused_platform}) — target 0"
    ));
    line(format!(
        "dead or unknown tokens served: {dead_tokens} — target 0"
    ));
    line(format!(
        "gets that found no daemon and asked the platform: {fell_back}"
    ));
    line(format!(
        "platform calls: daemon {} ({daemon_calls_per_lifetime:.2} per {}s token lifetime over {lifetimes:.1} lifetimes), credd's direct fallback {fallback_calls}",
        daemon_calls.len(),
        run.token_ttl.as_secs()
    ));
    line(format!(
        "recovery: platform back -> daemon's next served call: longest {:.1}s over {} recoveries",
        longest_recovery.as_secs_f64(),
        recoveries.len()
    ));
    line(format!(
        "latency all gets: p50 {} ms, p99 {} ms; answered by the daemon: p50 {} ms, p99 {} ms; fallback: p50 {} ms, p99 {} ms",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&daemon_latencies, 0.5)),
        ms(percentile(&daemon_latencies, 0.99)),
        ms(percentile(&fallback_latencies, 0.5)),
        ms(percentile(&fallback_latencies, 0.99)),
    ));
    line(format!(
        "daemon at start: {}; at end: {} ({} lives measured; worst growth within one life: {})",
        show_fp(first),
        show_fp(last),
        lives.len(),
        worst_life
            .as_ref()
            .map_or("n/a".into(), |(l, (rss, fds))| format!(
                "{rss:+} KiB, {fds:+?} fds over {:.0}s",
                l.lived.as_secs_f64()
            ))
    ));
    if !reasons.is_empty() {
        line("failure reasons (credd's last stderr line, digits as #):".into());
        for (reason, n) in &reasons {
            line(format!("  {n:>6}  {reason}"));
        }
    }
    for example in &examples {
        line(example.clone());
    }
    line(if passed {
        "soak: PASS".into()
    } else {
        format!("soak: FAIL: {}", failures.join("; "))
    });

    let json = json!({
        "seconds": run.elapsed.as_secs_f64().round(),
        "clients": run.clients,
        "pace_ms": run.pace.as_millis() as u64,
        "gets_per_s": rate.round(),
        "token_ttl_s": run.token_ttl.as_secs(),
        "kills": kills,
        "gets": records.len(),
        "ok": ok,
        "failed": records.len() - ok,
        "unexcused": unexcused,
        "daemon_gap_failures": daemon_gap,
        "excused_failures": excused,
        "hung": hung,
        "dead_tokens": dead_tokens,
        "fell_back": fell_back,
        "daemon_calls": daemon_calls.len(),
        "daemon_calls_per_lifetime": (daemon_calls_per_lifetime * 100.0).round() / 100.0,
        "fallback_calls": fallback_calls,
        "longest_recovery_s": (longest_recovery.as_secs_f64() * 10.0).round() / 10.0,
        "p50_ms": ms(percentile(&latencies, 0.5)),
        "p99_ms": ms(percentile(&latencies, 0.99)),
        "daemon_p50_ms": ms(percentile(&daemon_latencies, 0.5)),
        "daemon_p99_ms": ms(percentile(&daemon_latencies, 0.99)),
        "rss_kib_start": first.map(|f| f.rss_kib),
        "rss_kib_end": last.map(|f| f.rss_kib),
        "fds_start": first.and_then(|f| f.fds),
        "fds_end": last.and_then(|f| f.fds),
        "passed": passed,
    });
    Verdict { text, json, passed }
}
