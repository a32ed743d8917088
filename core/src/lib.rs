//! The contracts between `molecule-credd` (the daemon), `credd` (the
//! helper) and `molecule-platform`, and nothing else.
//!
//! Both sides must agree byte for byte on a few things, so they are defined
//! once, here: how configuration is read from the environment ([`config`]),
//! what travels over the Unix socket ([`protocol`]), the platform's HTTP
//! API the daemon calls ([`platform_api`]), what a repository or
//! owner name may be ([`repository`]), which socket folder is
//! safe ([`socket_folder`]), the time limits that span both processes
//! ([`deadlines`]) and how text from another process is printed ([`text`]);
//! plus the one process limit both long-running binaries raise ([`limits`])
//! and, behind the `logging` feature, their one log setup (`logging`); and
//! how often an event a caller can repeat is logged ([`log_limit`]).
//! The token itself is a [`secret::Token`], which cannot be printed by
//! accident.
//!
//! Everything here is on the helper's hot path, so the crate stays small:
//! no async runtime and no HTTP stack (the platform client lives in the
//! daemon; the helper reaches the platform through `molecule-credd
//! --fetch-once`).
#![forbid(unsafe_code)]

pub mod config;
pub mod deadlines;
pub mod limits;
pub mod log_limit;
#[cfg(feature = "logging")]
pub mod logging;
pub mod platform_api;
pub mod protocol;
pub mod repository;
pub mod secret;
pub mod socket_folder;
pub mod text;
