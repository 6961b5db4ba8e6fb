//! Change sources: a poller per repository (fetching its bare mirror with gix) and the
//! forge webhooks, which verify the request and make the poller fetch at once.
//!
//! New commits become changes through [`Engine::on_push`] / [`Engine::on_pull_request`];
//! this module decides nothing about builds.
//!
//! No push is lost: a fetch only moves the mirror's copy of the remote's branches. What the
//! engine has recorded is a separate ref per branch (`refs/rbb/recorded/<branch>`), moved only
//! after the engine returned Ok; until then every poll reports the same commits again, also
//! after a crash or a restart. Pull requests work the same way with `refs/rbb/pr/<n>`, so a
//! redelivered webhook for a head already recorded starts nothing. Everything that reads or
//! moves these refs runs under the repository's one turn, so a webhook and a poller racing on
//! the same push record it once.

use crate::engine::{Engine, NewCommit, PullRequestChange};
use crate::mirror::{CommitInfo, Mirror, MirrorError};
use crate::webhooks::{self, Event, Forge, VerifyError};
use rbb_schema::config::WebhookConfig;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Most commits of one push recorded as changes. The paths changed by older commits of the
/// same push are not dropped: they are added to the oldest recorded change's files, so path
/// filters see every commit.
pub const MAX_COMMITS: usize = 200;

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
    /// One poll or pull request at a time per repository: the private refs move only under it.
    turn: Mutex<()>,
    /// How its fetches are going (the API's `/repositories`).
    health: Mutex<FetchHealth>,
}

/// How a repository's fetches are going: what the API shows per repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FetchHealth {
    pub name: String,
    /// As configured; it never holds a credential (the config refuses one in a URL).
    pub url: String,
    /// Why the last fetch failed; `None` when it succeeded. Names the URL, holds no secret.
    pub error: Option<String>,
    /// Fetches failed in a row; each one doubles the wait before the next poll.
    pub failures: u32,
    /// When a fetch last succeeded and was last tried (unix milliseconds).
    pub last_success: Option<i64>,
    pub last_attempt: Option<i64>,
    /// How long the poller waits after the last attempt (milliseconds), unless a webhook
    /// comes first: the poll interval, doubled after each failure in a row, and up to four
    /// times longer for a repository that has been quiet (see [`idle_wait`]).
    pub retry_in_ms: u64,
    /// Successful fetches in a row that brought nothing new.
    pub quiet: u32,
}

/// The longest a failing repository waits between fetches (unless its poll interval is longer).
pub const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);

/// The wait before the next poll after `failures` failed fetches in a row: the interval, then
/// doubling, capped at [`MAX_BACKOFF`] (or the interval, if longer).
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let doubled = interval.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(MAX_BACKOFF.max(interval))
}

/// Quiet fetches in a row after which a repository's polls slow down.
pub const QUIET_POLLS: u32 = 10;

/// The longest an idle repository's poll interval is stretched to (unless its configured
/// interval is longer: then it stays as configured).
pub const MAX_IDLE_WAIT: Duration = Duration::from_secs(10 * 60);

/// The wait before the next poll of a repository whose last `quiet` fetches brought nothing:
/// the interval for the first [`QUIET_POLLS`], then twice it, then (after twice as many)
/// four times it, never above [`MAX_IDLE_WAIT`] unless the interval itself is. Any new commit
/// (or a webhook) brings the interval back. A fleet of repositories that rarely change costs a
/// quarter of the fetches; a webhook still fetches at once.
pub fn idle_wait(interval: Duration, quiet: u32) -> Duration {
    let factor = match quiet / QUIET_POLLS {
        0 => 1,
        1 => 2,
        _ => 4,
    };
    interval.saturating_mul(factor).min(MAX_IDLE_WAIT.max(interval))
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// What one [`SourceRepo::poll`] did, per watched branch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PollReport {
    /// Branches whose new commits were handed over and recorded: (branch, commits handed).
    pub recorded: Vec<(String, usize)>,
    /// Branches gone from the remote, forgotten.
    pub deleted: Vec<String>,
    /// Branches whose commits could not be handed over or recorded: (branch, why). They are
    /// reported again by the next poll.
    pub failed: Vec<(String, String)>,
    /// Branches only recorded where they are (a new mirror's first poll).
    pub baseline: usize,
    /// Why the fetch failed, if it did (what was fetched before is still handed over).
    pub fetch_error: Option<String>,
}

/// What became of a pull request event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullRequestOutcome {
    /// The head was handed over and recorded; what the callback answered.
    Recorded(Vec<u64>),
    /// This head of this pull request was already recorded (a redelivered webhook).
    AlreadyRecorded { number: u64, head: String },
    /// A closed pull request: its refs are forgotten, so a reopened one builds again.
    Closed { number: u64 },
}

/// Why a pull request could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum PullRequestError {
    #[error(
        "pull request #{number}: its head commit {head} is not in the mirror of {url} after fetching {remote_ref}{fetched}; \
         the forge must publish {remote_ref} (or the branch must be pushed to this repository)"
    )]
    HeadMissing { number: u64, head: String, url: String, remote_ref: String, fetched: String },
    #[error("pull request #{number}: {source}")]
    Mirror {
        number: u64,
        #[source]
        source: MirrorError,
    },
    #[error("pull request #{number}: cannot record its head: {why}")]
    Record { number: u64, why: String },
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
            turn: Mutex::new(()),
            health: Mutex::new(FetchHealth::default()),
        }
    }

    /// How its fetches are going.
    pub fn health(&self) -> FetchHealth {
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner()).clone();
        FetchHealth { name: self.name.clone(), url: self.url.clone(), ..h }
    }

    /// Notes one fetch's outcome (`quiet`: it brought nothing new and nobody asked for it);
    /// returns the wait before the next poll.
    fn note_fetch(&self, error: Option<String>, quiet: bool) -> Duration {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let now = unix_now_ms();
        h.last_attempt = Some(now);
        match error {
            None => {
                h.failures = 0;
                h.last_success = Some(now);
                h.quiet = if quiet { h.quiet.saturating_add(1) } else { 0 };
            }
            Some(_) => h.failures = h.failures.saturating_add(1),
        }
        h.error = error;
        let wait = if h.failures > 0 { backoff(self.interval, h.failures) } else { idle_wait(self.interval, h.quiet) };
        h.retry_in_ms = wait.as_millis() as u64;
        wait
    }

    fn take_turn(&self) -> std::sync::MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches (a failed fetch is reported, not fatal), then hands `record` the commits of every watched branch whose fetched head
    /// differs from its recorded head: (branch, commits newest first, at most
    /// [`MAX_COMMITS`]). A branch's recorded ref moves only after `record` returned Ok, so a
    /// failure (or a crash) leaves the commits to the next poll. `baseline`: only record where
    /// the branches are (a new mirror's first fetch must not build every branch).
    ///
    /// Blocking (git and whatever `record` does): run it off the async threads.
    pub fn poll<E: std::fmt::Display>(
        &self,
        baseline: bool,
        mut record: impl FnMut(&str, &[NewCommit]) -> Result<(), E>,
    ) -> Result<PollReport, MirrorError> {
        let _turn = self.take_turn();
        let mut report = PollReport::default();
        // An unreachable remote does not hold back what an earlier fetch brought and the
        // engine has not recorded yet (nor a new mirror's baseline).
        if let Err(e) = self.mirror.fetch(&self.branches) {
            tracing::warn!(repo = %self.name, error = %e, "fetch failed");
            report.fetch_error = Some(e.to_string());
        }
        if baseline {
            report.baseline = self.mirror.record_all(&self.branches)?;
            return Ok(report);
        }
        for u in self.mirror.pending(&self.branches)? {
            let recorded_ref = Mirror::recorded_ref(&u.branch);
            let Some(new) = u.new.as_deref() else {
                match self.mirror.move_ref(&recorded_ref, u.old.as_deref(), None) {
                    Ok(()) => {
                        tracing::info!(repo = %self.name, branch = %u.branch, "branch deleted");
                        report.deleted.push(u.branch.clone());
                    }
                    Err(e) => report.failed.push((u.branch.clone(), e.to_string())),
                }
                continue;
            };
            let outcome = self
                .push_commits(&u.branch, u.old.as_deref(), new)
                .map_err(|e| e.to_string())
                .and_then(|commits| record(&u.branch, &commits).map(|()| commits.len()).map_err(|e| e.to_string()))
                .and_then(|n| {
                    self.mirror
                        .move_ref(&recorded_ref, u.old.as_deref(), Some(new))
                        .map(|()| n)
                        .map_err(|e| e.to_string())
                });
            match outcome {
                Ok(n) => report.recorded.push((u.branch.clone(), n)),
                Err(why) => {
                    tracing::error!(repo = %self.name, branch = %u.branch, error = %why, "push not recorded; the next poll reports it again");
                    report.failed.push((u.branch.clone(), why));
                }
            }
        }
        Ok(report)
    }

    /// The commits of a push of `branch` from `old` (recorded; `None` for a new branch) to
    /// `new`, newest first, as changes. A new branch's commits are those on no recorded branch
    /// (so its merge base with the others, not its tip alone, decides what changed). Past
    /// [`MAX_COMMITS`], the paths of the older commits go to the oldest reported one.
    fn push_commits(&self, branch: &str, old: Option<&str>, new: &str) -> Result<Vec<NewCommit>, MirrorError> {
        let hidden: Vec<String> = match old {
            Some(old) if self.mirror.has_commit(old)? => vec![old.to_owned()],
            _ => {
                let others = |heads: std::collections::BTreeMap<String, String>| -> Vec<String> {
                    heads.into_iter().filter(|(b, _)| b != branch).map(|(_, id)| id).collect()
                };
                let mut known = others(self.mirror.recorded()?);
                if known.is_empty() {
                    // No other branch recorded yet: compare with the other branches as fetched.
                    known = others(self.mirror.heads()?);
                }
                if known.is_empty() {
                    // Nothing to compare with: the tip stands for the branch.
                    return Ok(vec![to_new(&self.mirror.commit(new)?)]);
                }
                known
            }
        };
        let range = self.mirror.range(&hidden, new, MAX_COMMITS)?;
        if range.commits.is_empty() {
            if old.is_some() {
                // Rewound to a commit already recorded: nothing new.
                return Ok(Vec::new());
            }
            // A new branch at a commit already on a recorded branch: its head is the change,
            // and it changed no path the other branches do not have.
            let mut head = to_new(&self.mirror.commit(new)?);
            head.files.clear();
            return Ok(vec![head]);
        }
        let mut commits: Vec<NewCommit> = range.commits.iter().map(to_new).collect();
        if range.total > commits.len() {
            tracing::info!(
                repo = %self.name,
                branch,
                commits = range.total,
                recorded = commits.len(),
                "a long push: its oldest recorded change carries the paths of the older commits"
            );
            if let Some(oldest) = commits.last_mut() {
                let mut files: std::collections::BTreeSet<String> =
                    std::mem::take(&mut oldest.files).into_iter().collect();
                files.extend(range.older_files);
                oldest.files = files.into_iter().collect();
            }
        }
        Ok(commits)
    }

    /// A pull request opened, updated, reopened or closed. Fetches the forge's ref for it
    /// (`refs/pull/<n>/head`, GitLab `refs/merge-requests/<n>/head`) so that a fork's head is in
    /// the mirror, then hands it to `record` unless this head was already recorded; the
    /// recorded head (`refs/rbb/pr/<n>`) moves only after `record` returned Ok.
    ///
    /// Blocking (git and whatever `record` does): run it off the async threads.
    pub fn pull_request<E: std::fmt::Display>(
        &self,
        forge: Forge,
        pr: &webhooks::PullRequest,
        mut record: impl FnMut(&PullRequestChange) -> Result<Vec<u64>, E>,
    ) -> Result<PullRequestOutcome, PullRequestError> {
        let number = pr.number;
        let mirror_err = |source| PullRequestError::Mirror { number, source };
        let _turn = self.take_turn();
        let built_ref = format!("refs/rbb/pr/{number}");
        let head_ref = format!("refs/rbb/pr-head/{number}");
        let built = self.mirror.find_ref(&built_ref).map_err(mirror_err)?;
        if pr.action == "closed" {
            self.mirror.move_ref(&built_ref, built.as_deref(), None).map_err(mirror_err)?;
            let fetched = self.mirror.find_ref(&head_ref).map_err(mirror_err)?;
            self.mirror.move_ref(&head_ref, fetched.as_deref(), None).map_err(mirror_err)?;
            return Ok(PullRequestOutcome::Closed { number });
        }
        if built.as_deref() == Some(pr.head_sha.as_str()) {
            tracing::info!(repo = %self.name, number, head = %pr.head_sha, "pull request head already recorded");
            return Ok(PullRequestOutcome::AlreadyRecorded { number, head: pr.head_sha.clone() });
        }
        let remote_ref = match forge {
            Forge::GitLab => format!("refs/merge-requests/{number}/head"),
            Forge::GitHub | Forge::Gitea => format!("refs/pull/{number}/head"),
        };
        let fetched = self.mirror.fetch_ref(&remote_ref, &head_ref).map_err(mirror_err)?;
        if !self.mirror.has_commit(&pr.head_sha).map_err(mirror_err)? {
            return Err(PullRequestError::HeadMissing {
                number,
                head: pr.head_sha.clone(),
                url: self.mirror.url().to_owned(),
                remote_ref,
                fetched: match fetched {
                    Some(id) => format!(" (it points at {id}; the webhook may be older than the last push)"),
                    None => " (the remote has no such ref)".to_owned(),
                },
            });
        }
        let mut commit = to_new(&self.mirror.commit(&pr.head_sha).map_err(mirror_err)?);
        // What the pull request changes: every commit not on its target branch.
        if let Some(target) = self.mirror.head(&pr.target_branch).map_err(mirror_err)? {
            let range = self.mirror.range(&[target], &pr.head_sha, 0).map_err(mirror_err)?;
            commit.files = range.older_files.into_iter().collect();
        }
        let change = PullRequestChange {
            number,
            target_branch: pr.target_branch.clone(),
            source_branch: pr.source_branch.clone(),
            commit,
            from_fork: pr.from_fork(),
        };
        let builds = record(&change).map_err(|e| PullRequestError::Record { number, why: e.to_string() })?;
        self.mirror.move_ref(&built_ref, built.as_deref(), Some(&pr.head_sha)).map_err(mirror_err)?;
        Ok(PullRequestOutcome::Recorded(builds))
    }
}

pub struct Sources {
    pub repos: Vec<Arc<SourceRepo>>,
    pub webhooks: WebhookConfig,
    /// Timed polls that may fetch at once ([`POLL_SLOTS`]): a fleet of repositories on one
    /// interval never opens hundreds of fetches to its forges at the same moment. A fetch a
    /// webhook asked for does not wait for a slot.
    pub poll_slots: Arc<tokio::sync::Semaphore>,
}

/// Timed polls fetching at once, all repositories together.
pub const POLL_SLOTS: usize = 8;

/// `wait` plus up to a tenth of it, different for each repository and round: pollers that
/// started together drift apart instead of fetching in step forever.
pub fn spread(wait: Duration, repo: &str, round: u64) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (repo, round).hash(&mut h);
    let permille = h.finish() % 101;
    wait + wait.mul_f64(permille as f64 / 1000.0)
}

/// What a webhook request came to.
#[derive(Debug)]
pub enum HookOutcome {
    /// 401: the signature or token header is missing.
    Unsigned(String),
    /// 403: wrong signature/token, or no secret configured for this forge.
    Refused(String),
    /// 400: the payload cannot be read, or what it names cannot be built (a pull request
    /// head that cannot be fetched).
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
    /// Polls one repository and hands new commits to the engine. `baseline`: only record
    /// where branches are (a new mirror's first fetch must not build every branch).
    ///
    /// Returns the wait before the repository's next poll (longer after failed fetches).
    pub async fn fetch(&self, engine: &Arc<Engine>, repo: &Arc<SourceRepo>, source: &str, baseline: bool) -> Duration {
        let (r, e, src) = (repo.clone(), engine.clone(), source.to_owned());
        let res = tokio::task::spawn_blocking(move || {
            r.poll(baseline, |branch: &str, commits: &[NewCommit]| {
                e.on_push(&r.name, branch, commits, &src).map(|builds| {
                    tracing::info!(repo = %r.name, branch, ?builds, "push handled");
                })
            })
        })
        .await;
        let mut quiet = source == "poll";
        let error = match res {
            Ok(Ok(report)) => {
                if baseline && report.fetch_error.is_none() {
                    tracing::info!(repo = %repo.name, branches = report.baseline, "mirror ready");
                    // A new mirror whose first fetch at start failed: its builders join now.
                    let (e, name) = (engine.clone(), repo.name.clone());
                    match tokio::task::spawn_blocking(move || e.head_fetched(&name)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => tracing::warn!(repo = %repo.name, error = %err, "cannot update the head plan"),
                        Err(err) => tracing::error!(repo = %repo.name, error = %err, "head plan task failed"),
                    }
                }
                quiet &= report.recorded.is_empty() && report.deleted.is_empty() && report.failed.is_empty();
                report.fetch_error
            }
            Ok(Err(e)) => {
                tracing::warn!(repo = %repo.name, error = %e, "poll failed");
                Some(e.to_string())
            }
            Err(e) => {
                tracing::error!(repo = %repo.name, error = %e, "poll task failed");
                Some("the poll could not run; see the master's log".to_owned())
            }
        };
        repo.note_fetch(error, quiet)
    }

    /// How every repository's fetches are going, in config order.
    pub fn health(&self) -> Vec<FetchHealth> {
        self.repos.iter().map(|r| r.health()).collect()
    }

    /// Runs every repository's poller until `stop`. Mirrors that already existed report
    /// what was pushed while the master was down; new ones start from where branches are.
    pub fn spawn_pollers(self: &Arc<Self>, engine: Arc<Engine>, fresh: Vec<bool>, stop: CancellationToken) {
        for (repo, fresh) in self.repos.iter().cloned().zip(fresh) {
            let (me, engine, stop) = (self.clone(), engine.clone(), stop.clone());
            tokio::spawn(async move {
                let mut wait = {
                    let _slot = me.poll_slots.acquire().await;
                    me.fetch(&engine, &repo, "poll", fresh).await
                };
                let mut round = 0u64;
                // A new mirror whose first fetches fail keeps its baseline for the first one
                // that brings branches: it must not build every commit of the repository.
                let mut baseline = fresh && repo.mirror.heads().map(|h| h.is_empty()).unwrap_or(true);
                loop {
                    round += 1;
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(spread(wait, &repo.name, round)) => {}
                        _ = repo.wake.notified() => {}
                    }
                    let source = repo
                        .wake_source
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take()
                        .unwrap_or_else(|| "poll".to_owned());
                    // A webhook's fetch goes first; timed polls take turns.
                    let _slot = if source == "poll" { Some(me.poll_slots.acquire().await) } else { None };
                    wait = me.fetch(&engine, &repo, &source, baseline).await;
                    baseline = baseline && repo.mirror.heads().map(|h| h.is_empty()).unwrap_or(true);
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
                if !matches!(pr.action.as_str(), "opened" | "synchronize" | "reopened" | "closed") {
                    return HookOutcome::Ignored(format!("pull request #{} {}", pr.number, pr.action));
                }
                if pr.action != "closed" {
                    // Target branches move too: the poll brings them (and their pushes) up to date.
                    self.fetch(engine, &repo, &source, false).await;
                }
                let (e, r) = (engine.clone(), repo.clone());
                let res = tokio::task::spawn_blocking(move || {
                    r.pull_request(forge, &pr, |change: &PullRequestChange| e.on_pull_request(&r.name, change, &source))
                })
                .await;
                match res {
                    Ok(Ok(PullRequestOutcome::Recorded(builds))) => {
                        HookOutcome::Accepted(format!("pull request builds {builds:?}"))
                    }
                    Ok(Ok(PullRequestOutcome::AlreadyRecorded { number, head })) => {
                        HookOutcome::Ignored(format!("pull request #{number}: head {head} is already recorded"))
                    }
                    Ok(Ok(PullRequestOutcome::Closed { number })) => {
                        HookOutcome::Ignored(format!("pull request #{number} closed"))
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(repo = %repo.name, error = %e, "pull request not recorded");
                        HookOutcome::Bad(e.to_string())
                    }
                    Err(e) => {
                        tracing::error!(repo = %repo.name, error = %e, "pull request task failed");
                        HookOutcome::Bad("the pull request could not be handled; see the master's log".to_owned())
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pollers_drift_apart_by_at_most_a_tenth_of_their_interval() {
        let wait = Duration::from_secs(60);
        let spread_waits: Vec<Duration> = (0..1000).map(|i| spread(wait, &format!("repo{i}"), 1)).collect();
        assert!(spread_waits.iter().all(|w| *w >= wait && *w <= wait + wait / 10), "{spread_waits:?}");
        // A thousand repositories on one interval do not poll in step.
        let distinct: std::collections::BTreeSet<Duration> = spread_waits.iter().copied().collect();
        assert!(distinct.len() > 50, "only {} distinct waits", distinct.len());
        // One repository's rounds differ too, and a zero interval stays zero.
        assert!((1..20).map(|r| spread(wait, "app", r)).collect::<std::collections::BTreeSet<_>>().len() > 1);
        assert_eq!(spread(Duration::ZERO, "app", 3), Duration::ZERO);
    }

    #[test]
    fn quiet_repositories_are_polled_less_often_and_a_new_commit_brings_the_interval_back() {
        let minute = Duration::from_secs(60);
        assert_eq!(idle_wait(minute, 0), minute);
        assert_eq!(idle_wait(minute, QUIET_POLLS - 1), minute);
        assert_eq!(idle_wait(minute, QUIET_POLLS), 2 * minute);
        assert_eq!(idle_wait(minute, 2 * QUIET_POLLS), 4 * minute);
        assert_eq!(idle_wait(minute, u32::MAX), 4 * minute);
        // Capped at ten minutes, unless the configured interval is longer already.
        assert_eq!(idle_wait(Duration::from_secs(300), 100), MAX_IDLE_WAIT);
        assert_eq!(idle_wait(Duration::from_secs(3600), 100), Duration::from_secs(3600));

        let dir = tempfile::tempdir().expect("tempdir");
        let repo = SourceRepo::new(
            "app".into(),
            "repos/app".into(),
            Mirror::open("repos/app", &dir.path().join("mirror")).expect("mirror"),
            vec!["main".into()],
            minute,
        );
        for _ in 0..2 * QUIET_POLLS {
            repo.note_fetch(None, true);
        }
        assert_eq!(repo.health().retry_in_ms, 4 * 60_000);
        assert_eq!(repo.note_fetch(None, false), minute, "a fetch that brought commits resets the interval");
        assert_eq!(repo.health().quiet, 0);
        // A failure backs off by failures, not by quiet polls.
        assert_eq!(repo.note_fetch(Some("down".into()), true), minute);
        assert_eq!(repo.note_fetch(Some("down".into()), true), 2 * minute);
    }
}
