//! A background HTTP server on loopback.
//!
//! Why: the doubles (the platform, git's backend, GitHub's token API) serve
//! real HTTP on 127.0.0.1 — never another interface — from a thread and
//! runtime of their own, so a test may block (waiting on a child, say)
//! without stalling them. Stopping one drops its runtime, and with it every
//! open connection: clients see a reset, new ones are refused.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

use axum::Router;

/// `app` served on a loopback listener until stopped or dropped.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `app` on a fresh port of 127.0.0.1.
    pub fn start(app: Router) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        Self::serve(listener, app)
    }

    /// Serves `app` on `listener` (bound by the caller, to a loopback
    /// address: a port reserved earlier, say).
    pub fn serve(listener: TcpListener, app: Router) -> Self {
        Self::run(listener, |listener| async move {
            axum::serve(listener, app).await.expect("HTTP server");
        })
    }

    /// Serves `app` over TLS with `tls` on a fresh port of 127.0.0.1 (HTTP/1.1).
    pub fn start_tls(app: Router, tls: Arc<rustls::ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        Self::run(listener, |listener| async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        })
    }

    /// Runs `serve` on `listener` (loopback only) on a thread and runtime of
    /// its own until stopped or dropped.
    fn run<F, Fut>(listener: TcpListener, serve: F) -> Self
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let addr = listener.local_addr().expect("listener address");
        assert!(
            addr.ip().is_loopback(),
            "test servers listen on loopback only, not {addr}"
        );
        listener.set_nonblocking(true).expect("nonblocking");
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("server runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::select! {
                    () = serve(listener) => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops every connection task.
            drop(runtime);
        });
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving, closing every connection; panics if the server
    /// thread did.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("HTTP server thread");
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A loopback address nothing listens on (bound, then released).
pub fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.local_addr().expect("local addr")
}
