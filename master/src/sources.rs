//! Change sources: a poller per repository (fetching its bare mirror with gix) and the
//! forge webhooks, which verify the request and make the poller fetch at once.
//!
//! New commits become changes through [`Engine::on_push`] / [`Engine::on_pull_request`];
//! this module decides nothing about builds.

use crate::engine::{Engine, NewCommit, PullRequestChange};
use crate::mirror::{CommitInfo, Mirror};
use crate::webhooks::{self, Event, Forge, VerifyError};
use rbb_schema::config::WebhookConfig;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Most commits of one push recorded as changes (older ones are summarised by the newest).
const MAX_COMMITS: usize = 200;

pub struct SourceRepo {
    pub name: String,
    /// As configured (what webhook payloads are matched against).
    pub url: String,
    pub mirror: Mirror,
    /// Watched branch globs.
    pub branches: Vec<String>,
    pub interval: Duration,
    wake: Notify,
    /// Who asked for the next fetch (`webhook:github`), if not the clock.
    wake_source: Mutex<Option<String>>,
    /// One fetch at a time per repository.
    fetching: tokio::sync::Mutex<()>,
}

impl SourceRepo {
    pub fn new(name: String, url: String, mirror: Mirror, branches: Vec<String>, interval: Duration) -> SourceRepo {
        SourceRepo {
            name,
            url,
            mirror,
            branches,
            interval,
            wake: Notify::new(),
            wake_source: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        }
    }
}

pub struct Sources {
    pub repos: Vec<Arc<SourceRepo>>,
    pub webhooks: WebhookConfig,
}

/// What a webhook request came to.
#[derive(Debug)]
pub enum HookOutcome {
    /// 401: the signature or token header is missing.
    Unsigned(String),
    /// 403: wrong signature/token, or no secret configured for this forge.
    Refused(String),
    /// 400: the payload cannot be read.
    Bad(String),
    /// 202: accepted; what it started.
    Accepted(String),
    /// 200: a valid request rbb does not act on.
    Ignored(String),
}

fn to_new(c: &CommitInfo) -> NewCommit {
    NewCommit {
        id: c.id.clone(),
        author: c.author.clone(),
        email: c.email.clone(),
        time: c.time,
        message: c.message.clone(),
        files: c.files.clone(),
    }
}

impl Sources {
    /// Fetches one repository and hands new commits to the engine. `baseline`: only record
    /// where branches are (a new mirror's first fetch must not build every branch).
    pub async fn fetch(&self, engine: &Arc<Engine>, repo: &Arc<SourceRepo>, source: &str, baseline: bool) {
        let _one = repo.fetching.lock().await;
        let r = repo.clone();
        let updates = match tokio::task::spawn_blocking(move || r.mirror.fetch(&r.branches)).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                tracing::warn!(repo = %repo.name, error = %e, "fetch failed");
                return;
            }
            Err(e) => {
                tracing::error!(repo = %repo.name, error = %e, "fetch task failed");
                return;
            }
        };
        if baseline {
            tracing::info!(repo = %repo.name, branches = updates.len(), "mirror ready");
            return;
        }
        for u in updates {
            let Some(new) = u.new.clone() else {
                tracing::info!(repo = %repo.name, branch = %u.branch, "branch deleted");
                continue;
            };
            let (r, e, src) = (repo.clone(), engine.clone(), source.to_owned());
            let res = tokio::task::spawn_blocking(move || {
                let commits =
                    r.mirror.commits_between(u.old.as_deref(), &new, MAX_COMMITS).map_err(|e| e.to_string())?;
                let commits: Vec<NewCommit> = commits.iter().map(to_new).collect();
                e.on_push(&r.name, &u.branch, &commits, &src).map_err(|e| e.to_string())
            })
            .await;
            match res {
                Ok(Ok(builds)) => tracing::info!(repo = %repo.name, ?builds, "push handled"),
                Ok(Err(e)) => tracing::error!(repo = %repo.name, error = %e, "cannot handle a push"),
                Err(e) => tracing::error!(repo = %repo.name, error = %e, "push task failed"),
            }
        }
    }

    /// Runs every repository's poller until `stop`. Mirrors that already existed report
    /// what was pushed while the master was down; new ones start from where branches are.
    pub fn spawn_pollers(self: &Arc<Self>, engine: Arc<Engine>, fresh: Vec<bool>, stop: CancellationToken) {
        for (repo, fresh) in self.repos.iter().cloned().zip(fresh) {
            let (me, engine, stop) = (self.clone(), engine.clone(), stop.clone());
            tokio::spawn(async move {
                me.fetch(&engine, &repo, "poll", fresh).await;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(repo.interval) => {}
                        _ = repo.wake.notified() => {}
                    }
                    let source = repo
                        .wake_source
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take()
                        .unwrap_or_else(|| "poll".to_owned());
                    me.fetch(&engine, &repo, &source, false).await;
                }
            });
        }
    }

    fn find(&self, r: &webhooks::RepoRef) -> Option<Arc<SourceRepo>> {
        self.repos.iter().find(|x| r.matches(&x.url, &x.name)).cloned()
    }

    /// Verifies and handles one webhook request.
    pub async fn webhook(
        &self,
        engine: &Arc<Engine>,
        forge: Forge,
        headers: &[(String, String)],
        body: &[u8],
    ) -> HookOutcome {
        let secret = match forge {
            Forge::GitHub => self.webhooks.github_secret.as_deref(),
            Forge::GitLab => self.webhooks.gitlab_token.as_deref(),
            Forge::Gitea => self.webhooks.gitea_secret.as_deref(),
        };
        let Some(secret) = secret else {
            return HookOutcome::Refused(format!(
                "no secret is configured for {} webhooks (webhooks: in the master config)",
                forge.as_str()
            ));
        };
        match webhooks::verify(forge, webhooks::header_lookup(headers), body, secret) {
            Ok(()) => {}
            Err(e @ VerifyError::Missing { .. }) => return HookOutcome::Unsigned(e.to_string()),
            Err(e) => return HookOutcome::Refused(e.to_string()),
        }
        let event = match webhooks::parse(forge, webhooks::header_lookup(headers), body) {
            Ok(e) => e,
            Err(e) => return HookOutcome::Bad(e.to_string()),
        };
        let source = format!("webhook:{}", forge.as_str());
        match event {
            Event::Ignored { kind, why } => HookOutcome::Ignored(format!("{kind}: {why}")),
            Event::Push(p) => {
                let Some(repo) = self.find(&p.repo) else {
                    return HookOutcome::Ignored(format!("repository {} is not watched", p.repo.full_name));
                };
                *repo.wake_source.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
                repo.wake.notify_one();
                HookOutcome::Accepted(format!("fetching {}", repo.name))
            }
            Event::PullRequest(pr) => {
                let Some(repo) = self.find(&pr.repo) else {
                    return HookOutcome::Ignored(format!("repository {} is not watched", pr.repo.full_name));
                };
                if !matches!(pr.action.as_str(), "opened" | "synchronize" | "reopened") {
                    return HookOutcome::Ignored(format!("pull request #{} {}", pr.number, pr.action));
                }
                // The head commit must be in the mirror before its pipeline can be read.
                self.fetch(engine, &repo, &source, false).await;
                let (e, name) = (engine.clone(), repo.name.clone());
                let mirror = repo.mirror.clone();
                let res = tokio::task::spawn_blocking(move || {
                    let info = mirror
                        .commits_between(None, &pr.head_sha, 1)
                        .ok()
                        .and_then(|v| v.into_iter().next())
                        .map(|c| to_new(&c))
                        .unwrap_or(NewCommit {
                            id: pr.head_sha.clone(),
                            message: pr.title.clone(),
                            ..Default::default()
                        });
                    let change = PullRequestChange {
                        number: pr.number,
                        target_branch: pr.target_branch.clone(),
                        source_branch: pr.source_branch.clone(),
                        commit: info,
                    };
                    e.on_pull_request(&name, &change, &source)
                })
                .await;
                match res {
                    Ok(Ok(builds)) => HookOutcome::Accepted(format!("pull request builds {builds:?}")),
                    Ok(Err(e)) => HookOutcome::Bad(e.to_string()),
                    Err(e) => HookOutcome::Bad(e.to_string()),
                }
            }
        }
    }
}
