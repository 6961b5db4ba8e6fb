//! REST API bodies (`/api/v2`): what clients send and receive. Internal records of the
//! master are separate types; these are the public JSON.

use crate::results::Outcome;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Lifecycle of a build or step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for a worker or for the builds it needs.
    Pending,
    Running,
    Finished,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Builder {
    /// Plan id, e.g. `app/test[os=linux]`.
    pub id: String,
    pub repo: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub labels: Vec<String>,
    pub tags: Vec<String>,
    pub needs: Vec<String>,
    pub steps: Vec<String>,
    /// The newest build of this builder, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_build: Option<BuildSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BuildSummary {
    pub id: u64,
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Outcome>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Build {
    pub id: u64,
    pub builder: String,
    pub repo: String,
    pub branch: String,
    pub commit: String,
    /// Hash of the plan this build runs (pinned at creation).
    pub plan_hash: String,
    /// Git blob id of the pipeline file the plan came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_blob: Option<String>,
    /// Why it exists: "force", "needed by build 12", "retry of build 7", ...
    pub reason: String,
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Outcome>,
    /// Why the result is what it is, for anything but SUCCESS.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub result_reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Changes (commits) this build builds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<u64>,
    /// The builds of its `needs` (at the same commit), finished or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waits_for: Vec<u64>,
    /// Why a pending build has not started: the unfinished builds it needs, a held lock,
    /// the concurrency limit, no capable or free worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Unix milliseconds.
    pub submitted_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Step {
    pub number: u32,
    pub name: String,
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Outcome>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// Id of the step's log (`/api/v2/logs/{id}/raw`), once it has started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<u64>,
    /// Bytes in the log so far.
    pub log_bytes: u64,
    /// Digest of the image a container step ran in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// What the step cache did (docs/cache.md): reused, ran and why, or not cacheable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<StepCache>,
}

/// What the step cache did for one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepCache {
    /// `hit`: reused from `from`, not run. `miss`: ran; `changed` says why. `disabled`: not
    /// cacheable; `reason` says why.
    pub state: CacheState,
    /// The step's full cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Why the step is not cacheable, or why a miss ran although nothing changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// On a miss: the key components that differ from the nearest earlier successful
    /// execution of the same builder and step (`inputs.src`, `pass_env.CC`, `image`, `run`,
    /// `after`, ...); empty with a `reason` when there is none to compare with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    /// On a hit: the execution whose result and outputs were reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<CacheSource>,
    /// This execution's outputs were stored as a cache entry.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stored: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheState {
    Hit,
    Miss,
    Disabled,
}

/// The execution a cached step reused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CacheSource {
    pub build: u64,
    pub builder: String,
    /// Step number in that build.
    pub step: u32,
    pub step_name: String,
    /// Its log (`/api/v2/logs/{id}/raw`), while retention keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Worker {
    pub name: String,
    pub connected: bool,
    pub labels: Vec<String>,
    pub max_steps: u32,
    pub running: u32,
    /// The steps it runs now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub current: Vec<CurrentStep>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The platform of the images its Docker engine runs (`linux/amd64`); absent when it runs
    /// no containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_platform: Option<String>,
    /// Host paths (prefixes) its containers may mount read-only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_mounts: Vec<String>,
    /// Unix milliseconds of the last message, if it ever connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
}

/// A build that waits to start (Buildbot's build request): for a worker, a lock, or the
/// builds it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BuildRequest {
    /// The id of the build it becomes.
    pub id: u64,
    pub builder: String,
    pub repo: String,
    pub branch: String,
    pub commit: String,
    pub reason: String,
    pub priority: i32,
    pub submitted_at: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waits_for: Vec<u64>,
    /// Why it has not started (see `Build.waiting`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<u64>,
}

/// A commit seen on a watched branch, or a pull request's head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Change {
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
    /// `poll`, `webhook:github`, `webhook:gitlab`, `webhook:gitea`.
    pub source: String,
    pub recorded_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<u64>,
    /// Builds created for it.
    pub builds: Vec<u64>,
}

/// A step a worker is running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CurrentStep {
    pub build: u64,
    pub builder: String,
    pub step: u32,
    pub name: String,
}

/// `POST /api/v2/builders/{id}/force`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceRequest {
    /// Branch to build; default the repository's pipeline branch.
    #[serde(default)]
    pub branch: Option<String>,
    /// Commit (or any revision) to build; default the head of `branch`.
    #[serde(default)]
    pub revision: Option<String>,
    /// Free-form reason shown with the build.
    #[serde(default)]
    pub reason: Option<String>,
    /// Properties, readable in `if:` as `props.<name>`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// Answer to a force: the build of the forced builder, and builds started for its needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ForceResponse {
    pub build: u64,
    pub needed: Vec<u64>,
}

/// The answer to a force: the build, or one build per combination when the builder named is a
/// matrix builder's base name (`app/test` for `app/test[os=linux]`, `app/test[os=mac]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Forced {
    /// The forced build (the first combination's, for a matrix builder's base name).
    pub build: u64,
    /// Every build forced, in plan order.
    pub builds: Vec<u64>,
    /// Builds of other builders started because the forced ones need them.
    pub needed: Vec<u64>,
}

/// Lists carry `meta.total`, as Buildbot's data API does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Meta {
    pub total: usize,
}

/// Every error has this shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorDetail {
    /// Machine-readable: `not_found`, `bad_request`, `conflict`, `internal`.
    pub code: String,
    pub message: String,
}

/// `GET /api/v2/cache`: the step cache's size and use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CacheStats {
    /// Stored executions (one per full key).
    pub entries: u64,
    /// Distinct output files (blobs).
    pub blobs: u64,
    /// Bytes the blobs take on disk (compressed).
    pub stored_bytes: u64,
    /// `cache.max_size` in bytes: above it, least recently used entries are evicted.
    pub max_size: u64,
    /// Hits and misses of every builder that has any, by builder id.
    pub builders: Vec<CacheBuilderStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CacheBuilderStats {
    pub builder: String,
    /// Steps reused from the cache.
    pub hits: u64,
    /// Cacheable steps that ran.
    pub misses: u64,
}

/// `POST /api/v2/cache/gc`: what was removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CacheGc {
    pub entries: u64,
    pub blobs: u64,
    /// Stored bytes freed.
    pub bytes: u64,
    /// The cache after the collection.
    pub stats: CacheStats,
}

/// `POST /api/v2/builders/{builder}/cache/reset`: the builder's new cache epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CacheReset {
    pub builder: String,
    pub epoch: u64,
}

/// `GET /api/v2/whoami`: who the master takes the caller for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WhoAmI {
    /// The token's name, or `anonymous`.
    pub name: String,
    /// `none`, `read`, `control` or `admin`.
    pub role: crate::config::Access,
    /// Whether the request carried a valid token.
    pub authenticated: bool,
    /// What a request without a token may do on this master.
    pub anonymous: crate::config::Access,
}

/// One control or admin action, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditEntry {
    /// Grows with each entry.
    pub id: u64,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// The token's name, or `anonymous`.
    pub who: String,
    /// The caller's role when it acted.
    pub role: crate::config::Access,
    /// The action: `force`, `stop`, `rebuild`, `cancel`, `cache_gc`, `cache_reset`.
    pub action: String,
    /// What it acted on: a builder, build or build request id (empty for the whole cache).
    pub target: String,
    /// The client's address (IP and port).
    pub from: String,
    /// The HTTP status answered: 2xx done, 401/403 refused, 429 rate-limited, 4xx/5xx failed.
    pub status: u16,
    /// `ok`, `refused`, `limited` or `failed`.
    pub result: String,
}

/// `GET /api/v2/audit`: a page of the audit log, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
    pub meta: AuditMeta,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditMeta {
    /// Entries in the log.
    pub total: u64,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
}
