//! Small text rules every binary applies the same way.
//!
//! Errors are printed as one chain (`what failed -> why -> root cause`) so a
//! person reads the whole story on one line, and text that came from another
//! process (a daemon's message, a status line for systemd) is reduced to one
//! bounded, printable line before it reaches a terminal or a journal: a
//! peer must not be able to forge log lines or flood a terminal.

use std::error::Error;
use std::fmt::Write as _;

/// `error -> source -> source…`, the whole chain on one line. A cause
/// whose text the line already holds is left out (some errors, reqwest's
/// among them, repeat their source in their own message).
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            let _ = write!(text, " -> {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// `text` as one printable line of at most `max_bytes` bytes: control
/// characters (newlines included) become spaces, and the cut falls on a
/// character boundary.
pub fn one_line(text: &str, max_bytes: usize) -> String {
    let mut line = String::with_capacity(text.len().min(max_bytes));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if line.len() + c.len_utf8() > max_bytes {
            break;
        }
        line.push(c);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chains_are_joined_with_arrows() {
        let error = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&error), "outer -> inner");
    }

    #[test]
    fn lines_are_printable_and_bounded_on_a_character_boundary() {
        assert_eq!(one_line("a\nb\r\tc", 100), "a b  c");
        assert_eq!(one_line(&"x".repeat(1000), 300).len(), 300);
        assert_eq!(one_line("ééé", 5), "éé");
    }
}
