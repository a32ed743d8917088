//! The rule a socket folder must meet, applied by both ends of the socket.
//!
//! The socket hands out a token that can write to an organisation's
//! repositories, and its default folder sits in a shared `/tmp`, where
//! another user can create `/tmp/molecule-credd-UID` before us. The daemon
//! refuses to bind in such a folder; the helper refuses to *talk* to a socket
//! in one, because whoever listens there could hand git an attacker's token
//! (and git would push to the attacker's account) or answer "unavailable" to
//! suppress every fallback. One rule, defined here, so the two ends can never
//! disagree about what is safe:
//!
//! - the folder is a real folder, not a symbolic link (not followed);
//! - it belongs to a trusted uid (the daemon: itself; the helper: itself,
//!   root, or the daemon uid the operator configured);
//! - nobody else may enter or change it (no group or other permission bits).
//!
//! The helper additionally checks the listening process's uid with
//! `SO_PEERCRED` once connected; the folder rule catches a squatted folder
//! before anything is sent.

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What is wrong with a socket folder. `Display` says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FolderProblem {
    /// The path has no parent folder.
    NoFolder,
    /// The folder could not be inspected (missing, or no permission).
    Uninspectable(io::ErrorKind),
    /// A symbolic link sits where the folder should be.
    Symlink,
    /// Something that is not a folder sits there.
    NotAFolder,
    /// The folder belongs to an untrusted uid.
    ForeignOwner {
        /// Its owner.
        owner: u32,
    },
    /// The folder is open to group or others.
    OpenMode {
        /// Its permission bits.
        mode: u32,
    },
}

impl fmt::Display for FolderProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoFolder => write!(f, "the socket path has no parent folder"),
            Self::Uninspectable(kind) => write!(f, "it cannot be inspected ({kind})"),
            Self::Symlink => write!(
                f,
                "it is a symbolic link (never followed); remove it so the daemon can create a private folder"
            ),
            Self::NotAFolder => write!(
                f,
                "it is not a folder; remove it or choose another CREDD_SOCKET"
            ),
            Self::ForeignOwner { owner } => write!(
                f,
                "it is owned by uid {owner}, not by this user; another user may have created it first: remove it or choose another CREDD_SOCKET"
            ),
            Self::OpenMode { mode } => write!(
                f,
                "its mode is {mode:04o}, open to group or others; run `chmod 700` on it or remove it"
            ),
        }
    }
}

/// Checks `folder` (not following a symlink) against the rule: a folder,
/// owned by one of `trusted_owners`, with no group or other permissions.
pub fn check(folder: &Path, trusted_owners: &[u32]) -> Result<(), FolderProblem> {
    let meta =
        std::fs::symlink_metadata(folder).map_err(|e| FolderProblem::Uninspectable(e.kind()))?;
    if meta.file_type().is_symlink() {
        return Err(FolderProblem::Symlink);
    }
    if !meta.is_dir() {
        return Err(FolderProblem::NotAFolder);
    }
    if !trusted_owners.contains(&meta.uid()) {
        return Err(FolderProblem::ForeignOwner { owner: meta.uid() });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(FolderProblem::OpenMode { mode });
    }
    Ok(())
}

/// The folder a socket path lives in, or [`FolderProblem::NoFolder`].
pub fn folder_of(socket: &Path) -> Result<&Path, FolderProblem> {
    socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or(FolderProblem::NoFolder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn a_private_folder_of_a_trusted_owner_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        assert_eq!(check(dir.path(), &[me()]), Ok(()));
        assert_eq!(
            check(dir.path(), &[me() + 1]),
            Err(FolderProblem::ForeignOwner { owner: me() })
        );
    }

    #[test]
    fn open_modes_symlinks_and_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for open in [0o750, 0o705, 0o777, 0o701] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(open))
                .expect("chmod");
            assert_eq!(
                check(dir.path(), &[me()]),
                Err(FolderProblem::OpenMode { mode: open })
            );
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).expect("symlink");
        assert_eq!(check(&link, &[me()]), Err(FolderProblem::Symlink));
        let file = dir.path().join("file");
        std::fs::write(&file, "x").expect("write");
        assert_eq!(check(&file, &[me()]), Err(FolderProblem::NotAFolder));
        assert_eq!(
            check(&dir.path().join("missing"), &[me()]),
            Err(FolderProblem::Uninspectable(io::ErrorKind::NotFound))
        );
        assert_eq!(
            folder_of(Path::new("credd.sock")),
            Err(FolderProblem::NoFolder)
        );
        for problem in [
            FolderProblem::Symlink,
            FolderProblem::ForeignOwner { owner: 7 },
        ] {
            assert!(problem.to_string().contains("remove it"), "{problem}");
        }
    }
}
