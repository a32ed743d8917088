//! `credd configure-git`: make git ask credd first for every `CREDD_HOSTS` host.
//!
//! For each host, in the global git config (or `--file PATH`):
//! `credential.https://HOST.helper` is emptied (`--unset-all`), then given an
//! empty value — which tells git to forget helpers inherited from earlier
//! config files (a system-wide `store` helper would otherwise also receive,
//! and write to disk, every short-lived token) — then this credd's absolute
//! path, then the fallback helper if one was given, wrapped as `credd
//! fallback 'HELPER'` (see [`crate::fallback`]: it never receives credd's
//! tokens, and it is asked without the repository path, so its host-level
//! entries still match). Writing the whole list each time makes it
//! idempotent: a second run leaves the same config.
//! `credential.https://HOST.useHttpPath` is set to `true`, so git tells
//! credd which repository it is about (`path=acme/api.git`) and credd can
//! hand out that repository's owner's token rather than the default one.
//! The real `git config` does the writing, so its locking and quoting apply.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use credd_core::config::HelperConfig;

/// Options of `credd configure-git`.
#[derive(Debug, Default)]
pub(crate) struct Options {
    /// Helper git asks after credd (git's helper syntax: a name, a path or `!cmd`).
    pub(crate) fallback_helper: Option<OsString>,
    /// Config file to write instead of the global one.
    pub(crate) file: Option<PathBuf>,
}

/// Writes the helper configuration for every configured host.
pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    let config = HelperConfig::from_env().context("configuration")?;
    let exe =
        std::env::current_exe().context("cannot find credd's own path (is /proc mounted?)")?;
    let helper = helper_value(&exe)?;
    let fallback = options
        .fallback_helper
        .as_ref()
        .map(|f| fallback_value(&helper, f))
        .transpose()?;
    let scope: Vec<OsString> = match &options.file {
        Some(file) => vec!["--file".into(), file.into()],
        None => vec!["--global".into()],
    };
    let target = options.file.as_ref().map_or_else(
        || "the global git config".to_owned(),
        |f| f.display().to_string(),
    );
    for host in &config.hosts {
        let key = format!("credential.https://{host}.helper");
        let path_key = format!("credential.https://{host}.useHttpPath");
        // Both reset first, so a second run writes them in the same order.
        for reset in [&key, &path_key] {
            // 5 = "the key was not set": nothing to remove.
            git_config(
                &scope,
                &[&"--unset-all".into(), &reset.clone().into()],
                &[0, 5],
            )
            .with_context(|| format!("resetting {reset} in {target}"))?;
        }
        let mut values: Vec<OsString> = vec![OsString::new(), helper.clone()];
        values.extend(fallback.clone());
        for value in &values {
            git_config(&scope, &[&"--add".into(), &key.clone().into(), value], &[0])
                .with_context(|| format!("adding a helper to {key} in {target}"))?;
        }
        git_config(&scope, &[&path_key.clone().into(), &"true".into()], &[0])
            .with_context(|| format!("setting {path_key} in {target}"))?;
        // A progress line: git's config is written whether anyone reads it.
        let _ = writeln!(
            std::io::stdout().lock(),
            "configured {key} and {path_key} in {target}"
        );
    }
    Ok(())
}

/// The helper string for `exe`: git runs a helper that is an absolute path
/// through the shell, so a path with shell-special characters is quoted —
/// and then marked `!` (a shell command), since git takes a value that does
/// not start with `/` or `!` for a helper name (`git credential-'…'`).
fn helper_value(exe: &Path) -> anyhow::Result<OsString> {
    let Some(path) = exe.to_str() else {
        bail!(
            "credd's path {} is not UTF-8; install credd under a plain path",
            exe.display()
        );
    };
    let plain = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._+-".contains(&b));
    Ok(if plain {
        path.into()
    } else {
        format!("!{}", shell_quoted(path)).into()
    })
}

/// The helper string that runs `fallback` behind `credd fallback` (credd
/// being `credd_helper`, a [`helper_value`]); git appends the action.
fn fallback_value(credd_helper: &OsString, fallback: &OsString) -> anyhow::Result<OsString> {
    let (Some(credd), Some(fallback)) = (credd_helper.to_str(), fallback.to_str()) else {
        bail!("the fallback helper is not UTF-8");
    };
    Ok(format!("{credd} fallback {}", shell_quoted(fallback)).into())
}

/// `text` as one single-quoted shell word.
fn shell_quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn git_config(scope: &[OsString], args: &[&OsString], ok_codes: &[i32]) -> anyhow::Result<()> {
    let output = Command::new("git")
        .arg("config")
        .args(scope)
        .args(args)
        .output()
        .context("cannot run git; install git or put it on PATH")?;
    match output.status.code() {
        Some(code) if ok_codes.contains(&code) => Ok(()),
        _ => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let said = stderr
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" / ");
            bail!(
                "git config failed ({}): {}; check that the config file is writable, or pass --file PATH",
                output.status,
                if said.is_empty() { "no message" } else { &said }
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_paths_are_quoted_only_when_needed() {
        assert_eq!(
            helper_value(Path::new("/usr/bin/credd")).expect("ok"),
            "/usr/bin/credd"
        );
        assert_eq!(
            helper_value(Path::new("/opt/my tools/it's/credd")).expect("ok"),
            r"!'/opt/my tools/it'\''s/credd'"
        );
    }

    #[test]
    fn the_fallback_is_one_quoted_word_behind_credd_fallback() {
        let credd = helper_value(Path::new("/usr/bin/credd")).expect("ok");
        assert_eq!(
            fallback_value(&credd, &"store --file ~/.git-pat".into()).expect("ok"),
            "/usr/bin/credd fallback 'store --file ~/.git-pat'"
        );
        let credd = helper_value(Path::new("/opt/my tools/credd")).expect("ok");
        assert_eq!(
            fallback_value(&credd, &"!pat-helper --user 'me'".into()).expect("ok"),
            r"!'/opt/my tools/credd' fallback '!pat-helper --user '\''me'\'''"
        );
    }
}
