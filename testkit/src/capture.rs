//! A child's output, read into memory as it arrives and waitable.
//!
//! Why: tests wait for a log line ("listening on"), for a pipe to close (the
//! process exited), and finally scan everything a test captured for secrets.
//! A background thread per pipe copies the bytes and signals a condition
//! variable, so a wait blocks until the text it wants arrives (or the
//! deadline passes) instead of sleeping and re-reading.

use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::lock;
use crate::secrets::Secrets;

#[derive(Default)]
struct CaptureState {
    bytes: Vec<u8>,
    closed: bool,
}

/// Bytes read from a pipe by a background thread; waitable.
#[derive(Clone, Default)]
pub struct Captured {
    shared: Arc<(Mutex<CaptureState>, Condvar)>,
}

impl Captured {
    /// Starts a thread copying `pipe` into a new capture until EOF.
    pub fn spawn(mut pipe: impl Read + Send + 'static) -> Self {
        let captured = Self::default();
        let shared = Arc::clone(&captured.shared);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = pipe.read(&mut buf).unwrap_or(0);
                let (lock_, cv) = &*shared;
                let mut state = lock(lock_);
                if n == 0 {
                    state.closed = true;
                    cv.notify_all();
                    return;
                }
                state.bytes.extend_from_slice(&buf[..n]);
                cv.notify_all();
            }
        });
        captured
    }

    /// Everything captured so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.shared.0).bytes).into_owned()
    }

    /// Blocks until `done(text, closed)` holds; `Err` with the text on timeout.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&str, bool) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let (lock_, cv) = &*self.shared;
        let mut state = lock(lock_);
        loop {
            let text = String::from_utf8_lossy(&state.bytes).into_owned();
            if done(&text, state.closed) {
                return Ok(text);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(text);
            }
            state = cv
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Blocks until the pipe is closed, failing the test after `timeout`.
    pub fn wait_closed(&self, what: &str, timeout: Duration) -> String {
        self.wait_until(timeout, |_, closed| closed)
            .unwrap_or_else(|text| {
                panic!("{what}: still open after {timeout:?}; output so far:\n{text}")
            })
    }

    /// Blocks until a line containing `needle` was captured, failing the test
    /// (with the output so far) after `timeout` or if the pipe closes first.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_line_matching(&format!("a line containing {needle:?}"), timeout, |l| {
            l.contains(needle)
        })
    }

    /// Blocks until a line satisfying `matches` was captured; `what` describes
    /// it in the failure message.
    pub fn wait_for_line_matching(
        &self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let mut closed_early = false;
        let result = self.wait_until(timeout, |text, closed| {
            if text.lines().any(&matches) {
                return true;
            }
            closed_early = closed;
            closed
        });
        match result {
            Ok(text) if !closed_early => text
                .lines()
                .find(|l| matches(l))
                .expect("matched above")
                .to_owned(),
            Ok(text) => {
                panic!("waited for {what} but the process closed its output first:\n{text}")
            }
            Err(text) => panic!("no {what} within {timeout:?}; output so far:\n{text}"),
        }
    }
}

/// Whether `line` contains `word` delimited by non-alphanumeric characters.
pub fn has_word(line: &str, word: &str) -> bool {
    line.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| w == word)
}

/// Every output one test captured, by label, for the secret scan.
#[derive(Default)]
pub struct Transcript {
    entries: Mutex<Vec<(String, Captured)>>,
}

impl Transcript {
    /// Adds `captured` under `label`.
    pub fn record(&self, label: impl Into<String>, captured: &Captured) {
        lock(&self.entries).push((label.into(), captured.clone()));
    }

    /// How many outputs were recorded so far.
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Labels and texts of everything recorded so far.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        lock(&self.entries)
            .iter()
            .map(|(label, c)| (label.clone(), c.text()))
            .collect()
    }

    /// Fails the test when any recorded output leaks one of `secrets`.
    #[track_caller]
    pub fn assert_clean(&self, secrets: &Secrets) {
        secrets.assert_all_clean(&self.snapshot());
    }
}
