//! The gateway's side toward GitHub: one pooled HTTPS client (system roots,
//! connect and response deadlines) and the one function that stamps a
//! token onto a request and sends it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use credd_core::secret::Token;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::ProxyBody;
use super::route::{self, Refusal, Stamp};

/// TCP connect to GitHub.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// GitHub's response head (a large fetch's negotiation can take a while).
const RESPONSE_DEADLINE: Duration = Duration::from_secs(300);

/// Idle pooled connections to GitHub are closed after this.
const POOL_IDLE: Duration = Duration::from_secs(60);

pub(super) type Upstream = Client<HttpsConnector<Dial>, ProxyBody>;

/// Connects to GitHub: the host resolved by the system, or the override
/// `--gateway-upstream` names for it (tests).
#[derive(Clone)]
pub(super) struct Dial {
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

/// One request as it goes upstream, without its token and body: built
/// once per client request, so a retry after a 401 sends the same thing.
pub(super) struct Outbound<'a> {
    pub(super) method: Method,
    pub(super) target: String,
    pub(super) authority: &'a str,
    pub(super) headers: http::HeaderMap,
    pub(super) stamp: Stamp,
}

/// Sends `outbound` upstream with `token` stamped.
pub(super) async fn forward(
    client: &Upstream,
    outbound: &Outbound<'_>,
    token: &Token,
    body: ProxyBody,
) -> Result<Response<Incoming>, Refusal> {
    let authority = outbound.authority;
    let mut request = Request::builder()
        .method(outbound.method.clone())
        .uri(&outbound.target)
        .body(body)
        .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "the request target is not a URI"))?;
    *request.headers_mut() = outbound.headers.clone();
    let host = HeaderValue::from_str(authority)
        .map_err(|_| Refusal::new(StatusCode::BAD_GATEWAY, "host"))?;
    request.headers_mut().insert(header::HOST, host);
    let stamp = zeroize::Zeroizing::new(outbound.stamp.header_value(token.expose()));
    let mut value = HeaderValue::from_str(&stamp).map_err(|_| {
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            "the token cannot be sent in a header",
        )
    })?;
    value.set_sensitive(true);
    request.headers_mut().insert(header::AUTHORIZATION, value);
    match tokio::time::timeout(RESPONSE_DEADLINE, client.request(request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(error)) => {
            tracing::warn!(
                host = %authority,
                error = %credd_core::text::error_chain(&error),
                "gateway: GitHub could not be reached"
            );
            Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                format!("{authority} could not be reached"),
            ))
        }
        Err(_) => Err(Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "{authority} gave no answer within {} s",
                RESPONSE_DEADLINE.as_secs()
            ),
        )),
    }
}

/// The pooled HTTPS client to GitHub: `tls` (system roots, plus the extra
/// CA when given), HTTP/1, connecting through `overrides` where they name
/// the host.
pub(super) fn client(tls: rustls::ClientConfig, overrides: &[(String, SocketAddr)]) -> Upstream {
    let dial = Dial {
        overrides: Arc::new(
            overrides
                .iter()
                .map(|(host, addr)| (route::normalise_authority(host), *addr))
                .collect(),
        ),
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(dial);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}
