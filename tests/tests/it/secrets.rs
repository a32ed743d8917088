//! Secrets are radioactive: the test kit scans every captured output of every
//! test (see `testkit::Sandbox`'s `Drop`); these tests make sure the scan itself
//! can fail, and push the daemon through every failure path with the most
//! verbose logging while watching its output.

use std::os::unix::fs::MetadataExt;
use std::panic::AssertUnwindSafe;

use testkit::{FAST_BACKOFF, Fault, Sandbox, TestPlatform, WAIT, with_platform};

#[test]
fn the_scan_catches_a_leak() {
    let sandbox = Sandbox::new();
    sandbox.add_secret("a planted token", "ghs_PlantedLeak0123456789");
    let mut cmd = sandbox.credd(&["status"]);
    // Any process will do: this one prints the planted secret on stderr.
    *cmd.command() = {
        let mut c = std::process::Command::new("sh");
        c.args(["-c", "echo 'oops ghs_PlantedLeak0123456789' >&2"]);
        c
    };
    cmd.run();
    let caught = std::panic::catch_unwind(AssertUnwindSafe(|| sandbox.assert_no_secrets()));
    let message = caught
        .expect_err("the scan must fail on a leak")
        .downcast::<String>()
        .expect("a message");
    assert!(message.contains("a planted token"), "{message}");
    assert!(
        !message.contains("ghs_Planted"),
        "the scan must not repeat the secret: {message}"
    );
    // Disarm the automatic scan at drop.
    std::mem::forget(sandbox);
}

#[test]
fn every_failure_path_logs_no_secret_even_at_trace_level() {
    let (sandbox, platform) = with_platform(TestPlatform::start());
    for log_format in ["text", "json"] {
        let daemon = sandbox
            .daemon()
            .env("RUST_LOG", "trace")
            .args(FAST_BACKOFF)
            .args(["--log-format", log_format, "--wait-timeout", "300ms"])
            .start();
        let mut seen = platform.requests();
        for fault in [
            Fault::Status(401),
            Fault::Status(500),
            Fault::NotJson,
            Fault::RateLimited {
                retry_after_secs: 1,
            },
            Fault::Status(404),
        ] {
            platform.set_fault(fault);
            daemon.signal(nix::sys::signal::Signal::SIGHUP);
            seen = platform.wait_for_requests(seen + 1, WAIT);
            let _ = sandbox.get();
        }
        platform.set_fault(Fault::PassThrough);
        daemon.signal(nix::sys::signal::Signal::SIGHUP);
        sandbox.wait_for_token();
        for args in [&["status"][..], &["status", "--json"]] {
            sandbox.credd(args).run().assert_success("credd status");
        }
        sandbox.credd_get("https", "github.com");
        if log_format == "json" {
            for line in daemon.log().text().lines() {
                assert!(
                    serde_json::from_str::<serde_json::Value>(line).is_ok(),
                    "--log-format json printed a non-JSON line: {line}"
                );
            }
        }
        daemon.stop();
    }
    assert!(!platform.issued().is_empty());
    sandbox.assert_no_secrets();
}

/// The token lives in a non-dumpable process: the kernel then hands its
/// `/proc/PID` files to root, which shows from outside when the daemon runs
/// as another user.
#[test]
fn daemon_is_not_dumpable() {
    let (sandbox, _platform) = with_platform(TestPlatform::start());
    crate::socket::prepare_for_other_uid(&sandbox);
    let daemon = crate::socket::daemon_as_other_uid(&sandbox);
    sandbox.wait_for_token();
    let environ = std::fs::metadata(format!("/proc/{}/environ", daemon.pid())).expect("stat");
    assert_eq!(
        environ.uid(),
        0,
        "/proc/PID/environ of a dumpable process belongs to its user; the daemon must set PR_SET_DUMPABLE 0"
    );
    daemon.stop();
}
