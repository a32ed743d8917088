//! The daemon against a failing platform: what it serves, when it calls the
//! platform, and how often. Counts come from the platform's own request log;
//! waits block on its "N requests seen" signal.
//!
//! Where the daemon's back-off has full jitter, a test that must see "no call
//! yet" uses a one-hour back-off: a correct daemon then never calls within the
//! test's window, so the assertion cannot fail spuriously, while a daemon that
//! ignores back-off is caught.

use std::time::Duration;

use credd_core::protocol::{ErrorCode, Request, Response, Source, TokenState};
use credd_core::secret::sha256_hex;

use testkit::client::assert_error;
use testkit::{
    CmdOutput, FAST_BACKOFF, Fault, Sandbox, TestPlatform, WAIT, assert_secret, start_daemon,
    start_daemon_with, wait_until_time, with_platform, write_file,
};

/// Back-off long enough that no retry falls inside a test's window.
const NO_RETRY: [&str; 4] = ["--backoff-initial", "1h", "--backoff-max", "1h"];

#[test]
fn platform_down_at_start_daemon_binds_and_get_is_unavailable_until_it_returns() {
    let (sandbox, platform, daemon) =
        start_daemon(TestPlatform::start_down(), &["--wait-timeout", "500ms"]);

    let message = sandbox.assert_get_fails(ErrorCode::Unavailable);
    assert!(!message.is_empty(), "Unavailable needs a reason for people");
    let get = sandbox.credd_get("https", "github.com");
    get.assert_success("credd get while the platform is down");
    assert_eq!(
        get.stdout, "",
        "nothing for git, so it moves on to the next helper"
    );
    let token = sandbox.credd(&["token"]).stdout_holds_secret().run();
    assert_eq!(
        token.status.code(),
        Some(1),
        "credd token without a token: {token:?}"
    );
    assert_eq!(token.stdout, "");
    assert_eq!(
        token.stderr.trim().lines().count(),
        1,
        "one-line reason: {:?}",
        token.stderr
    );

    platform.set_fault(Fault::PassThrough);
    let (served, _, source) = sandbox.wait_for_token();
    assert_eq!(source, Source::Platform);
    platform.assert_last_issued(&served, "served the issued token");
    daemon.stop();
}

#[test]
fn platform_down_at_start_serves_the_provision_time_env_token() {
    let env_token = "ghs_ProvisionTimeBootstrapToken0123456789";
    let (sandbox, platform, daemon) = start_daemon_with(TestPlatform::start_down(), |daemon| {
        daemon.env("GITHUB_TOKEN", env_token)
    });
    sandbox.add_secret("the bootstrap GITHUB_TOKEN", env_token);

    let get = sandbox.credd_get("https", "github.com");
    get.assert_success("credd get with a bootstrap token");
    get.assert_password(env_token, "bootstrap token");
    assert_eq!(get.attribute("username"), Some("x-access-token"));
    let status = sandbox.status();
    assert_eq!(status.token.source, Some(Source::Env), "{status:?}");
    assert_eq!(status.token.state, Some(TokenState::Valid), "{status:?}");

    // Once the platform answers, its token replaces the bootstrap one.
    platform.set_fault(Fault::PassThrough);
    platform.wait_for_requests(1, WAIT);
    let status = sandbox.wait_for_status("source platform", |s| {
        s.token.source == Some(Source::Platform)
    });
    assert_eq!(status.token.state, Some(TokenState::Valid));
    let (token, _, _) = sandbox.get().expect("token");
    assert_secret(
        Some(&token),
        env_token,
        false,
        "platform token replaces the bootstrap",
    );
    daemon.stop();
}

#[test]
fn gh_token_is_a_bootstrap_too() {
    let env_token = "ghs_GhTokenBootstrapValue0123456789abcd";
    let (sandbox, _platform, daemon) = start_daemon_with(TestPlatform::start_down(), |daemon| {
        daemon.env("GH_TOKEN", env_token)
    });
    sandbox.add_secret("the bootstrap GH_TOKEN", env_token);
    let (token, _, source) = sandbox.get().expect("bootstrap token served");
    assert_secret(Some(&token), env_token, true, "bootstrap token");
    assert_eq!(source, Source::Env);
    daemon.stop();
}

#[test]
fn platform_down_mid_life_keeps_serving_the_cached_token() {
    let (sandbox, platform, daemon) = start_daemon(TestPlatform::start(), &[]);
    let (first, expires_at, _) = sandbox.wait_for_token();

    platform.set_fault(Fault::Down);
    // SIGHUP asks for a refresh now; it fails against the closed port.
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    sandbox.wait_for_status("a failed refresh", |s| s.token.last_error.is_some());
    for _ in 0..5 {
        let (token, exp, source) = sandbox.get().expect("cached token still served");
        assert_secret(Some(&token), &first, true, "cached token");
        assert_eq!((exp, source), (expires_at, Source::Platform));
    }
    let get = sandbox.credd_get("https", "github.com");
    get.assert_password(&first, "cached token while the platform is down");
    assert_eq!(sandbox.status().token.state, Some(TokenState::Valid));
    daemon.stop();
}

#[test]
fn server_errors_back_off_instead_of_looping_or_following_clients() {
    let (sandbox, platform, daemon) = start_daemon(
        TestPlatform::start().with_fault(Fault::Status(500)),
        &[
            "--backoff-initial",
            "200ms",
            "--backoff-max",
            "1s",
            "--wait-timeout",
            "300ms",
        ],
    );

    platform.wait_for_requests(4, WAIT);
    // 40 clients at once while the platform fails: they get Unavailable and
    // do not each cause a platform call.
    let before = platform.requests();
    let started = std::time::Instant::now();
    let answers = concurrent_gets(&sandbox, 40);
    let elapsed = started.elapsed();
    let during = platform.requests() - before;
    for answer in &answers {
        assert_error(answer, ErrorCode::Unavailable, "the daemon's answer");
    }
    // With a 1 s cap and full jitter the daemon averages ~2 calls/s; allow 4/s
    // plus slack. A call per client (40) or a retry loop is far above this.
    let bound = 4 + (elapsed.as_secs_f64() * 4.0).ceil() as usize;
    assert!(
        during <= bound,
        "{during} platform calls while 40 clients asked over {elapsed:?} (bound {bound})"
    );
    // Successive calls are spread out by the back-off.
    let seen = platform.seen();
    let spread = seen.last().expect("calls").at - seen[0].at;
    assert!(
        spread >= Duration::from_millis(100),
        "{} calls within {spread:?}: no back-off",
        seen.len()
    );
    let status = sandbox.status();
    assert_eq!(status.token.platform.as_str(), "failing", "{status:?}");
    assert!(status.token.last_error.is_some(), "{status:?}");
    assert_eq!(status.token.state, Some(TokenState::Missing));

    // And it recovers on its own once the platform does.
    platform.set_fault(Fault::PassThrough);
    let (token, _, _) = sandbox.wait_for_token();
    platform.assert_last_issued(&token, "served the issued token");
    daemon.stop();
}

#[test]
fn unauthorized_rereads_the_bearer_and_retries_once() {
    let (sandbox, platform) = with_platform(TestPlatform::start());
    let bearer_file = sandbox.configs_dir().join(".auth_token");
    // A stale bearer: the platform's own auth refuses it.
    write_file(&bearer_file, "stale-bearer-0123456789abcdef\n", 0o600);
    sandbox.add_secret("the stale bearer", "stale-bearer-0123456789abcdef");
    platform.set_fault(Fault::Hang);
    let daemon = sandbox
        .daemon()
        .args(NO_RETRY)
        .args(["--wait-timeout", "5s"])
        .start();
    platform.wait_for_requests(1, WAIT);
    // The bearer rotates while the first call is in flight; that call is then
    // refused (401) and the immediate retry must read the new file.
    write_file(&bearer_file, format!("{}\n", platform.bearer()), 0o600);
    platform.set_fault(Fault::PassThrough);
    let (token, _, _) = sandbox
        .get()
        .expect("the retry after 401 uses the re-read bearer, without back-off");
    platform.assert_last_issued(&token, "served the issued token");
    assert_eq!(platform.requests(), 2, "one refused call, one retry");
    daemon.stop();
}

#[test]
fn unauthorized_twice_then_backs_off() {
    let (sandbox, platform, daemon) = start_daemon_with(
        TestPlatform::start().with_fault(Fault::Status(401)),
        |daemon| daemon.args(NO_RETRY).args(["--wait-timeout", "500ms"]),
    );
    platform.wait_for_requests(2, WAIT);
    sandbox.assert_get_fails(ErrorCode::Unavailable);
    concurrent_gets(&sandbox, 10);
    assert_eq!(
        platform.requests(),
        2,
        "after a 401 the daemon retries once, then backs off"
    );
    let status = sandbox.status();
    assert_eq!(status.token.platform.as_str(), "unauthorized", "{status:?}");
    daemon.stop();
}

#[test]
fn not_found_means_not_configured() {
    let (sandbox, platform, daemon) = start_daemon(
        TestPlatform::start().with_fault(Fault::Status(404)),
        &["--wait-timeout", "300ms"],
    );
    platform.wait_for_requests(1, WAIT);
    let status = sandbox.wait_for_status("platform not_configured", |s| {
        s.token.platform.as_str() == "not_configured"
    });
    assert_eq!(status.token.state, Some(TokenState::Missing));
    sandbox.assert_get_fails(ErrorCode::Unavailable);
    // "Long back-off": even with a 1 s cap for transient errors, 404 is not
    // retried while clients ask.
    let before = platform.requests();
    concurrent_gets(&sandbox, 20);
    assert!(
        platform.requests() - before <= 1,
        "404 retried {} times while clients asked",
        platform.requests() - before
    );
    let json = sandbox.credd(&["status", "--json"]).run();
    json.assert_success("credd status --json");
    let value: serde_json::Value = serde_json::from_str(json.stdout.trim())
        .unwrap_or_else(|e| panic!("credd status --json is not JSON ({e}):\n{}", json.stdout));
    assert_eq!(value["platform"], "not_configured", "{value}");
    daemon.stop();
}

#[test]
fn rate_limit_retry_after_is_honoured() {
    let retry_after = 3;
    // Back-off alone would retry within 100 ms.
    let (sandbox, platform, daemon) = start_daemon(
        TestPlatform::start().with_fault(Fault::RateLimited {
            retry_after_secs: retry_after,
        }),
        &["--wait-timeout", "300ms"],
    );
    platform.wait_for_requests(1, WAIT);
    platform.set_fault(Fault::PassThrough);
    // Clients asking in the meantime do not bring the call forward.
    concurrent_gets(&sandbox, 10);
    platform.wait_for_requests(2, WAIT);
    let seen = platform.seen();
    let gap = seen[1].at - seen[0].at;
    // Retry-After counts from the response, which left right after the
    // request arrived; whole seconds, so allow a little rounding.
    assert!(
        gap >= Duration::from_secs(retry_after) - Duration::from_millis(300),
        "second call {gap:?} after a 429 with Retry-After: {retry_after}"
    );
    sandbox.wait_for_token();
    daemon.stop();
}

#[test]
fn hanging_platform_call_is_single_and_clients_get_unavailable() {
    let (sandbox, platform, daemon) = start_daemon(
        TestPlatform::start().with_fault(Fault::Hang),
        &["--wait-timeout", "500ms"],
    );
    platform.wait_for_requests(1, WAIT);
    for answer in concurrent_gets(&sandbox, 20) {
        assert_error(&answer, ErrorCode::Unavailable, "the daemon's answer");
    }
    let get = sandbox.credd_get("https", "github.com");
    get.assert_success("credd get while the platform hangs");
    assert_eq!(get.stdout, "");
    assert_eq!(
        platform.requests(),
        1,
        "no second call while one is in flight (credd get stderr: {:?})",
        get.stderr
    );

    // The hung call completes: its token is served.
    platform.set_fault(Fault::PassThrough);
    let (token, _, _) = sandbox.wait_for_token();
    platform.assert_last_issued(&token, "served the issued token");
    daemon.stop();
}

#[test]
fn non_json_answer_is_transient_and_never_logged() {
    let (sandbox, platform, daemon) = start_daemon(
        TestPlatform::start().with_fault(Fault::NotJson),
        &["--wait-timeout", "300ms"],
    );
    // The body is not a secret, but "no platform response body in a log".
    sandbox.add_secret(
        "the platform's response body",
        "502 Bad Gateway (from a proxy)",
    );
    platform.wait_for_requests(2, WAIT);
    sandbox.assert_get_fails(ErrorCode::Unavailable);
    let status = sandbox.status();
    assert_eq!(status.token.platform.as_str(), "failing", "{status:?}");
    assert!(
        !status
            .token
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("Bad Gateway"),
        "{status:?}"
    );
    platform.set_fault(Fault::PassThrough);
    sandbox.wait_for_token();
    daemon.stop();
}

#[test]
fn token_with_little_life_left_is_served_without_a_refresh_loop() {
    // 90 s of life, under the default 10 min margin but above 60 s minimum.
    let (sandbox, platform, daemon) = start_daemon(
        TestPlatform::start().with_fault(Fault::ShortLife(Duration::from_secs(90))),
        &[],
    );
    let (token, _, _) = sandbox.wait_for_token();
    platform.assert_last_issued(&token, "served the issued token");
    let outputs = concurrent_credd_gets(&sandbox, 20);
    for out in &outputs {
        out.assert_password(&token, "short-lived token");
    }
    let status = sandbox.status();
    let next = status.token.next_refresh_in_secs.unwrap_or(0);
    assert!(
        next >= 5,
        "refresh should come at a fraction of the remaining life, not now: {status:?}"
    );
    assert_eq!(platform.requests(), 1, "no refresh loop");
    daemon.stop();
}

#[test]
fn fifty_concurrent_gets_on_an_empty_cache_make_one_platform_call() {
    // Hold the start-up call so the cache stays empty while clients arrive.
    let (sandbox, platform, daemon) = start_daemon(
        TestPlatform::start().with_fault(Fault::Hang),
        &["--wait-timeout", "5s"],
    );
    platform.wait_for_requests(1, WAIT);
    let outputs: Vec<_> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..50)
            .map(|_| scope.spawn(|| sandbox.credd_get("https", "github.com")))
            .collect();
        // Release the platform call while the clients are starting and
        // waiting: whichever arrive before the answer wait for the one call.
        platform.set_fault(Fault::PassThrough);
        clients
            .into_iter()
            .map(|c| c.join().expect("client thread"))
            .collect()
    });
    let issued = platform.issued();
    assert_eq!(
        platform.requests(),
        1,
        "single flight: one platform call for 50 clients"
    );
    assert_eq!(issued.len(), 1);
    for out in &outputs {
        out.assert_success("credd get");
        out.assert_password(&issued[0].token, "single flight");
    }

    // Empty the cache by erasing the token, then 50 more at once.
    let erase = sandbox
        .credd(&["erase"])
        .stdin(format!(
            "protocol=https\nhost=github.com\nusername=x-access-token\npassword={}\n\n",
            issued[0].token
        ))
        .run();
    erase.assert_success("credd erase");
    assert_eq!(sandbox.status().token.state, Some(TokenState::Missing));
    let outputs = concurrent_credd_gets(&sandbox, 50);
    assert_eq!(
        platform.token_requests(),
        2,
        "one more call after the erase, for 50 clients"
    );
    assert_eq!(
        platform.refusal_reports(),
        1,
        "the refused token was reported"
    );
    let last = platform.last_issued().expect("issued");
    for out in &outputs {
        out.assert_password(&last, "after the erase");
    }
    drop(daemon);
}

#[test]
fn erase_drops_only_the_cached_token() {
    let (sandbox, platform, daemon) = start_daemon(TestPlatform::start(), &[]);
    let (token, _, _) = sandbox.wait_for_token();
    let calls = platform.requests();

    // Another password (an operator's PAT that failed): nothing dropped.
    let other = "ghp_SomeOtherPersonalAccessToken0123";
    sandbox.add_secret("an unrelated password", other);
    let erase = sandbox
        .credd(&["erase"])
        .stdin(format!(
            "protocol=https\nhost=github.com\nusername=x-access-token\npassword={other}\n\n"
        ))
        .run();
    erase.assert_success("credd erase of another password");
    assert_eq!(erase.stdout, "");
    assert_eq!(
        sandbox.request(&Request::Erase {
            sha256: sha256_hex(other.as_bytes())
        }),
        Ok(Response::Erased { dropped: false })
    );
    assert_secret(
        Some(&sandbox.get().expect("still cached").0),
        &token,
        true,
        "still cached",
    );
    assert_eq!(
        platform.requests(),
        calls,
        "no call: the cached token was kept"
    );

    // `store` never changes anything.
    sandbox
        .credd(&["store"])
        .stdin(format!(
            "protocol=https\nhost=github.com\nusername=x-access-token\npassword={token}\n\n"
        ))
        .run()
        .assert_success("credd store");
    assert_eq!(sandbox.status().token.state, Some(TokenState::Valid));

    // The cached one: dropped, and the next get fetches afresh.
    assert_eq!(
        sandbox.request(&Request::Erase {
            sha256: sha256_hex(token.as_bytes())
        }),
        Ok(Response::Erased { dropped: true })
    );
    assert_eq!(sandbox.status().token.state, Some(TokenState::Missing));
    sandbox.wait_for_token();
    assert_eq!(
        platform.token_requests(),
        calls + 1,
        "one fresh fetch after the erase"
    );
    assert_eq!(
        platform.refusal_reports(),
        1,
        "and, before it, a report of the refused token"
    );
    daemon.stop();
}

#[test]
fn sighup_refreshes_now() {
    let (sandbox, platform, daemon) = start_daemon(TestPlatform::start(), &[]);
    sandbox.wait_for_token();
    assert_eq!(platform.requests(), 1);
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    platform.wait_for_requests(2, WAIT);
    sandbox.wait_for_token();
    daemon.stop();
}

#[test]
fn status_shows_state_without_the_token() {
    let (sandbox, _platform, daemon) = start_daemon(TestPlatform::start(), &[]);
    let (token, expires_at, _) = sandbox.wait_for_token();
    let status = sandbox.status();
    assert_eq!(status.pid, daemon.pid());
    assert_eq!(status.token.state, Some(TokenState::Valid));
    assert_eq!(status.token.source, Some(Source::Platform));
    assert_eq!(status.token.expires_at, Some(expires_at));
    assert_eq!(status.token.platform.as_str(), "ok");
    assert_eq!(status.token.platform_calls, 1);
    assert!(status.token.served >= 1);
    assert_eq!(
        status.token.fingerprint.as_deref(),
        Some(&sha256_hex(token.as_bytes())[..12])
    );
    let human = sandbox.credd(&["status"]).run();
    human.assert_success("credd status");
    assert!(!human.stdout.trim().is_empty());
    let json = sandbox.credd(&["status", "--json"]).run();
    json.assert_success("credd status --json");
    let value: serde_json::Value =
        serde_json::from_str(json.stdout.trim()).expect("credd status --json prints JSON");
    assert_eq!(value["platform_calls"], 1, "{value}");
    daemon.stop();
}

#[test]
fn bootstrap_token_is_served_only_for_the_bootstrap_max_age() {
    let (sandbox, _platform) = with_platform(TestPlatform::start_down());
    let env_token = "ghs_ShortLivedBootstrapToken0123456789ab";
    sandbox.add_secret("the bootstrap GITHUB_TOKEN", env_token);
    let started = std::time::SystemTime::now();
    let daemon = sandbox
        .daemon()
        .args(FAST_BACKOFF)
        .args(["--bootstrap-max-age", "2s", "--wait-timeout", "300ms"])
        .env("GITHUB_TOKEN", env_token)
        .start();
    let (token, _, source) = sandbox.get().expect("bootstrap served at first");
    assert_secret(Some(&token), env_token, true, "bootstrap token");
    assert_eq!(source, Source::Env);
    // Its allowed age running out is the behaviour under test.
    wait_until_time(started + Duration::from_millis(2500));
    sandbox.assert_get_fails(ErrorCode::Unavailable);
    let get = sandbox.credd_get("https", "github.com");
    assert_eq!(
        get.stdout, "",
        "the bootstrap token is past its --bootstrap-max-age"
    );
    daemon.stop();
}

#[test]
fn wrong_wall_clock_on_the_platform_does_not_make_a_valid_token_look_dead() {
    // The platform's clock is two hours behind ours: its stated expiry is in
    // our past, yet the token has an hour to live by the platform's Date.
    let (sandbox, platform, daemon) = start_daemon(
        TestPlatform::start().with_fault(Fault::ClockSkew(7200)),
        &[],
    );
    let (token, expires_at, _) = sandbox.wait_for_token();
    platform.assert_last_issued(&token, "served the issued token");
    let status = sandbox.status();
    let left = status.token.expires_in_secs.expect("expires_in_secs");
    assert!(
        (3000..=3600).contains(&left),
        "life left must come from expires_at - Date (~3600 s), not the local clock: {status:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after epoch")
        .as_secs();
    // What git compares with this machine's clock must be on this machine's
    // clock: the platform's stated expiry is two hours in our past.
    assert!(
        expires_at.abs_diff(now + left) <= 5,
        "expires_at ({expires_at}) is local now + life left ({now} + {left})"
    );
    assert_eq!(platform.requests(), 1, "no refresh loop on a skewed clock");
    daemon.stop();
}

#[test]
fn configuration_errors_exit_2_with_the_chain() {
    for (args, env, what) in [
        (&["--refresh-margin", "soon"][..], None, "--refresh-margin"),
        (
            &["--refresh-margin", "30s", "--min-lifetime", "1m"][..],
            None,
            "--refresh-margin",
        ),
        (
            &[][..],
            Some(("PLATFORM_URL", "ftp://platform")),
            "PLATFORM_URL",
        ),
        (
            &[][..],
            Some(("CREDD_SOCKET", "relative.sock")),
            "CREDD_SOCKET",
        ),
    ] {
        let sandbox = Sandbox::new();
        let mut builder = sandbox.daemon().args(args);
        if let Some((key, value)) = env {
            builder = builder.env(key, value);
        }
        let (status, log) = builder.spawn().wait_exit();
        assert_eq!(status.code(), Some(2), "{what}: {status:?}\n{log}");
        assert!(
            log.lines()
                .any(|l| l.starts_with("error:") || l.starts_with("error: ")),
            "{what}: no `error:` line:\n{log}"
        );
        assert!(
            log.contains(what.trim_start_matches("--")),
            "{what} not named:\n{log}"
        );
    }
}

/// The daemon reads only what it uses: `CREDD_HOSTS` and `CREDD_DAEMON_UID`
/// are the helper's (the hosts the gateway's too), so values the helper
/// would refuse stop neither a daemon without `--gateway` nor its serving;
/// with `--gateway` the hosts are its own and a bad list stops it (exit 2).
#[test]
fn helper_only_variables_never_stop_the_daemon() {
    let (sandbox, _platform, daemon) = start_daemon_with(TestPlatform::start(), |daemon| {
        daemon
            .env("CREDD_HOSTS", " , ")
            .env("CREDD_DAEMON_UID", "nobody")
    });
    let (token, _, source) = sandbox.wait_for_token();
    assert!(!token.is_empty());
    assert_eq!(source, Source::Platform);
    daemon.stop();

    let ca = sandbox.path().join("ca.pem");
    let ca = ca.to_str().expect("UTF-8 path");
    let (status, log) = sandbox
        .daemon()
        .env("CREDD_HOSTS", " , ")
        .args(["--gateway", "127.0.0.1:0", "--gateway-ca-file", ca])
        .spawn()
        .wait_exit();
    assert_eq!(status.code(), Some(2), "{status:?}\n{log}");
    assert!(log.contains("CREDD_HOSTS"), "{log}");
}

/// `n` protocol gets at once from threads of this process.
pub(crate) fn concurrent_gets(sandbox: &Sandbox, n: usize) -> Vec<Response> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| scope.spawn(|| sandbox.request(&Request::GET_DEFAULT).expect("answer")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    })
}

/// `n` `credd get` processes at once.
pub(crate) fn concurrent_credd_gets(sandbox: &Sandbox, n: usize) -> Vec<CmdOutput> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| scope.spawn(|| sandbox.credd_get("https", "github.com")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    })
}
