//! An operator's file read into a table: bounded, parsed whole, swapped
//! whole.
//!
//! Why one type: the workspace bearers ([`crate::auth`]) and the grants
//! ([`crate::grants`]) are both files an operator edits and the platform
//! re-reads on SIGHUP. Both must be read with a size cap (a file the
//! operator points at by mistake must not fill memory), parsed completely
//! before anything changes, and swapped in at once, so a request sees the
//! old table or the new one and never a mix; a file that does not parse
//! keeps the old table in force. Each module says only how its text
//! becomes a table ([`Table`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

/// A table parsed from a file's whole text.
pub trait Table: Sized + Send + Sync {
    /// What the file is called in messages ("grants file").
    const FILE: &'static str;
    /// The largest file read.
    const MAX_FILE_BYTES: u64;
    /// Why reading or parsing failed.
    type Error: From<FileError>;
    /// Parses `text`; `origin` (the path, or `<inline>`) names it in errors.
    fn parse(text: &str, origin: &str) -> Result<Self, Self::Error>;
    /// How many entries it has (for the reload's log line).
    fn entries(&self) -> usize;
}

/// Why a file could not be read (its text was not looked at).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Opening or reading failed.
    #[error("cannot read the {what} {path}")]
    Read {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than its table allows.
    #[error("the {what} {path} is larger than {max} bytes")]
    TooLarge {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cap.
        max: u64,
    },
}

/// A table in force, and the file it is re-read from (if any).
pub struct TableFile<T> {
    source: Option<PathBuf>,
    table: RwLock<Arc<T>>,
}

impl<T: Table> TableFile<T> {
    /// `table`, from no file (a reload keeps it).
    pub fn fixed(table: T) -> Self {
        Self {
            source: None,
            table: RwLock::new(Arc::new(table)),
        }
    }

    /// Reads and parses `path`; [`Self::reload`] re-reads it.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, T::Error> {
        let path = path.into();
        let table = read::<T>(&path)?;
        Ok(Self {
            source: Some(path),
            table: RwLock::new(Arc::new(table)),
        })
    }

    /// Re-reads the file and swaps its table in whole; on error the old
    /// table stays. The number of entries now in force (without a file:
    /// the current table's, unchanged).
    pub fn reload(&self) -> Result<usize, T::Error> {
        match &self.source {
            Some(path) => Ok(self.install(read::<T>(path)?)),
            None => Ok(self.current().entries()),
        }
    }

    /// Swaps `table` in whole; its number of entries.
    pub fn install(&self, table: T) -> usize {
        let entries = table.entries();
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        entries
    }

    /// The table in force.
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.table.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The file the table is re-read from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }
}

/// Reads `path` (at most [`Table::MAX_FILE_BYTES`]) and parses it whole.
fn read<T: Table>(path: &Path) -> Result<T, T::Error> {
    let read_error = |source| FileError::Read {
        what: T::FILE,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut text = String::new();
    file.take(T::MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if text.len() as u64 > T::MAX_FILE_BYTES {
        return Err(FileError::TooLarge {
            what: T::FILE,
            path: path.to_owned(),
            max: T::MAX_FILE_BYTES,
        }
        .into());
    }
    T::parse(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines of digits; anything else is an error at its line.
    struct Numbers(Vec<u32>);

    #[derive(Debug, thiserror::Error)]
    enum NumbersError {
        #[error(transparent)]
        File(#[from] FileError),
        #[error("{0}: not a number")]
        Parse(String),
    }

    impl Table for Numbers {
        const FILE: &'static str = "numbers file";
        const MAX_FILE_BYTES: u64 = 16;
        type Error = NumbersError;
        fn parse(text: &str, origin: &str) -> Result<Self, NumbersError> {
            text.lines()
                .map(|l| l.parse().map_err(|_| NumbersError::Parse(origin.into())))
                .collect::<Result<_, _>>()
                .map(Numbers)
        }
        fn entries(&self) -> usize {
            self.0.len()
        }
    }

    #[test]
    fn a_reload_swaps_the_table_whole_and_a_bad_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("numbers");
        std::fs::write(&path, "1\n2\n").expect("write");
        let file = TableFile::<Numbers>::load(&path).expect("loads");
        let before = file.current();
        assert_eq!(file.source(), Some(path.as_path()));

        std::fs::write(&path, "1\nx\n").expect("write");
        let error = file.reload().expect_err("does not parse");
        assert!(error.to_string().contains("not a number"), "{error}");
        assert_eq!(file.current().0, [1, 2], "the old table stays");

        std::fs::write(&path, "7\n").expect("write");
        assert_eq!(file.reload().expect("reloads"), 1);
        assert_eq!(file.current().0, [7]);
        assert_eq!(
            before.0,
            [1, 2],
            "a request holding the old table keeps it whole"
        );

        std::fs::write(&path, "1\n".repeat(9)).expect("write");
        let error = file.reload().expect_err("too large");
        assert_eq!(
            error.to_string(),
            format!(
                "the numbers file {} is larger than 16 bytes",
                path.display()
            )
        );
        std::fs::remove_file(&path).expect("remove");
        let error = file.reload().expect_err("gone");
        assert!(
            error
                .to_string()
                .starts_with("cannot read the numbers file"),
            "{error}"
        );
        assert_eq!(file.current().0, [7]);
    }

    #[test]
    fn a_table_from_no_file_is_kept_by_a_reload() {
        let file = TableFile::fixed(Numbers(vec![3]));
        assert_eq!(file.reload().expect("nothing to read"), 1);
        assert_eq!(file.install(Numbers(vec![])), 0);
        assert!(file.source().is_none());
    }
}
