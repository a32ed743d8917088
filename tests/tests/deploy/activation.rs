//! The daemon under systemd's protocols: socket activation through systemd's
//! own `systemd-socket-activate`, and `sd_notify` into a test `NOTIFY_SOCKET`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testkit::bin::{binary, require_tool};
use testkit::{CmdOutput, PlatformProcess, Process, Secrets, WAIT};

/// `molecule-credd` (or `program` in front of it) with the environment of
/// these tests: the dev platform, nothing inherited that could change its
/// behaviour (a developer's GITHUB_TOKEN, RUST_LOG).
fn daemon_command(
    program: impl AsRef<std::ffi::OsStr>,
    platform: &PlatformProcess,
    socket: &Path,
) -> Command {
    let mut command = Command::new(program);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PLATFORM_URL", platform.url())
        .env("CONFIGS_DIR", platform.configs_dir())
        .env("CREDD_SOCKET", socket);
    command
}

/// `systemd-socket-activate` listening on `sockets` (with `extra` flags)
/// for a daemon it starts on the first connection; returns once it said it
/// listens on the last socket.
fn socket_activate(platform: &PlatformProcess, sockets: &[&Path], extra: &[&str]) -> Process {
    let mut command = daemon_command("systemd-socket-activate", platform, sockets[0]);
    command.args(extra);
    for socket in sockets {
        command.arg("--listen").arg(socket);
    }
    command
        .args([
            "-E",
            "PLATFORM_URL",
            "-E",
            "CONFIGS_DIR",
            "-E",
            "CREDD_SOCKET",
        ])
        .args(["-E", "PATH"])
        .arg(binary("molecule-credd"));
    let activator = Process::spawn(command, "systemd-socket-activate");
    let last = sockets[sockets.len() - 1].to_string_lossy().into_owned();
    activator.stderr().wait_for_line_matching(
        "systemd-socket-activate listening on the last socket",
        WAIT,
        |l| l.contains("Listening on") && l.contains(&*last),
    );
    activator
}

/// `credd ARGS` against `socket`.
fn credd(dir: &Path, socket: &Path, args: &[&str]) -> CmdOutput {
    crate::support::credd(socket, dir, args)
}

/// One test's world: a temp folder, its secrets, the dev platform minting
/// tokens that live `ttl`, and the socket path in a private `run/` folder.
/// Bound in this order, they drop in reverse: the platform (scanned for
/// the secrets) before its folder.
fn world(ttl: &str) -> (tempfile::TempDir, Secrets, PlatformProcess, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = Secrets::new();
    let platform = PlatformProcess::dev(&dir.path().join("configs"), ttl, &secrets);
    let socket = private_dir(dir.path().join("run")).join("credd.sock");
    (dir, secrets, platform, socket)
}

fn private_dir(path: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&path).expect("create dir");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).expect("chmod 700");
    path
}

fn exe_of(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

#[test]
fn socket_activation_through_systemd_socket_activate() {
    require_tool("systemd-socket-activate", "systemd");
    let (dir, secrets, platform, socket) = world("10m");
    let daemon = binary("molecule-credd");

    // systemd-socket-activate binds the socket, waits for the first
    // connection, then execs the daemon in its own process with fd 3.
    let mut activator = socket_activate(&platform, &[&socket], &[]);
    let pid = activator.pid();
    assert_ne!(
        exe_of(pid),
        std::fs::canonicalize(&daemon).ok(),
        "the daemon must start on the first connection, not before"
    );

    // The first client's connection is queued while the daemon starts.
    let status = credd(dir.path(), &socket, &["status", "--json"]);
    assert!(
        status.status.success(),
        "credd status through the activated socket:\n{}",
        status.transcript()
    );
    assert_eq!(
        exe_of(pid),
        std::fs::canonicalize(&daemon).ok(),
        "the daemon now runs in the activated process"
    );
    let token = credd(dir.path(), &socket, &["token"]);
    assert!(token.status.success(), "{}", token.stderr);
    let token = token.stdout.trim_end().to_owned();
    assert!(token.starts_with("ghs_"), "a dev token is served");
    secrets.add("the served token", token.clone());
    let status = credd(dir.path(), &socket, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&status.stdout)
        .unwrap_or_else(|e| panic!("status --json is JSON ({e}):\n{}", status.transcript()));
    assert_eq!(json["source"], "platform", "{json}");
    assert_eq!(json["pid"], pid, "the daemon is the activated process");

    // SIGTERM: exit 0, and the socket systemd created is left alone.
    let exit = activator.stop(Signal::SIGTERM, WAIT);
    let log = activator.stderr().text();
    assert!(exit.success(), "daemon exit after SIGTERM: {exit}\n{log}");
    assert!(
        socket.exists(),
        "the daemon removed a socket it did not create"
    );
    secrets.assert_clean("activated daemon's log", &log);
    secrets.assert_clean("credd status", &status.stdout);
}

#[test]
fn an_activated_socket_that_is_not_a_stream_listener_is_refused() {
    require_tool("systemd-socket-activate", "systemd");
    let (_dir, _secrets, platform, socket) = world("10m");
    let mut activator = socket_activate(&platform, &[&socket], &["--datagram"]);
    UnixDatagram::unbound()
        .expect("datagram socket")
        .send_to(b"wake up", &socket)
        .expect("send a datagram");
    let exit = activator.wait(WAIT);
    let log = activator.stderr().text();
    assert!(
        !exit.success(),
        "the daemon must refuse a datagram socket:\n{log}"
    );
    assert!(
        log.contains("error:") && log.contains("stream socket"),
        "a clear error naming the problem:\n{log}"
    );
}

/// Every `KEY=value` assignment received on the notify socket, with when.
fn notifications(socket: UnixDatagram) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let at = Instant::now();
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                if tx.send((at, line.to_owned())).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Receives until an assignment starting with `prefix`; fails after [`WAIT`].
fn expect(rx: &mpsc::Receiver<(Instant, String)>, prefix: &str, seen: &mut Vec<String>) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                let hit = line.starts_with(prefix);
                seen.push(line);
                if hit {
                    return at;
                }
            }
            Err(_) => panic!("no {prefix} within {WAIT:?}; received: {seen:?}"),
        }
    }
}

#[test]
fn notify_socket_receives_ready_status_watchdog_and_stopping() {
    let (dir, secrets, platform, socket) = world("10m");
    let notify_path = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    let rx = notifications(systemd);

    // WATCHDOG_USEC=400ms: the daemon must ping every 200 ms.
    let watchdog_usec: u64 = 400_000;
    let interval = Duration::from_micros(watchdog_usec / 2);
    let mut command = daemon_command(binary("molecule-credd"), &platform, &socket);
    command
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", watchdog_usec.to_string());
    let mut daemon = Process::spawn(command, "molecule-credd");

    let mut seen = Vec::new();
    expect(&rx, "READY=1", &mut seen);
    // READY means serving: the socket answers right away.
    let status = credd(dir.path(), &socket, &["status"]);
    assert!(
        status.status.success(),
        "READY=1 was sent before the socket answered:\n{}",
        status.transcript()
    );
    let status_line = if let Some(line) = seen.iter().find(|l| l.starts_with("STATUS=")) {
        line.clone()
    } else {
        expect(&rx, "STATUS=", &mut seen);
        seen.last().cloned().unwrap_or_default()
    };
    assert!(status_line.len() > "STATUS=".len(), "an empty STATUS=");

    // Pings: at least 6, never much closer together than the interval
    // allows. These are receipt times: a loaded machine can hold up the
    // receipt of one ping by tens of milliseconds and not the next, so the
    // bound is half the interval — still twice what a daemon pinging at
    // double rate would show.
    let mut pings = Vec::new();
    while pings.len() < 6 {
        pings.push(expect(&rx, "WATCHDOG=1", &mut seen));
    }
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= interval / 2,
            "pings {gap:?} apart; WATCHDOG_USEC={watchdog_usec} asks for one every {interval:?}"
        );
    }

    daemon.signal(Signal::SIGTERM);
    expect(&rx, "STOPPING=1", &mut seen);
    let exit = daemon.wait(WAIT);
    let log = daemon.stderr().text();
    assert!(exit.success(), "exit after SIGTERM: {exit}\n{log}");
    assert!(!socket.exists(), "the daemon removes the socket it created");
    secrets.assert_clean("daemon log", &log);
    secrets.assert_clean("notifications", &seen.join("\n"));
}

#[test]
fn watchdog_pings_stop_while_the_token_is_expired_and_unobtainable() {
    // Tokens living 4 s; the daemon may serve them down to 1 s of life.
    let (dir, secrets, platform, socket) = world("4s");
    let notify_path = dir.path().join("notify");
    let rx = notifications(UnixDatagram::bind(&notify_path).expect("bind the notify socket"));
    let interval = Duration::from_millis(100);
    let mut command = daemon_command(binary("molecule-credd"), &platform, &socket);
    command
        .args(["--min-lifetime", "1s", "--refresh-margin", "2s"])
        .args(["--backoff-initial", "100ms", "--backoff-max", "500ms"])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000");
    let daemon = Process::spawn(command, "molecule-credd");
    let mut seen = Vec::new();
    expect(&rx, "READY=1", &mut seen);
    // Healthy: a token is held, pings flow.
    for _ in 0..3 {
        expect(&rx, "WATCHDOG=1", &mut seen);
    }
    // The platform goes away; within 4 s the token expires and cannot be
    // renewed. The daemon must fall silent: a pause of 15 intervals with no
    // ping, seen before WAIT runs out (a daemon that keeps pinging fails).
    drop(platform);
    let deadline = Instant::now() + WAIT;
    let silence = interval * 15;
    loop {
        match rx.recv_timeout(silence) {
            Ok((_, line)) => {
                seen.push(line);
                assert!(
                    Instant::now() < deadline,
                    "still pinging {WAIT:?} after the platform went away: {seen:?}\n{}",
                    daemon.stderr().text()
                );
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("notify socket closed"),
        }
    }
    let status = credd(dir.path(), &socket, &["status", "--json"]);
    assert!(status.status.success(), "{}", status.transcript());
    let json: serde_json::Value = serde_json::from_str(&status.stdout).expect("status JSON");
    assert_ne!(
        json["state"], "valid",
        "silent watchdog, yet a valid token: {json}"
    );
    let log = daemon.stderr().text();
    drop(daemon);
    secrets.assert_clean("daemon log", &log);
}

#[test]
fn the_on_refresh_hook_gets_the_new_token_on_stdin() {
    let (dir, secrets, platform, socket) = world("10m");
    // The hook records only a hash of what it read (no token on disk), and
    // its argv and environment, which must not hold the token.
    let seen = dir.path().join("hook");
    let hook = format!(
        "sha256sum | cut -d' ' -f1 > '{0}.sha'; {{ echo \"$0 $*\"; env; }} > '{0}.env'; mv '{0}.sha' '{0}.done'",
        seen.display()
    );
    let mut command = daemon_command(binary("molecule-credd"), &platform, &socket);
    command.arg("--on-refresh").arg(&hook);
    let daemon = Process::spawn(command, "molecule-credd");
    let done = seen.with_extension("done");
    let hashed = testkit::process::eventually("the on-refresh hook ran", || {
        std::fs::read_to_string(&done).ok()
    });
    let token = credd(dir.path(), &socket, &["token"]);
    assert!(token.status.success(), "{}", token.transcript());
    let token = token.stdout.trim_end().to_owned();
    secrets.add("the served token", token.clone());
    // The hook got the token and a newline, exactly.
    assert_eq!(hashed.trim(), testkit::sha256_hex(format!("{token}\n")));
    let env = std::fs::read_to_string(seen.with_extension("env")).expect("hook env dump");
    secrets.assert_clean("the hook's argv and environment", &env);
    let log = daemon.stderr().text();
    drop(daemon);
    secrets.assert_clean("daemon log", &log);
}

#[test]
fn two_activated_sockets_are_refused() {
    require_tool("systemd-socket-activate", "systemd");
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = Secrets::new();
    let platform = PlatformProcess::dev(&dir.path().join("configs"), "10m", &secrets);
    let run = private_dir(dir.path().join("run"));
    let (first, second) = (run.join("credd.sock"), run.join("other.sock"));
    let mut activator = socket_activate(&platform, &[&first, &second], &[]);
    // The first connection starts the daemon, which must refuse to run.
    let _client = std::os::unix::net::UnixStream::connect(&first).expect("connect");
    let exit = activator.wait(WAIT);
    let log = activator.stderr().text();
    assert!(!exit.success(), "two sockets must be refused:\n{log}");
    assert!(
        log.contains("error:") && log.contains("2 sockets"),
        "a clear error naming the problem:\n{log}"
    );
}
