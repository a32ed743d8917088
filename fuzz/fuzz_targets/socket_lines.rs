//! The socket protocol's request and response lines: any bytes decode to an
//! error or to a message, and a message written back reads back equal (the
//! decode also refuses a line over the protocol's cap).
#![no_main]

use credd_core::protocol::{self, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = protocol::decode::<Request>(data) {
        let line = protocol::encode(&request);
        let back: Request = protocol::decode(&line).expect("what we write we read");
        assert_eq!(back, request);
    }
    if let Ok(response) = protocol::decode::<Response>(data) {
        let line = protocol::encode(&response);
        let back: Response = protocol::decode(&line).expect("what we write we read");
        assert_eq!(back, response);
    }
});
