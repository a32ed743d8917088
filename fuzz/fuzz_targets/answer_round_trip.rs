//! What `credd get` writes for git, git's way of reading it back: for any
//! token the helper would hand out and any expiry, the answer parses back to
//! the same password.
#![no_main]

use credd_core::secret::Token;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unreachable_pub)]
#[path = "../../helper/src/credential.rs"]
mod credential;

fuzz_target!(|input: (String, u64)| {
    let (value, expires_at) = input;
    let Ok(token) = Token::new(value) else {
        return;
    };
    let answer = credential::format_answer(&token, expires_at);
    let parsed = credential::read_request(answer.as_bytes()).expect("our answer parses");
    assert_eq!(
        parsed.password.as_ref().map(|p| p.as_str()),
        Some(token.expose())
    );
});
