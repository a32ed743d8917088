//! The bearer file (`$CONFIGS_DIR/.auth_token`): read on every call (the
//! platform rotates it), bounded in size and time, and shared by calls that
//! come at once.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use secrecy::SecretString;
use zeroize::Zeroizing;

use super::{BEARER_READ_TIMEOUT, MAX_BEARER_FILE, PlatformClient, PlatformError};

/// Reads the bearer file, blocking (run on a thread of its own).
pub(super) type BearerReader = fn(&Path) -> Result<SecretString, PlatformError>;

/// One finished bearer read, handed to every call that waited for it.
type SharedRead = Arc<Result<SecretString, PlatformError>>;

/// The bearer read in flight, if any: single flight for `.auth_token`.
///
/// A read stuck in the kernel (a stalled filesystem under `CONFIGS_DIR`)
/// cannot be cancelled, so at most one read thread exists at a time. A call
/// that finds one running *joins* it and waits, within its own
/// [`BEARER_READ_TIMEOUT`], for that read's result — it does not fail
/// because another refresher happens to be reading. So calls at the same
/// moment (a SIGHUP with several owners' tokens held) share one read of the
/// file and all get its answer, and a stuck read still costs one thread
/// however many calls time out waiting for it. The slot is cleared before
/// the result is published, so a call that starts after a read finished
/// reads the file afresh (the platform rotates it).
#[derive(Debug, Default)]
pub(super) struct BearerReads {
    running: Mutex<Option<tokio::sync::watch::Receiver<Option<SharedRead>>>>,
}

impl BearerReads {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<tokio::sync::watch::Receiver<Option<SharedRead>>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PlatformClient {
    /// [`read_bearer`] on a thread of its own, within [`BEARER_READ_TIMEOUT`],
    /// joining a read already in flight (see [`BearerReads`]).
    ///
    /// Not `spawn_blocking`: a read stuck in `open(2)` would then hold the
    /// runtime's shutdown forever. A plain thread is abandoned on timeout
    /// (it ends when the kernel lets it, or with the process).
    pub(super) async fn read_bearer_bounded(&self) -> Result<SecretString, PlatformError> {
        let stalled = || PlatformError::BearerStalled {
            path: self.bearer_path.clone(),
            waited: BEARER_READ_TIMEOUT,
        };
        let mut result = {
            let mut running = self.bearer_reads.lock();
            match &*running {
                Some(read) => read.clone(),
                None => {
                    let (done, read) = tokio::sync::watch::channel(None);
                    let path = self.bearer_path.clone();
                    let reads = Arc::clone(&self.bearer_reads);
                    let reader = self.bearer_reader;
                    let spawned = std::thread::Builder::new()
                        .name("bearer-read".into())
                        .spawn(move || {
                            // The slot is cleared however the read ends (a
                            // panic included), and before the answer is
                            // sent: a call after this one reads afresh.
                            let read = {
                                let _clear = ClearOnDrop(reads);
                                reader(&path)
                            };
                            done.send_replace(Some(Arc::new(read)));
                        });
                    if let Err(source) = spawned {
                        return Err(PlatformError::BearerUnreadable {
                            path: self.bearer_path.clone(),
                            source,
                        });
                    }
                    // Set before the lock is released, so the thread's
                    // clear (which takes the lock) always comes after.
                    *running = Some(read.clone());
                    read
                }
            }
        };
        let answer = async {
            loop {
                if let Some(read) = result.borrow_and_update().clone() {
                    return Some(read);
                }
                if result.changed().await.is_err() {
                    // The thread ended without an answer (it panicked).
                    return result.borrow().clone();
                }
            }
        };
        match tokio::time::timeout(BEARER_READ_TIMEOUT, answer).await {
            Ok(Some(read)) => match &*read {
                Ok(bearer) => Ok(bearer.clone()),
                Err(error) => Err(copy_bearer_error(error)),
            },
            Ok(None) | Err(_) => Err(stalled()),
        }
    }
}

/// Clears the bearer read in flight when dropped.
struct ClearOnDrop(Arc<BearerReads>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        *self.0.lock() = None;
    }
}

/// The same bearer-file error again, for each call that shared the read.
/// [`read_bearer`] returns only the bearer variants; an I/O error keeps its
/// kind and text.
fn copy_bearer_error(error: &PlatformError) -> PlatformError {
    match error {
        PlatformError::BearerUnreadable { path, source } => PlatformError::BearerUnreadable {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        PlatformError::BearerInvalid { path, problem } => PlatformError::BearerInvalid {
            path: path.clone(),
            problem,
        },
        PlatformError::BearerStalled { path, waited } => PlatformError::BearerStalled {
            path: path.clone(),
            waited: *waited,
        },
        other => PlatformError::BearerUnreadable {
            path: PathBuf::new(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

/// Reads and checks the bearer file (bounded, trimmed, header-safe). Blocks
/// as long as the filesystem does: async callers use the bounded read of
/// [`PlatformClient`].
///
/// Opened non-blocking, so a FIFO planted (or mounted) there cannot block the
/// open waiting for a writer, and refused unless it is a regular file.
pub fn read_bearer(path: &Path) -> Result<SecretString, PlatformError> {
    let invalid = |problem| PlatformError::BearerInvalid {
        path: path.to_owned(),
        problem,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|source| PlatformError::BearerUnreadable {
            path: path.to_owned(),
            source,
        })?;
    let is_file = file
        .metadata()
        .map_err(|source| PlatformError::BearerUnreadable {
            path: path.to_owned(),
            source,
        })?
        .is_file();
    if !is_file {
        return Err(invalid(
            "it is not a regular file (a FIFO, device or folder); the platform writes a plain file there",
        ));
    }
    let mut raw = Zeroizing::new(Vec::new());
    file.take(MAX_BEARER_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(|source| PlatformError::BearerUnreadable {
            path: path.to_owned(),
            source,
        })?;
    if raw.len() as u64 > MAX_BEARER_FILE {
        return Err(invalid("the file is larger than 8 KiB"));
    }
    let text = std::str::from_utf8(&raw).map_err(|_| invalid("it is not text"))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(invalid("the file is empty"));
    }
    if !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid("it contains spaces or non-printable characters"));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}
