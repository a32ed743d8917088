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
//!    token stamped, and the request forwarded ([`upstream`]) over TLS (system roots) to
//!    the real host on a pooled connection; bodies stream both ways, no
//!    redirect is followed (a 3xx goes back to the client, whose next
//!    request meets these same rules).
//! 6. A 401 from GitHub erases that token (as git's `erase` does: dropped,
//!    reported to the platform), and a request without a body is sent once
//!    more with the fresh token.
//! 7. One audit line per request when its response body ends ([`audit`],
//!    target `audit`): uid, method, host, repository, status, bytes each way, the
//!    token's fingerprint — never the token.

mod audit;
mod peer;
pub(crate) mod route;
mod tls;
mod upstream;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use credd_core::protocol::ErrorCode;
use credd_core::secret::Token;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::audit::{Audit, Counted};
use self::route::{Refusal, Route, Site};
use self::upstream::{Outbound, Upstream};
use crate::answer;
use crate::cache::{Fetch, Got, Sha256Hex, TokenStore};
use crate::server::PeerCheck;
use credd_core::protocol::Which;

/// Tunnels open at once; more callers are dropped at accept.
const MAX_CONNECTIONS: usize = 256;
/// A client's request head (the `CONNECT`, then each request in the tunnel)
/// must arrive within this.
const HEAD_DEADLINE: Duration = Duration::from_secs(30);
/// The TLS handshake with the client.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
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
        let client = upstream::client(upstream_tls, &options.upstream);
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
    fn get(&self, want: &Which) -> impl Future<Output = Got> + Send;
    /// GitHub refused this token.
    fn refused(&self, token: &Token);
}

impl<F: Fetch> TokenSource for TokenStore<F> {
    fn get(&self, want: &Which) -> impl Future<Output = Got> + Send {
        TokenStore::get(self, want)
    }

    fn refused(&self, token: &Token) {
        let _ = self.erase(&Sha256Hex::of(token));
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;
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
    tokio::spawn(tunnel(request, server, site, uid, shared));
    audit.note_connect();
    Response::new(empty())
}

/// The tunnel a `CONNECT` opened: TLS with the site's leaf certificate
/// (the client's SNI must name the site), then each request in it.
async fn tunnel<T: TokenSource>(
    request: Request<Incoming>,
    server: Arc<ServerConfig>,
    site: Site,
    uid: Option<u32>,
    shared: Arc<Shared<T>>,
) {
    let upgraded = match hyper::upgrade::on(request).await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "gateway: CONNECT upgrade failed");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let tls =
        match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(TokioIo::new(upgraded)))
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
    let token = match token_for(shared, &route).await {
        Ok(token) => token,
        Err(refusal) => return audit.refuse(&refusal),
    };
    audit.fingerprint = Some(token.fingerprint());
    let (parts, body) = request.into_parts();
    let outbound = Outbound {
        method: parts.method,
        target: format!("https://{}{path_and_query}", site.authority),
        authority: &site.authority,
        headers: route::forwarded_headers(&parts.headers),
        stamp: route.stamp,
    };
    let bodyless = body.is_end_stream();
    let sent = Arc::new(AtomicU64::new(0));
    let body = Counted::new(body, Arc::clone(&sent)).boxed();
    let mut answer = upstream::forward(&shared.client, &outbound, &token, body).await;
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
        shared.tokens.refused(&token);
        if bodyless
            && let Ok(fresh) = token_for(shared, &route).await
            && fresh != token
        {
            audit.fingerprint = Some(fresh.fingerprint());
            answer = upstream::forward(&shared.client, &outbound, &fresh, empty()).await;
        }
    }
    match answer {
        Ok(response) => Counted::answer(response, sent, audit),
        Err(refusal) => audit.refuse(&refusal),
    }
}

/// The token `route` needs, or the answer to give instead.
async fn token_for<T: TokenSource>(shared: &Shared<T>, route: &Route) -> Result<Token, Refusal> {
    match shared.tokens.get(&route.want).await {
        Got::Token(served) => Ok(served.token),
        Got::NotGranted(why) => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "outside this workspace's grant: {}",
                answer::not_granted(&why)
            ),
        )),
        Got::Unavailable(why) => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no token to stamp ({}: {})",
                ErrorCode::Unavailable,
                answer::unavailable(&why)
            ),
        )),
    }
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}
