//! The platform's grants file (TOML): any text parses to a table or to a
//! one-line error naming a line of the input, never a panic; every scope of
//! a parsed table obeys the caps and names an owner the table resolves.
#![no_main]

use credd_core::platform_api::Which;
use credd_core::repository::is_valid_owner;
use libfuzzer_sys::fuzz_target;
use molecule_platform::grants::{GrantTable, GrantsFileError, MAX_REPOSITORIES_PER_OWNER};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match GrantTable::parse(text, "<fuzz>") {
        Ok(table) => {
            for id in ["ws-1", "ws-42", "a", "x.y"] {
                for scope in table.scopes(id) {
                    assert!(is_valid_owner(&scope.owner));
                    if let Some(names) = &scope.repositories {
                        assert!(!names.is_empty() && names.len() <= MAX_REPOSITORIES_PER_OWNER);
                    }
                    let again = table
                        .resolve(id, &Which::Owner(scope.owner.clone()))
                        .expect("a granted owner resolves");
                    assert_eq!(again, scope);
                }
            }
        }
        Err(GrantsFileError::Invalid { line, reason, .. }) => {
            assert!(line >= 1 && line <= text.lines().count().max(1) + 1);
            assert!(!reason.contains('\n'));
        }
        Err(other) => panic!("parsing text cannot fail to read: {other}"),
    }
});
