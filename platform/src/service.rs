//! The HTTP endpoints and a bounded server loop.
//!
//! Routes:
//! - `GET /workspaces/{id}/github-installation-token`: that workspace's
//!   bearer or the admin bearer;
//! - `GET /admin/github-installation-token`: the admin bearer (any workspace
//!   bearer when no admin bearer is configured);
//! - `GET /healthz`.
//!
//! Answers: 200 `{"token","expires_at"}` (RFC 3339, UTC, `Z`) with
//! `Cache-Control: no-store`; 401 for a missing or wrong bearer (checked
//! before anything else, so strangers learn nothing about the setup); 404
//! when no provider is registered; 500 `token refresh failed` when the
//! provider fails, logged with a `[github]` prefix and the cause, never the
//! token. Error bodies are fixed strings: internals stay in the log.
//!
//! Every request is bounded (total time, concurrency, body size) and so is
//! every connection (count, idle time); hyper adds the `Date` header daemons
//! use to turn `expires_at` into a remaining lifetime.

use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jiff::Timestamp;
use secrecy::ExposeSecret;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::auth::{Auth, AuthError, Caller, MAX_BEARER_BYTES, valid_workspace_id};
use crate::registry::Registry;

/// Bounds on requests and connections.
#[derive(Clone, Debug)]
pub struct ServiceLimits {
    /// Longest a request may take, queueing included (then 503).
    pub request_timeout: Duration,
    /// Requests handled at once; more wait for a slot.
    pub max_concurrent_requests: usize,
    /// Largest request body accepted (then 413).
    pub max_body_bytes: usize,
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// On shutdown, how long in-flight requests may take to finish.
    pub drain_timeout: Duration,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 1024,
            max_body_bytes: 16 * 1024,
            max_connections: 4096,
            idle_timeout: Duration::from_secs(75),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// What the handlers share: the plugin registry and the bearer checks.
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use molecule_platform::{app, AppState, Auth, DevProvider, Registry, WorkspaceTokens};
///
/// let provider = Arc::new(DevProvider::new(Duration::from_secs(600)));
/// let registry = Arc::new(Registry::new());
/// registry.register(provider.clone());
/// let auth = Auth::new(Some("admin-bearer".into()), WorkspaceTokens::empty());
/// let router: axum::Router = app(AppState::new(registry, auth));
/// # let _ = (router, provider.minted());
/// ```
#[derive(Clone, Debug)]
pub struct AppState {
    registry: Arc<Registry>,
    auth: Arc<Auth>,
    limits: ServiceLimits,
}

impl AppState {
    /// State serving the first token provider in `registry`, guarded by
    /// `auth`, with default [`ServiceLimits`].
    pub fn new(registry: Arc<Registry>, auth: Auth) -> Self {
        Self {
            registry,
            auth: Arc::new(auth),
            limits: ServiceLimits::default(),
        }
    }

    /// Replaces the request limits.
    pub fn with_limits(mut self, limits: ServiceLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The plugin registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The bearer checks (to reload the workspace table on SIGHUP).
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The limits in force.
    pub fn limits(&self) -> &ServiceLimits {
        &self.limits
    }
}

/// The platform's router, with its request limits applied.
pub fn app(state: AppState) -> Router {
    let limits = state.limits.clone();
    Router::new()
        .route(
            "/workspaces/{id}/github-installation-token",
            get(workspace_token),
        )
        .route("/admin/github-installation-token", get(admin_token))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::SERVICE_UNAVAILABLE,
                    limits.request_timeout,
                ))
                .layer(GlobalConcurrencyLimitLayer::new(
                    limits.max_concurrent_requests.max(1),
                )),
        )
}

#[derive(Serialize)]
struct TokenAnswer<'a> {
    token: &'a str,
    expires_at: String,
}

#[derive(Serialize)]
struct ErrorAnswer<'a> {
    error: &'a str,
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::to_vec(&ErrorAnswer { error: message }).unwrap_or_default();
    json(status, body)
}

/// RFC 3339 in UTC with a `Z`, whole seconds (rounded down, so never later
/// than the real expiry).
pub fn format_expiry(expires_at: Timestamp) -> String {
    expires_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The bearer of an `Authorization: Bearer …` header.
fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::MissingBearer)?;
    if value.len() > MAX_BEARER_BYTES + 16 {
        return Err(AuthError::InvalidBearer);
    }
    let value = value.to_str().map_err(|_| AuthError::InvalidBearer)?;
    let (scheme, rest) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MissingBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MissingBearer);
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(AuthError::MissingBearer);
    }
    Ok(token)
}

fn refused(route: &str, workspace: Option<&str>, error: AuthError) -> Response {
    let workspace = workspace.map(|id| {
        if valid_workspace_id(id) {
            id
        } else {
            "<invalid id>"
        }
    });
    tracing::warn!(route, workspace, "request refused: {error}");
    json_error(StatusCode::UNAUTHORIZED, &error.to_string())
}

async fn workspace_token(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = bearer(&headers).and_then(|b| state.auth.authorize_workspace(&id, Some(b)));
    match caller {
        Ok(caller) => serve_token(&state, caller).await,
        Err(error) => refused("workspace", Some(&id), error),
    }
}

async fn admin_token(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let caller = bearer(&headers).and_then(|b| state.auth.authorize_admin(Some(b)));
    match caller {
        Ok(caller) => serve_token(&state, caller).await,
        Err(error) => refused("admin", None, error),
    }
}

async fn serve_token(state: &AppState, caller: Caller) -> Response {
    let Some(provider) = state.registry.first_token_provider() else {
        return json_error(StatusCode::NOT_FOUND, "no GitHub App configured");
    };
    let failed = || json_error(StatusCode::INTERNAL_SERVER_ERROR, "token refresh failed");
    let issued = match provider.token().await {
        Ok(issued) => issued,
        Err(error) => {
            tracing::error!(
                class = error.class(),
                "[github] token refresh failed: {error}"
            );
            return failed();
        }
    };
    let token = issued.token.expose_secret();
    if token.is_empty() {
        tracing::error!("[github] token refresh failed: the provider returned an empty token");
        return failed();
    }
    if issued.expires_at <= Timestamp::now() {
        tracing::error!(
            "[github] token refresh failed: the provider returned a token that expired at {}",
            issued.expires_at
        );
        return failed();
    }
    let caller = match &caller {
        Caller::Admin => "admin".to_owned(),
        Caller::Workspace(id) => format!("workspace {id}"),
    };
    tracing::debug!(
        "token served to {caller} (fingerprint {}, expires at {})",
        issued.fingerprint(),
        issued.expires_at
    );
    let answer = TokenAnswer {
        token,
        expires_at: format_expiry(issued.expires_at),
    };
    match serde_json::to_vec(&answer) {
        Ok(body) => json(StatusCode::OK, body),
        Err(_) => failed(),
    }
}

async fn healthz() -> Response {
    json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec())
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not found")
}

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
pub async fn serve_with_limits(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: &ServiceLimits,
) -> io::Result<()> {
    let listener = BoundedListener {
        inner: listener,
        permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
        idle_timeout: limits.idle_timeout,
    };
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    };
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .into_future();
    let drain = limits.drain_timeout;
    tokio::select! {
        result = server => result,
        () = async move {
            match stopping_rx.await {
                Ok(()) => tokio::time::sleep(drain).await,
                Err(_) => std::future::pending().await,
            }
        } => {
            tracing::warn!("requests still in flight {} after shutdown began; closing them", humantime::format_duration(drain));
            Ok(())
        }
    }
}

/// A listener that holds at most `permits` connections open and gives each
/// an idle deadline.
struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    idle_timeout: Duration,
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = match Arc::clone(&self.permits).acquire_owned().await {
            Ok(permit) => permit,
            // The semaphore is never closed; should it be, stop accepting.
            Err(_) => std::future::pending().await,
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (BoundedStream::new(stream, permit, self.idle_timeout), addr);
                }
                Err(error) => {
                    // Per-connection errors (reset before accept) are routine;
                    // resource errors (EMFILE) need a pause to avoid spinning.
                    if !matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) {
                        tracing::error!("accept failed: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection holding its slot, closed after `idle` without traffic.
struct BoundedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl BoundedStream {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, idle: Duration) -> Self {
        Self {
            stream,
            _permit: permit,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn touch(&mut self) {
        let next = Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }
}

impl AsyncRead for BoundedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.touch();
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        if result.is_ready() {
            this.touch();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if result.is_ready() {
            this.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_rfc3339_utc_whole_seconds() {
        let t: Timestamp = "2030-01-02T03:04:05.9+02:00".parse().unwrap();
        assert_eq!(format_expiry(t), "2030-01-02T01:04:05Z");
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Err(AuthError::MissingBearer));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), Err(AuthError::MissingBearer));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Ok("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), Err(AuthError::MissingBearer));
        let long = format!("Bearer {}", "a".repeat(MAX_BEARER_BYTES + 100));
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&long).unwrap());
        assert_eq!(bearer(&h), Err(AuthError::InvalidBearer));
    }
}
