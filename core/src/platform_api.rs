//! The platform's HTTP API: the one contract `molecule-platform` serves and
//! the daemon's platform client (and `molecule-credd --fetch-once`) calls.
//!
//! Why here, beside [`crate::protocol`]: the two sides are different
//! processes, usually different releases, and until both compiled against
//! one definition each had its own route strings, its own "which token"
//! type and its own idea of what a status meant. Everything a request or an
//! answer of this API carries is defined once below, and each side only
//! turns it into or out of its HTTP library's types:
//!
//! - the routes ([`TOKEN_ROUTE`], [`REFUSALS_ROUTE`], [`ADMIN_TOKEN_ROUTE`]);
//! - which token is asked for ([`Which`]) and the token route's query
//!   ([`TokenQuery`]: written by [`TokenQuery::pairs`], read by
//!   [`TokenQuery::parse`], the one rule for it);
//! - the bodies: [`TokenAnswer`] (checked once by [`TokenAnswer::check`]),
//!   [`RefusalReport`] and [`ErrorAnswer`];
//! - what each status means ([`Status`]): the platform answers with
//!   [`Status::code`], the daemon reads with [`Status::of`].
//!
//! A token route request, for example:
//!
//! ```text
//! GET /workspaces/ws-42/github-installation-token?repository=acme/api&min_remaining_secs=600
//! Authorization: Bearer …
//!
//! 200 {"token":"ghs_…","expires_at":"2026-12-03T22:00:00Z","owner":"acme",
//!      "repositories":["acme/api"],"permissions":{"contents":"write"}}
//! 403 {"error":"repository acme/secret is outside this workspace's grant"}
//! 503 {"error":"…"} with Retry-After: 90
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::{MAX_PERMISSION_TEXT, MAX_SCOPE_PERMISSIONS, Scope};
use crate::repository::{MAX_REPOSITORIES_PER_TOKEN, NameError, RepositoryRef, is_valid_owner};
use crate::secret::{Token, TokenError};

/// `GET`: a workspace's token ([`TokenQuery`] says which); `{id}` is the
/// workspace id.
pub const TOKEN_ROUTE: &str = "/workspaces/{id}/github-installation-token";
/// `POST` a [`RefusalReport`]: git was refused with a token the platform
/// handed out.
pub const REFUSALS_ROUTE: &str = "/workspaces/{id}/github-installation-token/refusals";
/// The segment [`REFUSALS_ROUTE`] adds to [`TOKEN_ROUTE`].
pub const REFUSALS_SEGMENT: &str = "refusals";
/// `GET`: the configured installation's token, for callers without a
/// workspace id (the seed's contract).
pub const ADMIN_TOKEN_ROUTE: &str = "/admin/github-installation-token";

/// [`TOKEN_ROUTE`] for one workspace.
pub fn token_path(workspace_id: &str) -> String {
    TOKEN_ROUTE.replace("{id}", workspace_id)
}

/// The query parameter naming a repository (`OWNER/NAME`).
pub const REPOSITORY_PARAMETER: &str = "repository";
/// The query parameter naming an account.
pub const OWNER_PARAMETER: &str = "owner";
/// The query parameter with the least life (whole seconds) a cached token
/// must have for the platform to hand it out rather than mint a new one.
pub const MIN_REMAINING_PARAMETER: &str = "min_remaining_secs";
/// Most digits [`MIN_REMAINING_PARAMETER`] may have.
const MAX_SECONDS_DIGITS: usize = 10;

/// Which token a request is for: the one shape "a token for `acme/api`"
/// has between the daemon and the platform (git's text and the socket's
/// wire are the other two).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Which {
    /// The workspace's default: its first granted owner (or, without a
    /// grants file, the configured installation).
    #[default]
    Default,
    /// An account's token. Built by [`Which::owner`], which holds the name
    /// rule.
    Owner(String),
    /// A token that reaches this repository.
    Repository(RepositoryRef),
}

impl Which {
    /// An account, checked by the one owner rule.
    pub fn owner(text: &str) -> Result<Self, NameError> {
        if is_valid_owner(text) {
            Ok(Self::Owner(text.to_owned()))
        } else {
            Err(NameError::BadOwner)
        }
    }

    /// A repository, `OWNER/NAME`; a trailing `.git`, as git's `path` has
    /// it, is dropped.
    pub fn repository(text: &str) -> Result<Self, NameError> {
        let text = text.strip_suffix(".git").unwrap_or(text);
        RepositoryRef::parse(text).map(Self::Repository)
    }
}

impl fmt::Display for Which {
    /// Words for errors: `its default account`, `owner acme`, `acme/api`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("its default account"),
            Self::Owner(owner) => write!(f, "owner {owner}"),
            Self::Repository(repository) => write!(f, "{repository}"),
        }
    }
}

/// The token route's query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenQuery {
    /// Which token.
    pub which: Which,
    /// The least life a cached token must have ([`MIN_REMAINING_PARAMETER`]);
    /// `None`: any life.
    pub min_remaining: Option<Duration>,
}

/// Why a query was refused (the 400's text; it quotes nothing it was sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Both `repository` and `owner`, or one twice.
    #[error("give one of repository and owner, once")]
    WhichTwice,
    /// A name no GitHub account or repository could have.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `min_remaining_secs` twice.
    #[error("min_remaining_secs given twice")]
    MinRemainingTwice,
    /// `min_remaining_secs` not a whole number of seconds.
    #[error("min_remaining_secs must be a whole number of seconds")]
    MinRemainingNotSeconds,
    /// A parameter this API does not have.
    #[error("unknown query parameter (known: repository, owner, min_remaining_secs)")]
    Unknown,
}

impl TokenQuery {
    /// The query for `which`, any life.
    pub fn for_which(which: Which) -> Self {
        Self {
            which,
            min_remaining: None,
        }
    }

    /// The query's name-value pairs, in order, to be URL-encoded by the
    /// caller's HTTP library; none for the default token at any life.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::with_capacity(2);
        match &self.which {
            Which::Default => {}
            Which::Owner(owner) => pairs.push((OWNER_PARAMETER, owner.clone())),
            Which::Repository(repository) => {
                pairs.push((REPOSITORY_PARAMETER, repository.to_string()));
            }
        }
        if let Some(min) = self.min_remaining {
            pairs.push((MIN_REMAINING_PARAMETER, min.as_secs().to_string()));
        }
        pairs
    }

    /// Reads a query from its URL-decoded pairs: the one rule for it.
    pub fn parse<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, QueryError> {
        let mut query = Self::default();
        let mut which_given = false;
        for (name, value) in pairs {
            match name {
                REPOSITORY_PARAMETER | OWNER_PARAMETER => {
                    if which_given {
                        return Err(QueryError::WhichTwice);
                    }
                    which_given = true;
                    query.which = if name == REPOSITORY_PARAMETER {
                        Which::repository(value)?
                    } else {
                        Which::owner(value)?
                    };
                }
                MIN_REMAINING_PARAMETER => {
                    if query.min_remaining.is_some() {
                        return Err(QueryError::MinRemainingTwice);
                    }
                    let secs: u64 = value
                        .parse()
                        .ok()
                        .filter(|_| value.len() <= MAX_SECONDS_DIGITS)
                        .ok_or(QueryError::MinRemainingNotSeconds)?;
                    query.min_remaining = Some(Duration::from_secs(secs));
                }
                _ => return Err(QueryError::Unknown),
            }
        }
        Ok(query)
    }
}

/// The token route's `200` body. Borrowing, so the platform writes it
/// without copying the token; the daemon reads it and calls
/// [`TokenAnswer::check`]. Not `Debug`: it holds the token in clear, and a
/// `{:?}` in a log line must not compile (the checked [`Token`] redacts).
#[derive(Serialize, Deserialize)]
pub struct TokenAnswer<'a> {
    /// The installation token.
    #[serde(borrow)]
    pub token: Cow<'a, str>,
    /// Expiry, RFC 3339 in UTC with a `Z`, whole seconds.
    #[serde(borrow)]
    pub expires_at: Cow<'a, str>,
    /// The account whose installation issued it.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub owner: Option<Cow<'a, str>>,
    /// The repositories (`OWNER/NAME`) it is limited to; absent: all of
    /// the installation's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repositories: Option<Cow<'a, [String]>>,
    /// Its permissions (`contents` → `write`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Cow<'a, BTreeMap<String, String>>>,
}

/// A [`TokenAnswer`] that passed [`TokenAnswer::check`].
#[derive(Debug)]
pub struct CheckedAnswer {
    /// The token.
    pub token: Token,
    /// Expiry as stated (the caller parses time).
    pub expires_at: String,
    /// What the token may reach, as stated.
    pub scope: Scope,
}

/// Why an answer body cannot be trusted; never quotes the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// `owner` breaks the owner rule.
    #[error("\"owner\" is not a GitHub account name")]
    Owner,
    /// More repositories than a token can have.
    #[error("\"repositories\" lists more than {MAX_REPOSITORIES_PER_TOKEN}")]
    TooManyRepositories,
    /// A repository that is not `OWNER/NAME`.
    #[error("\"repositories\"[{0}] is not OWNER/NAME")]
    Repository(usize),
    /// Permissions that are not short lower-case words.
    #[error("\"permissions\" must map at most {MAX_SCOPE_PERMISSIONS} lower-case names to levels")]
    Permissions,
    /// The token itself.
    #[error("\"token\": {0}")]
    Token(#[from] TokenError),
}

impl TokenAnswer<'_> {
    /// The stated scope and the token, each by its one rule: a scope that
    /// cannot be trusted is a malformed answer, not an unscoped token.
    pub fn check(self) -> Result<CheckedAnswer, AnswerError> {
        if let Some(owner) = &self.owner
            && !is_valid_owner(owner)
        {
            return Err(AnswerError::Owner);
        }
        if let Some(list) = &self.repositories {
            if list.len() > MAX_REPOSITORIES_PER_TOKEN {
                return Err(AnswerError::TooManyRepositories);
            }
            if let Some(bad) = list.iter().position(|r| RepositoryRef::parse(r).is_err()) {
                return Err(AnswerError::Repository(bad));
            }
        }
        if let Some(permissions) = &self.permissions {
            let word = |s: &str| {
                !s.is_empty()
                    && s.len() <= MAX_PERMISSION_TEXT
                    && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            };
            if permissions.len() > MAX_SCOPE_PERMISSIONS
                || !permissions
                    .iter()
                    .all(|(name, level)| word(name) && word(level))
            {
                return Err(AnswerError::Permissions);
            }
        }
        Ok(CheckedAnswer {
            token: Token::new(self.token.into_owned())?,
            expires_at: self.expires_at.into_owned(),
            scope: Scope {
                owner: self.owner.map(Cow::into_owned),
                repositories: self.repositories.map(Cow::into_owned),
                permissions: self.permissions.map(Cow::into_owned),
            },
        })
    }
}

/// The [`REFUSALS_ROUTE`] body: the refused token by its SHA-256
/// (lower-case hex), never the token.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefusalReport<'a> {
    /// [`crate::secret::fingerprint`] of the token, in full.
    #[serde(borrow)]
    pub sha256: Cow<'a, str>,
}

/// Every error answer's body: one line for a person, safe to show (it
/// names only what the caller asked for, or GitHub's short reason).
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorAnswer<'a> {
    /// The reason.
    #[serde(borrow)]
    pub error: Cow<'a, str>,
}

/// What a status of the token route means: the platform answers each
/// failure with [`Status::code`], the daemon reads any status with
/// [`Status::of`]. One table, both directions (`Status::of(s.code()) == s`).
///
/// | status | meaning | the daemon |
/// | --- | --- | --- |
/// | 200 | a token ([`TokenAnswer`]) | serves it |
/// | 400 | the request itself is refused (its query) | `not_granted` |
/// | 401 | the bearer is missing or wrong | re-reads its bearer file |
/// | 403 | not granted: outside the grant, or GitHub refuses it | `not_granted` |
/// | 404 | not installed on the account asked for, or no App configured | `not_configured` |
/// | 429 | too many requests of this caller | backs off, honouring `Retry-After` |
/// | 5xx | unavailable: [`Status::RATE_LIMITED`] while GitHub rate-limits, [`Status::REFRESH_FAILED`] when a mint failed | backs off, honouring `Retry-After` |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 200.
    Granted,
    /// 400.
    BadRequest,
    /// 401.
    Unauthorized,
    /// 403.
    NotGranted,
    /// 404.
    NotFound,
    /// 429.
    TooManyRequests,
    /// 500-599.
    Unavailable(u16),
    /// Anything else: not this API.
    Unexpected(u16),
}

impl Status {
    /// GitHub rate-limits the platform's App: 503, with the `Retry-After`
    /// the limit sets.
    pub const RATE_LIMITED: Self = Self::Unavailable(503);
    /// The platform could not mint; the cause is in its log only.
    pub const REFRESH_FAILED: Self = Self::Unavailable(500);

    /// The meaning of `code`.
    pub const fn of(code: u16) -> Self {
        match code {
            200 => Self::Granted,
            400 => Self::BadRequest,
            401 => Self::Unauthorized,
            403 => Self::NotGranted,
            404 => Self::NotFound,
            429 => Self::TooManyRequests,
            500..=599 => Self::Unavailable(code),
            _ => Self::Unexpected(code),
        }
    }

    /// The status code this meaning is answered with.
    pub const fn code(self) -> u16 {
        match self {
            Self::Granted => 200,
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::NotGranted => 403,
            Self::NotFound => 404,
            Self::TooManyRequests => 429,
            Self::Unavailable(code) | Self::Unexpected(code) => code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repository(text: &str) -> Which {
        Which::repository(text).expect(text)
    }

    #[test]
    fn a_query_round_trips_through_its_pairs() {
        let cases = [
            TokenQuery::default(),
            TokenQuery::for_which(Which::owner("acme_corp").unwrap()),
            TokenQuery {
                which: repository("acme/api"),
                min_remaining: Some(Duration::from_secs(600)),
            },
            TokenQuery {
                which: Which::Default,
                min_remaining: Some(Duration::ZERO),
            },
        ];
        for query in cases {
            let pairs = query.pairs();
            let parsed =
                TokenQuery::parse(pairs.iter().map(|(name, value)| (*name, value.as_str())));
            assert_eq!(parsed, Ok(query.clone()), "{pairs:?}");
        }
        assert!(TokenQuery::default().pairs().is_empty());
    }

    #[test]
    fn a_query_is_read_by_the_one_rule() {
        let parse = |pairs: &[(&str, &str)]| TokenQuery::parse(pairs.iter().copied());
        assert_eq!(
            parse(&[("repository", "ACME/web.git")]).map(|q| q.which),
            Ok(repository("ACME/web")),
            "git's .git is dropped"
        );
        assert_eq!(
            parse(&[("owner", "a"), ("repository", "a/b")]),
            Err(QueryError::WhichTwice)
        );
        assert_eq!(
            parse(&[("owner", "a"), ("owner", "b")]),
            Err(QueryError::WhichTwice)
        );
        assert_eq!(
            parse(&[("owner", "_acme")]),
            Err(QueryError::Name(NameError::BadOwner))
        );
        assert_eq!(
            parse(&[("owner", &"a".repeat(40))]),
            Err(QueryError::Name(NameError::BadOwner))
        );
        assert!(parse(&[("repository", "a/b/c")]).is_err());
        // Found by fuzzing: `api.git.git` read as `api.git` would be written
        // back as `api.git` and read again as `api`. No GitHub name ends in
        // `.git`, so it is refused instead.
        assert_eq!(
            parse(&[("repository", "acme/api.git.git")]),
            Err(QueryError::Name(NameError::BadName))
        );
        assert!(parse(&[("repository", &format!("a/{}", "r".repeat(101)))]).is_err());
        assert_eq!(
            parse(&[("min_remaining_secs", "1"), ("min_remaining_secs", "2")]),
            Err(QueryError::MinRemainingTwice)
        );
        for bad in ["-1", "1.5", "", "12345678901", "9x"] {
            assert_eq!(
                parse(&[("min_remaining_secs", bad)]),
                Err(QueryError::MinRemainingNotSeconds),
                "{bad:?}"
            );
        }
        assert_eq!(parse(&[("scope", "all")]), Err(QueryError::Unknown));
    }

    #[test]
    fn which_holds_the_one_name_rule() {
        for bad in ["acme", "/api", "acme/", "-x/y", "a/..", "a/b c", "a/b/c"] {
            assert!(Which::repository(bad).is_err(), "{bad}");
        }
        assert!(Which::owner(&"a".repeat(40)).is_err());
        assert!(Which::owner(&"a".repeat(39)).is_ok());
        // Enterprise Managed Users' logins.
        assert_eq!(
            Which::owner("acme_corp").unwrap(),
            Which::Owner("acme_corp".into())
        );
        assert!(Which::repository("alice_acme/dotfiles.git").is_ok());
        assert!(Which::owner("_acme").is_err());
        assert!(Which::owner("a_b_c").is_err());
        assert!(Which::repository(&format!("a/{}", "r".repeat(100))).is_ok());
        assert!(Which::repository(&format!("a/{}", "r".repeat(101))).is_err());
    }

    #[test]
    fn which_says_what_it_names() {
        assert_eq!(Which::Default.to_string(), "its default account");
        assert_eq!(Which::owner("acme").unwrap().to_string(), "owner acme");
        assert_eq!(repository("acme/api.git").to_string(), "acme/api");
    }

    #[test]
    fn an_answer_written_by_the_platform_is_read_back_whole() {
        let repositories = vec!["acme/api".to_owned()];
        let permissions = BTreeMap::from([("contents".to_owned(), "write".to_owned())]);
        let token = format!("ghs_{}", "x".repeat(600));
        let body = serde_json::to_vec(&TokenAnswer {
            token: Cow::Borrowed(&token),
            expires_at: Cow::Borrowed("2026-12-03T22:00:00Z"),
            owner: Some(Cow::Borrowed("acme")),
            repositories: Some(Cow::Borrowed(&repositories)),
            permissions: Some(Cow::Borrowed(&permissions)),
        })
        .unwrap();
        let read: TokenAnswer<'_> = serde_json::from_slice(&body).unwrap();
        let checked = read.check().unwrap();
        assert_eq!(checked.token.expose(), token);
        assert_eq!(checked.expires_at, "2026-12-03T22:00:00Z");
        assert_eq!(checked.scope.owner.as_deref(), Some("acme"));
        assert_eq!(checked.scope.repositories, Some(repositories));
        assert_eq!(checked.scope.permissions, Some(permissions));
    }

    #[test]
    fn a_stated_scope_that_breaks_a_rule_is_refused() {
        let check = |json: &str| {
            serde_json::from_str::<TokenAnswer<'_>>(json)
                .unwrap()
                .check()
                .map(|_| ())
        };
        let with = |extra: &str| {
            format!(r#"{{"token":"ghs_abcdefghij","expires_at":"2026-12-03T22:00:00Z"{extra}}}"#)
        };
        assert_eq!(check(&with("")), Ok(()));
        assert_eq!(check(&with(r#","owner":"a b""#)), Err(AnswerError::Owner));
        assert_eq!(
            check(&with(r#","repositories":["acme/api","nope"]"#)),
            Err(AnswerError::Repository(1))
        );
        let many = vec!["acme/r"; MAX_REPOSITORIES_PER_TOKEN + 1];
        assert_eq!(
            check(&with(&format!(
                r#","repositories":{}"#,
                serde_json::to_string(&many).unwrap()
            ))),
            Err(AnswerError::TooManyRepositories)
        );
        assert_eq!(
            check(&with(r#","permissions":{"Contents":"write"}"#)),
            Err(AnswerError::Permissions)
        );
        assert!(matches!(
            check(r#"{"token":"","expires_at":"2026-12-03T22:00:00Z"}"#),
            Err(AnswerError::Token(_))
        ));
    }

    #[test]
    fn each_status_means_one_thing_both_ways() {
        for code in 0..1000 {
            let status = Status::of(code);
            assert_eq!(status.code(), code);
            assert_eq!(Status::of(status.code()), status);
        }
        assert_eq!(Status::RATE_LIMITED.code(), 503);
        assert_eq!(Status::REFRESH_FAILED.code(), 500);
        assert_eq!(Status::of(418), Status::Unexpected(418));
    }

    #[test]
    fn the_routes_nest() {
        assert_eq!(
            REFUSALS_ROUTE,
            format!("{TOKEN_ROUTE}/{REFUSALS_SEGMENT}"),
            "the daemon adds the segment to its token URL"
        );
        assert_eq!(
            token_path("ws-42"),
            "/workspaces/ws-42/github-installation-token"
        );
    }
}
