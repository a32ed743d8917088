//! `credd get | store | erase` and the fallback chain.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;

use credd_core::protocol::{ErrorCode, Request, Response};
use credd_core::secret::sha256_hex;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

use testkit::{Fault, TestPlatform};

use crate::support::{
    Credd, DAEMON_EXPIRY, DAEMON_TOKEN, FakeDaemon, Reply, assert_platform_answer, credd_sandbox,
    credd_sandbox_with, expected_answer, fill_backlog,
};

#[test]
fn get_is_answered_by_the_daemon() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());
    let daemon = FakeDaemon::with_token(&sandbox.socket());

    let run = sandbox.run(
        &["get"],
        "capability[]=authtype\nprotocol=https\nhost=github.com\nwwwauth[]=Basic realm=\"x\"\n\n",
    );
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, expected_answer(DAEMON_TOKEN, DAEMON_EXPIRY));
    assert_eq!(run.stderr, "", "the hot path is silent");
    assert_eq!(daemon.requests(), [Request::GET_DEFAULT]);
    assert_eq!(
        platform.requests(),
        0,
        "the daemon answered: no platform call"
    );
}

#[test]
fn get_answers_without_a_trailing_blank_line() {
    let sandbox = credd_sandbox();
    let daemon = FakeDaemon::with_token(&sandbox.socket());
    let run = sandbox.run(&["get"], "protocol=https\r\nhost=GitHub.com");
    assert_eq!(
        run.stdout,
        expected_answer(DAEMON_TOKEN, DAEMON_EXPIRY),
        "{run:?}"
    );
    assert_eq!(daemon.requests(), [Request::GET_DEFAULT]);
}

#[test]
fn get_stays_silent_for_other_hosts_and_clear_text() {
    let sandbox = credd_sandbox();
    sandbox.set_hosts("github.com,127.0.0.1:8080");
    let daemon = FakeDaemon::with_token(&sandbox.socket());
    for (protocol, host) in [
        ("https", "example.com"),
        ("http", "github.com"),
        ("ssh", "github.com"),
        ("https", "github.com.evil.com"),
        ("http", "127.0.0.1:9999"),
    ] {
        let run = sandbox.credd_get(protocol, host);
        assert_eq!(run.code(), Some(0), "{protocol}://{host}: {run:?}");
        assert_eq!(run.stdout, "", "{protocol}://{host}");
        assert_eq!(run.stderr, "", "{protocol}://{host}");
    }
    assert_eq!(
        daemon.connections(),
        0,
        "no socket traffic for hosts we do not serve"
    );

    let loopback = sandbox.credd_get("http", "127.0.0.1:8080");
    assert_eq!(
        loopback.stdout,
        expected_answer(DAEMON_TOKEN, DAEMON_EXPIRY)
    );
}

#[test]
fn malformed_input_gets_one_line_and_no_answer() {
    let sandbox = credd_sandbox();
    let daemon = FakeDaemon::with_token(&sandbox.socket());
    // A line longer than any git sends (the longest is a `password=` with
    // the longest token credd-core allows).
    let huge = format!(
        "protocol=https\nhost=github.com\npath={}\n\n",
        "p".repeat(credd_core::secret::MAX_TOKEN_LEN + 4096)
    );
    for input in [
        "protocol=https\nhost=github.com\nghs_notkeyvalue\n\n".to_owned(),
        huge,
        "capability[]=x\n".repeat(101),
    ] {
        let run = sandbox.run(&["get"], &input);
        assert_eq!(run.code(), Some(0), "{run:?}");
        assert_eq!(run.stdout, "");
        let lines = run.stderr_lines();
        assert_eq!(lines.len(), 1, "{run:?}");
        assert!(
            lines[0].starts_with("credd: ignoring git's input"),
            "{run:?}"
        );
        sandbox.assert_no_secrets();
    }
    assert_eq!(daemon.connections(), 0);
}

#[test]
fn daemon_down_falls_back_to_the_platform() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());

    let run = sandbox.credd_get("https", "github.com");
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_platform_answer(&run, &platform);
    let lines = run.stderr_lines();
    assert_eq!(lines.len(), 1, "{run:?}");
    assert!(
        lines[0].starts_with(&format!(
            "credd: molecule-credd not reachable at {} (no socket",
            sandbox.socket().display()
        )),
        "{run:?}"
    );
    assert!(
        lines[0].ends_with("; asking the platform directly"),
        "{run:?}"
    );
    sandbox.assert_no_secrets();
    assert_eq!(platform.requests(), 1);
}

#[test]
fn stale_socket_with_nobody_listening_falls_back() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());
    drop(UnixListener::bind(sandbox.socket()).expect("bind"));
    assert!(sandbox.socket().exists(), "the socket file stays behind");

    let run = sandbox.credd_get("https", "github.com");
    assert_platform_answer(&run, &platform);
    assert!(run.stderr.contains("connection refused"), "{run:?}");
    assert_eq!(platform.requests(), 1);
}

#[test]
fn daemon_unavailable_means_no_platform_call() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());
    let daemon = FakeDaemon::answering(
        &sandbox.socket(),
        Response::Error {
            code: ErrorCode::Unavailable,
            message: "the platform failed (HTTP 500); retrying in 4s".into(),
        },
    );

    let run = sandbox.credd_get("https", "github.com");
    assert_eq!(
        run.code(),
        Some(0),
        "get exits 0 so git tries its next helper: {run:?}"
    );
    assert_eq!(run.stdout, "");
    let lines = run.stderr_lines();
    assert_eq!(lines.len(), 1, "{run:?}");
    assert!(lines[0].starts_with("credd: molecule-credd at "), "{run:?}");
    assert!(
        lines[0].contains("unavailable: the platform failed (HTTP 500); retrying in 4s"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("asking the platform"), "{run:?}");
    assert_eq!(daemon.requests(), [Request::GET_DEFAULT]);
    assert_eq!(
        platform.requests(),
        0,
        "the daemon is already retrying the platform"
    );
}

#[test]
fn daemon_with_a_full_backlog_misses_the_connect_deadline_then_falls_back() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());
    // A listener that never accepts, with room for one pending connection,
    // which the test takes: credd's connect(2) then blocks on the backlog.
    let listener = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    socket::bind(
        listener.as_raw_fd(),
        &UnixAddr::new(&sandbox.socket()).expect("address"),
    )
    .expect("bind");
    socket::listen(&listener, Backlog::new(0).expect("backlog")).expect("listen");
    let _pending = fill_backlog(&sandbox.socket());

    let run = sandbox.credd_get("https", "github.com");
    assert_platform_answer(&run, &platform);
    let lines = run.stderr_lines();
    assert_eq!(lines.len(), 1, "{run:?}");
    assert!(
        lines[0].contains("connect did not complete within 250 ms"),
        "{run:?}"
    );
    assert_eq!(platform.requests(), 1);
}

#[test]
fn daemon_that_never_answers_hits_the_read_deadline_then_falls_back() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());
    let daemon = FakeDaemon::start(&sandbox.socket(), |_| Reply::Silence);

    let run = sandbox.credd_get("https", "github.com");
    assert_platform_answer(&run, &platform);
    let lines = run.stderr_lines();
    assert_eq!(lines.len(), 1, "{run:?}");
    assert!(lines[0].contains("no answer within 6 s"), "{run:?}");
    assert_eq!(daemon.requests(), [Request::GET_DEFAULT]);
    assert_eq!(platform.requests(), 1);
}

#[test]
fn garbage_from_the_daemon_is_not_echoed_and_falls_back() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());
    for garbage in [
        b"password=ghs_garbage0123 Bearer x\n".to_vec(),
        b"{\"v\":1,\"type\":\"token\",\"token\":\"ghs_garbage0123\"}\n".to_vec(),
        b"{\"v\":99,\"type\":\"token\"}\n".to_vec(),
        vec![b'x'; 100_000],
        Vec::new(),
    ] {
        let socket = sandbox.socket();
        let _ = std::fs::remove_file(&socket);
        let _daemon = FakeDaemon::start(&socket, move |_| Reply::Line(garbage.clone()));
        let run = sandbox.credd_get("https", "github.com");
        assert_platform_answer(&run, &platform);
        let lines = run.stderr_lines();
        assert_eq!(lines.len(), 1, "{run:?}");
        assert!(
            lines[0].contains("gave an answer credd cannot use"),
            "{run:?}"
        );
        assert!(!run.stderr.contains("garbage"), "{run:?}");
        sandbox.assert_no_secrets();
    }
    assert_eq!(platform.requests(), 5);
}

#[test]
fn daemon_and_platform_both_failing_prints_nothing() {
    let (sandbox, platform) =
        credd_sandbox_with(TestPlatform::start().with_fault(Fault::Status(500)));

    let run = sandbox.credd_get("https", "github.com");
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, "");
    let lines = run.stderr_lines();
    assert_eq!(lines.len(), 2, "{run:?}");
    assert!(
        lines[1].starts_with("credd: the platform gave no token either: "),
        "{run:?}"
    );
    assert!(lines[1].contains("HTTP 500"), "{run:?}");
    sandbox.assert_no_secrets();
    assert_eq!(platform.requests(), 1);

    // Unreachable platform: a refused connection, reported without secrets.
    let nowhere = credd_sandbox();
    let run = nowhere.credd_get("https", "github.com");
    assert_eq!((run.code(), run.stdout.as_str()), (Some(0), ""), "{run:?}");
    assert!(run.stderr.contains("cannot reach the platform"), "{run:?}");
    nowhere.assert_no_secrets();
}

#[test]
fn erase_sends_the_rejected_passwords_hash() {
    let sandbox = credd_sandbox();
    let daemon = FakeDaemon::with_token(&sandbox.socket());
    let rejected = "ghs_rejected0123456789";

    let run = sandbox.run(
        &["erase"],
        &format!(
            "protocol=https\nhost=github.com\nusername=x-access-token\npassword={rejected}\n\n"
        ),
    );
    assert_eq!(
        (run.code(), run.stdout.as_str(), run.stderr.as_str()),
        (Some(0), "", "")
    );
    assert_eq!(
        daemon.requests(),
        [Request::Erase {
            sha256: sha256_hex(rejected.as_bytes())
        }]
    );

    // Not ours, or nothing to erase: no request at all.
    sandbox.run(
        &["erase"],
        &format!("protocol=https\nhost=example.com\npassword={rejected}\n"),
    );
    sandbox.run(&["erase"], "protocol=https\nhost=github.com\n\n");
    sandbox.run(
        &["store"],
        &format!("protocol=https\nhost=github.com\npassword={rejected}\n"),
    );
    assert_eq!(daemon.requests().len(), 1, "{:?}", daemon.requests());
}

#[test]
fn erase_with_the_daemon_down_is_silent() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());
    let run = sandbox.run(
        &["erase"],
        "protocol=https\nhost=github.com\npassword=ghs_x\n\n",
    );
    assert_eq!(
        (run.code(), run.stdout.as_str(), run.stderr.as_str()),
        (Some(0), "", "")
    );
    assert_eq!(platform.requests(), 0, "erase never calls the platform");
}

#[test]
fn unknown_actions_are_silent() {
    let sandbox = credd_sandbox();
    let daemon = FakeDaemon::with_token(&sandbox.socket());
    let run = sandbox.run(&["frobnicate"], "protocol=https\nhost=github.com\n\n");
    assert_eq!(
        (run.code(), run.stdout.as_str(), run.stderr.as_str()),
        (Some(0), "", "")
    );
    assert_eq!(daemon.connections(), 0);
}

#[test]
fn daemon_refusals_decide_whether_the_platform_is_asked() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());
    for (code, falls_back) in [
        (ErrorCode::Forbidden, false),
        (ErrorCode::Busy, false),
        (ErrorCode::UnsupportedVersion, true),
        (ErrorCode::BadRequest, true),
    ] {
        let socket = sandbox.socket();
        let _ = std::fs::remove_file(&socket);
        let _daemon = FakeDaemon::answering(
            &socket,
            Response::Error {
                code,
                message: "refused\nby the test".into(),
            },
        );
        let before = platform.requests();
        let run = sandbox.credd_get("https", "github.com");
        assert_eq!(run.code(), Some(0), "{code:?}: {run:?}");
        let lines = run.stderr_lines();
        assert!(
            lines[0].contains("refused by the test"),
            "{code:?}: {run:?}"
        );
        if falls_back {
            assert_platform_answer(&run, &platform);
            assert_eq!(platform.requests(), before + 1, "{code:?}");
        } else {
            assert_eq!(
                (run.stdout.as_str(), lines.len()),
                ("", 1),
                "{code:?}: {run:?}"
            );
            assert_eq!(
                platform.requests(),
                before,
                "{code:?} must not reach the platform"
            );
        }
        sandbox.assert_no_secrets();
    }
}

fn get_for(repository: Option<&str>, owner: Option<&str>) -> Request {
    Request::Get {
        repository: repository.map(str::to_owned),
        owner: owner.map(str::to_owned),
    }
}

#[test]
fn get_asks_for_the_repository_git_names_in_its_path() {
    let sandbox = credd_sandbox();
    let daemon = FakeDaemon::with_token(&sandbox.socket());
    for path in ["acme/api.git", "acme/api", "acme/api.git/info/lfs"] {
        let run = sandbox.run(
            &["get"],
            &format!("protocol=https\nhost=github.com\npath={path}\n\n"),
        );
        assert_eq!(
            run.stdout,
            expected_answer(DAEMON_TOKEN, DAEMON_EXPIRY),
            "{run:?}"
        );
    }
    // A path that does not name OWNER/NAME: the default token, as before.
    sandbox.run(
        &["get"],
        "protocol=https\nhost=github.com\npath=just-one\n\n",
    );
    assert_eq!(
        daemon.requests(),
        [
            get_for(Some("acme/api"), None),
            get_for(Some("acme/api"), None),
            get_for(Some("acme/api"), None),
            Request::GET_DEFAULT
        ]
    );
}

#[test]
fn a_repository_outside_the_grant_gets_nothing_and_no_fallback() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());
    let _daemon = FakeDaemon::answering(
        &sandbox.socket(),
        Response::Error {
            code: ErrorCode::NotGranted,
            message: "the grant does not cover evil/x".into(),
        },
    );
    let run = sandbox.run(
        &["get"],
        "protocol=https\nhost=github.com\npath=evil/x.git\n\n",
    );
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, "", "git falls through to its next helper");
    assert!(run.stderr.contains("not_granted"), "{run:?}");
    assert_eq!(
        platform.requests(),
        0,
        "a definite answer: no fallback call"
    );
}

#[test]
fn token_and_exec_take_a_repository_or_an_owner() {
    let sandbox = credd_sandbox();
    let daemon = FakeDaemon::with_token(&sandbox.socket());
    for args in [
        &["token", "--repo", "acme/api"][..],
        &["token", "--owner=acme-labs"],
        &["exec", "--repo=acme/web", "--", "true"],
        &["token"],
    ] {
        let run = sandbox.run(args, "");
        assert_eq!(run.code(), Some(0), "{args:?}: {run:?}");
    }
    assert_eq!(
        daemon.requests(),
        [
            get_for(Some("acme/api"), None),
            get_for(None, Some("acme-labs")),
            get_for(Some("acme/web"), None),
            Request::GET_DEFAULT
        ]
    );
    for bad in [
        &["token", "--repo", "acme"][..],
        &["token", "--repo"],
        &["token", "--owner", "-x"],
        &["token", "--repo", "a/b", "--owner", "a"],
        &["token", "extra"],
    ] {
        let run = sandbox.run(bad, "");
        assert_eq!(run.code(), Some(2), "{bad:?}: {run:?}");
        assert!(run.stderr.starts_with("credd: "), "{run:?}");
    }
    assert_eq!(daemon.requests().len(), 4, "usage errors ask nothing");
}
