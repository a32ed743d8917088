//! The token type: redacted when formatted, zeroed when dropped.
//!
//! A GitHub installation token is a bearer credential for every repository the
//! App can reach. It is wrapped the moment it leaves the platform's response
//! and only [`Token::expose`] hands out the characters — call sites that do so
//! are few and easy to audit (the socket answer, git's `password=` line, an
//! `Authorization` header, a child's environment).

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// The longest token accepted anywhere on the token's path: the platform's
/// reading of GitHub's answer, the platform's answer, the daemon, the socket
/// protocol, git's `password=` line in `credd`, `credd exec`, the bootstrap
/// token and the test kit's secret scan all bound tokens by this one number.
///
/// Tokens are opaque: GitHub's classic installation tokens are `ghs_` and 36
/// characters; since 2026-04-27 it issues stateless `ghs_<APPID>_<JWT>`
/// tokens of about 520 characters, variable in length (the JWT carries
/// claims). GitHub documents no upper bound, so nothing may assume a length
/// or a shape beyond printable ASCII and this bound, which allows some thirty
/// times the new format and still keeps a broken platform from making
/// anyone hold megabytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A GitHub installation token (or any bearer credential of the same shape).
#[derive(Clone)]
pub struct Token(SecretString);

/// Why a string was refused as a token. Never carries the string itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Nothing, or only whitespace.
    #[error("the token is empty")]
    Empty,
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("the token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    /// Contains whitespace or control characters, which cannot travel in git's
    /// `password=` line or an HTTP header.
    #[error("the token contains whitespace or non-printable characters")]
    BadCharacters,
}

impl Token {
    /// Wraps `value` after checking it can travel in a git credential line and
    /// an HTTP header. The rejected string is zeroed with the error path too.
    pub fn new(value: String) -> Result<Self, TokenError> {
        let secret = SecretString::from(value);
        check_token_text(secret.expose_secret())?;
        Ok(Self(secret))
    }

    /// The token's characters. Every caller is a place a secret leaves memory.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Hex SHA-256 of the token: lets two processes agree on *which* token is
    /// meant (git's `erase`) without sending it again.
    pub fn sha256_hex(&self) -> String {
        sha256_hex(self.expose().as_bytes())
    }

    /// A short, non-reversible name for logs and `credd status`: see
    /// [`fingerprint`].
    pub fn fingerprint(&self) -> String {
        fingerprint(self.expose())
    }

    /// Whether `hex` is this token's [`sha256_hex`](Self::sha256_hex), compared
    /// without an early exit on the first differing byte.
    pub fn matches_sha256_hex(&self, hex: &str) -> bool {
        let ours = self.sha256_hex();
        ours.len() == hex.len()
            && ours
                .bytes()
                .zip(hex.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b.to_ascii_lowercase()))
                == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(redacted, fp={})", self.fingerprint())
    }
}

/// Compares without an early exit, so timing does not reveal a common prefix.
impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.expose().as_bytes(), other.expose().as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Eq for Token {}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted token]")
    }
}

/// Whether `text` can be a token: 1 to [`MAX_TOKEN_LEN`] printable ASCII
/// characters (it must travel in git's `password=` line and an HTTP header).
/// Nothing else is assumed: tokens are opaque. The error never holds `text`.
pub fn check_token_text(text: &str) -> Result<(), TokenError> {
    if text.is_empty() {
        return Err(TokenError::Empty);
    }
    if text.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::BadCharacters);
    }
    Ok(())
}

/// The username that goes with an installation token wherever GitHub takes
/// one as a password: the helper's answer to git, and the gateway's Basic
/// stamp (git smart HTTP and LFS accept only Basic). git hands the
/// answering helper's username back on `store` and `erase`, which is how
/// `credd fallback` recognises credd's credentials.
pub const GITHUB_TOKEN_USERNAME: &str = "x-access-token";

/// Hex digits in a fingerprint: the first 12 of the SHA-256 (48 bits), as
/// every log, `credd status` and the platform's and gateway's audit lines
/// name a token — enough to tell a workspace's tokens apart, too few to
/// matter to anyone holding only the log.
pub const FINGERPRINT_HEX_LEN: usize = 12;

/// The fingerprint of `secret`'s text (see [`FINGERPRINT_HEX_LEN`]).
pub fn fingerprint(secret: &str) -> String {
    fingerprint_of_digest(&Sha256::digest(secret.as_bytes()).into())
}

/// The fingerprint of a token known by its SHA-256 only (a refusal report).
pub fn fingerprint_of_digest(sha256: &[u8; 32]) -> String {
    use fmt::Write;
    sha256[..FINGERPRINT_HEX_LEN / 2].iter().fold(
        String::with_capacity(FINGERPRINT_HEX_LEN),
        |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        },
    )
}

/// A SHA-256 as every contract writes it — 64 lower-case hex digits — as
/// bytes; `None` for anything else. The one parser of it: an erase on the
/// socket, a refusal report at the platform, a refusal announced on Redis.
pub fn parse_sha256_hex(hex: &[u8]) -> Option<[u8; 32]> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_hex_parses_only_what_sha256_hex_writes() {
        let digest: [u8; 32] = Sha256::digest(b"x").into();
        let hex = sha256_hex(b"x");
        assert_eq!(super::parse_sha256_hex(hex.as_bytes()), Some(digest));
        assert_eq!(
            super::parse_sha256_hex(hex.to_ascii_uppercase().as_bytes()),
            None
        );
        assert_eq!(super::parse_sha256_hex(&hex.as_bytes()[1..]), None);
        assert_eq!(super::parse_sha256_hex(format!("{hex}0").as_bytes()), None);
        assert_eq!(super::parse_sha256_hex("g".repeat(64).as_bytes()), None);
        assert_eq!(fingerprint("x"), &hex[..FINGERPRINT_HEX_LEN]);
        assert_eq!(fingerprint_of_digest(&digest), &hex[..FINGERPRINT_HEX_LEN]);
    }

    use super::*;

    const SAMPLE: &str = "ghs_0123456789abcdefABCDEF0123456789abcd";

    #[test]
    fn formatting_never_shows_the_token() {
        let token = Token::new(SAMPLE.to_owned()).expect("valid token");
        for shown in [
            format!("{token:?}"),
            format!("{token}"),
            format!("{token:#?}"),
        ] {
            assert!(!shown.contains(SAMPLE), "{shown}");
            assert!(!shown.contains("ghs_"), "{shown}");
        }
        assert_eq!(token.expose(), SAMPLE);
    }

    #[test]
    fn refuses_what_cannot_travel_in_a_credential_line() {
        assert_eq!(Token::new(String::new()).unwrap_err(), TokenError::Empty);
        assert_eq!(
            Token::new("ghs_a b".into()).unwrap_err(),
            TokenError::BadCharacters
        );
        assert_eq!(
            Token::new("ghs_a\nquit=1".into()).unwrap_err(),
            TokenError::BadCharacters
        );
        assert_eq!(
            Token::new("x".repeat(MAX_TOKEN_LEN + 1)).unwrap_err(),
            TokenError::TooLong
        );
        // Long JWT-shaped tokens are fine, up to the bound.
        let long = format!("ghs_{}", "eyJhbGciOiJSUzI1NiJ9.".repeat(200));
        assert!(Token::new(long).is_ok());
        assert!(Token::new("x".repeat(MAX_TOKEN_LEN)).is_ok());
    }

    #[test]
    fn both_of_githubs_formats_are_tokens() {
        // Classic: ghs_ and 36 characters. Stateless: ghs_<APPID>_<JWT>,
        // about 520 characters and variable.
        let classic = format!("ghs_{}", "A1b2C3".repeat(6));
        assert_eq!(classic.len(), 40);
        let jwt = format!(
            "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.{}.{}",
            "eyJpc3MiOiI0MjQyIn0".repeat(12),
            "c2lnbmF0dXJl-_".repeat(20)
        );
        let stateless = format!("ghs_4242_{jwt}");
        assert!(stateless.len() > 520, "{}", stateless.len());
        for text in [classic, stateless] {
            let token = Token::new(text.clone()).expect("a token");
            assert_eq!(token.expose(), text);
            assert!(!format!("{token:?}").contains("ghs_"));
        }
    }

    #[test]
    fn sha256_matching_is_exact() {
        let token = Token::new(SAMPLE.to_owned()).expect("valid token");
        let hex = token.sha256_hex();
        assert_eq!(hex.len(), 64);
        assert!(token.matches_sha256_hex(&hex));
        assert!(token.matches_sha256_hex(&hex.to_uppercase()));
        assert!(!token.matches_sha256_hex(&hex[..63]));
        let other = Token::new(format!("{SAMPLE}x")).expect("valid token");
        assert!(!token.matches_sha256_hex(&other.sha256_hex()));
        assert_eq!(token.fingerprint(), hex[..12]);
    }
}
