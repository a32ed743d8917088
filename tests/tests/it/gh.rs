//! Real gh (Debian's `gh` package) with the daemon's token, through
//! `credd exec` and through the workspace's gh wrapper.
//!
//! gh is pointed at a loopback stand-in of GitHub's API with
//! `GH_HOST=github.localhost` (gh then speaks plain http to
//! `api.github.localhost`) and `HTTP_PROXY=http://127.0.0.1:PORT`: the
//! stand-in is that proxy and records the `Authorization` header of every
//! request.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use testkit::http::HttpServer;
use testkit::{
    Cmd, CmdOutput, FAST_BACKOFF, Sandbox, TestPlatform, wait_until_time, with_platform,
};

/// A stale token a workspace might have inherited in its environment.
const STALE: &str = "ghs_staleInheritedToken0123456789abcdefXY";

/// The GitHub API stand-in, as gh's HTTP proxy.
struct GitHubApi {
    server: HttpServer,
    authorizations: Arc<Mutex<Vec<String>>>,
}

impl GitHubApi {
    fn start() -> Self {
        let authorizations = Arc::new(Mutex::new(Vec::new()));
        let record = |seen: Arc<Mutex<Vec<String>>>| {
            move |headers: HeaderMap| {
                let seen = Arc::clone(&seen);
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    testkit::lock(&seen).push(auth);
                }
            }
        };
        let user = {
            let record = record(Arc::clone(&authorizations));
            move |headers: HeaderMap| async move {
                record(headers).await;
                axum::Json(serde_json::json!({"login": "agent", "id": 1}))
            }
        };
        let graphql = {
            let record = record(Arc::clone(&authorizations));
            move |headers: HeaderMap| async move {
                record(headers).await;
                axum::Json(serde_json::json!({"data": {"viewer": {"login": "agent"}}}))
            }
        };
        let app = Router::new()
            .route("/user", get(user))
            .route("/graphql", post(graphql.clone()))
            .route("/api/graphql", post(graphql));
        Self {
            server: HttpServer::start(app),
            authorizations,
        }
    }

    /// The `Authorization` header of the last request.
    fn last_authorization(&self) -> String {
        testkit::lock(&self.authorizations)
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

fn real_gh() -> PathBuf {
    let gh = PathBuf::from("/usr/bin/gh");
    assert!(
        gh.is_file(),
        "{} is missing: these tests run Debian's gh (scripts/test.sh installs it)",
        gh.display()
    );
    gh
}

/// `program ARGS` with gh pointed at `api`, a stale token inherited.
fn with_gh_env<'a>(
    sandbox: &'a Sandbox,
    api: &GitHubApi,
    program: &Path,
    args: &[&str],
) -> Cmd<'a> {
    let mut command = sandbox.command(program);
    command
        .args(args)
        .env("GH_HOST", "github.localhost")
        .env("HTTP_PROXY", api.server.url())
        .env("GH_CONFIG_DIR", sandbox.path().join("gh-config"))
        .env("GH_NO_UPDATE_NOTIFIER", "1")
        .env("GH_TOKEN", STALE)
        .env("GITHUB_TOKEN", STALE);
    Cmd::new(command, format!("{} {}", program.display(), args.join(" ")))
        .transcript(sandbox.transcript())
}

fn gh_api_user(sandbox: &Sandbox, api: &GitHubApi) -> CmdOutput {
    let credd = testkit::bin::credd();
    let gh = real_gh();
    let run = with_gh_env(
        sandbox,
        api,
        &credd,
        &["exec", "--", gh.to_str().expect("UTF-8"), "api", "/user"],
    )
    .run();
    run.assert_success("credd exec -- gh api /user");
    assert!(run.stdout.contains("\"login\""), "{}", run.stdout);
    run
}

#[test]
fn credd_exec_gives_gh_the_live_token_and_the_next_one_after_rotation() {
    let (sandbox, platform) = with_platform(TestPlatform::with_ttl(Duration::from_secs(6)));
    sandbox.add_secret("stale token", STALE);
    let daemon = sandbox
        .daemon()
        .args(FAST_BACKOFF)
        .args(["--refresh-margin", "3s", "--min-lifetime", "1s"])
        .start();
    let api = GitHubApi::start();

    gh_api_user(&sandbox, &api);
    let first = platform.last_issued().expect("issued");
    assert_eq!(
        api.last_authorization(),
        format!("token {first}"),
        "gh sent the daemon's token, never the inherited stale one"
    );

    let expiry = platform
        .issued()
        .iter()
        .find(|t| t.token == first)
        .expect("issued")
        .expires_at;
    wait_until_time(expiry + Duration::from_millis(200));
    gh_api_user(&sandbox, &api);
    let current = platform.last_issued().expect("issued");
    assert_ne!(current, first, "the token rotated");
    assert_eq!(
        api.last_authorization(),
        format!("token {current}"),
        "the next gh call sends the new token, with no restart"
    );

    let gh = real_gh();
    let status = with_gh_env(
        &sandbox,
        &api,
        &testkit::bin::credd(),
        &[
            "exec",
            "--",
            gh.to_str().expect("UTF-8"),
            "auth",
            "status",
            "--hostname",
            "github.localhost",
        ],
    )
    .run();
    let said = format!("{}{}", status.stdout, status.stderr);
    assert!(
        said.contains("github.localhost") && said.contains("GH_TOKEN"),
        "gh auth status reports the token from the environment:\n{said}"
    );
    daemon.stop();
}

#[test]
fn the_workspace_gh_wrapper_runs_gh_with_the_live_token() {
    let (sandbox, platform) = with_platform(TestPlatform::start());
    sandbox.add_secret("stale token", STALE);
    let daemon = sandbox.daemon().args(FAST_BACKOFF).start();
    let api = GitHubApi::start();
    let wrapper = testkit::bin::workspace_root().join("workspace-template/bin/gh");
    let credd_dir = testkit::bin::credd();
    let credd_dir = credd_dir.parent().expect("target/debug");
    let mut run = with_gh_env(&sandbox, &api, &wrapper, &["api", "/user"]);
    // The wrapper finds the real gh on PATH after itself, and credd in
    // CREDD_BIN_DIR.
    run.command()
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", wrapper.parent().expect("bin").display()),
        )
        .env("CREDD_BIN_DIR", credd_dir);
    let run = run.run();
    run.assert_success("the gh wrapper");
    assert_eq!(
        api.last_authorization(),
        format!("token {}", platform.last_issued().expect("issued")),
        "the wrapper's gh sent the daemon's token"
    );
    daemon.stop();
}
