//! `--fetch-once`: `credd`'s way to the platform when no daemon answers.
//!
//! Living here keeps one platform client in one binary: `credd` itself stays
//! std-only and small, which is most of its start-up time on every git
//! operation. The answer is a protocol line (a token, or an error whose
//! message is the error chain, never a secret); exit 0 only with a token.
//! Its own limits ([`deadlines::FETCH_ONCE_CONNECT`],
//! [`deadlines::FETCH_ONCE_TOTAL`], the bearer read) end before `credd`'s
//! hard stop for it.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use credd_core::deadlines;
use credd_core::platform_api::{TokenQuery, Which};
use credd_core::protocol::{self, ErrorCode, Response, Source};
use credd_core::text::error_chain;
use zeroize::Zeroizing;

use crate::cli::Cli;
use crate::platform::{PlatformClient, PlatformError, Timeouts};
use crate::{process, settings};

/// Time limits for the one call: git is waiting on `credd`.
const TIMEOUTS: Timeouts = Timeouts {
    connect: deadlines::FETCH_ONCE_CONNECT,
    total: deadlines::FETCH_ONCE_TOTAL,
};

/// Makes the call, prints the answer line, returns the exit code.
pub fn run(cli: &Cli) -> ExitCode {
    let fetched = (|| -> anyhow::Result<_> {
        process::harden()?;
        let config = settings::platform_config(cli)?;
        let client =
            PlatformClient::new(&config, TIMEOUTS).context("cannot set up the platform client")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let which = match (&cli.repo, &cli.owner) {
            (Some(repository), _) => Which::Repository(repository.clone()),
            (None, Some(owner)) => Which::Owner(owner.clone()),
            (None, None) => Which::Default,
        };
        Ok(runtime.block_on(client.fetch(&TokenQuery::for_which(which)))?)
    })();
    let (response, code) = match fetched {
        Ok(grant) => (
            Response::Token {
                token: grant.token,
                // This machine's clock plus the life the platform stated.
                expires_at: unix_secs(std::time::SystemTime::now() + grant.lifetime),
                source: Source::Platform,
                scope: grant.scope,
            },
            ExitCode::SUCCESS,
        ),
        Err(error) => {
            // Outside the grant is a definite answer, not an outage.
            let not_granted = error
                .downcast_ref::<PlatformError>()
                .is_some_and(|e| e.class() == crate::platform::ErrorClass::NotGranted);
            (
                Response::Error {
                    code: if not_granted {
                        ErrorCode::NotGranted
                    } else {
                        ErrorCode::Unavailable
                    },
                    message: error_chain(error.as_ref()),
                },
                ExitCode::FAILURE,
            )
        }
    };
    let line = Zeroizing::new(protocol::encode(&response));
    let mut out = std::io::stdout().lock();
    match out.write_all(&line).and_then(|()| out.flush()) {
        Ok(()) => code,
        Err(_) => ExitCode::FAILURE,
    }
}

fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
