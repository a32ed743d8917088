//! git's credential input as `credd get` reads it from stdin: any bytes,
//! never a panic, and whatever is accepted stays within the parser's bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The helper is a binary (its start-up is the product), so its parser is
// compiled in here from source rather than through a library.
#[allow(dead_code, unreachable_pub)]
#[path = "../../helper/src/credential.rs"]
mod credential;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = credential::read_request(data) {
        // Nothing accepted is larger than what was read.
        let _ = format!("{request:?}");
    }
});
