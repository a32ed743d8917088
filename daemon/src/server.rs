//! The accept loop and one-request connections.
//!
//! Every connection is: check the caller's uid (`SO_PEERCRED`) as it is
//! accepted — a refused uid is answered `forbidden` at once, before anything
//! is read, so it never holds a slot — then read one line (capped at
//! [`MAX_LINE`], within [`READ_DEADLINE`]), answer one line, close.
//! Each connection runs in its own task holding one of `--max-connections`
//! permits, so idle, slow or malicious clients cost a permit and at most
//! [`READ_DEADLINE`] each and never delay anyone else; when no permit is left
//! the accept loop answers `busy` without waiting and moves on.
//!
//! On shutdown the loop stops accepting, connections still waiting for their
//! request are dropped, and requests already being answered get a bounded
//! grace period.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use credd_core::log_limit::{LOG_INTERVAL, LogLimit};
use credd_core::protocol::{self, ErrorCode, MAX_LINE, ProtocolError, Request, Response, Which};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::UCred;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zeroize::Zeroizing;

use crate::answer;
use crate::cache::{Fetch, Got, Sha256Hex, TokenStore};
use crate::metrics::answer_kind;

/// `--max-connections` by default.
pub(crate) const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// How long a client has to send its request line.
pub(crate) const READ_DEADLINE: Duration = Duration::from_secs(2);
/// How long writing the answer may take.
const WRITE_DEADLINE: Duration = Duration::from_secs(2);
/// After an oversized request, how much of the rest is read and discarded
/// (so the client sees our answer rather than a reset) and for how long.
const DRAIN_LIMIT: u64 = 1024 * 1024;
const DRAIN_DEADLINE: Duration = Duration::from_millis(200);
/// Longest executable path written to an audit line.
const MAX_EXE_TEXT: usize = 512;

/// Which callers may use the socket: the daemon's own uid and `--allow-uid`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerCheck {
    allowed: Vec<u32>,
}

impl PeerCheck {
    /// Admits `own_uid` and every uid in `extra`.
    pub(crate) fn new(own_uid: u32, extra: &[u32]) -> Self {
        let mut allowed = vec![own_uid];
        for &uid in extra {
            if !allowed.contains(&uid) {
                allowed.push(uid);
            }
        }
        Self { allowed }
    }

    /// Whether a caller with `uid` may have tokens and status.
    pub(crate) fn allows(&self, uid: u32) -> bool {
        self.allowed.contains(&uid)
    }
}

/// What the server needs besides the cache.
#[derive(Debug, Clone)]
pub(crate) struct ServerSettings {
    /// Concurrent connections served; more get `busy`.
    pub(crate) max_connections: usize,
    /// Who may connect.
    pub(crate) peer_check: PeerCheck,
    /// How long requests in progress may take to finish at shutdown.
    pub(crate) shutdown_grace: Duration,
    /// `--sealed`: status only; no request hands out a token.
    pub(crate) sealed: bool,
}

/// Serves `listener` until `shutdown` completes, then drains (bounded).
pub(crate) async fn run<F: Fetch>(
    listener: UnixListener,
    tokens: Arc<TokenStore<F>>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let peer_check = settings.peer_check;
    let tracker = TaskTracker::new();
    let stop_reading = CancellationToken::new();
    // Refused and busy answers are logged at most once per interval each.
    let mut refused_log = LogLimit::new(LOG_INTERVAL);
    let mut busy_log = LogLimit::new(LOG_INTERVAL);
    let mut accept_failures = AcceptFailures::new(LOG_INTERVAL);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    accept_failures.recovered();
                    stream
                }
                Err(error) => {
                    accept_failures.note(&error);
                    pause_after_accept_failure(&error).await;
                    continue;
                }
            },
        };
        // Who is calling is known before a byte is read: a refused uid is
        // answered at once and never holds a connection slot.
        let peer = stream.peer_cred().ok();
        if !peer.is_some_and(|cred| peer_check.allows(cred.uid())) {
            refuse_uid(&stream, peer, &tokens, &mut refused_log);
            continue;
        }
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            // Never wait here: answer without reading and move on.
            answer_busy(&stream, settings.max_connections, &tokens, &mut busy_log);
            continue;
        };
        let tokens = Arc::clone(&tokens);
        let stop_reading = stop_reading.clone();
        let sealed = settings.sealed;
        tracker.spawn(async move {
            serve_connection(stream, peer, &tokens, &stop_reading, sealed).await;
            drop(permit);
        });
    }
    drop(listener);
    stop_reading.cancel();
    tracker.close();
    if tokio::time::timeout(settings.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "connections still open after the shutdown grace period; closing them"
        );
    }
}

/// Answers a caller whose uid may not use the daemon, without reading
/// its request; logged at most once per interval.
fn refuse_uid<F: Fetch>(
    stream: &UnixStream,
    peer: Option<UCred>,
    tokens: &TokenStore<F>,
    log: &mut LogLimit,
) {
    if let Some(suppressed) = log.admit(now()) {
        tracing::warn!(
            uid = peer.map_or(-1, |c| i64::from(c.uid())),
            pid = peer.and_then(|c| c.pid()).unwrap_or(-1),
            suppressed,
            "refused a caller whose uid may not use this daemon (start it with --allow-uid UID to admit it)"
        );
    }
    let answer = Response::Error {
        code: ErrorCode::Forbidden,
        message: "this uid may not use molecule-credd (ask its owner to add --allow-uid)".into(),
    };
    tokens.metrics().answered(&answer);
    answer_unread(stream, &answer);
}

/// Answers `busy` when every connection slot is taken, without reading the
/// request; logged at most once per interval.
fn answer_busy<F: Fetch>(
    stream: &UnixStream,
    max_connections: usize,
    tokens: &TokenStore<F>,
    log: &mut LogLimit,
) {
    let answer = Response::Error {
        code: ErrorCode::Busy,
        message: format!(
            "molecule-credd is serving {max_connections} connections already; try again"
        ),
    };
    tokens.metrics().answered(&answer);
    answer_unread(stream, &answer);
    if let Some(suppressed) = log.admit(now()) {
        tracing::warn!(
            max_connections,
            suppressed,
            "connection limit reached; answering busy"
        );
    }
}

/// Answers `response` on a connection whose request is not read (busy,
/// forbidden), without waiting. The line is tiny, so a fresh socket's buffer
/// always takes it. One bounded read of what the client already sent comes
/// first (so a short request does not make the close a reset; a client
/// writing without pause must not hold the accept loop). A client whose
/// request write then fails still finds this answer in its buffer (credd
/// reads it).
fn answer_unread(stream: &UnixStream, response: &Response) {
    let mut sink = [0u8; 4096];
    let _ = stream.try_read(&mut sink);
    let _ = stream.try_write(&protocol::encode(response));
}

/// Now, on tokio's clock (paused in tests), for [`LogLimit`].
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Failed `accept(2)`s, logged at a bounded rate: at the open-file limit the
/// loop retries every 50 ms, and a line per failure would flood the journal
/// exactly when the daemon is under pressure. One line when failures start,
/// at most one more per interval (with the number left out), and one when
/// accepting works again (with the whole episode's count).
struct AcceptFailures {
    log: LogLimit,
    /// Failures since the last successful accept.
    episode: u64,
}

impl AcceptFailures {
    fn new(interval: Duration) -> Self {
        Self {
            log: LogLimit::new(interval),
            episode: 0,
        }
    }

    fn note(&mut self, error: &io::Error) {
        self.episode += 1;
        if let Some(suppressed) = self.log.admit(now()) {
            tracing::warn!(%error, suppressed, "accept failed");
        }
    }

    /// An accept worked: closes an episode of failures with one line.
    fn recovered(&mut self) {
        if self.episode > 0 {
            tracing::info!(failed = self.episode, "accepting connections again");
            self.episode = 0;
        }
    }
}

/// Out of descriptors (or a transient accept error): pause briefly instead of
/// spinning, the limit frees up as connections finish.
async fn pause_after_accept_failure(error: &io::Error) {
    let errno = error.raw_os_error().unwrap_or_default();
    if errno == nix::libc::EMFILE || errno == nix::libc::ENFILE {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What reading the request produced.
#[derive(Debug, PartialEq, Eq)]
enum RequestLine {
    /// A line (newline stripped or missing at EOF).
    Line(Vec<u8>),
    /// The client closed without sending anything.
    Empty,
    /// More than [`MAX_LINE`] bytes without a newline.
    TooLong,
}

async fn read_request(stream: &mut UnixStream) -> io::Result<RequestLine> {
    let mut line = Vec::with_capacity(256);
    let mut limited = BufReader::new(&mut *stream).take(MAX_LINE as u64 + 1);
    limited.read_until(b'\n', &mut line).await?;
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(RequestLine::Line(line));
    }
    if line.len() > MAX_LINE {
        return Ok(RequestLine::TooLong);
    }
    if line.is_empty() {
        return Ok(RequestLine::Empty);
    }
    Ok(RequestLine::Line(line))
}

async fn serve_connection<F: Fetch>(
    mut stream: UnixStream,
    peer: Option<UCred>,
    tokens: &TokenStore<F>,
    stop_reading: &CancellationToken,
    sealed: bool,
) {
    let request = tokio::select! {
        () = stop_reading.cancelled() => return,
        read = tokio::time::timeout(READ_DEADLINE, read_request(&mut stream)) => read,
    };
    let line = match request {
        Err(_elapsed) => {
            tracing::debug!("dropped a client that sent no request within {READ_DEADLINE:?}");
            return;
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "reading a request failed");
            return;
        }
        Ok(Ok(RequestLine::Empty)) => return,
        Ok(Ok(line)) => line,
    };

    let uid = peer.map(|cred| cred.uid());
    let pid = peer.and_then(|cred| cred.pid());
    let (answer, audit) = match line {
        RequestLine::TooLong => (
            bad_request(format!("request longer than {MAX_LINE} bytes")),
            None,
        ),
        RequestLine::Line(bytes) => dispatch(&bytes, tokens, peer, sealed).await,
        RequestLine::Empty => return,
    };
    tokens.metrics().answered(&answer);
    tracing::debug!(
        uid = uid.map_or(-1, i64::from),
        pid = pid.unwrap_or(-1),
        answer = answer_kind(&answer),
        "answered a request"
    );
    let drain_input = matches!(
        answer,
        Response::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    );
    // The answer may hold the token: zeroed when dropped.
    let encoded = Zeroizing::new(protocol::encode(&answer));
    drop(answer);
    let written = tokio::time::timeout(WRITE_DEADLINE, async {
        stream.write_all(&encoded).await?;
        stream.shutdown().await
    })
    .await;
    drop(encoded);
    // Logged once the answer is on its way: the caller's wait is the hot
    // path, the line's formatting and write are not (its facts were taken
    // before, while the caller surely lived).
    if let Some(audit) = audit {
        audit.log();
    }
    if !matches!(written, Ok(Ok(()))) {
        tracing::debug!("a client went away before reading its answer");
        return;
    }
    if drain_input {
        // After a refused request (oversized, say) input may be left unread,
        // and closing then resets the connection, which can hide our answer
        // from the client: swallow some of it first (bounded).
        let _ = tokio::time::timeout(
            DRAIN_DEADLINE,
            tokio::io::copy(&mut (&mut stream).take(DRAIN_LIMIT), &mut tokio::io::sink()),
        )
        .await;
    }
}

/// The audit line for a served token: who (pid, uid, executable), what for,
/// and the token's fingerprint, which matches the platform's log of what it
/// minted and so GitHub's audit log — never the token. Taken before the
/// answer is written (the caller still lives: its executable can be read),
/// logged after (see [`serve_connection`]).
///
/// Every text field goes to the log as a `&str`, which the text format
/// writes quoted and escaped (`"`, `\\`, control characters, line and
/// paragraph separators, bidi controls: Rust's `Debug`) and the JSON format
/// as a JSON string: a caller's path with spaces, `uid=0 exe=…` or U+2028 in
/// it cannot add a field or a line of its own.
struct Audit {
    pid: i64,
    uid: i64,
    exe: String,
    asked: String,
    fingerprint: String,
}

/// What was asked for, in the audit line's words.
fn asked(which: &Which) -> String {
    match which {
        Which::Default => "default".to_owned(),
        Which::Owner(owner) => format!("owner {owner}"),
        Which::Repository(repository) => repository.to_string(),
    }
}

impl Audit {
    fn take(peer: Option<UCred>, want: &Which, fingerprint: String) -> Self {
        let pid = peer.and_then(|cred| cred.pid());
        // procfs, not a disk: the link reads at once (or fails for a caller
        // of another uid we may not inspect, or one that has exited).
        let exe = pid
            .and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
            .map_or_else(|| "?".to_owned(), |path| path.display().to_string());
        Self {
            pid: pid.map_or(-1, i64::from),
            uid: peer.map_or(-1, |cred| i64::from(cred.uid())),
            exe,
            asked: asked(want),
            fingerprint,
        }
    }

    fn log(&self) {
        tracing::info!(
            target: "audit",
            pid = self.pid,
            uid = self.uid,
            exe = bounded(&self.exe, MAX_EXE_TEXT),
            asked = self.asked.as_str(),
            fingerprint = self.fingerprint.as_str(),
            "token served"
        );
    }
}

/// `text` cut to at most `max` bytes on a character boundary (nothing else
/// changed: the log's quoting shows the rest exactly).
fn bounded(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn bad_request(message: String) -> Response {
    Response::Error {
        code: ErrorCode::BadRequest,
        message,
    }
}

async fn dispatch<F: Fetch>(
    line: &[u8],
    tokens: &TokenStore<F>,
    peer: Option<UCred>,
    sealed: bool,
) -> (Response, Option<Audit>) {
    let answer = match protocol::decode::<Request>(line) {
        Ok(Request::Get { .. } | Request::Erase { .. }) if sealed => Response::Error {
            code: ErrorCode::Sealed,
            message: "this workspace is sealed: its token is never handed out, only stamped onto GitHub requests by the gateway".into(),
        },
        Ok(Request::Get { repository, owner }) => {
            match protocol::which_of(repository.as_deref(), owner.as_deref()) {
                Ok(want) => {
                    let got = tokens.get(&want).await;
                    let audit = match &got {
                        Got::Token(served) => {
                            Some(Audit::take(peer, &want, served.token.fingerprint()))
                        }
                        Got::NotGranted(_) | Got::Unavailable(_) => None,
                    };
                    return (answer::to_get(got), audit);
                }
                Err(problem) => bad_request(problem),
            }
        }
        Ok(Request::Erase { sha256 }) => match Sha256Hex::parse(&sha256) {
            Some(sha256) => answer::to_erase(tokens.erase(&sha256)),
            None => answer::bad_erase(),
        },
        Ok(Request::Status) => Response::Status(Box::new(tokens.status())),
        Err(ProtocolError::Version(v)) => {
            tracing::debug!(version = v, "request in another protocol version");
            Response::Error {
                code: ErrorCode::UnsupportedVersion,
                message: ProtocolError::Version(v).to_string(),
            }
        }
        Err(error) => {
            tracing::debug!(%error, "malformed request");
            bad_request(format!("{error}; expected one JSON request line"))
        }
    };
    (answer, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CachePolicy;
    use crate::platform::{Grant, PlatformError, ReportOutcome};
    use credd_core::platform_api::TokenQuery;
    use credd_core::secret::Token;
    use std::time::SystemTime;

    /// A failure every 50 ms for 25 s (the accept loop at the open-file
    /// limit) is three lines, not 500: at 0, 10 and 20 s.
    #[tokio::test(start_paused = true)]
    async fn a_flood_of_events_is_logged_once_per_interval_with_the_rest_counted() {
        let mut log = LogLimit::new(LOG_INTERVAL);
        let mut lines = Vec::new();
        for _ in 0..500 {
            lines.extend(log.admit(now()));
            tokio::time::advance(Duration::from_millis(50)).await;
        }
        assert_eq!(lines, [0, 199, 199]);
    }

    #[test]
    fn audit_text_is_bounded_on_a_character_boundary() {
        assert_eq!(bounded("abc", 10), "abc");
        assert_eq!(bounded("ééé", 5), "éé");
        assert_eq!(
            bounded("a\u{2028}b", 10),
            "a\u{2028}b",
            "escaped by the log, not here"
        );
    }

    #[test]
    fn peer_check_admits_own_and_listed_uids_only() {
        let check = PeerCheck::new(1000, &[0, 1000, 42]);
        assert!(check.allows(1000));
        assert!(check.allows(0));
        assert!(check.allows(42));
        assert!(!check.allows(1001));
        assert!(!PeerCheck::new(1000, &[]).allows(0));
    }

    #[derive(Clone)]
    struct Fixed;
    impl Fetch for Fixed {
        async fn fetch(&self, _query: TokenQuery) -> Result<Grant, PlatformError> {
            Ok(Grant {
                token: Token::new("ghs_serverTestToken".into()).unwrap(),
                expires_at: SystemTime::now() + Duration::from_secs(3600),
                lifetime: Duration::from_secs(3600),
                scope: credd_core::protocol::Scope::default(),
            })
        }

        async fn report_refusal(&self, _sha256: &str) -> Result<ReportOutcome, PlatformError> {
            Ok(ReportOutcome::Unsupported)
        }
    }

    fn policy() -> CachePolicy {
        CachePolicy {
            refresh_margin: Duration::from_secs(600),
            min_lifetime: Duration::from_secs(60),
            wait_timeout: Duration::from_secs(4),
            bootstrap_max_age: Duration::from_secs(3000),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }

    async fn exchange(path: &std::path::Path, bytes: &[u8]) -> String {
        let mut stream = UnixStream::connect(path).await.expect("connect");
        let _ = stream.write_all(bytes).await;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .await
            .expect("read");
        answer
    }

    struct Running {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        stop: CancellationToken,
        server: tokio::task::JoinHandle<()>,
    }

    fn serve(settings: ServerSettings) -> Running {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let stop = CancellationToken::new();
        let tokens = Arc::new(TokenStore::start(Fixed, policy(), None, None, &stop));
        let s = stop.clone();
        let server = tokio::spawn(async move {
            run(
                listener,
                tokens,
                settings,
                async move { s.cancelled().await },
            )
            .await;
        });
        Running {
            _dir: dir,
            path,
            stop,
            server,
        }
    }

    fn settings(max_connections: usize, own_uid: u32) -> ServerSettings {
        ServerSettings {
            max_connections,
            peer_check: PeerCheck::new(own_uid, &[]),
            shutdown_grace: Duration::from_secs(5),
            sealed: false,
        }
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    fn code(answer: &str) -> ErrorCode {
        match protocol::decode::<Response>(answer.as_bytes()).expect("protocol answer") {
            Response::Error { code, .. } => code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn answers_one_line_per_connection_and_rejects_bad_input() {
        let server = serve(settings(16, me()));
        let answer = exchange(&server.path, &protocol::encode(&Request::GET_DEFAULT)).await;
        assert!(matches!(
            protocol::decode::<Response>(answer.as_bytes()),
            Ok(Response::Token { .. })
        ));
        assert_eq!(
            code(&exchange(&server.path, b"password=x\n").await),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(&exchange(&server.path, b"{\"v\":9,\"type\":\"get\"}\n").await),
            ErrorCode::UnsupportedVersion
        );
        let oversized = vec![b'x'; MAX_LINE + 10];
        assert_eq!(
            code(&exchange(&server.path, &oversized).await),
            ErrorCode::BadRequest
        );
        // An erase is checked here, at the boundary: the store takes only
        // a SHA-256.
        let erase = |sha256: &str| {
            protocol::encode(&Request::Erase {
                sha256: sha256.to_owned(),
            })
        };
        assert_eq!(
            code(&exchange(&server.path, &erase("ZZ")).await),
            ErrorCode::BadRequest
        );
        assert!(matches!(
            protocol::decode::<Response>(
                exchange(&server.path, &erase(&"0".repeat(64)))
                    .await
                    .as_bytes()
            ),
            Ok(Response::Erased { dropped: false })
        ));
        server.stop.cancel();
        server.server.await.expect("server ends");
    }

    #[tokio::test]
    async fn strangers_are_forbidden() {
        // Only "uid me+1" is allowed, so this process is a stranger.
        let server = serve(settings(16, me() + 1));
        assert_eq!(
            code(&exchange(&server.path, &protocol::encode(&Request::Status)).await),
            ErrorCode::Forbidden
        );
        server.stop.cancel();
        server.server.await.expect("server ends");
    }

    #[tokio::test]
    async fn idle_clients_hold_permits_and_extra_clients_get_busy() {
        let server = serve(settings(2, me()));
        let idle_a = UnixStream::connect(&server.path).await.expect("connect");
        let idle_b = UnixStream::connect(&server.path).await.expect("connect");
        // Both permits are taken by idle clients: the next one is told so at once.
        let answer = loop {
            let answer = exchange(&server.path, &protocol::encode(&Request::Status)).await;
            // The accept loop may not have taken the idle ones yet.
            if code_or_none(&answer) == Some(ErrorCode::Busy) {
                break answer;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(code(&answer), ErrorCode::Busy);
        drop((idle_a, idle_b));
        server.stop.cancel();
        server.server.await.expect("server ends");
    }

    fn code_or_none(answer: &str) -> Option<ErrorCode> {
        match protocol::decode::<Response>(answer.as_bytes()) {
            Ok(Response::Error { code, .. }) => Some(code),
            _ => None,
        }
    }

    #[tokio::test]
    async fn shutdown_drops_clients_still_waiting_to_send() {
        let server = serve(settings(16, me()));
        let mut idle = UnixStream::connect(&server.path).await.expect("connect");
        // Make sure it was accepted: a full exchange after it went through the loop.
        exchange(&server.path, &protocol::encode(&Request::Status)).await;
        server.stop.cancel();
        server.server.await.expect("server ends");
        let mut rest = Vec::new();
        // Closed by the shutdown, long before its own read deadline would.
        let read = tokio::time::timeout(READ_DEADLINE / 2, idle.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the idle client was not dropped at shutdown");
        assert!(rest.is_empty(), "no answer for a client that asked nothing");
    }
}
