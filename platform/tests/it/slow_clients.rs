//! Slow clients over real TCP on 127.0.0.1: heads that never finish, and
//! more of them than the connection cap.
//!
//! Why: a client that trickles a request head one byte at a time used to keep
//! its connection (and its slot under the cap) forever, because the idle
//! timer restarted on every byte; a few thousand of them made `/healthz`
//! time out for as long as they kept going, without a log line. The service
//! now bounds the time to a complete request head, and at the cap evicts the
//! connection that has waited longest for one, so a real client — whose head
//! arrives microseconds after it connects — always gets in.
//!
//! Most tests run the service in-process; two run the real binary (its
//! defaults, and an open-file limit below the connection cap).
//!
//! Timeouts here are the subject under test; everything else waits on a
//! signal (a counter on a watch channel) with [`WAIT`] as the deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use molecule_platform::{
    AppState, Auth, DevProvider, ServiceLimits, TokenProvider, WorkspaceTokens,
};
use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use nix::sys::signal::Signal;

use testkit::PlatformProcess;

use crate::support::{Logs, Server, WAIT, assert_no_secrets};

const ADMIN: &str = "admin-bearer-for-slow-client-tests";
/// A header name no log line may contain: the service logs no request content.
const MARKER: &[u8] = b"X-Slowloris-Marker-7f3a: ";
/// How often a slow client sends its next byte.
const TRICKLE: Duration = Duration::from_millis(50);
/// Longest a real request may take while slow clients are connected.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

fn dev_app() -> Router {
    let served: Option<Arc<dyn TokenProvider>> =
        Some(Arc::new(DevProvider::new(Duration::from_secs(600))));
    let auth = Auth::new(Some(SecretString::from(ADMIN)), WorkspaceTokens::empty());
    molecule_platform::app(AppState::new(served, auth))
}

/// `GET /healthz` on a fresh connection; the whole answer.
async fn healthz(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Sends one complete keep-alive request and reads its answer.
async fn request_keep_alive(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(br#"{"status":"ok"}"#) {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed mid-answer: {answer:?}");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
}

/// Whether the server closed `stream`: a read of EOF or a reset.
fn closed(read: &std::io::Result<usize>) -> bool {
    matches!(read, Ok(0) | Err(_))
}

/// Sends `head`, then one more byte of a header every [`TRICKLE`] until the
/// server closes the connection; how long after the first byte that was.
/// Fails after [`WAIT`] (the connection was never closed).
async fn trickle_until_closed(stream: &mut TcpStream, head: &[u8]) -> Duration {
    let start = Instant::now();
    stream.write_all(head).await.expect("write");
    stream.write_all(MARKER).await.expect("write");
    let mut buf = [0u8; 64];
    let rounds = WAIT.as_millis() / TRICKLE.as_millis();
    for _ in 0..rounds {
        tokio::select! {
            read = stream.read(&mut buf) => {
                assert!(closed(&read), "an answer to half a head: {:?}", &buf[..]);
                return start.elapsed();
            }
            () = tokio::time::sleep(TRICKLE) => {
                if stream.write_all(b"x").await.is_err() {
                    return start.elapsed();
                }
            }
        }
    }
    panic!("a head still unfinished after {WAIT:?} was never closed");
}

/// Sums the field `name=N` over every line of `logs` that has it.
fn summed(logs: &str, name: &str) -> u64 {
    let key = format!("{name}=");
    logs.lines()
        .filter_map(|line| line.split_once(key.as_str()))
        .map(|(_, after)| {
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            digits
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("no number after {key:?} in {after:?}"))
        })
        .sum()
}

#[tokio::test]
async fn heads_not_complete_within_the_header_timeout_are_closed() {
    let (logs, _guard) = Logs::capture();
    let header_read_timeout = Duration::from_millis(300);
    let idle_timeout = Duration::from_secs(2);
    let limits = ServiceLimits {
        header_read_timeout,
        idle_timeout,
        ..Default::default()
    };
    let server = Server::start(dev_app(), limits).await;
    let addr = server.addr;

    // New connections trickling a head: closed once the header timeout
    // passed, although a byte arrives every 50 ms.
    const FRESH: usize = 10;
    let fresh = (0..FRESH).map(|_| async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        trickle_until_closed(&mut stream, b"GET /healthz HTTP/1.1\r\nHost: t\r\n").await
    });
    // A kept-alive connection that starts its next head and never finishes
    // it: closed a header timeout after that head began, long before the
    // idle timeout.
    let kept_alive_slow = async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        request_keep_alive(&mut stream).await;
        trickle_until_closed(&mut stream, b"GET /healthz HTTP/1.1\r\nHost: t\r\n").await
    };
    // A kept-alive connection that says nothing: closed after the idle
    // timeout, not the header timeout.
    let kept_alive_idle = async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        request_keep_alive(&mut stream).await;
        let start = Instant::now();
        let read = tokio::time::timeout(WAIT, stream.read(&mut [0u8; 16]))
            .await
            .expect("an idle kept-alive connection is closed");
        assert!(closed(&read), "{read:?}");
        start.elapsed()
    };
    let (fresh, kept_alive_slow, kept_alive_idle) =
        tokio::join!(join_all(fresh), kept_alive_slow, kept_alive_idle);
    for elapsed in fresh.iter().chain([&kept_alive_slow]) {
        assert!(
            *elapsed >= header_read_timeout && *elapsed < idle_timeout,
            "an unfinished head closed after {elapsed:?} (header timeout {header_read_timeout:?})"
        );
    }
    // The server starts the idle clock as the answer leaves, a moment
    // before the client has read it.
    assert!(
        kept_alive_idle >= idle_timeout - Duration::from_millis(100),
        "an idle kept-alive connection closed after {kept_alive_idle:?}, before the idle timeout {idle_timeout:?}"
    );
    // Others are served all along.
    assert!(healthz(addr).await.starts_with("HTTP/1.1 200"));
    server.stop().await;

    let text = logs.text();
    let summaries = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("slow clients"))
        .count();
    assert!(
        (1..=2).contains(&summaries),
        "one aggregated warning (two if a report interval passed), not one per connection:\n{text}"
    );
    assert_eq!(summed(&text, "head_timeouts"), FRESH as u64 + 1, "{text}");
    let marker = String::from_utf8_lossy(MARKER);
    assert!(
        !text.contains(marker.trim_end_matches([':', ' '])),
        "request content in the logs:\n{text}"
    );
}

/// Runs `futures` as tasks and collects their outputs in order.
async fn join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("task"));
    }
    out
}

/// Slow clients and what they saw.
struct Slowloris {
    stop: watch::Sender<bool>,
    connects: watch::Sender<u64>,
    closes: watch::Sender<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Slowloris {
    /// Starts `n` slow clients sending a byte every `trickle`, and waits
    /// until each has connected and begun its head.
    ///
    /// First connections are made [`CONNECTING_AT_ONCE`] at a time: thousands
    /// of simultaneous handshakes overflow the kernel's queues, and a client
    /// whose handshake the server dropped believes it is connected while the
    /// server has not seen it, which would make the server look less full
    /// than it is. Reconnections are not held back.
    async fn start(addr: SocketAddr, n: usize, trickle: Duration) -> Self {
        const CONNECTING_AT_ONCE: usize = 64;
        let (stop, stop_rx) = watch::channel(false);
        let connects = watch::Sender::new(0u64);
        let closes = watch::Sender::new(0u64);
        let connecting = Arc::new(tokio::sync::Semaphore::new(CONNECTING_AT_ONCE));
        let tasks = (0..n)
            .map(|_| {
                tokio::spawn(slowloris(
                    addr,
                    trickle,
                    Arc::clone(&connecting),
                    stop_rx.clone(),
                    connects.clone(),
                    closes.clone(),
                ))
            })
            .collect();
        tokio::time::timeout(WAIT, connects.subscribe().wait_for(|c| *c >= n as u64))
            .await
            .expect("every slow client connected")
            .expect("counter");
        Self {
            stop,
            connects,
            closes,
            tasks,
        }
    }

    /// Waits until the server closed at least `n` slow connections.
    async fn wait_for_closes(&self, n: u64) {
        let mut closes = self.closes.subscribe();
        let waited = tokio::time::timeout(WAIT, closes.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(
            waited,
            "the server closed {} slow connections, expected at least {n}",
            *self.closes.borrow()
        );
    }

    /// (connects, connections closed by the server) so far.
    fn counts(&self) -> (u64, u64) {
        (*self.connects.borrow(), *self.closes.borrow())
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("slow client stops")
                .expect("slow client task");
        }
    }
}

/// `/healthz` on a fresh connection from a thread of its own, with blocking
/// I/O: a real client sends its head the moment it is connected, however
/// busy the slow clients keep this test's runtime. The whole answer.
fn healthz_blocking(addr: SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, ANSWER_WITHIN)?;
    stream.set_read_timeout(Some(ANSWER_WITHIN))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// `/healthz` `probes` times in a row, each answered within
/// [`ANSWER_WITHIN`]: the sorted latencies, or what went wrong.
async fn probe_healthz(
    addr: SocketAddr,
    probes: usize,
    slow: &Slowloris,
) -> Result<Vec<Duration>, String> {
    let mut latencies = Vec::with_capacity(probes);
    for probe in 0..probes {
        let (elapsed, answer) = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let answer = healthz_blocking(addr);
            (start.elapsed(), answer)
        })
        .await
        .expect("probe thread");
        let (connects, closes) = slow.counts();
        let context = format!(
            "{} slow clients, {connects} connects and {closes} closes so far",
            slow.tasks.len()
        );
        match answer {
            Ok(answer) if answer.starts_with("HTTP/1.1 200") && elapsed < ANSWER_WITHIN => {
                latencies.push(elapsed);
            }
            Ok(answer) => {
                return Err(format!(
                    "probe {probe}: /healthz answered {answer:?} after {elapsed:?} ({context})"
                ));
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "probe {probe}: /healthz unanswered after {ANSWER_WITHIN:?} ({context})"
                ));
            }
            Err(error) => {
                return Err(format!(
                    "probe {probe}: /healthz failed after {elapsed:?}: {error} ({context})"
                ));
            }
        }
    }
    latencies.sort();
    Ok(latencies)
}

/// Connects, starts a head, sends a byte every `trickle` and reconnects at
/// once when closed, until `stop`; counts connects and closes.
async fn slowloris(
    addr: SocketAddr,
    trickle: Duration,
    connecting: Arc<tokio::sync::Semaphore>,
    mut stop: watch::Receiver<bool>,
    connects: watch::Sender<u64>,
    closes: watch::Sender<u64>,
) {
    const MAX_RECONNECTS: usize = 100_000;
    let mut first = Some(connecting.acquire_owned().await.expect("semaphore"));
    for _ in 0..MAX_RECONNECTS {
        if *stop.borrow() {
            return;
        }
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            return;
        };
        if stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
            .await
            .is_err()
        {
            closes.send_modify(|n| *n += 1);
            continue;
        }
        connects.send_modify(|n| *n += 1);
        first.take();
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                read = stream.read(&mut buf) => {
                    assert!(closed(&read), "an answer to half a head");
                    break;
                }
                () = tokio::time::sleep(trickle) => {
                    if stream.write_all(b"x").await.is_err() {
                        break;
                    }
                }
            }
        }
        closes.send_modify(|n| *n += 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_requests_get_in_while_slow_clients_overfill_the_connection_cap() {
    const CAP: usize = 64;
    const SLOW: usize = 200;
    const PROBES: usize = 20;
    // A header timeout far beyond the test: only eviction can make room.
    let limits = ServiceLimits {
        max_connections: CAP,
        header_read_timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let server = Server::start(dev_app(), limits).await;
    let slow = Slowloris::start(server.addr, SLOW, TRICKLE).await;
    let latencies = probe_healthz(server.addr, PROBES, &slow)
        .await
        .unwrap_or_else(|failure| panic!("{failure}"));
    let (connects, closes) = slow.counts();
    // Those beyond the cap were evicted, not left waiting.
    slow.wait_for_closes((SLOW - CAP) as u64).await;
    slow.stop().await;
    server.stop().await;
    eprintln!(
        "/healthz with {SLOW} slow clients over a cap of {CAP}: median {:?}, max {:?}; {connects} slow connects, {closes} closed by the server",
        latencies[PROBES / 2],
        latencies[PROBES - 1]
    );
}

/// The incident: 4,200 slow clients against the real binary with its
/// default limits (4,096 connections, 5 s header timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_answers_while_4200_slow_clients_are_connected() {
    const SLOW: usize = 4200;
    const PROBES: usize = 20;
    ensure_open_files(SLOW as u64 + 256);
    let mut platform = PlatformProcess::spawn(
        &["--dev", "--listen", "127.0.0.1:0"],
        &[
            ("ADMIN_TOKEN", ADMIN),
            ("RUST_LOG", "warn"),
            ("NO_COLOR", "1"),
        ],
    );
    // A byte every second: the idle timer of old restarted on each.
    let (latencies, connects, closes) =
        probe_the_binary(&mut platform, SLOW, Duration::from_secs(1), PROBES).await;
    eprintln!(
        "real binary, /healthz with {SLOW} slow clients: median {:?}, max {:?}; {connects} slow connects, {closes} closed by the server",
        latencies[PROBES / 2],
        latencies[PROBES - 1]
    );
    let stderr = platform.stderr();
    assert!(
        stderr.contains("slow clients"),
        "a summary warning:\n{stderr}"
    );
    assert_no_secrets("stderr", &stderr, &[ADMIN.into()]);
}

/// Out of file descriptors before the cap: `accept` fails with EMFILE, and
/// the connection that waited longest for a head is closed to make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_answers_when_slow_clients_exhaust_its_open_file_limit() {
    const NOFILE: u32 = 64;
    // Fewer than the descriptors plus the standard library's listen backlog
    // of 128, so that all of them connect even where the server stops
    // accepting.
    const SLOW: usize = 150;
    const PROBES: usize = 20;
    let mut platform = PlatformProcess::spawn_command(PlatformProcess::command_with_nofile(
        NOFILE,
        &["--dev", "--listen", "127.0.0.1:0"],
        &[("ADMIN_TOKEN", ADMIN), ("NO_COLOR", "1")],
    ));
    let (latencies, connects, closes) =
        probe_the_binary(&mut platform, SLOW, TRICKLE, PROBES).await;
    eprintln!(
        "real binary under `ulimit -n {NOFILE}`, /healthz with {SLOW} slow clients: median {:?}, max {:?}; {connects} slow connects, {closes} closed by the server",
        latencies[PROBES / 2],
        latencies[PROBES - 1]
    );
    let stderr = platform.stderr();
    assert!(
        summed(&stderr, "fd_exhausted") > 0 && summed(&stderr, "evicted") > 0,
        "accept hit the open-file limit and evicted slow connections:\n{stderr}"
    );
    assert!(
        !stderr.contains("accept failed"),
        "no error line per failed accept:\n{stderr}"
    );
}

/// Raises this test process's open-file limit to its hard limit, which must
/// allow `needed` descriptors (one per slow client, and some).
fn ensure_open_files(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= needed,
        "this test opens {needed} descriptors; the hard open-file limit is {hard} (raise it: ulimit -Hn)"
    );
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
}

/// `slow` slow clients trickling a byte every `trickle` at the real binary
/// while `/healthz` is probed `probes` times, then SIGTERM (exit 0): the
/// sorted latencies (failing with the platform's stderr when a probe
/// failed) and the slow clients' connects and closes.
async fn probe_the_binary(
    platform: &mut PlatformProcess,
    slow: usize,
    trickle: Duration,
    probes: usize,
) -> (Vec<Duration>, u64, u64) {
    let addr: SocketAddr = platform
        .url()
        .trim_start_matches("http://")
        .parse()
        .expect("IP:PORT");
    let slow = Slowloris::start(addr, slow, trickle).await;
    let probed = probe_healthz(addr, probes, &slow).await;
    let (connects, closes) = slow.counts();
    slow.stop().await;
    assert!(platform.stop(Signal::SIGTERM).success());
    let latencies = probed.unwrap_or_else(|failure| {
        panic!("{failure}; the platform's stderr:\n{}", platform.stderr())
    });
    (latencies, connects, closes)
}

/// A provider whose answers wait until the gate opens; counts calls.
struct GatedProvider {
    gate: watch::Receiver<bool>,
    calls: watch::Sender<u64>,
}

impl molecule_platform::TokenProvider for GatedProvider {
    fn token(&self) -> molecule_platform::provider::TokenFuture<'_> {
        Box::pin(async move {
            self.calls.send_modify(|n| *n += 1);
            let _ = self.gate.clone().wait_for(|open| *open).await;
            Ok(molecule_platform::IssuedToken {
                token: SecretString::from("ghs_gatedgatedgatedgatedgated0123"),
                expires_at: jiff::Timestamp::now() + jiff::SignedDuration::from_mins(60),
            })
        })
    }
}

/// `GET /admin/github-installation-token` on a fresh connection; the status line.
async fn admin_request(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!(
                "GET /admin/github-installation-token HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn connections_in_a_request_are_never_evicted() {
    let (gate_tx, gate) = watch::channel(false);
    let calls = watch::Sender::new(0u64);
    let served: Option<Arc<dyn TokenProvider>> = Some(Arc::new(GatedProvider {
        gate,
        calls: calls.clone(),
    }));
    let auth = Auth::new(Some(SecretString::from(ADMIN)), WorkspaceTokens::empty());
    let app = molecule_platform::app(AppState::new(served, auth));
    let limits = ServiceLimits {
        max_connections: 2,
        header_read_timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let server = Server::start(app, limits).await;
    let addr = server.addr;
    // The provider has no cache: each request is one call, so two calls
    // mean both connections are in a request.
    let first = tokio::spawn(admin_request(addr));
    let second = tokio::spawn(admin_request(addr));
    tokio::time::timeout(WAIT, calls.subscribe().wait_for(|n| *n >= 2))
        .await
        .expect("both requests reached the provider")
        .expect("counter");
    // Both slots hold a request: a third connection is closed at once
    // rather than evicting one of them or waiting in the backlog.
    let mut third = TcpStream::connect(addr).await.expect("connect");
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let read = tokio::time::timeout(WAIT, third.read(&mut [0u8; 64]))
        .await
        .expect("a connection over the cap is closed");
    assert!(closed(&read), "{read:?}");

    gate_tx.send_replace(true);
    for request in [first, second] {
        let status = tokio::time::timeout(WAIT, request)
            .await
            .expect("answered")
            .expect("task");
        assert_eq!(status, "HTTP/1.1 200 OK");
    }
    assert!(healthz(addr).await.starts_with("HTTP/1.1 200"));
    server.stop().await;
}
