//! Real git as the client: `git credential fill`, clone and push over smart
//! HTTP, and a push after the token rotated — all without restarting anything.

use std::time::Duration;

use credd_core::protocol::Source;

use testkit::{
    FAST_BACKOFF, GitServer, Sandbox, TestPlatform, assert_secret, wait_until_time, with_platform,
};

/// A git server in `sandbox` taking `platform`'s current tokens, with the
/// repository `name`, and git set to ask credd for it: the server and the
/// repository's URL.
fn serve_repo(sandbox: &Sandbox, platform: &TestPlatform, name: &str) -> (GitServer, String) {
    let server = GitServer::start(&sandbox.path().join("repos"), platform.authority());
    let url = server.create_repo(name);
    sandbox.set_hosts(&server.host());
    sandbox.configure_git(&server.base_url(), &[]);
    (server, url)
}

#[test]
fn credential_fill_is_served_from_the_daemon() {
    let sandbox = Sandbox::new();
    let platform = TestPlatform::start();
    // The workspace route, with a bearer file that needs trimming.
    sandbox.use_platform_as_workspace(&platform);
    sandbox.set_hosts("github.com");
    sandbox.configure_git("https://github.com", &[]);
    let daemon = sandbox.daemon().args(FAST_BACKOFF).start();

    let fill = sandbox.credential_fill();
    fill.assert_success("git credential fill");
    let issued = platform.issued();
    assert_eq!(
        issued.len(),
        1,
        "one platform call for one fill: {issued:?}"
    );
    assert_eq!(
        fill.attribute("username"),
        Some("x-access-token"),
        "{}",
        fill.stdout
    );
    fill.assert_password(
        &issued[0].token,
        "git must receive the token the platform issued",
    );
    let expiry: u64 = fill
        .attribute("password_expiry_utc")
        .unwrap_or_else(|| panic!("no password_expiry_utc line:\n{}", fill.stdout))
        .parse()
        .expect("password_expiry_utc is Unix seconds");
    let stated = issued[0]
        .expires_at
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after epoch")
        .as_secs();
    assert!(
        expiry.abs_diff(stated) <= 1,
        "password_expiry_utc {expiry} should be the platform's expires_at {stated}"
    );

    // The answer came from the daemon's cache: a second fill makes no call.
    let again = sandbox.credential_fill();
    again.assert_success("second git credential fill");
    again.assert_password(&issued[0].token, "second fill, from the cache");
    assert_eq!(
        platform.requests(),
        1,
        "the second fill must be served from the cache"
    );
    let path = &platform.seen()[0].path;
    assert!(
        path.starts_with("/workspaces/ws-credd-test/"),
        "WORKSPACE_ID selects the workspace route: {path}"
    );
    let status = sandbox.status();
    assert_eq!(status.token.source, Some(Source::Platform));
    assert!(
        status.token.served >= 2,
        "status.served = {}",
        status.token.served
    );

    // Plain http is answered only for loopback hosts.
    let plain = sandbox.credd_get("http", "github.com");
    plain.assert_success("credd get over plain http");
    assert_eq!(
        plain.stdout, "",
        "never a token over plain http to a remote host"
    );
    // Unknown actions are ignored silently.
    let unknown = sandbox
        .credd(&["frobnicate"])
        .stdin("protocol=https\nhost=github.com\n\n")
        .run();
    unknown.assert_success("credd with an unknown action");
    assert_eq!(unknown.stdout, "");
    // A host credd does not serve gets nothing from it.
    let other = sandbox.credd_get("https", "example.com");
    other.assert_success("credd get for another host");
    assert_eq!(
        other.stdout, "",
        "credd must stay silent for hosts outside CREDD_HOSTS"
    );

    daemon.stop();
}

#[test]
fn clone_and_push_keep_working_after_the_token_rotates() {
    // Short-lived tokens so the daemon must refresh during the test.
    let (sandbox, platform) = with_platform(TestPlatform::with_ttl(Duration::from_secs(6)));
    let (server, url) = serve_repo(&sandbox, &platform, "project");
    let daemon = sandbox
        .daemon()
        .args(FAST_BACKOFF)
        .args(["--refresh-margin", "3s", "--min-lifetime", "1s"])
        .start();

    let work = sandbox.path().join("work");
    let clone = work.join("project");
    sandbox
        .git(&work, &["clone", &url, "project"])
        .run()
        .assert_success("git clone");
    std::fs::write(clone.join("README"), "first\n").expect("write file");
    sandbox
        .git(&clone, &["add", "README"])
        .run()
        .assert_success("git add");
    sandbox
        .git(&clone, &["commit", "-q", "-m", "first"])
        .run()
        .assert_success("git commit");
    sandbox
        .git(&clone, &["push", "origin", "HEAD:main"])
        .run()
        .assert_success("first git push");
    let first = server.accepted_tokens();
    assert_eq!(first.len(), 1, "clone and push used one token");

    // Let the first token's life run out (the point of this test): the git
    // server refuses it from then on, so the next push only works if the
    // daemon refreshed on its own.
    let first_expiry = platform
        .issued()
        .iter()
        .find(|t| t.token == first[0])
        .expect("the accepted token was issued by the platform")
        .expires_at;
    wait_until_time(first_expiry + Duration::from_millis(200));
    let rejected_before = server.rejected_credentials();

    std::fs::write(clone.join("README"), "second\n").expect("write file");
    sandbox
        .git(&clone, &["commit", "-q", "-am", "second"])
        .run()
        .assert_success("git commit");
    sandbox
        .git(&clone, &["push", "origin", "HEAD:main"])
        .run()
        .assert_success("git push after the token rotated");
    sandbox
        .git(&clone, &["fetch", "origin"])
        .run()
        .assert_success("git fetch after the token rotated");
    let accepted = server.accepted_tokens();
    assert!(
        accepted.len() >= 2 && accepted[1..].iter().all(|t| *t != first[0]),
        "after expiry the server should see a different token (saw {} distinct)",
        accepted.len()
    );
    assert_eq!(
        server.rejected_credentials(),
        rejected_before,
        "git was handed the expired token: the daemon did not refresh ahead of expiry"
    );
    assert!(platform.requests() >= 2, "the daemon never refreshed");
    daemon.stop();
}

#[test]
fn a_rejected_token_is_erased_and_the_next_push_gets_a_fresh_one() {
    const TTL: Duration = Duration::from_secs(8);
    let (sandbox, platform) = with_platform(TestPlatform::with_ttl(TTL));
    let authority = platform.authority();
    let (server, url) = serve_repo(&sandbox, &platform, "revoked");
    // Refresh only in the last seconds of the token's life.
    let daemon = sandbox
        .daemon()
        .args(FAST_BACKOFF)
        .args(["--refresh-margin", "2s", "--min-lifetime", "1s"])
        .start();
    let work = sandbox.path().join("work");
    sandbox
        .git(&work, &["clone", &url, "revoked"])
        .run()
        .assert_success("git clone");
    let first = server.accepted_tokens();
    assert_eq!(first.len(), 1);
    assert_eq!(platform.requests(), 1);

    // GitHub revokes the token: git gets a 401 with it and tells every
    // helper `erase`; credd passes that on and the daemon drops it.
    authority.revoke(&first[0]);
    let clone = work.join("revoked");
    let refused = sandbox.git(&clone, &["fetch", "origin"]).run();
    assert!(
        !refused.status.success(),
        "fetch with a revoked token must fail"
    );
    assert_eq!(server.rejected_credentials(), 1);
    sandbox.wait_for_status("the revoked token dropped", |s| {
        s.token.fingerprint.as_deref()
            != Some(&credd_core::secret::sha256_hex(first[0].as_bytes())[..12])
    });

    // The platform's own cache hands out the same token until half its life
    // is gone; wait for that (time is the behaviour here) so the daemon's
    // fresh fetch can bring a new one. The stated expiry is rounded down to
    // the second, the platform's real one up to a second later.
    wait_until_time(platform.issued()[0].expires_at - TTL / 2 + Duration::from_millis(1300));
    sandbox
        .git(&clone, &["fetch", "origin"])
        .run()
        .assert_success("git fetch after the erase");
    let accepted = server.accepted_tokens();
    assert_eq!(accepted.len(), 2, "a second, fresh token was used");
    assert_secret(Some(&accepted[1]), &first[0], false, "the fresh token");
    assert!(platform.requests() >= 2, "a fresh fetch after the erase");
    assert_eq!(server.rejected_credentials(), 1);
    daemon.stop();
}
