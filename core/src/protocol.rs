//! The socket protocol between `credd` and `molecule-credd`.
//!
//! One request line, one response line, both JSON objects terminated by `\n`,
//! then the daemon closes the connection. Every message carries `"v"` so a
//! helper and a daemon of different releases notice instead of misreading each
//! other. Requests and token answers are capped at [`MAX_LINE`], which fits
//! the largest token ([`MAX_TOKEN_LEN`]) with the largest scope it can have
//! ([`MAX_TOKEN_ANSWER`]): tokens are opaque and no length is assumed beyond
//! that. A status answer holds up to [`MAX_OWNER_TOKENS`] + 1 tokens' states,
//! each listing at most [`MAX_STATUS_REPOSITORIES`] repositories; what a
//! client reads is capped at [`MAX_ANSWER_LINE`], which fits the largest.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::platform_api::Which;
use crate::repository::{MAX_FULL_NAME_LEN, MAX_REPOSITORIES_PER_TOKEN, NameError, RepositoryRef};
use crate::secret::{MAX_TOKEN_LEN, Token};

/// An enum whose wire name is written once: serde, `as_str` (status output,
/// logs, metrics) and `Display` all use it.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The name on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $wire, )+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == name)
                    .ok_or_else(|| {
                        serde::de::Error::unknown_variant(&name, &[$($wire),+])
                    })
            }
        }
    };
}

/// Protocol version spoken by this build.
pub const VERSION: u32 = 1;

/// Most permissions a token's stated scope may list (GitHub's
/// `app-permissions` names about sixty).
pub const MAX_SCOPE_PERMISSIONS: usize = 100;
/// Longest permission name or level in a stated scope.
pub const MAX_PERMISSION_TEXT: usize = 64;

/// The most JSON one token with its stated scope can take: the longest token,
/// [`MAX_REPOSITORIES_PER_TOKEN`] of the longest `"OWNER/NAME",` and
/// [`MAX_SCOPE_PERMISSIONS`] of the longest `"name":"level",`, plus the
/// fixed fields. Names and levels are ASCII without characters JSON escapes,
/// so this is exact, not a guess. The platform's token answer and the
/// daemon's `token` line are both bounded by it.
pub const MAX_TOKEN_ANSWER: usize = MAX_TOKEN_LEN
    + MAX_REPOSITORIES_PER_TOKEN * (MAX_FULL_NAME_LEN + 3)
    + MAX_SCOPE_PERMISSIONS * (2 * MAX_PERMISSION_TEXT + 6)
    + 1024;

/// Longest line either side accepts, newline included: a token answer with
/// the largest scope fits ([`MAX_TOKEN_ANSWER`]).
pub const MAX_LINE: usize = 128 * 1024;

const _: () = assert!(MAX_LINE >= MAX_TOKEN_ANSWER);

/// Longest answer line a client reads: the largest status answer fits (see
/// `the_largest_status_fits_a_line`). Requests stay within [`MAX_LINE`],
/// which the daemon's reader enforces before decoding; this bound is what
/// [`decode`] and `credd` allow for a line the daemon wrote.
pub const MAX_ANSWER_LINE: usize = 1024 * 1024;

const _: () = assert!(MAX_ANSWER_LINE >= MAX_LINE);

/// Per-owner tokens a daemon holds besides its default one (what untrusted
/// repository content, say many submodule owners, can fill is bounded by
/// it, and so is a status answer).
pub const MAX_OWNER_TOKENS: usize = 32;

/// Repositories a status answer lists per token; a token naming more lists
/// the first ones and counts them all in `repositories_total`. Listed whole,
/// the daemon's 33 tokens of 500 repositories each would not fit a line,
/// and no reader of `credd status` wants 16,500 names.
pub const MAX_STATUS_REPOSITORIES: usize = 10;

/// What a client asks the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// A usable token, waiting for a refresh if none is cached: for
    /// `repository` (`OWNER/NAME`) or `owner` when given (at most one), else
    /// the workspace's default token. A daemon without per-owner tokens
    /// ignores both and answers with the default token and no scope.
    Get {
        /// The repository the token is for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        repository: Option<String>,
        /// The account the token is for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// git was refused with the token whose SHA-256 is `sha256`: drop it if it
    /// is the cached one, so the next `get` fetches a fresh one.
    Erase {
        /// Lower-case hex SHA-256 of the rejected password.
        sha256: String,
    },
    /// Daemon state, never including the token.
    Status,
}

impl Request {
    /// `get` for the workspace's default token.
    pub const GET_DEFAULT: Self = Self::Get {
        repository: None,
        owner: None,
    };

    /// `get` for `which` token: the one way from [`Which`] to the wire's
    /// fields.
    pub fn get(which: &Which) -> Self {
        match which {
            Which::Default => Self::GET_DEFAULT,
            Which::Owner(owner) => Self::Get {
                repository: None,
                owner: Some(owner.clone()),
            },
            Which::Repository(repository) => Self::Get {
                repository: Some(repository.to_string()),
                owner: None,
            },
        }
    }
}

/// Which token a `get`'s fields name, checked by the one name rule: the
/// one way from the wire to [`Which`]. The error is the `bad_request`
/// answer's text.
pub fn which_of(repository: Option<&str>, owner: Option<&str>) -> Result<Which, String> {
    match (repository, owner) {
        (None, None) => Ok(Which::Default),
        (Some(_), Some(_)) => Err("a get names a repository or an owner, not both".into()),
        (Some(text), None) => RepositoryRef::parse(text)
            .map(Which::Repository)
            .map_err(|e: NameError| format!("\"repository\": {e}")),
        (None, Some(owner)) => Which::owner(owner).map_err(|e| format!("\"owner\": {e}")),
    }
}

/// What a token may reach, as the platform stated it. Every field is absent
/// when the platform did not say (an older platform, the bootstrap token).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// The account (user or organisation) whose installation issued it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The repositories (`OWNER/NAME`) it is limited to; absent means every
    /// repository of the installation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repositories: Option<Vec<String>>,
    /// Its permissions (`contents` → `write`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<BTreeMap<String, String>>,
}

impl Scope {
    /// Whether a token of this scope may be offered for `repository`: its
    /// owner (when stated) is the repository's, and its repositories (when
    /// limited) include it.
    pub fn covers(&self, repository: &crate::repository::RepositoryRef) -> bool {
        use crate::repository::same_name;
        self.owner
            .as_deref()
            .is_none_or(|owner| same_name(owner, repository.owner()))
            && self
                .repositories
                .as_ref()
                .is_none_or(|list| list.iter().any(|full| repository.is(full)))
    }
}

wire_enum! {
    /// Where the served token came from.
    pub enum Source {
        /// Fetched from the platform's token endpoint.
        Platform = "platform",
        /// The provision-time `GITHUB_TOKEN`/`GH_TOKEN`, served while the
        /// platform could not be reached at start.
        Env = "env",
    }
}

wire_enum! {
    /// Machine-readable reason attached to [`Response::Error`].
    pub enum ErrorCode {
        /// No usable token could be had in time; the message says why.
        Unavailable = "unavailable",
        /// The caller's uid may not have tokens.
        Forbidden = "forbidden",
        /// The request line was not understood.
        BadRequest = "bad_request",
        /// The request used another protocol version.
        UnsupportedVersion = "unsupported_version",
        /// The daemon is at its connection limit or shutting down.
        Busy = "busy",
        /// The workspace may not have a token for that repository or owner
        /// (outside its grant, or GitHub refuses it): a definite answer, so
        /// no fallback asks the platform again.
        NotGranted = "not_granted",
        /// The daemon is sealed (`--sealed`): it never hands a token out
        /// (`get`, `erase`); its gateway stamps tokens onto GitHub requests.
        /// A definite answer, so no fallback asks the platform.
        Sealed = "sealed",
    }
}

wire_enum! {
    /// The platform's health as the daemon last saw it.
    pub enum PlatformHealth {
        /// No call has completed yet.
        Unknown = "unknown",
        /// The last call succeeded.
        Ok = "ok",
        /// The last call failed in a way worth retrying.
        Failing = "failing",
        /// The bearer is missing or refused.
        Unauthorized = "unauthorized",
        /// The platform has no GitHub App, or it is not installed on the
        /// account asked for (404).
        NotConfigured = "not_configured",
        /// The platform answers, but with tokens barely above `--min-lifetime`.
        ShortLived = "short_lived",
        /// The platform refuses this owner: outside the workspace's grant,
        /// or GitHub refuses the token (a repository or permission the
        /// installation lacks, a suspended installation).
        NotGranted = "not_granted",
    }
}

// Not derivable here: `wire_enum!` owns the derive list.
#[allow(clippy::derivable_impls)]
impl Default for PlatformHealth {
    fn default() -> Self {
        Self::Unknown
    }
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// A usable token.
    Token {
        /// The token itself; serialised only here.
        #[serde(with = "token_serde")]
        token: Token,
        /// Expiry on the *daemon's machine's* clock, Unix seconds (git's
        /// `password_expiry_utc`): now plus the life left as the platform
        /// stated it, so git on this machine never discards a live token
        /// because the platform's clock differs.
        expires_at: u64,
        /// Where it came from.
        source: Source,
        /// What it may reach.
        #[serde(flatten)]
        scope: Scope,
    },
    /// Answer to [`Request::Erase`].
    Erased {
        /// Whether the cached token matched and was dropped.
        dropped: bool,
    },
    /// Answer to [`Request::Status`].
    Status(Box<Status>),
    /// The request failed.
    Error {
        /// Why, for programs.
        code: ErrorCode,
        /// Why, for people: one line, never a secret.
        message: String,
    },
}

wire_enum! {
    /// The cached token's state as `credd status` shows it.
    pub enum TokenState {
        /// A usable token is cached.
        Valid = "valid",
        /// No usable token is cached (none fetched yet, expired or erased).
        Missing = "missing",
    }
}

/// Daemon state reported by [`Request::Status`]. Holds no secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Daemon version.
    pub version: String,
    /// Daemon process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// The default token (flattened: the fields a v1 helper reads).
    #[serde(flatten)]
    pub token: TokenStatus,
    /// Every per-owner token the daemon holds besides the default one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owners: Vec<TokenStatus>,
    /// The daemon's counters since start (`credd metrics`); absent from a
    /// daemon that predates them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<Counters>,
}

/// Daemon-wide counters since start, for `credd metrics`. They outlive the
/// per-owner tokens (a token nobody asks for is dropped, its counts are
/// not), so they only ever grow. Keys are words, not enums, so a helper
/// reads the counters of a newer daemon with words it does not know.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Answers given, by kind: `token` (served), `erased`, `kept`, `status`,
    /// or the [`ErrorCode`] of a refusal.
    #[serde(default)]
    pub answers: BTreeMap<String, u64>,
    /// Token calls the refreshers started (including those that failed
    /// before reaching the platform, say on an unreadable bearer file).
    #[serde(default)]
    pub platform_calls: u64,
    /// Calls that produced no servable token, by cause.
    #[serde(default)]
    pub platform_failures: BTreeMap<String, u64>,
    /// HTTP answers the platform gave, by status class (`2xx`, `4xx`, …).
    #[serde(default)]
    pub platform_responses: BTreeMap<String, u64>,
    /// How long the token calls took.
    #[serde(default)]
    pub platform_latency: Histogram,
}

/// A latency histogram: cumulative counts per upper bound, as Prometheus
/// keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    /// Upper bounds in milliseconds, ascending (`+Inf` is implied).
    #[serde(default)]
    pub le_ms: Vec<u64>,
    /// Observations at or below each bound (cumulative, as long as `le_ms`).
    #[serde(default)]
    pub counts: Vec<u64>,
    /// Every observation (the `+Inf` bucket).
    #[serde(default)]
    pub count: u64,
    /// Sum of the observations in microseconds.
    #[serde(default)]
    pub sum_us: u64,
}

/// One held token's state, never the token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStatus {
    /// Whether a usable token is cached.
    pub state: Option<TokenState>,
    /// Where the cached token came from.
    pub source: Option<Source>,
    /// Short hash of the cached token (first 12 hex digits of its SHA-256).
    pub fingerprint: Option<String>,
    /// Expiry of the cached token, Unix seconds on this machine's clock.
    pub expires_at: Option<u64>,
    /// Seconds of life the cached token has left (counted through suspend).
    pub expires_in_secs: Option<u64>,
    /// Seconds until the next scheduled platform call.
    pub next_refresh_in_secs: Option<u64>,
    /// When the last successful refresh happened, Unix seconds.
    pub last_refresh_at: Option<u64>,
    /// The last platform error, if the last call failed.
    pub last_error: Option<String>,
    /// Platform health in a word.
    pub platform: PlatformHealth,
    /// Platform calls made for this token since start.
    pub platform_calls: u64,
    /// Times this token was served since start.
    pub served: u64,
    /// What the token may reach (for a per-owner token, at least its owner);
    /// in a status answer, at most [`MAX_STATUS_REPOSITORIES`] repositories.
    #[serde(flatten)]
    pub scope: Scope,
    /// How many repositories the token names, when `repositories` lists
    /// only the first [`MAX_STATUS_REPOSITORIES`] of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repositories_total: Option<usize>,
}

impl TokenStatus {
    /// Cuts the listed repositories to [`MAX_STATUS_REPOSITORIES`], counting
    /// them all in `repositories_total`.
    pub fn bounded(mut self) -> Self {
        if let Some(list) = &mut self.scope.repositories
            && list.len() > MAX_STATUS_REPOSITORIES
        {
            self.repositories_total = Some(list.len());
            list.truncate(MAX_STATUS_REPOSITORIES);
        }
        self
    }
}

/// Why a protocol line was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Longer than [`MAX_ANSWER_LINE`].
    #[error("message longer than {MAX_ANSWER_LINE} bytes")]
    TooLong,
    /// Not JSON, or not a message this version knows. Never echoes the line.
    #[error("malformed message (line {line}, column {column})")]
    Malformed {
        /// Position of the error, from serde_json.
        line: usize,
        /// Position of the error, from serde_json.
        column: usize,
    },
    /// Another protocol version.
    #[error(
        "protocol version {0} is not supported (this build speaks {VERSION}); upgrade credd and molecule-credd together"
    )]
    Version(u32),
}

#[derive(Serialize)]
struct OutEnvelope<'a, T> {
    v: u32,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Deserialize)]
struct InEnvelope<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

/// Serialises `message` as one protocol line, newline included.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(&OutEnvelope {
        v: VERSION,
        body: message,
    })
    .expect("protocol messages always serialise");
    line.push(b'\n');
    line
}

/// Parses one protocol line (with or without its newline).
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, ProtocolError> {
    if line.len() > MAX_ANSWER_LINE {
        return Err(ProtocolError::TooLong);
    }
    let malformed = |e: serde_json::Error| ProtocolError::Malformed {
        line: e.line(),
        column: e.column(),
    };
    match serde_json::from_slice::<InEnvelope<T>>(line) {
        Ok(envelope) if envelope.v == VERSION => Ok(envelope.body),
        Ok(envelope) => Err(ProtocolError::Version(envelope.v)),
        // A newer peer may send a body this build cannot parse; report the
        // version mismatch rather than a confusing parse error.
        Err(e) => match serde_json::from_slice::<VersionOnly>(line) {
            Ok(VersionOnly { v }) if v != VERSION => Err(ProtocolError::Version(v)),
            _ => Err(malformed(e)),
        },
    }
}

mod token_serde {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::secret::Token;

    pub(super) fn serialize<S: Serializer>(token: &Token, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(token.expose())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Token, D::Error> {
        Token::new(String::deserialize(d)?).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_token_with_the_largest_scope_fits_a_line() {
        use crate::repository::{MAX_NAME_LEN, MAX_OWNER_LEN};
        let owner = "o".repeat(MAX_OWNER_LEN);
        let repositories = (0..MAX_REPOSITORIES_PER_TOKEN)
            .map(|i| format!("{owner}/{i:0>width$}", width = MAX_NAME_LEN))
            .collect::<Vec<_>>();
        let permissions = (0..MAX_SCOPE_PERMISSIONS)
            .map(|i| {
                (
                    format!("{i:p>width$}", width = MAX_PERMISSION_TEXT),
                    "l".repeat(MAX_PERMISSION_TEXT),
                )
            })
            .collect();
        let answer = Response::Token {
            token: Token::new("t".repeat(MAX_TOKEN_LEN)).expect("valid"),
            expires_at: u64::MAX,
            source: Source::Platform,
            scope: Scope {
                owner: Some(owner),
                repositories: Some(repositories),
                permissions: Some(permissions),
            },
        };
        let line = encode(&answer);
        assert!(line.len() <= MAX_TOKEN_ANSWER, "{} bytes", line.len());
        assert_eq!(decode::<Response>(&line).expect("fits"), answer);
    }

    /// The largest status a daemon can give: its default token and
    /// [`MAX_OWNER_TOKENS`] more, each naming the most repositories with the
    /// longest names, the most permissions and the longest error text.
    #[test]
    fn the_largest_status_fits_a_line() {
        use crate::repository::{MAX_NAME_LEN, MAX_OWNER_LEN};
        let owner = "o".repeat(MAX_OWNER_LEN);
        let token = TokenStatus {
            state: Some(TokenState::Valid),
            source: Some(Source::Platform),
            fingerprint: Some("f".repeat(12)),
            expires_at: Some(u64::MAX),
            expires_in_secs: Some(u64::MAX),
            next_refresh_in_secs: Some(u64::MAX),
            last_refresh_at: Some(u64::MAX),
            last_error: Some("\u{7f}".repeat(512)),
            platform: PlatformHealth::Ok,
            platform_calls: u64::MAX,
            served: u64::MAX,
            scope: Scope {
                owner: Some(owner.clone()),
                repositories: Some(
                    (0..MAX_REPOSITORIES_PER_TOKEN)
                        .map(|i| format!("{owner}/{i:0>width$}", width = MAX_NAME_LEN))
                        .collect(),
                ),
                permissions: Some(
                    (0..MAX_SCOPE_PERMISSIONS)
                        .map(|i| {
                            (
                                format!("{i:p>width$}", width = MAX_PERMISSION_TEXT),
                                "w".repeat(MAX_PERMISSION_TEXT),
                            )
                        })
                        .collect(),
                ),
            },
            repositories_total: None,
        }
        .bounded();
        assert_eq!(token.repositories_total, Some(MAX_REPOSITORIES_PER_TOKEN));
        let status = Response::Status(Box::new(Status {
            version: "v".repeat(64),
            pid: u32::MAX,
            uptime_secs: u64::MAX,
            token: token.clone(),
            owners: vec![token; MAX_OWNER_TOKENS],
            counters: None,
        }));
        let line = encode(&status);
        assert!(line.len() <= MAX_ANSWER_LINE, "{} bytes", line.len());
        assert_eq!(decode::<Response>(&line).expect("fits"), status);
    }

    #[test]
    fn wire_names_round_trip_and_unknown_names_are_refused() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(code).expect("serialise");
            assert_eq!(json, format!("\"{code}\""));
            assert_eq!(
                serde_json::from_str::<ErrorCode>(&json).expect("parse"),
                *code
            );
        }
        for health in PlatformHealth::ALL {
            let json = serde_json::to_string(health).expect("serialise");
            assert_eq!(
                serde_json::from_str::<PlatformHealth>(&json).expect("parse"),
                *health
            );
        }
        assert_eq!(ErrorCode::BadRequest.as_str(), "bad_request");
        assert!(serde_json::from_str::<ErrorCode>("\"teleport\"").is_err());
    }

    #[test]
    fn requests_round_trip_with_a_version() {
        for request in [
            Request::GET_DEFAULT,
            Request::Get {
                repository: Some("acme/api".into()),
                owner: None,
            },
            Request::Get {
                repository: None,
                owner: Some("acme-labs".into()),
            },
            Request::Status,
            Request::Erase {
                sha256: "ab".repeat(32),
            },
        ] {
            let line = encode(&request);
            assert_eq!(line.last(), Some(&b'\n'));
            assert!(line.starts_with(b"{\"v\":1,"), "{line:?}");
            assert_eq!(decode::<Request>(&line).expect("round trip"), request);
        }
        assert_eq!(
            decode::<Request>(br#"{"type":"get","v":1,"extra":true}"#)
                .expect("extra keys are fine"),
            Request::GET_DEFAULT
        );
        assert_eq!(
            encode(&Request::GET_DEFAULT),
            b"{\"v\":1,\"type\":\"get\"}\n",
            "a v1 daemon reads the default get exactly as before"
        );
    }

    #[test]
    fn token_response_round_trips_and_debug_redacts() {
        let token = Token::new("ghs_roundtrip0123456789".into()).expect("valid");
        let scoped = Scope {
            owner: Some("acme".into()),
            repositories: Some(vec!["acme/api".into()]),
            permissions: Some(BTreeMap::from([("contents".into(), "write".into())])),
        };
        for scope in [Scope::default(), scoped] {
            let response = Response::Token {
                token: token.clone(),
                expires_at: 1_900_000_000,
                source: Source::Platform,
                scope,
            };
            let line = encode(&response);
            assert!(String::from_utf8_lossy(&line).contains("ghs_roundtrip0123456789"));
            let back: Response = decode(&line).expect("round trip");
            assert_eq!(back, response);
            assert!(!format!("{back:?}").contains("ghs_roundtrip"));
        }
        // A v1 daemon's answer (no scope) still reads.
        let v1 = br#"{"v":1,"type":"token","token":"ghs_roundtrip0123456789","expires_at":5,"source":"env"}"#;
        assert!(matches!(
            decode::<Response>(v1),
            Ok(Response::Token { scope, .. }) if scope == Scope::default()
        ));
    }

    #[test]
    fn a_scope_covers_its_owners_listed_repositories_only() {
        use crate::repository::RepositoryRef;
        let repo = |s| RepositoryRef::parse(s).expect("valid");
        let listed = Scope {
            owner: Some("Acme".into()),
            repositories: Some(vec!["acme/api".into(), "acme/web".into()]),
            permissions: None,
        };
        assert!(listed.covers(&repo("acme/API")));
        assert!(!listed.covers(&repo("acme/other")));
        assert!(!listed.covers(&repo("evil/api")));
        let whole_owner = Scope {
            owner: Some("acme".into()),
            ..Scope::default()
        };
        assert!(whole_owner.covers(&repo("acme/other")));
        assert!(!whole_owner.covers(&repo("acme-labs/api")));
        assert!(Scope::default().covers(&repo("anyone/anything")));
    }

    #[test]
    fn refuses_other_versions_and_garbage_without_echoing_it() {
        assert!(matches!(
            decode::<Request>(br#"{"v":2,"type":"get"}"#),
            Err(ProtocolError::Version(2))
        ));
        assert!(matches!(
            decode::<Request>(br#"{"v":7,"type":"teleport"}"#),
            Err(ProtocolError::Version(7))
        ));
        let err = decode::<Request>(b"password=ghs_secretsecret").expect_err("not JSON");
        assert!(!err.to_string().contains("ghs_"), "{err}");
        let err = decode::<Response>(
            br#"{"v":1,"type":"token","token":"a b","expires_at":1,"source":"env"}"#,
        )
        .expect_err("invalid token");
        assert!(matches!(err, ProtocolError::Malformed { .. }), "{err}");
        assert!(matches!(
            decode::<Request>(&vec![b' '; MAX_ANSWER_LINE + 1]),
            Err(ProtocolError::TooLong)
        ));
    }

    #[test]
    fn status_survives_the_wire() {
        let status = Response::Status(Box::new(Status {
            version: "0.1.0".into(),
            token: TokenStatus {
                platform: PlatformHealth::Ok,
                state: Some(TokenState::Valid),
                source: Some(Source::Env),
                served: 3,
                ..TokenStatus::default()
            },
            owners: vec![TokenStatus {
                state: Some(TokenState::Missing),
                platform: PlatformHealth::NotGranted,
                scope: Scope {
                    owner: Some("acme-labs".into()),
                    ..Scope::default()
                },
                ..TokenStatus::default()
            }],
            counters: Some(Counters {
                answers: BTreeMap::from([("token".into(), 3), ("busy".into(), 1)]),
                platform_calls: 2,
                platform_failures: BTreeMap::from([("transient".into(), 1)]),
                platform_responses: BTreeMap::from([("5xx".into(), 1)]),
                platform_latency: Histogram {
                    le_ms: vec![10, 100],
                    counts: vec![1, 2],
                    count: 2,
                    sum_us: 60_000,
                },
            }),
            ..Status::default()
        }));
        let line = encode(&status);
        assert_eq!(decode::<Response>(&line).expect("round trip"), status);
        // The default token's fields stay where a v1 helper reads them.
        let text = String::from_utf8_lossy(&line);
        assert!(text.contains(r#""state":"valid","source":"env""#), "{text}");
        // A daemon from before the counters: none, rather than zeros.
        let older = br#"{"v":1,"type":"status","version":"0.1.0","pid":1,"uptime_secs":5,"state":"valid","platform":"ok","platform_calls":1,"served":2}"#;
        match decode::<Response>(older).expect("an older daemon's status") {
            Response::Status(status) => assert_eq!(status.counters, None),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn which_token_goes_to_the_wire_and_back_unchanged() {
        for which in [
            Which::Default,
            Which::Owner("acme_corp".into()),
            Which::Repository(RepositoryRef::parse("acme/api.js").expect("a name")),
        ] {
            let line = encode(&Request::get(&which));
            let Ok(Request::Get { repository, owner }) = decode::<Request>(&line) else {
                panic!("a get");
            };
            assert_eq!(which_of(repository.as_deref(), owner.as_deref()), Ok(which));
        }
        for (repository, owner, says) in [
            (Some("acme/api"), Some("acme"), "not both"),
            (Some("acme"), None, "\"repository\""),
            (None, Some("-acme"), "\"owner\""),
        ] {
            let error = which_of(repository, owner).expect_err(says);
            assert!(error.contains(says), "{error}");
        }
    }
}
