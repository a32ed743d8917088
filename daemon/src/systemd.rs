//! The daemon's side of systemd: socket activation and `sd_notify`.
//!
//! Why this exists:
//!
//! - **Socket activation.** With `molecule-credd.socket`, systemd owns the
//!   listening socket and hands it to the daemon as fd 3 (`LISTEN_FDS=1`,
//!   `LISTEN_PID=<our pid>`). While the daemon restarts (crash, upgrade,
//!   watchdog kill) clients are queued by the kernel instead of failing over to
//!   the platform, and the socket's path and mode are set by the unit, not by
//!   us. [`take_activated_listener`] adopts that descriptor — the one place the
//!   project needs `unsafe`, because Rust cannot prove who owns a raw fd — after
//!   checking it really is a listening Unix stream socket, so a misconfigured
//!   unit (a `ListenDatagram=`, a TCP port) fails with a clear error instead of
//!   a confusing one on the first `accept`.
//! - **`Type=notify`.** systemd should call the service started when it
//!   *serves*, not when the process exists, and `systemctl status` should show
//!   the token's state. [`Notifier`] sends `READY=1`, `STATUS=…` and
//!   `STOPPING=1` to `NOTIFY_SOCKET`, and does nothing when the variable is
//!   absent (a container, a shell), so callers never need to ask.
//! - **Watchdog.** With `WatchdogSec=` systemd restarts a daemon that stops
//!   pinging. A daemon that is alive but whose token has expired and cannot be
//!   renewed is *not* healthy: it must stop pinging ([`Notifier::run_watchdog`]
//!   takes a health check for that), so systemd's view of the service matches
//!   what git experiences, and a restart gets a chance to fix it (re-reading
//!   configuration, a fresh connection pool).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cache::{Fetch, TokenStore};

use nix::sys::socket::{
    AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// Longest `STATUS=` text sent; systemd shows one line in `systemctl status`.
const MAX_STATUS_LEN: usize = 200;

/// Takes the listening socket systemd passed, if this process was socket-activated.
///
/// Returns `Ok(None)` when `LISTEN_PID`/`LISTEN_FDS` do not name this process
/// (the daemon then binds its own socket). `LISTEN_PID`, `LISTEN_FDS` and
/// `LISTEN_FDNAMES` are removed from the environment so children (the
/// `--on-refresh` command) do not inherit them — but only while the process is
/// still single-threaded: call this first thing in `main`, before the async
/// runtime or any other thread starts. Later calls still adopt the socket and
/// leave the variables (harmless: they name our pid, not a child's).
///
/// The returned listener is non-blocking, ready for
/// `tokio::net::UnixListener::from_std`.
///
/// # Errors
///
/// Invalid `LISTEN_*` values, more than one passed socket, or a socket that is
/// not a listening `AF_UNIX` stream socket (fix the `.socket` unit: one
/// `ListenStream=` with a path).
#[allow(unsafe_code)]
pub fn take_activated_listener() -> io::Result<Option<UnixListener>> {
    let fds: Vec<RawFd> = if is_single_threaded() {
        // SAFETY: `listen_fds_and_unset_env` and `remove_var` change the
        // environment, which is only sound while no other thread can read or
        // write it concurrently. `is_single_threaded` just counted the threads
        // of this process in /proc/self/task and found one — this one, busy
        // here — so nothing else can touch the environment.
        unsafe {
            let fds = sd_notify::listen_fds_and_unset_env()?.collect();
            std::env::remove_var("LISTEN_FDNAMES");
            fds
        }
    } else {
        sd_notify::listen_fds()?.collect()
    };
    let count = fds.len();
    let Some(&fd) = fds.first() else {
        return Ok(None);
    };
    if count != 1 || fd != LISTEN_FDS_START {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "systemd passed {count} sockets; molecule-credd.socket must have exactly one ListenStream= (a Unix socket path)"
            ),
        ));
    }
    // SAFETY: `listen_fds` returned fd 3 only because LISTEN_PID equals this
    // process's pid, i.e. systemd (or systemd-socket-activate) opened fd 3 for
    // us and passed it across exec; it also made the fd close-on-exec, which
    // fails with EBADF unless the fd is open. Nothing else in this process
    // refers to fd 3: the standard library opens no fds before `main`, and the
    // daemon calls this once, before it opens any file. So the new `OwnedFd`
    // is the fd's only owner and closing it on drop is correct.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    check_unix_stream_listener(&owned)?;
    let listener = UnixListener::from(owned);
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

/// Whether this process has exactly one thread (Linux: entries of /proc/self/task).
/// Unknown (no /proc) counts as "no", which only skips the environment cleanup.
fn is_single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}

/// Checks that `fd` is an `AF_UNIX` `SOCK_STREAM` socket in the listening state.
fn check_unix_stream_listener(fd: &OwnedFd) -> io::Result<()> {
    let wrong = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the socket systemd passed (fd 3) is {what}; molecule-credd.socket needs ListenStream=/path/to/credd.sock"
            ),
        )
    };
    let kind = getsockopt(fd, sockopt::SockType).map_err(|e| match e {
        nix::errno::Errno::ENOTSOCK => wrong("not a socket"),
        other => io::Error::from(other),
    })?;
    if kind != SockType::Stream {
        return Err(wrong(&format!("a {kind:?} socket, not a stream socket")));
    }
    let address: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(io::Error::from)?;
    if address.family() != Some(AddressFamily::Unix) {
        return Err(wrong("not a Unix socket (a TCP/IP port?)"));
    }
    if !getsockopt(fd, sockopt::AcceptConn).map_err(io::Error::from)? {
        return Err(wrong("not listening"));
    }
    Ok(())
}

/// Where `NOTIFY_SOCKET` points: a path, or (leading `@`) an abstract name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NotifyTarget {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// Sends state changes to systemd; every method is a no-op without `NOTIFY_SOCKET`.
///
/// Notifications are best effort: a failed send is logged at WARN and never
/// stops the daemon (systemd may be restarting itself). A fresh datagram
/// socket is used per message, as systemd may re-create its notify socket.
#[derive(Debug, Clone)]
pub(crate) struct Notifier {
    target: Option<NotifyTarget>,
    watchdog_interval: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` once.
    ///
    /// The variables are left in the environment (removing them needs a
    /// single-threaded process); the `--on-refresh` child has them removed
    /// from its own environment instead.
    pub(crate) fn from_env() -> Self {
        Self::from_values(
            std::env::var_os("NOTIFY_SOCKET"),
            std::env::var_os("WATCHDOG_USEC"),
            std::env::var_os("WATCHDOG_PID"),
            std::process::id(),
        )
    }

    /// Builds a notifier from the variables' values, as if this were process `own_pid`.
    fn from_values(
        notify_socket: Option<OsString>,
        watchdog_usec: Option<OsString>,
        watchdog_pid: Option<OsString>,
        own_pid: u32,
    ) -> Self {
        let target = notify_socket.and_then(|value| {
            use std::os::unix::ffi::OsStrExt;
            let bytes = value.as_bytes();
            match bytes.first() {
                Some(b'/') => Some(NotifyTarget::Path(PathBuf::from(value))),
                Some(b'@') => Some(NotifyTarget::Abstract(bytes[1..].to_vec())),
                // Relative paths and other schemes (vsock:) are not ours to guess.
                _ => None,
            }
        });
        let watchdog_interval = target.as_ref().and_then(|_| {
            watchdog_interval_from(
                watchdog_usec.as_deref().and_then(|v| v.to_str()),
                watchdog_pid.as_deref().and_then(|v| v.to_str()),
                own_pid,
            )
        });
        Self {
            target,
            watchdog_interval,
        }
    }

    /// Whether a service manager is listening (`NOTIFY_SOCKET` was usable).
    pub(crate) fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1`: the listener is up and requests are being answered.
    pub(crate) fn ready(&self) {
        self.send("READY=1\n");
    }

    /// `STATUS=text`: one line for `systemctl status` (say the token's state,
    /// never the token). Control characters become spaces and the text is cut
    /// to 200 bytes, so it can never smuggle in another assignment.
    pub(crate) fn status(&self, text: &str) {
        if self.target.is_none() {
            return;
        }
        self.send(&format!("STATUS={}\n", status_text(text)));
    }

    /// `STOPPING=1`: shutdown has begun (SIGTERM received).
    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1\n");
    }

    /// How often to [`ping`](Self::ping): half of `WATCHDOG_USEC`, when the
    /// unit sets `WatchdogSec=` and `WATCHDOG_PID` (if present) is this process.
    pub(crate) fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_interval
    }

    /// `WATCHDOG=1`: "still healthy". Only call it while the daemon can serve
    /// a token or expects to get one — see [`run_watchdog`](Self::run_watchdog).
    pub(crate) fn ping(&self) {
        if self.watchdog_interval.is_some() {
            self.send("WATCHDOG=1\n");
        }
    }

    /// Pings every [`watchdog_interval`](Self::watchdog_interval) while
    /// `healthy()` says so; never returns (select it against shutdown).
    ///
    /// `healthy` must return `false` while the daemon's token is expired *and*
    /// it cannot get a new one (the platform keeps failing): systemd then
    /// restarts the service after `WatchdogSec`, and its state shows the
    /// failure instead of a green light over a daemon that serves nothing.
    /// Without a watchdog this waits forever and costs nothing.
    pub(crate) async fn run_watchdog(&self, mut healthy: impl FnMut() -> bool) {
        let Some(period) = self.watchdog_interval else {
            return std::future::pending().await;
        };
        let mut ticks = tokio::time::interval(period);
        // After a stall, ping once and keep the rhythm; a burst of pings would
        // tell systemd nothing and a test counting them would be misled.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if healthy() {
                self.ping();
            }
        }
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.target else {
            return;
        };
        if let Err(error) = send_datagram(target, message.as_bytes()) {
            // The message holds only fixed words and the status line; safe to name.
            let kind = message.split('=').next().unwrap_or_default();
            tracing::warn!(%error, notification = kind, "could not notify systemd");
        }
    }
}

fn send_datagram(target: &NotifyTarget, message: &[u8]) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let address = match target {
        NotifyTarget::Path(path) => SocketAddr::from_pathname(path)?,
        NotifyTarget::Abstract(name) => SocketAddr::from_abstract_name(name)?,
    };
    socket.connect_addr(&address)?;
    let sent = socket.send(message)?;
    if sent != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to NOTIFY_SOCKET",
        ));
    }
    Ok(())
}

/// Half of `WATCHDOG_USEC` when it is a positive number and `WATCHDOG_PID`
/// is absent or equal to `own_pid` (else the watchdog is another process's).
fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok()? != own_pid
    {
        return None;
    }
    Some(Duration::from_micros(usec) / 2)
}

/// One printable line of at most [`MAX_STATUS_LEN`] bytes.
fn status_text(text: &str) -> String {
    credd_core::text::one_line(text, MAX_STATUS_LEN)
}

/// Subscribes systemd to the token store: a `STATUS=` line whenever any
/// token's state changes, and watchdog pings while it can serve. Nothing without
/// `NOTIFY_SOCKET`.
pub(crate) fn follow<F: Fetch>(
    cache: &Arc<TokenStore<F>>,
    notifier: &Notifier,
    stop: &CancellationToken,
) {
    if !notifier.is_enabled() {
        return;
    }
    if let Some(interval) = notifier.watchdog_interval() {
        tracing::info!(
            interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            "systemd watchdog enabled"
        );
    }
    {
        let (cache, notifier, stop) = (Arc::clone(cache), notifier.clone(), stop.clone());
        tokio::spawn(async move {
            let mut changes = cache.subscribe();
            let mut last = String::new();
            loop {
                let line = cache.status_line();
                if line != last {
                    notifier.status(&line);
                    last = line;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
            }
        });
    }
    let (cache, notifier, stop) = (Arc::clone(cache), notifier.clone(), stop.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = notifier.run_watchdog(|| cache.is_healthy()) => {}
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::UnixStream;

    fn owned(fd: impl Into<OwnedFd>) -> OwnedFd {
        fd.into()
    }

    #[test]
    fn accepts_only_a_listening_unix_stream_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = UnixListener::bind(dir.path().join("s")).expect("bind");
        check_unix_stream_listener(&owned(listener)).expect("a Unix listener is fine");

        let (a, _b) = UnixDatagram::pair().expect("datagram pair");
        let err = check_unix_stream_listener(&owned(a)).expect_err("datagram refused");
        assert!(err.to_string().contains("not a stream socket"), "{err}");

        let (a, _b) = UnixStream::pair().expect("stream pair");
        let err = check_unix_stream_listener(&owned(a)).expect_err("connected stream refused");
        assert!(err.to_string().contains("not listening"), "{err}");

        let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp bind");
        let err = check_unix_stream_listener(&owned(tcp)).expect_err("tcp refused");
        assert!(err.to_string().contains("not a Unix socket"), "{err}");

        let file = std::fs::File::open("/dev/null").expect("open /dev/null");
        let err = check_unix_stream_listener(&owned(file)).expect_err("file refused");
        assert!(err.to_string().contains("not a socket"), "{err}");
    }

    #[test]
    fn watchdog_interval_is_half_and_honours_the_pid() {
        let half = Some(Duration::from_millis(1500));
        assert_eq!(watchdog_interval_from(Some("3000000"), None, 42), half);
        assert_eq!(
            watchdog_interval_from(Some("3000000"), Some("42"), 42),
            half
        );
        assert_eq!(
            watchdog_interval_from(Some("3000000"), Some("41"), 42),
            None
        );
        assert_eq!(watchdog_interval_from(Some("3000000"), Some("x"), 42), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval_from(Some("-5"), None, 42), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 42), None);
        assert_eq!(watchdog_interval_from(None, Some("42"), 42), None);
    }

    #[test]
    fn status_is_one_bounded_line() {
        assert_eq!(
            status_text("token from platform\nREADY=1"),
            "token from platform READY=1"
        );
        let long = "é".repeat(500);
        let line = status_text(&long);
        assert!(line.len() <= MAX_STATUS_LEN);
        assert!(line.chars().all(|c| c == 'é'));
    }

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification arrives");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8")
    }

    #[test]
    fn notifies_a_real_datagram_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).expect("bind notify socket");
        systemd
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let notifier = Notifier::from_values(
            Some(path.into_os_string()),
            Some("2000000".into()),
            Some(std::process::id().to_string().into()),
            std::process::id(),
        );
        assert!(notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(1)));
        notifier.ready();
        assert_eq!(received(&systemd), "READY=1\n");
        notifier.status("source platform, expires in 52m\nWATCHDOG=1");
        assert_eq!(
            received(&systemd),
            "STATUS=source platform, expires in 52m WATCHDOG=1\n"
        );
        notifier.ping();
        assert_eq!(received(&systemd), "WATCHDOG=1\n");
        notifier.stopping();
        assert_eq!(received(&systemd), "STOPPING=1\n");
    }

    #[test]
    fn notifies_an_abstract_socket() {
        let name = format!("molecule-credd-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let systemd = UnixDatagram::bind_addr(&address).expect("bind abstract");
        systemd
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let notifier = Notifier::from_values(Some(format!("@{name}").into()), None, None, 1);
        notifier.ready();
        assert_eq!(received(&systemd), "READY=1\n");
        assert_eq!(notifier.watchdog_interval(), None);
    }

    #[test]
    fn without_notify_socket_everything_is_a_no_op() {
        let notifier = Notifier::from_values(None, Some("2000000".into()), None, 1);
        assert!(!notifier.is_enabled());
        // No watchdog without a socket to ping.
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.ready();
        notifier.status("x");
        notifier.ping();
        notifier.stopping();
        let relative = Notifier::from_values(Some("relative/path".into()), None, None, 1);
        assert!(!relative.is_enabled());
    }

    #[test]
    fn a_vanished_socket_is_not_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let notifier = Notifier::from_values(Some(dir.path().join("gone").into()), None, None, 1);
        // Logged, not returned and not a panic.
        notifier.ready();
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_pings_only_while_healthy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).expect("bind notify socket");
        systemd.set_nonblocking(true).expect("nonblocking");
        let notifier =
            Notifier::from_values(Some(path.into_os_string()), Some("200000".into()), None, 1);
        let checks = std::cell::Cell::new(0u32);
        // Healthy for the first three ticks, then "token expired, platform down".
        let watchdog = notifier.run_watchdog(|| {
            checks.set(checks.get() + 1);
            checks.get() <= 3
        });
        // Paused time: the sleep auto-advances the clock; 10 ticks of 100 ms.
        tokio::select! {
            () = watchdog => unreachable!("the watchdog never returns"),
            () = tokio::time::sleep(Duration::from_millis(950)) => {}
        }
        assert_eq!(checks.get(), 10, "one health check per tick");
        let mut pings = 0;
        let mut buf = [0u8; 64];
        while let Ok(n) = systemd.recv(&mut buf) {
            assert_eq!(&buf[..n], b"WATCHDOG=1\n");
            pings += 1;
        }
        assert_eq!(pings, 3, "no pings once unhealthy");
    }
}
