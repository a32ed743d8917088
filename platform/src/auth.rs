//! Who may fetch a token: the admin bearer and per-workspace bearers.
//!
//! The platform stores no workspace bearer, only its SHA-256 (from
//! `PLATFORM_WORKSPACE_TOKENS_FILE`), so a leaked file grants nothing. Every
//! comparison is between digests, in constant time. A workspace's own route
//! compares with that workspace's digest (or a dummy); the admin route,
//! which must find the workspace from the bearer alone, probes a map keyed
//! by the digest — one lookup whatever the number of workspaces, so an
//! unauthenticated request costs O(1), and why that leaks nothing is on
//! [`WorkspaceTokens::find`]. The table is swapped whole on reload (SIGHUP),
//! so a request sees the old or the new file, never half of one.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::table_file::{FileError, Table, TableFile};

/// Largest workspace tokens file accepted.
pub const MAX_TOKENS_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// Most entries accepted in a workspace tokens file.
pub const MAX_TOKENS_FILE_ENTRIES: usize = 100_000;
/// Longest workspace ID accepted.
pub const MAX_WORKSPACE_ID_CHARS: usize = credd_core::config::MAX_WORKSPACE_ID_LEN;
/// Longest bearer accepted in an `Authorization` header.
pub const MAX_BEARER_BYTES: usize = 4096;

/// The SHA-256 of a bearer: all the platform keeps of one. Two digests
/// compare in constant time (every byte, whatever differs first).
#[derive(Clone, Copy)]
struct BearerDigest([u8; 32]);

impl PartialEq for BearerDigest {
    fn eq(&self, other: &Self) -> bool {
        #[cfg(test)]
        tests::count_comparison();
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for BearerDigest {}

impl std::hash::Hash for BearerDigest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

fn digest(bearer: &str) -> BearerDigest {
    BearerDigest(Sha256::digest(bearer.as_bytes()).into())
}

/// Whether `id` is a workspace ID: the one rule the daemon and the helper
/// apply too ([`credd_core::config::is_valid_workspace_id`]).
pub fn valid_workspace_id(id: &str) -> bool {
    credd_core::config::is_valid_workspace_id(id)
}

/// A workspace tokens file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    /// The file could not be read, or is too large.
    #[error(transparent)]
    File(#[from] FileError),
    /// A line is not `WORKSPACE_ID SHA256_HEX`.
    #[error("{origin}:{line}: {reason}")]
    Line {
        /// The file (or `<inline>`).
        origin: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong and how to fix it (never the line's content).
        reason: String,
    },
}

/// The parsed table: workspace ID → SHA-256 of its bearer, and the reverse.
#[derive(Default)]
struct TokenTable {
    hashes: HashMap<String, BearerDigest>,
    /// Digest → the first workspace listed with it (a bearer given to two
    /// workspaces passes either's route, and names the first on the admin
    /// route).
    by_digest: HashMap<BearerDigest, String>,
}

impl TokenTable {
    /// Adds `id`; false when it is already listed.
    fn insert(&mut self, id: String, hash: BearerDigest) -> bool {
        if self.hashes.contains_key(&id) {
            return false;
        }
        self.by_digest.entry(hash).or_insert_with(|| id.clone());
        self.hashes.insert(id, hash);
        true
    }

    fn parse(text: &str, origin: &str) -> Result<Self, TokensFileError> {
        let mut table = Self::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let fail = |reason: String| TokensFileError::Line {
                origin: origin.to_owned(),
                line,
                reason,
            };
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [id, hex] = fields[..] else {
                return Err(fail(format!(
                    "expected 2 fields `WORKSPACE_ID SHA256_HEX_OF_BEARER`, found {}",
                    fields.len()
                )));
            };
            if !valid_workspace_id(id) {
                return Err(fail(format!(
                    "the workspace ID must be 1-{MAX_WORKSPACE_ID_CHARS} characters of letters, digits, '.', '_' or '-', not starting with '.'"
                )));
            }
            let hash = parse_hex_digest(hex).ok_or_else(|| {
                fail(format!(
                    "the second field must be 64 hex digits, the SHA-256 of the bearer \
                     (`printf %s \"$BEARER\" | sha256sum`), not the bearer itself; got {} characters",
                    hex.len()
                ))
            })?;
            if table.hashes.len() >= MAX_TOKENS_FILE_ENTRIES {
                return Err(fail(format!("more than {MAX_TOKENS_FILE_ENTRIES} entries")));
            }
            if !table.insert(id.to_owned(), hash) {
                return Err(fail(format!("workspace {id} is listed twice")));
            }
        }
        Ok(table)
    }
}

fn parse_hex_digest(hex: &str) -> Option<BearerDigest> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(BearerDigest(out))
}

impl Table for TokenTable {
    const FILE: &'static str = "workspace tokens file";
    const MAX_FILE_BYTES: u64 = MAX_TOKENS_FILE_BYTES;
    type Error = TokensFileError;

    fn parse(text: &str, origin: &str) -> Result<Self, TokensFileError> {
        TokenTable::parse(text, origin)
    }

    fn entries(&self) -> usize {
        self.hashes.len()
    }
}

/// The workspace bearer table, reloadable from its file ([`TableFile`]).
pub struct WorkspaceTokens {
    file: TableFile<TokenTable>,
}

impl fmt::Debug for WorkspaceTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkspaceTokens")
            .field("source", &self.source())
            .field("entries", &self.len())
            .finish()
    }
}

impl Default for WorkspaceTokens {
    fn default() -> Self {
        Self::empty()
    }
}

impl WorkspaceTokens {
    /// No workspace tokens (only the admin bearer, if any, is accepted).
    pub fn empty() -> Self {
        Self {
            file: TableFile::fixed(TokenTable::default()),
        }
    }

    /// Parses the file format: lines `WORKSPACE_ID SHA256_HEX_OF_BEARER`,
    /// blank lines and `#` comment lines ignored.
    pub fn parse(text: &str) -> Result<Self, TokensFileError> {
        Ok(Self {
            file: TableFile::fixed(TokenTable::parse(text, "<inline>")?),
        })
    }

    /// Loads `path`; [`WorkspaceTokens::reload`] re-reads it.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, TokensFileError> {
        Ok(Self {
            file: TableFile::load(path)?,
        })
    }

    /// A table from `(workspace ID, bearer)` pairs, hashing the bearers (for
    /// tests and embedding).
    pub fn from_bearers<I, S>(entries: I) -> Self
    where
        I: IntoIterator<Item = (S, SecretString)>,
        S: Into<String>,
    {
        // A later entry for an ID replaces its bearer; IDs keep the order
        // of their first entry.
        let mut order = Vec::new();
        let mut hashes = HashMap::new();
        for (id, bearer) in entries {
            let id: String = id.into();
            if hashes
                .insert(id.clone(), digest(bearer.expose_secret()))
                .is_none()
            {
                order.push(id);
            }
        }
        let mut table = TokenTable::default();
        for id in order {
            let hash = hashes[&id];
            table.insert(id, hash);
        }
        Self {
            file: TableFile::fixed(table),
        }
    }

    /// Re-reads the file this table came from and swaps it in whole; on
    /// error the old table stays. Returns the number of entries now loaded.
    pub fn reload(&self) -> Result<usize, TokensFileError> {
        self.file.reload()
    }

    /// The file this table is loaded from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.file.source()
    }

    /// Number of workspaces.
    pub fn len(&self) -> usize {
        self.current().entries()
    }

    /// Whether no workspace is listed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn current(&self) -> Arc<TokenTable> {
        self.file.current()
    }

    /// Whether `bearer` is the bearer of workspace `workspace_id`.
    pub fn verify(&self, workspace_id: &str, bearer: &str) -> bool {
        let presented = digest(bearer);
        let table = self.current();
        // Compare against a dummy for unknown IDs so both paths cost the same.
        let (expected, known) = match table.hashes.get(workspace_id) {
            Some(hash) => (*hash, true),
            None => (BearerDigest([0u8; 32]), false),
        };
        (presented == expected) && known
    }

    /// The workspace whose bearer is `bearer` (the first listed, if two
    /// share it): one probe of a map keyed by the bearer's SHA-256, so the
    /// cost does not grow with the number of workspaces.
    ///
    /// Why a keyed lookup leaks nothing useful, although its time depends
    /// on what is stored: the key is the SHA-256 of what the caller sent,
    /// never the bearer. The map hashes that digest with SipHash under a
    /// per-process random key and compares (in constant time) the few
    /// stored digests whose hash tag matches. At best, timing could tell a
    /// caller that the digest of its guess shares a bucket or a tag with
    /// some stored digest — and that is no step towards a bearer: making a
    /// guess whose digest matches a stored one any better is a SHA-256
    /// preimage search, so every guess stays as blind as the first. Whether
    /// the bearer is known at all is what the answer (200 or 401) says
    /// anyway.
    pub fn find(&self, bearer: &str) -> Option<String> {
        self.current().by_digest.get(&digest(bearer)).cloned()
    }
}

/// Who a request was authorised as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The admin bearer.
    Admin,
    /// A workspace's own bearer.
    Workspace(String),
}

/// Why a request was refused (the text is safe to send to the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` header.
    #[error("missing bearer token")]
    MissingBearer,
    /// A bearer that matches nothing allowed on this route.
    #[error("invalid bearer token")]
    InvalidBearer,
}

/// The platform's bearer checks.
pub struct Auth {
    admin: Option<BearerDigest>,
    workspaces: WorkspaceTokens,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("admin", &self.admin.is_some())
            .field("workspaces", &self.workspaces)
            .finish()
    }
}

impl Auth {
    /// Checks against `admin` (`ADMIN_TOKEN`; an empty one counts as unset)
    /// and the `workspaces` table. Only the admin bearer's digest is kept.
    pub fn new(admin: Option<SecretString>, workspaces: WorkspaceTokens) -> Self {
        let admin = admin
            .filter(|a| !a.expose_secret().is_empty())
            .map(|a| digest(a.expose_secret()));
        Self { admin, workspaces }
    }

    /// The workspace table (to reload it).
    pub fn workspaces(&self) -> &WorkspaceTokens {
        &self.workspaces
    }

    /// Whether an admin bearer is configured.
    pub fn has_admin(&self) -> bool {
        self.admin.is_some()
    }

    fn is_admin(&self, bearer: &str) -> bool {
        let presented = digest(bearer);
        match &self.admin {
            Some(admin) => presented == *admin,
            None => false,
        }
    }

    /// `GET /workspaces/{id}/…`: that workspace's bearer or the admin one.
    pub fn authorize_workspace(
        &self,
        workspace_id: &str,
        bearer: Option<&str>,
    ) -> Result<Caller, AuthError> {
        let bearer = bearer.ok_or(AuthError::MissingBearer)?;
        if self.is_admin(bearer) {
            return Ok(Caller::Admin);
        }
        if valid_workspace_id(workspace_id) && self.workspaces.verify(workspace_id, bearer) {
            return Ok(Caller::Workspace(workspace_id.to_owned()));
        }
        Err(AuthError::InvalidBearer)
    }

    /// `GET /admin/…`: the admin bearer; when no admin bearer is configured,
    /// any workspace's bearer (a workspace that does not know its ID can
    /// still fetch a token; the route's handler turns it away while grants
    /// are in force, see `service::admin_route_closed`). With `ADMIN_TOKEN`
    /// set, workspace bearers are refused here.
    pub fn authorize_admin(&self, bearer: Option<&str>) -> Result<Caller, AuthError> {
        let bearer = bearer.ok_or(AuthError::MissingBearer)?;
        if self.admin.is_some() {
            return if self.is_admin(bearer) {
                Ok(Caller::Admin)
            } else {
                Err(AuthError::InvalidBearer)
            };
        }
        self.workspaces
            .find(bearer)
            .map(Caller::Workspace)
            .ok_or(AuthError::InvalidBearer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bearer: &str) -> String {
        digest(bearer)
            .0
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    thread_local! {
        static COMPARISONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// Counts one digest comparison on this thread.
    pub(super) fn count_comparison() {
        COMPARISONS.with(|c| c.set(c.get() + 1));
    }

    /// Digest comparisons `f` made on this thread.
    fn comparisons_in<T>(f: impl FnOnce() -> T) -> (T, u64) {
        let before = COMPARISONS.with(std::cell::Cell::get);
        let out = f();
        (out, COMPARISONS.with(std::cell::Cell::get) - before)
    }

    /// Issue 20, item 6: with `ADMIN_TOKEN` unset, every admin-route
    /// request (authenticated or not) looked its bearer up; comparing it
    /// with every workspace's digest cost O(workspaces) — 100,000
    /// comparisons at the cap — for anyone. One hash-map probe makes a
    /// handful at most (a digest compared only where the map's hash tag
    /// matches), whatever the table's size. Counted, not timed.
    #[test]
    fn finding_a_bearer_is_one_lookup_not_a_scan() {
        const N: usize = MAX_TOKENS_FILE_ENTRIES;
        /// More than any probe of a hash map makes, far fewer than a scan.
        const MOST: u64 = 16;
        let bearer = |i: usize| format!("bearer-of-workspace-{i}");
        let tokens = WorkspaceTokens::from_bearers(
            (0..N).map(|i| (format!("ws-{i}"), SecretString::from(bearer(i)))),
        );
        assert_eq!(tokens.len(), N);
        let cases = [
            (bearer(0), Some("ws-0".to_owned())),
            (bearer(N / 2), Some(format!("ws-{}", N / 2))),
            (bearer(N - 1), Some(format!("ws-{}", N - 1))),
            (bearer(N), None),
            ("a stranger's guess".to_owned(), None),
        ];
        for (presented, expected) in cases {
            let (found, compared) = comparisons_in(|| tokens.find(&presented));
            assert_eq!(found, expected, "{presented}");
            assert!(
                compared <= MOST,
                "{compared} digest comparisons to look up one bearer among {N} workspaces"
            );
        }
        let auth = Auth::new(None, tokens);
        let (caller, compared) = comparisons_in(|| auth.authorize_admin(Some("nobody")));
        assert_eq!(caller, Err(AuthError::InvalidBearer));
        assert!(
            compared <= MOST,
            "{compared} comparisons on the admin route"
        );
    }

    #[test]
    fn parses_comments_blank_lines_and_entries() {
        let text = format!(
            "# tokens\n\n  ws-a {}\nws.b\t{}  \n",
            hex("alpha"),
            hex("beta").to_uppercase()
        );
        let tokens = WorkspaceTokens::parse(&text).unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens.verify("ws-a", "alpha"));
        assert!(tokens.verify("ws.b", "beta"));
        assert!(!tokens.verify("ws-a", "beta"));
        assert!(!tokens.verify("ws-c", "alpha"));
        assert_eq!(tokens.find("beta").as_deref(), Some("ws.b"));
        assert_eq!(tokens.find("gamma"), None);
    }

    #[test]
    fn a_bearer_listed_for_two_workspaces_passes_both_and_names_the_first() {
        let text = format!("ws-z {}\nws-a {}\n", hex("shared"), hex("shared"));
        let tokens = WorkspaceTokens::parse(&text).unwrap();
        assert!(tokens.verify("ws-z", "shared") && tokens.verify("ws-a", "shared"));
        assert_eq!(tokens.find("shared").as_deref(), Some("ws-z"));
        let tokens = WorkspaceTokens::from_bearers([
            ("ws-z", SecretString::from("shared")),
            ("ws-a", SecretString::from("shared")),
            ("ws-z", SecretString::from("own")),
        ]);
        assert!(tokens.verify("ws-z", "own") && !tokens.verify("ws-z", "shared"));
        assert_eq!(tokens.find("shared").as_deref(), Some("ws-a"));
        assert_eq!(tokens.find("own").as_deref(), Some("ws-z"));
    }

    #[test]
    fn errors_name_the_line_and_never_echo_content() {
        let cases = [
            ("ws-a\n".to_owned(), 1, "expected 2 fields"),
            (format!("# c\nws-a {} extra\n", hex("a")), 2, "found 3"),
            (
                "\n\nws-a ghs_raw_bearer_by_mistake\n".to_owned(),
                3,
                "not the bearer itself",
            ),
            (format!("ws/a {}\n", hex("a")), 1, "workspace ID"),
            (
                format!("ws-a {}\nws-a {}\n", hex("a"), hex("b")),
                2,
                "listed twice",
            ),
        ];
        for (text, line, needle) in cases {
            let err = WorkspaceTokens::parse(&text).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("<inline>:{line}: ")), "{msg}");
            assert!(msg.contains(needle), "{msg}");
            assert!(!msg.contains("ghs_raw"), "{msg}");
        }
    }

    #[test]
    fn reload_swaps_the_table_and_keeps_it_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("ws-a {}\n", hex("alpha"))).unwrap();
        let tokens = WorkspaceTokens::load(&path).unwrap();
        assert!(tokens.verify("ws-a", "alpha"));
        std::fs::write(&path, format!("ws-b {}\n", hex("beta"))).unwrap();
        assert_eq!(tokens.reload().unwrap(), 1);
        assert!(!tokens.verify("ws-a", "alpha"));
        assert!(tokens.verify("ws-b", "beta"));
        std::fs::write(&path, "broken\n").unwrap();
        let err = tokens.reload().unwrap_err();
        assert!(err.to_string().contains(":1: expected 2 fields"), "{err}");
        assert!(tokens.verify("ws-b", "beta"), "old table kept");
    }

    #[test]
    fn oversized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_TOKENS_FILE_BYTES + 1).unwrap();
        let err = WorkspaceTokens::load(&path).unwrap_err();
        assert!(
            matches!(err, TokensFileError::File(FileError::TooLarge { .. })),
            "{err}"
        );
    }

    #[test]
    fn admin_route_rules() {
        let ws = || WorkspaceTokens::from_bearers([("ws-a", SecretString::from("alpha"))]);
        let with_admin = Auth::new(Some(SecretString::from("root")), ws());
        assert_eq!(with_admin.authorize_admin(Some("root")), Ok(Caller::Admin));
        assert_eq!(
            with_admin.authorize_admin(Some("alpha")),
            Err(AuthError::InvalidBearer)
        );
        assert_eq!(
            with_admin.authorize_admin(None),
            Err(AuthError::MissingBearer)
        );
        let without_admin = Auth::new(Some(SecretString::from("")), ws());
        assert!(!without_admin.has_admin());
        assert_eq!(
            without_admin.authorize_admin(Some("alpha")),
            Ok(Caller::Workspace("ws-a".into()))
        );
        assert_eq!(
            without_admin.authorize_admin(Some("")),
            Err(AuthError::InvalidBearer)
        );
    }
}
