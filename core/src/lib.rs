//! What `molecule-credd` (the daemon) and `credd` (the helper) share.
//!
//! Both sides must agree byte for byte on three things, so they are defined
//! once, here: how configuration is read from the environment ([`config`]),
//! what travels over the Unix socket ([`protocol`]), and how the platform's
//! token endpoint is called and its answer judged ([`platform`]). The token
//! itself is a [`secret::Token`], which cannot be printed by accident.
//!
//! The helper's fast path (`credd get` answered by the daemon) touches only
//! [`config`], [`protocol`] and [`secret`]; [`platform`] is its slow path.
#![forbid(unsafe_code)]

pub mod config;
pub mod platform;
pub mod protocol;
pub mod secret;
pub mod socket_folder;
