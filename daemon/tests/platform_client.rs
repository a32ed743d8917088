//! PlatformClient against a real HTTP/1.1 server on loopback.
//!
//! The server is a few lines of tokio so each test states the exact bytes the
//! platform answers (odd layouts, bad statuses, hangs) and sees the exact
//! request the client sent.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, SystemTime};

use credd_core::config::PlatformConfig;
use credd_core::platform_api::{TokenQuery, Which};
use credd_core::repository::RepositoryRef;
use molecule_credd::platform::{
    ErrorClass, PlatformClient, PlatformError, ReportOutcome, Timeouts,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const TOKEN: &str = "ghs_TESTtoken0123456789abcdefghijklmnop";
const BEARER: &str = "bearer-secret-0123456789";

/// Serves `responses` in order, one per connection; reports each request's head.
async fn platform(responses: Vec<String>) -> (String, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for response in responses {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            if response == "HANG" {
                tokio::time::sleep(Duration::from_secs(30)).await;
                continue;
            }
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
    });
    (url, rx)
}

fn reply(status: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out
}

fn client(url: &str, configs: &Path, workspace: Option<&str>, total: Duration) -> PlatformClient {
    let mut env: HashMap<&str, OsString> = HashMap::new();
    env.insert("PLATFORM_URL", url.into());
    env.insert("CONFIGS_DIR", configs.as_os_str().to_owned());
    if let Some(id) = workspace {
        env.insert("WORKSPACE_ID", id.into());
    }
    let config = PlatformConfig::from_lookup(|k| env.get(k).cloned()).expect("config");
    PlatformClient::new(
        &config,
        Timeouts {
            connect: Duration::from_secs(2),
            total,
        },
    )
    .expect("client")
}

fn configs_with_bearer(bearer: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(".auth_token"), bearer).expect("write bearer");
    dir
}

fn assert_no_secret(err: &PlatformError) {
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(&s.to_string());
        source = s.source();
    }
    for secret in [TOKEN, BEARER, "ghs_"] {
        assert!(!text.contains(secret), "error leaks {secret}: {text}");
    }
}

#[tokio::test]
async fn parses_any_layout_and_measures_life_against_the_date_header() {
    // The platform's clock says it is 2030-01-01T00:00:00Z; the token lives 50 minutes from then,
    // whatever this machine's clock says.
    let body = format!(
        "{{\n  \"expires_at\" : \"2030-01-01T00:50:00+00:00\",\n  \"extra\": [1, {{\"x\": null}}],\n  \"token\":\"{TOKEN}\"\n}}"
    );
    let (url, mut requests) = platform(vec![reply(
        "200 OK",
        &[
            ("date", "Tue, 01 Jan 2030 00:00:00 GMT"),
            ("content-type", "application/json"),
        ],
        &body,
    )])
    .await;
    let configs = configs_with_bearer(&format!("  {BEARER}\n"));
    let grant = client(&url, configs.path(), Some("ws-7"), Duration::from_secs(5))
        .fetch(&TokenQuery::default())
        .await
        .expect("grant");
    assert_eq!(grant.token.expose(), TOKEN);
    assert_eq!(grant.lifetime, Duration::from_secs(50 * 60));
    assert_eq!(
        grant
            .expires_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs(),
        1_893_459_000
    );
    let head = requests.recv().await.expect("request");
    assert!(
        head.starts_with("GET /workspaces/ws-7/github-installation-token HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains(&format!(
            "authorization: bearer {}",
            BEARER.to_ascii_lowercase()
        )),
        "bearer trimmed and sent"
    );
}

#[tokio::test]
async fn rereads_the_bearer_on_every_call() {
    let ok = reply(
        "200 OK",
        &[],
        &format!(r#"{{"token":"{TOKEN}","expires_at":"2999-01-01T00:00:00Z"}}"#),
    );
    let (url, mut requests) = platform(vec![ok.clone(), ok]).await;
    let configs = configs_with_bearer("first-bearer");
    let client = client(&url, configs.path(), None, Duration::from_secs(5));
    client.fetch(&TokenQuery::default()).await.expect("first");
    std::fs::write(configs.path().join(".auth_token"), "rotated-bearer\n").expect("rotate");
    client.fetch(&TokenQuery::default()).await.expect("second");
    let first = requests.recv().await.expect("first request");
    let second = requests.recv().await.expect("second request");
    assert!(
        first.starts_with("GET /admin/github-installation-token "),
        "{first}"
    );
    assert!(first.contains("Bearer first-bearer"), "{first}");
    assert!(second.contains("Bearer rotated-bearer"), "{second}");
}

#[tokio::test]
async fn classifies_statuses_and_honours_retry_after() {
    let cases = vec![
        reply("401 Unauthorized", &[], r#"{"error":"nope"}"#),
        reply("403 Forbidden", &[], ""),
        reply(
            "404 Not Found",
            &[],
            r#"{"error":"no GitHub App configured"}"#,
        ),
        reply("429 Too Many Requests", &[("retry-after", "17")], ""),
        reply("503 Service Unavailable", &[("retry-after", "999999")], ""),
        reply("500 Internal Server Error", &[], TOKEN),
        reply("302 Found", &[("location", "http://127.0.0.1:1/steal")], ""),
        reply("400 Bad Request", &[], r#"{"error":"bad owner"}"#),
    ];
    let (url, _requests) = platform(cases).await;
    let configs = configs_with_bearer(BEARER);
    let client = client(&url, configs.path(), None, Duration::from_secs(5));
    let mut errors = Vec::new();
    for _ in 0..8 {
        errors.push(
            client
                .fetch(&TokenQuery::default())
                .await
                .expect_err("non-200 is an error"),
        );
    }
    for err in &errors {
        assert_no_secret(err);
    }
    assert!(matches!(
        errors[0],
        PlatformError::Unauthorized { status: 401, .. }
    ));
    assert_eq!(
        errors[1].class(),
        ErrorClass::NotGranted,
        "403 means outside the grant, not a bad bearer"
    );
    assert_eq!(errors[2].class(), ErrorClass::NotConfigured);
    assert_eq!(errors[3].retry_after(), Some(Duration::from_secs(17)));
    assert_eq!(errors[3].class(), ErrorClass::Transient);
    assert_eq!(
        errors[4].retry_after(),
        Some(molecule_credd::platform::MAX_RETRY_AFTER)
    );
    assert!(matches!(
        errors[5],
        PlatformError::Server {
            status: 500,
            retry_after: None
        }
    ));
    assert!(
        matches!(errors[6], PlatformError::UnexpectedStatus { status: 302 }),
        "redirects are not followed"
    );
    assert_eq!(
        errors[7].class(),
        ErrorClass::NotGranted,
        "a request the platform refuses as malformed is not retried as transient"
    );
    assert_eq!(errors[7].http_status(), Some(400));
}

#[tokio::test]
async fn bad_bodies_are_refused_without_quoting_them() {
    let cases = vec![
        reply("200 OK", &[], &format!("token={TOKEN}")),
        reply("200 OK", &[], &format!(r#"{{"token":"{TOKEN}"}}"#)),
        reply(
            "200 OK",
            &[],
            &format!(r#"{{"token":"{TOKEN}","expires_at":"in an hour"}}"#),
        ),
        reply(
            "200 OK",
            &[],
            &format!(r#"{{"token":"{TOKEN}","expires_at":1893459000}}"#),
        ),
        reply(
            "200 OK",
            &[],
            r#"{"token":"","expires_at":"2999-01-01T00:00:00Z"}"#,
        ),
        reply(
            "200 OK",
            &[("date", "Tue, 01 Jan 2030 00:00:00 GMT")],
            &format!(r#"{{"token":"{TOKEN}","expires_at":"2029-12-31T23:59:00Z"}}"#),
        ),
        reply(
            "200 OK",
            &[],
            &format!(
                r#"{{"token":"{TOKEN}","pad":"{}"}}"#,
                "x".repeat(molecule_credd::platform::MAX_BODY + 1)
            ),
        ),
    ];
    let (url, _requests) = platform(cases).await;
    let configs = configs_with_bearer(BEARER);
    let client = client(&url, configs.path(), None, Duration::from_secs(5));
    for expected in [
        "not valid JSON",
        "expected a JSON object",
        "RFC 3339",
        "expected a JSON object",
        "token is empty",
        "expired at",
        "larger than",
    ] {
        let err = client
            .fetch(&TokenQuery::default())
            .await
            .expect_err("bad body");
        assert_no_secret(&err);
        assert!(
            err.to_string().contains(expected),
            "{expected:?} not in {err}"
        );
        assert_eq!(err.class(), ErrorClass::Transient);
    }
}

#[tokio::test]
async fn hangs_time_out_and_closed_ports_are_unreachable() {
    let (url, mut requests) = platform(vec!["HANG".into()]).await;
    let configs = configs_with_bearer(BEARER);
    let err = client(&url, configs.path(), None, Duration::from_millis(300))
        .fetch(&TokenQuery::default())
        .await
        .expect_err("hang");
    assert!(matches!(err, PlatformError::Timeout { .. }), "{err}");
    assert!(requests.recv().await.is_some(), "the request did arrive");

    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let err = client(&url, configs.path(), None, Duration::from_secs(2))
        .fetch(&TokenQuery::default())
        .await
        .expect_err("closed");
    assert!(err.is_unreachable(), "{err}");
    assert_no_secret(&err);
}

#[tokio::test]
async fn bearer_file_problems_are_reported_before_calling() {
    let (url, _requests) = platform(vec![]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client(&url, dir.path(), None, Duration::from_secs(2));
    let err = client
        .fetch(&TokenQuery::default())
        .await
        .expect_err("missing file");
    assert_eq!(err.class(), ErrorClass::Bearer);
    assert!(err.to_string().contains(".auth_token"), "{err}");
    for (content, problem) in [
        ("\n \n", "empty"),
        ("two words", "spaces"),
        ("x\u{1}y", "non-printable"),
    ] {
        std::fs::write(dir.path().join(".auth_token"), content).expect("write");
        let err = client
            .fetch(&TokenQuery::default())
            .await
            .expect_err(problem);
        assert!(err.to_string().contains(problem), "{err}");
        assert!(
            content.trim().is_empty() || !err.to_string().contains(content.trim()),
            "{err}"
        );
    }
    std::fs::write(dir.path().join(".auth_token"), "x".repeat(9000)).expect("write");
    assert!(
        client
            .fetch(&TokenQuery::default())
            .await
            .expect_err("huge")
            .to_string()
            .contains("8 KiB")
    );
}

#[tokio::test]
async fn asks_for_an_owner_or_repository_and_reads_the_stated_scope() {
    let scoped = format!(
        r#"{{"token":"{TOKEN}","expires_at":"2030-01-01T00:50:00Z","owner":"acme","repositories":["acme/api","acme/web"],"permissions":{{"contents":"write"}}}}"#
    );
    let date = [("date", "Tue, 01 Jan 2030 00:00:00 GMT")];
    let (url, mut requests) = platform(vec![
        reply("200 OK", &date, &scoped),
        reply("404 Not Found", &[], r#"{"error":"not installed"}"#),
        reply("403 Forbidden", &[], r#"{"error":"outside the grant"}"#),
        reply(
            "200 OK",
            &date,
            &format!(r#"{{"token":"{TOKEN}","expires_at":"2030-01-01T00:50:00Z","repositories":["not a repo"]}}"#),
        ),
    ])
    .await;
    let configs = configs_with_bearer(BEARER);
    let client = client(&url, configs.path(), Some("ws-7"), Duration::from_secs(5));
    let grant = client
        .fetch(&TokenQuery {
            which: Which::owner("acme").expect("valid"),
            min_remaining: Some(Duration::from_secs(750)),
        })
        .await
        .expect("grant");
    assert_eq!(grant.scope.owner.as_deref(), Some("acme"));
    assert_eq!(
        grant.scope.repositories,
        Some(vec!["acme/api".to_owned(), "acme/web".to_owned()])
    );
    assert_eq!(
        grant
            .scope
            .permissions
            .as_ref()
            .and_then(|p| p.get("contents"))
            .map(String::as_str),
        Some("write")
    );
    let head = requests.recv().await.expect("request");
    assert!(
        head.starts_with(
            "GET /workspaces/ws-7/github-installation-token?owner=acme&min_remaining_secs=750 "
        ),
        "{head}"
    );

    let repo = RepositoryRef::parse("elsewhere/tool").expect("valid");
    let ask = TokenQuery::for_which(Which::Repository(repo));
    let not_installed = client.fetch(&ask).await.expect_err("404");
    assert!(
        matches!(not_installed, PlatformError::NotInstalled { .. }),
        "{not_installed}"
    );
    assert_eq!(
        not_installed.class(),
        ErrorClass::NotConfigured,
        "not installed there: only installing the App helps"
    );
    assert!(
        not_installed.to_string().contains("elsewhere/tool"),
        "{not_installed}"
    );
    let head = requests.recv().await.expect("request");
    assert!(head.contains("?repository=elsewhere%2Ftool "), "{head}");
    let refused = client.fetch(&ask).await.expect_err("403");
    assert!(
        matches!(refused, PlatformError::NotGranted { .. }),
        "{refused}"
    );
    let bad_scope = client
        .fetch(&TokenQuery::default())
        .await
        .expect_err("bad scope");
    assert!(
        matches!(bad_scope, PlatformError::Malformed { .. }),
        "{bad_scope}"
    );
    for err in [&not_installed, &refused, &bad_scope] {
        assert_no_secret(err);
    }
}

#[tokio::test]
async fn reports_a_refused_token_by_its_hash() {
    let (url, mut requests) = platform(vec![
        reply("204 No Content", &[], ""),
        reply("429 Too Many Requests", &[("retry-after", "30")], ""),
        reply("404 Not Found", &[], ""),
    ])
    .await;
    let configs = configs_with_bearer(BEARER);
    let client = client(&url, configs.path(), Some("ws-7"), Duration::from_secs(5));
    let sha = credd_core::secret::sha256_hex(TOKEN.as_bytes());
    assert_eq!(
        client.report_refusal(&sha).await.expect("sent"),
        ReportOutcome::Accepted
    );
    let head = requests.recv().await.expect("request");
    assert!(
        head.starts_with("POST /workspaces/ws-7/github-installation-token/refusals "),
        "{head}"
    );
    assert!(head.contains(&format!("Bearer {BEARER}")), "{head}");
    assert!(!head.contains(TOKEN), "only the hash travels: {head}");
    assert_eq!(
        client.report_refusal(&sha).await.expect("sent"),
        ReportOutcome::RateLimited
    );
    assert_eq!(
        client.report_refusal(&sha).await.expect("sent"),
        ReportOutcome::Unsupported
    );
}
