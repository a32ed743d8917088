//! The GitHub App provider behind the service, against the GitHub stand-in.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use jiff::SignedDuration;
use molecule_platform::service::format_expiry;
use molecule_platform::{AppState, Auth, GitHubAppProvider, TokenProvider, WorkspaceTokens, app};
use secrecy::SecretString;

use crate::support::{GitHubStandIn, Logs, Mode, assert_no_secrets, get, keys, manual_clock};

const ADMIN: &str = "admin-bearer-for-github-tests-0123456789";
const ROUTE: &str = "/admin/github-installation-token";

fn service(provider: GitHubAppProvider) -> (Router, Arc<GitHubAppProvider>) {
    let provider = Arc::new(provider);
    let served: Option<Arc<dyn TokenProvider>> = Some(Arc::clone(&provider) as _);
    let auth = Auth::new(Some(SecretString::from(ADMIN)), WorkspaceTokens::empty());
    (app(AppState::new(served, auth)), provider)
}

#[tokio::test]
async fn happy_path_with_pkcs1_and_pkcs8_keys() {
    for pem in [&keys().pkcs1_pem, &keys().pkcs8_pem] {
        let github = GitHubStandIn::start();
        let provider = GitHubAppProvider::new(github.provider_config(pem)).expect("provider");
        let (app, provider) = service(provider);
        let answer = get(&app, ROUTE, Some(ADMIN)).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert!(github.rejections().is_empty(), "{:?}", github.rejections());
        let issued = github.issued();
        assert_eq!(issued.len(), 1);
        assert_eq!(answer.body["token"], issued[0].0.as_str());
        assert_eq!(
            answer.body["expires_at"],
            format_expiry(issued[0].1).as_str()
        );
        assert!(answer.body["expires_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(answer.headers["cache-control"], "no-store");
        assert_eq!(answer.headers["content-type"], "application/json");
        let again = get(&app, ROUTE, Some(ADMIN)).await;
        assert_eq!(
            again.body["token"], answer.body["token"],
            "served from the cache"
        );
        assert_eq!(github.calls(), 1);
        assert_eq!(provider.upstream_calls(), 1);
    }
}

#[tokio::test]
async fn client_id_is_used_as_issuer_when_given() {
    let github = GitHubStandIn::start();
    github.expect_issuer("Iv23liTestClientId");
    let provider =
        GitHubAppProvider::new(github.provider_config(&keys().pkcs1_pem)).expect("provider");
    let (app, _) = service(provider);
    let answer = get(&app, ROUTE, Some(ADMIN)).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", github.rejections());
}

#[tokio::test]
async fn stand_in_refuses_a_jwt_with_the_wrong_issuer() {
    // Proves the stand-in's JWT checks can fail, and what that looks like.
    let github = GitHubStandIn::start();
    let mut config = github.provider_config(&keys().pkcs8_pem);
    config.issuer = "9999".into();
    let (logs, _guard) = Logs::capture();
    let (app, _) = service(GitHubAppProvider::new(config).expect("provider"));
    let answer = get(&app, ROUTE, Some(ADMIN)).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        github.rejections(),
        vec![r#"iss is "9999", expected "4242""#.to_owned()]
    );
    let text = logs.text();
    assert!(
        text.contains("[github] token refresh failed: upstream answered HTTP 401 (A JSON web token could not be decoded)"),
        "{text}"
    );
    assert_no_secrets("logs", &text, &github.secrets());
}

#[tokio::test]
async fn stand_in_refuses_a_jwt_signed_with_another_key() {
    let github = GitHubStandIn::start();
    let (app, _) = service(
        GitHubAppProvider::new(github.provider_config(&keys().other_pkcs8_pem)).expect("provider"),
    );
    let answer = get(&app, ROUTE, Some(ADMIN)).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    let rejections = github.rejections();
    assert_eq!(rejections.len(), 1);
    assert!(
        rejections[0].starts_with("JWT signature/shape refused"),
        "{rejections:?}"
    );
}

#[tokio::test]
async fn hundred_concurrent_requests_make_one_github_call() {
    let github = GitHubStandIn::start();
    github.hold();
    let (app, provider) = service(github.provider());
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { get(&app, ROUTE, Some(ADMIN)).await })
        })
        .collect();
    // The first caller's upstream call is in flight (held); the other 99 were
    // scheduled before it reached the stand-in and now wait on it.
    github.wait_for_calls(1).await;
    github.release();
    let mut tokens = Vec::new();
    for task in tasks {
        let answer = task.await.expect("task");
        assert_eq!(answer.status, StatusCode::OK);
        tokens.push(answer.body["token"].as_str().unwrap().to_owned());
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "everyone got the same token");
    assert_eq!(github.calls(), 1);
    assert_eq!(provider.upstream_calls(), 1);
}

#[tokio::test]
async fn concurrent_callers_share_one_failure() {
    let github = GitHubStandIn::start();
    github.set_mode(Mode::Status(500));
    github.hold();
    let (app, _) = service(github.provider());
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { get(&app, ROUTE, Some(ADMIN)).await.status })
        })
        .collect();
    github.wait_for_calls(1).await;
    github.release();
    for task in tasks {
        assert_eq!(task.await.expect("task"), StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(github.calls(), 1, "queued callers shared the failed call");
}

#[tokio::test]
async fn refreshes_five_minutes_before_expiry() {
    let (clock, offset) = manual_clock();
    let github = GitHubStandIn::with_clock(clock);
    let (app, _) = service(github.provider());
    let first = get(&app, ROUTE, Some(ADMIN)).await.body["token"].clone();
    offset.store(54 * 60, Ordering::SeqCst);
    let cached = get(&app, ROUTE, Some(ADMIN)).await;
    assert_eq!(cached.body["token"], first, "6 min left: cached");
    assert_eq!(github.calls(), 1);
    offset.store(55 * 60 + 1, Ordering::SeqCst);
    let fresh = get(&app, ROUTE, Some(ADMIN)).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_ne!(fresh.body["token"], first, "under 5 min left: replaced");
    assert_eq!(github.calls(), 2);
    assert!(github.rejections().is_empty(), "{:?}", github.rejections());
}

#[tokio::test]
async fn short_lived_tokens_refresh_at_half_life_not_every_request() {
    let (clock, offset) = manual_clock();
    let github = GitHubStandIn::with_clock(clock);
    github.set_mode(Mode::Issue(SignedDuration::from_mins(4)));
    let (app, _) = service(github.provider());
    let first = get(&app, ROUTE, Some(ADMIN)).await.body["token"].clone();
    for _ in 0..10 {
        assert_eq!(get(&app, ROUTE, Some(ADMIN)).await.body["token"], first);
    }
    offset.store(119, Ordering::SeqCst);
    assert_eq!(get(&app, ROUTE, Some(ADMIN)).await.body["token"], first);
    assert_eq!(github.calls(), 1);
    offset.store(121, Ordering::SeqCst);
    let second = get(&app, ROUTE, Some(ADMIN)).await;
    assert_ne!(second.body["token"], first);
    assert_eq!(github.calls(), 2);
    let issued = github.issued();
    assert!(issued[1].1 > issued[0].1);
}

async fn failing(mode: Mode, timeout: Option<Duration>, cause: &str) {
    let github = GitHubStandIn::start();
    github.set_mode(mode.clone());
    let mut config = github.provider_config(&keys().pkcs8_pem);
    if let Some(timeout) = timeout {
        config.request_timeout = timeout;
    }
    let (logs, _guard) = Logs::capture();
    let (app, _) = service(GitHubAppProvider::new(config).expect("provider"));
    let answer = get(&app, ROUTE, Some(ADMIN)).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR, "{mode:?}");
    assert_eq!(
        answer.body,
        serde_json::json!({"error": "token refresh failed"})
    );
    assert_eq!(answer.headers["cache-control"], "no-store");
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("[github] token refresh failed"))
        .unwrap_or_else(|| panic!("{mode:?}: no [github] line in:\n{text}"));
    assert!(line.contains(cause), "{mode:?}: {line}");
    assert!(github.rejections().is_empty(), "{:?}", github.rejections());
    assert_eq!(
        github.calls(),
        1,
        "{mode:?}: one call, nothing followed or retried"
    );
    let secrets = github.secrets();
    assert!(!secrets.is_empty(), "the JWT at least was seen");
    assert_no_secrets("logs", &text, &secrets);
    assert_no_secrets("response", &answer.body.to_string(), &secrets);
}

#[tokio::test]
async fn github_401_is_a_500_with_a_github_log_line() {
    failing(
        Mode::Status(401),
        None,
        "upstream answered HTTP 401 (Bad credentials)",
    )
    .await;
}

#[tokio::test]
async fn github_500_is_a_500_with_a_github_log_line() {
    failing(
        Mode::Status(500),
        None,
        "upstream answered HTTP 500 (Server Error)",
    )
    .await;
}

#[tokio::test]
async fn github_garbage_is_a_500_with_a_github_log_line() {
    failing(Mode::Garbage, None, "malformed upstream answer: not JSON").await;
}

#[tokio::test]
async fn github_expired_token_is_a_500_with_a_github_log_line() {
    failing(Mode::Expired, None, "token already expired").await;
}

#[tokio::test]
async fn github_slow_is_a_500_with_a_github_log_line() {
    // The provider's own call timeout ends the wait: behaviour, not a sleep.
    failing(
        Mode::Hang,
        Some(Duration::from_millis(300)),
        "upstream did not answer within 300ms",
    )
    .await;
}

#[tokio::test]
async fn github_redirect_is_not_followed() {
    failing(Mode::Redirect, None, "upstream answered HTTP 307").await;
}

#[tokio::test]
async fn github_oversized_answer_is_refused() {
    let cause = format!(
        "malformed upstream answer: answer larger than {} bytes",
        molecule_platform::github::MAX_ANSWER_BYTES
    );
    failing(Mode::Huge, None, &cause).await;
}

#[tokio::test]
async fn recovers_after_github_comes_back() {
    let (clock, offset) = manual_clock();
    let github = GitHubStandIn::with_clock(clock);
    github.set_mode(Mode::Status(502));
    let (app, _) = service(github.provider());
    assert_eq!(
        get(&app, ROUTE, Some(ADMIN)).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    github.set_mode(Mode::Issue(SignedDuration::from_mins(60)));
    assert_eq!(
        get(&app, ROUTE, Some(ADMIN)).await.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "inside the failure cool-down the error is shared, GitHub is not called"
    );
    assert_eq!(github.calls(), 1);
    offset.store(3, Ordering::SeqCst);
    let answer = get(&app, ROUTE, Some(ADMIN)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(github.calls(), 2);
}

#[tokio::test]
async fn serves_the_cached_token_while_a_refresh_fails() {
    let (clock, offset) = manual_clock();
    let github = GitHubStandIn::with_clock(clock);
    let (app, _) = service(github.provider());
    let first = get(&app, ROUTE, Some(ADMIN)).await.body["token"].clone();
    github.set_mode(Mode::Status(503));
    offset.store(57 * 60, Ordering::SeqCst);
    let answer = get(&app, ROUTE, Some(ADMIN)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["token"], first, "still valid for 3 minutes");
    assert_eq!(github.calls(), 2, "a refresh was attempted");
    offset.store(60 * 60, Ordering::SeqCst);
    let answer = get(&app, ROUTE, Some(ADMIN)).await;
    assert_eq!(
        answer.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "never an expired token"
    );
}

#[tokio::test]
async fn provisions_gh_token_and_github_token() {
    let github = GitHubStandIn::start();
    let provider = github.provider();
    let mut env = BTreeMap::from([("HOME".to_owned(), "/home/agent".to_owned())]);
    molecule_platform::provision::set_github_token_env(&provider, &mut env)
        .await
        .expect("provision");
    let token = &github.issued()[0].0;
    assert_eq!(env["GITHUB_TOKEN"], *token);
    assert_eq!(env["GH_TOKEN"], *token);
    assert_eq!(env["HOME"], "/home/agent");
}

#[tokio::test]
async fn happy_path_logs_no_secret() {
    let github = GitHubStandIn::start();
    let (logs, _guard) = Logs::capture();
    let (app, _) = service(github.provider());
    assert_eq!(get(&app, ROUTE, Some(ADMIN)).await.status, StatusCode::OK);
    let text = logs.text();
    assert!(
        text.contains("[github] installation token minted (fingerprint"),
        "{text}"
    );
    let mut secrets = github.secrets();
    secrets.push(ADMIN.to_owned());
    assert_no_secrets("logs", &text, &secrets);
}
