//! `--on-refresh CMD`: tell something else that the token changed.
//!
//! Some consumers cannot ask the daemon: a tool that keeps its own credential
//! store (`gh auth login --with-token`), a sidecar, a file another container
//! reads. After every successful refresh the daemon runs the operator's command
//! with the new token on its **stdin** — never in argv (visible in `ps` to every
//! user) or the environment (`/proc/PID/environ`, inherited by grandchildren).
//!
//! Every token the daemon refreshes runs the hook: the workspace's default
//! token and each account's (`credd token --owner`, git with
//! `useHttpPath`). The hook's environment says whose: [`WHOSE_VARIABLE`] is
//! `default` or `owner`, and [`OWNER_VARIABLE`] the account when known. A
//! hook that keeps one token for a tool (`gh auth login --with-token`) keeps
//! the default one: `[ "$CREDD_TOKEN_FOR" = default ] || exit 0`.
//!
//! The hook must never hurt serving: it runs with a deadline, after which its
//! whole process group is killed; its failure is a WARN line; nothing is
//! propagated. Its stdout and stderr are discarded, not logged — a careless
//! script that echoes its input would otherwise put the token in the journal.
//! We log what is safe: whose token, exit status and duration.

use std::collections::BTreeMap;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credd_core::secret::Token;

use crate::bootstrap;
use crate::cache::{RefreshHook, Whose};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// Variables the hook must not inherit besides the provision-time token's
/// ([`bootstrap::TOKEN_VARIABLES`]: it dies within the hour): systemd's
/// per-process handshakes, which would let the hook impersonate the daemon
/// towards systemd.
const SYSTEMD_HANDSHAKES: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// How one run of the hook ended.
#[derive(Debug)]
enum Outcome {
    /// It exited (zero or not) or was killed by a signal on its own.
    Finished(ExitStatus),
    /// It was still running at the deadline and was killed.
    TimedOut,
    /// `/bin/sh` could not be started or waited for.
    Failed(io::Error),
}

/// How long one `--on-refresh` run may take before it is killed.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

/// The variable that names the account a token is for, in the hook's
/// environment (absent when the platform stated none: a platform without
/// grants).
pub(crate) const OWNER_VARIABLE: &str = "CREDD_OWNER";
/// The variable that says whose token it is: `default` (the workspace's
/// default token) or `owner` (an account's).
pub(crate) const WHOSE_VARIABLE: &str = "CREDD_TOKEN_FOR";

/// Whose a token is, owned (the hook's queue outlives the call).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct For {
    default: bool,
    account: Option<String>,
}

impl From<Whose<'_>> for For {
    fn from(whose: Whose<'_>) -> Self {
        match whose {
            Whose::Default { account } => Self {
                default: true,
                account: account.map(str::to_owned),
            },
            Whose::Owner(account) => Self {
                default: false,
                account: Some(account.to_owned()),
            },
        }
    }
}

/// The store's hook for `--on-refresh COMMAND`: runs it with the newest
/// token of each (default or account's), one run at a time; tokens of one
/// that arrive while it runs are coalesced into its next run (one token
/// never stands in for another's).
pub(crate) fn hook(command: String) -> RefreshHook {
    // At most one entry per token the store holds.
    let pending: Arc<Mutex<BTreeMap<For, Token>>> = Arc::default();
    let (ready, mut updates) = tokio::sync::watch::channel(());
    let queue = Arc::clone(&pending);
    tokio::spawn(async move {
        // Ends when the hook (the sender) is dropped with the store.
        while updates.changed().await.is_ok() {
            let batch = std::mem::take(&mut *queue.lock().unwrap_or_else(|e| e.into_inner()));
            for (whose, token) in batch {
                run(&command, &token, &whose, TIMEOUT).await;
            }
        }
    });
    Box::new(move |token: &Token, whose: Whose<'_>| {
        pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(For::from(whose), token.clone());
        ready.send_replace(());
    })
}

/// Runs `command` through `/bin/sh -c` with `token` and a newline on stdin,
/// and whose it is in [`WHOSE_VARIABLE`] and [`OWNER_VARIABLE`].
///
/// Waits at most `timeout` (then kills the command's process group); logs the
/// outcome (exit status, duration — never output) and never returns an error:
/// a broken hook must not affect serving. Run it in a spawned task so the
/// refresh path does not wait for it.
async fn run(command: &str, token: &Token, whose: &For, timeout: Duration) {
    let started = Instant::now();
    let outcome = execute(command, token, whose, timeout).await;
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let owner = whose.account.as_deref().unwrap_or("-");
    let default = whose.default;
    match outcome {
        Outcome::Finished(status) if status.success() => {
            tracing::info!(default, owner, elapsed_ms, "on-refresh command succeeded");
        }
        Outcome::Finished(status) => {
            tracing::warn!(default, owner, %status, elapsed_ms, "on-refresh command failed");
        }
        Outcome::TimedOut => {
            tracing::warn!(
                default,
                owner,
                timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                "on-refresh command did not finish in time and was killed"
            );
        }
        Outcome::Failed(error) => {
            tracing::warn!(default, owner, %error, "on-refresh command could not be run");
        }
    }
}

async fn execute(command: &str, token: &Token, whose: &For, timeout: Duration) -> Outcome {
    let mut shell = Command::new("/bin/sh");
    shell
        .arg("-c")
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group, so a timeout kills what the script started too.
        .process_group(0)
        .kill_on_drop(true);
    for name in bootstrap::TOKEN_VARIABLES
        .into_iter()
        .chain(SYSTEMD_HANDSHAKES)
    {
        shell.env_remove(name);
    }
    shell.env(
        WHOSE_VARIABLE,
        if whose.default { "default" } else { "owner" },
    );
    match &whose.account {
        Some(account) => shell.env(OWNER_VARIABLE, account),
        None => shell.env_remove(OWNER_VARIABLE),
    };
    let mut child = match shell.spawn() {
        Ok(child) => child,
        Err(error) => return Outcome::Failed(error),
    };
    match tokio::time::timeout(timeout, feed_and_wait(&mut child, token)).await {
        Ok(Ok(status)) => Outcome::Finished(status),
        Ok(Err(error)) => {
            kill_group(&mut child).await;
            Outcome::Failed(error)
        }
        Err(_elapsed) => {
            kill_group(&mut child).await;
            Outcome::TimedOut
        }
    }
}

async fn feed_and_wait(child: &mut Child, token: &Token) -> io::Result<ExitStatus> {
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that ignores its input may exit before reading: EPIPE here is
        // its business, its exit status says whether it worked.
        let written = async {
            stdin.write_all(token.expose().as_bytes()).await?;
            stdin.write_all(b"\n").await?;
            stdin.shutdown().await
        }
        .await;
        if let Err(error) = written
            && error.kind() != io::ErrorKind::BrokenPipe
        {
            return Err(error);
        }
        // Dropping stdin closes the pipe: the hook sees EOF after the token.
    }
    child.wait().await
}

/// SIGKILLs the hook's process group and reaps the shell.
async fn kill_group(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        // ESRCH: everything already exited. Nothing else can go wrong that we
        // could act on; the shell is reaped below either way.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const TOKEN: &str = "ghs_onRefreshTestToken0123456789abcdefXYZ";
    /// The default token of a platform that states no account.
    const DEFAULT: For = For {
        default: true,
        account: None,
    };

    fn token() -> Token {
        Token::new(TOKEN.to_owned()).expect("valid token")
    }

    fn sh_quote(path: &Path) -> String {
        format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
    }

    /// Whether `pid` is gone or a zombie (killed, not yet reaped by init).
    fn is_dead(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // Field 3, after the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        }
    }

    #[tokio::test]
    async fn the_token_arrives_on_stdin_and_nowhere_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stdin_copy = dir.path().join("stdin");
        let seen = dir.path().join("seen");
        let command = format!(
            "cat > {}; {{ echo \"args:$*\"; env; }} > {}; echo \"$(cat {})\"",
            sh_quote(&stdin_copy),
            sh_quote(&seen),
            sh_quote(&stdin_copy),
        );
        let outcome = execute(&command, &token(), &DEFAULT, Duration::from_secs(30)).await;
        assert!(
            matches!(outcome, Outcome::Finished(s) if s.success()),
            "{outcome:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&stdin_copy).expect("stdin copy"),
            format!("{TOKEN}\n")
        );
        let seen = std::fs::read_to_string(&seen).expect("env dump");
        assert!(!seen.contains(TOKEN), "token leaked into argv or env");
        assert!(
            !seen.contains("NOTIFY_SOCKET="),
            "systemd handshake inherited"
        );
        assert!(seen.contains("\nCREDD_TOKEN_FOR=default\n"), "{seen}");
        assert!(!seen.contains("CREDD_OWNER="), "no account stated: {seen}");
    }

    #[tokio::test]
    async fn a_hook_past_its_deadline_is_killed_with_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pids = dir.path().join("pids");
        // The shell starts a grandchild and waits; both must die.
        let command = format!("sleep 300 & echo \"$$ $!\" > {}; wait", sh_quote(&pids));
        let outcome = execute(&command, &token(), &DEFAULT, Duration::from_millis(500)).await;
        assert!(matches!(outcome, Outcome::TimedOut), "{outcome:?}");
        let pids = std::fs::read_to_string(&pids).expect("the hook wrote its pids");
        for pid in pids.split_whitespace() {
            let pid: i32 = pid.parse().expect("pid");
            // The grandchild is reaped by init, asynchronously: wait, bounded.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !is_dead(pid) {
                assert!(Instant::now() < deadline, "process {pid} survived the kill");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    #[tokio::test]
    async fn failures_are_outcomes_not_errors() {
        let outcome = execute("exit 3", &token(), &DEFAULT, Duration::from_secs(30)).await;
        assert!(
            matches!(&outcome, Outcome::Finished(s) if s.code() == Some(3)),
            "{outcome:?}"
        );
        // Ignores its stdin entirely: no EPIPE surfaces as a failure.
        let outcome = execute("exec true", &token(), &DEFAULT, Duration::from_secs(30)).await;
        assert!(
            matches!(&outcome, Outcome::Finished(s) if s.success()),
            "{outcome:?}"
        );
        // The public entry point returns () whatever happens.
        run("exit 7", &token(), &DEFAULT, Duration::from_secs(30)).await;
        run("sleep 300", &token(), &DEFAULT, Duration::from_millis(100)).await;
    }

    #[tokio::test]
    async fn each_accounts_newest_token_runs_the_hook_with_its_account_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seen = dir.path().join("seen");
        let command = format!(
            "echo \"${WHOSE_VARIABLE} ${{{OWNER_VARIABLE}-none}} $(cat)\" >> {}",
            sh_quote(&seen)
        );
        let hook = hook(command);
        let tokens: Vec<Token> = (0..3)
            .map(|n| Token::new(format!("{TOKEN}{n}")).expect("valid token"))
            .collect();
        hook(&tokens[0], Whose::Owner("acme"));
        hook(&tokens[1], Whose::Owner("labs"));
        hook(&tokens[2], Whose::Owner("acme"));
        // The default token is apart from the account's of the same name.
        hook(
            &tokens[1],
            Whose::Default {
                account: Some("acme"),
            },
        );
        let expected = [
            format!("owner labs {TOKEN}1"),
            format!("owner acme {TOKEN}2"),
            format!("default acme {TOKEN}1"),
        ];
        let deadline = Instant::now() + Duration::from_secs(30);
        let lines = loop {
            let text = std::fs::read_to_string(&seen).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if expected.iter().all(|e| lines.contains(e)) {
                break lines;
            }
            assert!(
                Instant::now() < deadline,
                "the hook never ran for all: {lines:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // An account's older token may have run first (it was not yet
        // coalesced), never after its newer one.
        let last_acme = lines.iter().rev().find(|l| l.starts_with("owner acme "));
        assert_eq!(last_acme, Some(&expected[1]), "{lines:?}");
        assert!(lines.len() <= 4, "{lines:?}");
    }
}
