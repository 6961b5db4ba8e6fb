//! The compiled plan: every repository's builders merged into one DAG.
//!
//! This is the stable JSON of `rbb compile --format json` (documented in `docs/plan-format.md`)
//! and what every build pins. Fields are only ever added within a `format` version; lists are
//! sorted (builders by id, repositories by name) so equal plans are byte-identical.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the plan JSON layout.
pub const PLAN_FORMAT: u32 = 1;

/// The merged DAG of builders and their steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Plan {
    /// Layout version, [`PLAN_FORMAT`].
    pub format: u32,
    /// `sha256:<hex>` over what runs (builders, steps, triggers, edges), not over where it came
    /// from: moving a line or changing a comment keeps the hash.
    pub hash: String,
    /// The repositories the plan was compiled from, sorted by name.
    pub repos: Vec<PlanRepo>,
    /// Every builder, sorted by id.
    pub builders: Vec<PlanBuilder>,
}

/// Where one repository's part of the plan came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanRepo {
    /// Repository name, the namespace of its builders.
    pub name: String,
    /// Path or URL as configured.
    pub url: String,
    /// Branch the pipeline was read from.
    pub branch: String,
    /// Commit the pipeline was read at, if it came from git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Path of the pipeline file inside the repository.
    pub pipeline_path: String,
    /// Git blob id of the pipeline file, if it came from git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_blob: Option<String>,
}

/// One builder (one combination, for a matrix builder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanBuilder {
    /// `<repo>/<name>`, with `[axis=value,...]` appended for a matrix combination.
    pub id: String,
    /// Repository name.
    pub repo: String,
    /// Builder name as written (without the matrix suffix).
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The matrix combination, in axis order; empty for a plain builder.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub matrix: IndexMap<String, String>,
    /// Labels a worker must have, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Default Docker image of the steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Containers started before its steps, on the build's own network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<PlanService>,
    pub priority: i32,
    /// Queue policy: a newer waiting build of the same branch replaces an older one.
    pub collapse: bool,
    /// Queue policy: a newer commit stops a running build of the same branch.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_superseded: bool,
    /// Most builds of this builder running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Locks held while a build runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<crate::pipeline::LockUse>,
    pub triggers: PlanTriggers,
    /// Ids of the builders that must succeed first, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    pub steps: Vec<PlanStep>,
    /// The builder's `cache_salt`, part of its steps' full cache keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_salt: Option<String>,
    /// Where the builder is defined (not part of the hash).
    pub source: SourceLocation,
}

/// Resolved triggers of a builder.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanTriggers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PlanBranchFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<PlanBranchFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths_ignore: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<PlanSchedule>,
    pub force: bool,
}

/// Branch globs; empty `branches` means every watched branch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanBranchFilter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches_ignore: Vec<String>,
}

/// A validated cron schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanSchedule {
    pub cron: String,
    pub branch: String,
    pub only_if_changed: bool,
}

/// One step with every default applied and every `${{ }}` substituted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanStep {
    pub name: String,
    pub run: String,
    /// Values as written, with `${{ matrix.x }}` substituted; a `${{ secrets.NAME }}` stays as
    /// written (normalised to one space inside the braces) and is filled in by the master when
    /// the step is leased.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The `env` variables that take a secret → the names of the secrets they use, sorted.
    /// Names only: a secret's value never enters the plan.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pass_env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    pub timeout_secs: u64,
    pub halt_on_failure: bool,
    pub flunk_on_failure: bool,
    pub warn_on_failure: bool,
    pub always_run: bool,
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Container memory limit in bytes (only with `image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Container CPU limit in thousandths of a CPU (only with `image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus_milli: Option<u32>,
    /// Container network mode: `bridge`, `none` or `host` (only with `image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Container user, `uid[:gid]` or a user of the image (only with `image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Host paths mounted read-only (only with `image`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::pipeline::Mount>,
    /// Platform the image must run on, `os/arch[/variant]` (only with `image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// `cache: false` in the pipeline: never reused from the cache.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub cache: bool,
    /// Static part of the cache key, `sha256:<hex>` (see `docs/cache-key.md`).
    pub key: String,
}

/// A service container of a builder, as its builds start it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanService {
    /// Host name on the build's network.
    pub name: String,
    pub image: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Run by `sh -c` instead of the image's command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<PlanHealth>,
}

/// A service's readiness check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanHealth {
    pub command: String,
    pub interval_ms: u64,
    pub retries: u32,
    pub timeout_ms: u64,
}

/// A place in a pipeline file, 1-based.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SourceLocation {
    pub file: String,
    pub line: u32,
    pub col: u32,
}

impl PlanStep {
    /// Every secret the step uses, sorted, once each.
    pub fn secret_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.secrets.values().flatten().map(String::as_str).collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

impl Plan {
    pub fn builder(&self, id: &str) -> Option<&PlanBuilder> {
        self.builders.binary_search_by(|b| b.id.as_str().cmp(id)).ok().map(|i| &self.builders[i])
    }

    pub fn step_count(&self) -> usize {
        self.builders.iter().map(|b| b.steps.len()).sum()
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}
