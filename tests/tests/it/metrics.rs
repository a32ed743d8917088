//! `credd metrics` against a real daemon: the text passes `promtool check
//! metrics`, and its numbers are what happened — every get counted once,
//! a failed platform call under its cause and status class, refusals under
//! their code, one latency observation per platform call.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;

use credd_core::protocol::{ErrorCode, Request};
use nix::sys::signal::Signal;
use testkit::client::{assert_error, exchange_raw};
use testkit::prometheus::{Samples, check_metrics};
use testkit::{Fault, Sandbox, TestPlatform, WAIT, start_daemon, with_platform};

use crate::socket::{OTHER_UID, prepare_for_other_uid};

/// `credd metrics` (as this process's uid), checked by promtool and read.
#[track_caller]
fn scrape(sandbox: &Sandbox) -> Samples {
    let out = sandbox.credd(&["metrics"]).run();
    out.assert_success("credd metrics");
    check_metrics(&out.stdout);
    Samples::parse(&out.stdout)
}

/// Back-off long enough that no retry falls inside a test's window.
const NO_RETRY: [&str; 4] = ["--backoff-initial", "1h", "--backoff-max", "1h"];
const TOKENS_SERVED: &str = "credd_requests_total{answer=\"token\"}";
const STATUS_ANSWERS: &str = "credd_requests_total{answer=\"status\"}";
const CALLS: &str = "credd_platform_calls_total";
const LATENCY_COUNT: &str = "credd_platform_call_duration_seconds_count";

#[test]
fn credd_metrics_passes_promtool_and_counts_gets_calls_and_failures() {
    // No retry within the test: the failure below is exactly one call.
    let (sandbox, platform, daemon) = start_daemon(TestPlatform::start(), &NO_RETRY);
    sandbox.wait_for_token();
    let before = scrape(&sandbox);
    assert_eq!(before.get("credd_token_valid{owner=\"default\"}"), 1.0);
    let left = before.get("credd_token_expires_in_seconds{owner=\"default\"}");
    assert!(left > 60.0 && left <= 3600.0, "expires in {left}s");
    assert_eq!(
        before.get("credd_platform_health{owner=\"default\",health=\"ok\"}"),
        1.0
    );
    assert_eq!(before.get(CALLS), platform.requests() as f64);
    assert_eq!(
        before.get(LATENCY_COUNT),
        before.get(CALLS),
        "one latency observation per call"
    );
    assert_eq!(
        before.get("credd_platform_responses_total{code=\"2xx\"}"),
        before.get(CALLS)
    );

    // Gets over the protocol and through git's helper: each served once.
    const GETS: usize = 5;
    for _ in 0..GETS {
        sandbox.get().expect("a token");
    }
    sandbox
        .credd_get("https", "github.com")
        .assert_success("credd get");
    let after = scrape(&sandbox);
    assert_eq!(after.delta(&before, TOKENS_SERVED), (GETS + 1) as f64);
    assert_eq!(
        after.delta(&before, STATUS_ANSWERS),
        1.0,
        "the scrape before this one, and nothing else"
    );
    assert_eq!(after.delta(&before, CALLS), 0.0, "served from memory");

    // A failing platform: one call, counted under its cause and class.
    let calls = platform.requests();
    platform.set_fault(Fault::Status(500));
    daemon.signal(Signal::SIGHUP);
    platform.wait_for_requests(calls + 1, WAIT);
    sandbox.wait_for_status("the failed call", |s| s.token.last_error.is_some());
    let failed = scrape(&sandbox);
    assert_eq!(failed.delta(&after, CALLS), 1.0);
    assert_eq!(
        failed.delta(&after, "credd_platform_failures_total{cause=\"transient\"}"),
        1.0
    );
    assert_eq!(
        failed.delta(&after, "credd_platform_responses_total{code=\"5xx\"}"),
        1.0
    );
    assert_eq!(failed.delta(&after, LATENCY_COUNT), 1.0);
    assert_eq!(
        failed.get("credd_platform_health{owner=\"default\",health=\"failing\"}"),
        1.0
    );
    assert_eq!(
        failed.get("credd_token_valid{owner=\"default\"}"),
        1.0,
        "the cached token is still served"
    );
    for (series, n) in failed.family("credd_platform_failures_total") {
        if !series.contains("transient") {
            assert_eq!(n, 0.0, "{series}");
        }
    }

    // Refusals, under their code.
    assert!(exchange_raw(&sandbox.socket(), b"password=x\n").is_ok());
    assert!(exchange_raw(&sandbox.socket(), b"{\"v\":9,\"type\":\"get\"}\n").is_ok());
    let refused = scrape(&sandbox);
    assert_eq!(
        refused.delta(&failed, "credd_requests_total{answer=\"bad_request\"}"),
        1.0
    );
    assert_eq!(
        refused.delta(
            &failed,
            "credd_requests_total{answer=\"unsupported_version\"}"
        ),
        1.0
    );
    let mut buckets: Vec<(f64, f64)> = refused
        .family("credd_platform_call_duration_seconds_bucket")
        .into_iter()
        .map(|(series, n)| {
            let le = series
                .split("le=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_else(|| panic!("no le in {series}"));
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("a bound")
            };
            (le, n)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(buckets.len(), 13, "12 bounds and +Inf: {buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative: {buckets:?}"
    );
    assert_eq!(
        buckets.last().map(|b| b.1),
        Some(refused.get(LATENCY_COUNT))
    );
    daemon.stop();
}

/// [`scrape`] with one connection slot: the slot may still be held by the
/// previous connection for a moment, so `busy` answers are retried; the
/// samples and how many `busy` answers it got.
fn scrape_past_busy(sandbox: &Sandbox) -> (Samples, u32) {
    let mut busy = 0;
    loop {
        let out = sandbox.credd(&["metrics"]).run();
        if out.status.success() {
            check_metrics(&out.stdout);
            return (Samples::parse(&out.stdout), busy);
        }
        assert!(out.stderr.contains("(busy: "), "{}", out.transcript());
        busy += 1;
    }
}

#[test]
fn busy_and_forbidden_are_counted_before_anything_is_read() {
    // Busy: the only connection slot is held by an idle client.
    let (sandbox, _platform, daemon) =
        start_daemon(TestPlatform::start(), &["--max-connections", "1"]);
    sandbox.wait_for_token();
    let (before, _) = scrape_past_busy(&sandbox);
    // Connections are accepted in order, so once this process has its own
    // answer, whatever the idle client was told (busy, or nothing while it
    // holds the slot) is in the idle client's buffer.
    let told_busy = |idle: &mut UnixStream| {
        let mut told = [0u8; 256];
        std::io::Read::read(idle, &mut told).is_ok_and(|n| n > 0)
    };
    let mut busy = 0;
    let mut served = 0;
    let idle = loop {
        let mut idle = UnixStream::connect(sandbox.socket()).expect("connect");
        idle.set_nonblocking(true).expect("nonblocking");
        match sandbox.request(&Request::Status) {
            Ok(answer @ credd_core::protocol::Response::Error { .. }) => {
                assert_error(&answer, ErrorCode::Busy, "one slot, held");
                busy += 1;
                // Told busy too, while the scrape's connection still held the slot?
                if told_busy(&mut idle) {
                    busy += 1;
                }
                break idle;
            }
            // Served: so the idle client, accepted first, was told busy
            // (the previous connection still held the slot); again.
            Ok(_) => {
                served += 1;
                assert!(
                    told_busy(&mut idle),
                    "a client was served while another held the slot"
                );
                busy += 1;
            }
            Err(e) => panic!("no answer: {e}"),
        }
    };
    drop(idle);
    let (after, retried) = scrape_past_busy(&sandbox);
    assert_eq!(
        after.delta(&before, "credd_requests_total{answer=\"busy\"}"),
        f64::from(busy + retried)
    );
    assert_eq!(
        after.delta(&before, STATUS_ANSWERS),
        f64::from(served + 1),
        "the first scrape and the statuses served before the slot was taken"
    );
    daemon.stop();

    // Forbidden: the daemon runs as another uid and this process (root) is
    // a stranger; the daemon's own uid then reads the count.
    let (sandbox, _platform) = with_platform(TestPlatform::start());
    prepare_for_other_uid(&sandbox);
    let daemon = sandbox
        .daemon()
        .args(testkit::FAST_BACKOFF)
        .uid(OTHER_UID)
        .spawn();
    daemon.log().wait_for_line("listening on", WAIT);
    for _ in 0..3 {
        let answer = sandbox.request(&Request::GET_DEFAULT).expect("an answer");
        assert_error(&answer, ErrorCode::Forbidden, "root is a stranger here");
    }
    let mut credd = sandbox.credd(&["metrics"]);
    credd.command().uid(OTHER_UID).gid(OTHER_UID);
    let out = credd.run();
    out.assert_success("credd metrics as the daemon's uid");
    check_metrics(&out.stdout);
    let samples = Samples::parse(&out.stdout);
    assert_eq!(
        samples.get("credd_requests_total{answer=\"forbidden\"}"),
        3.0
    );
    assert_eq!(samples.get(TOKENS_SERVED), 0.0);
    daemon.stop();
}

#[test]
fn credd_metrics_without_a_daemon_exits_1_with_a_reason() {
    let (sandbox, _platform) = with_platform(TestPlatform::start());
    let out = sandbox.credd(&["metrics"]).run();
    assert_eq!(out.code(), Some(1), "{}", out.transcript());
    assert_eq!(out.stdout, "", "no partial text for the textfile collector");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    assert!(lines[0].starts_with("credd: error: "), "{lines:?}");
    let usage = sandbox.credd(&["metrics", "--json"]).run();
    assert_eq!(usage.code(), Some(2), "{}", usage.transcript());
}
