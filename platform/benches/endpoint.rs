//! Token endpoint cost with a warm cache, next to a trivial static handler
//! (`/healthz`) on the same stack, and upstream calls under load.
//!
//! The targets: the token endpoint within 2x of the static handler,
//! and one upstream call per token lifetime whatever the request rate. Run:
//! `cargo bench -p molecule-platform --bench endpoint`.
//!
//! Three views: in-process through the router (`oneshot`, no network),
//! one request at a time over HTTP on loopback, and throughput with 32
//! concurrent keep-alive clients (printed, not a criterion benchmark).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use criterion::Criterion;
use molecule_platform::config::{Config, LogFormat, ProviderChoice};
use molecule_platform::{DevProvider, Platform, app, serve};
use secrecy::SecretString;
use tower::ServiceExt;

const ADMIN: &str = "bench-admin-bearer-0123456789abcdef";
const TOKEN_PATH: &str = "/admin/github-installation-token";
const STATIC_PATH: &str = "/healthz";

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // One-hour dev tokens: the whole run lives inside one token's life.
    let provider = Arc::new(DevProvider::new(Duration::from_secs(3600)));
    // Composed as the binary composes it, with the bench's own provider.
    let platform = Platform::from_config(Config {
        listen: ([127, 0, 0, 1], 0).into(),
        admin_token: Some(SecretString::from(ADMIN)),
        workspace_tokens_file: None,
        grants_file: None,
        provider: ProviderChoice::Given(Arc::clone(&provider) as _),
        dev_auth_token_file: None,
        log_format: LogFormat::Text,
        shared: None,
    })
    .expect("the bench's configuration");
    let router = app(platform.state);

    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(serve(listener, router.clone(), async move {
        let _ = stop_rx.await;
    }));
    let client = reqwest::Client::new();

    let oneshot = |path: &'static str| {
        let router = router.clone();
        move || {
            let router = router.clone();
            async move {
                let request = Request::get(path)
                    .header("authorization", format!("Bearer {ADMIN}"))
                    .body(Body::empty())
                    .expect("request");
                let response = router.oneshot(request).await.expect("infallible");
                assert!(response.status().is_success());
                black_box(
                    axum::body::to_bytes(response.into_body(), 1 << 16)
                        .await
                        .expect("body"),
                )
            }
        }
    };
    let over_http = |path: &'static str| {
        let client = client.clone();
        let url = format!("{base}{path}");
        move || {
            let request = client.get(&url).bearer_auth(ADMIN);
            async move {
                let response = request.send().await.expect("request");
                assert!(response.status().is_success());
                black_box(response.bytes().await.expect("body"))
            }
        }
    };

    let mut group = criterion.benchmark_group("in_process");
    for (name, path) in [
        ("token_warm_cache", TOKEN_PATH),
        ("static_healthz", STATIC_PATH),
    ] {
        let call = oneshot(path);
        group.bench_function(name, |b| b.iter(|| runtime.block_on(call())));
    }
    group.finish();

    let mut group = criterion.benchmark_group("http_loopback");
    for (name, path) in [
        ("token_warm_cache", TOKEN_PATH),
        ("static_healthz", STATIC_PATH),
    ] {
        let call = over_http(path);
        group.bench_function(name, |b| b.iter(|| runtime.block_on(call())));
    }
    group.finish();

    // Throughput: 32 keep-alive clients, 20,000 requests per route.
    const CLIENTS: usize = 32;
    const REQUESTS: usize = 20_000;
    for (name, path) in [
        ("token_warm_cache", TOKEN_PATH),
        ("static_healthz", STATIC_PATH),
    ] {
        let started = Instant::now();
        runtime.block_on(async {
            let tasks: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    let call = over_http(path);
                    tokio::spawn(async move {
                        for _ in 0..REQUESTS / CLIENTS {
                            call().await;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("client task");
            }
        });
        let elapsed = started.elapsed();
        println!(
            "throughput/{name}: {:.0} requests/s ({CLIENTS} concurrent clients, {REQUESTS} requests in {:.2?})",
            (REQUESTS / CLIENTS * CLIENTS) as f64 / elapsed.as_secs_f64(),
            elapsed
        );
    }

    println!(
        "upstream calls (tokens minted) for every request above: {}",
        provider.minted()
    );
    let _ = stop.send(());
    runtime
        .block_on(server)
        .expect("server task")
        .expect("serve");
    criterion.final_summary();
}
