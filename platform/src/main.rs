//! `molecule-platform`: the token broker as a standalone service.
//!
//! Prints `molecule-platform listening on http://ADDR` as the first line of
//! stdout once bound (scripts and tests read the port from it), then how to
//! point a daemon at it. Logs go to stderr. SIGTERM/SIGINT drain and exit 0;
//! SIGHUP re-reads the workspace tokens file and the grants file (a broken
//! one keeps the previous table and says why in one line).
//!
//! Before anything else, while the process is still one thread, `main`
//! makes the process non-dumpable and takes `ADMIN_TOKEN` out of the
//! environment (the crate's one reviewed `unsafe`, in `take_admin_token`).

// `deny` rather than `forbid`: `take_admin_token` carries the crate's one
// reviewed exception (`std::env::remove_var`).
#![deny(unsafe_code)]

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use molecule_platform::config::{Args, Config};
use molecule_platform::{Auth, Grants, Platform};
use tokio::signal::unix::{SignalKind, signal};

/// The variable holding the admin bearer.
const ADMIN_TOKEN: &str = "ADMIN_TOKEN";

fn main() -> ExitCode {
    // No core dumps, and no ptrace or /proc/PID/{environ,mem} for other
    // processes of our uid: the admin bearer and GitHub tokens live in this
    // process's memory, and /proc/PID/environ keeps showing ADMIN_TOKEN
    // however it is removed from the environment below.
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("error: cannot mark the process non-dumpable: {error}");
        return ExitCode::FAILURE;
    }
    let admin_token = take_admin_token();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => return exit_for(&error),
    };
    let log_format = args.log_format;
    credd_core::logging::init(log_format);
    if admin_token.left_in_environment {
        tracing::warn!(
            "ADMIN_TOKEN could not be removed from the environment (the process was not single-threaded at start)"
        );
    }
    // One descriptor per connection: use what the hard limit allows (the
    // service's connection cap is 4096; a soft limit of 1024 is common). The
    // server evicts slow connections when it runs out anyway.
    if let Err(error) = credd_core::limits::raise_open_file_limit() {
        tracing::debug!(%error, "could not raise the open-file limit");
    }
    match run(args, admin_token.value) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", credd_core::text::error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// `ADMIN_TOKEN` as read at start.
struct AdminToken {
    value: Option<String>,
    /// Whether it had to stay in the environment.
    left_in_environment: bool,
}

/// Reads `ADMIN_TOKEN` once and removes it from the environment, so no
/// child process and no later reader of the environment in this process sees
/// it. Call first thing in `main`.
///
/// Removing it does not scrub `/proc/PID/environ`: the kernel shows the
/// environment block the process was started with, whatever `unsetenv` does
/// to the C library's copy. That file is protected by the process being
/// non-dumpable (root-only `/proc` files), which `main` arranges first.
#[allow(unsafe_code)]
fn take_admin_token() -> AdminToken {
    let present = std::env::var_os(ADMIN_TOKEN).is_some();
    let value = std::env::var(ADMIN_TOKEN).ok();
    if !present {
        return AdminToken {
            value,
            left_in_environment: false,
        };
    }
    if !is_single_threaded() {
        return AdminToken {
            value,
            left_in_environment: true,
        };
    }
    // SAFETY: `remove_var` changes the environment, which is only sound while
    // no other thread can read or write it concurrently (the C library's
    // getenv/setenv are not synchronised with Rust's environment lock).
    // `is_single_threaded` just counted the threads of this process in
    // /proc/self/task and found one — this one, busy here at the start of
    // `main`, before the async runtime, tracing or anything else could start
    // a thread — so nothing else can touch the environment.
    unsafe {
        std::env::remove_var(ADMIN_TOKEN);
    }
    AdminToken {
        value,
        left_in_environment: false,
    }
}

/// Whether the process has exactly one thread (Linux: entries of
/// /proc/self/task), as the daemon checks before its one environment change.
/// Unknown (no /proc) counts as "no": the variable then stays.
fn is_single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}

/// Prints clap's help, version or usage error as clap would (help and
/// version on stdout, exit 0; errors on stderr, exit 2), but exits 1 quietly
/// when that output cannot be written — `molecule-platform --help | true`
/// closes stdout first — instead of reporting success.
fn exit_for(error: &clap::Error) -> ExitCode {
    let text = error.render().to_string();
    let written = if error.use_stderr() {
        let mut err = std::io::stderr().lock();
        err.write_all(text.as_bytes()).and_then(|()| err.flush())
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes()).and_then(|()| out.flush())
    };
    match written {
        Ok(()) => ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2)),
        Err(_) => ExitCode::FAILURE,
    }
}

fn run(args: Args, admin_token: Option<String>) -> anyhow::Result<()> {
    let config = Config::from_args(args, admin_token).context("invalid configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

/// The platform `config` describes ([`Platform::from_config`]: the library's
/// composition root), its router served until SIGTERM or SIGINT.
async fn serve(config: Config) -> anyhow::Result<()> {
    let listen_on = config.listen;
    let Platform {
        state,
        dev_bearer_file,
    } = Platform::from_config(config)?;
    let limits = state.limits().clone();

    let listener = listen(listen_on).with_context(|| format!("cannot listen on {listen_on}"))?;
    let addr = listener.local_addr().context("listener address")?;

    announce(&format!("http://{addr}"), dev_bearer_file.as_deref())?;
    tracing::info!("listening on http://{addr}");

    reload_on_hangup(Arc::clone(state.auth()), Arc::clone(state.grants()))?;
    let shutdown = shutdown_signal()?;
    let app = molecule_platform::app(state);
    molecule_platform::service::serve_with_limits(listener, app, shutdown, &limits)
        .await
        .context("server")?;
    tracing::info!("stopped");
    Ok(())
}

/// On each SIGHUP, reloads the workspace bearers and the grants file,
/// keeping the previous ones when a file does not load.
fn reload_on_hangup(auth: Arc<Auth>, grants: Arc<Grants>) -> anyhow::Result<()> {
    let mut hangups = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match auth.workspaces().reload() {
                Ok(n) => tracing::info!("SIGHUP: reloaded workspace tokens ({n} entries)"),
                Err(error) => tracing::error!(
                    "SIGHUP: keeping the previous workspace tokens: {}",
                    credd_core::text::error_chain(&error)
                ),
            }
            if grants.source().is_some() {
                match grants.reload() {
                    Ok(n) => tracing::info!("SIGHUP: reloaded grants ({n} workspaces)"),
                    Err(error) => tracing::error!(
                        "SIGHUP: keeping the previous grants: {}",
                        credd_core::text::error_chain(&error)
                    ),
                }
            }
        }
    });
    Ok(())
}

/// Completes at SIGTERM or SIGINT (both handlers installed before it
/// returns, so a signal that comes at once is not lost).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut terms = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut ints = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        let which = tokio::select! {
            _ = terms.recv() => "SIGTERM",
            _ = ints.recv() => "SIGINT",
        };
        tracing::info!("{which}: shutting down, finishing in-flight requests");
    })
}

/// Connections the kernel queues for `accept` (it caps this at
/// `net.core.somaxconn`, 4096 by default): as many as the service's
/// connection cap. With the standard library's 128, clients that reconnect
/// as soon as they are evicted keep the queue full, and the kernel drops a
/// real client's handshake, which it then retries only a second later.
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` (with `SO_REUSEADDR`, as the standard
/// library sets it) and a backlog of [`LISTEN_BACKLOG`].
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Prints the two start-up lines on stdout, flushed at once.
fn announce(url: &str, dev_bearer_file: Option<&Path>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "molecule-platform listening on {url}").context("stdout")?;
    match dev_bearer_file {
        Some(file) => {
            let configs = file.parent().unwrap_or(Path::new("."));
            if file.file_name().is_some_and(|n| n == ".auth_token") {
                writeln!(
                    out,
                    "point a daemon at it: PLATFORM_URL={url} CONFIGS_DIR={} molecule-credd",
                    configs.display()
                )
            } else {
                writeln!(
                    out,
                    "point a daemon at it: PLATFORM_URL={url}, bearer in {} (copy it to $CONFIGS_DIR/.auth_token)",
                    file.display()
                )
            }
        }
        None => writeln!(
            out,
            "point a daemon at it: PLATFORM_URL={url}, with its bearer ($ADMIN_TOKEN or a workspace's) in $CONFIGS_DIR/.auth_token"
        ),
    }
    .context("stdout")?;
    out.flush().context("stdout")?;
    Ok(())
}
