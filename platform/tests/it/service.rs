//! The service's routes and auth rules, in-process (tower `oneshot`) with
//! the dev provider, and once over real HTTP for what only hyper adds.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use molecule_platform::{
    AppState, Auth, DevProvider, Grants, TokenProvider, WorkspaceTokens, app, serve,
};
use secrecy::SecretString;

use crate::support::{Logs, assert_no_secrets, get, http};

const ADMIN: &str = "admin-bearer-0123456789abcdef";
const WS_A: &str = "workspace-a-bearer-0123456789";
const WS_B: &str = "workspace-b-bearer-0123456789";

fn workspaces() -> WorkspaceTokens {
    WorkspaceTokens::from_bearers([
        ("ws-a", SecretString::from(WS_A)),
        ("ws-b", SecretString::from(WS_B)),
    ])
}

fn dev_app(admin: Option<&str>) -> (Router, Arc<DevProvider>) {
    let provider = Arc::new(DevProvider::new(Duration::from_secs(600)));
    let served: Option<Arc<dyn TokenProvider>> = Some(Arc::clone(&provider) as _);
    let auth = Auth::new(admin.map(SecretString::from), workspaces());
    (app(AppState::new(served, auth)), provider)
}

const WS_A_ROUTE: &str = "/workspaces/ws-a/github-installation-token";
const ADMIN_ROUTE: &str = "/admin/github-installation-token";

#[tokio::test]
async fn auth_matrix_with_admin_token() {
    let (logs, _guard) = Logs::capture();
    let (app, provider) = dev_app(Some(ADMIN));
    let cases: &[(&str, Option<&str>, StatusCode, Option<&str>)] = &[
        (WS_A_ROUTE, Some(WS_A), StatusCode::OK, None),
        (WS_A_ROUTE, Some(ADMIN), StatusCode::OK, None),
        (
            WS_A_ROUTE,
            Some(WS_B),
            StatusCode::UNAUTHORIZED,
            Some("invalid bearer token"),
        ),
        (
            WS_A_ROUTE,
            None,
            StatusCode::UNAUTHORIZED,
            Some("missing bearer token"),
        ),
        (
            WS_A_ROUTE,
            Some("not-a-known-bearer"),
            StatusCode::UNAUTHORIZED,
            Some("invalid bearer token"),
        ),
        (
            "/workspaces/ws-unknown/github-installation-token",
            Some(WS_A),
            StatusCode::UNAUTHORIZED,
            Some("invalid bearer token"),
        ),
        (ADMIN_ROUTE, Some(ADMIN), StatusCode::OK, None),
        (
            ADMIN_ROUTE,
            Some(WS_A),
            StatusCode::UNAUTHORIZED,
            Some("invalid bearer token"),
        ),
        (
            ADMIN_ROUTE,
            None,
            StatusCode::UNAUTHORIZED,
            Some("missing bearer token"),
        ),
        (
            ADMIN_ROUTE,
            Some("not-a-known-bearer"),
            StatusCode::UNAUTHORIZED,
            Some("invalid bearer token"),
        ),
    ];
    let mut token = None;
    for (path, bearer, status, error) in cases {
        let answer = get(&app, path, *bearer).await;
        assert_eq!(
            answer.status,
            *status,
            "{path} with {:?}",
            bearer.map(|b| &b[..9])
        );
        assert_eq!(answer.headers["cache-control"], "no-store");
        match error {
            Some(error) => assert_eq!(answer.body, serde_json::json!({ "error": error })),
            None => {
                let t = answer.body["token"].as_str().expect("token").to_owned();
                assert!(t.starts_with("ghs_"));
                assert_eq!(
                    token.get_or_insert_with(|| t.clone()),
                    &t,
                    "one cached token"
                );
            }
        }
    }
    assert_eq!(provider.minted(), 1);
    let text = logs.text();
    assert!(
        text.contains("request refused: invalid bearer token"),
        "{text}"
    );
    assert_no_secrets(
        "logs",
        &text,
        &[
            ADMIN.into(),
            WS_A.into(),
            WS_B.into(),
            token.expect("a token was served"),
        ],
    );
}

#[tokio::test]
async fn without_admin_token_the_admin_route_takes_workspace_bearers() {
    let (app, _) = dev_app(None);
    assert_eq!(
        get(&app, ADMIN_ROUTE, Some(WS_A)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&app, ADMIN_ROUTE, Some(WS_B)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&app, ADMIN_ROUTE, Some(ADMIN)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&app, WS_A_ROUTE, Some(WS_B)).await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// Issue 20, item 1: once grants are in force — at start or swapped in
/// later (a reload from none to some) — the admin route is closed to
/// workspace bearers (403 with the reason, nothing minted), and opens again
/// without grants; the admin bearer, when set, keeps it; strangers get 401.
#[tokio::test]
async fn while_grants_are_in_force_the_admin_route_is_closed_to_workspace_bearers() {
    let (logs, _guard) = Logs::capture();
    let provider = Arc::new(DevProvider::new(Duration::from_secs(600)));
    let served: Option<Arc<dyn TokenProvider>> = Some(Arc::clone(&provider) as _);
    let grants = Arc::new(Grants::none());
    let no_admin = app(AppState::new(served.clone(), Auth::new(None, workspaces()))
        .with_grants(Arc::clone(&grants)));
    let with_admin = app(AppState::new(
        served,
        Auth::new(Some(SecretString::from(ADMIN)), workspaces()),
    )
    .with_grants(Arc::clone(&grants)));

    // No grants: the legacy contract.
    assert_eq!(
        get(&no_admin, ADMIN_ROUTE, Some(WS_A)).await.status,
        StatusCode::OK
    );
    assert_eq!(provider.minted(), 1);

    grants
        .replace(Some("[workspace.ws-a]\nrepositories = [\"acme/api\"]\n"))
        .expect("grants");
    for bearer in [WS_A, WS_B] {
        let answer = get(&no_admin, ADMIN_ROUTE, Some(bearer)).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{:?}", answer.body);
        let reason = answer.body["error"].as_str().expect("reason");
        assert!(reason.contains("grants"), "{reason}");
        assert!(answer.body.get("token").is_none());
    }
    assert_eq!(
        get(&no_admin, ADMIN_ROUTE, Some("a-stranger-0123456789"))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "strangers learn nothing about the setup"
    );
    assert_eq!(
        get(&no_admin, ADMIN_ROUTE, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(provider.minted(), 1, "nothing minted for the closed route");
    let scoped = get(&no_admin, WS_A_ROUTE, Some(WS_A)).await;
    assert_eq!(scoped.status, StatusCode::OK);
    assert_eq!(scoped.body["repositories"], serde_json::json!(["acme/api"]));

    // The admin bearer, set, is the operator's: it keeps the route.
    assert_eq!(
        get(&with_admin, ADMIN_ROUTE, Some(ADMIN)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&with_admin, ADMIN_ROUTE, Some(WS_A)).await.status,
        StatusCode::UNAUTHORIZED
    );

    grants.replace(None).expect("no grants");
    assert_eq!(
        get(&no_admin, ADMIN_ROUTE, Some(WS_B)).await.status,
        StatusCode::OK
    );
    assert_no_secrets(
        "logs",
        &logs.text(),
        &[ADMIN.into(), WS_A.into(), WS_B.into()],
    );
}

#[tokio::test]
async fn unconfigured_is_404_after_auth_and_a_provider_turns_it_on() {
    let auth = || Auth::new(Some(SecretString::from(ADMIN)), workspaces());
    let unconfigured = app(AppState::new(None, auth()));
    let answer = get(&unconfigured, ADMIN_ROUTE, Some(ADMIN)).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(
        answer.body,
        serde_json::json!({"error": "no GitHub App configured"})
    );
    let answer = get(&unconfigured, WS_A_ROUTE, Some(WS_A)).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    // Strangers learn nothing about the setup.
    assert_eq!(
        get(&unconfigured, ADMIN_ROUTE, Some("nope")).await.status,
        StatusCode::UNAUTHORIZED
    );
    let provider: Arc<dyn TokenProvider> = Arc::new(DevProvider::new(Duration::from_secs(600)));
    let configured = app(AppState::new(Some(provider), auth()));
    assert_eq!(
        get(&configured, ADMIN_ROUTE, Some(ADMIN)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn healthz_and_unknown_routes() {
    let (app, provider) = dev_app(Some(ADMIN));
    let answer = get(&app, "/healthz", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, serde_json::json!({"status": "ok"}));
    let answer = get(&app, "/nope", Some(ADMIN)).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.body, serde_json::json!({"error": "not found"}));
    let long_id = format!("/workspaces/{}/github-installation-token", "x".repeat(500));
    assert_eq!(
        get(&app, &long_id, Some(WS_A)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(provider.minted(), 0, "no token minted for any of these");
}

#[tokio::test]
async fn oversized_request_body_is_refused() {
    let (app, _) = dev_app(Some(ADMIN));
    let request = axum::http::Request::get(ADMIN_ROUTE)
        .header("authorization", format!("Bearer {ADMIN}"))
        .header("content-length", "1000000")
        .body(axum::body::Body::from(vec![b'x'; 1_000_000]))
        .expect("request");
    let response = tower::ServiceExt::oneshot(app, request)
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn sighup_style_reload_changes_who_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens");
    std::fs::write(
        &file,
        format!("ws-a {}\n", crate::support::sha256_hex(WS_A)),
    )
    .expect("write");
    let served: Option<Arc<dyn TokenProvider>> =
        Some(Arc::new(DevProvider::new(Duration::from_secs(600))));
    let state = AppState::new(
        served,
        Auth::new(None, WorkspaceTokens::load(&file).expect("load")),
    );
    let auth = Arc::clone(state.auth());
    let app = app(state);
    assert_eq!(
        get(&app, WS_A_ROUTE, Some(WS_A)).await.status,
        StatusCode::OK
    );
    std::fs::write(
        &file,
        format!("# rotated\nws-a {}\n", crate::support::sha256_hex(WS_B)),
    )
    .expect("write");
    assert_eq!(auth.workspaces().reload().expect("reload"), 1);
    assert_eq!(
        get(&app, WS_A_ROUTE, Some(WS_A)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&app, WS_A_ROUTE, Some(WS_B)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn real_http_has_date_header_and_shuts_down_gracefully() {
    let (app, _) = dev_app(Some(ADMIN));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app, async move {
        let _ = stop_rx.await;
    }));
    let client = http();
    let response = client
        .get(format!("http://{addr}{ADMIN_ROUTE}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let date = response.headers()["date"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let date = httpdate_parse(&date);
    let body: serde_json::Value = response.json_or_panic().await;
    let expires: jiff::Timestamp = body["expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .expect("RFC 3339");
    let remaining = expires.duration_since(date);
    assert!(
        remaining > jiff::SignedDuration::from_secs(590)
            && remaining <= jiff::SignedDuration::from_secs(601),
        "expires_at - Date = {remaining:?}"
    );
    stop.send(()).expect("server alive");
    tokio::time::timeout(crate::support::WAIT, server)
        .await
        .expect("server stops after the shutdown signal")
        .expect("task")
        .expect("serve");
    assert!(
        http()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .is_err(),
        "no longer listening"
    );
}

/// Parses an IMF-fixdate (`Sat, 28 Nov 2026 15:00:00 GMT`).
fn httpdate_parse(text: &str) -> jiff::Timestamp {
    jiff::fmt::rfc2822::parse(text)
        .unwrap_or_else(|e| panic!("Date {text:?}: {e}"))
        .timestamp()
}

trait JsonOrPanic {
    async fn json_or_panic(self) -> serde_json::Value;
}

impl JsonOrPanic for reqwest::Response {
    async fn json_or_panic(self) -> serde_json::Value {
        let bytes = self.bytes().await.expect("body");
        serde_json::from_slice(&bytes).expect("JSON body")
    }
}

#[tokio::test]
async fn idle_connections_are_closed_and_free_their_slot() {
    use tokio::io::AsyncReadExt;
    let limits = molecule_platform::ServiceLimits {
        idle_timeout: Duration::from_millis(300),
        max_connections: 1,
        ..Default::default()
    };
    let (app, _) = dev_app(Some(ADMIN));
    let server = crate::support::Server::start(app, limits).await;
    let addr = server.addr;
    // A client that connects and says nothing is closed once the idle
    // timeout (here shorter than the header timeout) passed: the read ends
    // with EOF (or a reset).
    let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(crate::support::WAIT, idle.read(&mut buf))
        .await
        .expect("the server closes an idle connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The slot is free again.
    let response = http()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    server.stop().await;
}

/// A provider breaking the contract, to check the service's own guard.
struct BrokenProvider {
    token: &'static str,
    expires_in: jiff::SignedDuration,
}

impl molecule_platform::TokenProvider for BrokenProvider {
    fn token(&self) -> molecule_platform::provider::TokenFuture<'_> {
        Box::pin(async move {
            Ok(molecule_platform::IssuedToken {
                token: SecretString::from(self.token),
                expires_at: jiff::Timestamp::now() + self.expires_in,
            })
        })
    }
}

#[tokio::test]
async fn empty_or_expired_tokens_from_a_provider_are_a_500() {
    let cases = [
        (
            "",
            jiff::SignedDuration::from_mins(60),
            "the provider returned an empty token",
        ),
        (
            "ghs_expiredexpiredexpired",
            jiff::SignedDuration::from_secs(-5),
            "the provider returned a token that expired at",
        ),
    ];
    for (token, expires_in, cause) in cases {
        let (logs, _guard) = Logs::capture();
        let app = app(AppState::new(
            Some(Arc::new(BrokenProvider { token, expires_in })),
            Auth::new(Some(ADMIN.into()), workspaces()),
        ));
        let answer = get(&app, ADMIN_ROUTE, Some(ADMIN)).await;
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            answer.body,
            serde_json::json!({"error": "token refresh failed"})
        );
        let text = logs.text();
        assert!(
            text.contains(&format!("[github] token refresh failed: {cause}")),
            "{text}"
        );
        assert_no_secrets("logs", &text, &["ghs_expiredexpiredexpired".into()]);
    }
}

/// A provider that never answers (every token request holds its slot) and
/// says when it has been called.
#[derive(Default)]
struct StalledProvider {
    called: tokio::sync::Notify,
}

impl molecule_platform::TokenProvider for StalledProvider {
    fn token(&self) -> molecule_platform::provider::TokenFuture<'_> {
        self.called.notify_one();
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn at_the_concurrency_limit_requests_are_refused_at_once_not_queued() {
    let provider = Arc::new(StalledProvider::default());
    let served: Option<Arc<dyn TokenProvider>> = Some(Arc::clone(&provider) as _);
    let auth = Auth::new(Some(SecretString::from(ADMIN)), workspaces());
    let limits = molecule_platform::ServiceLimits {
        max_concurrent_requests: 1,
        ..Default::default()
    };
    let app = app(AppState::new(served, auth).with_limits(limits));
    // The one slot: a token request stuck on the stalled upstream.
    let held = {
        let app = app.clone();
        tokio::spawn(async move { get(&app, ADMIN_ROUTE, Some(ADMIN)).await })
    };
    provider.called.notified().await;
    // Everyone else is answered at once, health checks included.
    let answer = tokio::time::timeout(Duration::from_secs(5), get(&app, "/healthz", None))
        .await
        .expect("answered, not queued behind the stalled request");
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    held.abort();
}

/// The metrics belong to the provider, not to the process: two platforms in
/// one process (tests, benches, an embedder) count only what each did.
/// Before, one process-wide set made every router's `/metrics` show every
/// router's mints.
#[tokio::test]
async fn each_platform_counts_only_its_own_requests() {
    const MINTED: &str = "molecule_platform_tokens_minted_total ";
    let (busy, _) = dev_app(Some(ADMIN));
    let (idle, _) = dev_app(Some(ADMIN));
    for _ in 0..3 {
        assert_eq!(
            get(&busy, ADMIN_ROUTE, Some(ADMIN)).await.status,
            StatusCode::OK
        );
    }
    let text = |answer: crate::support::Answer| match answer.body {
        serde_json::Value::String(text) => text,
        other => panic!("metrics are text, not {other}"),
    };
    let busy = text(get(&busy, "/metrics", None).await);
    let idle = text(get(&idle, "/metrics", None).await);
    let minted = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(MINTED))
            .map(|n| n.trim().to_owned())
    };
    assert_eq!(minted(&busy).as_deref(), Some("1"), "{busy}");
    assert_eq!(minted(&idle).as_deref(), Some("0"), "{idle}");
    assert!(
        !idle.contains("code=\"200\""),
        "the idle platform served nothing: {idle}"
    );
}
