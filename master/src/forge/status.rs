//! What a build's state means as a commit status, and the request each forge's REST API
//! expects for it. Pure functions: no I/O.

use crate::model::BuildRecord;
use crate::webhooks::Forge;
use rbb_schema::api::State;
use rbb_schema::results::Outcome;
use serde::{Deserialize, Serialize};

/// The state of a commit status, before each forge's own spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommitState {
    /// Queued, waiting for a worker or for the builds it needs.
    Pending,
    Running,
    Success,
    Failure,
    /// The system failed, not the code (EXCEPTION, a build retried after a lost worker).
    Error,
    Cancelled,
}

/// The commit state of a build in `state` with `result`. Every pair is mapped: CACHED and
/// NOT_AFFECTED count as success (the work is known good), SKIPPED too (nothing to judge),
/// WARNINGS is a success with a note in the description.
pub fn commit_state(state: State, result: Option<Outcome>) -> CommitState {
    match (state, result) {
        (State::Pending, _) => CommitState::Pending,
        (State::Running, _) => CommitState::Running,
        (State::Finished, None) => CommitState::Error,
        (State::Finished, Some(outcome)) => match outcome {
            Outcome::Success | Outcome::Warnings | Outcome::Cached | Outcome::NotAffected | Outcome::Skipped => {
                CommitState::Success
            }
            Outcome::Failure => CommitState::Failure,
            Outcome::Exception | Outcome::Retry => CommitState::Error,
            Outcome::Cancelled => CommitState::Cancelled,
        },
    }
}

/// One commit status to deliver. `id` is the outbox's (0 until written).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRow {
    pub id: u64,
    pub repo: String,
    pub sha: String,
    /// The builder's name, e.g. `app/test`.
    pub context: String,
    pub state: CommitState,
    pub description: String,
    /// The build's page.
    pub target_url: String,
    pub build: u64,
}

impl StatusRow {
    /// The key only the latest row of which is ever sent.
    pub fn key(&self) -> String {
        format!("{}\0{}\0{}", self.repo, self.sha, self.context)
    }
}

/// The statuses a build's current state sets: one, with the builder as context and the build
/// page (`<base_url>/#/builds/<id>`) as target.
pub fn statuses_for(build: &BuildRecord, base_url: &str) -> Vec<StatusRow> {
    let state = commit_state(build.state, build.result);
    let description = match (state, build.result) {
        (CommitState::Pending, _) => "queued".to_owned(),
        (CommitState::Running, _) => "running".to_owned(),
        (_, Some(outcome)) => format!("{outcome:?}").to_ascii_lowercase(),
        (_, None) => "finished without a result".to_owned(),
    };
    vec![StatusRow {
        id: 0,
        repo: build.repo.clone(),
        sha: build.commit.clone(),
        context: build.builder.clone(),
        state,
        description,
        target_url: format!("{}/#/builds/{}", base_url.trim_end_matches('/'), build.id),
        build: build.id,
    }]
}

/// Where a repository's statuses go.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusTarget {
    pub forge: Forge,
    /// The API root: `https://api.github.com`, `https://gitlab.example.com/api/v4`,
    /// `https://gitea.example.com/api/v1`.
    pub api: String,
    /// `owner/repo` (GitLab: the project's path, or its numeric id).
    pub project: String,
    pub token: String,
}

impl std::fmt::Debug for StatusTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusTarget")
            .field("forge", &self.forge)
            .field("api", &self.api)
            .field("project", &self.project)
            .field("token", &"<hidden>")
            .finish()
    }
}

/// An HTTP request, ready for a transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub url: String,
    /// Header lines; the credential one is kept out of `Debug` by the transport's caller.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

fn encode_path(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The forge's commit-status request for `row`.
pub fn request(target: &StatusTarget, row: &StatusRow) -> Request {
    let api = target.api.trim_end_matches('/');
    let json = |state: &str, name_key: &str| {
        serde_json::json!({
            "state": state,
            "target_url": row.target_url,
            "description": row.description,
            name_key: row.context,
        })
        .to_string()
    };
    match target.forge {
        Forge::GitHub => {
            let state = match row.state {
                CommitState::Pending | CommitState::Running => "pending",
                CommitState::Success => "success",
                CommitState::Failure => "failure",
                CommitState::Error | CommitState::Cancelled => "error",
            };
            Request {
                url: format!("{api}/repos/{}/statuses/{}", target.project, row.sha),
                headers: vec![
                    ("Accept".into(), "application/vnd.github+json".into()),
                    ("X-GitHub-Api-Version".into(), "2022-11-28".into()),
                    ("Authorization".into(), format!("Bearer {}", target.token)),
                ],
                body: json(state, "context"),
            }
        }
        Forge::GitLab => {
            let state = match row.state {
                CommitState::Pending => "pending",
                CommitState::Running => "running",
                CommitState::Success => "success",
                CommitState::Failure | CommitState::Error => "failed",
                CommitState::Cancelled => "canceled",
            };
            Request {
                url: format!("{api}/projects/{}/statuses/{}", encode_path(&target.project), row.sha),
                headers: vec![("PRIVATE-TOKEN".into(), target.token.clone())],
                body: json(state, "name"),
            }
        }
        Forge::Gitea => {
            let state = match row.state {
                CommitState::Pending | CommitState::Running => "pending",
                CommitState::Success => "success",
                CommitState::Failure => "failure",
                CommitState::Error | CommitState::Cancelled => "error",
            };
            Request {
                url: format!("{api}/repos/{}/statuses/{}", target.project, row.sha),
                headers: vec![("Authorization".into(), format!("token {}", target.token))],
                body: json(state, "context"),
            }
        }
    }
}

/// What a forge's answer means for the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Worth trying again later (5xx, 429, a timeout, refused credentials that may be fixed).
    Retry(String),
    /// Will never be accepted (the commit or project does not exist, a malformed request).
    GiveUp(String),
}

/// Classifies a forge's HTTP answer.
pub fn verdict(forge: Forge, status: u16, body: &str) -> Verdict {
    let short: String = body.chars().take(300).collect();
    match status {
        200..=299 => Verdict::Delivered,
        // GitLab refuses a transition to the state a status already has: it is there.
        400 if forge == Forge::GitLab && body.contains("Cannot transition status") => Verdict::Delivered,
        401 | 403 => Verdict::Retry(format!("the forge refused the token (HTTP {status}): {short}")),
        408 | 425 | 429 | 500..=599 => Verdict::Retry(format!("HTTP {status}: {short}")),
        _ => Verdict::GiveUp(format!("HTTP {status}: {short}")),
    }
}

/// Why a repository's `status:` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("repository {repo}: status.forge {forge:?} is not github, gitlab, gitea or forgejo")]
    Forge { repo: String, forge: String },
    #[error(
        "repository {repo}: cannot tell the forge's host and project from its url {url}; set status.api and status.project"
    )]
    Url { repo: String, url: String },
    #[error("repository {repo}: status needs token or token_file")]
    NoToken { repo: String },
    #[error("repository {repo}: cannot read status.token_file {path}: {source}")]
    TokenFile {
        repo: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Host and `owner/repo` path of a forge URL (`https://host/org/app.git`,
/// `ssh://git@host:22/org/app.git`, `git@host:org/app.git`).
fn host_and_project(url: &str) -> Option<(String, String)> {
    let (host, path) = match url.split_once("://") {
        Some((_, rest)) => {
            let (authority, path) = rest.split_once('/')?;
            let host = authority.rsplit('@').next()?.split(':').next()?;
            (host.to_owned(), path.to_owned())
        }
        None => {
            let (user_host, path) = url.split_once(':')?;
            (user_host.rsplit('@').next()?.to_owned(), path.to_owned())
        }
    };
    let project = path.trim_matches('/').trim_end_matches(".git").to_owned();
    (!host.is_empty() && project.contains('/')).then_some((host, project))
}

/// The status target of a repository with a `status:` entry (`None` without one).
/// `config_dir` resolves a relative `token_file`.
pub fn target_from_config(
    repo: &rbb_schema::config::RepositoryConfig,
    config_dir: &std::path::Path,
) -> Result<Option<StatusTarget>, TargetError> {
    let Some(cfg) = &repo.status else { return Ok(None) };
    let name = repo.effective_name();
    let forge = Forge::from_path(&cfg.forge)
        .ok_or_else(|| TargetError::Forge { repo: name.clone(), forge: cfg.forge.clone() })?;
    let derived = host_and_project(&repo.url);
    let url_err = || TargetError::Url { repo: name.clone(), url: repo.url.clone() };
    let project = match &cfg.project {
        Some(p) => p.clone(),
        None => derived.as_ref().map(|(_, p)| p.clone()).ok_or_else(url_err)?,
    };
    let api = match &cfg.api {
        Some(a) => a.clone(),
        None => {
            let host = derived.as_ref().map(|(h, _)| h.clone()).ok_or_else(url_err)?;
            match forge {
                Forge::GitHub if host == "github.com" => "https://api.github.com".to_owned(),
                Forge::GitHub => format!("https://{host}/api/v3"),
                Forge::GitLab => format!("https://{host}/api/v4"),
                Forge::Gitea => format!("https://{host}/api/v1"),
            }
        }
    };
    let token = match (&cfg.token, &cfg.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => {
            let p = config_dir.join(path);
            std::fs::read_to_string(&p)
                .map_err(|source| TargetError::TokenFile { repo: name.clone(), path: p.display().to_string(), source })?
                .trim()
                .to_owned()
        }
        (None, None) => return Err(TargetError::NoToken { repo: name }),
    };
    Ok(Some(StatusTarget { forge, api, project, token }))
}
