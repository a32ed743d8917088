//! Load benchmark: many concurrent `get`s against one molecule-credd.
//!
//! Not a criterion benchmark: what matters here is the daemon as a process
//! under a crowd (throughput, tail latency, resident memory, platform calls
//! per token lifetime), so this starts the real release binaries — the
//! platform in `--dev` mode and the daemon — and drives the socket from 1,000
//! concurrent clients. Run it with `scripts/bench.sh` or
//!
//! ```sh
//! cargo build --release --workspace
//! cargo bench -p molecule-credd --bench load -- [--clients 1000] [--rounds 20]
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use credd_core::protocol::{self, Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::UnixStream;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn ask(socket: &Path, request: &Request) -> std::io::Result<Response> {
    let mut stream = UnixStream::connect(socket).await?;
    stream.write_all(&protocol::encode(request)).await?;
    let mut line = Vec::new();
    AsyncBufReader::new(stream)
        .read_until(b'\n', &mut line)
        .await?;
    protocol::decode(&line).map_err(std::io::Error::other)
}

async fn status(socket: &Path) -> Option<protocol::Status> {
    match ask(socket, &Request::Status).await {
        Ok(Response::Status(status)) => Some(*status),
        _ => None,
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let clients = arg("--clients", 1000);
    let rounds = arg("--rounds", 20);
    let ttl_secs = arg("--ttl-secs", 20) as u64;
    let lifetimes = arg("--lifetimes", 3) as u64;

    let daemon_bin = PathBuf::from(env!("CARGO_BIN_EXE_molecule-credd"));
    let platform_bin = daemon_bin.with_file_name("molecule-platform");
    assert!(
        platform_bin.exists(),
        "{} is missing: run `cargo build --release --workspace` first",
        platform_bin.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = dir.path().join("configs");
    let socket = dir.path().join("run/credd.sock");

    let mut platform = Command::new(&platform_bin)
        .args(["--dev", "--listen", "127.0.0.1:0", "--dev-token-ttl"])
        .arg(format!("{ttl_secs}s"))
        .arg("--dev-auth-token-file")
        .arg(configs.join(".auth_token"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start molecule-platform");
    let mut first = String::new();
    BufReader::new(platform.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("platform address");
    let _platform = Killed(platform);
    let url = first.trim().rsplit(' ').next().expect("address").to_owned();

    // Margins scaled to the short TTL so a few lifetimes pass in seconds.
    let daemon = Command::new(&daemon_bin)
        .args(["--platform-url", &url, "--refresh-margin"])
        .arg(format!("{}s", ttl_secs / 4))
        .args(["--min-lifetime", "1s", "--max-connections", "4096"])
        .arg("--configs-dir")
        .arg(&configs)
        .arg("--socket")
        .arg(&socket)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("start molecule-credd");
    let pid = daemon.id();
    let _daemon = Killed(daemon);

    let started = Instant::now();
    loop {
        let status = status(&socket).await;
        if status.is_some_and(|s| s.token.state == Some(protocol::TokenState::Valid)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "daemon never got a token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_kib(pid);

    // The crowd: `clients` tasks, each doing `rounds` sequential gets.
    let socket = Arc::new(socket);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let socket = Arc::clone(&socket);
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(rounds);
                let mut failures = 0usize;
                for _ in 0..rounds {
                    let t = Instant::now();
                    match ask(&socket, &Request::GET_DEFAULT).await {
                        Ok(Response::Token { .. }) => latencies.push(t.elapsed()),
                        _ => failures += 1,
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(clients * rounds);
    let mut failures = 0;
    for task in tasks {
        let (l, f) = task.await.expect("client task");
        latencies.extend(l);
        failures += f;
    }
    let elapsed = t0.elapsed();
    let loaded_rss = rss_kib(pid);
    latencies.sort();
    let total = latencies.len();

    println!("molecule-credd load benchmark ({clients} concurrent clients x {rounds} gets)");
    println!(
        "  throughput: {:.0} gets/s ({total} answered, {failures} failed, {:.2} s)",
        total as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    if total > 0 {
        println!(
            "  latency: p50 {:?}  p99 {:?}  max {:?}",
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            latencies[total - 1]
        );
    }
    println!("  resident memory: idle {idle_rss} KiB, after load {loaded_rss} KiB");

    // One client alone: the round trip without queueing.
    let mut solo = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let t = Instant::now();
        let _ = ask(&socket, &Request::GET_DEFAULT).await;
        solo.push(t.elapsed());
    }
    solo.sort();
    println!(
        "  one client alone: p50 {:?}  p99 {:?}",
        percentile(&solo, 0.50),
        percentile(&solo, 0.99)
    );

    // Platform calls per token, under a light steady load: every token the
    // daemon obtains should cost exactly one call.
    let before = status(&socket).await.expect("status");
    let mut fingerprints = std::collections::HashSet::new();
    fingerprints.extend(before.token.fingerprint.clone());
    let window = Duration::from_secs(ttl_secs * lifetimes);
    let t1 = Instant::now();
    while t1.elapsed() < window {
        let _ = ask(&socket, &Request::GET_DEFAULT).await;
        if let Some(s) = status(&socket).await {
            fingerprints.extend(s.token.fingerprint);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = status(&socket).await.expect("status");
    let calls = after.token.platform_calls - before.token.platform_calls;
    let new_tokens = fingerprints.len().saturating_sub(1);
    println!(
        "  platform calls: {calls} over {:?} ({lifetimes} token lifetimes of {ttl_secs} s), \
         {new_tokens} new tokens: {:.2} calls per token",
        window,
        calls as f64 / new_tokens.max(1) as f64
    );
}
