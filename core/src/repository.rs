//! Repository and owner names: the one rule for what a GitHub `OWNER/NAME`
//! looks like, shared by the helper (git's `path`, `--repo`), the daemon
//! (requests, the platform's answer) and `--fetch-once`.
//!
//! Why a rule of our own: the owner picks which token is used, so a name that
//! is not one GitHub could have (`..`, a slash, a space, a 10 KB string) must
//! be refused before it reaches a URL, a log line or a map key. GitHub
//! compares owners and repository names without regard to ASCII case; so do
//! we ([`same_name`]).

use std::fmt;

/// Longest owner accepted. GitHub logins are at most 39 characters; managed
/// enterprise users append `_shortcode`, so leave room.
pub const MAX_OWNER_LEN: usize = 100;
/// Longest repository name accepted (GitHub's limit).
pub const MAX_NAME_LEN: usize = 100;

/// A repository as `OWNER/NAME`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepositoryRef {
    owner: String,
    name: String,
}

/// Why a name was refused. Never quotes more than a bounded prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not of the form `OWNER/NAME`.
    #[error("a repository is written OWNER/NAME, for example acme/api")]
    NotOwnerSlashName,
    /// The owner has characters or a length GitHub does not allow.
    #[error(
        "the owner is not a GitHub account name (letters, digits, '-' and '_', at most {MAX_OWNER_LEN})"
    )]
    BadOwner,
    /// The name has characters or a length GitHub does not allow.
    #[error(
        "the repository name is not one GitHub allows (letters, digits, '.', '-' and '_', at most {MAX_NAME_LEN})"
    )]
    BadName,
}

/// Whether `owner` could be a GitHub account (user or organisation) name.
pub fn is_valid_owner(owner: &str) -> bool {
    !owner.is_empty()
        && owner.len() <= MAX_OWNER_LEN
        && !owner.starts_with('-')
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `name` could be a GitHub repository name.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Owner and repository names compare without regard to ASCII case, as on GitHub.
pub fn same_name(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

impl RepositoryRef {
    /// Parses `OWNER/NAME` exactly (no `.git`, no further segments).
    pub fn parse(text: &str) -> Result<Self, NameError> {
        let (owner, name) = text.split_once('/').ok_or(NameError::NotOwnerSlashName)?;
        Self::from_parts(owner, name)
    }

    /// The repository a git `path` names: `acme/api.git`, `acme/api`,
    /// `acme/api.git/info/lfs`, with or without a leading or trailing slash.
    /// `None` when the path does not start with `OWNER/NAME`.
    pub fn from_git_path(path: &str) -> Option<Self> {
        let mut segments = path.trim_start_matches('/').split('/');
        let owner = segments.next()?;
        let name = segments.next()?;
        let name = name.strip_suffix(".git").unwrap_or(name);
        Self::from_parts(owner, name).ok()
    }

    fn from_parts(owner: &str, name: &str) -> Result<Self, NameError> {
        if !is_valid_owner(owner) {
            return Err(NameError::BadOwner);
        }
        if name.contains('/') {
            return Err(NameError::NotOwnerSlashName);
        }
        if !is_valid_name(name) {
            return Err(NameError::BadName);
        }
        Ok(Self {
            owner: owner.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The owner (account) part.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The name part.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `full` (`OWNER/NAME`) names this repository.
    pub fn is(&self, full: &str) -> bool {
        full.split_once('/')
            .is_some_and(|(o, n)| same_name(o, &self.owner) && same_name(n, &self.name))
    }
}

impl fmt::Display for RepositoryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owner_slash_name_and_refuses_the_rest() {
        let repo = RepositoryRef::parse("acme-labs/api.v2_x").expect("valid");
        assert_eq!((repo.owner(), repo.name()), ("acme-labs", "api.v2_x"));
        assert_eq!(repo.to_string(), "acme-labs/api.v2_x");
        for (text, error) in [
            ("acme", NameError::NotOwnerSlashName),
            ("/api", NameError::BadOwner),
            ("-acme/api", NameError::BadOwner),
            ("ac me/api", NameError::BadOwner),
            ("acme/", NameError::BadName),
            ("acme/..", NameError::BadName),
            ("acme/a b", NameError::BadName),
            ("acme/api/x", NameError::NotOwnerSlashName),
            ("acme/api.git\n", NameError::BadName),
        ] {
            assert_eq!(RepositoryRef::parse(text), Err(error), "{text:?}");
        }
        let long = format!("acme/{}", "n".repeat(MAX_NAME_LEN + 1));
        assert_eq!(RepositoryRef::parse(&long), Err(NameError::BadName));
        let long = format!("{}/api", "o".repeat(MAX_OWNER_LEN + 1));
        assert_eq!(RepositoryRef::parse(&long), Err(NameError::BadOwner));
    }

    #[test]
    fn reads_the_paths_git_sends() {
        for path in [
            "acme/api.git",
            "acme/api",
            "/acme/api.git/",
            "acme/api.git/info/lfs",
            "acme/api/",
        ] {
            let repo = RepositoryRef::from_git_path(path).expect(path);
            assert_eq!(repo.to_string(), "acme/api", "{path}");
        }
        for path in ["", "acme", "acme/", "../etc/passwd", "acme/.git"] {
            assert_eq!(RepositoryRef::from_git_path(path), None, "{path:?}");
        }
    }

    #[test]
    fn names_compare_without_ascii_case() {
        let repo = RepositoryRef::parse("Acme/API").expect("valid");
        assert!(repo.is("acme/api"));
        assert!(!repo.is("acme/api2"));
        assert!(!repo.is("acme"));
        assert!(same_name("ACME", "acme"));
    }
}
