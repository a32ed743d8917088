//! One request to `molecule-credd` over its Unix socket, under hard deadlines.
//!
//! This is the hot path: a socket, one line out, one line back, std only.
//!
//! Deadlines. The socket is created with `SO_SNDTIMEO` set *before*
//! `connect(2)`: std's `UnixStream::connect` has no timeout, and although a
//! connect to a listening Unix socket normally completes at once, it blocks
//! while the listener's backlog is full (a wedged or overloaded daemon). Linux
//! bounds that wait by the socket's send timeout and then fails with `EAGAIN`,
//! so one deadline ([`CONNECT_DEADLINE`]) covers connect and the request write.
//! The answer then has [`READ_DEADLINE`] in total — longer than the daemon's
//! own `--wait-timeout` for an in-flight refresh (`credd_core::deadlines`
//! checks that at compile time), so a slow platform
//! shows up as the daemon's `unavailable` answer rather than as a timeout here.
//! A daemon that misses either deadline counts as unreachable.
//!
//! Trust. Before anything is sent, the server is verified, because whoever
//! listens at the socket path is handed git's request and could answer with
//! an attacker's token: the socket's folder must pass the same rule the
//! daemon applies ([`credd_core::socket_folder`]; owned by us or root), and
//! once connected the listening process's uid (`SO_PEERCRED`) must be ours,
//! root's (the service manager listens on socket-activated sockets) or the
//! configured `CREDD_DAEMON_UID`. A server that fails either check is
//! [`DaemonError::Untrusted`]: nothing was sent to it and nothing it says is
//! read. It is treated like an absent daemon for the platform fallback —
//! that path does not go through the socket, so a squatter gains nothing
//! from it but the denial of service it could cause anyway by occupying the
//! path — but never for `erase`, which has nothing to gain from a fallback.
//!
//! `busy`. A daemon at its connection cap answers `busy` without reading the
//! request, and may close before our request is written (`EPIPE`). A failed
//! write is therefore not the end: the answer may already be waiting, so it
//! is read before the daemon is declared unreachable.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use credd_core::config::HelperConfig;
use credd_core::deadlines;
use credd_core::protocol::{self, ErrorCode, MAX_ANSWER_LINE, Request, Response};
use credd_core::socket_folder;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
use nix::sys::time::TimeVal;
use zeroize::Zeroizing;

/// Connect plus writing the request.
pub(crate) const CONNECT_DEADLINE: Duration = deadlines::HELPER_CONNECT;
/// Reading the whole answer.
pub(crate) const READ_DEADLINE: Duration = deadlines::HELPER_READ;

/// Why the daemon gave no usable answer.
#[derive(Debug)]
pub(crate) enum DaemonError {
    /// Nobody answered in time: no socket, refused, deadline missed.
    Unreachable(String),
    /// Something listens, but it is not a daemon we may trust (its folder or
    /// its uid is wrong). Nothing was sent to it.
    Untrusted(String),
    /// Something answered, but not in our protocol (garbage, another version,
    /// closed early). The text never quotes what was received.
    Unintelligible(String),
    /// The daemon answered with an error.
    Refused {
        /// The daemon's reason code.
        code: ErrorCode,
        /// The daemon's one-line message, made printable.
        message: String,
    },
}

impl DaemonError {
    /// Whether the caller may ask the platform itself. Only when the daemon is
    /// absent or cannot be understood: a daemon that answers "no token" is
    /// already retrying the platform with back-off, and every workspace's git
    /// calling the platform on top of it is the stampede the daemon exists to
    /// prevent (the same holds for `busy`: it is at its connection cap).
    pub(crate) fn allows_platform_fallback(&self) -> bool {
        match self {
            Self::Unreachable(_) | Self::Untrusted(_) | Self::Unintelligible(_) => true,
            Self::Refused { code, .. } => {
                matches!(code, ErrorCode::UnsupportedVersion | ErrorCode::BadRequest)
            }
        }
    }

    /// One-line description for `credd: …` lines, with the socket path.
    pub(crate) fn describe(&self, socket: &Path) -> String {
        let socket = socket.display();
        match self {
            Self::Unreachable(reason) => {
                format!("molecule-credd not reachable at {socket} ({reason})")
            }
            Self::Untrusted(reason) => {
                format!("refusing the socket {socket}: {reason}; nothing was sent to it")
            }
            Self::Unintelligible(reason) => {
                format!("molecule-credd at {socket} gave an answer credd cannot use ({reason})")
            }
            Self::Refused {
                code: ErrorCode::Sealed,
                message,
            } => format!("molecule-credd at {socket} is sealed ({message})"),
            Self::Refused { code, message } => {
                format!("molecule-credd at {socket} has no token for us ({code}: {message})")
            }
        }
    }
}

/// Where the daemon is and whom it may be: the socket path and the uids a
/// genuine daemon can listen as.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// The socket.
    pub(crate) path: PathBuf,
    /// Uids the listening process may have (see the module docs).
    pub(crate) trusted_uids: Vec<u32>,
    /// Uids the socket's folder may belong to.
    pub(crate) folder_owners: [u32; 2],
}

impl Endpoint {
    /// The endpoint `config` names.
    pub(crate) fn from_config(config: &HelperConfig) -> Self {
        let folder_owners = config.trusted_folder_owners();
        Self {
            path: config.socket_path.clone(),
            trusted_uids: config.trusted_daemon_uids(folder_owners),
            folder_owners,
        }
    }
}

/// Sends `request` to a verified daemon, returns its answer. An `Error`
/// answer becomes [`DaemonError::Refused`].
pub(crate) fn round_trip(endpoint: &Endpoint, request: &Request) -> Result<Response, DaemonError> {
    let start = Instant::now();
    let socket_path = endpoint.path.as_path();
    verify_folder(endpoint)?;
    let mut stream = connect(socket_path, CONNECT_DEADLINE).map_err(|e| {
        DaemonError::Unreachable(match e.kind() {
            io::ErrorKind::NotFound => "no socket there; is molecule-credd running?".to_owned(),
            io::ErrorKind::ConnectionRefused => {
                "connection refused: no daemon is listening".to_owned()
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                "connect did not complete within {} ms: the daemon is not accepting",
                CONNECT_DEADLINE.as_millis()
            ),
            _ => format!("connect failed: {e}"),
        })
    })?;
    verify_peer(&stream, endpoint)?;
    let line = protocol::encode(request);
    let remaining = CONNECT_DEADLINE
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(1));
    let sent = stream
        .set_write_timeout(Some(remaining))
        .and_then(|()| stream.write_all(&line));
    let answer = match sent {
        Ok(()) => read_line(&mut stream, READ_DEADLINE)?,
        // Closed on us: an answer sent without reading (`busy`, `forbidden`)
        // is already in our buffer, so this read returns at once.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            read_line(&mut stream, CONNECT_DEADLINE)
                .map_err(|_| DaemonError::Unreachable(format!("sending the request failed: {e}")))?
        }
        Err(e) => {
            return Err(DaemonError::Unreachable(format!(
                "sending the request failed: {e}"
            )));
        }
    };
    match protocol::decode::<Response>(&answer) {
        Ok(Response::Error { code, message }) => Err(DaemonError::Refused {
            code,
            message: printable(&message),
        }),
        Ok(response) => Ok(response),
        Err(e) => Err(DaemonError::Unintelligible(e.to_string())),
    }
}

/// The socket's folder passes the daemon's own rule, so nobody else can have
/// put the socket there. A missing folder is just an absent daemon.
fn verify_folder(endpoint: &Endpoint) -> Result<(), DaemonError> {
    let folder = socket_folder::folder_of(&endpoint.path)
        .map_err(|problem| DaemonError::Untrusted(problem.to_string()))?;
    match socket_folder::check(folder, &endpoint.folder_owners) {
        Ok(()) => Ok(()),
        Err(socket_folder::FolderProblem::Uninspectable(io::ErrorKind::NotFound)) => Err(
            DaemonError::Unreachable("no socket there; is molecule-credd running?".to_owned()),
        ),
        Err(problem) => Err(DaemonError::Untrusted(format!(
            "its folder {}: {problem}",
            folder.display()
        ))),
    }
}

/// The listening process runs as a uid a genuine daemon can have.
fn verify_peer(stream: &UnixStream, endpoint: &Endpoint) -> Result<(), DaemonError> {
    let uid = socket::getsockopt(stream, sockopt::PeerCredentials)
        .map_err(|e| DaemonError::Untrusted(format!("its owner cannot be checked ({e})")))?
        .uid();
    if endpoint.trusted_uids.contains(&uid) {
        Ok(())
    } else {
        Err(DaemonError::Untrusted(format!(
            "it is served by uid {uid}, not by this user's daemon (set CREDD_DAEMON_UID if the daemon runs as its own user)"
        )))
    }
}

/// A connected stream whose connect and writes are bounded by `deadline`.
fn connect(path: &Path, deadline: Duration) -> io::Result<UnixStream> {
    let address = UnixAddr::new(path)?;
    // CLOEXEC: `credd exec` must not hand the connection to its child.
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let timeout = TimeVal::new(
        deadline.as_secs().try_into().unwrap_or(i64::MAX),
        deadline.subsec_micros().into(),
    );
    socket::setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
    socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &address)?;
    Ok(UnixStream::from(fd))
}

/// Reads one line (up to [`MAX_ANSWER_LINE`]) within `deadline` in total, so a
/// daemon trickling bytes cannot stretch it.
fn read_line(
    stream: &mut UnixStream,
    deadline: Duration,
) -> Result<Zeroizing<Vec<u8>>, DaemonError> {
    let start = Instant::now();
    let mut line = Zeroizing::new(Vec::with_capacity(512));
    let mut chunk = Zeroizing::new([0u8; 4096]);
    loop {
        let Some(remaining) = deadline
            .checked_sub(start.elapsed())
            .filter(|d| !d.is_zero())
        else {
            return Err(timed_out(deadline));
        };
        stream
            .set_read_timeout(Some(remaining))
            .map_err(|e| DaemonError::Unreachable(format!("socket error: {e}")))?;
        let n = match stream.read(&mut chunk[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out(deadline));
            }
            Err(e) => {
                return Err(DaemonError::Unreachable(format!(
                    "reading the answer failed: {e}"
                )));
            }
        };
        if n == 0 {
            return Err(DaemonError::Unintelligible(if line.is_empty() {
                "it closed the connection without answering".to_owned()
            } else {
                "it closed the connection in the middle of its answer".to_owned()
            }));
        }
        let got = &chunk[..n];
        if let Some(end) = got.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&got[..=end]);
        } else {
            line.extend_from_slice(got);
        }
        if line.len() > MAX_ANSWER_LINE {
            return Err(DaemonError::Unintelligible(format!(
                "its answer is longer than {MAX_ANSWER_LINE} bytes"
            )));
        }
        if line.last() == Some(&b'\n') {
            return Ok(line);
        }
    }
}

fn timed_out(deadline: Duration) -> DaemonError {
    DaemonError::Unreachable(format!("no answer within {} s", deadline.as_secs()))
}

/// Longest daemon message passed on to a terminal or log.
const MAX_MESSAGE: usize = 300;

/// `text` as one printable line of at most [`MAX_MESSAGE`] bytes: the
/// daemon's message goes to a terminal or a log.
pub(crate) fn printable(text: &str) -> String {
    credd_core::text::one_line(text, MAX_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absent_or_unintelligible_daemons_allow_the_platform_fallback() {
        let refused = |code| DaemonError::Refused {
            code,
            message: String::new(),
        };
        assert!(DaemonError::Unreachable(String::new()).allows_platform_fallback());
        assert!(DaemonError::Unintelligible(String::new()).allows_platform_fallback());
        assert!(DaemonError::Untrusted(String::new()).allows_platform_fallback());
        assert!(refused(ErrorCode::UnsupportedVersion).allows_platform_fallback());
        assert!(!refused(ErrorCode::Unavailable).allows_platform_fallback());
        assert!(!refused(ErrorCode::Forbidden).allows_platform_fallback());
        assert!(!refused(ErrorCode::Sealed).allows_platform_fallback());
        assert!(!refused(ErrorCode::Busy).allows_platform_fallback());
    }

    #[test]
    fn daemon_messages_are_made_one_printable_line() {
        assert_eq!(printable("a\nb\r\tc"), "a b  c");
        assert_eq!(printable(&"x".repeat(1000)).len(), 300);
    }

    #[test]
    fn a_missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        let endpoint = Endpoint {
            path: dir.path().join("none.sock"),
            trusted_uids: vec![nix::unistd::geteuid().as_raw()],
            folder_owners: [nix::unistd::geteuid().as_raw(), 0],
        };
        let err = round_trip(&endpoint, &Request::GET_DEFAULT).expect_err("no socket");
        assert!(matches!(err, DaemonError::Unreachable(_)), "{err:?}");
        assert!(
            err.describe(&dir.path().join("none.sock"))
                .contains("no socket")
        );
    }
}
