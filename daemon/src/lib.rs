//! molecule-credd: the per-workspace token daemon, as a library.
//!
//! GitHub installation tokens live about an hour, but a workspace lives for
//! days and its environment is never updated. The daemon keeps a fresh token
//! in memory, refreshes it ahead of expiry from the platform, and hands it to
//! `credd` (git's credential helper, `gh`, scripts) over a private Unix socket
//! in well under a millisecond. The binary (`main.rs`) only parses, starts
//! logging, hardens and dispatches to [`start`] or a one-shot command.
//!
//! Data flows one way: command line and environment ([`cli`], checked once
//! into [`Settings`]) → the platform
//! client ([`platform`]) → the token store (`cache`, which owns every token,
//! every refresher and so every platform call, and what is daemon-wide) →
//! the socket server (`server`, which owns every connection, and `answer`,
//! which says the store's outcomes in the protocol's words).
//! [`socket`] sets the socket up safely, [`systemd`] adopts a socket-activated
//! listener and talks `sd_notify`, `on_refresh` runs the operator's hook;
//! both hear of every token's changes from the store.
//!
//! Everything that needs a single-threaded process (adopting systemd's
//! socket, the umask) happens before the async runtime starts.

mod answer;
pub mod bootstrap;
mod cache;
pub mod cli;
mod clock;
pub mod fetch_once;
pub mod gateway;
mod metrics;
mod on_refresh;
pub mod platform;
pub mod process;
mod server;
pub mod settings;
pub mod socket;
pub mod systemd;

use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use credd_core::secret::Token;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cache::{CachePolicy, TokenStore};
use crate::platform::{PlatformClient, Timeouts};
use crate::process::{Command, SignalThread};
use crate::server::{PeerCheck, ServerSettings};
pub use crate::settings::{Settings, StartError};
use crate::socket::SocketFile;

/// What [`run`] needs besides its socket: [`Settings`] made live.
pub struct Prepared {
    /// The platform client every call goes through.
    client: PlatformClient,
    /// The cache's timing.
    policy: CachePolicy,
    /// The socket server's limits and peer check.
    server: ServerSettings,
    /// The provision-time token, served until the platform answers.
    bootstrap: Option<Token>,
    /// `--on-refresh`.
    on_refresh: Option<String>,
    /// `--gateway`, bound and ready.
    gateway: Option<gateway::Gateway>,
}

/// The socket the daemon serves: adopted from systemd or bound by us.
pub struct Listener {
    /// The listening socket.
    pub listener: StdUnixListener,
    /// The file we bound (removed at shutdown); `None` when systemd owns it.
    pub file: Option<SocketFile>,
    /// Its path, for the log.
    pub path: PathBuf,
}

/// The daemon's life: binds (unless systemd passed a socket), runs [`run`]
/// on a single-thread runtime until SIGTERM.
pub fn start(
    settings: Settings,
    activated: std::io::Result<Option<StdUnixListener>>,
    bootstrap: Option<Token>,
) -> Result<(), StartError> {
    let client = PlatformClient::new(&settings.platform, Timeouts::default())?;
    // Before the socket exists, so a SIGTERM from now on is a clean shutdown
    // (queued until the runtime runs) rather than a death that leaves it behind.
    let (signals, commands) = SignalThread::start()?;
    let listener = match activated.context("cannot adopt the socket systemd passed")? {
        Some(listener) => {
            let path = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
                .unwrap_or_else(|| settings.socket_path.clone());
            Listener {
                listener,
                file: None,
                path,
            }
        }
        None => {
            let (listener, file) = socket::bind(&settings.socket_path)?;
            Listener {
                listener,
                file: Some(file),
                path: settings.socket_path.clone(),
            }
        }
    };
    let peer_check = PeerCheck::new(nix::unistd::geteuid().as_raw(), &settings.allow_uids);
    let gateway = settings
        .gateway
        .as_ref()
        .map(|g| gateway::Gateway::prepare(&g.options, &g.hosts, peer_check.clone()))
        .transpose()
        .context("cannot start the gateway")?;
    let prepared = Prepared {
        client,
        policy: settings.policy,
        server: ServerSettings {
            max_connections: settings.max_connections,
            peer_check,
            shutdown_grace: settings.policy.wait_timeout + server::READ_DEADLINE,
            sealed: settings.sealed,
        },
        bootstrap,
        on_refresh: settings.on_refresh.clone(),
        gateway,
    };
    if settings.sealed {
        tracing::info!(
            "sealed: the socket serves status only; tokens leave only through the gateway"
        );
    }
    if !settings.allow_uids.is_empty() {
        tracing::info!(uids = ?settings.allow_uids, "also serving these uids");
    }
    // One thread runs everything: the socket, the refreshers, the hook.
    // Why: a `get` is answered in microseconds, and on a multi-thread
    // runtime each one crossed threads twice (the I/O driver's thread woke
    // the accept loop, which woke a worker for the connection): two futex
    // wake-ups, the largest part of the daemon's answer time. Nothing on it
    // blocks (the bearer file is read on a thread of its own, bounded), and
    // one thread serves tens of thousands of gets a second.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("credd")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(run(prepared, listener, commands));
    signals.stop();
    drop(runtime);
    Ok(result?)
}

/// Acts on the signal handler's commands: SIGHUP refreshes now; SIGTERM
/// and SIGINT stop the daemon, the socket file removed first.
async fn follow_commands<F: cache::Fetch>(
    mut commands: mpsc::UnboundedReceiver<Command>,
    tokens: Arc<TokenStore<F>>,
    notifier: systemd::Notifier,
    mut socket_file: Option<SocketFile>,
    stop: CancellationToken,
) {
    while let Some(command) = commands.recv().await {
        match command {
            Command::Refresh => {
                // Flags and environment are fixed for the process; what can
                // change (the bearer file) is re-read on every call.
                tracing::info!("SIGHUP: refreshing the tokens now");
                tokens.refresh_now();
            }
            Command::Shutdown { signal } => {
                tracing::info!("{signal}: shutting down");
                notifier.stopping();
                // Unlinked while our listener still holds the address, so a
                // daemon starting meanwhile never sees a socket that is ours
                // but dead and takes it over (we would then remove its
                // socket instead of ours).
                if let Some(file) = socket_file.take() {
                    file.remove();
                }
                stop.cancel();
                return;
            }
        }
    }
}

/// Serves `listener` until a [`Command::Shutdown`] arrives on `commands`.
pub async fn run(
    settings: Prepared,
    listener: Listener,
    commands: mpsc::UnboundedReceiver<Command>,
) -> anyhow::Result<()> {
    let Listener {
        listener,
        file: socket_file,
        path,
    } = listener;
    let listener = tokio::net::UnixListener::from_std(listener)
        .context("cannot register the socket with the async runtime")?;
    let notifier = systemd::Notifier::from_env();
    let stop = CancellationToken::new();
    let tokens = Arc::new(TokenStore::start(
        settings.client,
        settings.policy,
        settings.bootstrap,
        settings.on_refresh.map(on_refresh::hook),
        &stop,
    ));
    tracing::info!("listening on {}", path.display());
    notifier.ready();
    systemd::follow(&tokens, &notifier, &stop);
    tokio::spawn(follow_commands(
        commands,
        Arc::clone(&tokens),
        notifier.clone(),
        socket_file,
        stop.clone(),
    ));

    let gateway = settings
        .gateway
        .map(|gateway| tokio::spawn(gateway::serve(gateway, Arc::clone(&tokens), stop.clone())));
    let stopped = stop.clone();
    server::run(listener, Arc::clone(&tokens), settings.server, async move {
        stopped.cancelled().await;
    })
    .await;
    stop.cancel();
    if let Some(gateway) = gateway {
        match gateway.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(error = %error, "the gateway failed"),
            Err(_) => bail!("the gateway task failed"),
        }
    }
    if tokens.stopped().await.is_err() {
        bail!("the refresher task failed");
    }
    tracing::info!("stopped");
    Ok(())
}
