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

use testkit::{Cmd, FAST_BACKOFF, GitServer, Sandbox, TestPlatform, with_platform};

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
