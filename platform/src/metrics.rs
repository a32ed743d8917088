//! The platform's Prometheus metrics, served at `GET /metrics`.
//!
//! What an operator watches: tokens minted (calls to GitHub) against tokens
//! served and cache hits (the cache doing its job: a fleet should cost about
//! one mint per installation per token lifetime), failed mints by GitHub's
//! answer, and request latency by route. Written with `prometheus-client`
//! in the Prometheus text format (0.0.4), which `promtool check metrics`
//! and every Prometheus read.
//!
//! Who owns the set: the provider, whose caches, rate limit and shared
//! store count into it from the moment they are built (each is handed the
//! provider's [`Arc<PlatformMetrics>`](PlatformMetrics)); the service takes
//! the provider's set for its handlers, its request layer and `/metrics`
//! ([`crate::service::AppState::metrics`]). So one `/metrics` shows
//! everything one provider did, and two platforms in one process (tests,
//! benches) never count into each other: there is no process-wide set. The
//! set depends on no other module of the crate (its callers pass labels,
//! not their types), so it sits below everything that counts.
//!
//! What the labels may hold: route templates (`/workspaces/{id}/…`, never a
//! workspace id), HTTP status codes, error classes, the caller's kind
//! (`workspace` or `admin`). No token, bearer, workspace or owner name, so
//! the counts can be served without authentication (see `platform/README.md`).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the request latency histogram, in seconds: a cache hit
/// answers in microseconds, a mint waits for GitHub (seconds).
const REQUEST_SECONDS_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// Label of a request the router has no route for.
const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerLabels {
    caller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    /// The HTTP status GitHub answered, or the failure's class without one.
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SharedLabels {
    event: &'static str,
}

type RequestHistograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// Who was served a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerKind {
    /// A workspace with its own bearer.
    Workspace,
    /// The admin bearer.
    Admin,
}

impl CallerKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Workspace => "workspace",
            Self::Admin => "admin",
        }
    }
}

/// The platform's metrics (see the module docs).
pub struct PlatformMetrics {
    registry: Registry,
    minted: Counter,
    cache_hits: Counter,
    served: Family<CallerLabels, Counter>,
    upstream_errors: Family<UpstreamLabels, Counter>,
    requests: RequestHistograms,
    shared: Family<SharedLabels, Counter>,
    rate_limited_until: Gauge,
    rate_limits: Counter,
    held: Counter,
}

impl std::fmt::Debug for PlatformMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformMetrics").finish_non_exhaustive()
    }
}

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_SECONDS_BOUNDS)
}

impl Default for PlatformMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PlatformMetrics {
    /// A fresh set, every counter at zero.
    pub fn new() -> Self {
        let minted = Counter::default();
        let cache_hits = Counter::default();
        let served = Family::<CallerLabels, Counter>::default();
        let upstream_errors = Family::<UpstreamLabels, Counter>::default();
        let requests = RequestHistograms::new_with_constructor(request_histogram);
        let shared = Family::<SharedLabels, Counter>::default();
        let rate_limited_until = Gauge::default();
        let rate_limits = Counter::default();
        let held = Counter::default();
        // Both callers exist from the start, so a rate over them does too.
        for caller in [CallerKind::Workspace, CallerKind::Admin] {
            let _ = served.get_or_create(&CallerLabels {
                caller: caller.as_str(),
            });
        }
        let mut registry = Registry::with_prefix("molecule_platform");
        registry.register(
            "tokens_minted",
            "Tokens minted upstream (GitHub installation tokens created; dev tokens made)",
            minted.clone(),
        );
        registry.register(
            "token_cache_hits",
            "Token requests answered from the token cache without minting",
            cache_hits.clone(),
        );
        registry.register(
            "tokens_served",
            "Tokens handed out by the token endpoints, by caller kind",
            served.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed mints by GitHub's answer: the HTTP status, or timeout, transport, malformed, config, rate_limited (GitHub's limit holds) when there was none",
            upstream_errors.clone(),
        );
        registry.register_with_unit(
            "github_rate_limited_until",
            "When GitHub's rate limit on the App ends (Unix time; no request goes to GitHub before it; 0: never limited)",
            prometheus_client::registry::Unit::Seconds,
            rate_limited_until.clone(),
        );
        registry.register(
            "github_rate_limits",
            "Rate limits GitHub answered the App with (episodes, however many requests each held back)",
            rate_limits.clone(),
        );
        registry.register(
            "github_requests_held",
            "Requests to GitHub not made because GitHub's rate limit on the App had not ended",
            held.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "HTTP requests by route template, method and status code, and how long they took",
            prometheus_client::registry::Unit::Seconds,
            requests.clone(),
        );
        registry.register(
            "shared_cache",
            "Replicated token cache (PLATFORM_REDIS_URL) events: hit (another replica's token), miss (minted under the lock), \
             waited (for another replica's mint), fallback (Redis unusable: local cache), error (a Redis operation failed), \
             rejected (an entry that does not open), refused (a shared entry removed after a refusal)",
            shared.clone(),
        );
        Self {
            registry,
            shared,
            minted,
            cache_hits,
            served,
            upstream_errors,
            requests,
            rate_limited_until,
            rate_limits,
            held,
        }
    }

    /// GitHub rate limited the App until `until` (Unix seconds): a new
    /// episode when `new_episode`, else an existing one moved.
    pub fn rate_limited(&self, until: i64, new_episode: bool) {
        self.rate_limited_until.set(until);
        if new_episode {
            self.rate_limits.inc();
        }
    }

    /// A request to GitHub was not made: the App's rate limit holds.
    pub fn held(&self) {
        self.held.inc();
    }

    /// A token was minted upstream.
    pub fn minted(&self) {
        self.minted.inc();
    }

    /// A token request was answered from the cache.
    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    /// A replicated-cache event, by its label (`shared::Event::as_str`).
    pub fn shared_cache(&self, event: &'static str) {
        self.shared.get_or_create(&SharedLabels { event }).inc();
    }

    /// A token endpoint handed a token to `caller`.
    pub fn served(&self, caller: CallerKind) {
        self.served
            .get_or_create(&CallerLabels {
                caller: caller.as_str(),
            })
            .inc();
    }

    /// A mint failed; `status` is GitHub's status, or the failure's class
    /// when GitHub answered none (`ProviderError::status_label`).
    pub fn upstream_error(&self, status: String) {
        self.upstream_errors
            .get_or_create(&UpstreamLabels { status })
            .inc();
    }

    fn request(&self, route: String, method: &'static str, code: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                code,
            })
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// The method as a label: the standard ones by name, anything else (a
/// client may send any token) as `other`, so no client can grow the series.
fn method_label(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "HEAD" => "HEAD",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Layer function timing every request, labelled by its route template
/// (`axum::middleware::from_fn_with_state` with the service's set).
pub async fn track_request(
    State(metrics): State<Arc<PlatformMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED_ROUTE.to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.request(
        route,
        method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_set_renders_what_happened_and_passes_promtool() {
        let m = PlatformMetrics::new();
        m.minted();
        m.cache_hit();
        m.cache_hit();
        m.served(CallerKind::Workspace);
        m.upstream_error(
            crate::provider::ProviderError::UpstreamStatus {
                status: 502,
                detail: Some("bad \"gateway\"".into()),
            }
            .status_label(),
        );
        m.upstream_error(
            crate::provider::ProviderError::Timeout(std::time::Duration::from_secs(1))
                .status_label(),
        );
        m.rate_limited(1_900_000_000, true);
        m.rate_limited(1_900_000_060, false);
        m.held();
        m.request(
            "/workspaces/{id}/github-installation-token".into(),
            "GET",
            200,
            0.002,
        );
        let text = m.render();
        for expected in [
            "# TYPE molecule_platform_tokens_minted_total counter\n",
            "molecule_platform_tokens_minted_total 1\n",
            "molecule_platform_token_cache_hits_total 2\n",
            "molecule_platform_tokens_served_total{caller=\"workspace\"} 1\n",
            "molecule_platform_tokens_served_total{caller=\"admin\"} 0\n",
            "molecule_platform_upstream_errors_total{status=\"502\"} 1\n",
            "molecule_platform_upstream_errors_total{status=\"timeout\"} 1\n",
            "molecule_platform_http_request_duration_seconds_count{route=\"/workspaces/{id}/github-installation-token\",method=\"GET\",code=\"200\"} 1\n",
            "le=\"0.0025\"} 1\n",
            "molecule_platform_github_rate_limited_until_seconds 1900000060\n",
            "molecule_platform_github_rate_limits_total 1\n",
            "molecule_platform_github_requests_held_total 1\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(
            !text.contains("gateway"),
            "no upstream text in a label:\n{text}"
        );
        testkit::prometheus::check_metrics(&text);
    }
}
