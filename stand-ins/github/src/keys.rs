//! The App's RSA key pair, made with the `openssl` CLI: the stand-in
//! process writes it for the platform it serves, and tests that start the
//! stand-in in process make theirs the same way.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// Runs `openssl ARGS…` (stdin closed); its stderr's gist when it fails.
pub fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("the stand-in generates its App key with the openssl CLI")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Generates `app.pem` (PKCS#8, 0600) and `app.pub.pem` in `dir`; the
/// public key's text.
pub fn generate(dir: &Path) -> anyhow::Result<String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let private = dir.join("app.pem");
    let public = dir.join("app.pub.pem");
    let text = |p: &Path| p.to_str().map(str::to_owned).context("non-UTF-8 path");
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &text(&private)?,
    ])?;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", private.display()))?;
    openssl(&[
        "pkey",
        "-in",
        &text(&private)?,
        "-pubout",
        "-out",
        &text(&public)?,
    ])?;
    std::fs::read_to_string(&public).with_context(|| format!("cannot read {}", public.display()))
}
