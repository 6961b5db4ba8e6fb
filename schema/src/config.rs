//! The master config (`rbb.yaml`): which repositories to watch and which workers may connect.
//!
//! Relative paths in it are relative to the directory of the config file; resolving them is
//! the reader's job, not this module's.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::pipeline::Scalar;

/// Default branch the pipeline is read from.
pub const DEFAULT_BRANCH: &str = "main";

/// Path of the pipeline file inside every repository.
pub const PIPELINE_PATH: &str = ".rbb/pipeline.yaml";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "rbb master config (rbb.yaml)")]
pub struct MasterConfig {
    /// Repositories whose `.rbb/pipeline.yaml` make up the plan.
    #[serde(default)]
    pub repositories: Vec<RepositoryConfig>,
    /// Workers allowed to connect.
    #[serde(default)]
    pub workers: Vec<WorkerConfig>,
    /// Directory of the master's state (database, logs, mirrors). Default `.rbb-state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    /// Secrets of the forge webhooks (`POST /api/v2/hooks/{github,gitlab,gitea}`). A forge
    /// without a secret here is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<WebhookConfig>,
    /// Bearer token required by the REST API's control actions (force, stop, rebuild).
    /// Without it they are open to anyone who can reach the HTTP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token: Option<String>,
    /// Named locks builders can take (`locks:` in a builder): `max` holders at once.
    #[serde(default, skip_serializing_if = "indexmap::IndexMap::is_empty")]
    pub locks: indexmap::IndexMap<String, LockConfig>,
    /// How long history is kept. Without it, builds and logs are kept forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionConfig>,
}

/// What the master's janitor removes, and when (`retention:` in the master config). It runs
/// in the background in small batches; a build's record outlives its logs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Delete finished builds (with their logs) older than this many days...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_days: Option<u32>,
    /// ...but keep the newest this many builds of every builder whatever their age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_builds: Option<u32>,
    /// Compress step logs older than this many days with zstd (they stay readable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress_logs_days: Option<u32>,
    /// Delete step logs older than this many days (the build stays; its log reads
    /// "expired").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_days: Option<u32>,
    /// How often the janitor runs, e.g. `1h` (the default) or `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// HMAC secret of GitHub webhooks (`X-Hub-Signature-256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_secret: Option<String>,
    /// Token of GitLab webhooks (`X-Gitlab-Token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitlab_token: Option<String>,
    /// HMAC secret of Gitea and Forgejo webhooks (`X-Gitea-Signature`, `X-Forgejo-Signature`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitea_secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LockConfig {
    /// How many builds may hold it at once in `counting` mode (`exclusive` always means one).
    #[serde(default = "one")]
    pub max: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// Name used as the namespace of the repository's builders. Default: the last component of
    /// `url` without `.git`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A local path or a `file://` URL of a git repository.
    pub url: String,
    /// Branch the pipeline is read from. Default `main`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Branches watched for changes (globs). Default: `branch` only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches: Vec<String>,
    /// How often to poll: seconds or a duration such as `500ms`, `30s`, `5m`. Default 60s.
    /// Webhooks trigger a fetch at once, whatever the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<Scalar>,
}

impl RepositoryConfig {
    /// The configured name, or one derived from the URL.
    pub fn effective_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        let trimmed = self.url.trim_end_matches('/');
        let last = trimmed.rsplit(['/', '\\']).next().unwrap_or(trimmed);
        last.strip_suffix(".git").unwrap_or(last).to_owned()
    }

    pub fn effective_branch(&self) -> &str {
        self.branch.as_deref().unwrap_or(DEFAULT_BRANCH)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Unique worker name.
    pub name: String,
    /// Shared secret the worker presents when it connects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Labels this worker offers; builders ask for labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// How many steps it may run at once. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u32>,
}
