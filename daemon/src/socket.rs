//! Creating the daemon's Unix socket safely, and removing it again.
//!
//! The socket hands out a credential for every repository the GitHub App can
//! reach, so who can *reach* it matters as much as who may use it
//! (`SO_PEERCRED` is checked too, in the server). The folder is created 0700
//! with its final mode (never chmod after the fact, which leaves a window) and
//! refused when someone else owns it or it is open to group/other — in a
//! shared `/tmp` another user could have created it first. The socket is
//! bound inside that verified folder under the daemon's process-wide umask
//! 077 (set in `main` while single-threaded: narrowing it here would race
//! other threads), so it is owner-only from its first instant, then set to
//! exactly 0600.
//!
//! A socket file left by a crashed daemon is replaced; one that answers
//! belongs to a live daemon and we refuse to start rather than steal it. An
//! exclusive `flock` on the folder makes that check-then-replace safe when two
//! daemons start at the same moment. On
//! shutdown only the socket *we* bound is removed (same inode), never one a
//! newer daemon has put in its place.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use credd_core::socket_folder::{self, FolderProblem};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

/// `--prepare-socket`'s exit code for a socket folder it will not use.
pub const EXIT_FOLDER_REFUSED: u8 = 3;

/// Why the socket could not be set up. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The socket path has no parent folder.
    #[error(
        "socket path {0} has no parent folder; set CREDD_SOCKET to a path like /run/user/1000/molecule-credd/credd.sock"
    )]
    NoFolder(PathBuf),
    /// The folder could not be created.
    #[error("cannot create the socket folder {path}")]
    CreateFolder {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The folder could not be inspected.
    #[error("cannot inspect the socket folder {path}")]
    InspectFolder {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The folder is unsafe to use.
    #[error("refusing the socket folder {path}: {problem}")]
    UnsafeFolder {
        /// The folder.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// Another daemon answers on the socket.
    #[error(
        "another molecule-credd is already serving {0}; stop it first or choose another --socket/CREDD_SOCKET"
    )]
    InUse(PathBuf),
    /// Something that is not a socket sits at the path.
    #[error("{0} exists and is not a socket; remove it or choose another --socket/CREDD_SOCKET")]
    NotASocket(PathBuf),
    /// Any other failure around binding.
    #[error("cannot {action} {path}")]
    Io {
        /// What we tried.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl SocketError {
    /// Whether only a change of configuration or of the filesystem can fix
    /// it (so a supervisor should stop restarting), rather than time.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Self::NoFolder(_)
                | Self::CreateFolder { .. }
                | Self::UnsafeFolder { .. }
                | Self::NotASocket(_)
        )
    }
}

/// The socket file we bound; removes it on [`remove`](Self::remove) or drop,
/// but only while it is still the same file (inode).
#[derive(Debug)]
pub struct SocketFile {
    /// Exclusive `flock` on the socket folder, held until the socket is
    /// removed: two daemons starting at once cannot both take over.
    lock: Option<Flock<std::fs::File>>,
    path: PathBuf,
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
    removed: bool,
}

impl SocketFile {
    /// Removes the socket if it is still ours.
    pub(crate) fn remove(mut self) {
        self.remove_if_ours();
    }

    fn remove_if_ours(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        // Released with the removal, not at exit: a successor may start while
        // this process still finishes its last requests.
        let _lock = self.lock.take();
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta)
                if meta.dev() == self.dev
                    && meta.ino() == self.ino
                    && (meta.ctime(), meta.ctime_nsec()) == self.ctime =>
            {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    tracing::warn!(%error, path = %self.path.display(), "could not remove the socket");
                } else {
                    tracing::debug!(path = %self.path.display(), "removed the socket");
                }
            }
            Ok(_) => tracing::info!(
                path = %self.path.display(),
                "the socket was replaced by another process; leaving it"
            ),
            Err(_) => {}
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove_if_ours();
    }
}

/// Creates (or checks) the private folder `path` is to be bound in; returns it.
pub fn prepare_folder(path: &Path) -> Result<&Path, SocketError> {
    let folder =
        socket_folder::folder_of(path).map_err(|_| SocketError::NoFolder(path.to_owned()))?;
    ensure_private_folder(folder, nix::unistd::geteuid().as_raw())?;
    Ok(folder)
}

/// Creates (or checks) the folder, takes over a stale socket and binds a
/// 0600 socket at `path`.
pub(crate) fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    let folder = prepare_folder(path)?;
    let lock = lock_folder(folder, path)?;
    take_over_stale(path)?;

    let listener = UnixListener::bind(path).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => SocketError::InUse(path.to_owned()),
        _ => SocketError::Io {
            action: "bind the socket",
            path: path.to_owned(),
            source,
        },
    })?;
    let io_err = |action| {
        move |source| SocketError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    // Owner-only already (umask 077); exactly 0600 whatever the umask was.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("set the mode of the socket"))?;
    // Identity after the chmod (which changes ctime).
    let meta = std::fs::symlink_metadata(path).map_err(io_err("inspect the socket"))?;
    let file = SocketFile {
        lock: Some(lock),
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
        ctime: (meta.ctime(), meta.ctime_nsec()),
        removed: false,
    };
    listener
        .set_nonblocking(true)
        .map_err(io_err("configure the socket"))?;
    Ok((listener, file))
}

/// `--bind-socket-for UID -- COMMAND…`: binds the socket at `path` for
/// another uid and execs `command` with it, socket-activated (fd 3,
/// `LISTEN_FDS=1`, `LISTEN_PID`, as `systemd-socket-activate` does). Returns
/// only on failure.
///
/// Why: in a sealed workspace the daemon runs under a uid of its own and the
/// agent must still reach `status` and `metrics`, yet the folder rule (owner
/// only, no group/other bits) keeps every uid out of another's socket
/// folder. So root binds the socket in the *agent's* private folder (created
/// 0700 and given to `owner` when missing; refused unless it passes the same
/// rule for `owner`), the socket file owned by `owner`, mode 0600. The
/// listener's credentials are then root's, which `credd` trusts, and the
/// daemon, started by `command` under its own uid, adopts the socket; its
/// own folder stays closed to the agent. Run with fd 3 closed (`3<&-`): the
/// socket must land there.
pub fn hand_over(
    path: &Path,
    owner: u32,
    command: &[std::ffi::OsString],
) -> Result<std::convert::Infallible, SocketError> {
    use std::os::unix::process::CommandExt;

    let folder =
        socket_folder::folder_of(path).map_err(|_| SocketError::NoFolder(path.to_owned()))?;
    match std::fs::DirBuilder::new().mode(0o700).create(folder) {
        Ok(()) => std::os::unix::fs::chown(folder, Some(owner), None).map_err(|source| {
            SocketError::Io {
                action: "give the socket folder to its user",
                path: folder.to_owned(),
                source,
            }
        })?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(SocketError::CreateFolder {
                path: folder.to_owned(),
                source,
            });
        }
    }
    ensure_private_folder(folder, owner)?;
    take_over_stale(path)?;
    let io_err = |action| {
        move |source| SocketError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    // Close-on-exec: only the copy on fd 3 below crosses the exec.
    let listener = UnixListener::bind(path).map_err(io_err("bind the socket"))?;
    std::os::unix::fs::chown(path, Some(owner), None)
        .map_err(io_err("give the socket to its user"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("set the mode of the socket"))?;
    // On fd 3 without close-on-exec: the listener itself when it got fd 3
    // (the lowest free one), else its copy on the lowest free fd from 3 on —
    // 3 unless something holds 3, which is then refused (never replaced).
    let fd = if std::os::fd::AsRawFd::as_raw_fd(&listener) == 3 {
        nix::fcntl::fcntl(
            &listener,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(|errno| io_err("pass the socket on")(errno.into()))?;
        std::os::fd::IntoRawFd::into_raw_fd(listener)
    } else {
        nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_DUPFD(3))
            .map_err(|errno| io_err("pass the socket on")(errno.into()))?
    };
    if fd != 3 {
        return Err(SocketError::Io {
            action: "pass the socket on as fd 3 (start with fd 3 closed: 3<&-)",
            path: path.to_owned(),
            source: io::Error::other(format!("it became fd {fd}")),
        });
    }
    let Some((program, args)) = command.split_first() else {
        return Err(SocketError::Io {
            action: "pass the socket on",
            path: path.to_owned(),
            source: io::Error::other("no COMMAND after --"),
        });
    };
    let error = std::process::Command::new(program)
        .args(args)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_PID", std::process::id().to_string())
        .env("LISTEN_FDNAMES", "credd")
        .exec();
    Err(SocketError::Io {
        action: "run the command given the socket",
        path: PathBuf::from(program),
        source: error,
    })
}

/// Creates `folder` 0700 if missing; refuses it unless it is a real folder,
/// owned by `uid`, with no group/other permissions.
pub(crate) fn ensure_private_folder(folder: &Path, uid: u32) -> Result<(), SocketError> {
    match std::fs::DirBuilder::new()
        .recursive(false)
        .mode(0o700)
        .create(folder)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Missing parents (a fresh XDG_RUNTIME_DIR subtree): create them
            // private too.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(folder)
                .map_err(|source| SocketError::CreateFolder {
                    path: folder.to_owned(),
                    source,
                })?;
        }
        Err(source) => {
            return Err(SocketError::CreateFolder {
                path: folder.to_owned(),
                source,
            });
        }
    }
    // The same rule `credd` applies before it talks to a socket.
    socket_folder::check(folder, &[uid]).map_err(|problem| match problem {
        FolderProblem::Uninspectable(kind) => SocketError::InspectFolder {
            path: folder.to_owned(),
            source: kind.into(),
        },
        problem => SocketError::UnsafeFolder {
            path: folder.to_owned(),
            problem: problem.to_string(),
        },
    })
}

/// Takes the folder's exclusive lock, or reports the daemon holding it.
fn lock_folder(folder: &Path, socket: &Path) -> Result<Flock<std::fs::File>, SocketError> {
    let dir = std::fs::File::open(folder).map_err(|source| SocketError::InspectFolder {
        path: folder.to_owned(),
        source,
    })?;
    Flock::lock(dir, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
        Errno::EWOULDBLOCK => SocketError::InUse(socket.to_owned()),
        other => SocketError::Io {
            action: "lock the socket folder",
            path: folder.to_owned(),
            source: other.into(),
        },
    })
}

/// Removes a socket nobody answers on; refuses one that answers.
fn take_over_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Io {
                action: "inspect",
                path: path.to_owned(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_owned()));
    }
    if answers(path).map_err(|source| SocketError::Io {
        action: "probe the existing socket",
        path: path.to_owned(),
        source,
    })? {
        return Err(SocketError::InUse(path.to_owned()));
    }
    tracing::info!(path = %path.display(), "replacing a stale socket left by a daemon that is gone");
    std::fs::remove_file(path).or_else(|e| match e.kind() {
        io::ErrorKind::NotFound => Ok(()),
        _ => Err(SocketError::Io {
            action: "remove the stale socket",
            path: path.to_owned(),
            source: e,
        }),
    })
}

/// Whether something listens on `path`. Non-blocking, so a live daemon with
/// a full backlog (EAGAIN) counts as alive instead of hanging us.
fn answers(path: &Path) -> io::Result<bool> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let address = UnixAddr::new(path)?;
    match connect(fd.as_raw_fd(), &address) {
        Ok(()) | Err(Errno::EAGAIN | Errno::EINPROGRESS) => Ok(true),
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private_tempdir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        dir
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn creates_a_0700_folder_and_a_0600_socket_then_removes_it() {
        let dir = private_tempdir();
        let path = dir.path().join("run/deeper/credd.sock");
        let (_listener, file) = bind(&path).expect("bind");
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&dir.path().join("run")), 0o700);
        assert_eq!(mode(&path), 0o600);
        file.remove();
        assert!(!path.exists());
    }

    #[test]
    fn refuses_folders_open_to_others_without_changing_them() {
        let dir = private_tempdir();
        for open in [0o750, 0o705, 0o777, 0o710] {
            let folder = dir.path().join(format!("f{open:o}"));
            std::fs::create_dir(&folder).expect("mkdir");
            std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(open))
                .expect("chmod");
            let err = ensure_private_folder(&folder, me()).expect_err("refused");
            let text = err.to_string();
            assert!(text.contains(&folder.display().to_string()), "{text}");
            assert!(text.contains("chmod 700"), "{text}");
            assert_eq!(mode(&folder), open, "left as it was");
        }
    }

    #[test]
    fn refuses_a_folder_owned_by_someone_else_and_symlinks() {
        let dir = private_tempdir();
        let folder = dir.path().join("theirs");
        std::fs::create_dir(&folder).expect("mkdir");
        std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        // Pretend to be another uid rather than needing root to chown.
        let err = ensure_private_folder(&folder, me() + 1).expect_err("refused");
        assert!(err.to_string().contains("owned by uid"), "{err}");

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&folder, &link).expect("symlink");
        let err = ensure_private_folder(&link, me()).expect_err("refused");
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    #[test]
    fn takes_over_a_stale_socket_but_not_a_live_one() {
        let dir = private_tempdir();
        let path = dir.path().join("credd.sock");
        // Stale: bound, then the listener is gone.
        drop(UnixListener::bind(&path).expect("bind"));
        let (live, file) = bind(&path).expect("stale socket replaced");
        // Live: a second bind is refused (by the folder lock), and the first
        // socket stays.
        let err = bind(&path).expect_err("live socket kept");
        assert!(matches!(err, SocketError::InUse(_)), "{err}");
        assert!(err.to_string().contains("already serving"), "{err}");
        assert!(path.exists());
        // And by the probe alone: it answers.
        assert!(answers(&path).expect("probe"));
        drop(live);
        assert!(!answers(&path).expect("probe"), "nobody listens any more");
        drop(file);
        assert!(!path.exists(), "our socket removed on drop");
        // The lock went with it: a successor binds.
        let (_next, _file) = bind(&path).expect("successor binds");
    }

    #[test]
    fn never_removes_a_socket_that_replaced_ours() {
        let dir = private_tempdir();
        let path = dir.path().join("credd.sock");
        let (listener, file) = bind(&path).expect("bind");
        drop(listener);
        // A newer daemon's socket moved into place (a new inode).
        let newer_path = dir.path().join("newer.sock");
        let _newer = UnixListener::bind(&newer_path).expect("a newer daemon binds");
        std::fs::rename(&newer_path, &path).expect("replace");
        file.remove();
        assert!(path.exists(), "the newer daemon's socket is left alone");
    }

    #[test]
    fn refuses_a_regular_file_at_the_socket_path() {
        let dir = private_tempdir();
        let path = dir.path().join("credd.sock");
        std::fs::write(&path, "not a socket").expect("write");
        let err = bind(&path).expect_err("refused");
        assert!(matches!(err, SocketError::NotASocket(_)), "{err}");
        assert!(path.exists());
    }
}
