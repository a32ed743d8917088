//! The sealed workspace's credential gateway: an HTTPS proxy on loopback
//! that stamps the workspace's GitHub token onto requests bound for GitHub,
//! so the agent uses the token without ever holding it.
//!
//! Why in the daemon (a mode of `molecule-credd`, `--gateway`) rather than a
//! binary of its own: the gateway needs exactly what the daemon already has
//! — the per-owner token store with its refresh, scope checks, single
//! flight and refusal reports — and asking it in-process costs nothing, where
//! a separate binary would need a socket round trip per request, the socket
//! opened to a second uid and a second process to supervise, harden and
//! keep non-dumpable. The daemon already links rustls, hyper and tokio (its
//! platform client), so the gateway adds little code to the binary. The
//! cost: a gateway bug shares the daemon's process; its requests run as
//! tasks on the daemon's one thread (a `get` on the socket still answers in
//! microseconds between two body chunks).
//!
//! A request's path through it:
//!
//! 1. Accept on `127.0.0.1:PORT`; the caller's uid from the kernel's socket
//!    table ([`peer`]) must be the daemon's own or an `--allow-uid`.
//! 2. Only `CONNECT HOST:PORT` to a GitHub host ([`route::sites`]:
//!    `CREDD_HOSTS` and github.com's API hosts) is accepted; any other
//!    method or host is answered 403 and nothing is connected to.
//! 3. TLS is terminated with that host's leaf certificate ([`tls`]); the
//!    client's SNI must name the same host.
//! 4. Each request in the tunnel: `Host` (and any absolute-form target)
//!    must be the tunnel's host; the path must be canonical and a git, LFS
//!    or API route, never a token-management one ([`route::classify`]);
//!    the token is chosen by the path's owner from the token store — a
//!    repository outside the grant is answered 403 with the reason before
//!    anything is sent upstream.
//! 5. The client's credentials and hop-by-hop headers are dropped, the
//!    token stamped, and the request forwarded over TLS (system roots) to
//!    the real host on a pooled connection; bodies stream both ways, no
//!    redirect is followed (a 3xx goes back to the client, whose next
//!    request meets these same rules).
//! 6. A 401 from GitHub erases that token (as git's `erase` does: dropped,
//!    reported to the platform), and a request without a body is sent once
//!    more with the fresh token.
//! 7. One audit line per request when its response body ends (target
//!    `audit`): uid, method, host, repository, status, bytes each way, the
//!    token's fingerprint — never the token.

mod peer;
pub(crate) mod route;
mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use credd_core::protocol::{ErrorCode, Response as DaemonAnswer};
use credd_core::secret::Token;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::route::{Refusal, Route, Site};
use crate::cache::{Fetch, Tokens, Want};
use crate::server::PeerCheck;

/// Tunnels open at once; more callers are dropped at accept.
const MAX_CONNECTIONS: usize = 256;
/// A client's request head (the `CONNECT`, then each request in the tunnel)
/// must arrive within this.
const HEAD_DEADLINE: Duration = Duration::from_secs(30);
/// The TLS handshake with the client.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// TCP connect to GitHub.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// GitHub's response head (a large fetch's negotiation can take a while).
const RESPONSE_DEADLINE: Duration = Duration::from_secs(300);
/// Idle pooled connections to GitHub are closed after this.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// What `--gateway` and its companion flags ask for.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Where to listen (loopback only).
    pub listen: SocketAddr,
    /// Where to write the CA certificate the tools trust.
    pub ca_file: PathBuf,
    /// An extra CA (PEM) to trust upstream besides the system's roots.
    pub extra_ca: Option<PathBuf>,
    /// Connect to this address instead of resolving the host (tests).
    pub upstream: Vec<(String, SocketAddr)>,
}

/// A gateway ready to serve: bound, certificates made, CA file written.
pub struct Gateway {
    listener: std::net::TcpListener,
    sites: Vec<Site>,
    servers: HashMap<String, Arc<ServerConfig>>,
    client: Upstream,
    peer_check: PeerCheck,
}

impl Gateway {
    /// Binds, makes the CA and leaves, writes the CA file. Runs before the
    /// async runtime, so a bad flag stops the daemon at start.
    pub(crate) fn prepare(
        options: &GatewayOptions,
        hosts: &[String],
        peer_check: PeerCheck,
    ) -> anyhow::Result<Self> {
        if !options.listen.ip().is_loopback() {
            bail!(
                "--gateway must listen on a loopback address, not {}",
                options.listen
            );
        }
        let sites = route::sites(hosts);
        let certificates = tls::certificates(&sites)?;
        let upstream_tls = tls::upstream_config(options.extra_ca.as_deref())?;
        let listener = std::net::TcpListener::bind(options.listen)
            .with_context(|| format!("cannot listen on {}", options.listen))?;
        listener.set_nonblocking(true)?;
        tls::write_ca(&options.ca_file, &certificates.ca_pem)?;
        let dial = Dial {
            overrides: Arc::new(
                options
                    .upstream
                    .iter()
                    .map(|(host, addr)| (route::normalise_authority(host), *addr))
                    .collect(),
            ),
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(upstream_tls)
            .https_only()
            .enable_http1()
            .wrap_connector(dial);
        let client: Upstream = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            listener,
            sites,
            servers: certificates.servers,
            client,
            peer_check,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// What the gateway asks of the token store.
pub(crate) trait TokenSource: Send + Sync + 'static {
    /// A token for `want`, or why not.
    fn get(&self, want: &Want) -> impl Future<Output = DaemonAnswer> + Send;
    /// GitHub refused the token with this SHA-256.
    fn refused(&self, sha256: &str);
}

impl<F: Fetch> TokenSource for Tokens<F> {
    fn get(&self, want: &Want) -> impl Future<Output = DaemonAnswer> + Send {
        Tokens::get(self, want)
    }

    fn refused(&self, sha256: &str) {
        let _ = self.erase(sha256);
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;
type Upstream = Client<HttpsConnector<Dial>, ProxyBody>;

struct Shared<T> {
    tokens: Arc<T>,
    sites: Vec<Site>,
    servers: HashMap<String, Arc<ServerConfig>>,
    client: Upstream,
}

/// Serves until `stop`, then closes every tunnel.
pub(crate) async fn serve<T: TokenSource>(
    gateway: Gateway,
    tokens: Arc<T>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let local = gateway.listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(gateway.listener)?;
    let shared = Arc::new(Shared {
        tokens,
        sites: gateway.sites,
        servers: gateway.servers,
        client: gateway.client,
    });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    tracing::info!(
        "gateway listening on {local} for {}",
        shared
            .sites
            .iter()
            .map(|s| s.authority.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "gateway: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let uid = peer::uid_of(peer, local);
        if !uid.is_some_and(|uid| gateway.peer_check.allows(uid)) {
            tracing::warn!(
                target: "audit",
                uid = uid.map_or(-1, i64::from),
                "gateway: refused a caller whose uid may not use it"
            );
            continue;
        }
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!("gateway: {MAX_CONNECTIONS} tunnels open already; dropped a caller");
            continue;
        };
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = serve_client(stream, uid, shared) => {}
            }
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// One client connection: its `CONNECT`, then the tunnel.
async fn serve_client<T: TokenSource>(stream: TcpStream, uid: Option<u32>, shared: Arc<Shared<T>>) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(outer(request, uid, shared)) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_DEADLINE)
        .keep_alive(false);
    if let Err(error) = http
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(%error, "gateway: a client connection ended with an error");
    }
}

/// The proxy's own request: `CONNECT` to a GitHub host, or a refusal.
fn outer<T: TokenSource>(
    request: Request<Incoming>,
    uid: Option<u32>,
    shared: Arc<Shared<T>>,
) -> Response<ProxyBody> {
    let audit = Audit {
        uid,
        method: request.method().clone(),
        host: request
            .uri()
            .authority()
            .map_or_else(|| "-".to_owned(), |a| a.as_str().to_owned()),
        repository: "-".to_owned(),
        fingerprint: None,
    };
    if request.method() != Method::CONNECT {
        let refusal = Refusal::new(
            StatusCode::FORBIDDEN,
            "this gateway only tunnels HTTPS to GitHub hosts (CONNECT HOST:443); plain or absolute-form requests are refused",
        );
        return audit.refuse(&refusal);
    }
    let Some(site) = request
        .uri()
        .authority()
        .map(|a| route::normalise_authority(a.as_str()))
        .and_then(|a| shared.sites.iter().find(|s| s.authority == a).cloned())
    else {
        let refusal = Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} is not a GitHub host this gateway serves; it is not a general proxy",
                audit.host
            ),
        );
        return audit.refuse(&refusal);
    };
    let Some(server) = shared.servers.get(&site.authority).cloned() else {
        return audit.refuse(&Refusal::new(StatusCode::BAD_GATEWAY, "no certificate"));
    };
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(request).await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "gateway: CONNECT upgrade failed");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let tls = match tokio::time::timeout(
            HANDSHAKE_DEADLINE,
            acceptor.accept(TokioIo::new(upgraded)),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::debug!(%error, host = %site.authority, "gateway: TLS handshake failed");
                return;
            }
            Err(_) => return,
        };
        if let Some(sni) = tls.get_ref().1.server_name()
            && !sni.eq_ignore_ascii_case(site.host())
        {
            tracing::warn!(
                target: "audit",
                uid = uid.map_or(-1, i64::from),
                host = %site.authority,
                sni,
                "gateway: refused a tunnel whose TLS name is another host"
            );
            return;
        }
        let site = Arc::new(site);
        let service = hyper::service::service_fn(move |request| {
            let shared = Arc::clone(&shared);
            let site = Arc::clone(&site);
            async move { Ok::<_, Infallible>(inner(request, uid, &site, &shared).await) }
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEAD_DEADLINE);
        if let Err(error) = http.serve_connection(TokioIo::new(tls), service).await {
            tracing::debug!(%error, "gateway: a tunnel ended with an error");
        }
    });
    audit.note_connect();
    Response::new(empty())
}

/// One request inside a tunnel.
async fn inner<T: TokenSource>(
    request: Request<Incoming>,
    uid: Option<u32>,
    site: &Site,
    shared: &Shared<T>,
) -> Response<ProxyBody> {
    let mut audit = Audit {
        uid,
        method: request.method().clone(),
        host: site.authority.clone(),
        repository: "-".to_owned(),
        fingerprint: None,
    };
    let uri = request.uri();
    if let Err(refusal) =
        route::check_target(site, uri.authority(), uri.scheme_str(), request.headers())
    {
        return audit.refuse(&refusal);
    }
    if request.method() == Method::CONNECT {
        return audit.refuse(&Refusal::new(
            StatusCode::FORBIDDEN,
            "CONNECT inside a tunnel is refused",
        ));
    }
    let route = match route::classify(site.kind, request.method(), uri.path()) {
        Ok(route) => route,
        Err(refusal) => return audit.refuse(&refusal),
    };
    audit.repository = route.repository();
    let path_and_query = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let target = format!("https://{}{path_and_query}", site.authority);
    let token = match token_for(shared, &route).await {
        Ok(token) => token,
        Err(refusal) => return audit.refuse(&refusal),
    };
    audit.fingerprint = Some(token.fingerprint());
    let (parts, body) = request.into_parts();
    let headers = route::forwarded_headers(&parts.headers);
    let bodyless = body.is_end_stream();
    let sent = Arc::new(AtomicU64::new(0));
    let body = Counted {
        inner: body,
        count: Arc::clone(&sent),
    }
    .boxed();

    let mut answer = forward(
        shared,
        &parts.method,
        &target,
        site,
        &headers,
        &route,
        &token,
        body,
    )
    .await;
    if let Ok(response) = &answer
        && response.status() == StatusCode::UNAUTHORIZED
    {
        // As git's `erase`: drop it and report it, so the next request gets
        // a fresh token rather than the platform's cached one.
        tracing::warn!(
            host = %site.authority,
            repository = %audit.repository,
            fingerprint = %token.fingerprint(),
            "gateway: GitHub refused a token (401); erased it"
        );
        shared.tokens.refused(&token.sha256_hex());
        if bodyless
            && let Ok(fresh) = token_for(shared, &route).await
            && fresh != token
        {
            audit.fingerprint = Some(fresh.fingerprint());
            answer = forward(
                shared,
                &parts.method,
                &target,
                site,
                &headers,
                &route,
                &fresh,
                empty(),
            )
            .await;
        }
    }
    match answer {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            route::strip_response_headers(&mut parts.headers);
            let status = parts.status;
            let body = Audited {
                inner: body,
                received: 0,
                sent,
                status,
                audit: Some(audit),
            };
            Response::from_parts(parts, body.boxed())
        }
        Err(refusal) => audit.refuse(&refusal),
    }
}

/// The token `route` needs, or the answer to give instead.
async fn token_for<T: TokenSource>(shared: &Shared<T>, route: &Route) -> Result<Token, Refusal> {
    match shared.tokens.get(&route.want).await {
        DaemonAnswer::Token { token, .. } => Ok(token),
        DaemonAnswer::Error {
            code: ErrorCode::NotGranted,
            message,
        } => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("outside this workspace's grant: {message}"),
        )),
        DaemonAnswer::Error { code, message } => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no token to stamp ({code}: {message})"),
        )),
        _ => Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            "the token store answered something other than a token",
        )),
    }
}

/// Sends the request upstream with `token` stamped.
#[allow(clippy::too_many_arguments)]
async fn forward<T: TokenSource>(
    shared: &Shared<T>,
    method: &Method,
    target: &str,
    site: &Site,
    headers: &http::HeaderMap,
    route: &Route,
    token: &Token,
    body: ProxyBody,
) -> Result<Response<Incoming>, Refusal> {
    let mut request = Request::builder()
        .method(method.clone())
        .uri(target)
        .body(body)
        .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "the request target is not a URI"))?;
    *request.headers_mut() = headers.clone();
    let host = HeaderValue::from_str(&site.authority)
        .map_err(|_| Refusal::new(StatusCode::BAD_GATEWAY, "host"))?;
    request.headers_mut().insert(header::HOST, host);
    let stamp = zeroize::Zeroizing::new(route.stamp.header_value(token.expose()));
    let mut value = HeaderValue::from_str(&stamp).map_err(|_| {
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            "the token cannot be sent in a header",
        )
    })?;
    value.set_sensitive(true);
    request.headers_mut().insert(header::AUTHORIZATION, value);
    match tokio::time::timeout(RESPONSE_DEADLINE, shared.client.request(request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(error)) => {
            tracing::warn!(
                host = %site.authority,
                error = %credd_core::text::error_chain(&error),
                "gateway: GitHub could not be reached"
            );
            Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                format!("{} could not be reached", site.authority),
            ))
        }
        Err(_) => Err(Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "{} gave no answer within {} s",
                site.authority,
                RESPONSE_DEADLINE.as_secs()
            ),
        )),
    }
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// What one audit line says.
struct Audit {
    uid: Option<u32>,
    method: Method,
    host: String,
    repository: String,
    fingerprint: Option<String>,
}

impl Audit {
    /// A request answered by the gateway itself.
    fn refuse(self, refusal: &Refusal) -> Response<ProxyBody> {
        tracing::info!(
            target: "audit",
            uid = self.uid.map_or(-1, i64::from),
            method = %self.method,
            host = %credd_core::text::one_line(&self.host, 256),
            repository = %self.repository,
            status = refusal.status.as_u16(),
            refused = %refusal.reason,
            "gateway request"
        );
        let mut response = Response::new(
            Full::new(Bytes::from(format!("credd gateway: {}\n", refusal.reason)))
                .map_err(|never| match never {})
                .boxed(),
        );
        *response.status_mut() = refusal.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }

    fn note_connect(&self) {
        tracing::debug!(
            uid = self.uid.map_or(-1, i64::from),
            host = %self.host,
            "gateway: tunnel opened"
        );
    }

    fn log(&self, status: StatusCode, sent: u64, received: u64) {
        tracing::info!(
            target: "audit",
            uid = self.uid.map_or(-1, i64::from),
            method = %self.method,
            host = %self.host,
            repository = %self.repository,
            status = status.as_u16(),
            sent,
            received,
            fingerprint = self.fingerprint.as_deref().unwrap_or("-"),
            "gateway request"
        );
    }
}

/// A request body that counts what passes through.
struct Counted {
    inner: Incoming,
    count: Arc<AtomicU64>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts what passes through and writes the audit
/// line when it is done (or dropped: the client went away).
struct Audited {
    inner: Incoming,
    received: u64,
    sent: Arc<AtomicU64>,
    status: StatusCode,
    audit: Option<Audit>,
}

impl Body for Audited {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Audited {
    fn finish(&mut self) {
        if let Some(audit) = self.audit.take() {
            audit.log(
                self.status,
                self.sent.load(Ordering::Relaxed),
                self.received,
            );
        }
    }
}

impl Drop for Audited {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Connects to GitHub: the host resolved by the system, or the override
/// `--gateway-upstream` names for it (tests).
#[derive(Clone)]
struct Dial {
    overrides: Arc<HashMap<String, SocketAddr>>,
}

impl tower_service::Service<http::Uri> for Dial {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let overrides = Arc::clone(&self.overrides);
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::other("no host"))?
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let authority = route::normalise_authority(&format!("{host}:{port}"));
            let connect = async {
                match overrides.get(&authority) {
                    Some(addr) => TcpStream::connect(addr).await,
                    None => TcpStream::connect((host.trim_matches(['[', ']']), port)).await,
                }
            };
            let stream = tokio::time::timeout(CONNECT_DEADLINE, connect)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            let _ = stream.set_nodelay(true);
            Ok(TokioIo::new(stream))
        })
    }
}
