//! The platform's token-route query (`credd_core::platform_api`), as the
//! platform reads it from any client: any name-value pairs are a query or
//! one of a fixed few refusals (none quotes what it was sent), never a panic; a
//! query that parses is written back by `pairs()` to the same query.
#![no_main]

use credd_core::platform_api::{QueryError, TokenQuery};
use credd_core::repository::NameError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // URL-decoded already (the HTTP library's job): `&` between pairs, `=`
    // between name and value.
    let pairs: Vec<(&str, &str)> = text
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .collect();
    match TokenQuery::parse(pairs.iter().copied()) {
        Ok(query) => {
            let written = query.pairs();
            let again = TokenQuery::parse(written.iter().map(|(n, v)| (*n, v.as_str())))
                .expect("a query's own pairs parse");
            assert_eq!(again, query);
        }
        Err(error) => {
            // No refusal carries its input: the message is one of a fixed few.
            let fixed = [
                QueryError::WhichTwice,
                QueryError::MinRemainingTwice,
                QueryError::MinRemainingNotSeconds,
                QueryError::Unknown,
                QueryError::Name(NameError::NotOwnerSlashName),
                QueryError::Name(NameError::BadOwner),
                QueryError::Name(NameError::BadName),
            ];
            assert!(fixed.iter().any(|f| f.to_string() == error.to_string()));
        }
    }
});
