//! The audit trail: one line per request (uid, method, host, repository,
//! status, bytes each way, the token's fingerprint — never the token),
//! written when the answer's body ends or the client goes away.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::ProxyBody;
use super::route::{self, Refusal};

/// What one audit line says.
pub(super) struct Audit {
    pub(super) uid: Option<u32>,
    pub(super) method: Method,
    pub(super) host: String,
    pub(super) repository: String,
    pub(super) fingerprint: Option<String>,
}

impl Audit {
    /// A request answered by the gateway itself.
    pub(super) fn refuse(self, refusal: &Refusal) -> Response<ProxyBody> {
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

    pub(super) fn note_connect(&self) {
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

/// A body that counts the bytes passing through. A response's also writes
/// the audit line when it ends, or is dropped (the client went away).
pub(super) struct Counted {
    inner: Incoming,
    count: Arc<AtomicU64>,
    line: Option<AuditLine>,
}

/// What a response's audit line needs besides its own count.
struct AuditLine {
    audit: Audit,
    status: StatusCode,
    /// The request body's count.
    sent: Arc<AtomicU64>,
}

impl Counted {
    /// A request body `inner`, counted into `count`.
    pub(super) fn new(inner: Incoming, count: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            count,
            line: None,
        }
    }

    /// GitHub's `response`, its headers stripped as for any answer, with a
    /// body that writes `audit`'s line (with `sent`, the request body's
    /// count) when it ends.
    pub(super) fn answer(
        response: Response<Incoming>,
        sent: Arc<AtomicU64>,
        audit: Audit,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        route::strip_response_headers(&mut parts.headers);
        let body = Self {
            inner: body,
            count: Arc::new(AtomicU64::new(0)),
            line: Some(AuditLine {
                audit,
                status: parts.status,
                sent,
            }),
        };
        Response::from_parts(parts, body.boxed())
    }

    fn finish(&mut self) {
        if let Some(line) = self.line.take() {
            line.audit.log(
                line.status,
                line.sent.load(Ordering::Relaxed),
                self.count.load(Ordering::Relaxed),
            );
        }
    }
}

impl Body for Counted {
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
                    self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
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

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}
