//! Repository and owner names: the one rule for what a GitHub `OWNER/NAME`
//! looks like, shared by the helper (git's `path`, `--repo`), the daemon
//! (requests, the platform's answer), `--fetch-once` and the platform (the
//! grants file, the token route's query, the App's installations).
//!
//! Why a rule of our own: the owner picks which token is used, so a name that
//! is not one GitHub could have (`..`, a slash, a space, a 10 KB string) must
//! be refused before it reaches a URL, a log line or a map key. And why one
//! rule: a name one side accepts and another refuses becomes an error the
//! refusing side cannot explain (an `acme_corp` the daemon asked for and the
//! platform answered 400). GitHub compares owners and repository names
//! without regard to ASCII case; so do we ([`same_name`]).
//!
//! What GitHub allows (its documentation on usernames, organisation names,
//! external authentication and repository names):
//!
//! - **Accounts** (user logins and organisation names): at most 39
//!   characters, ASCII letters, digits and `-`, not starting with `-`.
//!   New names may not end with `-` or hold `--`, but accounts made before
//!   that rule still do, so both are accepted.
//! - **Enterprise Managed Users**: a managed login is the normalised handle,
//!   `_`, and the enterprise's short code (`alice_acme`; the setup admin is
//!   `acme_admin`, or `2abvd19d_admin` with data residency), still at most 39
//!   characters in all. So one `_` is allowed, with letters, digits and `-`
//!   before it and only letters and digits after it.
//! - **Repositories**: 1-100 ASCII letters, digits, `.`, `-` and `_`, but not
//!   `.` or `..`; and never ending in `.git`, which GitHub removes from a
//!   new repository's name (so `acme/api.git` in a URL is always `acme/api`,
//!   and a name written without it reads back as itself).

use std::fmt;

/// Longest owner (user, organisation or managed user login, short code
/// included): GitHub's limit.
pub const MAX_OWNER_LEN: usize = 39;
/// Longest repository name (GitHub's limit).
pub const MAX_NAME_LEN: usize = 100;
/// Most repositories one installation token can be minted for (GitHub's
/// limit for `repositories` in `POST /app/installations/{id}/access_tokens`),
/// so also the most a grant may list per owner and a token's stated scope
/// may hold.
pub const MAX_REPOSITORIES_PER_TOKEN: usize = 500;
/// Longest `OWNER/NAME`.
pub const MAX_FULL_NAME_LEN: usize = MAX_OWNER_LEN + 1 + MAX_NAME_LEN;

/// A repository as `OWNER/NAME`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepositoryRef {
    owner: String,
    name: String,
}

/// Why a name was refused. Never quotes the name: the messages say what
/// GitHub allows, for every side to show the same words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not of the form `OWNER/NAME`.
    #[error("a repository is written OWNER/NAME, for example acme/api")]
    NotOwnerSlashName,
    /// The owner has characters or a length GitHub does not allow.
    #[error(
        "the owner is not a GitHub account name (at most {MAX_OWNER_LEN} letters, digits and '-', not starting with '-'; a managed user's login adds '_' and the enterprise's short code, as alice_acme)"
    )]
    BadOwner,
    /// The name has characters or a length GitHub does not allow.
    #[error(
        "the repository name is not one GitHub allows (1-{MAX_NAME_LEN} letters, digits, '.', '-' and '_', not . or .., not ending in .git)"
    )]
    BadName,
}

/// Whether `owner` could be a GitHub account: a user or organisation, or an
/// Enterprise Managed User's `handle_shortcode` login (see the module docs).
pub fn is_valid_owner(owner: &str) -> bool {
    let (handle, short_code) = match owner.split_once('_') {
        Some((handle, short_code)) => (handle, Some(short_code)),
        None => (owner, None),
    };
    owner.len() <= MAX_OWNER_LEN
        && !handle.is_empty()
        && !handle.starts_with('-')
        && handle
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && short_code
            .is_none_or(|code| !code.is_empty() && code.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Whether `name` could be a GitHub repository name.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name.ends_with(".git")
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
    fn owners_are_what_github_allows_managed_users_included() {
        let longest = "o".repeat(MAX_OWNER_LEN);
        for owner in [
            "acme",
            "a",
            "Acme-Labs",
            "0x1",
            "acme_corp",
            "alice_acme",
            "the-octocat_acme",
            "2abvd19d_admin",
            "legacy-",
            "legacy--name",
            longest.as_str(),
        ] {
            assert!(is_valid_owner(owner), "{owner:?} is a GitHub account");
        }
        let too_long = "o".repeat(MAX_OWNER_LEN + 1);
        let managed_too_long = format!("{}_acme", "h".repeat(MAX_OWNER_LEN - 4));
        for owner in [
            "",
            "-acme",
            "_acme",
            "acme_",
            "a_b_c",
            "alice_ac-me",
            "alice_ac.me",
            "-alice_acme",
            "ac me",
            "ac.me",
            "acme/api",
            "ac\u{e9}me",
            "acme\n",
            too_long.as_str(),
            managed_too_long.as_str(),
        ] {
            assert!(!is_valid_owner(owner), "{owner:?} is not a GitHub account");
        }
    }

    #[test]
    fn repository_names_are_what_github_allows() {
        let longest = "n".repeat(MAX_NAME_LEN);
        for name in [
            ".github",
            "api.v2_x",
            "-dash",
            "_x",
            "a..b",
            longest.as_str(),
        ] {
            assert!(is_valid_name(name), "{name:?}");
        }
        let too_long = "n".repeat(MAX_NAME_LEN + 1);
        // GitHub drops a `.git` from a new name, so none ends in one.
        for name in [
            "",
            ".",
            "..",
            "a b",
            "a/b",
            "caf\u{e9}",
            "api.git",
            ".git",
            too_long.as_str(),
        ] {
            assert!(!is_valid_name(name), "{name:?}");
        }
        let owner_and_name = format!("{}/{}", "o".repeat(MAX_OWNER_LEN), longest);
        assert_eq!(owner_and_name.len(), MAX_FULL_NAME_LEN);
        assert!(RepositoryRef::parse(&owner_and_name).is_ok());
    }

    #[test]
    fn a_managed_users_repository_parses_everywhere() {
        let repo = RepositoryRef::parse("acme_corp/api").expect("valid");
        assert_eq!(repo.owner(), "acme_corp");
        let from_git = RepositoryRef::from_git_path("/alice_acme/dotfiles.git").expect("valid");
        assert_eq!(from_git.to_string(), "alice_acme/dotfiles");
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
