//! The store's outcomes in the protocol's terms: the one place that picks
//! an [`ErrorCode`] and writes the words a client reads.
//!
//! Why apart from the cache: the cache decides what a request gets
//! ([`Got`]); how that is said is the socket's business, and the gateway
//! says the same outcomes as HTTP statuses with the same words.

use std::fmt::Write as _;

use credd_core::protocol::{ErrorCode, Response};

use crate::cache::{Got, NotGranted, Unavailable};

/// The answer to a `get`.
pub(crate) fn to_get(got: Got) -> Response {
    match got {
        Got::Token(served) => Response::Token {
            token: served.token,
            expires_at: served.expires_at,
            source: served.source,
            scope: served.scope,
        },
        Got::NotGranted(why) => Response::Error {
            code: ErrorCode::NotGranted,
            message: not_granted(&why),
        },
        Got::Unavailable(why) => Response::Error {
            code: ErrorCode::Unavailable,
            message: unavailable(&why),
        },
    }
}

/// The answer to an `erase`: whether a held token was dropped.
pub(crate) fn to_erase(dropped: bool) -> Response {
    Response::Erased { dropped }
}

/// The `bad_request` answer to an erase without a SHA-256.
pub(crate) fn bad_erase() -> Response {
    Response::Error {
        code: ErrorCode::BadRequest,
        message: "erase needs the 64-hex-digit SHA-256 of the rejected password".into(),
    }
}

/// Why a token is not the workspace's, in words.
pub(crate) fn not_granted(why: &NotGranted) -> String {
    match why {
        NotGranted::OutsideScope { owner, repository } => format!(
            "the workspace's token for {owner} does not cover {repository}; ask the platform's operator to add it to the workspace's grant"
        ),
        NotGranted::Refused {
            reason: Some(reason),
        } => reason.clone(),
        NotGranted::Refused { reason: None } => "the platform refuses this token".to_owned(),
    }
}

/// Why there is no token now, in words.
pub(crate) fn unavailable(why: &Unavailable) -> String {
    match why {
        Unavailable::NoToken {
            last_error,
            next_call_in,
        } => {
            let mut message = match (last_error, next_call_in) {
                (Some(error), _) => format!("no usable token: {error}"),
                (None, None) => {
                    "no usable token yet: the platform has not answered in time".to_owned()
                }
                (None, Some(_)) => "no usable token yet".to_owned(),
            };
            if let Some(wait) = next_call_in {
                let _ = write!(message, "; next platform call in {}s", wait.as_secs());
            }
            message
        }
        Unavailable::SlotsFull { max } => format!(
            "this daemon holds tokens for {max} accounts already; tokens nobody asks for are dropped at expiry"
        ),
    }
}
