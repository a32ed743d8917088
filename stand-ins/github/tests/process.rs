//! `github-stand-in` as a process: the line it prints, the keys it writes,
//! GitHub's 401 for a request without the App's JWT, loopback only, and a
//! clean exit on SIGTERM.
//!
//! Why here: the platform's suites and the scripts run this binary, not the
//! library. An integration test in this package is also what makes
//! `cargo test --workspace` build the binary at all (cargo builds a
//! package's binaries for its own integration tests only), so a clean clone
//! finds `target/debug/github-stand-in` before the platform's suites start.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_github-stand-in");

#[test]
fn serves_github_errors_on_loopback_and_exits_cleanly_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("stand-in-process-{}", std::process::id()));
    let mut child = Command::new(BIN)
        .args([
            "--keys-dir",
            dir.to_str().unwrap(),
            "--install",
            "acme=1001",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn github-stand-in");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("its line");
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        words.get(..3),
        Some(&["github-stand-in", "listening", "on"][..]),
        "{line}"
    );
    let url = words[3];
    let addr = url.strip_prefix("http://").expect("an http URL");
    assert!(addr.starts_with("127.0.0.1:"), "{line}");
    assert_eq!(
        words.get(4..6),
        Some(&["keys", dir.to_str().unwrap()][..]),
        "{line}"
    );

    let key = std::fs::metadata(dir.join("app.pem")).expect("app.pem");
    assert_eq!(
        key.permissions().mode() & 0o777,
        0o600,
        "the App's private key"
    );
    let public = std::fs::read_to_string(dir.join("app.pub.pem")).expect("app.pub.pem");
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"), "{public}");

    // No JWT: GitHub's 401 with its documented error body.
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /app/installations HTTP/1.1\r\nHost: {addr}\r\nAccept: application/vnd.github+json\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("the answer");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("\"message\""), "{answer}");

    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "exit after SIGTERM: {status}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn refuses_to_listen_beyond_loopback() {
    let out = Command::new(BIN)
        .args(["--listen", "0.0.0.0:0"])
        .stdin(Stdio::null())
        .output()
        .expect("run github-stand-in");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
    assert!(out.stdout.is_empty(), "no listening line");
}
