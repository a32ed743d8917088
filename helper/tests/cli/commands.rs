//! `credd token | exec | status | configure-git | --help | --version`.

use std::path::Path;
use std::process::Command;

use credd_core::protocol::{ErrorCode, Request, Response, Source, Status, TokenState};

use testkit::{Cmd, TestPlatform};

use crate::support::{Credd, DAEMON_TOKEN, FakeDaemon, credd_sandbox, credd_sandbox_with};

#[test]
fn token_prints_the_token_and_a_newline() {
    let sandbox = credd_sandbox();
    let daemon = FakeDaemon::with_token(&sandbox.socket());
    let run = sandbox.run(&["token"], "");
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, format!("{DAEMON_TOKEN}\n"));
    assert_eq!(run.stderr, "");
    assert_eq!(daemon.requests(), [Request::GET_DEFAULT]);
}

#[test]
fn token_falls_back_to_the_platform_when_the_daemon_is_down() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());
    let run = sandbox.run(&["token"], "");
    assert_eq!(run.code(), Some(0), "{run:?}");
    let token = platform.last_issued().expect("the platform was asked");
    assert!(
        run.stdout == format!("{token}\n"),
        "the platform's token and a newline: {run:?}"
    );
    assert_eq!(run.stderr_lines().len(), 1, "{run:?}");
    sandbox.assert_no_secrets();
}

#[test]
fn token_exits_1_with_a_reason_when_none_can_be_had() {
    let (sandbox, platform) = credd_sandbox_with(TestPlatform::start());
    let _daemon = FakeDaemon::answering(
        &sandbox.socket(),
        Response::Error {
            code: ErrorCode::Unavailable,
            message: "the platform refused the workspace bearer (HTTP 401)".into(),
        },
    );
    let run = sandbox.run(&["token"], "");
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("HTTP 401"), "{run:?}");
    assert!(
        run.stderr.contains("credd: error: no token available"),
        "{run:?}"
    );
    sandbox.assert_no_secrets();
    assert_eq!(platform.requests(), 0);

    let down = credd_sandbox(); // no daemon, platform unreachable
    let run = down.run(&["token"], "");
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert_eq!(run.stdout, "");
    down.assert_no_secrets();
}

#[test]
fn exec_passes_the_token_in_the_environment_and_the_exit_code_back() {
    let sandbox = credd_sandbox();
    let _daemon = FakeDaemon::with_token(&sandbox.socket());
    // The child prints its token variables and its own argv (from /proc), then
    // exits 7: credd must put the token in the environment and nowhere else.
    let script = r#"printf '%s\n%s\n' "$GH_TOKEN" "$GITHUB_TOKEN"; tr '\0' ' ' < /proc/$$/cmdline >&2; exit 7"#;
    let run = sandbox.run(&["exec", "--", "sh", "-c", script], "");
    assert_eq!(run.code(), Some(7), "{run:?}");
    assert_eq!(run.stdout, format!("{DAEMON_TOKEN}\n{DAEMON_TOKEN}\n"));
    assert!(
        run.stderr.starts_with("sh -c "),
        "the child's argv: {run:?}"
    );
    sandbox.assert_no_secrets();

    let ok = sandbox.run(&["exec", "true"], "");
    assert_eq!(ok.code(), Some(0), "{ok:?}");
}

#[test]
fn exec_of_a_missing_command_exits_127() {
    let sandbox = credd_sandbox();
    let _daemon = FakeDaemon::with_token(&sandbox.socket());
    let run = sandbox.run(&["exec", "--", "credd-no-such-command-xyz", "arg"], "");
    assert_eq!(run.code(), Some(127), "{run:?}");
    assert!(
        run.stderr
            .contains("credd-no-such-command-xyz: command not found"),
        "{run:?}"
    );
    sandbox.assert_no_secrets();

    let usage = sandbox.run(&["exec", "--"], "");
    assert_eq!(usage.code(), Some(2), "{usage:?}");
}

#[test]
fn exec_without_a_token_does_not_run_the_command() {
    let sandbox = credd_sandbox();
    let _daemon = FakeDaemon::answering(
        &sandbox.socket(),
        Response::Error {
            code: ErrorCode::Unavailable,
            message: "no token yet".into(),
        },
    );
    let marker = sandbox.path().join("ran");
    let run = sandbox.run(
        &["exec", "--", "touch", marker.to_str().expect("UTF-8")],
        "",
    );
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(!marker.exists(), "the command must not run without a token");
}

fn sample_status() -> Status {
    Status {
        version: "9.9.9".into(),
        pid: 4242,
        uptime_secs: 125,
        token: credd_core::protocol::TokenStatus {
            state: Some(TokenState::Valid),
            source: Some(Source::Env),
            fingerprint: Some("abcdef012345".into()),
            expires_at: Some(1_900_000_000),
            expires_in_secs: Some(600),
            next_refresh_in_secs: Some(60),
            last_refresh_at: None,
            last_error: Some("cannot reach the platform".into()),
            platform: credd_core::protocol::PlatformHealth::Failing,
            platform_calls: 3,
            served: 17,
            ..Default::default()
        },
        owners: Vec::new(),
        counters: None,
    }
}

#[test]
fn status_shows_the_daemon_state_for_people_and_scripts() {
    let sandbox = credd_sandbox();
    let daemon = FakeDaemon::answering(
        &sandbox.socket(),
        Response::Status(Box::new(sample_status())),
    );

    let human = sandbox.run(&["status"], "");
    assert_eq!(human.code(), Some(0), "{human:?}");
    for expected in [
        "state:          valid",
        "source:         env",
        "fingerprint:    abcdef012345",
        "expires:        in 10m",
        "next refresh:   in 1m",
        "last refresh:   never",
        "last error:     cannot reach the platform",
        "platform:       failing",
        "platform calls: 3",
        "served:         17",
        "uptime:         2m 5s",
        "molecule-credd 9.9.9 (pid 4242)",
    ] {
        assert!(
            human.stdout.contains(expected),
            "{expected:?} in\n{}",
            human.stdout
        );
    }

    let json = sandbox.run(&["status", "--json"], "");
    assert_eq!(json.code(), Some(0), "{json:?}");
    let parsed: Status = serde_json::from_str(&json.stdout).expect("status --json is a Status");
    assert_eq!(parsed, sample_status());
    assert_eq!(daemon.requests(), [Request::Status, Request::Status]);
}

#[test]
fn status_exits_1_when_the_daemon_is_unreachable() {
    let sandbox = credd_sandbox();
    let run = sandbox.run(&["status"], "");
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr
            .starts_with("credd: error: molecule-credd not reachable at "),
        "{run:?}"
    );
    let usage = sandbox.run(&["status", "--yaml"], "");
    assert_eq!(usage.code(), Some(2), "{usage:?}");
}

fn helpers(git_config: &[&str], key: &str, home: &Path) -> Vec<String> {
    let output = Command::new("git")
        .arg("config")
        .args(git_config)
        .args(["--get-all", key])
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("run git");
    assert!(
        output.status.success(),
        "git config --get-all {key}: {output:?}"
    );
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn configure_git_writes_the_helper_list_idempotently() {
    let sandbox = credd_sandbox();
    sandbox.set_hosts("github.com,ghe.example.com:8443");
    let file = sandbox.path().join("gitconfig");
    let file_arg = file.to_str().expect("UTF-8");
    let home = sandbox.path().join("home");
    // An earlier helper for the host must be replaced, not kept.
    let seeded = Command::new("git")
        .args([
            "config",
            "--file",
            file_arg,
            "--add",
            "credential.https://github.com.helper",
            "store",
        ])
        .status()
        .expect("git");
    assert!(seeded.success());

    let credd = env!("CARGO_BIN_EXE_credd");
    let file_flag = format!("--file={file_arg}");
    // The same request twice, in both option spellings.
    let rounds: [&[&str]; 2] = [
        &[
            "configure-git",
            "--fallback-helper",
            "store --file /tmp/pat",
            "--file",
            file_arg,
        ],
        &[
            "configure-git",
            "--fallback-helper=store --file /tmp/pat",
            &file_flag,
        ],
    ];
    for (round, args) in rounds.iter().enumerate() {
        let run = sandbox.run(args, "");
        assert_eq!(run.code(), Some(0), "round {round}: {run:?}");
        for host in ["github.com", "ghe.example.com:8443"] {
            let key = format!("credential.https://{host}.helper");
            assert_eq!(
                helpers(&["--file", file_arg], &key, &home),
                [
                    "",
                    credd,
                    &format!("{credd} fallback 'store --file /tmp/pat'")
                ],
                "round {round}, {key}"
            );
            // git tells credd the repository, once.
            let path_key = format!("credential.https://{host}.useHttpPath");
            assert_eq!(
                helpers(&["--file", file_arg], &path_key, &home),
                ["true"],
                "round {round}, {path_key}"
            );
        }
    }
    assert!(
        !home.join(".gitconfig").exists(),
        "--file leaves the global config alone"
    );

    // Without --file: the global config in $HOME, without a fallback.
    for _ in 0..2 {
        let run = sandbox.run(&["configure-git"], "");
        assert_eq!(run.code(), Some(0), "{run:?}");
    }
    assert_eq!(
        helpers(&["--global"], "credential.https://github.com.helper", &home),
        ["", credd]
    );
}

#[test]
fn configure_git_failures_say_what_to_do() {
    let sandbox = credd_sandbox();
    let not_a_file = sandbox.path().join("no/such/dir/gitconfig");
    let run = sandbox.run(
        &[
            "configure-git",
            "--file",
            not_a_file.to_str().expect("UTF-8"),
        ],
        "",
    );
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(run.stderr.starts_with("credd: error: "), "{run:?}");
    assert!(run.stderr.contains("pass --file PATH"), "{run:?}");
    let usage = sandbox.run(&["configure-git", "--fallback-helper"], "");
    assert_eq!(usage.code(), Some(2), "{usage:?}");
}

#[test]
fn help_and_version() {
    let sandbox = credd_sandbox();
    for flag in ["--help", "help", "-h"] {
        let run = sandbox.run(&[flag], "");
        assert_eq!(run.code(), Some(0), "{run:?}");
        assert!(run.stdout.contains("credd configure-git"), "{run:?}");
    }
    let version = sandbox.run(&["--version"], "");
    assert_eq!(
        version.stdout,
        format!("credd {}\n", env!("CARGO_PKG_VERSION"))
    );
    let none = sandbox.run(&[], "");
    assert_eq!(none.code(), Some(2), "{none:?}");
}

/// A reader that went away (`credd status | head -0`) ends credd with one
/// exit code and no panic (Rust's `print!` panics on `EPIPE`).
#[test]
fn a_closed_stdout_is_exit_1_not_a_panic() {
    let sandbox = credd_sandbox();
    let daemon = FakeDaemon::with_token(&sandbox.socket());
    for args in [
        &["--help"][..],
        &["--version"],
        &["status"],
        &["status", "--json"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let output = sandbox.credd(args).stdout(writer).run();
        let stderr = &output.stderr;
        assert_eq!(output.code(), Some(1), "credd {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "credd {args:?}: {stderr}");
    }
    drop(daemon);
}

/// `molecule-credd --fetch-once` that never answers (a stalled filesystem
/// under it): credd kills it at its deadline instead of holding git forever.
#[test]
fn a_fetch_once_that_never_answers_is_killed_at_the_deadline() {
    let sandbox = credd_sandbox();
    // credd runs the molecule-credd next to itself: a copy of credd beside a
    // stand-in that hangs.
    let bin = sandbox.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    std::fs::copy(env!("CARGO_BIN_EXE_credd"), bin.join("credd")).expect("copy credd");
    let hang = bin.join("molecule-credd");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 600\n").expect("stand-in");
    std::fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    // No daemon at the sandbox's socket: credd falls back to the stand-in.
    let mut command = sandbox.command(bin.join("credd"));
    command.arg("token");
    let started = std::time::Instant::now();
    let run = Cmd::new(command, "credd token (copy)")
        .stdin("")
        .transcript(sandbox.transcript())
        .run();
    let took = started.elapsed();
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(run.stderr.contains("killed it"), "{}", run.stderr);
    assert!(
        took < std::time::Duration::from_secs(30),
        "returned after {took:?}"
    );
}

/// The real binary's environment for an Enterprise host (gh reads only
/// `GH_ENTERPRISE_TOKEN` there): given to a `GH_HOST` in `CREDD_HOSTS`,
/// never to one outside it, and a stale inherited value never survives.
#[test]
fn exec_gives_the_enterprise_token_only_to_a_host_credd_serves() {
    let sandbox = credd_sandbox();
    sandbox.set_hosts("github.com,ghe.example.com");
    let _daemon = FakeDaemon::with_token(&sandbox.socket());
    let script = r#"printf '%s|%s|%s\n' "${GH_HOST-}" "${GH_ENTERPRISE_TOKEN-unset}" "${GITHUB_ENTERPRISE_TOKEN-unset}""#;
    let exec = |gh_host: &str| {
        let mut cmd = sandbox
            .credd(&["exec", "--", "sh", "-c", script])
            .stdout_holds_secret();
        cmd.command()
            .env("GH_HOST", gh_host)
            .env("GH_ENTERPRISE_TOKEN", "stale-inherited-value");
        cmd.run()
    };
    let served = exec("ghe.example.com");
    served.assert_success("credd exec for a served Enterprise host");
    assert_eq!(
        served.stdout,
        format!("ghe.example.com|{DAEMON_TOKEN}|{DAEMON_TOKEN}\n")
    );
    let stray = exec("other-ghes.example");
    stray.assert_success("credd exec for a host credd does not serve");
    assert_eq!(stray.stdout, "other-ghes.example|unset|unset\n");
}

/// Issue 20, item 9, as attacked: with only an Enterprise host in
/// `CREDD_HOSTS`, a stray `GH_HOST=github.com` (or two Enterprise hosts and
/// no `GH_HOST`) used to put the Enterprise token in `GH_TOKEN`, which gh
/// sends to github.com. `GH_TOKEN`/`GITHUB_TOKEN` now carry the token only
/// when github.com is in `CREDD_HOSTS`; with nowhere to put it, the command
/// does not run and no token is fetched.
#[test]
fn exec_never_hands_an_enterprise_token_to_github_com() {
    let sandbox = credd_sandbox();
    let daemon = FakeDaemon::with_token(&sandbox.socket());
    let script = r#"printf '%s|%s|%s|%s|%s\n' "${GH_HOST-}" "${GH_TOKEN-unset}" "${GITHUB_TOKEN-unset}" "${GH_ENTERPRISE_TOKEN-unset}" "${GITHUB_ENTERPRISE_TOKEN-unset}""#;
    let exec = |hosts: &str, gh_host: Option<&str>| {
        sandbox.set_hosts(hosts);
        let mut cmd = sandbox
            .credd(&["exec", "--", "sh", "-c", script])
            .stdout_holds_secret();
        cmd.command()
            .env("GH_TOKEN", "stale-inherited-value")
            .env("GITHUB_TOKEN", "stale-inherited-value");
        if let Some(host) = gh_host {
            cmd.command().env("GH_HOST", host);
        }
        cmd.run()
    };

    for (hosts, gh_host) in [
        ("ghe.example.com", Some("github.com")),
        ("ghe-a.example.com,ghe-b.example.com", None),
    ] {
        let asked = daemon.requests().len();
        let refused = exec(hosts, gh_host);
        assert_eq!(refused.code(), Some(1), "{hosts} {gh_host:?}: {refused:?}");
        assert_eq!(refused.stdout, "", "the command did not run");
        assert!(
            refused.stderr.starts_with("credd: error: not running sh: "),
            "{refused:?}"
        );
        assert_eq!(daemon.requests().len(), asked, "no token was fetched");
    }

    // The only host is Enterprise: its variables, and nothing for github.com.
    let only = exec("ghe.example.com", None);
    only.assert_success("credd exec with one Enterprise host");
    assert_eq!(
        only.stdout,
        format!("ghe.example.com|unset|unset|{DAEMON_TOKEN}|{DAEMON_TOKEN}\n")
    );
    // Two Enterprise hosts, GH_HOST names one.
    let named = exec(
        "ghe-a.example.com,ghe-b.example.com",
        Some("ghe-b.example.com"),
    );
    named.assert_success("credd exec with GH_HOST naming a served Enterprise host");
    assert_eq!(
        named.stdout,
        format!("ghe-b.example.com|unset|unset|{DAEMON_TOKEN}|{DAEMON_TOKEN}\n")
    );
    // github.com listed: GH_TOKEN as before.
    let both = exec("github.com,ghe.example.com", None);
    both.assert_success("credd exec with github.com served");
    assert_eq!(
        both.stdout,
        format!("|{DAEMON_TOKEN}|{DAEMON_TOKEN}|unset|unset\n")
    );
    sandbox.assert_no_secrets();
}

/// `credd fallback HELPER ACTION` (what configure-git installs): `get` goes
/// to the helper without `path`; `store` and `erase` of credd's credentials
/// (username `x-access-token`, or an expiry) never reach it, except an
/// `erase` of the helper's own credential; anyone else's are passed on.
#[test]
fn fallback_passes_on_only_what_the_helper_may_see() {
    let sandbox = credd_sandbox();
    let seen = sandbox.path().join("seen");
    std::fs::create_dir(&seen).expect("mkdir");
    let helper = format!(
        "!f() {{ cat > '{dir}'/\"$1\"; [ \"$1\" = get ] && printf 'username=x-access-token\\npassword=ghp_theFallbacksOwn\\n'; true; }}; f",
        dir = seen.display()
    );
    let run = |action: &str, input: &str| {
        let _ = std::fs::remove_file(seen.join(action));
        let out = sandbox.run(&["fallback", &helper, action], input);
        assert_eq!(out.code(), Some(0), "{out:?}");
        (out, std::fs::read_to_string(seen.join(action)).ok())
    };
    let (get, asked) = run(
        "get",
        "protocol=https\nhost=github.com\npath=acme/api.git\n",
    );
    assert_eq!(
        get.stdout,
        "username=x-access-token\npassword=ghp_theFallbacksOwn\n"
    );
    assert_eq!(asked.as_deref(), Some("protocol=https\nhost=github.com\n"));

    let typed =
        "protocol=https\nhost=github.com\npath=acme/api.git\nusername=alice\npassword=typed\n";
    let (_, stored) = run("store", typed);
    assert_eq!(
        stored.as_deref(),
        Some("protocol=https\nhost=github.com\nusername=alice\npassword=typed\n")
    );
    for credds in [
        "protocol=https\nhost=github.com\nusername=x-access-token\npassword=ghs_fromCredd\n",
        "protocol=https\nhost=github.com\nusername=bot\npassword=ghs_fromCredd\npassword_expiry_utc=1900000000\n",
    ] {
        assert_eq!(run("store", credds).1, None, "not stored: {credds:?}");
        let (_, erased) = run("erase", credds);
        assert_eq!(erased, None, "not erased: {credds:?}");
    }
    // Its own x-access-token credential refused: erased.
    let own =
        "protocol=https\nhost=github.com\nusername=x-access-token\npassword=ghp_theFallbacksOwn\n";
    assert_eq!(run("erase", own).1.as_deref(), Some(own));
    sandbox.assert_no_secrets();
}

/// Every command with options reads them by one lexer: the same spelling
/// rules, and a usage error (exit 2, one line naming the problem) for each
/// way of getting them wrong, before anything is asked of the daemon.
#[test]
fn option_mistakes_are_usage_errors_naming_the_problem() {
    let sandbox = credd_sandbox();
    for (args, says) in [
        (&["token", "--repo"][..], "--repo needs a value"),
        (&["token", "--owner="], "--owner needs a value"),
        (
            &["token", "--repo=acme/api", "--owner", "acme"],
            "takes one of --repo and --owner",
        ),
        (
            &["token", "--owner", "not an owner"],
            "--owner \"not an owner\"",
        ),
        (&["token", "--repo", "acme"], "--repo \"acme\""),
        (&["token", "stray"], "takes only --repo or --owner"),
        (&["exec", "--owner=acme", "--bogus"], "has no option"),
        (&["configure-git", "--file="], "--file needs a path"),
        (
            &["configure-git", "--nope", "x"],
            "has no option \"--nope\"",
        ),
        (&["configure-git", "stray"], "has no option \"stray\""),
    ] {
        let run = sandbox.run(args, "");
        assert_eq!(run.code(), Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.contains(says), "{args:?}: {run:?}");
        assert_eq!(
            run.stderr.lines().filter(|l| l.contains(says)).count(),
            1,
            "{run:?}"
        );
    }
}
