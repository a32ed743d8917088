//! `credd`: git's credential helper and the command line of molecule-credd.
//!
//! git execs `credd get` on every fetch and push, so start-up cost is the
//! product: the argument dispatch is hand-written (no clap), and the `get`
//! path answered by the daemon is std plus one Unix-socket round trip — no
//! async runtime, no HTTP client, no logging framework. None of them is even
//! linked in: when the daemon is unreachable, the platform is asked through
//! `molecule-credd --fetch-once` ([`chain`]), so the binary stays small and
//! quick to load.
//!
//! Start-up. `credd` has its own C entry point ([`main`], `#![no_main]`)
//! instead of Rust's runtime start (`lang_start`), which before any of our
//! code runs would read `/proc/self/maps` to find the main thread's stack
//! (glibc's `pthread_getattr_np`, the costliest system call of a `get`), ask
//! the CPU affinity, probe fds 0–2 with `poll`, and install SIGSEGV/SIGBUS
//! handlers on a freshly mapped alternate signal stack — eighteen system
//! calls, about a sixth of the helper's whole time, for a stack-overflow
//! message and a guard against closed standard fds. `credd` keeps what it
//! uses of that work: SIGPIPE ignored (a reader that went away is an `EPIPE`
//! error, handled where we write; std still resets it to the default for
//! the programs `credd exec` runs), a panic printed by std's hook and turned
//! into exit code 101, and stdout flushed before exit. What it gives up: a
//! stack overflow is a plain SIGSEGV, not a message (nothing here recurses),
//! and a closed fd 0–2 is not replaced by `/dev/null` (git always passes all
//! three; were fd 1 closed, the socket could take its number and the answer
//! would go back to the daemon, which holds the token anyway). std's
//! `args_os` still works: on Linux std takes argv in an `.init_array`
//! constructor, not in `lang_start`. `scripts/helper-budget.sh` counts the
//! system calls of a daemon-answered `get`, so none comes back unnoticed.
// Not for the unit tests: their harness brings its own `main`.
#![cfg_attr(not(test), no_main)]
// The one reviewed exception: the C entry point and the SIGPIPE disposition
// (both below, in `main`).
#![deny(unsafe_code)]

mod args;
mod chain;
mod configure_git;
mod credential;
mod daemon;
mod exec;
mod fallback;
mod git_helper;
mod metrics;
mod status;

use std::ffi::{OsStr, OsString};
use std::io::IsTerminal;
use std::process::ExitCode;

use credd_core::config::HelperConfig;
use credd_core::protocol::Which;
use credd_core::repository::RepositoryRef;

use crate::args::Lexer;

const USAGE: &str = "\
credd — GitHub tokens from molecule-credd for git, gh and scripts

usage:
  credd get | store | erase     git credential helper (git calls these; reads stdin)
  credd token [--repo OWNER/NAME | --owner OWNER]
                                print a token and a newline (exit 1 with a reason if none);
                                without an option, the workspace's default token
  credd status [--json]         what the daemon holds, never the token (exit 1 if unreachable)
  credd metrics                 the daemon's state and counters in Prometheus' text format,
                                for node_exporter's textfile collector (exit 1 if unreachable)
  credd exec [--repo OWNER/NAME | --owner OWNER] -- CMD [ARGS...]
                                run CMD with the token in GH_TOKEN and GITHUB_TOKEN if github.com is
                                in CREDD_HOSTS, in GH_ENTERPRISE_TOKEN (and GH_HOST) for an Enterprise
                                host in it; its exit code is credd's
  credd configure-git [--fallback-helper HELPER] [--file PATH]
                                make git ask credd first for every host in CREDD_HOSTS, with
                                credential.useHttpPath so each repository gets its owner's token;
                                HELPER is asked after credd, through `credd fallback`
  credd fallback HELPER get | store | erase
                                run git's HELPER without the repository path, never storing or
                                erasing credd's tokens (configure-git writes this for you)
  credd --help | --version

environment: CREDD_SOCKET, CREDD_HOSTS (default github.com), CREDD_DAEMON_UID;
PLATFORM_URL, CONFIGS_DIR and WORKSPACE_ID reach molecule-credd --fetch-once,
which credd runs when no daemon answers.
Order of asking: the daemon's socket, then (only if the daemon is unreachable)
the platform directly, then nothing, so git tries its next helper.
";

/// Exit code for command-line mistakes.
const USAGE_ERROR: u8 = 2;

/// The process's entry point, called by the C runtime (see the module docs
/// for what Rust's own start would have done, and why it is skipped).
#[allow(unsafe_code)]
// SAFETY: `main` is the C runtime's entry symbol with its C signature, and
// no other symbol of that name is linked (`#![no_main]`). The unit tests'
// harness brings its own `main`, so there this is an ordinary function.
#[cfg_attr(not(test), unsafe(no_mangle))]
extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    // SAFETY: SIG_IGN installs no handler code; this runs before any thread
    // exists. As under Rust's own start, a write to a closed pipe or socket
    // then fails with EPIPE instead of killing the process.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigIgn,
        )
    };
    // A panic is printed by std's hook as usual; unwinding stops here, as it
    // does in Rust's start, and the exit code is Rust's 101.
    let code = std::panic::catch_unwind(run).map_or(101, exit_status);
    // Rust's start flushes a buffered stdout at exit; returning to C does not.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

/// `code`'s number. std's `ExitCode` has no stable accessor, but it is a
/// byte that compares: the search costs nothing next to a process start.
fn exit_status(code: ExitCode) -> std::ffi::c_int {
    (0..=u8::MAX)
        .find(|&n| ExitCode::from(n) == code)
        .map_or(1, std::ffi::c_int::from)
}

fn run() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(command) = args.next() else {
        eprint!("{USAGE}");
        return ExitCode::from(USAGE_ERROR);
    };
    // The git actions come first: they are the hot path.
    match command.as_encoded_bytes() {
        b"get" => {
            git_helper::get();
            ExitCode::SUCCESS
        }
        b"erase" => {
            git_helper::erase();
            ExitCode::SUCCESS
        }
        // git sends `store` to every helper after a success; credd keeps nothing.
        b"store" => ExitCode::SUCCESS,
        b"token" => token(args.collect()),
        b"status" => status(args.collect()),
        b"metrics" => metrics(args.collect()),
        b"exec" => exec(args.collect()),
        b"configure-git" => configure_git(args.collect()),
        b"fallback" => fallback::run(&args.collect::<Vec<_>>()),
        b"--help" | b"-h" | b"help" => print_stdout(USAGE),
        b"--version" | b"-V" | b"version" => {
            print_stdout(&format!("credd {}\n", env!("CARGO_PKG_VERSION")))
        }
        _ => unknown(&command),
    }
}

/// git's protocol says helpers ignore actions they do not know (newer gits may
/// add some), so this stays silent for git — but a person typing a wrong
/// command at a terminal deserves to hear about it.
fn unknown(command: &OsStr) -> ExitCode {
    if std::io::stdin().is_terminal() {
        eprintln!(
            "credd: unknown command {:?}; see `credd --help`",
            command.to_string_lossy()
        );
        ExitCode::from(USAGE_ERROR)
    } else {
        ExitCode::SUCCESS
    }
}

fn usage_error(problem: &str) -> ExitCode {
    eprintln!("credd: {problem}; see `credd --help`");
    ExitCode::from(USAGE_ERROR)
}

/// Writes `text` to stdout. A reader that went away (`EPIPE`: `credd status |
/// head -0`) ends us quietly with exit 1, as coreutils end; any other write
/// error is one line. Never a panic, which `print!` would be.
pub(crate) fn print_stdout(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("credd: error: writing to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `token` and `exec` say of the chain: only that the platform served
/// when the daemon did not (their contract is one line of reason on failure).
pub(crate) fn say_served(step: chain::Fallback<'_>) {
    if let chain::Fallback::Served { daemon } = step {
        eprintln!("credd: {daemon}; got a token from the platform directly");
    }
}

/// Prints `credd: error: a -> b -> c` for an error and its causes.
fn report(error: &anyhow::Error) -> ExitCode {
    eprintln!(
        "credd: error: {}",
        credd_core::text::error_chain(error.as_ref())
    );
    ExitCode::FAILURE
}

/// Reads `--repo OWNER/NAME` / `--owner OWNER` (at most one of them) from
/// the front of `args`; what they chose, the rest left in `args`.
fn token_for(command: &str, args: &mut Lexer<'_>) -> Result<Which, ExitCode> {
    let mut want = Which::Default;
    while let Some(name) = args.option().filter(|n| ["--repo", "--owner"].contains(n)) {
        if want != Which::Default {
            return Err(usage_error(&format!(
                "`credd {command}` takes one of --repo and --owner"
            )));
        }
        let Some(value) = args.value() else {
            return Err(usage_error(&format!("{name} needs a value")));
        };
        let text = value.to_string_lossy();
        // credd-core's one rule for each; the words name the option.
        let chosen = match name {
            "--repo" => RepositoryRef::parse(&text).map(Which::Repository),
            _ => Which::owner(&text),
        };
        match chosen {
            Ok(which) => want = which,
            Err(e) => return Err(usage_error(&format!("{name} {text:?}: {e}"))),
        }
    }
    Ok(want)
}

fn token(args: Vec<OsString>) -> ExitCode {
    let mut args = Lexer::new(&args);
    let want = match token_for("token", &mut args) {
        Ok(want) => want,
        Err(code) => return code,
    };
    if let Some(extra) = args.rest().first() {
        return usage_error(&format!(
            "`credd token` takes only --repo or --owner, got {extra:?}"
        ));
    }
    let config = match HelperConfig::from_env() {
        Ok(config) => config,
        Err(e) => return report(&anyhow::Error::new(e).context("configuration")),
    };
    match chain::obtain_token(&config, &want, say_served) {
        Ok(issued) => {
            let line = zeroize::Zeroizing::new(format!("{}\n", issued.token.expose()));
            print_stdout(&line)
        }
        Err(reason) => {
            eprintln!("credd: error: no token available: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn status(args: Vec<OsString>) -> ExitCode {
    let json = match args.as_slice() {
        [] => false,
        [flag] if flag == "--json" => true,
        [other, ..] => {
            return usage_error(&format!("`credd status` takes only --json, got {other:?}"));
        }
    };
    match status::run(json) {
        Ok(text) => print_stdout(&text),
        Err(e) => report(&e),
    }
}

fn metrics(args: Vec<OsString>) -> ExitCode {
    if let Some(extra) = args.first() {
        return usage_error(&format!(
            "`credd metrics` takes no arguments, got {extra:?}"
        ));
    }
    match metrics::run() {
        Ok(text) => print_stdout(&text),
        Err(e) => report(&e),
    }
}

fn exec(args: Vec<OsString>) -> ExitCode {
    let mut args = Lexer::new(&args);
    let want = match token_for("exec", &mut args) {
        Ok(want) => want,
        Err(code) => return code,
    };
    let args = args.rest();
    let rest = match args.split_first() {
        Some((dashes, rest)) if dashes == "--" => rest,
        Some((first, _)) if first.as_encoded_bytes().starts_with(b"-") => {
            return usage_error(&format!(
                "`credd exec` has no option {first:?}; write `credd exec [--repo OWNER/NAME] -- CMD ARGS...`"
            ));
        }
        _ => args,
    };
    match rest.split_first() {
        Some((program, program_args)) => exec::run(program, program_args, &want),
        None => usage_error("`credd exec` needs a command: `credd exec -- CMD ARGS...`"),
    }
}

fn configure_git(args: Vec<OsString>) -> ExitCode {
    let mut options = configure_git::Options::default();
    let mut args = Lexer::new(&args);
    while let Some(name) = args.option() {
        match (name, args.value()) {
            ("--fallback-helper", Some(helper)) => options.fallback_helper = Some(helper.into()),
            ("--fallback-helper", None) => {
                return usage_error(
                    "--fallback-helper needs a helper, e.g. --fallback-helper store",
                );
            }
            ("--file", Some(file)) => options.file = Some(file.into()),
            ("--file", None) => return usage_error("--file needs a path"),
            _ => return usage_error(&format!("`credd configure-git` has no option {name:?}")),
        }
    }
    if let Some(extra) = args.rest().first() {
        return usage_error(&format!(
            "`credd configure-git` has no option {:?}",
            extra.to_string_lossy()
        ));
    }
    match configure_git::run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}
