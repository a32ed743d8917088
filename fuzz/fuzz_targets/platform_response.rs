//! The platform's token answer: a `Date` header, a `Retry-After` header and
//! the body, as the daemon's platform client judges them. Never a panic, a
//! lifetime only when the token has life left, and no error that quotes a
//! body that could hold a token.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use molecule_credd::platform::{MAX_RETRY_AFTER, parse_date, parse_grant, parse_retry_after};

fuzz_target!(|data: &[u8]| {
    // Line 1: Date; line 2: Retry-After; the rest: the body.
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let date = parts.next().and_then(|d| std::str::from_utf8(d).ok());
    let retry = parts.next().and_then(|r| std::str::from_utf8(r).ok());
    let body = parts.next().unwrap_or_default();
    let now = date
        .and_then(parse_date)
        .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    if let Some(wait) = retry.and_then(|r| parse_retry_after(r, now)) {
        assert!(wait <= MAX_RETRY_AFTER);
    }
    match parse_grant(body, now) {
        Ok(grant) => assert!(!grant.lifetime.is_zero()),
        Err(error) => {
            // Only a JSON object or array can carry a token, and none of
            // our messages holds a 16-byte one: a body of plain words may
            // match our own text ("not valid JSON (", a crash CI found)
            // without quoting anything.
            if let Ok(text) = std::str::from_utf8(body)
                && text.len() >= 16
                && text.contains(['{', '['])
            {
                assert!(
                    !error.to_string().contains(text),
                    "an error quoted the body"
                );
            }
        }
    }
});
