//! The master's internal records of builds, steps and logs (what the store keeps). The REST
//! API converts them into `rbb_schema::api` types; nothing else sees these outside the master.

use rbb_schema::api::State;
use rbb_schema::results::Outcome;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: u64,
    /// Plan builder id.
    pub builder: String,
    pub repo: String,
    /// Where workers clone from.
    pub repo_url: String,
    pub branch: String,
    pub commit: String,
    /// The plan this build runs, pinned at creation.
    pub plan_hash: String,
    pub pipeline_blob: Option<String>,
    pub reason: String,
    /// `force`, `push`, `pull_request`, `schedule`: visible to `if:` as `event`.
    pub event: String,
    pub properties: BTreeMap<String, String>,
    pub priority: i32,
    pub state: State,
    pub result: Option<Outcome>,
    pub result_reason: String,
    pub worker: Option<String>,
    /// Builds of this build's `needs` at the same commit; it starts when all succeeded.
    pub waits_for: Vec<u64>,
    /// Set once a step failed with `halt_on_failure`: only `always_run` steps run after.
    pub halted: bool,
    /// Set by a stop request: nothing else runs.
    pub cancelled: bool,
    /// 1 for the first try; a build whose worker was lost is retried as a new build.
    pub attempt: u32,
    /// How many of its attempts lost their worker (a master restart does not count): a
    /// build that keeps killing its worker is given up on.
    #[serde(default)]
    pub worker_losses: u32,
    /// Whether the worker already has this build's checkout.
    pub checked_out: bool,
    /// The changes (commits) this build builds.
    #[serde(default)]
    pub changes: Vec<u64>,
    pub submitted_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// Set on a build a person asked to run again: queue policy never replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_of: Option<u64>,
    pub steps: Vec<StepRecord>,
}

/// The fields of a stored build the grid needs, read without its steps (decoding a whole
/// record allocates every step).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BuildHead {
    pub id: u64,
    pub builder: String,
    pub repo: String,
    pub branch: String,
    pub commit: String,
    pub state: State,
    pub result: Option<Outcome>,
    pub submitted_at: u64,
}

impl From<&BuildRecord> for BuildHead {
    fn from(b: &BuildRecord) -> BuildHead {
        BuildHead {
            id: b.id,
            builder: b.builder.clone(),
            repo: b.repo.clone(),
            branch: b.branch.clone(),
            commit: b.commit.clone(),
            state: b.state,
            result: b.result,
            submitted_at: b.submitted_at,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub number: u32,
    pub name: String,
    pub state: State,
    pub result: Option<Outcome>,
    pub reason: String,
    pub exit_code: Option<i32>,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub log_id: Option<u64>,
    /// Length of the finished log (the live length comes from the log file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes: Option<u64>,
    /// Digest of the image a container step ran in, as the worker's engine reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// What the step cache did for the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<StepCacheRecord>,
}

/// What the step cache did for a step, as stored (the API's `StepCache`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepCacheRecord {
    pub state: rbb_schema::api::CacheState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<CacheSourceRecord>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stored: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheSourceRecord {
    pub build: u64,
    pub builder: String,
    pub step: u32,
    pub step_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<u64>,
}

impl StepCacheRecord {
    pub fn disabled(reason: impl Into<String>) -> StepCacheRecord {
        StepCacheRecord {
            state: rbb_schema::api::CacheState::Disabled,
            key: None,
            reason: Some(reason.into()),
            changed: Vec::new(),
            from: None,
            stored: false,
        }
    }

    pub fn to_api(&self) -> rbb_schema::api::StepCache {
        rbb_schema::api::StepCache {
            state: self.state,
            key: self.key.clone(),
            reason: self.reason.clone(),
            changed: self.changed.clone(),
            from: self.from.as_ref().map(|f| rbb_schema::api::CacheSource {
                build: f.build,
                builder: f.builder.clone(),
                step: f.step,
                step_name: f.step_name.clone(),
                log_id: f.log_id,
            }),
            stored: self.stored,
        }
    }
}

impl StepRecord {
    /// A step that has not run yet.
    pub fn pending(number: u32, name: &str) -> StepRecord {
        StepRecord {
            number,
            name: name.to_owned(),
            state: State::Pending,
            result: None,
            reason: String::new(),
            exit_code: None,
            started_at: None,
            finished_at: None,
            log_id: None,
            log_bytes: None,
            image_digest: None,
            cache: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    pub id: u64,
    pub build: u64,
    pub step: u32,
    /// File under the log directory.
    pub file: String,
    /// Bytes written so far (exact once `finished`).
    pub bytes: u64,
    pub finished: bool,
    /// Unix milliseconds when the log was created (absent in logs of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<u64>,
    /// Retention compressed the file with zstd (`file` then names the `.zst`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compressed: bool,
    /// Retention deleted the file: the log is expired.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
}

/// A commit seen on a watched branch (or a pull request's head), as the change log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub id: u64,
    pub repo: String,
    pub branch: String,
    pub commit: String,
    pub author: String,
    pub email: String,
    /// Author time, Unix seconds.
    pub time: i64,
    pub message: String,
    pub files: Vec<String>,
    /// `push` or `pull_request`.
    pub event: String,
    /// Where it was seen: `poll`, `webhook:github`, ...
    pub source: String,
    /// Unix milliseconds when the master recorded it.
    pub recorded_at: u64,
    #[serde(default)]
    pub pull_request: Option<u64>,
}

/// What a cron schedule last did, so a restart neither skips nor repeats a firing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    /// Last minute (Unix seconds / 60) looked at.
    pub checked_minute: i64,
    /// Last minute it fired in.
    pub fired_minute: Option<i64>,
    /// Commit its last build ran (for `only_if_changed`).
    pub last_commit: Option<String>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
