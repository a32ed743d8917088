//! What one token is minted for — an owner, some of its repositories, some
//! permissions — and GitHub's rules for permission names and levels.
//!
//! Why apart from the grants file: providers, caches and the service mint
//! and key tokens by [`MintScope`] whether or not a grants file is in force;
//! the grants file is one way to build scopes, checked by these rules.

use std::collections::BTreeMap;

use serde::Serialize;

/// Most permissions one grant may name.
pub const MAX_PERMISSIONS: usize = 64;
/// Longest permission name accepted (GitHub's are all far shorter).
pub const MAX_PERMISSION_NAME_CHARS: usize = 64;

/// Whether `name` is a permission name as GitHub spells them
/// (`contents`, `pull_requests`): lowercase letters, digits and `_`.
pub fn valid_permission_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PERMISSION_NAME_CHARS
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The levels GitHub accepts for permission `name` (its `app-permissions`
/// schema), or `None` when GitHub has no such permission.
pub fn github_levels(name: &str) -> Option<&'static [&'static str]> {
    let table = crate::github_permissions::APP_PERMISSIONS;
    table
        .binary_search_by(|(known, _)| (*known).cmp(name))
        .ok()
        .map(|i| table[i].1)
}

/// The known permission most like `name` (one or two letters off, or one
/// is the other plus a suffix), for a hint.
pub(crate) fn closest_permission(name: &str) -> Option<&'static str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut previous = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let substitution = previous + usize::from(ca != *cb);
                previous = row[j + 1];
                row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
            }
        }
        row[b.len()]
    }
    crate::github_permissions::APP_PERMISSIONS
        .iter()
        .map(|(known, _)| (distance(name, known), *known))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, known)| known)
}

/// A permission level GitHub accepts when minting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// `read`.
    Read,
    /// `write`.
    Write,
    /// `admin`.
    Admin,
}

impl Level {
    /// GitHub's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// Permission name → level, as sent to GitHub.
pub type Permissions = BTreeMap<String, Level>;

/// What one token is minted for: an owner, optionally some of its
/// repositories, optionally some permissions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MintScope {
    /// The account, as the grant spells it.
    pub owner: String,
    /// Repository names without the owner, sorted and deduplicated
    /// (case-insensitively); `None`: every repository of the installation.
    pub repositories: Option<Vec<String>>,
    /// `None`: the installation's own permissions.
    pub permissions: Option<Permissions>,
}

impl MintScope {
    /// `OWNER/NAME` of each repository, when limited.
    pub fn full_names(&self) -> Option<Vec<String>> {
        self.repositories.as_ref().map(|names| {
            names
                .iter()
                .map(|name| format!("{}/{name}", self.owner))
                .collect()
        })
    }

    /// The permissions the scope names, as `name → level` text (`None`:
    /// the installation's own).
    pub fn permissions_text(&self) -> Option<BTreeMap<String, String>> {
        self.permissions.as_ref().map(|p| {
            p.iter()
                .map(|(name, level)| (name.clone(), level.as_str().to_owned()))
                .collect()
        })
    }

    /// The owner in the form used to compare and to key caches.
    pub fn owner_key(&self) -> String {
        self.owner.to_ascii_lowercase()
    }

    /// The repositories in the form used to compare and to key caches.
    pub fn repositories_key(&self) -> Option<Vec<String>> {
        self.repositories
            .as_ref()
            .map(|names| names.iter().map(|n| n.to_ascii_lowercase()).collect())
    }
}
