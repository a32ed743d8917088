//! The whole chain against a GitHub that speaks GitHub's documented shapes:
//! the GitHub stand-in (checked against GitHub's API description; a request
//! the description refuses or one made during a rate limit fails the test
//! when it is dropped), the real `molecule-platform` binary in GitHub mode
//! with a grants file, the real daemon, `credd` and git.
//!
//! What each GitHub answer becomes for the workspace: a token of either
//! format through `git credential fill` and `credd exec`; an Enterprise Managed User's owner;
//! GitHub's 422 and 403 as `not_granted`; an installation that is not there
//! (or goes away) as `not_configured`; a rate limit as a wait honouring the
//! platform's `Retry-After`, with no request to GitHub before it ends.

use credd_core::protocol::{PlatformHealth, Request, Response, TokenStatus};
use testkit::github_stand_in::{
    Account, GitHubStandIn, Installation, RateLimit, TokenFormat, default_permissions,
};
use testkit::{Daemon, FAST_BACKOFF, PlatformProcess, Sandbox, sha256_hex};

const WORKSPACE: &str = "ws-github";
const BEARER: &str = "bearer-of-the-github-workspace-0123456789";

/// One test's world. Field order is drop order: the daemon, then the
/// platform, then the stand-in (which checks what it saw), then the sandbox
/// (which scans every output).
struct World {
    daemon: Option<Daemon>,
    platform: PlatformProcess,
    github: GitHubStandIn,
    sandbox: Sandbox,
    _dir: tempfile::TempDir,
}

impl World {
    /// The stand-in (set up by `setup`), the platform with `grants` for
    /// [`WORKSPACE`], and a sandbox using it; no daemon yet.
    fn new(grants: &str, setup: impl FnOnce(&GitHubStandIn)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let public = testkit::github_stand_in::keys::generate(dir.path()).expect("the App's keys");
        let key = dir.path().join("app.pem");
        let github = GitHubStandIn::start(&public);
        setup(&github);
        let tokens = dir.path().join("workspace-tokens");
        std::fs::write(&tokens, format!("{WORKSPACE} {}\n", sha256_hex(BEARER))).expect("write");
        let grants_file = dir.path().join("grants.toml");
        std::fs::write(&grants_file, format!("[workspace.{WORKSPACE}]\n{grants}")).expect("write");
        let platform = PlatformProcess::spawn(
            &["--listen", "127.0.0.1:0"],
            &[
                ("GITHUB_APP_ID", testkit::github_stand_in::APP_ID),
                ("GITHUB_APP_INSTALLATION_ID", "777"),
                ("GITHUB_APP_PRIVATE_KEY_FILE", key.to_str().expect("utf-8")),
                ("GITHUB_API_URL", github.url()),
                (
                    "PLATFORM_WORKSPACE_TOKENS_FILE",
                    tokens.to_str().expect("utf-8"),
                ),
                ("PLATFORM_GRANTS_FILE", grants_file.to_str().expect("utf-8")),
            ],
        );
        let sandbox = Sandbox::new();
        sandbox.use_workspace(platform.url(), WORKSPACE, BEARER);
        Self {
            daemon: None,
            platform,
            github,
            sandbox,
            _dir: dir,
        }
    }

    fn start_daemon(&mut self, args: &[&str]) {
        let mut builder = self.sandbox.daemon().args(args);
        if !builder.has_arg("--backoff-initial") {
            builder = builder.args(FAST_BACKOFF);
        }
        self.daemon = Some(builder.start());
    }

    /// The status of the daemon's token for `owner`.
    fn owner_status(&self, owner: &str) -> Option<TokenStatus> {
        let status = self.sandbox.status();
        std::iter::once(status.token)
            .chain(status.owners)
            .find(|t| t.scope.owner.as_deref() == Some(owner))
    }

    /// Waits until the daemon's token for `owner` shows `health`.
    fn wait_for_owner(&self, owner: &str, health: PlatformHealth) -> TokenStatus {
        self.sandbox
            .wait_for_status(&format!("{owner}: {health}"), |status| {
                std::iter::once(&status.token)
                    .chain(&status.owners)
                    .any(|t| t.scope.owner.as_deref() == Some(owner) && t.platform == health)
            });
        self.owner_status(owner).expect("the owner's token")
    }

    /// `credd metrics`, read.
    fn metrics(&self) -> testkit::prometheus::Samples {
        let out = self.sandbox.credd(&["metrics"]).run();
        out.assert_success("credd metrics");
        testkit::prometheus::Samples::parse(&out.stdout)
    }

    fn token_for(&self, owner: &str) -> testkit::CmdOutput {
        self.sandbox
            .credd(&["token", "--owner", owner])
            .stdout_holds_secret()
            .run()
    }

    fn stop(mut self) -> String {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop();
        }
        let stderr = self.platform.stderr();
        let secrets = testkit::Secrets::new();
        secrets.add("the workspace bearer", BEARER);
        for secret in self.github.secrets() {
            secrets.add("a token or JWT of the GitHub stand-in", secret.as_str());
            self.sandbox
                .add_secret("a token or JWT of the GitHub stand-in", &secret);
        }
        secrets.assert_clean("molecule-platform stderr", &stderr);
        stderr
    }
}

#[test]
fn a_token_of_each_format_reaches_git_credential_fill() {
    for format in [TokenFormat::Classic, TokenFormat::Stateless] {
        let mut world = World::new("repositories = [\"default-org/*\"]\n", |github| {
            github.set_token_format(format);
        });
        world.sandbox.configure_git("https://github.com", &[]);
        world.start_daemon(&[]);
        let fill = world.sandbox.credential_fill();
        fill.assert_success("git credential fill");
        let issued = world.github.issued();
        assert_eq!(issued.len(), 1, "{format:?}");
        let token = &issued[0].0;
        let password = fill
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("password="))
            .expect("a password line");
        testkit::assert_secret(Some(password), token, true, "git's password");
        // And `credd exec` hands it to a child whole.
        let exec = world
            .sandbox
            .credd(&["exec", "--", "printenv", "GH_TOKEN"])
            .stdout_holds_secret()
            .run();
        exec.assert_success("credd exec -- printenv GH_TOKEN");
        testkit::assert_secret(
            Some(exec.stdout.trim()),
            token,
            true,
            "credd exec's GH_TOKEN",
        );
        match format {
            TokenFormat::Classic => assert_eq!(token.len(), 40),
            TokenFormat::Stateless => {
                assert!(
                    token.starts_with("ghs_4242_") && token.len() > 520,
                    "{}",
                    token.len()
                );
            }
        }
        assert!(world.github.violations().is_empty());
        world.stop();
    }
}

#[test]
fn an_enterprise_managed_users_owner_works_end_to_end() {
    let mut world = World::new("repositories = [\"acme_corp/*\"]\n", |github| {
        github.install(Installation::organization("acme_corp", 1001));
    });
    world.start_daemon(&[]);
    let out = world.token_for("acme_corp");
    out.assert_success("credd token --owner acme_corp");
    let issued = world.github.issued();
    testkit::assert_secret(Some(out.stdout.trim()), &issued[0].0, true, "the token");
    assert_eq!(world.github.mints()[0].installation, 1001);
    let held = world.owner_status("acme_corp").expect("held");
    assert_eq!(held.platform, PlatformHealth::Ok);

    // And through git, asking for a repository as `credd configure-git`
    // sets it up (useHttpPath): the owner's token, from the same installation.
    world.sandbox.configure_git("https://github.com", &[]);
    let fill = world
        .sandbox
        .git(
            world.sandbox.path(),
            &["-c", "credential.useHttpPath=true", "credential", "fill"],
        )
        .stdin("protocol=https\nhost=github.com\npath=acme_corp/api.git\n\n")
        .stdout_holds_secret()
        .run();
    fill.assert_success("git credential fill for acme_corp/api.git");
    let password = fill
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("password="))
        .expect("a password line");
    assert!(
        world
            .github
            .issued()
            .iter()
            .any(|(token, ..)| token == password),
        "git's password is a token the stand-in issued"
    );
    assert!(
        world.github.mints().iter().all(|m| m.installation == 1001),
        "every mint was for acme_corp's installation"
    );
    world.stop();
}

/// The real binaries with GitHub's largest scoped answer and the
/// installations that broke every owner before: a grant of 500 repositories
/// with the longest names GitHub allows (about 5 KB of repository object
/// each in the mint answer), beside an enterprise installation, one without
/// an account and a managed user's. The daemon holds the token with all 500
/// in its scope; one listing, one mint, nothing GitHub's description refuses.
#[test]
fn a_grant_of_500_repositories_beside_enterprise_installations_is_served() {
    let owner = "o".repeat(39);
    let listed: Vec<String> = (0..500).map(|i| format!("\"{owner}/{i:r>100}\"")).collect();
    let grants = format!(
        "repositories = [{}]\npermissions = {{ contents = \"write\" }}\n",
        listed.join(", ")
    );
    let mut world = World::new(&grants, |github| {
        github.install(Installation::on(
            Account::Enterprise("octo-business".into()),
            1002,
        ));
        github.install(Installation::on(Account::Missing, 1003));
        github.install(Installation::on(Account::User("alice_acme".into()), 1004));
        github.install(Installation::organization(&owner, 1001));
    });
    world.start_daemon(&[]);
    let out = world.token_for(&owner);
    out.assert_success("credd token --owner (500 repositories)");
    let issued = world.github.issued();
    assert_eq!(issued.len(), 1);
    testkit::assert_secret(Some(out.stdout.trim()), &issued[0].0, true, "the token");
    let mints = world.github.mints();
    assert_eq!(mints.len(), 1);
    assert_eq!(mints[0].installation, 1001);
    assert_eq!(mints[0].repositories.as_ref().map(Vec::len), Some(500));
    let held = world.owner_status(&owner).expect("held");
    assert_eq!(held.platform, PlatformHealth::Ok);
    // Status lists the first few and counts them all (listed whole, 33
    // such tokens would not fit a status line).
    assert_eq!(held.repositories_total, Some(500));
    assert_eq!(
        held.scope.repositories.map(|r| r.len()),
        Some(credd_core::protocol::MAX_STATUS_REPOSITORIES)
    );
    let status = world.sandbox.credd(&["status"]).run();
    status.assert_success("credd status");
    assert!(
        status.stdout.contains("repositories: 500 in all: "),
        "{}",
        status.stdout
    );
    assert!(world.github.violations().is_empty());
    let stderr = world.stop();
    assert!(
        stderr.contains("2 skipped"),
        "the skipped installations are named once:\n{stderr}"
    );
}

/// Issue 20's first attack, made as it was found: `molecule-credd
/// --fetch-once` without `WORKSPACE_ID` asks the admin route with the
/// workspace's own bearer. With grants in force and no `ADMIN_TOKEN` it gets
/// no token and nothing is minted; with `WORKSPACE_ID` the same command gets
/// exactly its grant (so the refusal is the route's, not a broken setup).
#[test]
fn fetch_once_without_a_workspace_id_gets_nothing_broader_than_the_grant() {
    let world = World::new(
        "repositories = [\"default-org/api\"]\npermissions = { contents = \"read\" }\n",
        |_| {},
    );
    let fetch_once = |workspace_id: bool| {
        let mut command = world.sandbox.command(testkit::bin::daemon());
        command.arg("--fetch-once");
        if !workspace_id {
            command.env_remove("WORKSPACE_ID");
        }
        testkit::Cmd::new(command, "molecule-credd --fetch-once")
            .stdout_holds_secret()
            .run()
    };

    let granted = fetch_once(true);
    granted.assert_success("molecule-credd --fetch-once with WORKSPACE_ID");
    let mints = world.github.mints();
    assert_eq!(mints.len(), 1);
    assert_eq!(mints[0].repositories, Some(vec!["api".to_owned()]));
    let permissions = mints[0].permissions.clone().expect("permissions");
    assert_eq!(
        permissions.into_iter().collect::<Vec<_>>(),
        vec![("contents".to_owned(), "read".to_owned())]
    );

    let admin = fetch_once(false);
    assert!(
        !admin.status.success(),
        "no token without WORKSPACE_ID: {:?}",
        admin.status
    );
    assert_eq!(world.github.mints().len(), 1, "nothing more was minted");
    let stderr = world.stop();
    assert!(
        stderr.contains("admin route closed to workspace bearers"),
        "the platform said why at start"
    );
}

#[test]
fn githubs_refusals_reach_the_daemon_as_not_granted_and_not_configured() {
    let mut world = World::new(
        "repositories = [\"default-org/*\", \"frozen/*\", \"readers/*\", \"nowhere/*\"]\npermissions = { contents = \"write\" }\n",
        |github| {
            github.install(Installation {
                suspended: true,
                ..Installation::organization("frozen", 1001)
            });
            github.install(Installation {
                permissions: [("contents".to_owned(), "read".to_owned())].into(),
                ..Installation::organization("readers", 1002)
            });
        },
    );
    world.start_daemon(&["--backoff-initial", "100ms", "--backoff-max", "5m"]);
    // A refused owner holds no slot (issue 20): its answer is remembered
    // for its back-off and given from memory, so each is seen in the
    // failure it was counted under and in one platform call, however often
    // it is asked again.
    for (owner, cause) in [
        ("frozen", "not_granted"),
        ("readers", "not_granted"),
        ("nowhere", "not_configured"),
    ] {
        let series = format!("credd_platform_failures_total{{cause=\"{cause}\"}}");
        let before = world.metrics();
        let out = world.token_for(owner);
        assert!(!out.status.success(), "{owner}: no token");
        let after = world.metrics();
        assert_eq!(after.delta(&before, &series), 1.0, "{owner}: {cause}");
        let again = world.token_for(owner);
        assert!(!again.status.success(), "{owner}: still no token");
        assert_eq!(
            world.metrics().delta(&after, "credd_platform_calls_total"),
            0.0,
            "{owner}: a definite answer waits out its back-off, never asked again at once"
        );
    }
    let stderr = world.stop();
    assert!(
        stderr
            .contains("GitHub refuses this token (HTTP 403): This installation has been suspended"),
        "{stderr}"
    );
    assert!(
        stderr.contains("The permissions requested are not granted to this installation."),
        "{stderr}"
    );
}

#[test]
fn a_rate_limit_is_a_wait_honoured_by_the_daemon_and_no_request_reaches_github() {
    let mut world = World::new("repositories = [\"default-org/*\"]\n", |github| {
        github.rate_limit(RateLimit::Secondary {
            status: 429,
            retry_after: jiff::SignedDuration::from_secs(90),
        });
    });
    world.start_daemon(&[]);
    let status = world
        .sandbox
        .wait_for_status("the default token failing", |s| {
            s.token.platform == PlatformHealth::Failing
        });
    let held = status.token;
    let next = held.next_refresh_in_secs.expect("scheduled");
    assert!(
        (60..=90).contains(&next),
        "the daemon waits out the platform's Retry-After, not its fast back-off: {next}"
    );
    assert!(
        held.last_error.unwrap_or_default().contains("503"),
        "503 from the platform"
    );
    // Clients asking meanwhile do not make the daemon (or the platform) ask.
    for _ in 0..3 {
        assert!(!world.token_for("default-org").status.success());
    }
    let requests = world.github.requests();
    assert_eq!(
        requests.len(),
        1,
        "only the request that was limited: {requests:?}"
    );
    let stderr = world.stop();
    assert_eq!(
        stderr
            .matches("[github] GitHub rate limits the App")
            .count(),
        1,
        "{stderr}"
    );
}

#[test]
fn an_uninstall_is_seen_on_the_next_request() {
    let mut world = World::new(
        "repositories = [\"default-org/*\", \"acme/*\"]\n",
        |github| {
            github.install(Installation {
                permissions: default_permissions(),
                ..Installation::organization("acme", 1001)
            });
        },
    );
    world.start_daemon(&[]);
    let first = world.token_for("acme");
    first.assert_success("the first token");
    let token = first.stdout.trim().to_owned();
    // The App is uninstalled: GitHub revokes its tokens, so git is refused
    // and erases it; the daemon reports the refusal and asks again.
    world.github.uninstall(1001);
    let erased = world.sandbox.request(&Request::Erase {
        sha256: sha256_hex(&token),
    });
    assert!(
        matches!(erased, Ok(Response::Erased { dropped: true })),
        "{erased:?}"
    );
    let after = world.token_for("acme");
    assert!(!after.status.success(), "no token from a gone installation");
    let held = world.wait_for_owner("acme", PlatformHealth::NotConfigured);
    assert!(
        held.last_error
            .unwrap_or_default()
            .contains("not installed"),
        "the next request says so"
    );
    let mints: Vec<u64> = world
        .github
        .mints()
        .iter()
        .map(|m| m.installation)
        .collect();
    assert_eq!(mints.iter().filter(|i| **i == 1001).count(), 2, "{mints:?}");
    world.stop();
}
