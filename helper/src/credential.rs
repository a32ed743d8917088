//! git's credential-helper protocol: what git sends, whether we answer, what we print.
//!
//! git execs the helper on every fetch and push, so this runs on the hot path
//! and is plain `std`. git's input is untrusted and unbounded in principle (a
//! URL typed by a user, `wwwauth[]` headers from any server), so it is read
//! with hard limits: a helper that hangs or balloons on odd input would stall
//! every git operation in the workspace. Anything that is not git's
//! `key=value` format is refused as a whole rather than half-understood; the
//! caller then stays silent so git moves on to its next helper.

use std::fmt;
use std::io::{self, BufRead, Read};

use credd_core::config::HelperConfig;
use credd_core::secret::{MAX_TOKEN_LEN, Token};
use zeroize::Zeroizing;

/// Most bytes read from git's stdin in total.
pub(crate) const MAX_INPUT: usize = 64 * 1024;
/// Most `key=value` lines read from git's stdin.
pub(crate) const MAX_LINES: usize = 100;
/// Longest single line, without its newline: at least a `password=` line
/// with the longest token (git's `erase` sends the refused one back).
pub(crate) const MAX_LINE_LEN: usize = if MAX_TOKEN_LEN + 64 > 8 * 1024 {
    MAX_TOKEN_LEN + 64
} else {
    8 * 1024
};

const _: () = assert!(MAX_INPUT >= 2 * MAX_LINE_LEN);

/// The attributes of git's request that credd looks at.
#[derive(Default)]
pub(crate) struct GitRequest {
    /// `protocol=` (`https`, `http`, …).
    pub(crate) protocol: Option<String>,
    /// `host=`, possibly with `:port`.
    pub(crate) host: Option<String>,
    /// `path=` (only sent with `useHttpPath`; read for completeness).
    pub(crate) path: Option<String>,
    /// `username=`.
    pub(crate) username: Option<String>,
    /// `password=`: on `erase`, the credential the server rejected.
    pub(crate) password: Option<Zeroizing<String>>,
}

impl fmt::Debug for GitRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitRequest")
            .field("protocol", &self.protocol)
            .field("host", &self.host)
            .field("path", &self.path)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// Why git's input was refused. Never quotes the input (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InputError {
    /// More than [`MAX_INPUT`] bytes before the blank line.
    TooLarge,
    /// More than [`MAX_LINES`] lines before the blank line.
    TooManyLines,
    /// A line longer than [`MAX_LINE_LEN`].
    LineTooLong {
        /// 1-based line number.
        line: usize,
    },
    /// A line that is not UTF-8.
    NotUtf8 {
        /// 1-based line number.
        line: usize,
    },
    /// A line without `=`.
    NotKeyValue {
        /// 1-based line number.
        line: usize,
    },
    /// stdin could not be read.
    Read(io::ErrorKind),
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ignoring git's input: ")?;
        match self {
            Self::TooLarge => write!(f, "more than {MAX_INPUT} bytes"),
            Self::TooManyLines => write!(f, "more than {MAX_LINES} lines"),
            Self::LineTooLong { line } => {
                write!(f, "line {line} is longer than {MAX_LINE_LEN} bytes")
            }
            Self::NotUtf8 { line } => write!(f, "line {line} is not UTF-8"),
            Self::NotKeyValue { line } => {
                write!(
                    f,
                    "line {line} is not key=value (git sends one attribute per line)"
                )
            }
            Self::Read(kind) => write!(f, "cannot read stdin ({kind})"),
        }
    }
}

/// Reads git's attributes up to a blank line or EOF (git may close stdin
/// without the blank line). Unknown keys, `capability[]` and `wwwauth[]` are
/// skipped; for a repeated key the last value wins, as in git itself.
pub(crate) fn read_request(input: impl BufRead) -> Result<GitRequest, InputError> {
    let mut request = GitRequest::default();
    read_attributes(input, |key, value| match key {
        "protocol" => request.protocol = Some(value.to_owned()),
        "host" => request.host = Some(value.to_owned()),
        "path" => request.path = Some(value.to_owned()),
        "username" => request.username = Some(value.to_owned()),
        "password" => request.password = Some(Zeroizing::new(value.to_owned())),
        // capability[], wwwauth[], url, password_expiry_utc, oauth_refresh_token, …
        _ => {}
    })?;
    Ok(request)
}

/// Reads git's `key=value` lines (bounded: [`MAX_INPUT`], [`MAX_LINES`],
/// [`MAX_LINE_LEN`]) up to a blank line or EOF, calling `each` with every
/// attribute in order. The line buffer is zeroed: values may be passwords.
pub(crate) fn read_attributes(
    input: impl BufRead,
    mut each: impl FnMut(&str, &str),
) -> Result<(), InputError> {
    // One byte past each limit tells "exactly at the limit" from "over it".
    let mut input = input.take(MAX_INPUT as u64 + 1);
    let mut buf = Zeroizing::new(Vec::with_capacity(256));
    let mut total = 0usize;
    let mut lines = 0usize;
    loop {
        buf.clear();
        let read = (&mut input)
            .take(MAX_LINE_LEN as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| InputError::Read(e.kind()))?;
        if read == 0 {
            break;
        }
        total += read;
        if total > MAX_INPUT {
            return Err(InputError::TooLarge);
        }
        let number = lines + 1;
        let mut content: &[u8] = &buf;
        match content.strip_suffix(b"\n") {
            Some(rest) => content = rest,
            None if content.len() > MAX_LINE_LEN => {
                return Err(InputError::LineTooLong { line: number });
            }
            None => {} // the last line, closed by EOF
        }
        // git's own reader accepts CRLF; so do we.
        if let Some(rest) = content.strip_suffix(b"\r") {
            content = rest;
        }
        if content.is_empty() {
            break;
        }
        lines = number;
        if lines > MAX_LINES {
            return Err(InputError::TooManyLines);
        }
        let text =
            std::str::from_utf8(content).map_err(|_| InputError::NotUtf8 { line: number })?;
        let (key, value) = text
            .split_once('=')
            .ok_or(InputError::NotKeyValue { line: number })?;
        each(key, value);
    }
    Ok(())
}

/// Whether `host` (with optional `:port`) names this machine's loopback interface.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    // (name is loopback, text after the name: "" or ":port")
    let (name_ok, rest) = match host.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((inner, rest)) => (inner == "::1", rest),
            None => return false,
        },
        None => {
            let (name, rest) = host.split_at(host.find(':').unwrap_or(host.len()));
            (
                name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1",
                rest,
            )
        }
    };
    let port_ok = rest.is_empty()
        || rest.strip_prefix(':').is_some_and(|p| {
            !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
        });
    name_ok && port_ok
}

/// Whether credd answers `request`: its host is one of `CREDD_HOSTS` and it is
/// `https` (plain `http` only on loopback, where the tests' git server lives —
/// a token must never cross a network in clear text).
pub(crate) fn is_served(config: &HelperConfig, request: &GitRequest) -> bool {
    let (Some(protocol), Some(host)) = (request.protocol.as_deref(), request.host.as_deref())
    else {
        return false;
    };
    let scheme_ok = protocol.eq_ignore_ascii_case("https")
        || (protocol.eq_ignore_ascii_case("http") && is_loopback_host(host));
    scheme_ok && config.serves_host(host)
}

/// The username of every credential credd answers with (credd-core's
/// [`GITHUB_TOKEN_USERNAME`](credd_core::secret::GITHUB_TOKEN_USERNAME);
/// both gits, 2.39 and 2.47, hand it back on `store` and `erase`).
pub(crate) const USERNAME: &str = credd_core::secret::GITHUB_TOKEN_USERNAME;

/// git's answer: exactly these three lines. Never `quit=1`, which would stop
/// git from asking the helpers after us.
pub(crate) fn format_answer(token: &Token, expires_at_unix: u64) -> Zeroizing<String> {
    Zeroizing::new(format!(
        "username={USERNAME}\npassword={}\npassword_expiry_utc={expires_at_unix}\n",
        token.expose()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn parse(input: &str) -> Result<GitRequest, InputError> {
        read_request(input.as_bytes())
    }

    fn config(hosts: &str) -> HelperConfig {
        HelperConfig::from_lookup(|name| (name == "CREDD_HOSTS").then(|| OsString::from(hosts)))
            .expect("valid config")
    }

    fn request(protocol: &str, host: &str) -> GitRequest {
        GitRequest {
            protocol: Some(protocol.into()),
            host: Some(host.into()),
            ..GitRequest::default()
        }
    }

    #[test]
    fn reads_the_attributes_git_sends_and_skips_the_rest() {
        let r = parse(
            "capability[]=authtype\ncapability[]=state\nprotocol=https\nhost=github.com\n\
             path=org/repo.git\nwwwauth[]=Basic realm=\"GitHub\"\nusername=x-access-token\n\
             password=ghs_rejected\nsomething_new=1\n\nprotocol=http\n",
        )
        .expect("valid input");
        assert_eq!(
            r.protocol.as_deref(),
            Some("https"),
            "stops at the blank line"
        );
        assert_eq!(r.host.as_deref(), Some("github.com"));
        assert_eq!(r.path.as_deref(), Some("org/repo.git"));
        assert_eq!(r.username.as_deref(), Some("x-access-token"));
        assert_eq!(
            r.password.as_deref().map(String::as_str),
            Some("ghs_rejected")
        );
        assert!(!format!("{r:?}").contains("ghs_rejected"), "Debug redacts");
    }

    #[test]
    fn erase_carries_the_longest_token_of_either_format() {
        let stateless = format!("ghs_4242_eyJhbGciOiJSUzI1NiJ9.{}.sig", "e".repeat(600));
        for token in [
            "ghs_0123456789abcdefABCDEF0123456789abcd".to_owned(),
            stateless,
            "t".repeat(MAX_TOKEN_LEN),
        ] {
            let r = parse(&format!(
                "protocol=https\nhost=github.com\nusername=x-access-token\npassword={token}\n\n"
            ))
            .expect("git's erase input");
            assert_eq!(
                r.password.as_deref().map(String::as_str),
                Some(token.as_str())
            );
        }
    }

    #[test]
    fn eof_without_a_blank_line_ends_the_input() {
        let r = parse("protocol=https\nhost=github.com").expect("valid input");
        assert_eq!(r.host.as_deref(), Some("github.com"));
        let empty = parse("").expect("empty input is valid");
        assert!(empty.protocol.is_none() && empty.host.is_none());
    }

    #[test]
    fn accepts_crlf_and_lets_the_last_duplicate_win() {
        let r =
            parse("protocol=http\r\nhost=a.example\r\nhost=github.com\r\nprotocol=https\r\n\r\n")
                .expect("valid input");
        assert_eq!(r.protocol.as_deref(), Some("https"));
        assert_eq!(r.host.as_deref(), Some("github.com"));
        let value_with_equals = parse("wwwauth[]=Bearer a=b\npassword=x=y\n").expect("valid");
        assert_eq!(
            value_with_equals.password.as_deref().map(String::as_str),
            Some("x=y")
        );
    }

    #[test]
    fn refuses_lines_without_equals_and_never_quotes_them() {
        let err = parse("protocol=https\nghs_secretvalue\n\n").expect_err("not key=value");
        assert_eq!(err, InputError::NotKeyValue { line: 2 });
        assert!(!err.to_string().contains("ghs_"), "{err}");
        assert_eq!(
            read_request(&b"host=\xff\xfe\n"[..]).expect_err("not UTF-8"),
            InputError::NotUtf8 { line: 1 }
        );
    }

    #[test]
    fn bounds_line_length_line_count_and_total_size() {
        let at_limit = format!("path={}\n", "p".repeat(MAX_LINE_LEN - 5));
        assert!(
            parse(&at_limit).is_ok(),
            "a line of exactly {MAX_LINE_LEN} bytes is fine"
        );
        let at_limit_eof = format!("path={}", "p".repeat(MAX_LINE_LEN - 5));
        assert!(parse(&at_limit_eof).is_ok());
        let over = format!("protocol=https\npath={}\n", "p".repeat(MAX_LINE_LEN - 4));
        assert_eq!(
            parse(&over).expect_err("too long"),
            InputError::LineTooLong { line: 2 }
        );
        let over_eof = format!("path={}", "p".repeat(MAX_LINE_LEN));
        assert_eq!(
            parse(&over_eof).expect_err("too long"),
            InputError::LineTooLong { line: 1 }
        );

        let many = "capability[]=x\n".repeat(MAX_LINES);
        assert!(parse(&many).is_ok(), "{MAX_LINES} lines are fine");
        let too_many = "capability[]=x\n".repeat(MAX_LINES + 1);
        assert_eq!(
            parse(&too_many).expect_err("too many"),
            InputError::TooManyLines
        );

        // Big lines under the count limit still hit the byte limit.
        let big = format!("wwwauth[]={}\n", "w".repeat(MAX_LINE_LEN - 10)).repeat(9);
        assert_eq!(parse(&big).expect_err("too large"), InputError::TooLarge);
        // A reader that never ends is cut off, not read forever.
        let endless = io::BufReader::new(io::repeat(b'a'));
        assert_eq!(
            read_request(endless).expect_err("endless"),
            InputError::LineTooLong { line: 1 }
        );
    }

    #[test]
    fn answers_https_for_configured_hosts_and_http_only_on_loopback() {
        let c = config("github.com,ghe.example.com:8443,127.0.0.1:9418,localhost");
        assert!(is_served(&c, &request("https", "github.com")));
        assert!(is_served(&c, &request("https", "GitHub.COM")));
        assert!(is_served(&c, &request("https", "ghe.example.com:8443")));
        assert!(!is_served(&c, &request("https", "ghe.example.com")));
        assert!(
            !is_served(&c, &request("http", "github.com")),
            "no clear text off loopback"
        );
        assert!(!is_served(&c, &request("ssh", "github.com")));
        assert!(!is_served(&c, &request("https", "example.com")));
        assert!(is_served(&c, &request("http", "127.0.0.1:9418")));
        assert!(is_served(&c, &request("http", "localhost")));
        assert!(
            !is_served(&c, &request("http", "127.0.0.1")),
            "not in CREDD_HOSTS"
        );
        let missing_host = GitRequest {
            protocol: Some("https".into()),
            ..GitRequest::default()
        };
        assert!(!is_served(&c, &missing_host));
        assert!(!is_served(&c, &GitRequest::default()));
    }

    #[test]
    fn loopback_hosts_are_recognised_exactly() {
        for host in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "[::1]",
            "[::1]:443",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "127.0.0.1.evil.com",
            "localhost.evil.com",
            "127.0.0.2",
            "::1",
            "[::1",
            "[::2]:80",
            "127.0.0.1:",
            "127.0.0.1:80x",
            "localhost:123456",
            "evil.com:127.0.0.1",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn the_answer_is_exactly_three_lines() {
        let token = Token::new("ghs_answer0123".into()).expect("valid");
        let answer = format_answer(&token, 1_900_000_000);
        assert_eq!(
            answer.as_str(),
            "username=x-access-token\npassword=ghs_answer0123\npassword_expiry_utc=1900000000\n"
        );
        assert!(!answer.contains("quit"));
    }
}
