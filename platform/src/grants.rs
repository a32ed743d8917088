//! Which repositories, owners and permissions each workspace may have a
//! token for: the grants file.
//!
//! Why: one installation token covers a whole account and, by default,
//! every repository and permission of the installation. An agent holding an
//! organisation-wide write token is the largest risk this system carries, so
//! with a grants file (`PLATFORM_GRANTS_FILE`, TOML) every token is minted
//! down-scoped to what the workspace's entry lists, and a workspace with no
//! entry, or asking outside it, is refused — never given a broader token.
//!
//! ```toml
//! [workspace.ws-42]
//! repositories = ["acme/api", "acme/web", "acme-labs/*"]
//! permissions = { contents = "write", pull_requests = "write" }  # optional
//! ```
//!
//! The owners named in `repositories` are the accounts the workspace may
//! have tokens for, in file order (the first is the default). A token is one
//! per owner: asking for `acme/api` gets the token for every `acme`
//! repository of the grant (`acme/api` and `acme/web`), so workspaces with
//! the same grant share one token; `OWNER/*` means every repository of the
//! installation. Owners compare ASCII case-insensitively, as GitHub's do.
//!
//! The table is swapped whole on reload (SIGHUP): a request sees the old or
//! the new file, never half of one, and a broken file keeps the old table.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use credd_core::platform_api::Which;
use credd_core::repository::{NameError, is_valid_name, is_valid_owner};
use serde::Deserialize;
use toml::Spanned;

use crate::auth::valid_workspace_id;
use crate::scope::{
    Level, MAX_PERMISSIONS, MintScope, Permissions, closest_permission, github_levels,
    valid_permission_name,
};
use crate::table_file::{FileError, Table, TableFile};

/// Largest grants file accepted.
pub const MAX_GRANTS_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Most workspaces in a grants file.
pub const MAX_GRANT_WORKSPACES: usize = 100_000;
/// Most owners one workspace may be granted.
pub const MAX_OWNERS_PER_WORKSPACE: usize = 100;
/// Most repositories of one owner in one grant: GitHub mints a token for at
/// most 500 repositories.
pub const MAX_REPOSITORIES_PER_OWNER: usize = credd_core::repository::MAX_REPOSITORIES_PER_TOKEN;
/// Why a grant refuses a request (the text is safe to send to the caller:
/// it names only what the caller asked for).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The grants file has no entry for the workspace.
    #[error("workspace {0} has no entry in the grants file")]
    NoEntry(String),
    /// The owner is not among the workspace's.
    #[error("owner {0} is outside this workspace's grant")]
    OwnerNotGranted(String),
    /// The repository is not among the workspace's.
    #[error("repository {0} is outside this workspace's grant")]
    RepositoryNotGranted(String),
}

/// One workspace's grant: its owners in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WorkspaceGrant {
    owners: Vec<MintScope>,
}

impl WorkspaceGrant {
    fn resolve(&self, which: &Which) -> Result<MintScope, GrantError> {
        let find = |owner: &str| {
            self.owners
                .iter()
                .find(|scope| scope.owner.eq_ignore_ascii_case(owner))
        };
        match which {
            Which::Default => Ok(self.owners[0].clone()),
            Which::Owner(owner) => find(owner)
                .cloned()
                .ok_or_else(|| GrantError::OwnerNotGranted(owner.clone())),
            Which::Repository(repository) => {
                let name = repository.name();
                let refused = || GrantError::RepositoryNotGranted(repository.to_string());
                let scope = find(repository.owner()).ok_or_else(refused)?;
                match &scope.repositories {
                    None => Ok(scope.clone()),
                    Some(names) if names.iter().any(|n| n.eq_ignore_ascii_case(name)) => {
                        Ok(scope.clone())
                    }
                    Some(_) => Err(refused()),
                }
            }
        }
    }
}

/// A grants file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GrantsFileError {
    /// The file could not be read, or is too large.
    #[error(transparent)]
    File(#[from] FileError),
    /// Something in the file is wrong.
    #[error("{origin}:{line}: {reason}")]
    Invalid {
        /// The file (or `<inline>`).
        origin: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    workspace: BTreeMap<String, Spanned<EntryDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryDoc {
    repositories: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    permissions: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
}

/// The parsed grants: workspace ID → grant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrantTable {
    workspaces: HashMap<String, WorkspaceGrant>,
}

/// `"a", "b" or "c"`.
fn quoted_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The grants file being read: its text, and its name for messages.
struct Source<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Source<'_> {
    /// The error at byte `offset`, named by its line.
    fn invalid(&self, offset: usize, reason: String) -> GrantsFileError {
        let end = offset.min(self.text.len());
        let line = self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        GrantsFileError::Invalid {
            origin: self.origin.to_owned(),
            line,
            reason,
        }
    }
}

impl GrantTable {
    /// Parses the TOML format (see the module docs); errors name the line.
    pub fn parse(text: &str, origin: &str) -> Result<Self, GrantsFileError> {
        let source = Source { text, origin };
        let doc: FileDoc = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            source.invalid(offset, e.message().trim().replace('\n', " "))
        })?;
        if doc.workspace.len() > MAX_GRANT_WORKSPACES {
            return Err(source.invalid(0, format!("more than {MAX_GRANT_WORKSPACES} workspaces")));
        }
        let mut workspaces = HashMap::with_capacity(doc.workspace.len());
        for (id, entry) in doc.workspace {
            let entry_at = entry.span().start;
            let entry = entry.into_inner();
            if !valid_workspace_id(&id) {
                return Err(source.invalid(
                    entry_at,
                    format!(
                        "workspace ID {id:?} is not 1-{} characters of letters, digits, '.', '_' or '-' (not starting with '.')",
                        crate::auth::MAX_WORKSPACE_ID_CHARS
                    ),
                ));
            }
            let permissions = match entry.permissions {
                None => None,
                Some(spanned) => Some(parse_permissions(&source, &id, spanned)?),
            };
            let owners =
                parse_repositories(&source, &id, entry.repositories, permissions.as_ref())?;
            workspaces.insert(id, WorkspaceGrant { owners });
        }
        Ok(Self { workspaces })
    }

    /// Number of workspaces listed.
    pub fn len(&self) -> usize {
        self.workspaces.len()
    }

    /// Whether no workspace is listed.
    pub fn is_empty(&self) -> bool {
        self.workspaces.is_empty()
    }

    /// The scope `workspace` gets for `which`, or why it gets nothing.
    pub fn resolve(&self, workspace: &str, which: &Which) -> Result<MintScope, GrantError> {
        self.workspaces
            .get(workspace)
            .ok_or_else(|| GrantError::NoEntry(workspace.to_owned()))?
            .resolve(which)
    }

    /// Every scope `workspace` may have a token for (none without an entry).
    pub fn scopes(&self, workspace: &str) -> Vec<MintScope> {
        self.workspaces
            .get(workspace)
            .map(|grant| grant.owners.clone())
            .unwrap_or_default()
    }
}

/// A workspace's `permissions` table: each a GitHub App permission at a
/// level GitHub allows for it (checked against GitHub's own table, so no
/// grant GitHub would refuse is ever sent).
fn parse_permissions(
    source: &Source<'_>,
    id: &str,
    spanned: Spanned<BTreeMap<String, Spanned<String>>>,
) -> Result<Permissions, GrantsFileError> {
    let at = spanned.span().start;
    let map = spanned.into_inner();
    if map.is_empty() {
        return Err(source.invalid(
            at,
            format!(
                "workspace {id}: permissions is empty: name at least one, or leave it out for the installation's own"
            ),
        ));
    }
    if map.len() > MAX_PERMISSIONS {
        return Err(source.invalid(
            at,
            format!("workspace {id}: more than {MAX_PERMISSIONS} permissions"),
        ));
    }
    let mut permissions = Permissions::new();
    for (name, level) in map {
        if !valid_permission_name(&name) {
            return Err(source.invalid(
                level.span().start,
                format!(
                    "workspace {id}: permission {name:?} is not a GitHub permission name (lowercase letters, digits and '_', such as contents or pull_requests)"
                ),
            ));
        }
        let Some(levels) = github_levels(&name) else {
            let hint = closest_permission(&name)
                .map(|known| format!(" (did you mean {known}?)"))
                .unwrap_or_default();
            return Err(source.invalid(
                level.span().start,
                format!(
                    "workspace {id}: permission {name:?} is not one of GitHub's App permissions{hint}; GitHub would refuse every token of this grant ({})",
                    crate::github_permissions::SOURCE
                ),
            ));
        };
        let parsed = Level::parse(level.get_ref()).filter(|l| levels.contains(&l.as_str()));
        let Some(parsed) = parsed else {
            return Err(source.invalid(
                level.span().start,
                format!(
                    "workspace {id}: permission {name} is {:?}, but GitHub allows only {} for it ({})",
                    level.get_ref(),
                    quoted_list(levels),
                    crate::github_permissions::SOURCE
                ),
            ));
        };
        permissions.insert(name, parsed);
    }
    Ok(permissions)
}

/// The index of `owner`'s scope in `owners` (case-insensitive), added
/// with every repository unset and `permissions` when it is new; refused
/// past [`MAX_OWNERS_PER_WORKSPACE`].
fn owner_slot(
    owners: &mut Vec<(MintScope, bool)>,
    owner: &str,
    permissions: Option<&Permissions>,
) -> Result<usize, String> {
    if let Some(index) = owners
        .iter()
        .position(|(s, _)| s.owner.eq_ignore_ascii_case(owner))
    {
        return Ok(index);
    }
    if owners.len() >= MAX_OWNERS_PER_WORKSPACE {
        return Err(format!(
            "more than {MAX_OWNERS_PER_WORKSPACE} owners in one workspace"
        ));
    }
    owners.push((
        MintScope {
            owner: owner.to_owned(),
            repositories: Some(Vec::new()),
            permissions: permissions.cloned(),
        },
        false,
    ));
    Ok(owners.len() - 1)
}

/// A workspace's `repositories` list, grouped by owner (case-insensitive):
/// `OWNER/*` grants every repository of the owner, else its names, sorted
/// and de-duplicated, within GitHub's limit for one token.
fn parse_repositories(
    source: &Source<'_>,
    id: &str,
    repositories: Spanned<Vec<Spanned<String>>>,
    permissions: Option<&Permissions>,
) -> Result<Vec<MintScope>, GrantsFileError> {
    let repositories_at = repositories.span().start;
    let repositories = repositories.into_inner();
    if repositories.is_empty() {
        return Err(source.invalid(
            repositories_at,
            format!(
                "workspace {id}: repositories is empty: list OWNER/NAME or OWNER/* entries, or remove the workspace"
            ),
        ));
    }
    // owner key → (scope, every repository?)
    let mut owners: Vec<(MintScope, bool)> = Vec::new();
    for repository in repositories {
        let at = repository.span().start;
        let text = repository.into_inner();
        let bad =
            |why: String| source.invalid(at, format!("workspace {id}: repository {text:?}: {why}"));
        let (owner, name) = text
            .split_once('/')
            .ok_or_else(|| bad("expected OWNER/NAME or OWNER/*".into()))?;
        if !is_valid_owner(owner) {
            return Err(bad(NameError::BadOwner.to_string()));
        }
        if name != "*" && !is_valid_name(name) {
            return Err(bad(format!("{} (or * for all)", NameError::BadName)));
        }
        let index = owner_slot(&mut owners, owner, permissions).map_err(&bad)?;
        let (scope, all) = &mut owners[index];
        if name == "*" {
            *all = true;
            continue;
        }
        let names = scope.repositories.get_or_insert_with(Vec::new);
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            if names.len() >= MAX_REPOSITORIES_PER_OWNER {
                return Err(bad(format!(
                    "more than {MAX_REPOSITORIES_PER_OWNER} repositories of {owner} (GitHub's limit for one token): use {owner}/* instead"
                )));
            }
            names.push(name.to_owned());
        }
    }
    Ok(owners
        .into_iter()
        .map(|(mut scope, all)| {
            if all {
                scope.repositories = None;
            } else if let Some(names) = &mut scope.repositories {
                names.sort_by_key(|n| n.to_ascii_lowercase());
            }
            scope
        })
        .collect())
}

/// The grants in force: none (no grants file: every workspace gets the
/// configured installation's token, unscoped) or a table, reloadable from
/// its file ([`TableFile`]).
pub struct Grants {
    file: TableFile<Option<Arc<GrantTable>>>,
}

/// A grants file's text is a table; "no grants" is `None` (never read from
/// a file, only [`Grants::none`] or [`Grants::replace`]).
impl Table for Option<Arc<GrantTable>> {
    const FILE: &'static str = "grants file";
    const MAX_FILE_BYTES: u64 = MAX_GRANTS_FILE_BYTES;
    type Error = GrantsFileError;

    fn parse(text: &str, origin: &str) -> Result<Self, GrantsFileError> {
        Ok(Some(Arc::new(GrantTable::parse(text, origin)?)))
    }

    fn entries(&self) -> usize {
        self.as_ref().map_or(0, |t| t.len())
    }
}

impl fmt::Debug for Grants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grants")
            .field("source", &self.source())
            .field("workspaces", &self.current().map(|t| t.len()))
            .finish()
    }
}

impl Default for Grants {
    fn default() -> Self {
        Self::none()
    }
}

impl Grants {
    /// No grants file.
    pub fn none() -> Self {
        Self {
            file: TableFile::fixed(None),
        }
    }

    /// Grants from TOML text (not reloadable from a file; see
    /// [`Grants::replace`]).
    pub fn parse(text: &str) -> Result<Self, GrantsFileError> {
        Ok(Self {
            file: TableFile::fixed(Table::parse(text, "<inline>")?),
        })
    }

    /// Loads `path`; [`Grants::reload`] re-reads it.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, GrantsFileError> {
        Ok(Self {
            file: TableFile::load(path)?,
        })
    }

    /// Re-reads the file and swaps the table in whole; on error the old
    /// table stays. Returns the number of workspaces now loaded (without a
    /// file: the current count, unchanged).
    pub fn reload(&self) -> Result<usize, GrantsFileError> {
        self.file.reload()
    }

    /// Swaps in the table parsed from `text` (`None`: no grants at all); on
    /// error the old table stays. For embedding and tests.
    pub fn replace(&self, text: Option<&str>) -> Result<usize, GrantsFileError> {
        let table = match text {
            Some(text) => Table::parse(text, "<inline>")?,
            None => None,
        };
        Ok(self.file.install(table))
    }

    /// The file the grants come from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.file.source()
    }

    /// The table in force (`None`: no grants file).
    pub fn current(&self) -> Option<Arc<GrantTable>> {
        self.file.current().as_ref().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
# the example of the README
[workspace.ws-42]
repositories = ["acme/web", "acme/api", "acme-labs/*", "ACME/Api"]
permissions = { contents = "write", pull_requests = "write" }

[workspace.ws-7]
repositories = ["solo/*"]
"#;

    fn table() -> GrantTable {
        GrantTable::parse(EXAMPLE, "<t>").unwrap()
    }

    #[test]
    fn owners_in_file_order_repositories_sorted_and_deduplicated() {
        let t = table();
        let scopes = t.scopes("ws-42");
        assert_eq!(scopes.len(), 2);
        assert_eq!(scopes[0].owner, "acme");
        assert_eq!(
            scopes[0].repositories,
            Some(vec!["api".to_owned(), "web".to_owned()])
        );
        assert_eq!(
            scopes[0].full_names(),
            Some(vec!["acme/api".to_owned(), "acme/web".to_owned()])
        );
        let permissions = scopes[0].permissions.clone().unwrap();
        assert_eq!(permissions.get("contents"), Some(&Level::Write));
        assert_eq!(scopes[1].owner, "acme-labs");
        assert_eq!(scopes[1].repositories, None);
        assert_eq!(t.scopes("ws-7")[0].permissions, None);
        assert!(t.scopes("ws-none").is_empty());
    }

    #[test]
    fn resolve_per_owner() {
        let t = table();
        let acme = t.resolve("ws-42", &Which::Default).unwrap();
        assert_eq!(acme.owner, "acme");
        assert_eq!(
            t.resolve("ws-42", &Which::repository("ACME/web.git").unwrap()),
            Ok(acme.clone())
        );
        assert_eq!(t.resolve("ws-42", &Which::owner("Acme").unwrap()), Ok(acme));
        let labs = t
            .resolve("ws-42", &Which::repository("acme-labs/anything").unwrap())
            .unwrap();
        assert_eq!(labs.repositories, None);
        assert_eq!(
            t.resolve("ws-42", &Which::repository("acme/secret").unwrap()),
            Err(GrantError::RepositoryNotGranted("acme/secret".into()))
        );
        assert_eq!(
            t.resolve("ws-42", &Which::owner("evil").unwrap()),
            Err(GrantError::OwnerNotGranted("evil".into()))
        );
        assert_eq!(
            t.resolve("ws-9", &Which::Default),
            Err(GrantError::NoEntry("ws-9".into()))
        );
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "[workspace.ws-1]\nrepositories = [\"acme\"]\n",
                2,
                "OWNER/NAME",
            ),
            (
                "[workspace.ws-1]\nrepository = [\"a/b\"]\n",
                2,
                "unknown field",
            ),
            ("[workspace.ws-1]\nrepositories = []\n", 2, "empty"),
            (
                "[workspace.ws-1]\nrepositories = [\"a/b\"]\n\npermissions = { contents = \"all\" }\n",
                4,
                "permission contents is \"all\", but GitHub allows only \"read\" or \"write\" for it (@octokit/openapi",
            ),
            (
                "[workspace.ws-1]\nrepositories = [\"a/b\"]\npermissions = { Contents = \"read\" }\n",
                3,
                "not a GitHub permission name",
            ),
            (
                "[workspace.ws-1]\nrepositories = [\"a/b\"]\npermissions = {}\n",
                3,
                "empty",
            ),
            ("[other]\n", 1, "unknown field"),
            ("[workspace.ws-1\n", 1, ""),
            (
                "[workspace.\".bad\"]\nrepositories = [\"a/b\"]\n",
                1,
                "workspace ID",
            ),
            (
                "[workspace.ws-1]\nrepositories = [\n\"a/b\",\n\"a/b c\"]\n",
                4,
                "repository name",
            ),
        ];
        for (text, line, needle) in cases {
            let err = GrantTable::parse(text, "<t>").unwrap_err().to_string();
            assert!(err.starts_with(&format!("<t>:{line}: ")), "{text:?}: {err}");
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn grants_github_would_refuse_are_refused_at_load_with_their_line() {
        let grant = |permissions: &str| {
            format!(
                "[workspace.ws-1]\nrepositories = [\"a/b\"]\n\n\npermissions = {{ {permissions} }}\n"
            )
        };
        for (permissions, says) in [
            (
                "workflows = \"read\"",
                "permission workflows is \"read\", but GitHub allows only \"write\" for it",
            ),
            (
                "contents = \"admin\"",
                "permission contents is \"admin\", but GitHub allows only \"read\" or \"write\" for it",
            ),
            (
                "organization_plan = \"write\"",
                "GitHub allows only \"read\" for it",
            ),
            (
                "pull_request = \"write\"",
                "permission \"pull_request\" is not one of GitHub's App permissions (did you mean pull_requests?)",
            ),
            (
                "everything = \"read\"",
                "permission \"everything\" is not one of GitHub's App permissions; GitHub would refuse",
            ),
        ] {
            let err = GrantTable::parse(&grant(permissions), "grants.toml")
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("grants.toml:5: workspace ws-1: "), "{err}");
            assert!(err.contains(says), "{permissions}: {err}");
        }
        // What GitHub allows loads, admin included where it exists.
        let ok = GrantTable::parse(
            &grant("workflows = \"write\", repository_projects = \"admin\", metadata = \"read\""),
            "grants.toml",
        )
        .expect("GitHub allows these");
        let permissions = ok.scopes("ws-1")[0].permissions.clone().unwrap();
        assert_eq!(permissions["repository_projects"], Level::Admin);
    }

    #[test]
    fn the_permission_table_is_githubs() {
        let table = crate::github_permissions::APP_PERMISSIONS;
        assert!(
            table.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted for lookup"
        );
        assert_eq!(github_levels("workflows"), Some(&["write"][..]));
        assert_eq!(github_levels("pull_requests"), Some(&["read", "write"][..]));
        assert_eq!(github_levels("pull_request"), None);
        for (name, levels) in table {
            assert!(valid_permission_name(name), "{name}");
            assert!(levels.iter().all(|l| Level::parse(l).is_some()), "{name}");
        }
    }

    #[test]
    fn caps_hold() {
        let many: Vec<String> = (0..=MAX_REPOSITORIES_PER_OWNER)
            .map(|i| format!("\"acme/r{i}\""))
            .collect();
        let text = format!("[workspace.ws-1]\nrepositories = [{}]\n", many.join(","));
        let err = GrantTable::parse(&text, "<t>").unwrap_err().to_string();
        assert!(err.contains("more than 500 repositories"), "{err}");
        let owners: Vec<String> = (0..=MAX_OWNERS_PER_WORKSPACE)
            .map(|i| format!("\"o{i}/*\""))
            .collect();
        let text = format!("[workspace.ws-1]\nrepositories = [{}]\n", owners.join(","));
        let err = GrantTable::parse(&text, "<t>").unwrap_err().to_string();
        assert!(err.contains("owners"), "{err}");
    }

    #[test]
    fn reload_swaps_and_keeps_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.toml");
        std::fs::write(&path, "[workspace.ws-1]\nrepositories = [\"a/*\"]\n").unwrap();
        let grants = Grants::load(&path).unwrap();
        let owner = |g: &Grants| {
            g.current()
                .unwrap()
                .resolve("ws-1", &Which::Default)
                .map(|s| s.owner)
        };
        assert_eq!(owner(&grants).unwrap(), "a");
        std::fs::write(&path, "[workspace.ws-1]\nrepositories = [\"b/*\"]\n").unwrap();
        assert_eq!(grants.reload().unwrap(), 1);
        assert_eq!(owner(&grants).unwrap(), "b");
        std::fs::write(&path, "[workspace.ws-1]\nrepositories = 5\n").unwrap();
        let err = grants.reload().unwrap_err();
        assert!(err.to_string().contains(":2: "), "{err}");
        assert_eq!(owner(&grants).unwrap(), "b", "old table kept");
        assert!(Grants::none().current().is_none());
    }
}
