//! Sealed mode: the daemon's credential gateway stamps the token onto
//! GitHub requests, and its socket never hands a token out.
//!
//! Real processes throughout: the daemon with `--sealed --gateway`, real git
//! (clone, fetch, push) and real gh through it, curl for the attacks. Behind
//! the gateway, "github.com" is the test kit's `git http-backend` server and
//! "api.github.com" an API stand-in, both over TLS with certificates from a
//! CA made for the test (`--gateway-extra-ca`), reached through
//! `--gateway-upstream`; both check every request's token against what the
//! platform issued (current, and for git scoped to the repository) and
//! record what reached them, so "refused locally" means "nothing arrived".

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use testkit::http::HttpServer;
use testkit::{
    Cmd, CmdOutput, Daemon, FAST_BACKOFF, GitServer, Sandbox, TestCa, TestPlatform, TokenAuthority,
    WAIT,
};

const GRANTS: &str = r#"
[workspace.ws-credd-test]
repositories = ["acme/api", "acme/web", "labs/*"]
permissions = { contents = "write" }
"#;

/// What gh and the tools get instead of a token.
const PLACEHOLDER: &str = "sealed-by-molecule-credd";

/// A platform with [`GRANTS`], a sandbox using it as the granted workspace
/// with `github.com` as its host.
fn granted_platform() -> (Sandbox, TestPlatform) {
    let (sandbox, platform) = testkit::granted_platform(GRANTS);
    sandbox.set_hosts("github.com");
    (sandbox, platform)
}

/// One request as the API stand-in saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    /// Every `Authorization` value it carried.
    authorizations: Vec<String>,
}

/// GitHub's API on "api.github.com" over TLS: `/`, `/user`, `/graphql`,
/// `/repos/...` answer 200 to a current token (`Authorization: token …`),
/// 401 otherwise; `/redirect-away` answers a redirect to another host.
struct ApiStandIn {
    server: HttpServer,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl ApiStandIn {
    fn start(ca: &TestCa, authority: TokenAuthority) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let app = Router::new().fallback(move |request: Request| {
            let record = Arc::clone(&record);
            let authority = authority.clone();
            async move { api_answer(&request, &record, &authority) }
        });
        Self {
            server: HttpServer::start_tls(app, ca.server_config(&["api.github.com"])),
            seen,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        testkit::lock(&self.seen).clone()
    }
}

fn api_answer(
    request: &Request,
    record: &Mutex<Vec<Seen>>,
    authority: &TokenAuthority,
) -> Response {
    let authorizations: Vec<String> = request
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .collect();
    let path = request.uri().path().to_owned();
    testkit::lock(record).push(Seen {
        method: request.method().to_string(),
        path: path.clone(),
        authorizations: authorizations.clone(),
    });
    if path == "/redirect-away" {
        return (
            StatusCode::FOUND,
            [(header::LOCATION, "https://evil.example/steal")],
        )
            .into_response();
    }
    let current = match authorizations.as_slice() {
        [one] => one
            .strip_prefix("token ")
            .is_some_and(|t| authority.is_current(t)),
        _ => false,
    };
    if !current {
        return (StatusCode::UNAUTHORIZED, "Bad credentials").into_response();
    }
    let body = if path == "/graphql" {
        serde_json::json!({"data": {"viewer": {"login": "agent"}}})
    } else {
        serde_json::json!({"login": "agent", "id": 1, "path": path})
    };
    // An installation token has no OAuth scopes: GitHub sends no
    // X-OAuth-Scopes header for it.
    axum::Json(body).into_response()
}

/// The sealed daemon with its gateway, and where the tools find it.
struct SealedWorkspace {
    daemon: Daemon,
    gateway: SocketAddr,
    ca_file: PathBuf,
}

impl SealedWorkspace {
    fn start(
        sandbox: &Sandbox,
        test_ca: &TestCa,
        git: Option<&GitServer>,
        api: Option<&ApiStandIn>,
    ) -> Self {
        let test_ca_file = sandbox.path().join("test-ca.pem");
        test_ca.write_pem(&test_ca_file);
        let ca_file = sandbox.path().join("gateway-ca.pem");
        let mut args: Vec<String> = FAST_BACKOFF.iter().map(|s| (*s).to_owned()).collect();
        args.extend([
            "--sealed".into(),
            "--gateway".into(),
            "127.0.0.1:0".into(),
            "--gateway-ca-file".into(),
            ca_file.display().to_string(),
            "--gateway-extra-ca".into(),
            test_ca_file.display().to_string(),
        ]);
        if let Some(git) = git {
            args.extend([
                "--gateway-upstream".into(),
                format!("github.com={}", git.addr()),
            ]);
        }
        if let Some(api) = api {
            args.extend([
                "--gateway-upstream".into(),
                format!("api.github.com={}", api.server.addr()),
            ]);
        }
        let daemon = sandbox.daemon().args(&args).start();
        let line = daemon.log().wait_for_line("gateway listening on", WAIT);
        let gateway = line
            .split("gateway listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no gateway address in {line:?}"));
        Self {
            daemon,
            gateway,
            ca_file,
        }
    }

    fn proxy(&self) -> String {
        format!("http://{}", self.gateway)
    }

    /// git configured as the entrypoint does: per-URL proxy and CA for
    /// `https://github.com/`, no credential helper.
    fn configure_git(&self, sandbox: &Sandbox) {
        let config = format!(
            "[user]\n\tname = Credd Test\n\temail = test@example.invalid\n\
             [init]\n\tdefaultBranch = main\n\
             [http \"https://github.com/\"]\n\tproxy = {}\n\tsslCAInfo = {}\n",
            self.proxy(),
            self.ca_file.display()
        );
        testkit::write_file(&sandbox.home().join(".gitconfig"), config, 0o644);
    }

    /// `curl ARGS` through the gateway, trusting its CA; stdout is the body
    /// then the status code on a line of its own.
    fn curl<'a>(&self, sandbox: &'a Sandbox, args: &[&str]) -> Cmd<'a> {
        let mut command = sandbox.command("curl");
        command
            .args([
                "-sS",
                "--max-time",
                "20",
                "--proxy",
                &self.proxy(),
                "--cacert",
            ])
            .arg(&self.ca_file)
            .args(["-w", "\n%{http_code}\n"])
            .args(args);
        Cmd::new(command, format!("curl {}", args.join(" "))).transcript(sandbox.transcript())
    }

    fn audit_lines(&self) -> Vec<String> {
        self.daemon
            .log()
            .text()
            .lines()
            .filter(|l| l.contains("gateway request"))
            .map(str::to_owned)
            .collect()
    }
}

/// The status code curl printed last.
fn http_code(out: &CmdOutput) -> String {
    out.stdout.lines().last().unwrap_or("").to_owned()
}

fn clone_commit_push(sandbox: &Sandbox, git: &str, url: &str, dir: &Path) {
    let work = dir.parent().expect("parent");
    std::fs::create_dir_all(work).expect("work dir");
    let name = dir.file_name().and_then(|n| n.to_str()).expect("name");
    sandbox
        .git_binary(git, work, &["clone", url, name])
        .run()
        .assert_success("git clone through the gateway");
    std::fs::write(dir.join("README"), format!("hello from {git}\n")).expect("write");
    for args in [&["add", "README"][..], &["commit", "-q", "-m", "first"]] {
        sandbox
            .git_binary(git, dir, args)
            .run()
            .assert_success("commit");
    }
    sandbox
        .git_binary(git, dir, &["push", "origin", "HEAD:main"])
        .run()
        .assert_success("git push through the gateway");
    sandbox
        .git_binary(git, dir, &["fetch", "origin"])
        .run()
        .assert_success("git fetch through the gateway");
}

#[test]
fn git_clones_fetches_and_pushes_through_the_gateway_with_each_owners_token() {
    let (sandbox, platform) = granted_platform();
    let ca = TestCa::new();
    let server = GitServer::start_tls(
        &sandbox.path().join("repos"),
        platform.authority(),
        ca.server_config(&["github.com"]),
    );
    server.create_repo("acme/api");
    server.create_repo("labs/tool");
    let sealed = SealedWorkspace::start(&sandbox, &ca, Some(&server), None);
    sealed.configure_git(&sandbox);

    let work = sandbox.path().join("work");
    clone_commit_push(
        &sandbox,
        "/usr/local/bin/git",
        "https://github.com/acme/api.git",
        &work.join("api"),
    );
    clone_commit_push(
        &sandbox,
        "/usr/bin/git",
        "https://github.com/labs/tool",
        &work.join("tool"),
    );

    // Every request carried a current token scoped to its repository (the
    // server checks both): none was anonymous, none refused.
    assert_eq!(
        server.unauthorized(),
        0,
        "requests: {:?}",
        server.requests()
    );
    let issued = platform.issued();
    let token_of = |owner: &str| {
        issued
            .iter()
            .find(|t| t.owner.as_deref() == Some(owner))
            .unwrap_or_else(|| panic!("a token for {owner}: {issued:?}"))
            .token
            .clone()
    };
    let mut accepted = server.accepted_tokens();
    accepted.sort();
    let mut expected = vec![token_of("acme"), token_of("labs")];
    expected.sort();
    assert_eq!(accepted, expected, "each owner's own token, nothing else");
    assert_eq!(platform.mints().len(), 2, "one mint per owner");

    // One audit line per request, with the repository, status and bytes.
    let audit = sealed.audit_lines();
    assert_eq!(audit.len(), server.requests().len(), "{audit:#?}");
    assert!(
        audit.iter().any(|l| l.contains("method=POST")
            && l.contains("host=github.com")
            && l.contains("repository=acme/api")
            && l.contains("status=200")
            && l.contains("uid=0")),
        "{audit:#?}"
    );
    // The agent's side never held a token: git's own trace of a fetch
    // shows no Authorization header (the gateway added it after git).
    let trace = sandbox.git(&work.join("api"), &["fetch", "origin"]).run();
    trace.assert_success("fetch");
    let mut traced = sandbox.git(&work.join("api"), &["fetch", "origin"]);
    traced.command().env("GIT_TRACE_CURL", "1");
    let traced = traced.run();
    traced.assert_success("traced fetch");
    assert!(
        traced.stderr.contains("CONNECT github.com:443"),
        "{}",
        traced.stderr
    );
    assert!(
        !traced
            .stderr
            .to_ascii_lowercase()
            .contains("authorization:"),
        "git sent no credential:\n{}",
        traced.stderr
    );
    sealed.daemon.stop();
}

#[test]
fn a_repository_outside_the_grant_is_refused_without_contacting_github() {
    let (sandbox, platform) = granted_platform();
    let ca = TestCa::new();
    let server = GitServer::start_tls(
        &sandbox.path().join("repos"),
        platform.authority(),
        ca.server_config(&["github.com"]),
    );
    server.create_repo("evil/x");
    server.create_repo("acme/secret");
    let sealed = SealedWorkspace::start(&sandbox, &ca, Some(&server), None);
    sealed.configure_git(&sandbox);

    for url in [
        "https://github.com/evil/x.git",
        "https://github.com/acme/secret.git",
    ] {
        let clone = sandbox.git(sandbox.path(), &["clone", url, "x"]).run();
        assert!(!clone.status.success(), "{url} must not clone");
        assert!(clone.stderr.contains("403"), "{}", clone.stderr);
    }
    let out = sealed
        .curl(
            &sandbox,
            &["https://github.com/evil/x.git/info/refs?service=git-upload-pack"],
        )
        .run();
    assert_eq!(http_code(&out), "403");
    assert!(
        out.stdout.contains("outside this workspace's grant"),
        "{}",
        out.stdout
    );
    assert!(
        server.requests().is_empty(),
        "nothing reached GitHub: {:?}",
        server.requests()
    );
    assert!(
        platform
            .issued()
            .iter()
            .all(|t| t.owner.as_deref() != Some("evil")),
        "no token for evil was minted"
    );
    sealed.daemon.stop();
}

#[test]
fn a_token_revoked_on_github_is_replaced_after_one_401() {
    let (sandbox, platform) = granted_platform();
    let ca = TestCa::new();
    let server = GitServer::start_tls(
        &sandbox.path().join("repos"),
        platform.authority(),
        ca.server_config(&["github.com"]),
    );
    server.create_repo("acme/api");
    let sealed = SealedWorkspace::start(&sandbox, &ca, Some(&server), None);
    sealed.configure_git(&sandbox);
    let work = sandbox.path().join("work");
    clone_commit_push(
        &sandbox,
        "git",
        "https://github.com/acme/api.git",
        &work.join("api"),
    );
    let first = server.accepted_tokens();
    assert_eq!(first.len(), 1);
    platform.authority().revoke(&first[0]);

    sandbox
        .git(&work.join("api"), &["fetch", "origin"])
        .run()
        .assert_success("the fetch after the revocation succeeds at once");
    assert_eq!(server.rejected_credentials(), 1, "exactly one 401");
    let accepted = server.accepted_tokens();
    assert_eq!(accepted.len(), 2, "a fresh token was used");
    assert_ne!(accepted[1], first[0]);
    assert_eq!(platform.refusal_reports(), 1, "the refusal was reported");
    assert!(
        sealed
            .daemon
            .log()
            .text()
            .contains("GitHub refused a token (401)")
    );
    sealed.daemon.stop();
}

fn gh(sandbox: &Sandbox, sealed: &SealedWorkspace, args: &[&str]) -> CmdOutput {
    let mut command = sandbox.command("/usr/bin/gh");
    command
        .args(args)
        .env("HTTPS_PROXY", sealed.proxy())
        .env("SSL_CERT_FILE", &sealed.ca_file)
        .env("GH_TOKEN", PLACEHOLDER)
        .env("GH_CONFIG_DIR", sandbox.path().join("gh-config"))
        .env("GH_NO_UPDATE_NOTIFIER", "1")
        .env("GH_PROMPT_DISABLED", "1");
    Cmd::new(command, format!("gh {}", args.join(" ")))
        .transcript(sandbox.transcript())
        .run()
}

#[test]
fn gh_api_and_auth_status_work_through_the_gateway_with_a_placeholder_token() {
    let (sandbox, platform) = granted_platform();
    let ca = TestCa::new();
    let api = ApiStandIn::start(&ca, platform.authority());
    let sealed = SealedWorkspace::start(&sandbox, &ca, None, Some(&api));

    let user = gh(&sandbox, &sealed, &["api", "/user"]);
    user.assert_success("gh api /user");
    assert!(user.stdout.contains("\"login\""), "{}", user.stdout);
    let repo = gh(&sandbox, &sealed, &["api", "/repos/acme/api"]);
    repo.assert_success("gh api /repos/acme/api");
    let status = gh(&sandbox, &sealed, &["auth", "status"]);
    let said = format!("{}{}", status.stdout, status.stderr);
    status.assert_success("gh auth status");
    assert!(
        said.contains("github.com") && said.contains("agent"),
        "{said}"
    );

    let seen = api.seen();
    assert!(seen.len() >= 3, "{seen:?}");
    let acme = platform
        .issued()
        .into_iter()
        .find(|t| t.owner.as_deref() == Some("acme"))
        .expect("an acme token");
    for request in &seen {
        assert!(
            ["GET", "POST"].contains(&request.method.as_str()),
            "{request:?}"
        );
        assert_eq!(request.authorizations.len(), 1, "{request:?}");
        assert!(
            !request.authorizations[0].contains(PLACEHOLDER),
            "the placeholder never reaches GitHub"
        );
        if request.path.starts_with("/repos/acme/") {
            assert_eq!(request.authorizations[0], format!("token {}", acme.token));
        }
    }
    sealed.daemon.stop();
}

/// The gateway and an API stand-in, for the attacks.
fn attack_setup() -> (Sandbox, TestPlatform, ApiStandIn, SealedWorkspace) {
    let (sandbox, platform) = granted_platform();
    let ca = TestCa::new();
    let api = ApiStandIn::start(&ca, platform.authority());
    let sealed = SealedWorkspace::start(&sandbox, &ca, None, Some(&api));
    (sandbox, platform, api, sealed)
}

#[test]
fn delete_installation_token_is_refused() {
    let (sandbox, _platform, api, sealed) = attack_setup();
    for path in [
        "/installation/token",
        "/app/installations/1/access_tokens",
        "/credentials/revoke",
    ] {
        let out = sealed
            .curl(
                &sandbox,
                &["-X", "DELETE", &format!("https://api.github.com{path}")],
            )
            .run();
        assert_eq!(http_code(&out), "403", "{path}: {}", out.stdout);
        assert!(out.stdout.contains("manages tokens"), "{}", out.stdout);
    }
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    sealed.daemon.stop();
}

#[test]
fn a_connect_to_another_host_is_refused() {
    let (sandbox, _platform, api, sealed) = attack_setup();
    for url in [
        "https://evil.example/",
        "https://api.github.com.evil.example/",
        "https://127.0.0.1:1/",
    ] {
        let out = sealed.curl(&sandbox, &[url]).run();
        assert!(!out.status.success(), "{url}");
        assert!(out.stderr.contains("403"), "{url}: {}", out.stderr);
    }
    assert!(api.seen().is_empty());
    assert!(
        sealed
            .daemon
            .log()
            .text()
            .contains("not a GitHub host this gateway serves")
    );
    sealed.daemon.stop();
}

#[test]
fn absolute_form_requests_for_another_host_are_refused() {
    let (sandbox, _platform, api, sealed) = attack_setup();
    // Plain absolute-form to the proxy (no tunnel): any host, GitHub's too.
    for url in ["http://evil.example/x", "http://api.github.com/user"] {
        let out = sealed.curl(&sandbox, &[url]).run();
        assert_eq!(http_code(&out), "403", "{url}: {}", out.stdout);
    }
    // Inside a tunnel to api.github.com, a request line naming another host.
    let out = sealed
        .curl(
            &sandbox,
            &[
                "--request-target",
                "https://evil.example/user",
                "https://api.github.com/user",
            ],
        )
        .run();
    assert_eq!(http_code(&out), "403", "{}", out.stdout);
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    sealed.daemon.stop();
}

#[test]
fn a_host_header_naming_another_host_is_refused() {
    let (sandbox, _platform, api, sealed) = attack_setup();
    for host in ["Host: evil.example", "Host: github.com"] {
        let out = sealed
            .curl(&sandbox, &["-H", host, "https://api.github.com/user"])
            .run();
        assert_eq!(http_code(&out), "403", "{host}: {}", out.stdout);
    }
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    sealed.daemon.stop();
}

#[test]
fn credentials_the_client_sends_are_dropped_and_only_the_stamp_goes_upstream() {
    let (sandbox, platform, api, sealed) = attack_setup();
    let out = sealed
        .curl(
            &sandbox,
            &[
                "-H",
                "Authorization: token ghs_attackerOwnToken",
                "-H",
                "authorization: Basic eC1hY2Nlc3MtdG9rZW46YXR0YWNrZXI=",
                "-H",
                "AUTHORIZATION:   token second",
                "-H",
                "Proxy-Authorization: Basic Zm9vOmJhcg==",
                "-H",
                "Cookie: user_session=stolen",
                "-H",
                "Connection: keep-alive, X-Hop",
                "-H",
                "X-Hop: 1",
                "--proxy-user",
                "agent:guess",
                "https://api.github.com/repos/acme/api",
            ],
        )
        .run();
    assert_eq!(http_code(&out), "200", "{}", out.stdout);
    let seen = api.seen();
    assert_eq!(seen.len(), 1);
    let acme = platform
        .issued()
        .into_iter()
        .find(|t| t.owner.as_deref() == Some("acme"))
        .expect("an acme token");
    assert_eq!(seen[0].authorizations, [format!("token {}", acme.token)]);
    sealed.daemon.stop();
}

#[test]
fn request_line_tricks_are_refused() {
    let (sandbox, _platform, api, sealed) = attack_setup();
    for path in [
        "/repos/acme/api/../../evil/x",
        "/repos/acme/api/%2e%2e/%2e%2e/evil/x",
        "/repos/acme%2fapi/../evil",
        "/repos//evil/x",
        "/repos/acme/api/./x",
    ] {
        let out = sealed
            .curl(
                &sandbox,
                &["--path-as-is", &format!("https://api.github.com{path}")],
            )
            .run();
        assert_eq!(http_code(&out), "400", "{path}: {}", out.stdout);
    }
    // Bytes a request line may not hold never reach GitHub either.
    let out = sealed
        .curl(
            &sandbox,
            &[
                "--request-target",
                "/repos/acme/api\tHTTP/1.1",
                "https://api.github.com/",
            ],
        )
        .run();
    assert_ne!(http_code(&out), "200", "{}", out.stdout);
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    sealed.daemon.stop();
}

#[test]
fn a_redirect_to_another_host_is_not_followed() {
    let (sandbox, _platform, api, sealed) = attack_setup();
    // Not followed by the gateway: the 302 comes back as it is.
    let out = sealed
        .curl(&sandbox, &["https://api.github.com/redirect-away"])
        .run();
    assert_eq!(http_code(&out), "302", "{}", out.stdout);
    // A client that follows it meets the gateway's rules again: refused.
    let out = sealed
        .curl(&sandbox, &["-L", "https://api.github.com/redirect-away"])
        .run();
    assert!(!out.status.success());
    assert!(out.stderr.contains("403"), "{}", out.stderr);
    assert_eq!(
        api.seen().len(),
        2,
        "one request each, no follow-up: {:?}",
        api.seen()
    );
    sealed.daemon.stop();
}

#[test]
fn a_caller_of_another_uid_gets_nothing() {
    let (sandbox, _platform, api, sealed) = attack_setup();
    let mut curl = sealed.curl(&sandbox, &["https://api.github.com/user"]);
    std::os::unix::process::CommandExt::uid(curl.command(), 65534);
    let out = curl.run();
    assert!(!out.status.success(), "{}", out.stdout);
    assert!(api.seen().is_empty());
    assert!(
        sealed
            .daemon
            .log()
            .text()
            .contains("refused a caller whose uid may not use it")
    );
    sealed.daemon.stop();
}

#[test]
fn the_sealed_socket_serves_status_and_refuses_every_token_request() {
    let (sandbox, _platform, _api, sealed) = attack_setup();
    for args in [
        &["token"][..],
        &["token", "--repo", "acme/api"],
        &["exec", "--", "/bin/true"],
    ] {
        let out = sandbox.credd(args).run();
        assert!(!out.status.success(), "credd {args:?}: {out:?}");
        assert!(out.stdout.is_empty());
        let lines = out.stderr_lines();
        assert_eq!(lines.len(), 1, "one line: {lines:?}");
        assert!(lines[0].contains("is sealed"), "{lines:?}");
    }
    let get = sandbox.credd_get("https", "github.com");
    assert!(get.stdout.is_empty(), "git gets nothing: {get:?}");
    assert!(get.stderr.contains("is sealed"), "{}", get.stderr);
    sandbox
        .credd(&["status"])
        .run()
        .assert_success("credd status");
    let metrics = sandbox.credd(&["metrics"]).run();
    metrics.assert_success("credd metrics");
    assert!(
        metrics
            .stdout
            .contains("credd_requests_total{answer=\"sealed\"} 4"),
        "{}",
        metrics.stdout
    );
    sealed.daemon.stop();
}

/// `VmRSS` or `VmHWM` of `pid`, in KiB.
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in {status}"))
}

#[test]
fn a_200_mb_push_streams_through_the_gateway() {
    let (sandbox, platform) = granted_platform();
    let ca = TestCa::new();
    let server = GitServer::start_tls(
        &sandbox.path().join("repos"),
        platform.authority(),
        ca.server_config(&["github.com"]),
    );
    server.create_repo("acme/api");
    let sealed = SealedWorkspace::start(&sandbox, &ca, Some(&server), None);
    sealed.configure_git(&sandbox);
    let dir = sandbox.path().join("work").join("api");
    // Warm up: TLS, the token, the pools.
    clone_commit_push(&sandbox, "git", "https://github.com/acme/api.git", &dir);
    let pid = sealed.daemon.pid();
    let idle = memory_kib(pid, "VmRSS:");
    let peak_before = memory_kib(pid, "VmHWM:");

    // 200 MiB that does not compress, committed and pushed as one pack.
    let mut data = vec![0u8; 200 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(dir.join("big.bin"), &data).expect("write");
    drop(data);
    for args in [&["add", "big.bin"][..], &["commit", "-q", "-m", "big"]] {
        sandbox.git(&dir, args).run().assert_success("commit");
    }
    let mut push = sandbox.git(
        &dir,
        &["-c", "core.compression=0", "push", "origin", "HEAD:main"],
    );
    push.command().env("GIT_TRACE_PACKET", "0");
    push.timeout(std::time::Duration::from_secs(600))
        .run()
        .assert_success("the 200 MB push");
    let peak = memory_kib(pid, "VmHWM:");
    let after = memory_kib(pid, "VmRSS:");
    let sent: u64 = sealed
        .audit_lines()
        .iter()
        .filter(|l| l.contains("git-receive-pack") || l.contains("method=POST"))
        .filter_map(|l| {
            l.split("sent=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0);
    eprintln!(
        "gateway memory: idle VmRSS {idle} KiB, peak VmHWM {peak} KiB (before the push {peak_before} KiB), after {after} KiB; largest request body {sent} bytes"
    );
    assert!(
        sent > 200 << 20,
        "the pack went through the gateway: {sent}"
    );
    assert!(
        peak.saturating_sub(idle) < 16 * 1024,
        "the gateway streamed: peak {peak} KiB vs idle {idle} KiB"
    );
    sealed.daemon.stop();
}

/// Figures for docs/benchmarks.md, not a check (timings are not asserted): the
/// gateway's added latency per API call and per git request. Run with
/// `cargo test -p credd-tests --test it sealed_latency -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: prints figures"]
fn sealed_latency_figures() {
    const CALLS: usize = 200;
    const GITS: usize = 20;
    let (sandbox, platform) = granted_platform();
    let ca = TestCa::new();
    let api = ApiStandIn::start(&ca, platform.authority());
    let server = GitServer::start_tls(
        &sandbox.path().join("repos"),
        platform.authority(),
        ca.server_config(&["github.com"]),
    );
    server.create_repo("acme/api");
    let sealed = SealedWorkspace::start(&sandbox, &ca, Some(&server), Some(&api));
    sealed.configure_git(&sandbox);
    let test_ca = sandbox.path().join("test-ca.pem");
    let urls: Vec<String> = (0..CALLS)
        .map(|_| "https://api.github.com/repos/acme/api".to_owned())
        .collect();
    let mean_ms = |out: &CmdOutput| {
        let times: Vec<f64> = out
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix("t="))
            .filter_map(|t| t.parse().ok())
            .collect();
        assert_eq!(times.len(), CALLS, "{}", out.stdout);
        // The first call opens the tunnel and the upstream connection.
        times[1..].iter().sum::<f64>() / (times.len() - 1) as f64 * 1000.0
    };
    // Through the gateway: one curl, one tunnel, CALLS requests.
    let mut command = sandbox.command("curl");
    command
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "--proxy",
            &sealed.proxy(),
            "--cacert",
        ])
        .arg(&sealed.ca_file)
        .args(["-w", "\nt=%{time_total}\n"])
        .args(&urls);
    let through = Cmd::new(command, "curl through the gateway").run();
    through.assert_success("curl");
    // Direct, with the same token in a header file.
    gh(&sandbox, &sealed, &["api", "/repos/acme/api"]).assert_success("gh");
    let acme = platform
        .issued()
        .into_iter()
        .find(|t| t.owner.as_deref() == Some("acme"))
        .expect("acme token");
    let header_file = sandbox.path().join("auth-header");
    testkit::write_file(
        &header_file,
        format!("Authorization: token {}\n", acme.token),
        0o600,
    );
    let mut command = sandbox.command("curl");
    command
        .args(["-sS", "-o", "/dev/null", "--cacert"])
        .arg(&test_ca)
        .arg("--connect-to")
        .arg(format!(
            "api.github.com:443:127.0.0.1:{}",
            api.server.addr().port()
        ))
        .arg("-H")
        .arg(format!("@{}", header_file.display()))
        .args(["-w", "\nt=%{time_total}\n"])
        .args(&urls);
    let direct = Cmd::new(command, "curl direct").run();
    direct.assert_success("curl direct");

    let dir = sandbox.path().join("work").join("api");
    clone_commit_push(&sandbox, "git", "https://github.com/acme/api.git", &dir);
    let time_git = |config: &[&str], url: &str| {
        let start = std::time::Instant::now();
        for _ in 0..GITS {
            let mut args: Vec<&str> = config.to_vec();
            args.extend(["ls-remote", url]);
            sandbox.git(&dir, &args).run().assert_success("ls-remote");
        }
        start.elapsed().as_secs_f64() * 1000.0 / GITS as f64
    };
    let via = time_git(&[], "https://github.com/acme/api.git");
    let basic = format!(
        "http.extraHeader=Authorization: Basic {}",
        base64_of(&format!("x-access-token:{}", acme.token))
    );
    let port = server.addr().port();
    let resolve = format!("http.curloptResolve=github.com:{port}:127.0.0.1");
    let cainfo = format!("http.sslCAInfo={}", test_ca.display());
    let direct_git = time_git(
        &[
            "-c",
            &resolve,
            "-c",
            &cainfo,
            "-c",
            &basic,
            "-c",
            "http.https://github.com/.proxy=",
        ],
        &format!("https://github.com:{port}/acme/api.git"),
    );
    eprintln!(
        "API call (keep-alive, mean of {}): direct {:.3} ms, through the gateway {:.3} ms\n\
         git ls-remote (a new process and TLS connection each, mean of {GITS}): direct {direct_git:.1} ms, through the gateway {via:.1} ms",
        CALLS - 1,
        mean_ms(&direct),
        mean_ms(&through)
    );
    sealed.daemon.stop();
}

fn base64_of(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = text.as_bytes();
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63])
            } else {
                '='
            });
        }
    }
    out
}
