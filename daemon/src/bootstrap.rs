//! The provision-time token, served until the platform answers.
//!
//! A workspace is provisioned with a GitHub token in `GITHUB_TOKEN` /
//! `GH_TOKEN`; while the platform cannot be reached at start, the daemon
//! serves that token (for at most `--bootstrap-max-age`). It arrives one of
//! two ways:
//!
//! - **stdin** (`--bootstrap-from-stdin`), what the workspace entrypoint
//!   uses: the token then lives in no process's environment at all — an
//!   environment block stays readable in `/proc/PID/environ` for the life of
//!   a process, and the entrypoint's supervisor lives as long as the
//!   container. Read once, bounded in size and time, before anything else.
//! - **the environment**, for systemd's `EnvironmentFile=` and hand starts.
//!   The variables stay in this process's environment: removing them needs
//!   `unsafe` (`std::env::remove_var`), which this crate allows only once,
//!   for systemd's socket, and would not scrub `/proc/PID/environ` anyway
//!   (the kernel shows the original block). Instead the process is
//!   non-dumpable (its `/proc` files belong to root) and the token is never
//!   passed on (the `--on-refresh` child has both removed).

use std::io::Read;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use credd_core::secret::{MAX_TOKEN_LEN, Token};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use zeroize::Zeroizing;

/// The variables the provision-time token may be in, in order of preference.
pub const TOKEN_VARIABLES: [&str; 2] = ["GITHUB_TOKEN", "GH_TOKEN"];
/// How long the writer of stdin has to deliver the token and close.
pub const STDIN_DEADLINE: Duration = Duration::from_secs(2);

/// Reads the token from `GITHUB_TOKEN`, else `GH_TOKEN`.
pub fn from_env() -> Option<Token> {
    for name in TOKEN_VARIABLES {
        let Some(raw) = std::env::var_os(name) else {
            continue;
        };
        let Ok(value) = raw.into_string() else {
            tracing::warn!(
                variable = name,
                "ignoring a bootstrap token that is not UTF-8"
            );
            continue;
        };
        if let Some(token) = accept(name, value) {
            return Some(token);
        }
    }
    None
}

/// Reads the token from stdin: everything up to end of file (or
/// [`STDIN_DEADLINE`]), at most [`MAX_TOKEN_LEN`] bytes, trimmed. Empty
/// input means no bootstrap token.
pub fn from_stdin() -> Option<Token> {
    let input = match read_bounded(std::io::stdin().lock(), STDIN_DEADLINE) {
        Ok(input) => input,
        Err(problem) => {
            tracing::warn!("ignoring the bootstrap token on stdin: {problem}");
            return None;
        }
    };
    let Ok(text) = std::str::from_utf8(&input) else {
        tracing::warn!("ignoring a bootstrap token on stdin that is not UTF-8");
        return None;
    };
    accept("stdin", text.to_owned())
}

fn accept(from: &str, value: String) -> Option<Token> {
    let value = Zeroizing::new(value);
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return None;
    }
    match Token::new(trimmed.to_owned()) {
        Ok(token) => {
            tracing::info!(
                from,
                fingerprint = token.fingerprint(),
                "bootstrap token, served until the platform answers"
            );
            Some(token)
        }
        Err(error) => {
            tracing::warn!(from, %error, "ignoring an unusable bootstrap token");
            None
        }
    }
}

/// Reads `input` to its end within `deadline`, refusing more than
/// [`MAX_TOKEN_LEN`] bytes. Waits with `poll(2)`, so a writer that never
/// closes costs the deadline, not the daemon.
fn read_bounded(
    mut input: impl Read + AsFd,
    deadline: Duration,
) -> Result<Zeroizing<Vec<u8>>, String> {
    let start = Instant::now();
    let mut data = Zeroizing::new(Vec::with_capacity(256));
    let mut chunk = Zeroizing::new([0u8; 1024]);
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::ZERO);
        let mut fds = [PollFd::new(input.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => {
                return Err(format!(
                    "it was not complete within {} s (close the pipe after writing the token)",
                    deadline.as_secs()
                ));
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("cannot wait for it ({e})")),
        }
        let n = match input.read(&mut chunk[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot read it ({e})")),
        };
        if n == 0 {
            return Ok(data);
        }
        data.extend_from_slice(&chunk[..n]);
        if data.len() > MAX_TOKEN_LEN {
            return Err(format!("it is longer than {MAX_TOKEN_LEN} bytes"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reads_to_the_end_of_input_within_bounds() {
        let (mut writer, reader) = UnixStream::pair().expect("pair");
        writer.write_all(b"ghs_boot\n").expect("write");
        drop(writer);
        let data = read_bounded(reader, Duration::from_secs(2)).expect("read");
        assert_eq!(&data[..], b"ghs_boot\n");
    }

    #[test]
    fn a_writer_that_never_closes_costs_the_deadline_only() {
        let (mut writer, reader) = UnixStream::pair().expect("pair");
        writer.write_all(b"ghs_partial").expect("write");
        let err = read_bounded(reader, Duration::from_millis(50)).expect_err("no end of file");
        assert!(err.contains("not complete"), "{err}");
        drop(writer);
    }

    #[test]
    fn oversized_input_is_refused() {
        let (mut writer, reader) = UnixStream::pair().expect("pair");
        let big = vec![b'a'; MAX_TOKEN_LEN + 2];
        let feeder = std::thread::spawn(move || {
            let _ = writer.write_all(&big);
        });
        let err = read_bounded(reader, Duration::from_secs(2)).expect_err("too long");
        assert!(err.contains("longer than"), "{err}");
        feeder.join().expect("feeder");
    }

    #[test]
    fn blank_values_are_no_token() {
        assert!(accept("test", " \n".into()).is_none());
        let token = accept("test", " ghs_x \n".into()).expect("token");
        assert_eq!(token.expose(), "ghs_x");
    }
}
