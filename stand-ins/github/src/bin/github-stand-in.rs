//! `github-stand-in`: the GitHub stand-in as a process, for scripts and
//! cross-crate tests that run the real `molecule-platform` in GitHub mode.
//!
//! ```text
//! github-stand-in [--listen 127.0.0.1:0] [--keys-dir DIR] [--install LOGIN=ID]... [--page-size N]
//! ```
//!
//! Generates the App's RSA key pair with the `openssl` CLI into `--keys-dir`
//! (default: a fresh 0700 folder under `$TMPDIR`): `app.pem` (PKCS#8, 0600,
//! for `GITHUB_APP_PRIVATE_KEY_FILE`) and `app.pub.pem`. Then prints one line
//! on stdout and serves until SIGTERM or SIGINT:
//!
//! ```text
//! github-stand-in listening on http://127.0.0.1:PORT keys DIR app-id 4242 installation 777
//! ```
//!
//! Steer and inspect it through `/_stand-in/…` (see the library's
//! `inspect` module). Loopback only: it hands out fake tokens to anyone.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use github_stand_in::{APP_ID, GitHubStandIn, INSTALLATION_ID};

struct Options {
    listen: String,
    keys_dir: Option<PathBuf>,
    installs: Vec<(String, u64)>,
    page_size: Option<usize>,
}

fn parse_args() -> anyhow::Result<Options> {
    let mut options = Options {
        listen: "127.0.0.1:0".into(),
        keys_dir: None,
        installs: Vec::new(),
        page_size: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => options.listen = value("--listen")?,
            "--keys-dir" => options.keys_dir = Some(value("--keys-dir")?.into()),
            "--install" => {
                let spec = value("--install")?;
                let (login, id) = spec
                    .split_once('=')
                    .with_context(|| format!("--install takes LOGIN=ID, got {spec:?}"))?;
                let id: u64 =
                    id.parse().ok().filter(|id| *id > 0).with_context(|| {
                        format!("--install {spec:?}: ID must be a positive number")
                    })?;
                options.installs.push((login.to_owned(), id));
            }
            "--page-size" => {
                options.page_size = Some(
                    value("--page-size")?
                        .parse()
                        .context("--page-size must be a number")?,
                );
            }
            "--help" | "-h" => {
                println!(
                    "usage: github-stand-in [--listen 127.0.0.1:0] [--keys-dir DIR] [--install LOGIN=ID]... [--page-size N]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(options)
}

fn main() -> anyhow::Result<()> {
    let options = parse_args()?;
    let addr: std::net::SocketAddr = options
        .listen
        .parse()
        .with_context(|| format!("--listen must be IP:PORT, got {:?}", options.listen))?;
    if !addr.ip().is_loopback() {
        bail!("--listen must be a loopback address: the stand-in hands out tokens to anyone");
    }
    let keys_dir = match options.keys_dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!(
            "github-stand-in-{}-{}",
            std::process::id(),
            github_stand_in::random_alnum(8)
        )),
    };
    let public = github_stand_in::keys::generate(&keys_dir)?;
    let stand_in = GitHubStandIn::on(
        &public,
        std::sync::Arc::new(jiff::Timestamp::now),
        &addr.to_string(),
    );
    for (login, id) in &options.installs {
        stand_in.add_installation(login, *id);
    }
    if let Some(n) = options.page_size {
        stand_in.set_page_size(n);
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "github-stand-in listening on {} keys {} app-id {APP_ID} installation {INSTALLATION_ID}",
            stand_in.url(),
            keys_dir.display()
        )?;
        out.flush()?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terms = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut ints = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        tokio::select! {
            _ = terms.recv() => {}
            _ = ints.recv() => {}
        }
        anyhow::Ok(())
    })?;
    drop(stand_in);
    Ok(())
}
