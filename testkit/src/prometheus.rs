//! Prometheus text exposition in tests: `promtool check metrics` and a
//! reader for the samples.
//!
//! Why: `credd metrics` and the platform's `/metrics` are both for
//! Prometheus, and the one judge of the format that is not our own code is
//! Prometheus' `promtool` (Debian's `prometheus` package; `scripts/test.sh` installs it).
//! A machine without it fails the test saying so: a metrics test that
//! skips would pass without ever having checked the format. The reader
//! then lets a test assert values, not only the format.

use std::collections::BTreeMap;
use std::process::Command;

use crate::bin::require_tool;
use crate::process::Cmd;

/// The samples of one exposition, by series as written
/// (`name{label="value",…}`), without comments.
#[derive(Debug, Clone, Default)]
pub struct Samples(BTreeMap<String, f64>);

impl Samples {
    /// Reads every sample line of `text` (`series value`, no timestamps).
    pub fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|e| panic!("sample {line:?}: {e}")),
            };
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "series {series} appears twice"
            );
        }
        Self(samples)
    }

    /// The value of `series`, which must be present.
    #[track_caller]
    pub fn get(&self, series: &str) -> f64 {
        *self
            .0
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in {:#?}", self.0))
    }

    /// The value of `series`, if present.
    pub fn find(&self, series: &str) -> Option<f64> {
        self.0.get(series).copied()
    }

    /// How much `series` grew since `before` (absent counts as 0 there).
    #[track_caller]
    pub fn delta(&self, before: &Self, series: &str) -> f64 {
        self.get(series) - before.find(series).unwrap_or(0.0)
    }

    /// Every series whose name (before `{`) is `name`.
    pub fn family(&self, name: &str) -> Vec<(&str, f64)> {
        self.0
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(series, value)| (series.as_str(), *value))
            .collect()
    }
}

/// Runs `promtool check metrics` on `text`, failing the test with its
/// complaints (or because promtool is missing) unless it accepts the text
/// without a word.
#[track_caller]
pub fn check_metrics(text: &str) {
    require_tool("promtool", "prometheus");
    let mut command = Command::new("promtool");
    command.args(["check", "metrics"]);
    let checked = Cmd::new(command, "promtool check metrics")
        .stdin(text)
        .run();
    assert!(
        checked.status.success()
            && checked.stdout.trim().is_empty()
            && checked.stderr.trim().is_empty(),
        "promtool check metrics refused the text:\n{}\n--- text\n{text}",
        checked.transcript()
    );
}
