//! A real `redis-server` (Debian's package) for the replicated-platform
//! tests: 127.0.0.1 on a random free port, its working folder (RDB file)
//! private to the test, no persistence unless asked (`SAVE`).
//!
//! Why real: the platform's sharing relies on Redis semantics (`SET NX PX`,
//! Lua compare-and-delete, pub/sub, expiry, what a dead server looks like
//! to a client); a fake would agree with the code that was written
//! against it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::Process;

/// How long start-up may take before the test fails.
const START: Duration = Duration::from_secs(30);

/// A running `redis-server`; killed on drop.
pub struct RedisServer {
    process: Option<Process>,
    port: u16,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
}

impl RedisServer {
    /// Starts one in a fresh private folder.
    pub fn start() -> Self {
        let tempdir = tempfile::tempdir().expect("tempdir");
        let dir = tempdir.path().to_owned();
        let mut server = Self::start_in(&dir, None);
        server._tempdir = Some(tempdir);
        server
    }

    fn start_in(dir: &Path, fixed: Option<u16>) -> Self {
        crate::bin::require_tool("redis-server", "redis-server");
        // A port the kernel just handed out and took back; if another
        // process takes it first, redis-server exits and we try another.
        for _ in 0..10 {
            let port = fixed.unwrap_or_else(free_port);
            let mut command = Command::new("redis-server");
            command.args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--dir",
                dir.to_str().expect("UTF-8 folder"),
                "--dbfilename",
                "dump.rdb",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ]);
            let process = Process::spawn(command, "redis-server");
            let ready = process.stdout().wait_until(START, |text, closed| {
                text.contains("Ready to accept connections") || closed
            });
            match ready {
                Ok(text) if text.contains("Ready to accept connections") => {
                    return Self {
                        process: Some(process),
                        port,
                        dir: dir.to_owned(),
                        _tempdir: None,
                    };
                }
                Ok(text) | Err(text) => {
                    assert!(
                        text.contains("Address already in use") && fixed.is_none(),
                        "redis-server did not start:\n{text}\n{}",
                        process.stderr().text()
                    );
                }
            }
        }
        panic!("redis-server: no free port after 10 tries");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its working folder (where `SAVE` writes `dump.rdb`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A synchronous connection for the test's own inspection.
    pub fn connection(&self) -> ::redis::Connection {
        ::redis::Client::open(self.url())
            .expect("URL")
            .get_connection_with_timeout(Duration::from_secs(10))
            .expect("connect to redis-server")
    }

    /// Sends `signal` (SIGSTOP: a Redis that accepts and never answers).
    pub fn signal(&self, signal: Signal) {
        if let Some(process) = &self.process {
            process.signal(signal);
        }
    }

    /// SIGKILLs it (no save, no goodbye), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop(Signal::SIGKILL, START);
        }
    }

    /// Starts it again on the same port and folder (empty: nothing was
    /// saved).
    pub fn restart(&mut self) {
        self.kill();
        let again = Self::start_in(&self.dir, Some(self.port));
        let mut again = again;
        self.process = again.process.take();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }
}
