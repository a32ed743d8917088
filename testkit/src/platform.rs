//! The platform doubles: the service in-process behind a fault switch, and
//! the real `molecule-platform` binary.
//!
//! Why two and no more: tests of the daemon and the helper need a platform
//! they can make fail on command and whose requests they can count — the
//! real service from the `molecule_platform` library, in-process
//! ([`TestPlatform`]); tests of deployment and of the binary itself need
//! the real process ([`PlatformProcess`]). Either way the tokens and bearers
//! they hand out are registered as secrets.

mod binary;
mod in_process;

pub use binary::{PlatformProcess, StandInProcess};
pub use in_process::{
    Fault, HandedOut, PlatformOptions, SeenRequest, TestPlatform, TokenAuthority, WORKSPACE_ID,
};
