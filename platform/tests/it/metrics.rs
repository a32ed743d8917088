//! `GET /metrics` of the real binary in GitHub mode against the stand-in:
//! `promtool check metrics` accepts it, it needs no bearer and shows none,
//! and its numbers are what happened — one mint and the rest cache hits,
//! every token served counted, GitHub's refusal under its status, each
//! request timed under its route template.
//!
//! The binary, not the router in-process: this is what an operator
//! scrapes, with the binary's own composition (the provider's set served by
//! its router; that two platforms in one process count apart is
//! `service.rs::each_platform_counts_only_its_own_requests`).

use nix::sys::signal::Signal;
use testkit::PlatformProcess;
use testkit::prometheus::{Samples, check_metrics};

use crate::support::{GitHubStandIn, INSTALLATION_ID, Mode, assert_no_secrets, http, keys};

const ADMIN_ROUTE: &str = "/admin/github-installation-token";
const ADMIN_BEARER: &str = "admin-for-the-metrics-test";

fn platform_for(github: &GitHubStandIn, installation: &str) -> PlatformProcess {
    let key = keys().pkcs8_file.to_str().expect("utf-8 path");
    PlatformProcess::spawn(
        &["--listen", "127.0.0.1:0"],
        &[
            ("GITHUB_APP_ID", "4242"),
            ("GITHUB_APP_INSTALLATION_ID", installation),
            ("GITHUB_APP_PRIVATE_KEY_FILE", key),
            ("GITHUB_API_URL", github.url()),
            ("ADMIN_TOKEN", ADMIN_BEARER),
        ],
    )
}

/// `GET /metrics` without a bearer: checked by promtool, its text and samples.
async fn scrape(platform: &PlatformProcess) -> (String, Samples) {
    let response = http()
        .get(format!("{}/metrics", platform.url()))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.expect("body");
    check_metrics(&text);
    let samples = Samples::parse(&text);
    (text, samples)
}

async fn admin_get(platform: &PlatformProcess, bearer: Option<&str>) -> (u16, String) {
    let mut request = http().get(format!("{}{ADMIN_ROUTE}", platform.url()));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

const MINTED: &str = "molecule_platform_tokens_minted_total";
const HITS: &str = "molecule_platform_token_cache_hits_total";
const SERVED_ADMIN: &str = "molecule_platform_tokens_served_total{caller=\"admin\"}";

fn requests(route: &str, code: u16) -> String {
    format!(
        "molecule_platform_http_request_duration_seconds_count{{route=\"{route}\",method=\"GET\",code=\"{code}\"}}"
    )
}

#[tokio::test]
async fn metrics_count_mints_cache_hits_serves_and_requests() {
    let github = GitHubStandIn::start();
    let mut platform = platform_for(&github, &INSTALLATION_ID.to_string());
    let (_, before) = scrape(&platform).await;
    assert_eq!(before.get(MINTED), 0.0);
    assert_eq!(before.get(SERVED_ADMIN), 0.0);

    const GETS: u32 = 4;
    let mut bodies = Vec::new();
    for _ in 0..GETS {
        let (status, body) = admin_get(&platform, Some(ADMIN_BEARER)).await;
        assert_eq!(status, 200, "{body}");
        bodies.push(body);
    }
    let (status, _) = admin_get(&platform, None).await;
    assert_eq!(status, 401);

    let (text, after) = scrape(&platform).await;
    assert_eq!(github.calls(), 1, "one mint for all the gets");
    assert_eq!(after.get(MINTED), 1.0);
    assert_eq!(after.get(HITS), f64::from(GETS - 1));
    assert_eq!(after.get(SERVED_ADMIN), f64::from(GETS));
    assert_eq!(
        after.get("molecule_platform_tokens_served_total{caller=\"workspace\"}"),
        0.0
    );
    assert_eq!(after.get(&requests(ADMIN_ROUTE, 200)), f64::from(GETS));
    assert_eq!(after.get(&requests(ADMIN_ROUTE, 401)), 1.0);
    assert_eq!(
        after.get(&requests("/metrics", 200)),
        1.0,
        "the scrape before this one"
    );
    assert!(
        after
            .family("molecule_platform_upstream_errors_total")
            .is_empty(),
        "no failure, no series: {text}"
    );
    // Counts only: no token, bearer or JWT in the text.
    let mut secrets = github.secrets();
    secrets.push(ADMIN_BEARER.into());
    secrets.extend(github.issued().into_iter().map(|(token, _)| token));
    assert_no_secrets("/metrics", &text, &secrets);
    assert!(platform.stop(Signal::SIGTERM).success());
}

#[tokio::test]
async fn a_github_refusal_is_counted_under_its_status() {
    let github = GitHubStandIn::start();
    github.set_mode(Mode::Status(403));
    let mut platform = platform_for(&github, &INSTALLATION_ID.to_string());
    let (status, _) = admin_get(&platform, Some(ADMIN_BEARER)).await;
    assert_eq!(status, 403, "GitHub's 403 is a refusal, answered as one");
    let (_, failed) = scrape(&platform).await;
    assert_eq!(github.calls(), 1);
    assert_eq!(
        failed.get("molecule_platform_upstream_errors_total{status=\"403\"}"),
        1.0
    );
    assert_eq!(failed.get(MINTED), 0.0);
    assert_eq!(failed.get(SERVED_ADMIN), 0.0);
    assert_eq!(failed.get(&requests(ADMIN_ROUTE, 403)), 1.0);
    assert!(platform.stop(Signal::SIGTERM).success());
}

#[tokio::test]
async fn a_rate_limit_is_a_503_with_retry_after_and_its_wait_is_in_the_metrics() {
    let github = GitHubStandIn::start();
    github.rate_limit(github_stand_in::RateLimit::Primary(
        jiff::SignedDuration::from_secs(600),
    ));
    let mut platform = platform_for(&github, &INSTALLATION_ID.to_string());
    let mut waits = Vec::new();
    for _ in 0..3 {
        let response = http()
            .get(format!("{}{ADMIN_ROUTE}", platform.url()))
            .bearer_auth(ADMIN_BEARER)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 503);
        let wait: u64 = response.headers()["retry-after"]
            .to_str()
            .expect("text")
            .parse()
            .expect("seconds");
        waits.push(wait);
    }
    assert!(waits.iter().all(|w| (590..=600).contains(w)), "{waits:?}");
    let until = github.limited_until().expect("limited").as_second() as f64;
    let (_, samples) = scrape(&platform).await;
    assert_eq!(
        samples.get("molecule_platform_github_rate_limited_until_seconds"),
        until
    );
    assert_eq!(
        samples.get("molecule_platform_github_rate_limits_total"),
        1.0
    );
    assert_eq!(
        github.calls(),
        1,
        "only the mint that was limited reached GitHub"
    );
    assert_eq!(samples.get(&requests(ADMIN_ROUTE, 503)), 3.0);
    assert!(platform.stop(Signal::SIGTERM).success());
    let stderr = platform.stderr();
    assert_eq!(
        stderr
            .matches("[github] GitHub rate limits the App")
            .count(),
        1,
        "one line per episode: {stderr}"
    );
}
