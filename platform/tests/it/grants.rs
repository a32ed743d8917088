//! Grants, scoped tokens, `min_remaining_secs` and refusals through the
//! router (tower `oneshot`) with the dev provider and a controllable clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use molecule_platform::dev::DevMint;
use molecule_platform::provider::{MAX_MIN_REMAINING, REFUSAL_INTERVAL};
use molecule_platform::scope::Level;
use molecule_platform::{AppState, Auth, DevProvider, Grants, TokenProvider, WorkspaceTokens, app};
use secrecy::SecretString;
use tower::ServiceExt;

use crate::support::{Answer, Logs, assert_no_secrets, get, manual_clock, sha256_hex};

const GRANTS: &str = r#"
[workspace.ws-a]
repositories = ["acme/web", "acme/api", "acme-labs/*"]
permissions = { contents = "write", pull_requests = "write" }

[workspace.ws-b]
repositories = ["acme/api", "ACME/web"]
permissions = { pull_requests = "write", contents = "write" }

[workspace.ws-c]
repositories = ["ghost/*", "acme/api"]
"#;

const BEARERS: [(&str, &str); 5] = [
    ("ws-a", "bearer-of-workspace-a-0123456789"),
    ("ws-b", "bearer-of-workspace-b-0123456789"),
    ("ws-c", "bearer-of-workspace-c-0123456789"),
    ("ws-x", "bearer-of-workspace-x-0123456789"),
    // Only `a_workspace_asking_outside_its_grant_is_logged_once_a_while`:
    // the log limit is per workspace and process-wide.
    ("ws-flood", "bearer-of-workspace-flood-0123456"),
];

fn bearer(id: &str) -> &'static str {
    BEARERS.iter().find(|(w, _)| *w == id).expect("known").1
}

struct Fixture {
    app: Router,
    provider: Arc<DevProvider>,
    grants: Arc<Grants>,
    clock: Arc<AtomicI64>,
}

fn fixture(grants: Option<&str>, ttl: Duration) -> Fixture {
    let (clock, offset) = manual_clock();
    let provider = Arc::new(DevProvider::with_clock(ttl, clock));
    provider.set_not_installed(["ghost"]);
    let served: Option<Arc<dyn TokenProvider>> = Some(Arc::clone(&provider) as _);
    let auth = Auth::new(
        None,
        WorkspaceTokens::from_bearers(BEARERS.iter().map(|(id, b)| (*id, SecretString::from(*b)))),
    );
    let grants = Arc::new(match grants {
        Some(text) => Grants::parse(text).expect("grants"),
        None => Grants::none(),
    });
    let app = app(AppState::new(served, auth).with_grants(Arc::clone(&grants)));
    Fixture {
        app,
        provider,
        grants,
        clock: offset,
    }
}

impl Fixture {
    async fn token(&self, ws: &str, query: &str) -> Answer {
        let path = format!("/workspaces/{ws}/github-installation-token{query}");
        get(&self.app, &path, Some(bearer(ws))).await
    }

    async fn refuse(&self, ws: &str, body: &str) -> (StatusCode, Option<String>) {
        let request = Request::post(format!(
            "/workspaces/{ws}/github-installation-token/refusals"
        ))
        .header("authorization", format!("Bearer {}", bearer(ws)))
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .expect("request");
        let response = self.app.clone().oneshot(request).await.expect("infallible");
        let retry = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ascii").to_owned());
        (response.status(), retry)
    }

    fn advance(&self, secs: i64) {
        self.clock.fetch_add(secs, Ordering::SeqCst);
    }

    fn mints(&self) -> Vec<DevMint> {
        self.provider.mints()
    }
}

fn token_of(answer: &Answer) -> String {
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    answer.body["token"].as_str().expect("token").to_owned()
}

#[tokio::test]
async fn the_scope_of_each_mint_is_the_grant_and_the_answer_says_so() {
    let f = fixture(Some(GRANTS), Duration::from_secs(3600));
    let answer = f.token("ws-a", "?repository=acme/api").await;
    token_of(&answer);
    assert_eq!(answer.body["owner"], "acme");
    assert_eq!(
        answer.body["repositories"],
        serde_json::json!(["acme/api", "acme/web"])
    );
    assert_eq!(
        answer.body["permissions"],
        serde_json::json!({"contents": "write", "pull_requests": "write"})
    );
    let mints = f.mints();
    assert_eq!(mints.len(), 1);
    assert_eq!(mints[0].owner.as_deref(), Some("acme"));
    assert_eq!(
        mints[0].repositories,
        Some(vec!["api".to_owned(), "web".to_owned()])
    );
    let permissions = mints[0].permissions.clone().expect("permissions");
    assert_eq!(permissions.get("contents"), Some(&Level::Write));
    assert_eq!(permissions.get("pull_requests"), Some(&Level::Write));
    assert_eq!(permissions.len(), 2);

    // OWNER/*: the owner's token, every repository, not per repository.
    let labs = f.token("ws-a", "?repository=acme-labs/anything.git").await;
    token_of(&labs);
    assert_eq!(labs.body["owner"], "acme-labs");
    assert!(labs.body.get("repositories").is_none(), "{:?}", labs.body);
    let labs_again = f.token("ws-a", "?owner=ACME-LABS").await;
    assert_eq!(token_of(&labs_again), token_of(&labs));
    assert_eq!(f.mints().len(), 2);
    assert_eq!(f.mints()[1].repositories, None);

    // No query: the first owner of the file.
    let default = f.token("ws-a", "").await;
    assert_eq!(token_of(&default), token_of(&answer));
    assert_eq!(f.mints().len(), 2);
}

#[tokio::test]
async fn workspaces_with_the_same_grant_share_one_token() {
    let f = fixture(Some(GRANTS), Duration::from_secs(3600));
    let a = f.token("ws-a", "?repository=acme/web").await;
    let b = f.token("ws-b", "?repository=acme/api").await;
    assert_eq!(token_of(&a), token_of(&b));
    assert_eq!(f.mints().len(), 1, "one mint for both");
    // A different grant of the same owner (no permissions) is another token.
    let c = f.token("ws-c", "?repository=acme/api").await;
    assert_ne!(token_of(&c), token_of(&a));
    assert_eq!(c.body["repositories"], serde_json::json!(["acme/api"]));
    assert_eq!(f.mints().len(), 2);
}

#[tokio::test]
async fn outside_the_grant_is_403_and_mints_nothing() {
    let (logs, _guard) = Logs::capture();
    let f = fixture(Some(GRANTS), Duration::from_secs(3600));
    for (ws, query, needle) in [
        (
            "ws-a",
            "?repository=acme/secret",
            "repository acme/secret is outside",
        ),
        ("ws-a", "?repository=evil/api", "outside"),
        ("ws-a", "?owner=evil", "owner evil is outside"),
        ("ws-x", "", "workspace ws-x has no entry"),
        ("ws-x", "?owner=acme", "no entry"),
    ] {
        let answer = f.token(ws, query).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{ws}{query}");
        let error = answer.body["error"].as_str().expect("error");
        assert!(error.contains(needle), "{ws}{query}: {error}");
        assert!(answer.body.get("token").is_none());
    }
    assert!(f.mints().is_empty());
    assert_eq!(f.provider.minted(), 0);
    assert_no_secrets(
        "logs",
        &logs.text(),
        &BEARERS
            .iter()
            .map(|(_, b)| (*b).to_owned())
            .collect::<Vec<_>>(),
    );
}

#[tokio::test]
async fn a_workspace_asking_outside_its_grant_is_logged_once_a_while() {
    // A prompt-injected agent can ask for what it may not have in a loop;
    // each ask is answered, but the log gets one line per interval.
    let (logs, _guard) = Logs::capture();
    let f = fixture(Some(GRANTS), Duration::from_secs(3600));
    for n in 0..500 {
        let query = format!("?repository=evil/repo-{n}");
        let answer = f.token("ws-flood", &query).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{query}");
    }
    let text = logs.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("token refused") && l.contains("ws-flood"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one line for 500 refusals, not {}; the first: {:?}",
        lines.len(),
        lines.first()
    );
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
    assert!(f.mints().is_empty());
}

#[tokio::test]
async fn not_installed_is_a_clear_404() {
    let f = fixture(Some(GRANTS), Duration::from_secs(3600));
    let answer = f.token("ws-c", "?owner=ghost").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{:?}", answer.body);
    assert_eq!(
        answer.body["error"],
        "the GitHub App is not installed on account ghost"
    );
    // ws-c's first owner is ghost: the default answer says the same.
    assert_eq!(f.token("ws-c", "").await.status, StatusCode::NOT_FOUND);
    assert!(f.mints().is_empty());
}

#[tokio::test]
async fn malformed_queries_are_400() {
    let f = fixture(Some(GRANTS), Duration::from_secs(3600));
    for query in [
        "?repository=acme",
        "?repository=acme/a%20b",
        "?repository=acme/api&owner=acme",
        "?owner=acme&owner=acme",
        "?owner=-x",
        "?min_remaining_secs=-1",
        "?min_remaining_secs=ten",
        "?min_remaining_secs=1&min_remaining_secs=2",
        "?min_remaining_secs=99999999999",
        "?colour=blue",
    ] {
        let answer = f.token("ws-a", query).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{query}: {:?}",
            answer.body
        );
        assert!(answer.body["error"].is_string(), "{query}");
    }
    // Percent-encoded slashes are fine.
    token_of(&f.token("ws-a", "?repository=acme%2Fapi").await);
    // Bearer first: a stranger's malformed query is still a 401.
    let answer = get(
        &f.app,
        "/workspaces/ws-a/github-installation-token?colour=blue",
        Some("wrong"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_a_grants_file_every_query_gets_the_configured_installation() {
    let f = fixture(None, Duration::from_secs(3600));
    let default = f.token("ws-x", "").await;
    let asked = f.token("ws-x", "?repository=anyone/anything").await;
    assert_eq!(token_of(&default), token_of(&asked));
    assert!(default.body.get("owner").is_none());
    assert!(default.body.get("repositories").is_none());
    assert!(default.body["permissions"].is_object());
    assert_eq!(f.mints().len(), 1);
    assert_eq!(f.mints()[0].owner, None);
}

#[tokio::test]
async fn reloaded_grants_apply_to_the_next_request() {
    let f = fixture(Some(GRANTS), Duration::from_secs(3600));
    assert_eq!(f.token("ws-x", "").await.status, StatusCode::FORBIDDEN);
    f.grants
        .replace(Some("[workspace.ws-x]\nrepositories = [\"newco/*\"]\n"))
        .expect("replace");
    let answer = f.token("ws-x", "").await;
    token_of(&answer);
    assert_eq!(answer.body["owner"], "newco");
    assert_eq!(f.token("ws-a", "").await.status, StatusCode::FORBIDDEN);
    let err = f.grants.replace(Some("[workspace.ws-x]\n")).unwrap_err();
    assert!(err.to_string().contains("repositories"), "{err}");
    token_of(&f.token("ws-x", "").await);
}

#[tokio::test]
async fn min_remaining_mints_only_when_needed_and_is_clamped() {
    let f = fixture(Some(GRANTS), Duration::from_secs(3600));
    let first = token_of(&f.token("ws-a", "?min_remaining_secs=600").await);
    assert_eq!(f.provider.minted(), 1);
    // 40 minutes later: 20 min left, more than asked for.
    f.advance(40 * 60);
    let same = token_of(&f.token("ws-a", "?min_remaining_secs=600").await);
    assert_eq!(same, first);
    assert_eq!(f.provider.minted(), 1);
    // 20 min left, 25 min asked: a new token.
    let fresh = token_of(&f.token("ws-a", "?min_remaining_secs=1500").await);
    assert_ne!(fresh, first);
    assert_eq!(f.provider.minted(), 2);
    // The clamp: asking for a whole day never mints again on a fresh token.
    for _ in 0..5 {
        let again = token_of(&f.token("ws-a", "?min_remaining_secs=86400").await);
        assert_eq!(again, fresh);
    }
    assert_eq!(f.provider.minted(), 2);
    // Past the clamp (60 - 30 = 30 min left is still >= MAX_MIN_REMAINING).
    f.advance(29 * 60);
    token_of(&f.token("ws-a", "?min_remaining_secs=86400").await);
    assert_eq!(f.provider.minted(), 2);
    f.advance(2 * 60);
    assert!(MAX_MIN_REMAINING == Duration::from_secs(30 * 60));
    token_of(&f.token("ws-a", "?min_remaining_secs=86400").await);
    assert_eq!(
        f.provider.minted(),
        3,
        "under 30 min left: the clamp asks for a new one"
    );
}

#[tokio::test]
async fn min_remaining_is_capped_at_half_a_short_life() {
    // Ten-minute tokens: asking for 20 minutes must not mint every call.
    let f = fixture(Some(GRANTS), Duration::from_secs(600));
    let first = token_of(&f.token("ws-a", "?min_remaining_secs=1200").await);
    for _ in 0..3 {
        assert_eq!(
            token_of(&f.token("ws-a", "?min_remaining_secs=1200").await),
            first
        );
    }
    assert_eq!(f.provider.minted(), 1);
}

#[tokio::test]
async fn a_refusal_drops_the_cached_token_once_per_interval() {
    let (logs, _guard) = Logs::capture();
    let f = fixture(Some(GRANTS), Duration::from_secs(3600));
    let first = token_of(&f.token("ws-a", "").await);
    let other = token_of(&f.token("ws-a", "?owner=acme-labs").await);
    assert_eq!(f.provider.minted(), 2);

    // Not a cached token: nothing changes.
    let body = format!(r#"{{"sha256": "{}"}}"#, sha256_hex("ghs_not_ours"));
    assert_eq!(f.refuse("ws-a", &body).await.0, StatusCode::NO_CONTENT);
    assert_eq!(token_of(&f.token("ws-a", "").await), first);
    assert_eq!(f.provider.minted(), 2);

    // Another workspace's key (ws-c has no acme-labs) cannot drop it.
    let body = format!(r#"{{"sha256": "{}"}}"#, sha256_hex(&other));
    assert_eq!(f.refuse("ws-c", &body).await.0, StatusCode::NO_CONTENT);
    assert_eq!(token_of(&f.token("ws-a", "?owner=acme-labs").await), other);

    // The cached token: dropped, the next GET mints a different one.
    let body = format!(r#"{{"sha256": "{}"}}"#, sha256_hex(&first));
    assert_eq!(f.refuse("ws-a", &body).await.0, StatusCode::NO_CONTENT);
    let second = token_of(&f.token("ws-a", "").await);
    assert_ne!(second, first);
    assert_eq!(f.provider.minted(), 3);

    // Again within the interval, same workspace and installation: 429 and
    // the token stays.
    let body = format!(r#"{{"sha256": "{}"}}"#, sha256_hex(&second));
    let (status, retry) = f.refuse("ws-a", &body).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = retry.expect("Retry-After").parse().expect("seconds");
    assert!(retry >= 1 && retry <= REFUSAL_INTERVAL.as_secs(), "{retry}");
    assert_eq!(token_of(&f.token("ws-a", "").await), second);

    // After the interval it is accepted.
    f.advance(REFUSAL_INTERVAL.as_secs() as i64);
    assert_eq!(f.refuse("ws-a", &body).await.0, StatusCode::NO_CONTENT);
    assert_ne!(token_of(&f.token("ws-a", "").await), second);

    let mut secrets: Vec<String> = BEARERS.iter().map(|(_, b)| (*b).to_owned()).collect();
    secrets.extend([first, second, other]);
    assert_no_secrets("logs", &logs.text(), &secrets);
}

/// Issue 20, item 4: the refusal limit is per (workspace, installation).
/// ws-c keeps refusing its own `acme` token (a different one: its grant
/// differs); ws-a's refusal of its own `acme` token, on the same
/// installation, is still honoured at once, every time ws-c's window is
/// busy. A workspace still cannot make every call mint: its own second
/// refusal within the interval is 429.
#[tokio::test]
async fn refusal_limits_are_per_workspace_so_no_workspace_blocks_another() {
    let f = fixture(Some(GRANTS), Duration::from_secs(3600));
    let refusal = |token: &str| format!(r#"{{"sha256": "{}"}}"#, sha256_hex(token));
    let mut seen = Vec::new();
    for round in 0..3 {
        let noisy = token_of(&f.token("ws-c", "?owner=acme").await);
        let victim = token_of(&f.token("ws-a", "?owner=acme").await);
        assert_ne!(noisy, victim, "different grants, different tokens");
        assert_eq!(
            f.refuse("ws-c", &refusal(&noisy)).await.0,
            StatusCode::NO_CONTENT,
            "round {round}: ws-c's own drop"
        );
        let noisy_again = token_of(&f.token("ws-c", "?owner=acme").await);
        assert_ne!(noisy_again, noisy);
        assert_eq!(
            f.refuse("ws-c", &refusal(&noisy_again)).await.0,
            StatusCode::TOO_MANY_REQUESTS,
            "round {round}: ws-c cannot make every call mint"
        );
        assert_eq!(
            f.refuse("ws-a", &refusal(&victim)).await.0,
            StatusCode::NO_CONTENT,
            "round {round}: ws-c's busy window must not block ws-a"
        );
        let replaced = token_of(&f.token("ws-a", "?owner=acme").await);
        assert_ne!(replaced, victim, "round {round}: not handed back");
        seen.extend([noisy, noisy_again, victim, replaced]);
        f.advance(REFUSAL_INTERVAL.as_secs() as i64);
    }
    let acme_mints = f
        .mints()
        .iter()
        .filter(|m| m.owner.as_deref() == Some("acme"))
        .count();
    // Round 0 mints both first tokens and both replacements; later rounds
    // start from the cached replacements and mint only the two new ones.
    assert_eq!(acme_mints, 4 + 2 * 2, "{} tokens seen", seen.len());
}

#[tokio::test]
async fn malformed_refusals_are_400() {
    let f = fixture(Some(GRANTS), Duration::from_secs(3600));
    for body in [
        "".to_owned(),
        "{}".to_owned(),
        r#"{"sha256": "abc"}"#.to_owned(),
        format!(r#"{{"sha256": "{}"}}"#, "A".repeat(64)),
        format!(r#"{{"sha256": "{}", "token": "x"}}"#, "a".repeat(64)),
        format!(r#"{{"sha256": "{}"}}"#, "a".repeat(2000)),
    ] {
        assert_eq!(
            f.refuse("ws-a", &body).await.0,
            StatusCode::BAD_REQUEST,
            "{body:.80}"
        );
    }
}
