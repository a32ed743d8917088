//! The accept loop: hyper's HTTP/1 connections driven by hand, so that
//! each connection's state is known (see the module above for why), with
//! the connection cap, eviction and drain of [`ServiceLimits`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

use super::ServiceLimits;
use super::connections::{
    AuthRefusals, ConnHandle, ConnIo, Connections, Expiry, LOG_SUMMARY_INTERVAL,
};

/// Serves `app` on `listener` with default [`ServiceLimits`] until
/// `shutdown` completes, then drains in-flight requests (bounded).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_with_limits(listener, app, shutdown, &ServiceLimits::default()).await
}

/// Like [`serve`], with the connection limits and drain time of `limits`.
///
/// Accepting never waits for a free slot: at [`ServiceLimits::max_connections`]
/// a new connection evicts the one that has waited longest for a request
/// head (see the `connections` module), so slow clients cannot lock real
/// ones out. Returns once every connection has finished after `shutdown`, or
/// after [`ServiceLimits::drain_timeout`] (closing what is left).
pub async fn serve_with_limits(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: &ServiceLimits,
) -> io::Result<()> {
    let connections = Arc::new(Connections::new(limits));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true)
        // Heads are timed by `connections` (hyper's timer would also cut
        // kept-alive connections idle between requests).
        .header_read_timeout(None)
        .max_buf_size(limits.max_head_bytes.max(MIN_HEAD_BUFFER));
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut report =
        tokio::time::interval_at(Instant::now() + LOG_SUMMARY_INTERVAL, LOG_SUMMARY_INTERVAL);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(error) = joined
                    && error.is_panic()
                {
                    tracing::error!("a connection task panicked");
                }
            }
            _ = report.tick() => connections.report(),
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let Some(handle) = connections.admit() else {
                        // Every slot holds a request: refuse this one.
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let service = TrackedService {
                        router: app.clone(),
                        handle: Arc::clone(&handle),
                        auth_refusals: Arc::clone(connections.auth_refusals()),
                    };
                    let io = TokioIo::new(ConnIo::new(stream, Arc::clone(&handle)));
                    let conn = http.serve_connection(io, service);
                    start(Box::pin(drive(conn, handle, stopping.clone())), &mut tasks).await;
                }
                Err(error) => accept_failed(&error, &connections, &mut tasks).await,
            },
        }
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    drain(tasks, limits.drain_timeout).await;
    connections.report();
    Ok(())
}

/// Starts one connection's task, polling it once here, before accepting
/// more: a real client's head is usually waiting already, and once it is
/// read the connection is busy and cannot be evicted, however late its
/// task is scheduled. (Its wakers move to the task when the task polls it.)
async fn start(
    mut task: Pin<Box<impl Future<Output = ()> + Send + 'static>>,
    tasks: &mut JoinSet<()>,
) {
    let finished =
        std::future::poll_fn(|cx| std::task::Poll::Ready(task.as_mut().poll(cx).is_ready())).await;
    if !finished {
        tasks.spawn(task);
    }
    // Then let other tasks run — a head that arrives a moment after the
    // connection must be read before the accepts that follow could evict it.
    tokio::task::yield_now().await;
}

/// What a failed `accept` does: out of file descriptors, close the
/// connection that has waited longest for a head and wait for its task (or
/// any) to end; a connection reset before it was accepted is routine; any
/// other failure is logged and paced.
async fn accept_failed(error: &io::Error, connections: &Connections, tasks: &mut JoinSet<()>) {
    if is_fd_exhaustion(error) && connections.evict_for_fd() {
        let _ = tokio::time::timeout(ACCEPT_BACKOFF, tasks.join_next()).await;
        return;
    }
    let routine = matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    );
    if is_fd_exhaustion(error) || !routine {
        tracing::error!("accept failed: {error}");
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}

/// Waits for every connection to finish, at most `drain`; then closes
/// what is left.
async fn drain(mut tasks: JoinSet<()>, drain: Duration) {
    let drained =
        tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            "requests still in flight {} after shutdown began; closing them",
            humantime::format_duration(drain)
        );
        tasks.shutdown().await;
    }
}

/// hyper's smallest read buffer (it refuses less).
const MIN_HEAD_BUFFER: usize = 8192;

/// Pause after `accept` fails for want of resources.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// `EMFILE`/`ENFILE`: out of file descriptors (a connection can free one).
fn is_fd_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == nix::errno::Errno::EMFILE as i32 || code == nix::errno::Errno::ENFILE as i32
    )
}

/// One HTTP/1 connection as hyper drives it.
type Connection = hyper::server::conn::http1::Connection<TokioIo<ConnIo>, TrackedService>;

/// Runs one connection until it ends, its deadline passes or it is evicted;
/// once shutdown begins, it closes after the request in flight (if any).
async fn drive(
    conn: Connection,
    handle: Arc<ConnHandle>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    loop {
        let Some(deadline) = handle.deadline() else {
            // Evicted: dropping the connection closes it.
            return;
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!("connection ended: {error}");
                }
                return;
            }
            () = handle.wake().notified() => {}
            () = sleep_until_some(deadline) => {
                if let Expiry::Close = handle.expire() {
                    return;
                }
            }
            _ = stopping.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The router for one connection, marking it busy while a request is
/// handled (from its complete head until the answer is handed to hyper),
/// and handing the handlers where to count unauthenticated requests.
#[derive(Clone)]
struct TrackedService {
    router: Router,
    handle: Arc<ConnHandle>,
    auth_refusals: Arc<AuthRefusals>,
}

impl hyper::service::Service<axum::http::Request<hyper::body::Incoming>> for TrackedService {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn call(&self, mut request: axum::http::Request<hyper::body::Incoming>) -> Self::Future {
        request
            .extensions_mut()
            .insert(Arc::clone(&self.auth_refusals));
        let guard = self.handle.start_request();
        let answer = self.router.clone().oneshot(request);
        Box::pin(async move {
            let response = answer.await;
            drop(guard);
            response
        })
    }
}
