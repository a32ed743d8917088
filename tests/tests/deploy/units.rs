//! The unit files as systemd itself reads them, and the shell scripts as
//! shellcheck reads them.

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::bin::{binary, require_tool, workspace_root as repo_root};
use testkit::{Cmd, CmdOutput};

/// Runs `systemd-analyze ARGS` in the folder `units`, output captured in `logs`.
fn analyze(
    units: &Path,
    logs: &Path,
    name: &str,
    args: &[&str],
    env: &[(&str, &Path)],
) -> CmdOutput {
    let mut command = Command::new("systemd-analyze");
    command.args(args).current_dir(units);
    for (key, value) in env {
        command.env(key, value);
    }
    Cmd::new(command, name).capture_in(logs).run()
}

/// Asserts a verify run passed and said nothing about our units.
fn assert_verified(result: &CmdOutput, what: &str) {
    assert!(
        result.status.success(),
        "{what}: systemd-analyze verify failed:\n{}",
        result.transcript()
    );
    let complaints: Vec<&str> = result
        .stderr
        .lines()
        .filter(|l| l.contains("molecule-credd"))
        .collect();
    assert!(
        complaints.is_empty(),
        "{what}: systemd-analyze complained:\n{}",
        complaints.join("\n")
    );
}

/// The system units as shipped, except the daemon's install path
/// (/usr/local/bin, absent here) points at the built binary: verify checks
/// that `ExecStart=` is executable.
fn staged_system_units(dir: &Path) -> PathBuf {
    let units = repo_root().join("systemd");
    let daemon = binary("molecule-credd");
    let service = std::fs::read_to_string(units.join("molecule-credd.service"))
        .expect("systemd/molecule-credd.service");
    assert!(
        service.contains("ExecStart=/usr/local/bin/molecule-credd "),
        "the service runs the installed daemon"
    );
    let staged = dir.join("system");
    std::fs::create_dir_all(&staged).expect("staging dir");
    std::fs::write(
        staged.join("molecule-credd.service"),
        service.replace(
            "/usr/local/bin/molecule-credd",
            daemon.to_str().expect("utf-8 path"),
        ),
    )
    .expect("stage service");
    std::fs::copy(
        units.join("molecule-credd.socket"),
        staged.join("molecule-credd.socket"),
    )
    .expect("stage socket");
    staged
}

#[test]
fn systemd_analyze_verifies_the_system_units() {
    require_tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().expect("tempdir");
    let staged = staged_system_units(dir.path());
    let result = analyze(
        &staged,
        dir.path(),
        "verify-system",
        &[
            "verify",
            "--man=no",
            "./molecule-credd.socket",
            "./molecule-credd.service",
        ],
        &[],
    );
    assert_verified(&result, "system units");
}

#[test]
fn systemd_analyze_verifies_the_user_units() {
    require_tool("systemd-analyze", "systemd");
    // The user units run %h/.local/bin/molecule-credd, as the README installs it.
    let home = tempfile::tempdir().expect("tempdir");
    let bin = home.path().join(".local/bin");
    std::fs::create_dir_all(&bin).expect("~/.local/bin");
    std::os::unix::fs::symlink(binary("molecule-credd"), bin.join("molecule-credd"))
        .expect("link daemon");
    let runtime = home.path().join("run");
    std::fs::create_dir(&runtime).expect("runtime dir");
    let units = repo_root().join("systemd/user");
    let result = analyze(
        &units,
        home.path(),
        "verify-user",
        &[
            "--user",
            "verify",
            "--man=no",
            "./molecule-credd.socket",
            "./molecule-credd.service",
        ],
        &[("HOME", home.path()), ("XDG_RUNTIME_DIR", &runtime)],
    );
    assert_verified(&result, "user units");
}

#[test]
fn the_system_unit_sandbox_rates_ok() {
    require_tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().expect("tempdir");
    let staged = staged_system_units(dir.path());
    // Exposure is 0 (locked down) … 10 (unprotected); "OK" is below 2.5.
    // systemd-analyze exits non-zero when the exposure exceeds the threshold.
    let result = analyze(
        &staged,
        dir.path(),
        "security",
        &[
            "security",
            "--offline=yes",
            "--threshold=25",
            "./molecule-credd.service",
        ],
        &[],
    );
    assert!(
        result.status.success(),
        "the service's sandbox is weaker than 2.5:\n{}",
        result.transcript()
    );
    assert!(
        result.stdout.contains("Overall exposure level"),
        "{}",
        result.transcript()
    );
}

#[test]
fn the_units_carry_the_hardening_the_issue_asks_for() {
    for unit in [
        "systemd/molecule-credd.service",
        "systemd/user/molecule-credd.service",
    ] {
        let text = std::fs::read_to_string(repo_root().join(unit)).expect("unit file");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for wanted in [
            "Type=notify",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=read-only",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "RestrictNamespaces=yes",
            "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes",
            "SystemCallFilter=@system-service",
            "CapabilityBoundingSet=",
            "UMask=0077",
        ] {
            assert!(lines.contains(&wanted), "{unit} lacks `{wanted}`");
        }
        assert!(
            lines.iter().any(|l| l.starts_with("WatchdogSec=")),
            "{unit} lacks WatchdogSec="
        );
    }
    for (unit, listen) in [
        (
            "systemd/molecule-credd.socket",
            "ListenStream=/run/molecule-credd/credd.sock",
        ),
        (
            "systemd/user/molecule-credd.socket",
            "ListenStream=%t/molecule-credd/credd.sock",
        ),
    ] {
        let text = std::fs::read_to_string(repo_root().join(unit)).expect("unit file");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert!(lines.contains(&listen), "{unit} lacks `{listen}`");
        assert!(
            lines.contains(&"SocketMode=0600"),
            "{unit} lacks SocketMode=0600"
        );
        assert!(
            lines.contains(&"DirectoryMode=0700"),
            "{unit} lacks DirectoryMode=0700"
        );
    }
}

/// Every shell script of the deployment, as CI's shellcheck step sees them.
fn shell_scripts() -> Vec<PathBuf> {
    let root = repo_root();
    let mut scripts = vec![
        root.join("workspace-template/entrypoint.sh"),
        root.join("workspace-template/bin/gh"),
        root.join("tests/tests/deploy/fake-gh/gh"),
    ];
    let fixtures = root.join("tests/tests/deploy");
    if let Ok(entries) = std::fs::read_dir(&fixtures) {
        scripts.extend(
            entries
                .filter_map(|e| Some(e.ok()?.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "sh")),
        );
    }
    scripts
}

#[test]
fn shellcheck_passes_on_every_script() {
    require_tool("shellcheck", "shellcheck");
    let dir = tempfile::tempdir().expect("tempdir");
    let scripts = shell_scripts();
    assert!(scripts.iter().all(|s| s.is_file()), "{scripts:?}");
    let mut command = Command::new("shellcheck");
    command
        .args(["--shell=sh", "--severity=style"])
        .args(&scripts);
    let result = Cmd::new(command, "shellcheck").capture_in(dir.path()).run();
    assert!(
        result.status.success(),
        "shellcheck found problems:\n{}",
        result.transcript()
    );
}
