//! Raw exchanges with a daemon's Unix socket.
//!
//! Why: tests speak the socket protocol themselves — to check the daemon's
//! answers to well-formed, malformed and oversized requests — with bounded
//! reads and deadlines, so a daemon that never answers fails the test
//! instead of hanging it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use credd_core::protocol::{self, ErrorCode, Request, Response};

/// One request line to the socket at `path`, one response line back.
pub fn request_over(path: &Path, request: &Request) -> Result<Response, String> {
    let line = exchange_raw(path, &protocol::encode(request))?;
    protocol::decode(line.as_bytes()).map_err(|e| format!("undecodable answer: {e}"))
}

/// Writes raw bytes to the socket at `path` and reads one line back (bounded
/// by [`protocol::MAX_ANSWER_LINE`] and a deadline). An empty string means the
/// daemon closed without answering.
pub fn exchange_raw(path: &Path, bytes: &[u8]) -> Result<String, String> {
    let mut stream =
        UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
    // The daemon may answer and close before reading everything (oversized
    // input); a failed write still leaves its answer to read.
    let _ = stream.write_all(bytes);
    read_line(stream)
}

/// Asserts `answer` is a protocol error of `code`; `what` says why it must
/// be, in the failure (with the answer).
#[track_caller]
pub fn assert_error(answer: &Response, code: ErrorCode, what: &str) {
    assert!(
        matches!(answer, Response::Error { code: got, .. } if *got == code),
        "{what}: expected a {code:?} error, got {answer:?}"
    );
}

/// Reads one response line from `stream` (bounded).
pub fn read_line(stream: UnixStream) -> Result<String, String> {
    let mut line = String::new();
    BufReader::new(stream)
        .take(protocol::MAX_ANSWER_LINE as u64 + 1)
        .read_line(&mut line)
        .map_err(|e| format!("read answer: {e}"))?;
    Ok(line)
}
