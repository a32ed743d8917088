//! `credd` verifies its server before it sends anything: a socket squatted
//! by another user — a forged daemon that would hand git an attacker's token,
//! or answer `unavailable` to suppress every fallback — is never trusted.
//! The squatter is a real process under another uid (`forged-daemon`).

use std::path::Path;
use std::process::Command;

use credd_core::protocol::{self, ErrorCode, Response, Source};
use credd_core::secret::Token;

use crate::socket::OTHER_UID;
use testkit::{Process, Sandbox, TestPlatform, WAIT, assert_secret, with_platform};

/// What the forged daemon hands out.
const ATTACKER_TOKEN: &str = "ghs_ATTACKERforgedToken0123456789abcdefXYZ";

/// A forged daemon; killed on drop.
struct Forged(Process);

impl Forged {
    /// Creates `socket`'s folder with `mode` owned by `owner`, binds there,
    /// drops to `listen_uid` before listening, and answers `answer`.
    fn start(socket: &Path, mode: u32, owner: u32, listen_uid: u32, answer: &Response) -> Self {
        let line = String::from_utf8(protocol::encode(answer)).expect("utf-8");
        let mut command = Command::new(env!("CARGO_BIN_EXE_forged-daemon"));
        command
            .arg(socket)
            .arg(format!("{mode:o}"))
            .arg(owner.to_string())
            .arg(listen_uid.to_string())
            .arg(line.trim_end());
        let forged = Process::spawn(command, "forged-daemon");
        forged.stdout().wait_for_line("ready", WAIT);
        Self(forged)
    }

    /// Bytes received on each connection, once the first connection's line
    /// is out: it is printed once the request is read, and its pipe is read
    /// by another thread, so right after `credd` returns it may not be in
    /// yet.
    fn requests_of_one_connection(&self) -> Vec<usize> {
        self.0.stdout().wait_for_line("request-bytes=", WAIT);
        self.requests()
    }

    /// Bytes received on each connection so far.
    fn requests(&self) -> Vec<usize> {
        self.0
            .stdout()
            .text()
            .lines()
            .filter_map(|l| l.strip_prefix("request-bytes="))
            .map(|n| n.parse().expect("a count"))
            .collect()
    }
}

fn forged_token() -> Response {
    Response::Token {
        token: Token::new(ATTACKER_TOKEN.into()).expect("token"),
        expires_at: 4_102_444_800,
        source: Source::Platform,
        scope: credd_core::protocol::Scope::default(),
    }
}

#[test]
fn a_squatted_socket_folder_is_never_trusted_and_the_platform_answers_instead() {
    let (sandbox, platform) = with_platform(TestPlatform::start());
    // Another user created the folder first, open to all, and listens there.
    let forged = Forged::start(
        &sandbox.socket(),
        0o777,
        OTHER_UID,
        OTHER_UID,
        &forged_token(),
    );

    let get = sandbox.credd_get("https", "github.com");
    get.assert_success("credd get");
    assert!(
        !get.stdout.contains(ATTACKER_TOKEN),
        "the forged token reached git"
    );
    get.assert_password(
        platform
            .last_issued()
            .as_deref()
            .expect("the platform was asked"),
        "the platform's token, fetched directly",
    );
    assert!(get.stderr.contains("refusing the socket"), "{}", get.stderr);

    let token = sandbox.credd(&["token"]).stdout_holds_secret().run();
    assert_secret(
        Some(token.stdout.trim()),
        ATTACKER_TOKEN,
        false,
        "credd token never prints the forged token",
    );
    let exec = sandbox
        .credd(&["exec", "--", "printenv", "GH_TOKEN"])
        .stdout_holds_secret()
        .run();
    assert_secret(
        Some(exec.stdout.trim()),
        ATTACKER_TOKEN,
        false,
        "credd exec never hands the forged token to its child",
    );
    let status = sandbox.credd(&["status"]).run();
    assert!(!status.status.success(), "status of a refused socket fails");
    assert!(
        status.stderr.contains("refusing the socket"),
        "{}",
        status.stderr
    );
    assert!(
        forged.requests().is_empty(),
        "nothing was even sent to the squatter: {:?}",
        forged.requests()
    );
    sandbox.assert_no_secrets();
}

#[test]
fn a_listener_of_another_uid_is_refused_before_anything_is_sent() {
    let (sandbox, platform) = with_platform(TestPlatform::start());
    // The folder looks right (private, root's), but whoever listens is not
    // a trusted uid; it answers `unavailable` to suppress every fallback.
    let unavailable = Response::Error {
        code: ErrorCode::Unavailable,
        message: "no token for you".into(),
    };
    let forged = Forged::start(&sandbox.socket(), 0o700, 0, OTHER_UID, &unavailable);

    let get = sandbox.credd_get("https", "github.com");
    get.assert_password(
        platform
            .last_issued()
            .as_deref()
            .expect("the platform was asked"),
        "the fallback was not suppressed",
    );
    assert!(
        get.stderr.contains(&format!("served by uid {OTHER_UID}")),
        "{}",
        get.stderr
    );
    assert_eq!(
        forged.requests_of_one_connection(),
        [0],
        "it connected, checked the peer, and sent nothing"
    );
}

#[test]
fn the_configured_daemon_uid_is_trusted() {
    let sandbox = Sandbox::new();
    // A daemon that listens as its own user on a socket in a trusted folder
    // (here root's), which the operator names with CREDD_DAEMON_UID.
    let forged = Forged::start(&sandbox.socket(), 0o700, 0, OTHER_UID, &forged_token());
    let uid = OTHER_UID.to_string();
    let get = sandbox.credd_get_with("https", "github.com", &[("CREDD_DAEMON_UID", &uid)]);
    get.assert_password(ATTACKER_TOKEN, "the configured daemon's token");
    let requests = forged.requests_of_one_connection();
    assert_eq!(requests.len(), 1);
    assert!(requests[0] > 0, "the request was sent");
}
