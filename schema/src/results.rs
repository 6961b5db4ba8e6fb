//! Result codes of steps and builds, with Buildbot's numbering and meaning, plus CACHED and
//! NOT_AFFECTED.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Success,
    Warnings,
    Failure,
    Skipped,
    Exception,
    Retry,
    Cancelled,
    /// Reused from the cache instead of run (with provenance).
    Cached,
    /// Not run because no relevant file changed.
    NotAffected,
}

impl Outcome {
    /// Buildbot's numeric code (CACHED and NOT_AFFECTED extend it).
    pub fn code(self) -> i32 {
        match self {
            Outcome::Success => 0,
            Outcome::Warnings => 1,
            Outcome::Failure => 2,
            Outcome::Skipped => 3,
            Outcome::Exception => 4,
            Outcome::Retry => 5,
            Outcome::Cancelled => 6,
            Outcome::Cached => 7,
            Outcome::NotAffected => 8,
        }
    }

    pub fn from_code(code: i32) -> Option<Outcome> {
        Some(match code {
            0 => Outcome::Success,
            1 => Outcome::Warnings,
            2 => Outcome::Failure,
            3 => Outcome::Skipped,
            4 => Outcome::Exception,
            5 => Outcome::Retry,
            6 => Outcome::Cancelled,
            7 => Outcome::Cached,
            8 => Outcome::NotAffected,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Success => "SUCCESS",
            Outcome::Warnings => "WARNINGS",
            Outcome::Failure => "FAILURE",
            Outcome::Skipped => "SKIPPED",
            Outcome::Exception => "EXCEPTION",
            Outcome::Retry => "RETRY",
            Outcome::Cancelled => "CANCELLED",
            Outcome::Cached => "CACHED",
            Outcome::NotAffected => "NOT_AFFECTED",
        }
    }

    /// Whether a build with this result counts as passing for `needs`.
    pub fn is_ok(self) -> bool {
        matches!(self, Outcome::Success | Outcome::Warnings | Outcome::Cached | Outcome::NotAffected)
    }

    /// Buildbot's `worst_status`: the build result is the worst of what contributed to it.
    pub fn worst(self, other: Outcome) -> Outcome {
        fn rank(o: Outcome) -> u8 {
            match o {
                Outcome::NotAffected | Outcome::Cached | Outcome::Success => 0,
                Outcome::Skipped => 1,
                Outcome::Warnings => 2,
                Outcome::Failure => 3,
                Outcome::Retry => 4,
                Outcome::Exception => 5,
                Outcome::Cancelled => 6,
            }
        }
        if rank(other) > rank(self) { other } else { self }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
