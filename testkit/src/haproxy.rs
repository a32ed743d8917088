//! A real HAProxy (Debian's package) in front of several HTTP servers on
//! 127.0.0.1: the load balancer of the replicated-platform end-to-end
//! test, round robin, on a random free port.

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Process;

/// A running `haproxy -db`; killed on drop.
pub struct HaProxy {
    _process: Process,
    port: u16,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    /// Balances HTTP round robin over `backends` (`HOST:PORT` each).
    pub fn start(backends: &[String]) -> Self {
        crate::bin::require_tool("haproxy", "haproxy");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut config = format!(
            "global\n  maxconn 8192\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  \
             timeout server 60s\n\nfrontend replicas\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\n\
             backend replicas\n  balance roundrobin\n"
        );
        for (i, backend) in backends.iter().enumerate() {
            config.push_str(&format!("  server replica{i} {backend}\n"));
        }
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config).expect("write haproxy.cfg");
        let mut command = Command::new("haproxy");
        command.arg("-db").arg("-f").arg(&file);
        let process = Process::spawn(command, "haproxy");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline && crate::process::is_alive(process.pid()),
                "haproxy did not start:\n{}",
                process.stderr().text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            _process: process,
            port,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
