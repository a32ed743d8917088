//! The real `molecule-platform` binary: start-up lines, dev mode, GitHub
//! mode against the stand-in, refusing bad configuration, signals, process
//! hardening (non-dumpable, `ADMIN_TOKEN` out of the environment) and clap's
//! output on a closed stdout.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use nix::sys::signal::Signal;
use testkit::{Cmd, PlatformProcess};

use crate::support::{
    GitHubStandIn, INSTALLATION_ID, Mode, assert_no_secrets, http, keys, run_to_exit, sha256_hex,
};

const ADMIN_ROUTE: &str = "/admin/github-installation-token";

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

async fn get(url: &str, bearer: Option<&str>) -> (u16, serde_json::Value) {
    let mut request = http().get(url);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    (status, serde_json::from_slice(&bytes).expect("JSON body"))
}

#[tokio::test]
async fn dev_mode_serves_tokens_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = dir.path().join("configs");
    let token_file = configs.join(".auth_token");
    let mut platform = PlatformProcess::spawn(
        &[
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--dev-token-ttl",
            "2m",
            "--dev-auth-token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    let url = platform.url();
    let port: u16 = url.rsplit(':').next().unwrap().parse().expect("port");
    assert!(url.starts_with("http://127.0.0.1:") && port != 0, "{url}");
    assert_eq!(
        platform.second_line(),
        format!(
            "point a daemon at it: PLATFORM_URL={url} CONFIGS_DIR={} molecule-credd",
            configs.display()
        )
    );
    assert_eq!(mode_of(&configs), 0o700);
    assert_eq!(mode_of(&token_file), 0o600);
    let bearer = std::fs::read_to_string(&token_file)
        .expect("bearer")
        .trim()
        .to_owned();
    assert!(bearer.len() >= 32, "a random bearer");

    let (status, body) = get(&format!("{url}{ADMIN_ROUTE}"), Some(&bearer)).await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().expect("token").to_owned();
    assert!(token.starts_with("ghs_") && token.len() >= 40);
    let expires: jiff::Timestamp = body["expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .expect("RFC 3339");
    let left = expires.duration_since(jiff::Timestamp::now());
    assert!(
        left > jiff::SignedDuration::from_secs(60) && left <= jiff::SignedDuration::from_secs(120)
    );
    let (status, body) = get(
        &format!("{url}/workspaces/any-ws/github-installation-token"),
        Some(&bearer),
    )
    .await;
    assert_eq!(
        (status, body["token"].as_str()),
        (200, Some(token.as_str()))
    );
    let (status, body) = get(&format!("{url}{ADMIN_ROUTE}"), None).await;
    assert_eq!(
        (status, body),
        (401, serde_json::json!({"error": "missing bearer token"}))
    );

    let exit = platform.stop(Signal::SIGTERM);
    assert!(exit.success(), "{exit:?}");
    let stderr = platform.stderr();
    assert!(stderr.contains("SIGTERM: shutting down"), "{stderr}");
    let stdout = platform.stdout();
    for (what, text) in [("stderr", &stderr), ("stdout", &stdout)] {
        assert_no_secrets(what, text, &[bearer.clone(), token.clone()]);
    }
}

#[tokio::test]
async fn dev_mode_without_a_file_writes_the_bearer_under_tmpdir() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut platform = PlatformProcess::spawn(
        &["--dev", "--listen", "127.0.0.1:0"],
        &[("TMPDIR", tmp.path().to_str().unwrap())],
    );
    let configs = tmp
        .path()
        .join(format!("molecule-platform-dev-{}", nix::unistd::getuid()));
    assert!(
        platform
            .second_line()
            .ends_with(&format!("CONFIGS_DIR={} molecule-credd", configs.display())),
        "{}",
        platform.second_line()
    );
    let bearer = std::fs::read_to_string(configs.join(".auth_token")).expect("bearer");
    let (status, _) = get(
        &format!("{}{ADMIN_ROUTE}", platform.url()),
        Some(bearer.trim()),
    )
    .await;
    assert_eq!(status, 200);
    assert!(platform.stop(Signal::SIGINT).success());
}

#[tokio::test]
async fn sighup_reloads_the_workspace_tokens_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("workspace-tokens");
    let (bearer_a, bearer_b) = (
        "bearer-of-workspace-a-123456",
        "bearer-of-workspace-b-123456",
    );
    std::fs::write(&file, format!("# ws\nws-a {}\n", sha256_hex(bearer_a))).expect("write");
    let mut platform = PlatformProcess::spawn(
        &["--dev", "--listen", "127.0.0.1:0"],
        &[
            ("ADMIN_TOKEN", "admin-for-the-sighup-test-0123"),
            ("PLATFORM_WORKSPACE_TOKENS_FILE", file.to_str().unwrap()),
        ],
    );
    assert!(
        platform.second_line().contains("$CONFIGS_DIR/.auth_token"),
        "ADMIN_TOKEN given, no file written: {}",
        platform.second_line()
    );
    let ws_b = format!(
        "{}/workspaces/ws-b/github-installation-token",
        platform.url()
    );
    assert_eq!(get(&ws_b, Some(bearer_b)).await.0, 401);
    std::fs::write(
        &file,
        format!(
            "ws-a {}\nws-b {}\n",
            sha256_hex(bearer_a),
            sha256_hex(bearer_b)
        ),
    )
    .expect("write");
    platform.signal(Signal::SIGHUP);
    platform.wait_for_stderr("SIGHUP: reloaded workspace tokens (2 entries)");
    assert_eq!(get(&ws_b, Some(bearer_b)).await.0, 200);

    std::fs::write(&file, "ws-a not-a-hash\n").expect("write");
    platform.signal(Signal::SIGHUP);
    let stderr = platform.wait_for_stderr("SIGHUP: keeping the previous workspace tokens");
    assert!(
        stderr.contains(":1: the second field must be 64 hex digits"),
        "{stderr}"
    );
    assert_eq!(
        get(&ws_b, Some(bearer_b)).await.0,
        200,
        "previous table kept"
    );
    assert!(platform.stop(Signal::SIGTERM).success());
}

fn github_env<'a>(
    github: &'a GitHubStandIn,
    key: &'a str,
    installation: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("GITHUB_APP_ID", "4242"),
        ("GITHUB_APP_INSTALLATION_ID", installation),
        ("GITHUB_APP_PRIVATE_KEY_FILE", key),
        ("GITHUB_API_URL", github.url()),
        ("ADMIN_TOKEN", "admin-for-the-github-binary-test"),
    ]
}

#[tokio::test]
async fn github_mode_serves_the_installation_token() {
    let github = GitHubStandIn::start();
    let installation = INSTALLATION_ID.to_string();
    let key = keys().pkcs1_file.to_str().unwrap();
    let mut platform = PlatformProcess::spawn(
        &["--listen", "127.0.0.1:0"],
        &github_env(&github, key, &installation),
    );
    let (status, body) = get(
        &format!("{}{ADMIN_ROUTE}", platform.url()),
        Some("admin-for-the-github-binary-test"),
    )
    .await;
    assert_eq!(status, 200, "{body} {:?}", github.rejections());
    assert_eq!(body["token"], github.issued()[0].0.as_str());
    assert!(platform.stop(Signal::SIGTERM).success());
    let mut secrets = github.secrets();
    secrets.push("admin-for-the-github-binary-test".into());
    assert_no_secrets("stderr", &platform.stderr(), &secrets);
}

#[tokio::test]
async fn github_failure_is_a_500_and_a_github_line_on_stderr() {
    let github = GitHubStandIn::start();
    github.set_mode(Mode::Status(401));
    let installation = INSTALLATION_ID.to_string();
    let key = keys().pkcs8_file.to_str().unwrap();
    let mut platform = PlatformProcess::spawn(
        &["--listen", "127.0.0.1:0"],
        &github_env(&github, key, &installation),
    );
    let (status, body) = get(
        &format!("{}{ADMIN_ROUTE}", platform.url()),
        Some("admin-for-the-github-binary-test"),
    )
    .await;
    assert_eq!(
        (status, body),
        (500, serde_json::json!({"error": "token refresh failed"}))
    );
    let stderr = platform.wait_for_stderr(
        "[github] token refresh failed: upstream answered HTTP 401 (Bad credentials)",
    );
    assert!(platform.stop(Signal::SIGTERM).success());
    let mut secrets = github.secrets();
    secrets.push("admin-for-the-github-binary-test".into());
    assert_no_secrets("stderr", &stderr, &secrets);
}

#[tokio::test]
async fn refuses_to_start_on_bad_configuration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage_key = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage_key,
        "-----BEGIN RSA PRIVATE KEY-----\nnot base64!\n-----END RSA PRIVATE KEY-----\n",
    )
    .expect("write");
    let bad_tokens = dir.path().join("tokens");
    std::fs::write(&bad_tokens, "# ok\nws-a\n").expect("write");
    // Grants GitHub would refuse: refused at start, with FILE:LINE and what
    // GitHub allows for that permission.
    let grant = |name: &str, permissions: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[workspace.ws-a]\nrepositories = [\"acme/*\"]\npermissions = {{ {permissions} }}\n"
            ),
        )
        .expect("write");
        path.to_str().expect("utf-8").to_owned()
    };
    let workflows_read = grant("workflows.toml", "workflows = \"read\"");
    let contents_admin = grant("contents.toml", "contents = \"admin\"");
    let not_a_permission = grant("typo.toml", "pull_request = \"write\"");
    let key = keys().pkcs8_file.to_str().unwrap();
    // (flags, environment, expected part of the error)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec![],
            vec![("GITHUB_APP_ID", "4242")],
            "error: invalid configuration -> GITHUB_APP_ID is set but GITHUB_APP_INSTALLATION_ID is not",
        ),
        (
            vec![],
            vec![
                ("GITHUB_APP_ID", "4242"),
                ("GITHUB_APP_INSTALLATION_ID", "777"),
            ],
            "GITHUB_APP_ID is set but GITHUB_APP_PRIVATE_KEY_FILE is not",
        ),
        (
            vec![],
            vec![
                ("GITHUB_APP_ID", "4242"),
                ("GITHUB_APP_INSTALLATION_ID", "777"),
                ("GITHUB_APP_PRIVATE_KEY_FILE", "/nonexistent/app.pem"),
            ],
            "cannot read GITHUB_APP_PRIVATE_KEY_FILE /nonexistent/app.pem",
        ),
        (
            vec![],
            vec![
                ("GITHUB_APP_ID", "4242"),
                ("GITHUB_APP_INSTALLATION_ID", "777"),
                ("GITHUB_APP_PRIVATE_KEY_FILE", garbage_key.to_str().unwrap()),
            ],
            "error: GitHub App configuration -> configuration: the private key is not an RSA key in PEM form",
        ),
        (
            vec![],
            vec![
                ("GITHUB_APP_INSTALLATION_ID", "777"),
                ("GITHUB_APP_PRIVATE_KEY_FILE", key),
            ],
            "GITHUB_APP_INSTALLATION_ID or GITHUB_APP_PRIVATE_KEY_FILE is set but GITHUB_APP_ID is not",
        ),
        (
            vec![],
            vec![(
                "PLATFORM_WORKSPACE_TOKENS_FILE",
                bad_tokens.to_str().unwrap(),
            )],
            ":2: expected 2 fields",
        ),
        (
            vec!["--dev", "--listen", "0.0.0.0:0"],
            vec![],
            "--dev only listens on loopback",
        ),
        (
            vec!["--dev", "--listen", "127.0.0.1:0"],
            vec![("PLATFORM_GRANTS_FILE", workflows_read.as_str())],
            "workflows.toml:3: workspace ws-a: permission workflows is \"read\", but GitHub allows only \"write\" for it",
        ),
        (
            vec!["--dev", "--listen", "127.0.0.1:0"],
            vec![("PLATFORM_GRANTS_FILE", contents_admin.as_str())],
            "contents.toml:3: workspace ws-a: permission contents is \"admin\", but GitHub allows only \"read\" or \"write\" for it",
        ),
        (
            vec!["--dev", "--listen", "127.0.0.1:0"],
            vec![("PLATFORM_GRANTS_FILE", not_a_permission.as_str())],
            "typo.toml:3: workspace ws-a: permission \"pull_request\" is not one of GitHub's App permissions (did you mean pull_requests?)",
        ),
        (
            vec![],
            vec![("PLATFORM_LISTEN", "localhost")],
            "must be IP:PORT",
        ),
    ];
    for (args, env, needle) in cases {
        let (status, stdout, stderr) = run_to_exit(&args, &env);
        assert_eq!(status.code(), Some(1), "{env:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{env:?}: expected {needle:?} in:\n{stderr}"
        );
        assert!(!stdout.contains("listening on"), "{env:?}: {stdout}");
        assert_no_secrets("stderr", &stderr, &[]);
    }
}

/// The uid the hardening test runs the platform (and its would-be reader)
/// as: `nobody` when the tests run as root, else our own.
fn unprivileged_uid() -> Option<u32> {
    nix::unistd::getuid().is_root().then_some(65534)
}

/// Why: the platform holds the admin bearer and GitHub tokens in memory,
/// and `/proc/PID/environ` shows the environment it was started with —
/// `ADMIN_TOKEN` included — even after the variable is removed. Another
/// process of the same uid could read that file (or the memory) unless the
/// process is non-dumpable, which makes its `/proc` files root's.
///
/// That `ADMIN_TOKEN` is also gone from the process's own environment (what a
/// child would inherit) cannot be observed from outside, since the platform
/// starts no child; what is checked is that it is still honoured after being
/// taken out.
#[tokio::test]
async fn admin_token_is_honoured_but_unreadable_to_other_processes_of_its_uid() {
    const ADMIN: &str = "admin-for-the-hardening-test-0123456789";
    let mut command = PlatformProcess::command(
        &["--dev", "--listen", "127.0.0.1:0"],
        &[("ADMIN_TOKEN", ADMIN)],
    );
    if let Some(uid) = unprivileged_uid() {
        command.uid(uid).gid(uid);
    }
    let mut platform = PlatformProcess::spawn_command(command);
    let (status, body) = get(&format!("{}{ADMIN_ROUTE}", platform.url()), Some(ADMIN)).await;
    assert_eq!(
        status, 200,
        "ADMIN_TOKEN read before it was removed: {body}"
    );

    let environ = format!("/proc/{}/environ", platform.pid());
    let mut reader = std::process::Command::new("cat");
    reader.arg(&environ);
    if let Some(uid) = unprivileged_uid() {
        std::os::unix::process::CommandExt::uid(&mut reader, uid);
        std::os::unix::process::CommandExt::gid(&mut reader, uid);
    }
    let read = reader.output().expect("run cat");
    let stdout = String::from_utf8_lossy(&read.stdout);
    assert!(
        !read.status.success() && !stdout.contains(ADMIN),
        "a process of the platform's uid read {environ} ({} bytes{}): the platform is dumpable",
        read.stdout.len(),
        if stdout.contains(ADMIN) {
            ", ADMIN_TOKEN among them"
        } else {
            ""
        }
    );
    let stderr = String::from_utf8_lossy(&read.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
    let owner =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&environ).expect("stat environ"));
    assert_eq!(owner, 0, "a non-dumpable process's /proc files are root's");

    assert!(platform.stop(Signal::SIGTERM).success());
    assert_no_secrets("stderr", &platform.stderr(), &[ADMIN.into()]);
}

/// Why: `molecule-platform --help | head -1` and the like close the pipe
/// early; the binary must neither panic nor claim success for output that
/// was never written, and must keep clap's exit codes otherwise (0 for help
/// and version, 2 for usage errors).
#[tokio::test]
async fn help_and_version_exit_1_quietly_when_stdout_is_closed() {
    for flag in ["--help", "--version"] {
        let (status, stdout, stderr) = run_to_exit(&[flag], &[]);
        assert_eq!(status.code(), Some(0), "{flag}: {stderr}");
        assert!(stdout.contains("molecule-platform"), "{flag}: {stdout}");
        assert!(stderr.is_empty(), "{flag}: {stderr}");

        // `molecule-platform --help | true`: the reader is gone first.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Cmd::new(PlatformProcess::command(&[flag], &[]), "molecule-platform")
            .stdout(writer)
            .run();
        let stderr = &out.stderr;
        assert_eq!(
            out.status.code(),
            Some(1),
            "{flag} with stdout closed: not a success; stderr: {stderr}"
        );
        assert!(stderr.is_empty(), "{flag}: quietly, no panic: {stderr}");
    }
    let (status, stdout, stderr) = run_to_exit(&["--no-such-flag"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unexpected argument '--no-such-flag'"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");
}

#[tokio::test]
async fn sighup_applies_a_changed_grants_file_and_keeps_it_when_broken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("workspace-tokens");
    let grants = dir.path().join("grants.toml");
    let bearer = "bearer-of-the-grants-workspace-123456";
    std::fs::write(&tokens, format!("ws-g {}\n", sha256_hex(bearer))).expect("write");
    std::fs::write(&grants, "[workspace.ws-g]\nrepositories = [\"acme/api\"]\n").expect("write");
    let mut platform = PlatformProcess::spawn(
        &["--dev", "--listen", "127.0.0.1:0"],
        &[
            ("ADMIN_TOKEN", "admin-for-the-grants-test-0123"),
            ("PLATFORM_WORKSPACE_TOKENS_FILE", tokens.to_str().unwrap()),
            ("PLATFORM_GRANTS_FILE", grants.to_str().unwrap()),
        ],
    );
    let route = format!(
        "{}/workspaces/ws-g/github-installation-token",
        platform.url()
    );
    let (status, body) = get(&format!("{route}?repository=acme/api"), Some(bearer)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["repositories"], serde_json::json!(["acme/api"]));
    let (status, _) = get(&format!("{route}?repository=other/x"), Some(bearer)).await;
    assert_eq!(status, 403);

    std::fs::write(
        &grants,
        "[workspace.ws-g]\nrepositories = [\"acme/api\", \"other/*\"]\n",
    )
    .expect("write");
    platform.signal(Signal::SIGHUP);
    platform.wait_for_stderr("SIGHUP: reloaded grants (1 workspaces)");
    let (status, body) = get(&format!("{route}?repository=other/x"), Some(bearer)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["owner"], "other");
    let token = body["token"].as_str().expect("token").to_owned();

    std::fs::write(&grants, "[workspace.ws-g]\nrepos = []\n").expect("write");
    platform.signal(Signal::SIGHUP);
    let stderr = platform.wait_for_stderr("SIGHUP: keeping the previous grants");
    let line = stderr
        .lines()
        .find(|l| l.contains("keeping the previous grants"))
        .expect("the line");
    assert!(line.contains("grants.toml:2: unknown field"), "{line}");
    let (status, _) = get(&format!("{route}?repository=other/x"), Some(bearer)).await;
    assert_eq!(status, 200, "previous grants kept");
    assert!(platform.stop(Signal::SIGTERM).success());
    assert_no_secrets(
        "platform stderr",
        &platform.stderr(),
        &[token, bearer.to_owned()],
    );
}

#[tokio::test]
async fn github_mode_with_grants_against_the_stand_in_process() {
    // Both real processes, as a fleet simulation runs them: the stand-in
    // binary prints its port and key folder; the platform mints scoped
    // tokens from it; the stand-in's record says what each mint asked for.
    let dir = tempfile::tempdir().expect("tempdir");
    let keys_dir = dir.path().join("keys");
    let mut command = std::process::Command::new(testkit::bin::github_stand_in());
    command.args([
        "--keys-dir",
        keys_dir.to_str().unwrap(),
        "--install",
        "acme=1001",
        "--install",
        "acme-labs=1002",
        "--page-size",
        "1",
    ]);
    let stand_in = testkit::Process::spawn(command, "github-stand-in");
    let line = stand_in
        .stdout()
        .wait_until(testkit::WAIT, |text, closed| text.contains('\n') || closed)
        .expect("the stand-in's line");
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        &words[..3],
        ["github-stand-in", "listening", "on"],
        "{line}"
    );
    let url = words[3].to_owned();
    assert_eq!(words[4], "keys");
    let key = keys_dir.join("app.pem");
    assert_eq!(mode_of(&key), 0o600);

    let tokens = dir.path().join("workspace-tokens");
    let grants = dir.path().join("grants.toml");
    let bearer = "bearer-of-the-fleet-workspace-0123456";
    std::fs::write(&tokens, format!("ws-f {}\n", sha256_hex(bearer))).expect("write");
    std::fs::write(
        &grants,
        "[workspace.ws-f]\nrepositories = [\"acme/api\", \"acme-labs/*\"]\npermissions = { contents = \"read\" }\n",
    )
    .expect("write");
    let mut platform = PlatformProcess::spawn(
        &["--listen", "127.0.0.1:0"],
        &[
            ("GITHUB_APP_ID", "4242"),
            ("GITHUB_APP_INSTALLATION_ID", "777"),
            ("GITHUB_APP_PRIVATE_KEY_FILE", key.to_str().unwrap()),
            ("GITHUB_API_URL", &url),
            ("PLATFORM_WORKSPACE_TOKENS_FILE", tokens.to_str().unwrap()),
            ("PLATFORM_GRANTS_FILE", grants.to_str().unwrap()),
        ],
    );
    let route = format!(
        "{}/workspaces/ws-f/github-installation-token",
        platform.url()
    );
    let (status, acme) = get(&format!("{route}?repository=acme/api"), Some(bearer)).await;
    assert_eq!(status, 200, "{acme}");
    assert_eq!(acme["repositories"], serde_json::json!(["acme/api"]));
    assert_eq!(acme["permissions"], serde_json::json!({"contents": "read"}));
    let (status, labs) = get(&format!("{route}?owner=acme-labs"), Some(bearer)).await;
    assert_eq!(status, 200, "{labs}");
    let (status, _) = get(&format!("{route}?owner=nobody"), Some(bearer)).await;
    assert_eq!(status, 403);

    let bytes = http()
        .get(format!("{url}/_stand-in/record"))
        .send()
        .await
        .expect("record")
        .bytes()
        .await
        .expect("body");
    let record: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(record["rejections"], serde_json::json!([]), "{record}");
    assert_eq!(
        record["violations"],
        serde_json::json!([]),
        "every request as GitHub's description allows: {record}"
    );
    assert_eq!(
        record["mints"],
        serde_json::json!([
            {"installation": 1001, "repositories": ["api"], "permissions": {"contents": "read"}},
            {"installation": 1002, "repositories": null, "permissions": {"contents": "read"}},
        ])
    );
    assert_eq!(record["listings"], 3, "{record}");
    assert!(platform.stop(Signal::SIGTERM).success());
    let secrets = vec![
        acme["token"].as_str().unwrap().to_owned(),
        labs["token"].as_str().unwrap().to_owned(),
        bearer.to_owned(),
    ];
    assert_no_secrets("platform stderr", &platform.stderr(), &secrets);
    assert_no_secrets("stand-in stdout", &stand_in.stdout().text(), &secrets);
}
