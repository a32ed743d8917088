//! What the token store answers, in its own terms.
//!
//! Why: the store decides *what* a request gets — a token, a refusal, or
//! nothing yet and why — and the socket server alone decides how that is
//! said (`crate::answer`: the protocol's codes and the words). So the
//! gateway reads the same outcomes without parsing a wire answer, and a
//! change of wording never touches the cache.

use std::time::Duration;

use credd_core::protocol::{Scope, Source};
use credd_core::repository::RepositoryRef;
use credd_core::secret::Token;

/// What a `get` comes to.
pub(crate) enum Got {
    /// A token to hand out.
    Token(Served),
    /// This token is not the workspace's to have.
    NotGranted(NotGranted),
    /// No usable token now.
    Unavailable(Unavailable),
}

/// A token as it is handed out.
pub(crate) struct Served {
    /// The token.
    pub(crate) token: Token,
    /// When it stops living, on this machine's wall clock (Unix seconds).
    pub(crate) expires_at: u64,
    /// Where it came from.
    pub(crate) source: Source,
    /// What it reaches, as far as the platform said.
    pub(crate) scope: Scope,
}

/// Why a token is not the workspace's to have.
pub(crate) enum NotGranted {
    /// The held token of `owner` does not cover `repository`, and the
    /// platform, asked again, did not widen it.
    OutsideScope {
        /// The account the held token is for.
        owner: String,
        /// The repository asked for.
        repository: RepositoryRef,
    },
    /// The platform refuses this token, with its reason when it gave one.
    Refused {
        /// The platform's reason.
        reason: Option<String>,
    },
}

/// Why there is no usable token now.
pub(crate) enum Unavailable {
    /// Nothing servable is held.
    NoToken {
        /// What the last platform call ended with, if it failed.
        last_error: Option<String>,
        /// When the next platform call goes out; `None` while one is in
        /// flight (it has not answered within the client's wait).
        next_call_in: Option<Duration>,
    },
    /// Every owner slot holds a token someone asks for.
    SlotsFull {
        /// How many accounts the daemon holds tokens for.
        max: usize,
    },
}
