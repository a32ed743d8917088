//! The helper's one command-line lexer: options `--name VALUE` and
//! `--name=VALUE`, then operands; std only.
//!
//! Why not clap: `credd get` is on every git operation's path, and a parser
//! crate would be linked into it (and its start-up) for the few options of
//! `token`, `exec` and `configure-git`. Why a lexer at all: those commands
//! each had a hand-written loop with its own idea of `--name=VALUE`; the
//! rules live here once, and each command only says what its options mean.

use std::ffi::{OsStr, OsString};

/// The arguments after the command, read from the front.
pub(crate) struct Lexer<'a> {
    rest: &'a [OsString],
}

impl<'a> Lexer<'a> {
    /// Lexes `args` (the command's, without the command itself).
    pub(crate) fn new(args: &'a [OsString]) -> Self {
        Self { rest: args }
    }

    /// The next argument's option name (`--repo` of `--repo=x` or
    /// `--repo x`) if it is an option, without consuming it. `--` alone and
    /// operands are not options; an option must be UTF-8 up to its `=`.
    pub(crate) fn option(&self) -> Option<&'a str> {
        let first = self.rest.first()?.to_str()?;
        let name = first.split_once('=').map_or(first, |(name, _)| name);
        (name.starts_with("--") && name.len() > 2).then_some(name)
    }

    /// Consumes the option [`Self::option`] named and returns its value:
    /// the text after `=`, else the next argument; `None` when there is
    /// neither (the option was last) or the value is empty.
    pub(crate) fn value(&mut self) -> Option<&'a OsStr> {
        let (first, after) = self.rest.split_first()?;
        let inline = first
            .to_str()
            .and_then(|f| f.split_once('='))
            .map(|(_, v)| v);
        let value = match inline {
            Some(value) => {
                self.rest = after;
                OsStr::new(value)
            }
            None => {
                let (value, after) = after.split_first()?;
                self.rest = after;
                value.as_os_str()
            }
        };
        (!value.is_empty()).then_some(value)
    }

    /// What is left: operands (and `--`, if it came before them).
    pub(crate) fn rest(&self) -> &'a [OsString] {
        self.rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn options_take_their_value_inline_or_next() {
        let list = args(&["--repo=acme/api", "--file", "/tmp/x", "--", "gh"]);
        let mut lexer = Lexer::new(&list);
        assert_eq!(lexer.option(), Some("--repo"));
        assert_eq!(lexer.value(), Some(OsStr::new("acme/api")));
        assert_eq!(lexer.option(), Some("--file"));
        assert_eq!(lexer.value(), Some(OsStr::new("/tmp/x")));
        assert_eq!(lexer.option(), None, "`--` is not an option");
        assert_eq!(lexer.rest(), &args(&["--", "gh"])[..]);
    }

    #[test]
    fn a_missing_or_empty_value_is_none() {
        for list in [&["--owner"][..], &["--owner="], &["--owner", ""]] {
            let list = args(list);
            let mut lexer = Lexer::new(&list);
            assert_eq!(lexer.option(), Some("--owner"));
            assert_eq!(lexer.value(), None, "{list:?}");
        }
    }

    #[test]
    fn operands_and_single_dashes_are_not_options() {
        for first in ["gh", "-x", "--", "=--x"] {
            let list = args(&[first]);
            assert_eq!(Lexer::new(&list).option(), None, "{first}");
        }
        assert_eq!(Lexer::new(&[]).option(), None);
        // A value that is not UTF-8 is taken as given.
        use std::os::unix::ffi::OsStrExt;
        let list = vec![
            OsString::from("--file"),
            OsStr::from_bytes(b"/tmp/\xff").to_owned(),
        ];
        let mut lexer = Lexer::new(&list);
        assert_eq!(lexer.option(), Some("--file"));
        assert_eq!(lexer.value(), Some(OsStr::from_bytes(b"/tmp/\xff")));
    }
}
