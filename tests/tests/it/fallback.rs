//! The helper's fallback chain: daemon socket → platform directly (only when
//! the daemon is unreachable) → nothing, so git asks the next helper.

use std::os::unix::net::UnixListener;

use std::time::Instant;

use testkit::http::closed_port;
use testkit::{
    CmdOutput, FAST_BACKOFF, Fault, Sandbox, TestPlatform, WAIT, assert_secret, start_daemon,
    with_platform, write_file,
};

const FALLBACK_PASSWORD: &str = "fallback-pat-0123456789abcdef";

/// A second helper, as an operator would configure: a fixed password.
fn fallback_helper(sandbox: &Sandbox) -> String {
    let path = sandbox.path().join("fallback-helper.sh");
    write_file(
        &path,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 0\ncat >/dev/null\nprintf 'username=operator\\npassword={FALLBACK_PASSWORD}\\n'\n"
        ),
        0o755,
    );
    path.to_str().expect("UTF-8 path").to_owned()
}

fn fill(sandbox: &Sandbox) -> CmdOutput {
    let out = sandbox.credential_fill();
    out.assert_success("git credential fill");
    out
}

fn credd_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("credd: "))
        .collect()
}

#[test]
fn daemon_down_helper_asks_the_platform_itself() {
    let (sandbox, platform) = with_platform(TestPlatform::start());
    // No daemon: the socket path does not exist.
    let get = sandbox.credd_get("https", "github.com");
    get.assert_success("credd get without a daemon");
    let issued = platform.issued();
    assert_eq!(issued.len(), 1, "one direct platform call");
    get.assert_password(&issued[0].token, "direct platform fallback");
    assert_eq!(get.attribute("username"), Some("x-access-token"));
    assert!(
        get.attribute("password_expiry_utc").is_some(),
        "{}",
        get.stdout
    );
    assert!(
        !credd_lines(&get.stderr).is_empty(),
        "the fallback step writes a `credd: ` line: {:?}",
        get.stderr
    );

    // `credd token` and `credd exec` take the same path.
    let token = sandbox.credd(&["token"]).stdout_holds_secret().run();
    token.assert_success("credd token without a daemon");
    assert_secret(
        Some(token.stdout.trim()),
        &platform.last_issued().expect("issued"),
        true,
        "credd token",
    );

    // A socket file nobody listens on (a crashed daemon) counts as down too.
    drop(UnixListener::bind(sandbox.path().join("stale.sock")).expect("bind"));
    let stale = sandbox
        .credd(&["get"])
        .stdin("protocol=https\nhost=github.com\n\n")
        .stdout_holds_secret();
    let mut stale = stale;
    stale
        .command()
        .env("CREDD_SOCKET", sandbox.path().join("stale.sock"));
    let out = stale.run();
    out.assert_success("credd get with a stale socket");
    assert!(out.attribute("password").is_some(), "{out:?}");
}

#[test]
fn daemon_and_platform_down_git_falls_through_to_the_next_helper() {
    let sandbox = Sandbox::new();
    sandbox.set_platform_url(format!("http://{}", closed_port()));
    write_file(
        &sandbox.configs_dir().join(".auth_token"),
        "bearer-unused-0123456789\n",
        0o600,
    );
    sandbox.add_secret("the bearer", "bearer-unused-0123456789");
    let fallback = fallback_helper(&sandbox);
    sandbox.configure_git("https://github.com", &[&fallback]);

    let out = fill(&sandbox);
    out.assert_password(FALLBACK_PASSWORD, "the fallback helper's password");
    assert_eq!(out.attribute("username"), Some("operator"));

    let get = sandbox.credd_get("https", "github.com");
    get.assert_success("credd get with nothing reachable");
    assert_eq!(get.stdout, "", "credd prints nothing (and never quit=1)");
    let lines = credd_lines(&get.stderr);
    assert!(
        (1..=3).contains(&lines.len()),
        "one short `credd: ` line per fallback step: {:?}",
        get.stderr
    );
    let token = sandbox.credd(&["token"]).run();
    assert_eq!(token.status.code(), Some(1), "{token:?}");
    assert_eq!(token.stdout, "");
    assert_eq!(token.stderr.trim().lines().count(), 1, "{:?}", token.stderr);
}

#[test]
fn daemon_without_a_token_makes_the_helper_fall_through_without_calling_the_platform() {
    let sandbox = Sandbox::new();
    // The daemon's platform fails; the helper's environment names another
    // platform that would answer — it must not be asked.
    let failing = TestPlatform::start();
    failing.set_fault(Fault::Status(500));
    let helper_side = TestPlatform::start();
    sandbox.use_platform(&helper_side);
    sandbox.watch_platform(&failing);
    // (The 500 is answered before the platform checks the bearer.)
    let daemon = sandbox
        .daemon()
        .env("PLATFORM_URL", failing.url())
        .args([
            "--wait-timeout",
            "300ms",
            "--backoff-initial",
            "1h",
            "--backoff-max",
            "1h",
        ])
        .start();
    failing.wait_for_requests(1, WAIT);
    let fallback = fallback_helper(&sandbox);
    sandbox.configure_git("https://github.com", &[&fallback]);

    let out = fill(&sandbox);
    out.assert_password(FALLBACK_PASSWORD, "the fallback helper's password");
    assert_eq!(
        helper_side.requests(),
        0,
        "the helper must not call the platform when the daemon answered"
    );
    let exec = sandbox.credd(&["exec", "--", "true"]).run();
    assert_eq!(
        exec.status.code(),
        Some(1),
        "credd exec without a token: {exec:?}"
    );
    assert_eq!(helper_side.requests(), 0);
    daemon.stop();
}

#[test]
fn exec_sets_both_variables_and_passes_the_exit_code_through() {
    let (sandbox, _platform, daemon) = start_daemon(TestPlatform::start(), &[]);
    let (token, _, _) = sandbox.wait_for_token();
    // The child proves it saw the token by printing its hash, never the token.
    let out = sandbox
        .credd(&[
            "exec",
            "--",
            "sh",
            "-c",
            "test -n \"$GH_TOKEN\" && test \"$GH_TOKEN\" = \"$GITHUB_TOKEN\" && printf %s \"$GH_TOKEN\" | sha256sum; exit 7",
        ])
        .run();
    assert_eq!(
        out.status.code(),
        Some(7),
        "exit code passes through: {out:?}"
    );
    assert_eq!(
        out.stdout.split_whitespace().next(),
        Some(credd_core::secret::sha256_hex(token.as_bytes()).as_str())
    );
    daemon.stop();
}

/// `.auth_token` that blocks on open (a FIFO, as a stalled network mount
/// behaves): the daemon refuses it as not a regular file and stays
/// responsive — status answers, SIGTERM ends it — and git's fallback
/// through `molecule-credd --fetch-once` returns at once instead of hanging.
#[test]
fn a_bearer_file_that_blocks_on_open_freezes_nothing() {
    let (sandbox, platform) = with_platform(TestPlatform::start());
    let bearer = sandbox.configs_dir().join(".auth_token");
    std::fs::remove_file(&bearer).expect("remove the bearer");
    nix::unistd::mkfifo(&bearer, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");

    // No daemon yet: credd's fallback must come back, with a reason.
    let started = Instant::now();
    let get = sandbox.credd_get("https", "github.com");
    get.assert_success("credd get");
    assert_eq!(get.stdout, "", "no token to be had");
    assert!(get.stderr.contains("not a regular file"), "{}", get.stderr);
    assert!(started.elapsed() < WAIT, "credd get returned");

    let daemon = sandbox.daemon().args(FAST_BACKOFF).spawn();
    daemon.log().wait_for_line("listening on", WAIT);
    let status = sandbox.wait_for_status("the bearer failure in status", |s| {
        s.token
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("not a regular file"))
    });
    assert_eq!(status.token.platform.as_str(), "unauthorized", "{status:?}");
    assert_eq!(platform.requests(), 0, "no call without a bearer");
    daemon.stop();
}
