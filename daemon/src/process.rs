//! Setting the process up: umask, logging, hardening, signals.
//!
//! The token lives in this process's memory, so before anything else the
//! process is made non-dumpable (no core dumps, no ptrace or `/proc/PID/mem`
//! for same-uid processes; its `/proc` files belong to root). Everything the
//! daemon creates is owner-only (umask 077, set while single-threaded:
//! changing it later would race other threads). Signals are received on a
//! thread of their own (signal-hook) and handed to the async side as
//! [`Command`]s, so a SIGTERM that arrives before the runtime runs is queued,
//! not lost.

use std::thread::JoinHandle;

use anyhow::Context;
use nix::sys::stat::Mode;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};
use tokio::sync::mpsc;

use crate::cli::LogFormat;

/// What the outside world tells a running daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// SIGHUP: call the platform now, whatever the schedule.
    Refresh,
    /// SIGTERM or SIGINT: stop accepting, finish, remove the socket.
    Shutdown {
        /// The signal's name, for the log.
        signal: &'static str,
    },
}

/// Everything the daemon creates is owner-only. Call while single-threaded.
pub fn restrict_umask() {
    nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
}

/// Logs to stderr in `format`, at `RUST_LOG` (default `info`): the one
/// setup the platform shares.
pub fn init_logging(format: LogFormat) {
    credd_core::logging::init(format);
}

/// Non-dumpable, and as many descriptors as the hard limit allows (one per
/// waiting client).
pub fn harden() -> anyhow::Result<()> {
    nix::sys::prctl::set_dumpable(false).context("cannot mark the process non-dumpable")?;
    if let Err(error) = credd_core::limits::raise_open_file_limit() {
        tracing::debug!(%error, "could not raise the open-file limit");
    }
    Ok(())
}

/// The signal thread: SIGTERM, SIGINT and SIGHUP become [`Command`]s.
pub struct SignalThread {
    handle: Handle,
    thread: JoinHandle<()>,
}

impl SignalThread {
    /// Installs the handlers and starts the thread; the commands arrive on
    /// the returned receiver.
    pub fn start() -> anyhow::Result<(Self, mpsc::UnboundedReceiver<Command>)> {
        let signals =
            Signals::new([SIGTERM, SIGINT, SIGHUP]).context("cannot install signal handlers")?;
        let handle = signals.handle();
        let (commands, received) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut signals = signals;
                for signal in signals.forever() {
                    let command = match signal {
                        SIGHUP => Command::Refresh,
                        SIGINT => Command::Shutdown { signal: "SIGINT" },
                        _ => Command::Shutdown { signal: "SIGTERM" },
                    };
                    if commands.send(command).is_err() {
                        break;
                    }
                }
            })
            .context("cannot start the signal thread")?;
        Ok((Self { handle, thread }, received))
    }

    /// Stops the thread.
    pub fn stop(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}
