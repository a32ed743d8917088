//! The one rule for secrets in captured output.
//!
//! Why: no token, bearer or JWT may reach a log, an error or any output
//! that is not the one place a token is meant to go (`credd get`'s stdout).
//! Every suite scans what it captured with the same rule, so a leak that
//! one suite would catch, every suite catches:
//!
//! > A text leaks when it contains a value registered as a secret (of
//! > [`MIN_LEN`] characters or more) or, for a JWT-shaped secret (GitHub's
//! > stateless `ghs_<APPID>_<JWT>` tokens, App JWTs), one of its parts of
//! > [`MIN_PART_LEN`] characters or more; or anything shaped like one: a
//! > GitHub token prefix (`ghs_`, `ghp_`, `gho_`, `ghu_`, `ghr_`,
//! > `github_pat_`) or `Bearer ` followed by [`MIN_LEN`] or more token
//! > characters.
//!
//! Tokens are opaque and of either of GitHub's formats (classic, 40
//! characters; stateless, about 520 and variable), up to credd-core's
//! [`MAX_TOKEN_LEN`]; the rule assumes no length beyond that.
//!
//! Failures name the output and the kind of secret, never the value: the
//! panic message is captured too and would leak it again. The helpers at the
//! bottom compare and show secrets by fingerprint for the same reason.

use std::sync::{Arc, Mutex};

use credd_core::secret::MAX_TOKEN_LEN;

use crate::lock;

/// Registered secrets shorter than this are ignored (they would match by
/// accident, and no real token or bearer is that short); token shapes need
/// this many token characters after their prefix.
pub const MIN_LEN: usize = 8;

/// A `.`-separated part of a registered secret this long or longer leaks on
/// its own: a stateless token's or a JWT's payload or signature printed
/// without the rest is still the secret (a JWT's header, shared by every
/// JWT of its algorithm, is shorter than this).
pub const MIN_PART_LEN: usize = 40;

/// Prefixes of GitHub tokens, and of a bearer in an HTTP header.
const SHAPES: [(&str, &str); 7] = [
    ("ghs_", "a token-shaped string (ghs_…)"),
    ("ghp_", "a token-shaped string (ghp_…)"),
    ("gho_", "a token-shaped string (gho_…)"),
    ("ghu_", "a token-shaped string (ghu_…)"),
    ("ghr_", "a token-shaped string (ghr_…)"),
    ("github_pat_", "a token-shaped string (github_pat_…)"),
    ("Bearer ", "a bearer header value (Bearer …)"),
];

#[derive(Default)]
struct Inner {
    /// (kind, value).
    values: Vec<(String, String)>,
    /// Other registries whose secrets count here too (a platform's tokens).
    included: Vec<Secrets>,
}

/// Values that must never appear in any captured output, by kind. Clones
/// share one registry.
#[derive(Clone, Default)]
pub struct Secrets(Arc<Mutex<Inner>>);

impl Secrets {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `value`, described as `kind` in failures.
    pub fn add(&self, kind: &str, value: impl Into<String>) {
        let value = value.into();
        if !value.is_empty() {
            lock(&self.0).values.push((kind.to_owned(), value));
        }
    }

    /// Counts everything `other` holds (now and later) as secret here too.
    pub fn include(&self, other: &Secrets) {
        if !Arc::ptr_eq(&self.0, &other.0) {
            lock(&self.0).included.push(other.clone());
        }
    }

    /// Every registered (kind, value), included registries' too.
    pub fn known(&self) -> Vec<(String, String)> {
        let (mut values, included) = {
            let inner = lock(&self.0);
            (inner.values.clone(), inner.included.clone())
        };
        for other in included {
            values.extend(other.known());
        }
        values
    }

    /// The kinds of secret `text` leaks under the rule (empty: none).
    pub fn leaks(&self, text: &str) -> Vec<String> {
        leaks(text, &self.known())
    }

    /// Fails the test naming `what` and the kinds when `text` leaks.
    #[track_caller]
    pub fn assert_clean(&self, what: &str, text: &str) {
        let kinds = self.leaks(text);
        assert!(
            kinds.is_empty(),
            "{what} leaks a secret: {}",
            kinds.join(", ")
        );
    }

    /// Fails the test when any of `outputs` (label, text) leaks, naming each
    /// leak's kind and output.
    #[track_caller]
    pub fn assert_all_clean(&self, outputs: &[(String, String)]) {
        let known = self.known();
        let mut found = Vec::new();
        let mut scanned = 0usize;
        for (label, text) in outputs {
            scanned += text.len();
            for kind in leaks(text, &known) {
                found.push(format!("{kind} found in {label}"));
            }
        }
        assert!(
            found.is_empty(),
            "secrets leaked into captured output ({scanned} bytes scanned): {}",
            found.join("; ")
        );
    }
}

/// The rule: kinds of the registered `known` secrets in `text`, then the
/// token shapes found in it.
fn leaks(text: &str, known: &[(String, String)]) -> Vec<String> {
    let mut kinds: Vec<String> = Vec::new();
    let mut note = |kind: &str| {
        if !kinds.iter().any(|k| k == kind) {
            kinds.push(kind.to_owned());
        }
    };
    for (kind, value) in known {
        let whole = value.len() >= MIN_LEN && text.contains(value.as_str());
        let part = value.contains('.')
            && value
                .split('.')
                .any(|part| part.len() >= MIN_PART_LEN && text.contains(part));
        if whole || part {
            note(kind);
        }
    }
    for (prefix, kind) in SHAPES {
        let shaped = text.match_indices(prefix).any(|(at, _)| {
            text[at + prefix.len()..]
                .bytes()
                .take(MAX_TOKEN_LEN)
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
                .count()
                >= MIN_LEN
        });
        if shaped {
            note(kind);
        }
    }
    kinds
}

/// A random printable string for bearers (tests only: not cryptographic
/// quality, but unique per process, call and instant).
pub fn random_secret(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let hex = sha256_hex(format!("{prefix}/{seq}/{nanos}/{}", std::process::id()).as_bytes());
    format!("{prefix}-{}", &hex[..40])
}

/// Hex SHA-256, as `sha256sum` prints it (credd-core's, taking anything
/// byte-like).
pub fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    credd_core::secret::sha256_hex(bytes.as_ref())
}

/// A short, printable stand-in for a secret in failure messages.
pub fn fingerprint(secret: &str) -> String {
    format!("fp:{}", credd_core::secret::fingerprint(secret))
}

/// `password=` values and `ghs_…` words replaced by fingerprints, for
/// failure messages.
pub fn redact_passwords(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("password=") {
            Some(p) => format!("password=<{}>", fingerprint(p)),
            None => l
                .split(' ')
                .map(|w| {
                    if w.starts_with("ghs_") {
                        format!("<{}>", fingerprint(w))
                    } else {
                        w.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts two secrets are equal (or, with `equal == false`, different)
/// without printing them: failures show fingerprints.
#[track_caller]
pub fn assert_secret(got: Option<&str>, expected: &str, equal: bool, what: &str) {
    let same = got == Some(expected);
    assert!(
        same == equal,
        "{what}: got {:?}, {} {}",
        got.map(fingerprint),
        if equal {
            "expected"
        } else {
            "must differ from"
        },
        fingerprint(expected)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_values_and_token_shapes_leak_short_and_prose_ones_do_not() {
        let secrets = Secrets::new();
        secrets.add("a bearer", "bearer-0123456789");
        secrets.add("too short to count", "abc");
        assert_eq!(secrets.leaks("x bearer-0123456789 y"), ["a bearer"]);
        assert!(secrets.leaks("abc and ghs_ tokens, ghs_short").is_empty());
        assert_eq!(
            secrets.leaks("oops ghs_0123456789"),
            ["a token-shaped string (ghs_…)"]
        );
        assert_eq!(
            secrets.leaks("authorization: Bearer eyJhbGciOi"),
            ["a bearer header value (Bearer …)"]
        );
        assert!(secrets.leaks("missing bearer token").is_empty());
    }

    #[test]
    fn stateless_tokens_leak_whole_or_by_their_jwt_parts() {
        let payload = "eyJpc3MiOiI0MjQyIiwiaW5zdGFsbGF0aW9uIjo3Nzd9".repeat(4);
        let signature = "c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUt".repeat(8);
        let token = format!("ghs_4242_eyJhbGciOiJSUzI1NiJ9.{payload}.{signature}");
        assert!(token.len() > 520);
        let secrets = Secrets::new();
        secrets.add("an issued token", token.as_str());
        assert_eq!(
            secrets.leaks(&format!("x {token} y")),
            ["an issued token", "a token-shaped string (ghs_…)"]
        );
        assert_eq!(
            secrets.leaks(&format!("signature={signature}")),
            ["an issued token"]
        );
        assert_eq!(secrets.leaks(&payload), ["an issued token"]);
        assert!(
            secrets
                .leaks("alg eyJhbGciOiJSUzI1NiJ9 is public")
                .is_empty(),
            "a JWT header alone is no secret"
        );
        let unregistered = Secrets::new();
        assert_eq!(
            unregistered.leaks(&format!("log: {token}")),
            ["a token-shaped string (ghs_…)"]
        );
        assert!(redact_passwords(&format!("password={token}")).starts_with("password=<fp:"));
    }

    #[test]
    fn included_registries_count_and_failures_do_not_repeat_the_value() {
        let platform = Secrets::new();
        let sandbox = Secrets::new();
        sandbox.include(&platform);
        platform.add("an issued token", "later-issued-0123456789");
        let caught = std::panic::catch_unwind(|| {
            sandbox.assert_all_clean(&[("daemon log".into(), "later-issued-0123456789".into())]);
        });
        let message = *caught
            .expect_err("a leak")
            .downcast::<String>()
            .expect("text");
        assert!(
            message.contains("an issued token found in daemon log"),
            "{message}"
        );
        assert!(!message.contains("later-issued"), "{message}");
    }
}
