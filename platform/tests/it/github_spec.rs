//! The GitHub provider against the stand-in speaking GitHub's documented
//! shapes (checked against GitHub's API description by the stand-in itself:
//! a request GitHub's description refuses, or a request during a rate
//! limit, fails the test when the stand-in is dropped).
//!
//! In-process, with one manual clock for the stand-in and the provider, so
//! rate limits and cool-downs are stepped through, never slept through.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::http::StatusCode;
use github_stand_in::{Account, Installation, RateLimit, TokenFormat, default_permissions};
use jiff::SignedDuration;
use molecule_platform::{
    AppState, Auth, GitHubAppProvider, Grants, TokenProvider, WorkspaceTokens, app,
};
use secrecy::SecretString;

use crate::support::{GitHubStandIn, Logs, assert_no_secrets, get, manual_clock};

const BEARER: &str = "github-spec-bearer-0123456789abcdef";

fn service(github: &GitHubStandIn, grants: &str) -> (Router, Arc<GitHubAppProvider>) {
    let provider = Arc::new(github.provider());
    let served: Option<Arc<dyn TokenProvider>> = Some(Arc::clone(&provider) as _);
    let auth = Auth::new(
        None,
        WorkspaceTokens::from_bearers([("ws-1", SecretString::from(BEARER))]),
    );
    let grants = Arc::new(Grants::parse(grants).expect("grants"));
    (
        app(AppState::new(served, auth).with_grants(grants)),
        provider,
    )
}

async fn token(app: &Router, query: &str) -> crate::support::Answer {
    get(
        app,
        &format!("/workspaces/ws-1/github-installation-token{query}"),
        Some(BEARER),
    )
    .await
}

fn retry_after(answer: &crate::support::Answer) -> u64 {
    answer.headers["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds")
}

#[tokio::test]
async fn a_grant_of_500_repositories_with_the_longest_names_is_served() {
    let github = GitHubStandIn::start();
    let owner = "o".repeat(39);
    github.install(Installation::organization(&owner, 1001));
    let names: Vec<String> = (0..500).map(|i| format!("{i:r>100}")).collect();
    let listed: Vec<String> = names.iter().map(|n| format!("\"{owner}/{n}\"")).collect();
    let grants = format!(
        "[workspace.ws-1]\nrepositories = [{}]\npermissions = {{ contents = \"write\" }}\n",
        listed.join(", ")
    );
    let (app, provider) = service(&github, &grants);
    let answer = token(&app, "").await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(
        answer.body["repositories"].as_array().map(Vec::len),
        Some(500)
    );
    let mints = github.mints();
    assert_eq!(mints.len(), 1);
    assert_eq!(mints[0].repositories.as_ref().map(Vec::len), Some(500));
    assert_eq!(provider.upstream_calls(), 1);
    assert!(github.rejections().is_empty(), "{:?}", github.rejections());
    assert_eq!(github.violations(), Vec::<String>::new());
}

#[test]
fn the_largest_repository_object_fits() {
    // GitHub's own repository example with the longest owner and name:
    // what the 500-repository cap is derived from.
    let object = github_stand_in::repository_object(&"o".repeat(39), &"n".repeat(100), u64::MAX);
    let bytes = serde_json::to_vec(&object).expect("JSON").len();
    github_stand_in::spec::check("repository", &object).expect("a repository object");
    assert!(
        bytes <= molecule_platform::github::MAX_REPOSITORY_OBJECT_BYTES,
        "{bytes} bytes"
    );
}

#[tokio::test]
async fn enterprise_and_accountless_installations_are_skipped_not_fatal() {
    let (logs, _guard) = Logs::capture();
    let github = GitHubStandIn::start();
    github.install(Installation::on(
        Account::Enterprise("octo-business".into()),
        1002,
    ));
    github.install(Installation::on(Account::Missing, 1003));
    github.install(Installation::on(Account::User("alice_acme".into()), 1004));
    github.add_installation("acme", 1001);
    let (app, _) = service(
        &github,
        "[workspace.ws-1]\nrepositories = [\"acme/*\", \"alice_acme/dotfiles\"]\n",
    );
    let acme = token(&app, "?owner=acme").await;
    assert_eq!(acme.status, StatusCode::OK, "{:?}", acme.body);
    let managed = token(&app, "?repository=alice_acme/dotfiles").await;
    assert_eq!(managed.status, StatusCode::OK, "{:?}", managed.body);
    assert_eq!(managed.body["owner"], "alice_acme");
    let installations: Vec<u64> = github.mints().iter().map(|m| m.installation).collect();
    assert_eq!(installations, [1001, 1004]);
    assert_eq!(github.listings(), 1, "one listing served both");
    let text = logs.text();
    assert!(
        text.contains("3 usable, 2 skipped (an enterprise account, no account"),
        "{text}"
    );
    assert_no_secrets("logs", &text, &github.secrets());
}

#[tokio::test]
async fn a_failed_listing_is_shared_by_concurrent_requests() {
    let (clock, offset) = manual_clock();
    let github = GitHubStandIn::with_clock(clock);
    github.add_installation("acme", 1001);
    let (app, _) = service(&github, "[workspace.ws-1]\nrepositories = [\"acme/*\"]\n");
    // GitHub refuses the App's JWTs (401) for a while.
    github.expect_issuer("someone-else");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { token(&app, "").await.status })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task"), StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(github.listings(), 1, "one listing failed for all twenty");
    assert_eq!(
        token(&app, "").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(github.listings(), 1, "within the cool-down: shared");
    offset.store(3, Ordering::SeqCst);
    github.expect_issuer(github_stand_in::APP_ID);
    assert_eq!(token(&app, "").await.status, StatusCode::OK);
    assert_eq!(github.listings(), 2);
    assert_eq!(github.rejections().len(), 1);
}

#[tokio::test]
async fn githubs_refusals_become_403_with_its_reason_and_404_relists_at_once() {
    let (logs, _guard) = Logs::capture();
    let github = GitHubStandIn::start();
    github.install(Installation {
        repositories: Some(vec!["api".into()]),
        ..Installation::organization("acme", 1001)
    });
    github.install(Installation {
        permissions: [("contents".to_owned(), "read".to_owned())].into(),
        ..Installation::organization("readers", 1002)
    });
    github.install(Installation {
        suspended: true,
        ..Installation::organization("frozen", 1003)
    });
    github.add_installation("gone", 1004);
    github.add_installation("moved", 1005);
    let (app, _) = service(
        &github,
        "[workspace.ws-1]\nrepositories = [\"acme/api\", \"acme/secret\", \"readers/*\", \"frozen/*\", \"gone/*\", \"moved/*\"]\npermissions = { contents = \"write\" }\n",
    );
    let outside = token(&app, "?owner=acme").await;
    assert_eq!(outside.status, StatusCode::FORBIDDEN, "{:?}", outside.body);
    assert_eq!(
        outside.body["error"],
        "GitHub refuses this token (HTTP 422): There is at least one repository that does not exist or is not accessible to the parent installation."
    );
    let lacking = token(&app, "?owner=readers").await;
    assert_eq!(lacking.status, StatusCode::FORBIDDEN);
    assert_eq!(
        lacking.body["error"],
        "GitHub refuses this token (HTTP 422): The permissions requested are not granted to this installation."
    );
    let suspended = token(&app, "?owner=frozen").await;
    assert_eq!(suspended.status, StatusCode::FORBIDDEN);
    assert_eq!(
        suspended.body["error"],
        "GitHub refuses this token (HTTP 403): This installation has been suspended"
    );
    let mints = github.mints().len();
    assert_eq!(
        token(&app, "?owner=frozen").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        github.mints().len(),
        mints,
        "a definitive refusal is remembered"
    );

    // Uninstalled after the table was listed: the mint's 404 makes the
    // platform list again at once, and this very request says so.
    let listings = github.listings();
    github.uninstall(1004);
    let gone = token(&app, "?owner=gone").await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{:?}", gone.body);
    assert_eq!(
        gone.body["error"],
        "the GitHub App is not installed on account gone"
    );
    assert_eq!(github.listings(), listings + 1, "listed again at once");
    // Reinstalled under a new id: the mint's 404, a listing at once, and
    // this request is served from the new installation.
    github.uninstall(1005);
    github.add_installation("moved", 2005);
    let moved = token(&app, "?owner=moved").await;
    assert_eq!(moved.status, StatusCode::OK, "{:?}", moved.body);
    let installations: Vec<u64> = github.mints().iter().map(|m| m.installation).collect();
    assert_eq!(&installations[installations.len() - 2..], [1005, 2005]);
    assert_no_secrets("logs", &logs.text(), &github.secrets());
}

async fn rate_limited(limit: RateLimit, expected_wait: u64) {
    let (logs, _guard) = Logs::capture();
    let (clock, offset) = manual_clock();
    let github = GitHubStandIn::with_clock(clock);
    github.add_installation("acme", 1001);
    github.add_installation("labs", 1002);
    let (app, provider) = service(
        &github,
        "[workspace.ws-1]\nrepositories = [\"acme/api\", \"acme/web\", \"labs/*\"]\n",
    );
    // The listing is the first request: it gets the limit.
    github.rate_limit(limit);
    let limited = token(&app, "?owner=acme").await;
    assert_eq!(
        limited.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        limited.body
    );
    assert_eq!(retry_after(&limited), expected_wait, "{limit:?}");
    let until = github.limited_until().expect("the limit answered");
    assert_eq!(provider.rate_limited_until(), Some(until), "{limit:?}");
    let requests = github.requests().len();
    // Every other scope and installation waits too, and nothing reaches
    // GitHub before the limit's end (the stand-in records any request that
    // does as a violation, which fails the test on drop).
    for query in ["?owner=acme", "?owner=labs", "?repository=acme/web"] {
        let answer = token(&app, query).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{query}");
        assert!(retry_after(&answer) <= expected_wait);
    }
    offset.store(expected_wait as i64 - 1, Ordering::SeqCst);
    assert_eq!(
        token(&app, "?owner=labs").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        github.requests().len(),
        requests,
        "no request during the limit"
    );
    offset.store(expected_wait as i64, Ordering::SeqCst);
    let after = token(&app, "?owner=acme").await;
    assert_eq!(
        after.status,
        StatusCode::OK,
        "{:?}\n{:?}\n{}",
        after.body,
        github.requests(),
        logs.text()
    );
    assert_eq!(github.violations(), Vec::<String>::new());
    let text = logs.text();
    assert_eq!(
        text.matches("[github] GitHub rate limits the App").count(),
        1,
        "one line per episode:\n{text}"
    );
}

#[tokio::test]
async fn a_primary_rate_limit_holds_every_request_until_its_reset() {
    rate_limited(RateLimit::Primary(SignedDuration::from_secs(120)), 120).await;
}

#[tokio::test]
async fn a_secondary_rate_limit_holds_until_retry_after() {
    rate_limited(
        RateLimit::Secondary {
            status: 429,
            retry_after: SignedDuration::from_secs(45),
        },
        45,
    )
    .await;
    rate_limited(
        RateLimit::Secondary {
            status: 403,
            retry_after: SignedDuration::from_secs(30),
        },
        30,
    )
    .await;
}

#[tokio::test]
async fn a_secondary_rate_limit_without_headers_waits_a_minute() {
    rate_limited(
        RateLimit::SecondaryWithoutHeaders(SignedDuration::from_secs(60)),
        60,
    )
    .await;
}

#[tokio::test]
async fn a_rate_limited_mint_still_serves_a_cached_token() {
    let (clock, offset) = manual_clock();
    let github = GitHubStandIn::with_clock(clock);
    github.add_installation("acme", 1001);
    let (app, _) = service(&github, "[workspace.ws-1]\nrepositories = [\"acme/*\"]\n");
    let first = token(&app, "").await;
    assert_eq!(first.status, StatusCode::OK);
    offset.store(56 * 60, Ordering::SeqCst);
    github.rate_limit(RateLimit::Primary(SignedDuration::from_secs(600)));
    let cached = token(&app, "").await;
    assert_eq!(
        cached.status,
        StatusCode::OK,
        "4 minutes left: still served"
    );
    assert_eq!(cached.body["token"], first.body["token"]);
    offset.store(61 * 60, Ordering::SeqCst);
    let expired = token(&app, "").await;
    assert_eq!(expired.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after(&expired), 300);
}

#[tokio::test]
async fn both_token_formats_are_served_whole() {
    for format in [TokenFormat::Classic, TokenFormat::Stateless] {
        let github = GitHubStandIn::start();
        github.set_token_format(format);
        github.install(Installation {
            permissions: default_permissions(),
            ..Installation::organization("acme", 1001)
        });
        let (app, _) = service(&github, "[workspace.ws-1]\nrepositories = [\"acme/*\"]\n");
        let answer = token(&app, "").await;
        assert_eq!(answer.status, StatusCode::OK, "{format:?}");
        let issued = &github.issued()[0].0;
        assert_eq!(answer.body["token"], issued.as_str(), "{format:?}");
        match format {
            TokenFormat::Classic => assert_eq!(issued.len(), 40),
            TokenFormat::Stateless => {
                assert!(issued.starts_with("ghs_4242_"), "{format:?}");
                assert!(issued.len() > 520, "{}", issued.len());
            }
        }
    }
}
