//! Tokens per repository owner, end to end: a grants file on the platform,
//! git telling credd the repository (`useHttpPath`), the daemon holding one
//! token per owner, and a git server that accepts a token only for the
//! repositories its stated scope reaches.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use testkit::{
    Cmd, FAST_BACKOFF, GitServer, PlatformOptions, Sandbox, TestPlatform, WAIT, with_platform,
};

const GRANTS: &str = r#"
[workspace.ws-credd-test]
repositories = ["acme/api", "acme/web", "labs/*"]
permissions = { contents = "write" }
"#;

/// A platform with [`GRANTS`], a sandbox using it as the granted workspace.
fn granted_platform() -> (Sandbox, TestPlatform) {
    testkit::granted_platform(GRANTS)
}

/// git asks credd first, with the repository path, then a fallback helper
/// that leaves `marker` behind whenever git asks it for a credential (not
/// for the `store` git sends every helper after a success).
fn configure_git_with_path(sandbox: &Sandbox, url: &str, marker: &Path) {
    let credd = testkit::bin::credd();
    let config = format!(
        "[user]\n\tname = Credd Test\n\temail = test@example.invalid\n\
         [init]\n\tdefaultBranch = main\n\
         [credential \"{url}\"]\n\thelper =\n\thelper = {}\n\
         \thelper = \"!f() {{ test $1 = get && touch '{}'; }}; f\"\n\tuseHttpPath = true\n",
        credd.display(),
        marker.display()
    );
    std::fs::write(sandbox.home().join(".gitconfig"), config).expect("git config");
}

fn clone_commit_push(sandbox: &Sandbox, url: &str, dir: &Path) {
    let work = dir.parent().expect("parent");
    std::fs::create_dir_all(work).expect("work dir");
    let name = dir.file_name().and_then(|n| n.to_str()).expect("name");
    sandbox
        .git(work, &["clone", url, name])
        .run()
        .assert_success("git clone");
    std::fs::write(dir.join("README"), "hello\n").expect("write");
    sandbox
        .git(dir, &["add", "README"])
        .run()
        .assert_success("add");
    sandbox
        .git(dir, &["commit", "-q", "-m", "first"])
        .run()
        .assert_success("commit");
    sandbox
        .git(dir, &["push", "origin", "HEAD:main"])
        .run()
        .assert_success("git push");
}

#[test]
fn each_owner_is_served_its_own_scoped_token_and_an_ungranted_one_falls_through() {
    let (sandbox, platform) = granted_platform();
    let server = GitServer::start(&sandbox.path().join("repos"), platform.authority());
    let api = server.create_repo("acme/api");
    let tool = server.create_repo("labs/tool");
    let foreign = server.create_repo("evil/x");
    sandbox.set_hosts(&server.host());
    let marker = sandbox.path().join("fallback-used");
    configure_git_with_path(&sandbox, &server.base_url(), &marker);
    let daemon = sandbox.daemon().args(FAST_BACKOFF).start();

    let work = sandbox.path().join("work");
    clone_commit_push(&sandbox, &api, &work.join("api"));
    clone_commit_push(&sandbox, &tool, &work.join("tool"));
    assert!(
        !marker.exists(),
        "granted repositories never reach the fallback"
    );

    // Each owner's token was minted with the grant's scope, and the git
    // server (which checks scope) accepted exactly those two.
    let issued = platform.issued();
    let acme = issued
        .iter()
        .find(|t| t.owner.as_deref() == Some("acme"))
        .expect("an acme token");
    assert_eq!(
        acme.repositories.as_deref(),
        Some(&["acme/api".to_owned(), "acme/web".to_owned()][..])
    );
    assert_eq!(
        acme.permissions.get("contents").map(String::as_str),
        Some("write")
    );
    let labs = issued
        .iter()
        .find(|t| t.owner.as_deref() == Some("labs"))
        .expect("a labs token");
    assert_eq!(labs.repositories, None, "labs/* is the whole account");
    let mut accepted = server.accepted_tokens();
    accepted.sort();
    let mut expected = vec![acme.token.clone(), labs.token.clone()];
    expected.sort();
    assert_eq!(accepted, expected);
    assert_eq!(server.rejected_credentials(), 0);
    let mints = platform.mints();
    assert_eq!(mints.len(), 2, "one mint per owner: {mints:?}");

    // A third owner: credd answers nothing and git asks the next helper.
    let get = sandbox
        .credd(&["get"])
        .stdin(format!(
            "protocol=http\nhost={}\npath=evil/x.git\n\n",
            server.host()
        ))
        .run();
    get.assert_success("credd get outside the grant");
    assert_eq!(get.stdout, "", "nothing for a repository outside the grant");
    assert!(get.stderr.contains("not_granted"), "{}", get.stderr);
    let refused = sandbox.git(&work, &["clone", &foreign, "x"]).run();
    assert!(!refused.status.success(), "no credential for evil/x");
    assert!(marker.exists(), "git fell through to the next helper");
    assert_eq!(
        platform.mints().len(),
        2,
        "nothing minted outside the grant"
    );

    // Status lists both owners' tokens, never the tokens.
    let status = sandbox.credd(&["status"]).run();
    status.assert_success("credd status");
    for expected in [
        "owner:          acme\n",
        "repositories:   acme/api, acme/web\n",
        "permissions:    contents=write\n",
        "token for labs:\n",
        "  owner:        labs\n",
        "  repositories: all of the account's\n",
    ] {
        assert!(
            status.stdout.contains(expected),
            "{expected:?} in\n{}",
            status.stdout
        );
    }
    // One audit line per token served: who asked (pid, uid, executable),
    // for what, and the fingerprint — never the token. It is written after
    // the answer, so the caller may be back before it.
    daemon
        .log()
        .wait_for_line("asked=\"acme/api\"", testkit::WAIT);
    let log = daemon.log().text();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("token served")).collect();
    assert!(
        audit.iter().any(|l| l.contains("asked=\"acme/api\"")
            && l.contains(&testkit::sha256_hex(acme.token.as_bytes())[..12])
            && l.contains(&format!(
                "exe={:?}",
                testkit::bin::credd().display().to_string()
            ))
            && l.contains("pid=")
            && l.contains(&format!("uid={}", nix::unistd::geteuid()))),
        "no audit line for acme/api in\n{log}"
    );
    assert!(
        audit.iter().any(|l| l.contains("asked=\"labs/tool\"")),
        "{log}"
    );
    daemon.stop();
}

#[test]
fn a_refused_token_is_replaced_at_once_not_after_the_platforms_cache_window() {
    let (sandbox, platform) = granted_platform();
    let server = GitServer::start(&sandbox.path().join("repos"), platform.authority());
    let api = server.create_repo("acme/api");
    sandbox.set_hosts(&server.host());
    let marker = sandbox.path().join("fallback-used");
    configure_git_with_path(&sandbox, &server.base_url(), &marker);
    let daemon = sandbox.daemon().args(FAST_BACKOFF).start();
    let dir = sandbox.path().join("work/api");
    clone_commit_push(&sandbox, &api, &dir);
    let first = platform.last_issued().expect("issued");

    // GitHub revokes it: the next fetch is refused, git erases it, the
    // daemon reports it and the platform drops it from its cache.
    platform.authority().revoke(&first);
    let failed = sandbox.git(&dir, &["fetch", "origin"]).run();
    assert!(!failed.status.success(), "the revoked token is refused");
    sandbox
        .git(&dir, &["fetch", "origin"])
        .run()
        .assert_success("git fetch with a fresh token");
    let second = platform.last_issued().expect("issued");
    assert_ne!(second, first, "a different token, minted at once");
    assert_eq!(platform.refusal_reports(), 1);
    assert!(server.accepted_tokens().contains(&second));
    daemon.stop();
}

/// The `key=value` fields of a text log line after its message, split on
/// spaces outside double quotes (a backslash escapes inside them), as a
/// reader of the log would.
fn fields_after<'a>(line: &'a str, message: &str) -> Vec<(&'a str, &'a str)> {
    let rest = &line[line.find(message).expect("the message") + message.len()..];
    let mut fields = Vec::new();
    let (mut start, mut quoted, mut escaped) = (None, false, false);
    for (i, c) in rest.char_indices().chain([(rest.len(), ' ')]) {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if let Some(from) = start.take() {
                    let field: &str = &rest[from..i];
                    fields.push(field.split_once('=').unwrap_or((field, "")));
                }
            }
            _ if start.is_none() => start = Some(i),
            _ => {}
        }
    }
    fields
}

/// Issue 20, item 8, as attacked: the caller's executable path was logged
/// unquoted, so a binary run from a path with spaces could append
/// `uid=0 exe=… fingerprint=…` fields of its own, and U+2028 or bidi
/// controls passed through. The real `credd`, copied to such a path, asks
/// for a token: the audit line has exactly its five fields, the path
/// appears once, quoted and escaped, and no raw separator or bidi control
/// reaches the log.
#[test]
fn the_audit_line_cannot_be_forged_by_the_callers_path() {
    let (sandbox, platform) = granted_platform();
    let daemon = sandbox.daemon().args(FAST_BACKOFF).start();
    let forged = sandbox
        .path()
        .join("x uid=0 exe=")
        .join("usr")
        .join("bin")
        .join("sshd fingerprint=\"000000000000\" asked=evil\u{2028}INFO audit: token served pid=1 uid=0 \u{202e}dderc");
    std::fs::create_dir_all(&forged).expect("the forged folders");
    let copy = forged.join("credd \u{202e}gnp.exe");
    std::fs::copy(testkit::bin::credd(), &copy).expect("copy credd");
    let mut command = sandbox.command(&copy);
    command.args(["token", "--repo", "acme/api"]);
    let token = Cmd::new(command, "credd token (copied to a forged path)")
        .transcript(sandbox.transcript())
        .stdout_holds_secret()
        .run();
    token.assert_success("credd token from the forged path");
    let acme = platform.last_issued().expect("issued");
    assert_eq!(token.stdout.trim(), acme, "the acme token");

    // The audit line is written after the answer: wait for it.
    daemon.log().wait_for_line("token served", testkit::WAIT);
    let log = daemon.log().text();
    assert!(
        !log.contains(['\u{2028}', '\u{202e}']),
        "a raw line separator or bidi control reached the log:\n{log}"
    );
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("token served")).collect();
    assert_eq!(lines.len(), 1, "one token served, one audit line:\n{log}");
    let fields = fields_after(lines[0], "token served");
    let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        keys,
        ["pid", "uid", "exe", "asked", "fingerprint"],
        "{}",
        lines[0]
    );
    let value = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    assert_eq!(
        value("uid"),
        Some(nix::unistd::geteuid().to_string().as_str())
    );
    let exe = copy.to_str().expect("UTF-8 path");
    assert_eq!(value("exe"), Some(format!("{exe:?}").as_str()));
    assert_eq!(value("asked"), Some("\"acme/api\""));
    assert_eq!(
        value("fingerprint"),
        Some(format!("{:?}", &testkit::sha256_hex(acme.as_bytes())[..12]).as_str())
    );
    daemon.stop();
}

/// A platform with `grants`, a sandbox using it as the granted workspace, a
/// git server in front of it and git configured with the path (the
/// fallback leaves `marker` behind when asked).
fn granted_git(grants: &str) -> (Sandbox, TestPlatform, GitServer, PathBuf) {
    let platform = TestPlatform::with_options(PlatformOptions {
        grants: Some(grants.to_owned()),
        ..PlatformOptions::default()
    });
    let (sandbox, platform) = with_platform(platform);
    sandbox.use_platform_as_workspace(&platform);
    let server = GitServer::start(&sandbox.path().join("repos"), platform.authority());
    sandbox.set_hosts(&server.host());
    let marker = sandbox.path().join("fallback-used");
    configure_git_with_path(&sandbox, &server.base_url(), &marker);
    (sandbox, platform, server, marker)
}

/// Token requests the platform saw naming `owner` (`?owner=OWNER`).
fn requests_for_owner(platform: &TestPlatform, owner: &str) -> usize {
    let wanted = format!("owner={owner}");
    platform
        .seen()
        .iter()
        .filter(|r| {
            r.query
                .as_deref()
                .is_some_and(|q| q.split('&').any(|p| p == wanted))
        })
        .count()
}

/// Issue 20, item 3, the attack as found: an untrusted superproject whose
/// 34 submodules belong to 34 different owners outside the grant. Cloning it
/// used to fill all 32 owner slots with caches that never retired, after
/// which a granted owner was refused until the daemon restarted. Now each
/// refused owner costs one platform call and no slot, and a granted owner
/// clones right after the attack (and after it is repeated).
#[test]
fn a_superproject_with_34_submodule_owners_never_locks_out_a_granted_owner() {
    const SUBMODULES: usize = 34;
    let (sandbox, platform, server, _marker) = granted_git(
        r#"
[workspace.ws-credd-test]
repositories = ["acme/*", "labs/*"]
permissions = { contents = "write" }
"#,
    );
    let superproject = server.create_repo("acme/super");
    let tool = server.create_repo("labs/tool");
    // The default back-off: a refused owner is remembered for minutes.
    let daemon = sandbox.daemon().start();

    // The untrusted content: gitlinks and a .gitmodules naming 34 owners.
    let work = sandbox.path().join("work");
    let author = work.join("author");
    std::fs::create_dir_all(&work).expect("work");
    sandbox
        .git(&work, &["clone", &superproject, "author"])
        .run()
        .assert_success("clone the superproject");
    for n in 0..SUBMODULES {
        let owner = format!("evil{n:02}");
        let url = server.create_repo(&format!("{owner}/lib"));
        let path = format!("deps/{owner}");
        let name = format!("submodule.{owner}");
        for (key, value) in [("path", path.as_str()), ("url", url.as_str())] {
            sandbox
                .git(
                    &author,
                    &[
                        "config",
                        "-f",
                        ".gitmodules",
                        &format!("{name}.{key}"),
                        value,
                    ],
                )
                .run()
                .assert_success("write .gitmodules");
        }
        let gitlink = format!("160000,{:040x},{path}", n + 1);
        sandbox
            .git(&author, &["update-index", "--add", "--cacheinfo", &gitlink])
            .run()
            .assert_success("add a gitlink");
    }
    for args in [
        &["add", ".gitmodules"][..],
        &["commit", "-q", "-m", "vendor everything"],
        &["push", "origin", "HEAD:main"],
    ] {
        sandbox.git(&author, args).run().assert_success("git");
    }

    // The victim clones it with its submodules, twice.
    for round in 0..2 {
        let dir = format!("victim{round}");
        let clone = sandbox
            .git(
                &work,
                &["clone", "--recurse-submodules", &superproject, &dir],
            )
            .run();
        assert!(work.join(&dir).join(".gitmodules").is_file(), "{clone:?}");
        assert!(
            clone.stderr.contains("evil33"),
            "git tried the last submodule too: {clone:?}"
        );
    }
    for n in 0..SUBMODULES {
        let owner = format!("evil{n:02}");
        assert_eq!(
            requests_for_owner(&platform, &owner),
            1,
            "{owner}: one platform call however often git asked"
        );
    }
    let status = sandbox.status();
    assert!(
        status.owners.iter().all(|t| t
            .scope
            .owner
            .as_deref()
            .is_none_or(|o| !o.starts_with("evil"))),
        "refused owners hold no slot: {:?}",
        status.owners
    );

    // A granted owner still clones, with its own token.
    clone_commit_push(&sandbox, &tool, &work.join("tool"));
    assert!(
        platform
            .issued()
            .iter()
            .any(|t| t.owner.as_deref() == Some("labs")),
        "labs got its token"
    );
    daemon.stop();
}

/// Issue 20, item 7, as found: a widened grant was answered `not_granted`
/// from the held scope until the next scheduled refresh, and after a 403
/// for an owner whose grant was revoked the daemon kept serving the held
/// token until it expired. A repository added to the grant clones on the
/// next request; a revoked owner's token is not served after the platform
/// refused it.
#[test]
fn grant_changes_reach_the_daemon_a_widened_one_at_once_a_revoked_one_at_its_refusal() {
    const BEFORE: &str = r#"
[workspace.ws-credd-test]
repositories = ["acme/api", "labs/*"]
permissions = { contents = "write" }
"#;
    const WIDENED: &str = r#"
[workspace.ws-credd-test]
repositories = ["acme/api", "acme/web", "labs/*"]
permissions = { contents = "write" }
"#;
    const REVOKED: &str = r#"
[workspace.ws-credd-test]
repositories = ["acme/api", "acme/web"]
permissions = { contents = "write" }
"#;
    let (sandbox, platform, server, marker) = granted_git(BEFORE);
    let api = server.create_repo("acme/api");
    let web = server.create_repo("acme/web");
    let tool = server.create_repo("labs/tool");
    let daemon = sandbox.daemon().start();
    let work = sandbox.path().join("work");
    clone_commit_push(&sandbox, &api, &work.join("api"));
    clone_commit_push(&sandbox, &tool, &work.join("tool"));

    // acme/web is outside the grant: refused.
    let refused = sandbox.git(&work, &["clone", &web, "web-refused"]).run();
    assert!(!refused.status.success(), "acme/web is not granted yet");
    assert!(marker.exists(), "git fell through to its next helper");

    // The operator widens the grant: the next clone works.
    platform.set_grants(Some(WIDENED)).expect("grants");
    clone_commit_push(&sandbox, &web, &work.join("web"));

    // The operator revokes labs; the daemon's next call for it (SIGHUP
    // here, its schedule otherwise) is refused, and its token goes.
    platform.set_grants(Some(REVOKED)).expect("grants");
    let labs_calls = requests_for_owner(&platform, "labs");
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon
        .log()
        .wait_for_line_matching("the refusal of labs", testkit::WAIT, |l| {
            l.contains("platform call failed") && l.contains("owner labs")
        });
    assert_eq!(requests_for_owner(&platform, "labs"), labs_calls + 1);
    let token = sandbox.credd(&["token", "--owner", "labs"]).run();
    assert_eq!(token.code(), Some(1), "labs is not served: {token:?}");
    assert!(token.stderr.contains("not_granted"), "{}", token.stderr);
    let fetch = sandbox.git(&work.join("tool"), &["fetch", "origin"]).run();
    assert!(!fetch.status.success(), "no token for labs/tool any more");
    daemon.stop();
}

/// Issue 20, item 5, as found: every per-owner client shared one "bearer
/// read running" flag, so a SIGHUP with several tokens held made most of
/// the simultaneous refreshes fail at once ("stalled"), with `unauthorized`
/// health and a back-off. Eight owners' tokens and the default one are
/// refreshed together: every refresh reaches the platform, none fails.
#[test]
fn a_sighup_with_nine_tokens_held_refreshes_them_all_without_a_bearer_failure() {
    let owners: Vec<String> = (1..=8).map(|n| format!("org{n}")).collect();
    let grants = format!(
        "[workspace.ws-credd-test]\nrepositories = [\"acme/*\", {}]\npermissions = {{ contents = \"read\" }}\n",
        owners
            .iter()
            .map(|o| format!("\"{o}/*\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (sandbox, platform, _server, _marker) = granted_git(&grants);
    let daemon = sandbox.daemon().args(FAST_BACKOFF).start();
    sandbox.wait_for_token();
    for owner in &owners {
        sandbox
            .credd(&["token", "--owner", owner])
            .stdout_holds_secret()
            .run()
            .assert_success("credd token --owner");
    }
    let before = platform.token_requests();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    platform.wait_for_requests(platform.requests() + 9, testkit::WAIT);
    let status = sandbox.wait_for_status("nine refreshed tokens", |s| {
        s.owners.len() == owners.len()
            && std::iter::once(&s.token)
                .chain(&s.owners)
                .all(|t| t.platform.as_str() == "ok" && t.next_refresh_in_secs != Some(0))
    });
    assert_eq!(platform.token_requests(), before + 9, "one call per token");
    let failures = status.counters.expect("counters").platform_failures;
    assert_eq!(
        failures.get("bearer").copied().unwrap_or(0),
        0,
        "{failures:?}"
    );
    assert!(
        !daemon.log().text().contains("stalled"),
        "{}",
        daemon.log().text()
    );
    daemon.stop();
}

/// `--on-refresh` hears every token the daemon refreshes, an account's as
/// well as the default one, told whose in `CREDD_TOKEN_FOR` (`default` or
/// `owner`) and the account in `CREDD_OWNER`: per-owner
/// tokens are not second class (their `STATUS=` part is
/// `systemd_status_names_each_account_the_daemon_holds_a_token_for`).
#[test]
fn every_accounts_new_token_reaches_the_on_refresh_hook_with_its_account_named() {
    let (sandbox, _platform) = granted_platform();
    let seen = sandbox.path().join("hook-seen");
    // Only hashes reach the disk; the account names are not secret.
    let hook = format!(
        "echo \"$CREDD_TOKEN_FOR ${{CREDD_OWNER:-none}} $(sha256sum | cut -d' ' -f1)\" >> '{}'",
        seen.display()
    );
    let daemon = sandbox
        .daemon()
        .args(FAST_BACKOFF)
        .args(["--on-refresh", hook.as_str()])
        .start();
    let (default, _, _) = sandbox.wait_for_token();
    let labs = sandbox
        .credd(&["token", "--owner", "labs"])
        .stdout_holds_secret()
        .run();
    labs.assert_success("credd token --owner labs");
    let labs = labs.stdout.trim_end().to_owned();
    assert_ne!(labs, default, "labs has a token of its own");
    let default_owner = sandbox
        .status()
        .token
        .scope
        .owner
        .expect("a granted platform states the default token's account");
    let expected = [
        format!(
            "default {default_owner} {}",
            testkit::sha256_hex(format!("{default}\n"))
        ),
        format!("owner labs {}", testkit::sha256_hex(format!("{labs}\n"))),
    ];
    let lines = testkit::process::eventually("the hook ran for both tokens", || {
        let text = std::fs::read_to_string(&seen).unwrap_or_default();
        expected
            .iter()
            .all(|line| text.lines().any(|l| l == line))
            .then_some(text)
    });
    assert_eq!(lines.lines().count(), 2, "one run per new token: {lines}");
    daemon.stop();
}

/// systemd hears of every account the daemon holds a token for: once
/// `labs` has a token, the daemon's `STATUS=` on `NOTIFY_SOCKET` names it
/// beside the default token (`…; accounts: labs expires in …`), and no
/// status sent before names it.
#[test]
fn systemd_status_names_each_account_the_daemon_holds_a_token_for() {
    let (sandbox, _platform) = granted_platform();
    let notify_path = sandbox.path().join("notify");
    let systemd = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    let _daemon = sandbox
        .daemon()
        .args(FAST_BACKOFF)
        .env("NOTIFY_SOCKET", &notify_path)
        .start();
    sandbox.wait_for_token();
    let mut before = Vec::new();
    systemd.set_nonblocking(true).expect("nonblocking");
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = systemd.recv(&mut buf) {
        before.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        before.iter().any(|m| m.contains("READY=1")),
        "the daemon notified systemd at start: {before:?}"
    );
    assert!(
        !before.iter().any(|m| m.contains("labs")),
        "no account named before it had a token: {before:?}"
    );

    sandbox
        .credd(&["token", "--owner", "labs"])
        .stdout_holds_secret()
        .run()
        .assert_success("credd token --owner labs");
    systemd.set_nonblocking(false).expect("blocking");
    systemd.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut after = Vec::new();
    let named = loop {
        let Ok(n) = systemd.recv(&mut buf) else {
            panic!("no STATUS= naming labs within {WAIT:?}; received: {after:?}");
        };
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if let Some(status) = message.lines().find(|l| l.starts_with("STATUS="))
            && status.contains("; accounts: labs expires in ")
        {
            break status.to_owned();
        }
        after.push(message);
    };
    assert!(
        named.contains("expires in") && named.find("accounts:") > named.find("expires in"),
        "the default token first, then the accounts: {named}"
    );
}
