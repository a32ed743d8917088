//! The platform's workspace tokens file (`ID SHA256-HEX` lines, comments):
//! any text parses to a table or to an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use molecule_platform::WorkspaceTokens;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = WorkspaceTokens::parse(text);
    }
});
