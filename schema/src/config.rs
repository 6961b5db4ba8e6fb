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
    /// Where builds, changes and the cache's index are stored: without it, a redb file in
    /// `state_dir` (one master); with a `postgres://` URL, that PostgreSQL database
    /// (docs/postgres.md). Logs, mirrors and cache blobs stay in `state_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateConfig>,
    /// Secrets of the forge webhooks (`POST /api/v2/hooks/{github,gitlab,gitea}`). A forge
    /// without a secret here is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<WebhookConfig>,
    /// A single bearer token with the `admin` role (kept for older configs; prefer `tokens`).
    /// Without it and without `tokens`, every action is open to anyone who reaches the HTTP
    /// port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token: Option<String>,
    /// API tokens, each with a name and a role (docs/security.md). Stored hashed:
    /// `rbb token new <name>` prints a token and its line for this list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<ApiTokenConfig>,
    /// What a request without a token may do: `none` or `read` (or `control`, `admin`).
    /// Default: `read` when the config lists no `tokens` (the demo, older configs), `none`
    /// when it does; `admin` when the config has neither `tokens` nor `api_token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<Access>,
    /// TLS for the gRPC (workers) and HTTP ports: certificate, key, and the client CA for
    /// workers' certificates (docs/security.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Token buckets for the webhook and control endpoints (requests beyond them answer 429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimitsConfig>,
    /// Named locks builders can take (`locks:` in a builder): `max` holders at once.
    #[serde(default, skip_serializing_if = "indexmap::IndexMap::is_empty")]
    pub locks: indexmap::IndexMap<String, LockConfig>,
    /// Who hears about finished builds: outgoing webhooks (JSON or Slack text) and e-mail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<NotificationConfig>,
    /// The address people reach this master's UI at, for links in commit statuses and
    /// notifications, e.g. `https://ci.example.com`. Default: `http://` and the `--http`
    /// address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// The master's HTTP address as workers reach it, e.g. `http://ci.internal:8010`: workers
    /// then clone builds from `<checkout_url>/git/<repository>.git` with their own name and
    /// token, and need neither this host's disk nor the forge's credentials. Without it, they
    /// are handed the mirror's path on this host (workers on the same host only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout_url: Option<String>,
    /// How long history is kept. Without it, builds and logs are kept forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionConfig>,
    /// The step cache's store (docs/cache.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
    /// Secrets steps may use as `${{ secrets.NAME }}` in their `env` (docs/secrets.md). Each
    /// is read from a file or an environment variable of the master, never written here.
    #[serde(default, skip_serializing_if = "indexmap::IndexMap::is_empty")]
    pub secrets: indexmap::IndexMap<String, SecretConfig>,
}

/// Where the master reads one secret's value (`secrets.<NAME>` in the master config). The
/// config holds only where the value is, so neither it nor its `Debug` ever shows a value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    /// A file holding the value (relative to the config's directory); one trailing newline
    /// is not part of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// An environment variable of the master holding the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// Repositories whose pipelines may use it. Default: every repository.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<String>,
    /// Bump it when the value changes: it is part of the cache key of the steps that use the
    /// secret (the value never is). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

impl SecretConfig {
    pub fn effective_version(&self) -> u64 {
        self.version.unwrap_or(1)
    }
}

/// One notification rule: which builds, and where they go (a webhook, e-mail, or both).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotificationConfig {
    /// Only builds of these builders (globs on the builder id, e.g. `app/*`). Default: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builders: Vec<String>,
    /// `always` (default), `failure` (only failing builds: FAILURE or EXCEPTION), `change`
    /// (only when the result differs from the builder's previous build on the same branch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<NotifyWhen>,
    /// URL the build is POSTed to when it finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// HMAC-SHA256 secret: the body's signature is sent as `X-Rbb-Signature-256: sha256=<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// `json` (default: the build as JSON) or `slack` (`{"text": ...}`, for Slack, Mattermost
    /// and other incoming-webhook chats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<NotifyFormat>,
    /// E-mail over SMTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotifyWhen {
    Always,
    Failure,
    Change,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    Json,
    Slack,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// SMTP server host name.
    pub server: String,
    /// Default 25 (`tls: none`), 587 (`starttls`) or 465 (`tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `starttls` (default), `tls` or `none` (a relay on a trusted network only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<SmtpTls>,
    /// SMTP user name; its password is read from `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// Sender address, e.g. `rbb <ci@example.com>`.
    pub from: String,
    /// Fixed recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// Also write to the authors of the build's changes. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_authors: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    None,
    Starttls,
    Tls,
}

/// The step cache's store (`cache:` in the master config).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Most bytes the cache's blobs may take on disk: bytes, or with a suffix `k`, `m`, `g`
    /// (powers of 1024). Default `10g`. Least recently used entries go first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<String>,
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
    /// Delete audit log entries older than this many days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_days: Option<u32>,
    /// How often the janitor runs, e.g. `1h` (the default) or `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// What a caller of the REST API may do. Ordered: `admin` ⊃ `control` ⊃ `read` ⊃ `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Nothing but the public endpoints (the UI's files, the OpenAPI document, webhooks).
    None,
    /// View everything: builds, logs, workers, the plan, live events.
    Read,
    /// Also force, stop, rebuild and cancel.
    Control,
    /// Also the step cache's actions (collect, reset a builder's keys).
    Admin,
}

impl Access {
    pub fn name(self) -> &'static str {
        match self {
            Access::None => "none",
            Access::Read => "read",
            Access::Control => "control",
            Access::Admin => "admin",
        }
    }
}

/// One API token: who holds it, what it may do, and its hash (never the token itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenConfig {
    /// Who holds the token: the audit log records actions under this name.
    pub name: String,
    /// `sha256:<64 hex digits>`, the SHA-256 of the token (`rbb token new` prints it).
    pub hash: String,
    /// `read`, `control` or `admin`.
    pub role: Access,
}

/// The master's TLS: PEM files, relative to the config's directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate chain (PEM), served on both ports.
    pub cert: String,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// CA certificates (PEM) that workers' client certificates must chain to. Needed by
    /// `require_client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<String>,
    /// Every worker must present a client certificate whose subject (common name or a DNS
    /// name) is its worker name, besides its token. Per worker: `require_client_cert` there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_client_cert: bool,
}

/// Token buckets of the webhook and control endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Per forge and client address. Default 20 per second, bursts of 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<BucketConfig>,
    /// Control and admin actions, per token (or client address without one). Default 10 per
    /// second, bursts of 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<BucketConfig>,
}

/// A token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    pub per_second: f64,
    pub burst: u32,
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
    /// A local path or a `file://` URL of a git repository, or a remote one: `https://`,
    /// `http://`, `ssh://`, scp-like `git@host:org/repo.git`, or `git://`. Credentials never go
    /// in the URL: put them under `auth`.
    pub url: String,
    /// How to authenticate to a remote `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RepoAuth>,
    /// Longest a fetch from a remote `url` may take: seconds or a duration such as `90s`,
    /// `5m`. Default 5m. A fetch that takes longer is stopped and reported as an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_timeout: Option<Scalar>,
    /// Where builds of this repository report commit statuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusConfig>,
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

/// A forge's commit-status API for one repository.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// `github`, `gitlab`, `gitea` or `forgejo`.
    pub forge: String,
    /// API root. Default: `https://api.github.com` for github.com, else
    /// `https://<host>/api/v3` (GitHub Enterprise), `https://<host>/api/v4` (GitLab),
    /// `https://<host>/api/v1` (Gitea, Forgejo), the host taken from the repository's url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// `owner/repo` (GitLab: the project path or id). Default: from the repository's url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Token allowed to set statuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the token (read when statuses are sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

impl std::fmt::Debug for StatusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusConfig")
            .field("forge", &self.forge)
            .field("api", &self.api)
            .field("project", &self.project)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// Credentials for a remote repository. Relative paths are relative to the config file.
/// None of these values ever appears in a log, an error message, the plan or the API.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RepoAuth {
    /// User name for `https://`. Default `x-access-token` when a token is given (GitHub,
    /// GitLab, Gitea and Forgejo all accept a token as the password of any user name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password for `https://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Access token for `https://` (sent as the password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the password or token for `https://` (surrounding whitespace is
    /// ignored), read at each fetch, so a rotated token needs no restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// Private key file for `ssh://` and `git@host:path` URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<String>,
    /// known_hosts file the ssh server's key is checked against (strictly: an unknown or
    /// changed host key is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<String>,
}

impl std::fmt::Debug for RepoAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "<hidden>");
        f.debug_struct("RepoAuth")
            .field("username", &self.username)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("password_file", &self.password_file)
            .field("ssh_key", &self.ssh_key)
            .field("known_hosts", &self.known_hosts)
            .finish()
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
    /// This worker must present a client certificate (chained to `tls.client_ca`) whose
    /// subject is its name, besides its token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_client_cert: bool,
}

/// The state database: a URL, or a URL with where its password comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum StateConfig {
    /// `postgres://user@host[:port]/database[?sslmode=disable]`. The password comes from
    /// `PGPASSWORD` when the URL has none.
    Url(String),
    Database(StateDatabase),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateDatabase {
    /// `postgres://user@host[:port]/database`, without a password.
    pub url: String,
    /// A file holding the password (its first line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// An environment variable of the master holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// How long the active master keeps the state when it stops renewing its lease (hung,
    /// stopped, cut off): a standby then ends its session and takes over. `10s` by default;
    /// renewed every quarter of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

impl StateConfig {
    pub fn url(&self) -> &str {
        match self {
            StateConfig::Url(u) => u,
            StateConfig::Database(d) => &d.url,
        }
    }
}
