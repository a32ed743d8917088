//! The docs checked against the tree, so they cannot drift unnoticed.
//!
//! - Every `.rs` file under the source folders is named in ARCHITECTURE.md's
//!   code map, by its path or by a folder entry (`path/`) that covers it,
//!   and under exactly one boundary (one `###` group of the map); every
//!   group states an `**Invariant:**`.
//! - Every path the code map names exists.
//! - Every relative link in the docs resolves to a file, and its `#anchor`
//!   to a heading of that file.
//! - Every repository path in backticks in the docs exists (a path whose
//!   first folder is one of the repository's top-level folders).
//! - A name `credd-core` owns (a rule, a limit, a default, a deadline) is
//!   defined only in `core/`: a second `fn`/`const` of that name elsewhere
//!   is a second definition of the meaning.
//!
//! - Production code stays small enough to read: no file in the production
//!   crates over [`MAX_FILE_LINES`] lines before its tests, no function
//!   over [`MAX_FUNCTION_LINES`] (a declarative table may be longer when
//!   the line before it says so: [`LONG_TABLE`]).
//!
//! Std only, plain text scans: each check is a function from text (and a
//! way to ask the file system) to the list of offenders, tested on its own
//! below with planted offenders, then run over the real tree.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The source folders whose every `.rs` file the code map must name
/// (`*` is one folder level).
const SOURCE_ROOTS: &[&str] = &[
    "core/src",
    "daemon/src",
    "helper/src",
    "platform/src",
    "stand-ins/*/src",
    "testkit/src",
    "tests/src",
];

/// The docs whose links and paths are checked, besides every `.md` file
/// under `docs/`.
const DOCS: &[&str] = &[
    "README.md",
    "ARCHITECTURE.md",
    "SECURITY.md",
    "platform/README.md",
    "systemd/README.md",
    "workspace-template/README.md",
];

/// The production crates' source, held to the size limits.
const PRODUCTION_ROOTS: &[&str] = &["core/src", "daemon/src", "helper/src", "platform/src"];

/// Most lines of a production file before its `#[cfg(test)]` module.
const MAX_FILE_LINES: usize = 600;

/// Most lines of a production function, its signature to its closing brace.
const MAX_FUNCTION_LINES: usize = 80;

/// Written on the line before a function that is a declarative table (a
/// list of cases, not steps), which may be longer.
const LONG_TABLE: &str = "// tidy: a declarative table";

/// Functions `credd-core` defines for every crate: the name rules, the
/// token text rule, the socket paths and folder, the text rules.
const CORE_FUNCTIONS: &[&str] = &[
    "is_valid_owner",
    "is_valid_name",
    "same_name",
    "is_valid_workspace_id",
    "check_token_text",
    "default_socket_path",
    "default_socket_path_from_env",
    "folder_of",
    "one_line",
    "error_chain",
    "fingerprint_of_digest",
    "parse_sha256_hex",
    "raise_open_file_limit",
    "token_path",
];

/// Constants `credd-core` defines for every crate: limits, defaults,
/// variable names and the cross-process deadlines.
const CORE_CONSTANTS: &[&str] = &[
    "MAX_TOKEN_LEN",
    "FINGERPRINT_HEX_LEN",
    "GITHUB_TOKEN_USERNAME",
    "MAX_OWNER_LEN",
    "MAX_NAME_LEN",
    "MAX_FULL_NAME_LEN",
    "MAX_REPOSITORIES_PER_TOKEN",
    "MAX_OWNER_TOKENS",
    "MAX_STATUS_REPOSITORIES",
    "MAX_ANSWER_LINE",
    "MAX_WORKSPACE_ID_LEN",
    "MAX_LINE",
    "MAX_TOKEN_ANSWER",
    "MAX_SCOPE_PERMISSIONS",
    "MAX_PERMISSION_TEXT",
    "AUTH_TOKEN_FILE",
    "DEFAULT_PLATFORM_URL",
    "DEFAULT_CONFIGS_DIR",
    "DEFAULT_HOSTS",
    "PLATFORM_URL",
    "CONFIGS_DIR",
    "CREDD_SOCKET",
    "CREDD_HOSTS",
    "CREDD_DAEMON_UID",
    "HELPER_CONNECT",
    "HELPER_READ",
    "DAEMON_WAIT_DEFAULT",
    "DAEMON_WAIT_MAX",
    "BEARER_READ",
    "FETCH_ONCE_CONNECT",
    "FETCH_ONCE_TOTAL",
    "HELPER_FETCH_ONCE",
    "TOKEN_ROUTE",
    "REFUSALS_ROUTE",
    "REFUSALS_SEGMENT",
    "ADMIN_TOKEN_ROUTE",
    "REPOSITORY_PARAMETER",
    "OWNER_PARAMETER",
    "MIN_REMAINING_PARAMETER",
];

/// Types `credd-core` defines for every crate.
const CORE_TYPES: &[&str] = &[
    "LogFormat",
    "Token",
    "TokenError",
    "Which",
    "TokenQuery",
    "TokenAnswer",
    "RefusalReport",
    "ErrorAnswer",
    "Request",
    "Response",
    "Status",
    "TokenStatus",
    "Scope",
    "PlatformConfig",
    "HelperConfig",
];

/// Macros `credd-core` defines: the wire names.
const CORE_MACROS: &[&str] = &["wire_enum"];

/// The repository's root (this package is `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `path` relative to `root`, with `/` separators.
fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).expect("under the root");
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Every file under `dir` whose name ends with `suffix`, skipping build
/// output (`target/`) and `.git`; relative to `root`, sorted.
fn files_under(root: &Path, dir: &Path, suffix: &str, skip: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = relative(root, &path);
            if name == "target" || name == ".git" || skip.contains(&rel.as_str()) {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if name.ends_with(suffix) {
                found.push(rel);
            }
        }
    }
    found.sort();
    found
}

/// The `.rs` files the code map must name.
fn source_files(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for pattern in SOURCE_ROOTS {
        let dirs: Vec<PathBuf> = match pattern.split_once("/*/") {
            Some((parent, tail)) => std::fs::read_dir(root.join(parent))
                .unwrap_or_else(|e| panic!("read {parent}: {e}"))
                .flatten()
                .map(|e| e.path().join(tail))
                .filter(|p| p.is_dir())
                .collect(),
            None => vec![root.join(pattern)],
        };
        for dir in dirs {
            assert!(dir.is_dir(), "source folder {} is missing", dir.display());
            files.extend(files_under(root, &dir, ".rs", &[]));
        }
    }
    files
}

/// The docs to check: [`DOCS`] and every `.md` under `docs/`.
fn docs(root: &Path) -> Vec<String> {
    let mut docs: Vec<String> = DOCS.iter().map(|d| (*d).to_owned()).collect();
    docs.extend(files_under(root, &root.join("docs"), ".md", &[]));
    docs
}

// ---- the code map -----------------------------------------------------------

/// One entry of the code map: `- \`path\`` under a `###` group.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    group: String,
    path: String,
    line: usize,
}

/// The code map of ARCHITECTURE.md's text: its entries, and the groups
/// that state no invariant or list no entry (as offenders).
fn code_map(architecture: &str) -> (Vec<Entry>, Vec<String>) {
    let mut entries = Vec::new();
    let mut in_map = false;
    let mut group: Option<String> = None;
    // group -> (has an invariant, number of entries)
    let mut groups: BTreeMap<String, (bool, usize)> = BTreeMap::new();
    for (i, line) in architecture.lines().enumerate() {
        if let Some(heading) = line.strip_prefix("## ") {
            in_map = heading.trim() == "Code map";
            group = None;
            continue;
        }
        if !in_map {
            continue;
        }
        if let Some(heading) = line.strip_prefix("### ") {
            let name = heading.trim().to_owned();
            groups.entry(name.clone()).or_default();
            group = Some(name);
            continue;
        }
        let Some(name) = &group else {
            continue;
        };
        if line.starts_with("**Invariant:**") {
            groups.entry(name.clone()).or_default().0 = true;
        }
        if let Some(rest) = line.strip_prefix("- `")
            && let Some((path, _)) = rest.split_once('`')
        {
            groups.entry(name.clone()).or_default().1 += 1;
            entries.push(Entry {
                group: name.clone(),
                path: path.to_owned(),
                line: i + 1,
            });
        }
    }
    let mut problems = Vec::new();
    if !architecture.lines().any(|l| l.trim() == "## Code map") {
        problems.push("ARCHITECTURE.md has no `## Code map` section".to_owned());
    }
    for (name, (invariant, count)) in &groups {
        if !invariant {
            problems.push(format!(
                "code map group \"{name}\" states no `**Invariant:**` line"
            ));
        }
        if *count == 0 {
            problems.push(format!("code map group \"{name}\" lists no path"));
        }
    }
    (entries, problems)
}

/// Whether `entry` names `file`: the same path, or a folder entry (ending
/// in `/`) above it.
fn covers(entry: &str, file: &str) -> bool {
    entry == file || (entry.ends_with('/') && file.starts_with(entry))
}

/// Source files the map does not name, or names under more than one group.
fn unmapped(files: &[String], entries: &[Entry]) -> Vec<String> {
    let mut problems = Vec::new();
    for file in files {
        let groups: BTreeSet<&str> = entries
            .iter()
            .filter(|e| covers(&e.path, file))
            .map(|e| e.group.as_str())
            .collect();
        match groups.len() {
            0 => problems.push(format!(
                "{file} is not in ARCHITECTURE.md's code map: add it (or a folder entry `DIR/` covering it) under the boundary it serves"
            )),
            1 => {}
            _ => problems.push(format!(
                "{file} is under more than one boundary in ARCHITECTURE.md's code map: {groups:?}"
            )),
        }
    }
    problems
}

/// Map entries whose path does not exist (`exists` answers for a path
/// relative to the root; a folder entry must be a folder).
fn missing_entries(entries: &[Entry], exists: &dyn Fn(&str) -> Kind) -> Vec<String> {
    entries
        .iter()
        .filter_map(|e| {
            let kind = exists(e.path.trim_end_matches('/'));
            let wrong = match kind {
                Kind::Missing => Some("does not exist"),
                Kind::File if e.path.ends_with('/') => Some("is a file, not a folder"),
                Kind::Folder if !e.path.ends_with('/') => {
                    Some("is a folder: write it with a trailing `/`")
                }
                _ => None,
            };
            wrong.map(|why| {
                format!(
                    "ARCHITECTURE.md:{}: the code map names `{}`, which {why}",
                    e.line, e.path
                )
            })
        })
        .collect()
}

/// What is at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Missing,
    File,
    Folder,
}

fn kind_at(path: &Path) -> Kind {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Kind::Folder,
        Ok(_) => Kind::File,
        Err(_) => Kind::Missing,
    }
}

// ---- markdown ---------------------------------------------------------------

/// `text` without fenced code blocks (their lines become empty, so line
/// numbers stay right).
fn without_fences(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            out.push('\n');
            continue;
        }
        if !fenced {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// The inline code spans of `text` (fences removed), each with its line.
fn code_spans(text: &str) -> Vec<(usize, String)> {
    let text = without_fences(text);
    let mut spans = Vec::new();
    let mut line = 1;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '\n' {
            line += 1;
        }
        if c != '`' {
            continue;
        }
        let start = i + 1;
        let Some(len) = text[start..].find('`') else {
            break;
        };
        let span = &text[start..start + len];
        spans.push((line, span.to_owned()));
        line += span.matches('\n').count();
        // Skip past the closing backtick.
        while chars.peek().is_some_and(|&(j, _)| j <= start + len) {
            chars.next();
        }
    }
    spans
}

/// `text` with its inline code spans blanked out (links inside code are
/// not links).
fn without_code(text: &str) -> String {
    let text = without_fences(text);
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for c in text.chars() {
        if c == '`' {
            inside = !inside;
            out.push(' ');
        } else if inside && c != '\n' {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// The targets of the inline links and images of `text`: `[text](target)`,
/// with the line each is on.
fn link_targets(text: &str) -> Vec<(usize, String)> {
    let text = without_code(text);
    let mut targets = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else {
                break;
            };
            // `(target "title")`: the target is the first word.
            let target = after[..end].split_whitespace().next().unwrap_or("");
            targets.push((n + 1, target.to_owned()));
            rest = &after[end..];
        }
    }
    targets
}

/// The anchors GitHub gives `text`'s headings: lower case, letters,
/// digits, `-` and `_` kept, spaces become `-`, the rest dropped; a repeated
/// one gets `-1`, `-2`….
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for line in without_fences(text).lines() {
        let trimmed = line.trim_start_matches('#');
        if trimmed.len() == line.len() || !trimmed.starts_with(' ') {
            continue;
        }
        // Link text only: `[text](url)` → `text`.
        let mut heading = String::new();
        let mut rest = trimmed.trim();
        while let Some(open) = rest.find('[') {
            match rest[open..].find("](").map(|m| open + m) {
                Some(mid) => match rest[mid..].find(')') {
                    Some(close) => {
                        heading.push_str(&rest[..open]);
                        heading.push_str(&rest[open + 1..mid]);
                        rest = &rest[mid + close + 1..];
                    }
                    None => break,
                },
                None => break,
            }
        }
        heading.push_str(rest);
        let mut slug = String::new();
        for c in heading.to_lowercase().chars() {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                slug.push(c);
            } else if c == ' ' {
                slug.push('-');
            }
        }
        let count = seen.entry(slug.clone()).or_insert(0);
        let anchor = if *count == 0 {
            slug.clone()
        } else {
            format!("{slug}-{count}")
        };
        *count += 1;
        anchors.insert(anchor);
    }
    anchors
}

/// `base/target`, with `.` and `..` resolved; `None` when it climbs out.
fn join(base: &str, target: &str) -> Option<String> {
    let mut parts: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            _ => parts.push(part),
        }
    }
    Some(parts.join("/"))
}

/// The folder of `doc` (relative to the root), `""` at the root.
fn folder_of(doc: &str) -> &str {
    doc.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// Relative links of `doc` (its `text`) that point to no file, or to no
/// heading of a markdown file. `read_doc` gives a file's text, `None` when
/// it does not exist (a folder is `Some("")`).
fn broken_links(doc: &str, text: &str, read_doc: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (line, target) in link_targets(text) {
        if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (target.as_str(), None),
        };
        let file = if path.is_empty() {
            Some(doc.to_owned())
        } else {
            join(folder_of(doc), path)
        };
        let Some(file) = file else {
            problems.push(format!(
                "{doc}:{line}: link `{target}` leaves the repository"
            ));
            continue;
        };
        let Some(content) = read_doc(&file) else {
            problems.push(format!(
                "{doc}:{line}: link `{target}` points to {file}, which does not exist"
            ));
            continue;
        };
        if let Some(anchor) = anchor
            && file.ends_with(".md")
            && !anchors(&content).contains(anchor)
        {
            problems.push(format!(
                "{doc}:{line}: link `{target}`: {file} has no heading with anchor #{anchor}"
            ));
        }
    }
    problems
}

/// `text` with one `{a,b}` group expanded: `x/{a,b}.rs` → `x/a.rs`, `x/b.rs`.
fn expand_braces(text: &str) -> Vec<String> {
    let (Some(open), Some(close)) = (text.find('{'), text.find('}')) else {
        return vec![text.to_owned()];
    };
    if close < open || !text[open..close].contains(',') {
        return vec![text.to_owned()];
    }
    text[open + 1..close]
        .split(',')
        .map(|alt| format!("{}{alt}{}", &text[..open], &text[close + 1..]))
        .collect()
}

/// Paths in backticks in `doc` (its `text`) that do not exist. A code span
/// is a path when it has no space, no glob and no placeholder, and its first
/// folder is one of `top_level` (a `::item` suffix is dropped:
/// `helper/src/chain.rs::obtain_token`). It may be relative to the doc's
/// folder or to the root.
fn missing_paths(
    doc: &str,
    text: &str,
    top_level: &BTreeSet<String>,
    exists: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (line, span) in code_spans(text) {
        if span.chars().any(char::is_whitespace) || span.contains('*') {
            continue;
        }
        let path = span.split("::").next().unwrap_or_default();
        let Some((first, _)) = path.split_once('/') else {
            continue;
        };
        if !top_level.contains(first) {
            continue;
        }
        for candidate in expand_braces(path) {
            if candidate.contains(['{', '}', '<', '>', '$', '=']) {
                continue;
            }
            let candidate = candidate.trim_end_matches('/');
            let near = join(folder_of(doc), candidate);
            if !exists(candidate) && !near.as_deref().is_some_and(exists) {
                problems.push(format!(
                    "{doc}:{line}: `{span}` names {candidate}, which does not exist"
                ));
            }
        }
    }
    problems
}

// ---- names core owns ----------------------------------------------------------

/// Whether `c` may be part of an identifier.
fn ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The core-owned names `source` defines: `fn NAME`, `const NAME`, `static
/// NAME` or `macro_rules! NAME` outside a comment, with the line.
fn definitions(source: &str) -> Vec<(usize, &'static str)> {
    let mut found = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = code.split("//").next().unwrap_or_default();
        let kinds: [(&str, &[&'static str]); 6] = [
            ("fn ", CORE_FUNCTIONS),
            ("const ", CORE_CONSTANTS),
            ("static ", CORE_CONSTANTS),
            ("enum ", CORE_TYPES),
            ("struct ", CORE_TYPES),
            ("macro_rules! ", CORE_MACROS),
        ];
        for (keyword, names) in kinds {
            let mut rest = code;
            while let Some(at) = rest.find(keyword) {
                let before_ok = rest[..at]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !ident_char(c));
                let after = &rest[at + keyword.len()..];
                if before_ok {
                    let name: String = after.chars().take_while(|&c| ident_char(c)).collect();
                    if let Some(owned) = names.iter().find(|&&n| n == name) {
                        found.push((n + 1, *owned));
                    }
                }
                rest = after;
            }
        }
    }
    found
}

/// Core-owned names defined in the `.rs` files outside `core/`.
fn second_definitions(files: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, source) in files {
        for (line, name) in definitions(source) {
            problems.push(format!(
                "{path}:{line}: defines `{name}`, which credd-core owns: use credd_core's instead of a second definition"
            ));
        }
    }
    problems
}

/// The lines of `source` before its test module: a production file's
/// size. A file that is a test module of its own (`tests.rs`) has none.
/// Only a `#[cfg(test)]` at the start of a line ends it: an indented one
/// marks a test-only item inside the production code (a method, a field),
/// and what follows it is still production (once, it hid 380 lines).
fn production_lines(source: &str) -> Vec<&str> {
    source
        .lines()
        .take_while(|line| line.trim_end() != "#[cfg(test)]")
        .collect()
}

/// The name of the function `line` declares, if it does: `fn NAME` after
/// any of `pub`, `pub(…)`, `const`, `async`, `unsafe`, `extern "…"`.
fn function_name(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix("fn ") {
            let end = after.find(|c: char| !ident_char(c)).unwrap_or(after.len());
            return (end > 0).then(|| &after[..end]);
        }
        let word_end = rest.find(' ')?;
        let word = &rest[..word_end];
        let qualifier = matches!(word, "pub" | "const" | "async" | "unsafe" | "extern")
            || word.starts_with("pub(")
            || (word.starts_with('"') && word.ends_with('"'));
        if !qualifier {
            return None;
        }
        rest = rest[word_end..].trim_start();
    }
}

/// The functions of `lines` longer than `max` lines, as (line, name,
/// length): from the `fn` line to the line that closes it at the same
/// indent (a one-line function or a declaration without a body is one
/// line). A function under a [`LONG_TABLE`] line is exempt.
fn long_functions(lines: &[&str], max: usize) -> Vec<(usize, String, usize)> {
    let mut found = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let Some(name) = function_name(line) else {
            continue;
        };
        let exempt = at > 0 && lines[at - 1].trim() == LONG_TABLE;
        let code = line.trim_end();
        // A declaration without a body ends its signature with `;`, however
        // many lines the signature takes; a function's opens with `{`.
        let bodiless = lines[at..]
            .iter()
            .map(|l| l.trim_end())
            .find(|l| l.ends_with(';') || l.ends_with('{'))
            .is_none_or(|l| l.ends_with(';'));
        if exempt || bodiless || (code.ends_with('}') && code.contains('{')) {
            continue;
        }
        let indent = &line[..line.len() - line.trim_start().len()];
        let closing = format!("{indent}}}");
        let end = lines[at..]
            .iter()
            .position(|l| l.trim_end() == closing)
            .map_or(lines.len(), |offset| at + offset);
        let length = end - at + 1;
        if length > max {
            found.push((at + 1, name.to_owned(), length));
        }
    }
    found
}

/// Files over [`MAX_FILE_LINES`] and functions over
/// [`MAX_FUNCTION_LINES`] among `files` (path, text).
fn oversized(files: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, source) in files {
        let lines = production_lines(source);
        if lines.len() > MAX_FILE_LINES {
            problems.push(format!(
                "{path}: {} lines before its tests (at most {MAX_FILE_LINES}): split it by job",
                lines.len()
            ));
        }
        for (line, name, length) in long_functions(&lines, MAX_FUNCTION_LINES) {
            problems.push(format!(
                "{path}:{line}: fn {name} is {length} lines (at most {MAX_FUNCTION_LINES}; a declarative table may say `{LONG_TABLE}` above it)"
            ));
        }
    }
    problems
}

// ---- the tree -------------------------------------------------------------------

#[track_caller]
fn fail_with(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

#[test]
fn every_source_file_is_in_the_code_map_under_one_boundary() {
    let root = root();
    let (entries, mut problems) = code_map(&read(&root.join("ARCHITECTURE.md")));
    let files = source_files(&root);
    assert!(files.len() > 50, "found only {} source files", files.len());
    problems.extend(unmapped(&files, &entries));
    fail_with(
        "ARCHITECTURE.md's code map and the tree disagree",
        &problems,
    );
}

#[test]
fn every_path_in_the_code_map_exists() {
    let root = root();
    let (entries, _) = code_map(&read(&root.join("ARCHITECTURE.md")));
    assert!(
        entries.len() > 20,
        "found only {} code map entries",
        entries.len()
    );
    let problems = missing_entries(&entries, &|path| kind_at(&root.join(path)));
    fail_with("ARCHITECTURE.md's code map names missing paths", &problems);
}

#[test]
fn relative_links_in_the_docs_resolve() {
    let root = root();
    let read_doc = |path: &str| {
        let path = root.join(path);
        match kind_at(&path) {
            Kind::Missing => None,
            Kind::Folder => Some(String::new()),
            Kind::File => Some(std::fs::read_to_string(&path).unwrap_or_default()),
        }
    };
    let mut problems = Vec::new();
    let mut links = 0;
    for doc in docs(&root) {
        let text = read(&root.join(&doc));
        links += link_targets(&text).len();
        problems.extend(broken_links(&doc, &text, &read_doc));
    }
    assert!(links > 10, "found only {links} links in the docs");
    fail_with("broken relative links in the docs", &problems);
}

#[test]
fn paths_in_backticks_in_the_docs_exist() {
    let root = root();
    let top_level: BTreeSet<String> = std::fs::read_dir(&root)
        .expect("read the root")
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "target" && name != ".git")
        .collect();
    let exists = |path: &str| root.join(path).exists();
    let mut problems = Vec::new();
    for doc in docs(&root) {
        problems.extend(missing_paths(
            &doc,
            &read(&root.join(&doc)),
            &top_level,
            &exists,
        ));
    }
    fail_with("the docs name paths that do not exist", &problems);
}

#[test]
fn names_core_owns_are_defined_only_in_core() {
    let root = root();
    let core: Vec<(String, String)> = files_under(&root, &root.join("core"), ".rs", &[])
        .into_iter()
        .map(|path| {
            let source = read(&root.join(&path));
            (path, source)
        })
        .collect();
    // Each listed name is defined in core today (else the list is stale).
    let defined: BTreeSet<&str> = core
        .iter()
        .flat_map(|(_, source)| definitions(source))
        .map(|(_, name)| name)
        .collect();
    for name in CORE_FUNCTIONS
        .iter()
        .chain(CORE_CONSTANTS)
        .chain(CORE_TYPES)
        .chain(CORE_MACROS)
    {
        assert!(
            defined.contains(name),
            "`{name}` is listed as core-owned but core/ does not define it: update the list"
        );
    }
    // This file quotes the names in its own planted offenders below.
    let others: Vec<(String, String)> =
        files_under(&root, &root, ".rs", &["core", "tests/tests/tidy.rs"])
            .into_iter()
            .map(|path| {
                let source = read(&root.join(&path));
                (path, source)
            })
            .collect();
    assert!(others.len() > 100, "found only {} files", others.len());
    fail_with(
        "names credd-core owns are defined again outside core/",
        &second_definitions(&others),
    );
}

#[test]
fn production_files_and_functions_stay_small() {
    let root = root();
    let files: Vec<(String, String)> = PRODUCTION_ROOTS
        .iter()
        .flat_map(|dir| files_under(&root, &root.join(dir), ".rs", &[]))
        .filter(|path| !path.ends_with("/tests.rs"))
        .map(|path| {
            let source = read(&root.join(&path));
            (path, source)
        })
        .collect();
    assert!(
        files.len() > 40,
        "found only {} production files",
        files.len()
    );
    fail_with("production code over the size limits", &oversized(&files));
}

#[test]
fn the_platform_metrics_use_no_other_module_of_their_crate() {
    let path = "platform/src/metrics.rs";
    let source = read(&root().join(path));
    let uses: Vec<String> = production_lines(&source)
        .iter()
        .enumerate()
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
        .filter(|(_, line)| line.contains("crate::"))
        .map(|(n, line)| format!("{path}:{}: {}", n + 1, line.trim()))
        .collect();
    fail_with(
        "the platform's metrics name another module of the crate (pass a label instead; everything counts through them, so this makes a cycle)",
        &uses,
    );
}

/// Lines of `source` (production part, not comments) naming one of `words`.
fn naming(path: &str, source: &str, words: &[&str]) -> Vec<String> {
    production_lines(source)
        .iter()
        .enumerate()
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
        .filter(|(_, line)| {
            line.split(|c: char| !ident_char(c))
                .any(|word| words.contains(&word))
        })
        .map(|(n, line)| format!("{path}:{}: {}", n + 1, line.trim()))
        .collect()
}

#[test]
fn the_daemons_token_store_never_builds_a_wire_answer() {
    let root = root();
    let files = files_under(
        &root,
        &root.join("daemon/src/cache"),
        ".rs",
        &["daemon/src/cache/tests.rs"],
    );
    assert!(files.len() > 5, "the store's files: {files:?}");
    let uses: Vec<String> = files
        .iter()
        .flat_map(|path| naming(path, &read(&root.join(path)), &["Response", "ErrorCode"]))
        .collect();
    fail_with(
        "the daemon's token store names a wire answer (return a `cache::Got` or another outcome; `daemon/src/answer.rs` says it)",
        &uses,
    );
}

#[test]
fn the_wire_answer_check_finds_uses_not_comments() {
    let planted = "//! A `Response` in a doc.\nuse credd_core::protocol::Response;\nfn f() -> ResponseLike {}\n";
    assert_eq!(
        naming("x.rs", planted, &["Response"]),
        ["x.rs:2: use credd_core::protocol::Response;"]
    );
}

// ---- the checks themselves, on planted offenders ----------------------------

const MAP: &str = "\
# Architecture

## Code map

### One

**Invariant:** something true.

- `a/src/lib.rs` — a file.
- `a/src/cache/` — a folder.

### Two

- `b/src/main.rs` — no invariant here.
- `a/src/cache/x.rs` — also under One's folder.

## Next
- `not/in/the/map.rs`
";

#[test]
fn the_code_map_check_names_what_is_missing_and_what_is_doubled() {
    let (entries, problems) = code_map(MAP);
    assert_eq!(
        entries.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
        [
            "a/src/lib.rs",
            "a/src/cache/",
            "b/src/main.rs",
            "a/src/cache/x.rs"
        ]
    );
    assert_eq!(
        problems,
        ["code map group \"Two\" states no `**Invariant:**` line"]
    );
    let files: Vec<String> = [
        "a/src/lib.rs",
        "a/src/cache/y.rs",
        "a/src/cache/x.rs",
        "a/src/new.rs",
    ]
    .map(String::from)
    .to_vec();
    let problems = unmapped(&files, &entries);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("a/src/cache/x.rs is under more than one boundary"));
    assert!(problems[1].starts_with("a/src/new.rs is not in ARCHITECTURE.md's code map"));
}

#[test]
fn the_code_map_check_names_missing_and_misspelt_paths() {
    let (entries, _) = code_map(MAP);
    let kinds = |path: &str| match path {
        "a/src/lib.rs" => Kind::File,
        "a/src/cache" => Kind::Folder,
        "b/src/main.rs" => Kind::Folder,
        _ => Kind::Missing,
    };
    let problems = missing_entries(&entries, &kinds);
    assert_eq!(
        problems,
        [
            "ARCHITECTURE.md:14: the code map names `b/src/main.rs`, which is a folder: write it with a trailing `/`",
            "ARCHITECTURE.md:15: the code map names `a/src/cache/x.rs`, which does not exist",
        ]
    );
}

#[test]
fn the_link_check_names_missing_files_and_anchors() {
    let doc = "\
# Title

## Sealed mode: the agent uses it

See [the manual](../README.md#using-it), [here](#sealed-mode-the-agent-uses-it),
[there](#nowhere), ![chart](fleet/chart.svg), [web](https://example.com/x.md)
and `[not a link](gone.md)`.

```
[in a fence](gone.md)
```
";
    let read_doc = |path: &str| match path {
        "README.md" => Some("# R\n\n## Using it\n".to_owned()),
        "docs/x.md" => Some(doc.to_owned()),
        _ => None,
    };
    let problems = broken_links("docs/x.md", doc, &read_doc);
    assert_eq!(
        problems,
        [
            "docs/x.md:6: link `#nowhere`: docs/x.md has no heading with anchor #nowhere",
            "docs/x.md:6: link `fleet/chart.svg` points to docs/fleet/chart.svg, which does not exist",
        ]
    );
}

#[test]
fn anchors_follow_githubs_rule() {
    let text = "# A `credd get`, file by file\n## Sealed: x—y [link](z)\n## Dup\n## Dup\n```\n# not a heading\n```\n#nospace\n";
    assert_eq!(
        anchors(text).into_iter().collect::<Vec<_>>(),
        ["a-credd-get-file-by-file", "dup", "dup-1", "sealed-xy-link"]
    );
}

#[test]
fn the_path_check_names_paths_that_do_not_exist() {
    let top: BTreeSet<String> = ["helper", "tests"].map(String::from).into();
    let text = "`helper/src/main.rs::run`, `helper/src/{chain,gone}.rs`, \
                `tests/tests/it/util.rs`, `OWNER/NAME`, `scripts/test.sh owners`, \
                `tests/*/x`, `helper/{id}/x`\n";
    let exists = |p: &str| matches!(p, "helper/src/main.rs" | "helper/src/chain.rs");
    let problems = missing_paths("README.md", text, &top, &exists);
    assert_eq!(
        problems,
        [
            "README.md:1: `helper/src/{chain,gone}.rs` names helper/src/gone.rs, which does not exist",
            "README.md:1: `tests/tests/it/util.rs` names tests/tests/it/util.rs, which does not exist",
        ]
    );
}

#[test]
fn the_name_check_finds_definitions_not_uses_or_comments() {
    let source = "\
use credd_core::repository::is_valid_owner;
// fn is_valid_owner(x: &str) -> bool in a comment
pub(crate) fn is_valid_owner(owner: &str) -> bool { true }
const MAX_TOKEN_LEN: usize = 1; // a copy
pub const MAX_TOKEN_LEN_EXTRA: usize = 2;
fn not_is_valid_owner() {}
macro_rules! wire_enum { () => {} }
let x = is_valid_owner(\"a\");
";
    assert_eq!(
        definitions(source),
        [
            (3, "is_valid_owner"),
            (4, "MAX_TOKEN_LEN"),
            (7, "wire_enum")
        ]
    );
    let problems = second_definitions(&[("platform/src/x.rs".to_owned(), source.to_owned())]);
    assert_eq!(problems.len(), 3);
    assert!(problems[0].starts_with("platform/src/x.rs:3: defines `is_valid_owner`"));
}

#[test]
fn the_size_check_counts_functions_and_files_as_written() {
    let body = |n: usize| "    step();\n".repeat(n);
    let source = format!(
        "pub(crate) async fn long(x: u8) -> u8 {{\n{}}}\n\
         fn short() {{ step(); }}\n\
         fn declared();\n\
         // tidy: a declarative table\n\
         const fn table() {{\n{}}}\n\
         impl A {{\n    pub fn method(&self) {{\n{}    }}\n}}\n\
         trait T {{\n    fn declared(\n        &self,\n    ) -> u8;\n}}\n\
         impl B {{\n    fn near_the_limit(&self) {{\n{}    }}\n    #[cfg(test)]\n    fn only_for_tests(&self) {{}}\n\
             fn after_a_test_only_item(&self) {{\n{}    }}\n}}\n\
         #[cfg(test)]\n\
         fn in_tests() {{\n{}}}\n",
        body(85),
        body(90),
        body(79),
        body(78),
        body(81),
        body(200),
    );
    let lines = production_lines(&source);
    assert_eq!(
        long_functions(&lines, 80),
        [
            (1, "long".to_owned(), 87),
            (184, "method".to_owned(), 81),
            (354, "after_a_test_only_item".to_owned(), 84)
        ]
    );
    assert_eq!(function_name("    pub(super) fn go<T>(x: T)"), Some("go"));
    assert_eq!(function_name("extern \"C\" fn main() {"), Some("main"));
    assert_eq!(function_name("let f = fn_like();"), None);
    assert_eq!(function_name("// fn in a comment"), None);
    let problems = oversized(&[("platform/src/x.rs".to_owned(), source.clone())]);
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems[0].starts_with("platform/src/x.rs:1: fn long is 87 lines"));
    let big = "// a line\n".repeat(MAX_FILE_LINES + 1);
    let problems = oversized(&[("helper/src/big.rs".to_owned(), big)]);
    assert_eq!(
        problems,
        ["helper/src/big.rs: 601 lines before its tests (at most 600): split it by job"]
    );
}
