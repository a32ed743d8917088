//! Grants with the GitHub App provider against the stand-in: installations
//! found from the App (paginated listing), and the scope of each mint.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use molecule_platform::{
    AppState, Auth, GitHubAppProvider, Grants, TokenProvider, WorkspaceTokens, app,
};
use secrecy::SecretString;

use crate::support::{GitHubStandIn, Logs, MintRecord, assert_no_secrets, get};

const GRANTS: &str = r#"
[workspace.ws-a]
repositories = ["acme/web", "acme/api", "acme-labs/*"]
permissions = { contents = "write", pull_requests = "write" }

[workspace.ws-b]
repositories = ["acme/api", "acme/web"]
permissions = { contents = "write", pull_requests = "write" }

[workspace.ws-c]
repositories = ["ghost/*"]
"#;

const BEARERS: [(&str, &str); 3] = [
    ("ws-a", "github-grants-bearer-a-0123456789"),
    ("ws-b", "github-grants-bearer-b-0123456789"),
    ("ws-c", "github-grants-bearer-c-0123456789"),
];

fn service(github: &GitHubStandIn) -> (Router, Arc<GitHubAppProvider>) {
    github.add_installation("acme", 1001);
    github.add_installation("Acme-Labs", 1002);
    github.set_page_size(1);
    let provider = Arc::new(github.provider());
    let served: Option<Arc<dyn TokenProvider>> = Some(Arc::clone(&provider) as _);
    let auth = Auth::new(
        None,
        WorkspaceTokens::from_bearers(BEARERS.iter().map(|(id, b)| (*id, SecretString::from(*b)))),
    );
    let grants = Arc::new(Grants::parse(GRANTS).expect("grants"));
    (
        app(AppState::new(served, auth).with_grants(grants)),
        provider,
    )
}

async fn token(app: &Router, ws: &str, query: &str) -> crate::support::Answer {
    let bearer = BEARERS.iter().find(|(w, _)| *w == ws).expect("known").1;
    get(
        app,
        &format!("/workspaces/{ws}/github-installation-token{query}"),
        Some(bearer),
    )
    .await
}

fn permissions() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("contents".to_owned(), "write".to_owned()),
        ("pull_requests".to_owned(), "write".to_owned()),
    ])
}

#[tokio::test]
async fn each_mint_asks_github_for_the_grant_and_same_grants_share_one() {
    let (logs, _guard) = Logs::capture();
    let github = GitHubStandIn::start();
    let (app, provider) = service(&github);

    let a = token(&app, "ws-a", "?repository=acme/api").await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body["owner"], "acme");
    assert_eq!(
        a.body["repositories"],
        serde_json::json!(["acme/api", "acme/web"])
    );
    assert_eq!(
        a.body["permissions"],
        serde_json::json!({"contents": "write", "pull_requests": "write"})
    );
    assert_eq!(
        github.mints(),
        vec![MintRecord {
            installation: 1001,
            repositories: Some(vec!["api".into(), "web".into()]),
            permissions: Some(permissions()),
        }]
    );
    assert_eq!(github.listings(), 3, "three installations, one per page");

    let b = token(&app, "ws-b", "?repository=acme/web").await;
    assert_eq!(b.body["token"], a.body["token"], "one token for one grant");
    assert_eq!(github.mints().len(), 1);

    let labs = token(&app, "ws-a", "?repository=acme-labs/tools").await;
    assert_eq!(labs.status, StatusCode::OK, "{:?}", labs.body);
    assert!(labs.body.get("repositories").is_none());
    assert_eq!(
        github.mints()[1],
        MintRecord {
            installation: 1002,
            repositories: None,
            permissions: Some(permissions()),
        }
    );
    assert_eq!(github.listings(), 3, "the installation table is cached");
    assert_eq!(provider.upstream_calls(), 2);
    assert!(github.rejections().is_empty(), "{:?}", github.rejections());

    let mut secrets = github.secrets();
    secrets.extend(BEARERS.iter().map(|(_, b)| (*b).to_owned()));
    assert_no_secrets("logs", &logs.text(), &secrets);
}

#[tokio::test]
async fn outside_the_grant_mints_nothing_and_not_installed_is_404() {
    let github = GitHubStandIn::start();
    let (app, _) = service(&github);
    let outside = token(&app, "ws-a", "?repository=acme/secret").await;
    assert_eq!(outside.status, StatusCode::FORBIDDEN);
    assert_eq!(github.calls(), 0);
    assert_eq!(
        github.listings(),
        0,
        "refused before asking GitHub anything"
    );

    let ghost = token(&app, "ws-c", "").await;
    assert_eq!(ghost.status, StatusCode::NOT_FOUND, "{:?}", ghost.body);
    assert_eq!(
        ghost.body["error"],
        "the GitHub App is not installed on account ghost"
    );
    let listed = github.listings();
    assert!(listed >= 1);
    // A miss lists again only after RELIST_AFTER_MISS.
    assert_eq!(token(&app, "ws-c", "").await.status, StatusCode::NOT_FOUND);
    assert_eq!(github.listings(), listed);
    assert_eq!(
        github.calls(),
        0,
        "no mint for an owner without installation"
    );
}
