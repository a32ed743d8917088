//! `molecule-credd`: parses, starts logging, hardens and dispatches; the
//! daemon itself is the library ([`molecule_credd`]).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use molecule_credd::cli::Cli;
use molecule_credd::settings::{EXIT_CONFIGURATION, Settings, StartError};
use molecule_credd::{bootstrap, fetch_once, process, socket, systemd};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return clap_exit(&error),
    };
    if cli.fetch_once {
        return fetch_once::run(&cli);
    }
    if cli.prepare_socket {
        return prepare_socket(&cli);
    }
    if let Some(owner) = cli.bind_socket_for {
        let Err(error) = socket::hand_over(std::path::Path::new(&cli.socket), owner, &cli.command);
        return fail(&StartError::from(error));
    }
    let settings = match Settings::from_cli(&cli) {
        Ok(settings) => settings,
        Err(error) => return fail(&error),
    };
    // Single-threaded work first (see the library's docs).
    let activated = systemd::take_activated_listener();
    process::restrict_umask();
    process::init_logging(cli.log_format);
    let result = process::harden().map_err(StartError::from).and_then(|()| {
        let bootstrap = if cli.bootstrap_from_stdin {
            bootstrap::from_stdin()
        } else {
            bootstrap::from_env()
        };
        molecule_credd::start(settings, activated, bootstrap)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

/// Prints `error` (its whole chain, one line) and gives its exit code.
fn fail(error: &StartError) -> ExitCode {
    eprintln!("error: {}", credd_core::text::error_chain(error));
    error.exit_code()
}

/// `--help`, `--version` or a usage error, printed without panicking on a
/// closed stdout (exit 1 then, quietly).
fn clap_exit(error: &clap::Error) -> ExitCode {
    let code = u8::try_from(error.exit_code()).unwrap_or(2);
    let text = error.render().to_string();
    let written = if error.use_stderr() {
        std::io::stderr().lock().write_all(text.as_bytes())
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes()).and_then(|()| out.flush())
    };
    match written {
        Ok(()) => ExitCode::from(code),
        Err(_) => ExitCode::FAILURE,
    }
}

/// `--prepare-socket`: the socket folder checked (and created) by the same
/// code the daemon binds with, so a shell entrypoint never re-implements the
/// path rule or the folder rule (and never follows a planted symlink).
fn prepare_socket(cli: &Cli) -> ExitCode {
    let prepared = Settings::from_cli(cli).and_then(|settings| {
        socket::prepare_folder(&settings.socket_path)?;
        Ok(settings.socket_path)
    });
    match prepared {
        Ok(path) => {
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{}", path.display()).and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Err(error) => {
            eprintln!("error: {}", credd_core::text::error_chain(&error));
            if matches!(error, StartError::Socket(_)) {
                ExitCode::from(socket::EXIT_FOLDER_REFUSED)
            } else {
                ExitCode::from(EXIT_CONFIGURATION)
            }
        }
    }
}
