//! Every git credd supports, for real: `git credential fill`, clone and push
//! through `credd`, once per git binary.
//!
//! The oldest supported git is Debian 12's 2.39 (`/usr/bin/git` on this
//! machine kind); the current one is the machine's `/usr/local/bin/git`.
//! git before 2.40 ignores `password_expiry_utc`: such a git may use a token
//! up to its very end, and a push in the last `--min-lifetime` of a token's
//! life can fail once with 401; git then sends `erase`, the daemon drops the
//! token, and the next attempt gets a fresh one.

use std::path::Path;

use testkit::{
    Cmd, FAST_BACKOFF, Fault, GitServer, Sandbox, TestPlatform, with_platform, write_file,
};

/// The gits the tests run: the oldest supported and the current one.
const SUPPORTED_GITS: [&str; 2] = ["/usr/bin/git", "/usr/local/bin/git"];

/// `git ARGS` with the binary at `git`, configured like [`Sandbox::git`].
fn git<'a>(sandbox: &'a Sandbox, git: &str, cwd: &Path, args: &[&str]) -> Cmd<'a> {
    sandbox.git_binary(git, cwd, args)
}

#[test]
fn fill_clone_and_push_work_with_every_supported_git() {
    for binary in SUPPORTED_GITS {
        assert!(
            Path::new(binary).is_file(),
            "{binary} is missing: the tests need the oldest supported git (Debian 12's, apt-get install git) and the current one"
        );
        let (sandbox, platform) = with_platform(TestPlatform::start());
        let server = GitServer::start(&sandbox.path().join("repos"), platform.authority());
        let url = server.create_repo("project");
        sandbox.set_hosts(&server.host());
        sandbox.configure_git(&server.base_url(), &[]);
        let daemon = sandbox.daemon().args(FAST_BACKOFF).start();

        let version = git(&sandbox, binary, sandbox.path(), &["--version"]).run();
        version.assert_success("git --version");
        let host = server.host();
        let fill = git(&sandbox, binary, sandbox.path(), &["credential", "fill"])
            .stdin(format!("protocol=http\nhost={host}\n\n"))
            .stdout_holds_secret()
            .run();
        fill.assert_success(&format!("{} credential fill", version.stdout.trim()));
        fill.assert_password(
            platform.last_issued().as_deref().expect("issued"),
            &format!("{}: the daemon's token", version.stdout.trim()),
        );

        let work = sandbox.path().join("work");
        std::fs::create_dir_all(&work).expect("work dir");
        git(&sandbox, binary, &work, &["clone", &url, "project"])
            .run()
            .assert_success(&format!("{}: clone", version.stdout.trim()));
        let clone = work.join("project");
        std::fs::write(clone.join("README"), "hello\n").expect("write");
        git(&sandbox, binary, &clone, &["add", "README"])
            .run()
            .assert_success("git add");
        git(&sandbox, binary, &clone, &["commit", "-q", "-m", "first"])
            .run()
            .assert_success("git commit");
        git(&sandbox, binary, &clone, &["push", "origin", "HEAD:main"])
            .run()
            .assert_success(&format!("{}: push", version.stdout.trim()));
        let accepted = server.accepted_tokens();
        assert!(
            !accepted.is_empty()
                && accepted
                    .iter()
                    .all(|t| Some(t.as_str()) == platform.last_issued().as_deref()),
            "{}: the git server saw only the daemon's token",
            version.stdout.trim()
        );
        daemon.stop();
    }
}

/// Asserts `file` still holds exactly `bytes`; a failure shows sizes only
/// (the file may hold a token).
#[track_caller]
fn assert_unchanged(file: &Path, bytes: &[u8], what: &str) {
    let now = std::fs::read(file).expect("read the file");
    assert!(
        now == bytes,
        "{what}: {} bytes, {} lines before; {} bytes, {} lines now",
        bytes.len(),
        bytes.iter().filter(|&&b| b == b'\n').count(),
        now.len(),
        now.iter().filter(|&&b| b == b'\n').count()
    );
}

/// The operator's personal access token in the README's fallback file.
const PAT: &str = "ghp_operatorPersonalAccessToken0123456789abcdef";

/// Issue 20, item 2, the README's own example end to end, with every
/// supported git: `credd configure-git --fallback-helper 'store --file
/// ~/.git-pat'`. As found, git sent `store` to the fallback after every
/// success, so each token credd served was appended to the PAT file in
/// clear; and with `useHttpPath` the file's host-level entry never matched,
/// so the fallback stopped answering when the daemon and the platform were
/// down. Now, with the daemon up, clone, push, fetch and a refused token
/// leave the file unchanged byte for byte; with daemon and platform down,
/// the fallback's PAT is used (and the file is still unchanged); a refused
/// PAT is still erased from it, as git would without credd.
#[test]
fn the_readme_fallback_never_stores_credds_tokens_and_answers_when_credd_cannot() {
    for binary in SUPPORTED_GITS {
        let (sandbox, platform) = with_platform(TestPlatform::start());
        // The workspace route, which takes refusal reports.
        sandbox.use_platform_as_workspace(&platform);
        sandbox.add_secret("the operator's PAT", PAT);
        let server = GitServer::start(&sandbox.path().join("repos"), platform.authority());
        server.accept_pat(Some(("x-access-token", PAT)));
        let url = server.create_repo("acme/project");
        let host = server.host();
        sandbox.set_hosts(&host);
        let version = git(&sandbox, binary, sandbox.path(), &["--version"]).run();
        let version = version.stdout.trim().to_owned();

        // The operator's PAT file: one host-level entry, as
        // `git credential-store` writes it.
        let pat_file = sandbox.home().join(".git-pat");
        write_file(
            &pat_file,
            format!("http://x-access-token:{PAT}@{host}\n"),
            0o600,
        );
        let pat_bytes = std::fs::read(&pat_file).expect("PAT file");
        write_file(
            &sandbox.home().join(".gitconfig"),
            "[user]\n\tname = Credd Test\n\temail = test@example.invalid\n[init]\n\tdefaultBranch = main\n",
            0o644,
        );
        // The README's command, as written.
        sandbox
            .credd(&[
                "configure-git",
                "--fallback-helper",
                "store --file ~/.git-pat",
            ])
            .run()
            .assert_success("credd configure-git");
        // It configures `https://HOST`; this git server is plain http on
        // loopback (the only http credd answers), so the very same values
        // go under `http://HOST` too.
        let config = |args: &[&str]| {
            let mut all = vec!["config", "--global"];
            all.extend_from_slice(args);
            git(&sandbox, binary, sandbox.path(), &all).run()
        };
        let written = config(&["--get-all", &format!("credential.https://{host}.helper")]);
        let helpers: Vec<&str> = written.stdout.lines().collect();
        for helper in &helpers {
            config(&["--add", &format!("credential.http://{host}.helper"), helper])
                .assert_success("git config");
        }
        config(&[&format!("credential.http://{host}.useHttpPath"), "true"])
            .assert_success("git config");

        // The daemon up: everything through credd, nothing to the file.
        let daemon = sandbox.daemon().args(FAST_BACKOFF).start();
        let work = sandbox.path().join("work");
        std::fs::create_dir_all(&work).expect("work dir");
        let run = |cwd: &Path, args: &[&str]| git(&sandbox, binary, cwd, args).run();
        run(&work, &["clone", &url, "project"]).assert_success(&format!("{version}: clone"));
        let clone = work.join("project");
        std::fs::write(clone.join("README"), "hello\n").expect("write");
        run(&clone, &["add", "README"]).assert_success("git add");
        run(&clone, &["commit", "-q", "-m", "first"]).assert_success("git commit");
        run(&clone, &["push", "origin", "HEAD:main"]).assert_success(&format!("{version}: push"));
        run(&clone, &["fetch", "origin"]).assert_success(&format!("{version}: fetch"));
        // A token the server refuses: git erases it from every helper.
        let served = platform.last_issued().expect("issued");
        platform.authority().revoke(&served);
        let refused = run(&clone, &["fetch", "origin"]);
        assert!(
            !refused.status.success(),
            "{version}: the revoked token is refused"
        );
        run(&clone, &["fetch", "origin"]).assert_success(&format!("{version}: fetch again"));
        assert_unchanged(
            &pat_file,
            &pat_bytes,
            &format!("{version}: the PAT file is unchanged byte for byte with the daemon up"),
        );
        assert!(
            !server.accepted_tokens().iter().any(|t| t == PAT),
            "{version}: credd answered every request"
        );

        // Daemon and platform down: the fallback's host-level PAT answers
        // despite useHttpPath.
        daemon.stop();
        platform.set_fault(Fault::Down);
        run(&clone, &["fetch", "origin"]).assert_success(&format!("{version}: fetch with the PAT"));
        assert!(
            server.accepted_tokens().iter().any(|t| t == PAT),
            "{version}: the fallback's PAT was used"
        );
        assert_unchanged(
            &pat_file,
            &pat_bytes,
            &format!("{version}: the PAT file is unchanged after the fallback answered"),
        );

        // The PAT itself refused: git erases it from the fallback, as it
        // would without credd.
        server.accept_pat(None);
        let refused = run(&clone, &["fetch", "origin"]);
        assert!(!refused.status.success(), "{version}: the PAT is refused");
        let left = std::fs::read_to_string(&pat_file).expect("PAT file");
        assert!(
            !left.contains(PAT),
            "{version}: the refused PAT was erased: {left:?}"
        );

        // What configure-git wrote: the fallback behind `credd fallback`.
        let credd = testkit::bin::credd().display().to_string();
        assert_eq!(
            helpers,
            [
                "",
                credd.as_str(),
                &format!("{credd} fallback 'store --file ~/.git-pat'")
            ],
            "the helper list configure-git wrote"
        );
    }
}
