//! git's credential input as `credd get` reads it from stdin: any bytes,
//! never a panic; every accepted attribute came from the input, and the
//! request's `Debug` does not depend on the password.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The helper is a binary (its start-up is the product), so its parser is
// compiled in here from source rather than through a library.
#[allow(dead_code, unreachable_pub)]
#[path = "../../helper/src/credential.rs"]
mod credential;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = credential::read_request(data) else {
        return;
    };
    for value in [
        &request.protocol,
        &request.host,
        &request.path,
        &request.username,
    ]
    .into_iter()
    .flatten()
    {
        assert!(
            value.len() <= data.len(),
            "an attribute longer than the input"
        );
    }
    // Debug must not depend on the password: the same request with another
    // password prints the same.
    if request.password.is_some() {
        let other = credential::GitRequest {
            protocol: request.protocol.clone(),
            host: request.host.clone(),
            path: request.path.clone(),
            username: request.username.clone(),
            password: Some(zeroize::Zeroizing::new("another".to_owned())),
        };
        assert_eq!(
            format!("{request:?}"),
            format!("{other:?}"),
            "Debug shows the password"
        );
    }
});
