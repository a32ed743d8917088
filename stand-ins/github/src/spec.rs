//! GitHub's own description of the calls the platform makes, as a validator.
//!
//! Why: a stand-in we write can only show the bugs of a world we imagine.
//! Checking every answer the stand-in gives and every request it receives
//! against GitHub's published OpenAPI description (the `@octokit/openapi`
//! npm package) makes the stand-in speak GitHub's documented shapes, and a
//! request GitHub would refuse fail the test that made it.
//!
//! The description is the committed, generated subset
//! `openapi/github-app-api.json` (`scripts/github-openapi.sh` extracts and
//! converts it to JSON Schema 2020-12; CI checks it against the package).
//! Formats (`date-time`, `uri`) are validated too.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use serde_json::Value;

/// The generated subset of GitHub's API description.
pub const DESCRIPTION: &str = include_str!("../openapi/github-app-api.json");

/// The operation that mints installation tokens.
pub const MINT: &str = "create-installation-access-token";
/// The operation that lists the App's installations.
pub const LIST: &str = "list-installations";

static DOCUMENT: LazyLock<Value> =
    LazyLock::new(|| serde_json::from_str(DESCRIPTION).expect("the generated description is JSON"));

static VALIDATORS: LazyLock<Mutex<HashMap<String, &'static jsonschema::Validator>>> =
    LazyLock::new(Mutex::default);

/// The whole generated document.
pub fn document() -> &'static Value {
    &DOCUMENT
}

/// The package version the description comes from (`@octokit/openapi X`).
pub fn source() -> String {
    let source = &document()["source"];
    format!(
        "{} {}",
        source["package"].as_str().unwrap_or("?"),
        source["version"].as_str().unwrap_or("?")
    )
}

/// GitHub's own example named `name` (`create-installation-access-token.201`,
/// `list-installations.200`, `create-installation-access-token.request`).
pub fn example(name: &str) -> &'static Value {
    let value = &document()["github_examples"][name];
    assert!(!value.is_null(), "no example {name} in the description");
    value
}

fn validator(definition: &str) -> &'static jsonschema::Validator {
    let mut cache = VALIDATORS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(validator) = cache.get(definition) {
        return validator;
    }
    assert!(
        !document()["$defs"][definition].is_null(),
        "no schema {definition} in the description"
    );
    let mut root = document().clone();
    root["$ref"] = Value::String(format!("#/$defs/{definition}"));
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema {definition} does not compile: {e}"));
    let validator: &'static jsonschema::Validator = Box::leak(Box::new(validator));
    cache.insert(definition.to_owned(), validator);
    validator
}

/// Checks `value` against the schema `definition` (a `$defs` name); the
/// violations, each as `PATH: what`, bounded to the first 20.
pub fn check(definition: &str, value: &Value) -> Result<(), Vec<String>> {
    let errors: Vec<String> = validator(definition)
        .iter_errors(value)
        .take(20)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The schema name of `operation`'s request body.
pub fn request_schema(operation: &str) -> &'static str {
    document()["operations"][operation]["request"]
        .as_str()
        .unwrap_or_else(|| panic!("{operation} has no request body in the description"))
}

/// The schema name of `operation`'s answer with `status`, if GitHub
/// documents one.
pub fn answer_schema(operation: &str, status: u16) -> Option<&'static str> {
    document()["operations"][operation]["responses"][status.to_string()].as_str()
}

/// Checks a request body of `operation` as GitHub does, which is stricter
/// than the schema's letter: the schema, then no property the description
/// does not name (the schemas leave `additionalProperties` open, but GitHub
/// answers 422 to a permission it does not know), then what the
/// description's text says of the mint: `repositories` are repository
/// names (not `OWNER/NAME`), at most 500.
pub fn check_request(operation: &str, body: &Value) -> Result<(), Vec<String>> {
    let schema = request_schema(operation);
    let mut errors = match check(schema, body) {
        Ok(()) => Vec::new(),
        Err(errors) => errors,
    };
    unnamed_properties(&document()["$defs"][schema], body, "", &mut errors);
    if operation == MINT
        && let Some(names) = body.get("repositories").and_then(Value::as_array)
    {
        if names.len() > MAX_MINT_REPOSITORIES {
            errors.push(format!(
                "/repositories: {} names, GitHub mints for at most {MAX_MINT_REPOSITORIES}",
                names.len()
            ));
        }
        for (i, name) in names.iter().enumerate() {
            if let Some(name) = name.as_str()
                && !is_repository_name(name)
            {
                errors.push(format!(
                    "/repositories/{i}: {name:?} is not a repository name"
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// GitHub mints a token for at most this many repositories (the operation's
/// description: "Up to 500 repositories can be listed in this manner").
pub const MAX_MINT_REPOSITORIES: usize = 500;

/// Whether `name` is a repository name as GitHub allows them.
fn is_repository_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Adds a violation for each property of `value` that `schema` (following
/// `$ref`s into `$defs`) does not name.
fn unnamed_properties(schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.trim_start_matches("#/$defs/");
            &document()["$defs"][name]
        }
        None => schema,
    };
    let (Some(named), Some(object)) = (
        schema.get("properties").and_then(Value::as_object),
        value.as_object(),
    ) else {
        return;
    };
    for (key, sub) in object {
        match named.get(key) {
            Some(sub_schema) => unnamed_properties(sub_schema, sub, &format!("{at}/{key}"), errors),
            None => errors.push(format!(
                "{at}/{key}: not a property GitHub's description names"
            )),
        }
    }
}

/// Checks an answer of `operation` with `status`: its body must match the
/// documented schema, and the status must be one GitHub documents for it
/// (a rate limit's 429, and 5xx, are documented for every route).
pub fn check_answer(operation: &str, status: u16, body: &Value) -> Result<(), Vec<String>> {
    match answer_schema(operation, status) {
        Some(schema) => check(schema, body),
        None if status == 429 || status >= 500 => check("basic-error", body),
        None if status == 403 => check("basic-error", body),
        None => Err(vec![format!(
            "{operation} has no documented answer {status}"
        )]),
    }
}

/// Every permission name `app-permissions` has, with its levels.
pub fn permission_levels() -> Vec<(String, Vec<String>)> {
    document()["$defs"]["app-permissions"]["properties"]
        .as_object()
        .expect("app-permissions has properties")
        .iter()
        .map(|(name, schema)| {
            let levels = schema["enum"]
                .as_array()
                .map(|levels| {
                    levels
                        .iter()
                        .filter_map(|l| l.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            (name.clone(), levels)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn githubs_own_examples_match_its_schemas() {
        check_request(MINT, example("create-installation-access-token.request"))
            .expect("the request example");
        check_answer(MINT, 201, example("create-installation-access-token.201"))
            .expect("the token example");
        check_answer(LIST, 200, example("list-installations.200")).expect("the listing example");
    }

    #[test]
    fn the_schemas_can_fail() {
        let errors = check_request(
            MINT,
            &serde_json::json!({"repositories": [1], "permissions": {"workflows": "read", "pull_request": "write"}}),
        )
        .expect_err("wrong");
        assert!(errors.len() >= 3, "{errors:?}");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("/permissions/pull_request")),
            "{errors:?}"
        );
        let errors = check_request(MINT, &serde_json::json!({"repositories": ["acme/api"]}))
            .expect_err("OWNER/NAME");
        assert_eq!(
            errors,
            ["/repositories/0: \"acme/api\" is not a repository name"]
        );
        let mut token = example("create-installation-access-token.201").clone();
        token.as_object_mut().unwrap().remove("expires_at");
        assert!(check_answer(MINT, 201, &token).is_err());
        let mut listing = example("list-installations.200").clone();
        listing[0]["account"] = serde_json::json!({"slug": "only-a-slug"});
        assert!(
            check_answer(LIST, 200, &listing).is_err(),
            "half an account"
        );
        listing[0]["account"] = Value::Null;
        check_answer(LIST, 200, &listing).expect("a null account is documented");
        assert!(check_answer(MINT, 418, &serde_json::json!({})).is_err());
    }
}
