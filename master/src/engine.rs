//! The engine: builds, steps, workers and leases, and the rules that move them along.
//!
//! Every state change is one method here that updates memory, writes the store and emits an
//! [`Event`], under one lock, so what the API shows, what is on disk and what subscribers hear
//! never disagree. Nothing else mutates build state. The engine does no network I/O itself:
//! messages to workers go into each session's channel without blocking.

use crate::logs::LogFiles;
use crate::model::{BuildRecord, ChangeRecord, LogRecord, ScheduleRecord, StepRecord, now_ms};
use crate::planner::Planner;
use crate::store::{Store, StoreError, Sync};
use rbb_compiler::condition;
use rbb_schema::api::{self, State};
use rbb_schema::config::WorkerConfig;
use rbb_schema::plan::{Plan, PlanBuilder};
use rbb_schema::proto::{self, MasterMessage, master_message::Msg as MasterMsg};
use rbb_schema::results::Outcome;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};

/// A lost worker's build is retried as a new build this many times in all.
const MAX_ATTEMPTS: u32 = 3;

/// What changed, for live subscribers (SSE, tests).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Build { id: u64 },
    Step { build: u64, step: u32 },
    Log { id: u64, bytes: u64 },
    Worker { name: String },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("log file: {0}")]
    Io(#[from] std::io::Error),
    #[error("the pipelines do not compile:\n{0}")]
    Plan(String),
}

/// Why a worker was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownWorker,
    BadToken,
}

/// A repository as the engine needs it to start builds.
#[derive(Debug, Clone)]
pub struct Repo {
    pub name: String,
    /// Local path of the repository (what workers clone).
    pub path: PathBuf,
    /// Where the master reads commits from (the repository's bare mirror).
    pub git_dir: PathBuf,
    pub branch: String,
}

pub type SessionTx = mpsc::Sender<Result<MasterMessage, tonic::Status>>;

struct Session {
    id: u64,
    tx: SessionTx,
    last_seen: Instant,
}

struct WorkerState {
    config: WorkerConfig,
    labels: BTreeSet<String>,
    max_steps: u32,
    platform: Option<String>,
    session: Option<Session>,
    /// Builds assigned to this worker, by builder id (one build per builder at a time: the
    /// checkout directory is per builder).
    builds: BTreeMap<String, u64>,
    last_seen_ms: Option<u64>,
}

struct LeaseInfo {
    build: u64,
    step: u32,
    worker: String,
}

struct Inner {
    plan: Arc<Plan>,
    plans: HashMap<String, Arc<Plan>>,
    builds: BTreeMap<u64, BuildRecord>,
    logs: HashMap<u64, LogRecord>,
    workers: BTreeMap<String, WorkerState>,
    leases: HashMap<u64, LeaseInfo>,
    /// Running builds whose last lease was refused: their next step waits for a free slot.
    stalled: BTreeSet<u64>,
    changes: BTreeMap<u64, ChangeRecord>,
    schedules: HashMap<String, ScheduleRecord>,
    next_change: u64,
    next_build: u64,
    next_lease: u64,
    next_log: u64,
    next_session: u64,
}

pub struct Engine {
    state: Mutex<Inner>,
    store: Store,
    pub logs: LogFiles,
    events: broadcast::Sender<Event>,
    repos: BTreeMap<String, Repo>,
    planner: Planner,
    /// Declared locks and their `max`.
    locks: BTreeMap<String, u32>,
    pub heartbeat: Duration,
}

impl Engine {
    /// Opens the state directory and recovers from a previous run: finished results are
    /// kept; builds that were running are marked RETRY and queued again; pending ones wait.
    pub fn open(
        state_dir: &std::path::Path,
        planner: Planner,
        repos: Vec<Repo>,
        workers: Vec<WorkerConfig>,
        locks: BTreeMap<String, u32>,
        heartbeat: Duration,
    ) -> Result<Arc<Engine>, EngineError> {
        std::fs::create_dir_all(state_dir)?;
        planner.refresh_heads().map_err(EngineError::Plan)?;
        let plan = (*planner.head_plan()).clone();
        let store = Store::open(&state_dir.join("state.redb"))?;
        let logs = LogFiles::new(&state_dir.join("logs"))?;
        store.put_plan(&plan)?;
        let mut plans: HashMap<String, Arc<Plan>> =
            store.plans()?.into_iter().map(|p| (p.hash.clone(), Arc::new(p))).collect();
        let plan = Arc::new(plan);
        plans.insert(plan.hash.clone(), plan.clone());
        let builds: BTreeMap<u64, BuildRecord> = store.builds()?.into_iter().map(|b| (b.id, b)).collect();
        let mut log_records: HashMap<u64, LogRecord> = store.logs()?.into_iter().map(|l| (l.id, l)).collect();
        let next_build = builds.keys().next_back().map_or(1, |k| k + 1);
        let next_log = log_records.keys().max().map_or(1, |k| k + 1);
        let changes: BTreeMap<u64, ChangeRecord> = store.changes()?.into_iter().map(|c| (c.id, c)).collect();
        let next_change = changes.keys().next_back().map_or(1, |k| k + 1);
        let schedules = store.schedules()?.into_iter().collect();
        // Logs that were being written when the master stopped: their length is what reached
        // the disk.
        for l in log_records.values_mut() {
            if !l.finished {
                l.bytes = logs.size_on_disk(&l.file);
                l.finished = true;
                store.put_log(l, Sync::Lazy)?;
            }
        }
        let workers = workers
            .into_iter()
            .map(|w| {
                let labels = w.labels.iter().cloned().collect();
                let max_steps = w.max_steps.unwrap_or(1).max(1);
                (
                    w.name.clone(),
                    WorkerState {
                        config: w,
                        labels,
                        max_steps,
                        platform: None,
                        session: None,
                        builds: BTreeMap::new(),
                        last_seen_ms: None,
                    },
                )
            })
            .collect();
        let (events, _) = broadcast::channel(4096);
        let engine = Arc::new(Engine {
            state: Mutex::new(Inner {
                plan,
                plans,
                builds,
                logs: log_records,
                workers,
                leases: HashMap::new(),
                stalled: BTreeSet::new(),
                changes,
                schedules,
                next_change,
                next_build,
                next_lease: 1,
                next_log,
                next_session: 1,
            }),
            store,
            logs,
            events,
            repos: repos.into_iter().map(|r| (r.name.clone(), r)).collect(),
            planner,
            locks,
            heartbeat,
        });
        engine.recover()?;
        Ok(engine)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    fn recover(&self) -> Result<(), EngineError> {
        let mut st = self.lock();
        let running: Vec<u64> = st.builds.values().filter(|b| b.state == State::Running).map(|b| b.id).collect();
        for id in running {
            tracing::warn!(build = id, "build was running when the master stopped; retrying it");
            self.lose_build(&mut st, id, "the master restarted while it ran")?;
        }
        Ok(())
    }

    // ---- queries -------------------------------------------------------------------

    pub fn plan(&self) -> Arc<Plan> {
        self.lock().plan.clone()
    }

    pub fn builders(&self) -> Vec<api::Builder> {
        let st = self.lock();
        let mut last: HashMap<&str, &BuildRecord> = HashMap::new();
        for b in st.builds.values() {
            last.insert(b.builder.as_str(), b);
        }
        st.plan
            .builders
            .iter()
            .map(|b| api::Builder {
                id: b.id.clone(),
                repo: b.repo.clone(),
                name: b.name.clone(),
                description: b.description.clone(),
                labels: b.labels.clone(),
                tags: b.tags.clone(),
                needs: b.needs.clone(),
                steps: b.steps.iter().map(|s| s.name.clone()).collect(),
                last_build: last.get(b.id.as_str()).map(|r| api::BuildSummary {
                    id: r.id,
                    state: r.state,
                    result: r.result,
                }),
            })
            .collect()
    }

    pub fn builds(&self, builder: Option<&str>) -> Vec<api::Build> {
        let st = self.lock();
        st.builds
            .values()
            .rev()
            .filter(|b| builder.is_none_or(|x| b.builder == x))
            .map(|b| to_api(b, &st.logs, &self.logs))
            .collect()
    }

    /// Builds waiting to start, oldest first.
    pub fn build_requests(&self) -> Vec<api::BuildRequest> {
        let st = self.lock();
        st.builds
            .values()
            .filter(|b| b.state == State::Pending)
            .map(|b| api::BuildRequest {
                id: b.id,
                builder: b.builder.clone(),
                repo: b.repo.clone(),
                branch: b.branch.clone(),
                commit: b.commit.clone(),
                reason: b.reason.clone(),
                priority: b.priority,
                submitted_at: b.submitted_at,
                waits_for: b.waits_for.clone(),
                changes: b.changes.clone(),
            })
            .collect()
    }

    /// Cancels a build request (a build that has not started).
    pub fn cancel_request(&self, id: u64) -> Result<(), EngineError> {
        match self.build(id).map(|b| b.state) {
            None => Err(EngineError::NotFound(format!("no build request {id}"))),
            Some(State::Pending) => self.stop(id, "request cancelled through the API"),
            Some(_) => Err(EngineError::Conflict(format!("build {id} has already started; stop it instead"))),
        }
    }

    pub fn build(&self, id: u64) -> Option<api::Build> {
        let st = self.lock();
        st.builds.get(&id).map(|b| to_api(b, &st.logs, &self.logs))
    }

    pub fn log(&self, id: u64) -> Option<(LogRecord, PathBuf, bool)> {
        let st = self.lock();
        let l = st.logs.get(&id)?.clone();
        let live = self.logs.len(id);
        let mut rec = l;
        if let Some(len) = live {
            rec.bytes = len;
        }
        let path = self.logs.path(&rec.file);
        Some((rec, path, live.is_some()))
    }

    pub fn workers(&self) -> Vec<api::Worker> {
        let st = self.lock();
        st.workers
            .values()
            .map(|w| api::Worker {
                name: w.config.name.clone(),
                connected: w.session.is_some(),
                labels: w.labels.iter().cloned().collect(),
                max_steps: w.max_steps,
                running: st.leases.values().filter(|l| l.worker == w.config.name).count() as u32,
                current: {
                    let mut cur: Vec<api::CurrentStep> = st
                        .leases
                        .values()
                        .filter(|l| l.worker == w.config.name)
                        .filter_map(|l| {
                            let b = st.builds.get(&l.build)?;
                            Some(api::CurrentStep {
                                build: b.id,
                                builder: b.builder.clone(),
                                step: l.step,
                                name: b.steps.get(l.step as usize).map(|s| s.name.clone()).unwrap_or_default(),
                            })
                        })
                        .collect();
                    cur.sort_by_key(|c| c.build);
                    cur
                },
                platform: w.platform.clone(),
                last_seen: w.last_seen_ms,
            })
            .collect()
    }

    // ---- builds --------------------------------------------------------------------

    /// Forces `builder` at a branch or revision. Builders it needs get builds at the same
    /// commit too, unless one already succeeded there.
    pub fn force(&self, builder: &str, req: api::ForceRequest) -> Result<api::ForceResponse, EngineError> {
        let head = self.plan();
        let Some(pb) = head.builder(builder) else {
            let ids: Vec<&str> = head.builders.iter().map(|b| b.id.as_str()).collect();
            let close = rbb_compiler::diagnostic::suggest(builder, ids.iter().copied());
            let hint = if close.is_empty() { String::new() } else { format!("; did you mean {}?", close.join(" or ")) };
            return Err(EngineError::NotFound(format!("no builder `{builder}` in the plan{hint}")));
        };
        let repo = self
            .repos
            .get(&pb.repo)
            .ok_or_else(|| EngineError::NotFound(format!("repository `{}` is not configured", pb.repo)))?
            .clone();
        let branch = req.branch.clone().unwrap_or_else(|| repo.branch.clone());
        let rev = req.revision.clone().unwrap_or_else(|| branch.clone());
        let commit = resolve(&repo.git_dir, &rev).map_err(|e| {
            EngineError::BadRequest(format!("cannot resolve `{rev}` in repository `{}`: {e}", repo.name))
        })?;
        let reason = req.reason.clone().unwrap_or_else(|| "force".to_owned());
        // The plan comes from the commit being built.
        let plan = match self.planner.plan_at(&repo.name, &commit) {
            Ok(p) => p,
            Err(plan_error) => {
                let mut st = self.lock();
                let id = self.pipeline_failure(&mut st, &repo, &branch, &commit, plan_error.text(), "force", &[])?;
                return Ok(api::ForceResponse { build: id, needed: Vec::new() });
            }
        };
        let Some(pb) = plan.builder(builder).cloned() else {
            return Err(EngineError::NotFound(format!("builder `{builder}` does not exist at commit {commit}")));
        };
        if !pb.triggers.force {
            return Err(EngineError::BadRequest(format!("builder `{builder}` cannot be forced (`on.force: false`)")));
        }
        let mut st = self.lock();
        self.remember_plan(&mut st, &plan)?;
        let mut created = Vec::new();
        let id = self.create_build(
            &mut st,
            &plan,
            &pb,
            &repo,
            &branch,
            &commit,
            &reason,
            "force",
            &req.properties,
            &[],
            &mut created,
        )?;
        self.persist_created(&mut st, &created)?;
        self.dispatch(&mut st)?;
        Ok(api::ForceResponse { build: id, needed: created.into_iter().filter(|i| *i != id).collect() })
    }

    /// Runs a finished build again with exactly the plan it was pinned to.
    pub fn rebuild(&self, id: u64) -> Result<u64, EngineError> {
        let mut st = self.lock();
        let Some(old) = st.builds.get(&id).cloned() else {
            return Err(EngineError::NotFound(format!("no build {id}")));
        };
        let Some(plan) = st.plans.get(&old.plan_hash).cloned() else {
            return Err(EngineError::Conflict(format!("build {id} has no plan to run again")));
        };
        let Some(pb) = plan.builder(&old.builder).cloned() else {
            return Err(EngineError::Conflict(format!("build {id} is not a builder's build")));
        };
        let repo = self
            .repos
            .get(&old.repo)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("repository `{}` is not configured", old.repo)))?;
        let mut created = Vec::new();
        let new = self.create_build(
            &mut st,
            &plan,
            &pb,
            &repo,
            &old.branch,
            &old.commit,
            &format!("rebuild of build {id}"),
            &old.event,
            &old.properties,
            &old.changes,
            &mut created,
        )?;
        self.persist_created(&mut st, &created)?;
        self.dispatch(&mut st)?;
        Ok(new)
    }

    fn remember_plan(&self, st: &mut Inner, plan: &Arc<Plan>) -> Result<(), EngineError> {
        if !st.plans.contains_key(&plan.hash) {
            self.store.put_plan(plan)?;
            st.plans.insert(plan.hash.clone(), plan.clone());
        }
        Ok(())
    }

    fn persist_created(&self, st: &mut Inner, created: &[u64]) -> Result<(), EngineError> {
        let recs: Vec<&BuildRecord> = created.iter().filter_map(|i| st.builds.get(i)).collect();
        self.store.put_builds(recs, Sync::Durable)?;
        for i in created {
            self.emit(Event::Build { id: *i });
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn create_build(
        &self,
        st: &mut Inner,
        plan: &Plan,
        pb: &PlanBuilder,
        repo: &Repo,
        branch: &str,
        commit: &str,
        reason: &str,
        event: &str,
        props: &BTreeMap<String, String>,
        changes: &[u64],
        created: &mut Vec<u64>,
    ) -> Result<u64, EngineError> {
        // Needs first: reuse a pending, running or successful build of the same commit.
        let mut waits = Vec::new();
        for need in &pb.needs {
            let Some(nb) = plan.builder(need) else { continue };
            let nrepo = self.repos.get(&nb.repo).cloned().unwrap_or_else(|| repo.clone());
            // A builder of the same repository runs at the same commit; another repository's
            // at the head of its pipeline branch.
            let (ncommit, nbranch) = if nrepo.name == repo.name {
                (commit.to_owned(), branch.to_owned())
            } else {
                let c = resolve(&nrepo.git_dir, &nrepo.branch).map_err(|e| {
                    EngineError::BadRequest(format!(
                        "cannot resolve `{}` in repository `{}`: {e}",
                        nrepo.branch, nrepo.name
                    ))
                })?;
                (c, nrepo.branch.clone())
            };
            let existing = st
                .builds
                .values()
                .rev()
                .find(|b| {
                    b.builder == nb.id
                        && b.commit == ncommit
                        && (b.state != State::Finished || b.result.is_some_and(Outcome::is_ok))
                })
                .map(|b| b.id);
            let id = match existing {
                Some(id) => id,
                None => {
                    let why = format!("needed by {}", pb.id);
                    self.create_build(st, plan, nb, &nrepo, &nbranch, &ncommit, &why, event, props, changes, created)?
                }
            };
            waits.push(id);
        }
        let id = st.next_build;
        st.next_build += 1;
        let steps = pb.steps.iter().enumerate().map(|(i, s)| StepRecord::pending(i as u32, &s.name)).collect();
        let source = plan.repos.iter().find(|r| r.name == pb.repo);
        st.builds.insert(
            id,
            BuildRecord {
                id,
                builder: pb.id.clone(),
                repo: pb.repo.clone(),
                repo_url: repo.path.display().to_string(),
                branch: branch.to_owned(),
                commit: commit.to_owned(),
                plan_hash: plan.hash.clone(),
                pipeline_blob: source.and_then(|r| r.pipeline_blob.clone()),
                reason: reason.to_owned(),
                event: event.to_owned(),
                properties: props.clone(),
                priority: pb.priority,
                state: State::Pending,
                result: None,
                result_reason: String::new(),
                worker: None,
                waits_for: waits,
                halted: false,
                cancelled: false,
                attempt: 1,
                checked_out: false,
                changes: changes.to_vec(),
                submitted_at: now_ms(),
                started_at: None,
                finished_at: None,
                steps,
            },
        );
        created.push(id);
        tracing::info!(build = id, builder = %pb.id, commit = %commit, reason, "build queued");
        if event != "force" {
            self.apply_queue_policy(st, pb, id, created)?;
        }
        Ok(id)
    }

    /// Stops a build: a pending one is cancelled at once, a running one after its worker
    /// killed the current step.
    pub fn stop(&self, id: u64, reason: &str) -> Result<(), EngineError> {
        let mut st = self.lock();
        let Some(b) = st.builds.get_mut(&id) else {
            return Err(EngineError::NotFound(format!("no build {id}")));
        };
        match b.state {
            State::Finished => Err(EngineError::Conflict(format!("build {id} already finished"))),
            State::Pending => {
                b.cancelled = true;
                b.result = Some(Outcome::Cancelled);
                b.result_reason = format!("stopped: {reason}");
                self.finish_build(&mut st, id)?;
                self.dispatch(&mut st)
            }
            State::Running => {
                b.cancelled = true;
                b.result_reason = format!("stopped: {reason}");
                let lease = st.leases.iter().find(|(_, l)| l.build == id).map(|(k, l)| (*k, l.worker.clone()));
                match lease {
                    Some((lease, worker)) => {
                        self.send(&st, &worker, MasterMsg::Cancel(proto::Cancel { lease, reason: reason.to_owned() }));
                        self.store.put_build(&st.builds[&id], Sync::Lazy)?;
                        Ok(())
                    }
                    None => {
                        if let Some(b) = st.builds.get_mut(&id) {
                            b.result = Some(Outcome::Cancelled);
                        }
                        self.finish_build(&mut st, id)?;
                        self.dispatch(&mut st)
                    }
                }
            }
        }
    }

    // ---- changes and schedulers ----------------------------------------------------

    /// Commits pushed to `branch` of `repo` (newest first, as the mirror lists them). Records
    /// one change per commit, then schedules the builders whose `on:` wants them.
    pub fn on_push(
        &self,
        repo: &str,
        branch: &str,
        commits: &[NewCommit],
        source: &str,
    ) -> Result<Vec<u64>, EngineError> {
        let Some(head) = commits.first() else { return Ok(Vec::new()) };
        let r =
            self.repos.get(repo).cloned().ok_or_else(|| EngineError::NotFound(format!("no repository `{repo}`")))?;
        if branch == r.branch
            && let Err(e) = self.planner.head_moved(repo, &head.id)
        {
            tracing::warn!(repo, error = %e, "cannot read the new head's pipeline");
        }
        let plan = self.planner.plan_at(repo, &head.id);
        let head_plan = if branch == r.branch { Some(self.planner.head_plan()) } else { None };
        let mut st = self.lock();
        if let Some(hp) = head_plan {
            self.remember_plan(&mut st, &hp)?;
            st.plan = hp;
        }
        let ids = self.record_changes(&mut st, repo, branch, commits.iter().rev(), "push", source, None)?;
        let files: BTreeSet<&str> = commits.iter().flat_map(|c| c.files.iter().map(String::as_str)).collect();
        let plan = match plan {
            Ok(p) => p,
            Err(plan_error) => {
                let id = self.pipeline_failure(&mut st, &r, branch, &head.id, plan_error.text(), "push", &ids)?;
                return Ok(vec![id]);
            }
        };
        self.remember_plan(&mut st, &plan)?;
        let mut created = Vec::new();
        let mut out = Vec::new();
        for pb in plan.builders.iter().filter(|b| b.repo == repo) {
            let Some(filter) = &pb.triggers.push else { continue };
            if !branch_matches(filter, branch) {
                continue;
            }
            if !paths_match(&pb.triggers, &files) {
                out.push(self.not_affected(&mut st, &plan, pb, &r, branch, &head.id, &ids)?);
                continue;
            }
            out.push(self.create_build(
                &mut st,
                &plan,
                pb,
                &r,
                branch,
                &head.id,
                &format!("push to {branch}"),
                "push",
                &BTreeMap::new(),
                &ids,
                &mut created,
            )?);
        }
        self.persist_created(&mut st, &created)?;
        self.dispatch(&mut st)?;
        Ok(out)
    }

    /// A pull request opened or updated: builders whose `on.pull_request` matches its target
    /// branch build its head.
    pub fn on_pull_request(&self, repo: &str, pr: &PullRequestChange, source: &str) -> Result<Vec<u64>, EngineError> {
        let r =
            self.repos.get(repo).cloned().ok_or_else(|| EngineError::NotFound(format!("no repository `{repo}`")))?;
        let plan = self.planner.plan_at(repo, &pr.commit.id);
        let mut st = self.lock();
        let ids = self.record_changes(
            &mut st,
            repo,
            &pr.source_branch,
            std::iter::once(&pr.commit),
            "pull_request",
            source,
            Some(pr.number),
        )?;
        let plan = match plan {
            Ok(p) => p,
            Err(plan_error) => {
                return Ok(vec![self.pipeline_failure(
                    &mut st,
                    &r,
                    &pr.source_branch,
                    &pr.commit.id,
                    plan_error.text(),
                    "pull_request",
                    &ids,
                )?]);
            }
        };
        self.remember_plan(&mut st, &plan)?;
        let mut props = BTreeMap::new();
        props.insert("pr_number".to_owned(), pr.number.to_string());
        props.insert("target_branch".to_owned(), pr.target_branch.clone());
        let mut created = Vec::new();
        let mut out = Vec::new();
        for pb in plan.builders.iter().filter(|b| b.repo == repo) {
            let Some(filter) = &pb.triggers.pull_request else { continue };
            if !branch_matches(filter, &pr.target_branch) {
                continue;
            }
            let why = format!("pull request #{} into {}", pr.number, pr.target_branch);
            out.push(self.create_build(
                &mut st,
                &plan,
                pb,
                &r,
                &pr.source_branch,
                &pr.commit.id,
                &why,
                "pull_request",
                &props,
                &ids,
                &mut created,
            )?);
        }
        self.persist_created(&mut st, &created)?;
        self.dispatch(&mut st)?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn record_changes<'a>(
        &self,
        st: &mut Inner,
        repo: &str,
        branch: &str,
        oldest_first: impl Iterator<Item = &'a NewCommit>,
        event: &str,
        source: &str,
        pull_request: Option<u64>,
    ) -> Result<Vec<u64>, EngineError> {
        let mut recs = Vec::new();
        for c in oldest_first {
            let id = st.next_change;
            st.next_change += 1;
            recs.push(ChangeRecord {
                id,
                repo: repo.to_owned(),
                branch: branch.to_owned(),
                commit: c.id.clone(),
                author: c.author.clone(),
                email: c.email.clone(),
                time: c.time,
                message: c.message.clone(),
                files: c.files.clone(),
                event: event.to_owned(),
                source: source.to_owned(),
                recorded_at: now_ms(),
                pull_request,
            });
        }
        self.store.put_changes(&recs)?;
        let ids = recs.iter().map(|c| c.id).collect();
        tracing::info!(repo, branch, count = recs.len(), source, "changes recorded");
        for c in recs {
            st.changes.insert(c.id, c);
        }
        Ok(ids)
    }

    /// A finished build that says the commit's pipeline does not compile, with the
    /// diagnostics as its log.
    #[allow(clippy::too_many_arguments)]
    fn pipeline_failure(
        &self,
        st: &mut Inner,
        repo: &Repo,
        branch: &str,
        commit: &str,
        diags: &str,
        event: &str,
        changes: &[u64],
    ) -> Result<u64, EngineError> {
        let id = st.next_build;
        st.next_build += 1;
        let log = st.next_log;
        st.next_log += 1;
        let file = self.logs.create(log)?;
        self.logs.append(log, diags.as_bytes())?;
        let bytes = self.logs.close(log).unwrap_or(0);
        let rec = LogRecord { id: log, build: id, step: 0, file, bytes, finished: true };
        self.store.put_log(&rec, Sync::Lazy)?;
        st.logs.insert(log, rec);
        let now = now_ms();
        let b = BuildRecord {
            id,
            builder: format!("{}/{}", repo.name, PIPELINE_BUILDER),
            repo: repo.name.clone(),
            repo_url: repo.path.display().to_string(),
            branch: branch.to_owned(),
            commit: commit.to_owned(),
            plan_hash: String::new(),
            pipeline_blob: None,
            reason: format!("{PIPELINE_PATH} at {} does not compile", &commit[..commit.len().min(12)]),
            event: event.to_owned(),
            properties: BTreeMap::new(),
            priority: 0,
            state: State::Finished,
            result: Some(Outcome::Failure),
            result_reason: diags.lines().next().unwrap_or("the pipeline does not compile").to_owned(),
            worker: None,
            waits_for: Vec::new(),
            halted: true,
            cancelled: false,
            attempt: 1,
            checked_out: false,
            changes: changes.to_vec(),
            submitted_at: now,
            started_at: Some(now),
            finished_at: Some(now),
            steps: vec![StepRecord {
                number: 0,
                name: "compile pipeline".to_owned(),
                state: State::Finished,
                result: Some(Outcome::Failure),
                reason: "the pipeline does not compile".to_owned(),
                exit_code: None,
                started_at: Some(now),
                finished_at: Some(now),
                log_id: Some(log),
            }],
        };
        self.store.put_build(&b, Sync::Durable)?;
        tracing::warn!(build = id, repo = %repo.name, commit, "pipeline does not compile");
        st.builds.insert(id, b);
        self.emit(Event::Build { id });
        Ok(id)
    }

    /// A builder whose `paths:` no changed file matches: recorded as NOT_AFFECTED (it counts
    /// as passing for required checks) without running anything.
    #[allow(clippy::too_many_arguments)]
    fn not_affected(
        &self,
        st: &mut Inner,
        plan: &Plan,
        pb: &PlanBuilder,
        repo: &Repo,
        branch: &str,
        commit: &str,
        changes: &[u64],
    ) -> Result<u64, EngineError> {
        let mut created = Vec::new();
        let id = st.next_build;
        // Built like any build, then finished at once (its needs are not started).
        let mut bare = pb.clone();
        bare.needs.clear();
        self.create_build(
            st,
            plan,
            &bare,
            repo,
            branch,
            commit,
            "no changed file matches `paths`",
            "push",
            &BTreeMap::new(),
            changes,
            &mut created,
        )?;
        if let Some(b) = st.builds.get_mut(&id) {
            b.result = Some(Outcome::NotAffected);
            b.result_reason = "no changed file matches `paths`".to_owned();
            for s in &mut b.steps {
                s.reason = "not affected by the change".to_owned();
            }
        }
        self.finish_build(st, id)?;
        Ok(id)
    }

    /// Stops or replaces older requests of the same builder and branch, as the builder's
    /// queue policy says.
    fn apply_queue_policy(
        &self,
        st: &mut Inner,
        pb: &PlanBuilder,
        new: u64,
        created: &[u64],
    ) -> Result<(), EngineError> {
        let Some(nb) = st.builds.get(&new).cloned() else { return Ok(()) };
        if pb.collapse {
            let older: Vec<u64> = st
                .builds
                .values()
                .filter(|b| b.id != new && !created.contains(&b.id))
                .filter(|b| {
                    b.builder == nb.builder && b.branch == nb.branch && b.state == State::Pending && b.event != "force"
                })
                .map(|b| b.id)
                .collect();
            for old in older {
                let moved = st.builds.get(&old).map(|b| b.changes.clone()).unwrap_or_default();
                if let Some(b) = st.builds.get_mut(&old) {
                    b.result = Some(Outcome::Skipped);
                    b.result_reason = format!("collapsed into build {new}");
                }
                self.finish_build(st, old)?;
                let mut touched = vec![new];
                if let Some(n) = st.builds.get_mut(&new) {
                    let mut all: BTreeSet<u64> = n.changes.iter().copied().collect();
                    all.extend(moved);
                    n.changes = all.into_iter().collect();
                }
                for b in st.builds.values_mut() {
                    if b.state == State::Pending && b.waits_for.contains(&old) {
                        for w in &mut b.waits_for {
                            if *w == old {
                                *w = new;
                            }
                        }
                        touched.push(b.id);
                    }
                }
                let recs: Vec<&BuildRecord> = touched.iter().filter_map(|i| st.builds.get(i)).collect();
                self.store.put_builds(recs, Sync::Lazy)?;
                tracing::info!(build = old, into = new, "build request collapsed");
            }
        }
        if pb.cancel_superseded {
            let running: Vec<(u64, Option<u64>, Option<String>)> = st
                .builds
                .values()
                .filter(|b| {
                    b.builder == nb.builder
                        && b.branch == nb.branch
                        && b.state == State::Running
                        && b.commit != nb.commit
                })
                .map(|b| (b.id, st.leases.iter().find(|(_, l)| l.build == b.id).map(|(k, _)| *k), b.worker.clone()))
                .collect();
            for (id, lease, worker) in running {
                if let Some(b) = st.builds.get_mut(&id) {
                    b.cancelled = true;
                    b.result_reason = format!("superseded by build {new}");
                }
                if let (Some(lease), Some(worker)) = (lease, worker) {
                    self.send(
                        st,
                        &worker,
                        MasterMsg::Cancel(proto::Cancel { lease, reason: format!("superseded by build {new}") }),
                    );
                }
                tracing::info!(build = id, by = new, "running build superseded");
            }
        }
        Ok(())
    }

    /// Fires the cron schedules due at `now` (Unix seconds). Each schedule fires at most
    /// once per minute it matches, and a minute missed while the master was down fires once
    /// at the next tick (the newest missed minute only, within a day).
    pub fn cron_tick(&self, now: i64) -> Result<Vec<u64>, EngineError> {
        let plan = self.plan();
        let minute = now.div_euclid(60);
        let mut due = Vec::new();
        {
            let st = self.lock();
            for pb in &plan.builders {
                for (i, sched) in pb.triggers.schedule.iter().enumerate() {
                    let key = format!("{}#{i}", pb.id);
                    let rec = st
                        .schedules
                        .get(&key)
                        .cloned()
                        .unwrap_or(ScheduleRecord { checked_minute: minute - 1, ..Default::default() });
                    if rec.checked_minute >= minute {
                        continue;
                    }
                    let Ok(cron) = rbb_compiler::cron::Cron::parse(&sched.cron) else { continue };
                    let from = (rec.checked_minute + 1).max(minute - 24 * 60);
                    let fire = (from..=minute).rev().find(|m| cron_matches(&cron, *m));
                    due.push((pb.clone(), sched.clone(), key, rec, fire));
                }
            }
        }
        let mut out = Vec::new();
        for (pb, sched, key, mut rec, fire) in due {
            rec.checked_minute = minute;
            if let Some(m) = fire.filter(|m| rec.fired_minute.is_none_or(|f| f < *m)) {
                rec.fired_minute = Some(m);
                let Some(repo) = self.repos.get(&pb.repo).cloned() else { continue };
                match resolve(&repo.git_dir, &sched.branch) {
                    Ok(commit) if sched.only_if_changed && rec.last_commit.as_deref() == Some(commit.as_str()) => {
                        tracing::info!(builder = %pb.id, "schedule due, but {} has not moved; not building", sched.branch);
                    }
                    Ok(commit) => {
                        rec.last_commit = Some(commit.clone());
                        let plan = self.planner.plan_at(&repo.name, &commit);
                        let mut st = self.lock();
                        match plan {
                            Ok(plan) => {
                                if let Some(b) = plan.builder(&pb.id).cloned() {
                                    self.remember_plan(&mut st, &plan)?;
                                    let mut created = Vec::new();
                                    let why = format!("schedule \"{}\"", sched.cron);
                                    out.push(self.create_build(
                                        &mut st,
                                        &plan,
                                        &b,
                                        &repo,
                                        &sched.branch,
                                        &commit,
                                        &why,
                                        "schedule",
                                        &BTreeMap::new(),
                                        &[],
                                        &mut created,
                                    )?);
                                    self.persist_created(&mut st, &created)?;
                                }
                            }
                            Err(plan_error) => out.push(self.pipeline_failure(
                                &mut st,
                                &repo,
                                &sched.branch,
                                &commit,
                                plan_error.text(),
                                "schedule",
                                &[],
                            )?),
                        }
                        self.dispatch(&mut st)?;
                    }
                    Err(e) => {
                        tracing::warn!(builder = %pb.id, error = %e, "schedule due, but its branch cannot be resolved")
                    }
                }
            }
            self.store.put_schedule(&key, &rec)?;
            self.lock().schedules.insert(key, rec);
        }
        Ok(out)
    }

    /// The grid: builders × the `limit` newest commits (of changes and builds), with the
    /// newest build of each builder at each commit.
    pub fn grid(&self, limit: usize) -> serde_json::Value {
        use serde_json::json;
        let st = self.lock();
        // (when seen, repo, commit, branch), newest first.
        let mut cols: Vec<(u64, &str, &str, &str)> = Vec::new();
        for c in st.changes.values() {
            cols.push((c.recorded_at, &c.repo, &c.commit, &c.branch));
        }
        for b in st.builds.values() {
            cols.push((b.submitted_at, &b.repo, &b.commit, &b.branch));
        }
        cols.sort_by_key(|c| std::cmp::Reverse(c.0));
        // The newest change of each (repo, commit), for the column headings.
        let mut change_of: HashMap<(&str, &str), &ChangeRecord> = HashMap::new();
        for c in st.changes.values() {
            change_of.insert((c.repo.as_str(), c.commit.as_str()), c);
        }
        let mut seen: BTreeSet<(&str, &str)> = BTreeSet::new();
        let mut columns = Vec::new();
        for (_, repo, commit, branch) in &cols {
            if columns.len() >= limit {
                break;
            }
            if seen.insert((repo, commit)) {
                let info = change_of.get(&(*repo, *commit));
                let mut col = json!({ "repo": repo, "commit": commit, "branch": branch });
                if let Some(c) = info {
                    col["message"] = json!(c.message.lines().next().unwrap_or(""));
                    col["author"] = json!(c.author);
                    col["time"] = json!(c.time);
                }
                columns.push(col);
            }
        }
        let mut cells: BTreeMap<&str, BTreeMap<&str, serde_json::Value>> = BTreeMap::new();
        let mut extra: BTreeSet<&str> = BTreeSet::new();
        for b in st.builds.values().rev() {
            if !seen.contains(&(b.repo.as_str(), b.commit.as_str())) {
                continue;
            }
            let row = cells.entry(b.builder.as_str()).or_default();
            row.entry(b.commit.as_str()).or_insert_with(|| {
                json!({ "build": b.id, "state": b.state, "result": b.result.filter(|_| b.state == State::Finished) })
            });
            if st.plan.builder(&b.builder).is_none() {
                extra.insert(b.builder.as_str());
            }
        }
        let mut builders: Vec<serde_json::Value> = st
            .plan
            .builders
            .iter()
            .map(
                |b| json!({ "id": b.id, "repo": b.repo, "name": b.name, "tags": b.tags, "description": b.description }),
            )
            .collect();
        for id in extra {
            let (repo, name) = id.split_once('/').unwrap_or(("", id));
            builders.push(json!({ "id": id, "repo": repo, "name": name, "tags": [] }));
        }
        json!({ "builders": builders, "columns": columns, "cells": cells })
    }

    pub fn changes(&self) -> Vec<api::Change> {
        let st = self.lock();
        let mut builds_of: HashMap<u64, Vec<u64>> = HashMap::new();
        for b in st.builds.values() {
            for c in &b.changes {
                builds_of.entry(*c).or_default().push(b.id);
            }
        }
        st.changes
            .values()
            .rev()
            .map(|c| api::Change {
                id: c.id,
                repo: c.repo.clone(),
                branch: c.branch.clone(),
                commit: c.commit.clone(),
                author: c.author.clone(),
                email: c.email.clone(),
                time: c.time,
                message: c.message.clone(),
                files: c.files.clone(),
                event: c.event.clone(),
                source: c.source.clone(),
                recorded_at: c.recorded_at,
                pull_request: c.pull_request,
                builds: builds_of.remove(&c.id).unwrap_or_default(),
            })
            .collect()
    }

    // ---- workers -------------------------------------------------------------------

    /// Checks a connecting worker's name and token.
    pub fn authenticate(&self, name: &str, token: &str) -> Result<(), Refusal> {
        let st = self.lock();
        let w = st.workers.get(name).ok_or(Refusal::UnknownWorker)?;
        match &w.config.token {
            Some(t) if t.as_bytes() == token.as_bytes() => Ok(()),
            None => Ok(()),
            Some(_) => Err(Refusal::BadToken),
        }
    }

    /// A worker finished its handshake. A previous session of the same worker is dropped
    /// (its steps are lost and retried).
    pub fn connect(&self, hello: &proto::Hello, tx: SessionTx) -> Result<u64, EngineError> {
        let mut st = self.lock();
        let id = st.next_session;
        st.next_session += 1;
        let old = st.workers.get(&hello.name).and_then(|w| w.session.as_ref().map(|s| s.id));
        if let Some(old) = old {
            self.lose_session(&mut st, &hello.name, old, "it connected again")?;
        }
        let Some(w) = st.workers.get_mut(&hello.name) else {
            return Err(EngineError::NotFound(format!("unknown worker {}", hello.name)));
        };
        w.labels = w.config.labels.iter().chain(hello.labels.iter()).cloned().collect();
        // The worker says what it can run; the config may only lower that.
        w.max_steps = hello.max_steps.max(1).min(w.config.max_steps.unwrap_or(u32::MAX)).max(1);
        w.platform = Some(hello.platform.clone()).filter(|p| !p.is_empty());
        w.last_seen_ms = Some(now_ms());
        let welcome = MasterMsg::Welcome(proto::Welcome {
            heartbeat_interval_ms: self.heartbeat.as_millis() as u32,
            master_version: env!("CARGO_PKG_VERSION").to_owned(),
            labels: w.config.labels.clone(),
        });
        let _ = tx.try_send(Ok(MasterMessage { msg: Some(welcome) }));
        w.session = Some(Session { id, tx, last_seen: Instant::now() });
        tracing::info!(worker = %hello.name, session = id, labels = ?w.labels, max_steps = w.max_steps, "worker connected");
        self.emit(Event::Worker { name: hello.name.clone() });
        self.dispatch(&mut st)?;
        Ok(id)
    }

    /// The session's stream ended (the worker went away or the connection broke).
    pub fn disconnect(&self, worker: &str, session: u64, why: &str) {
        let mut st = self.lock();
        if let Err(e) = self.lose_session(&mut st, worker, session, why) {
            tracing::error!(worker, error = %e, "cannot record a lost worker");
        }
        if let Err(e) = self.dispatch(&mut st) {
            tracing::error!(error = %e, "dispatch failed");
        }
    }

    /// Drops sessions that have been silent for three heartbeat intervals.
    pub fn check_heartbeats(&self) {
        let mut st = self.lock();
        let limit = self.heartbeat * 3;
        let silent: Vec<(String, u64)> = st
            .workers
            .values()
            .filter_map(|w| {
                w.session.as_ref().filter(|s| s.last_seen.elapsed() > limit).map(|s| (w.config.name.clone(), s.id))
            })
            .collect();
        for (name, session) in silent {
            tracing::warn!(worker = %name, "no heartbeat for {:?}; treating the worker as lost", limit);
            if let Err(e) = self.lose_session(&mut st, &name, session, "no heartbeat") {
                tracing::error!(worker = %name, error = %e, "cannot record a lost worker");
            }
        }
        if let Err(e) = self.dispatch(&mut st) {
            tracing::error!(error = %e, "dispatch failed");
        }
    }

    fn lose_session(&self, st: &mut Inner, worker: &str, session: u64, why: &str) -> Result<(), EngineError> {
        let Some(w) = st.workers.get_mut(worker) else { return Ok(()) };
        if w.session.as_ref().map(|s| s.id) != Some(session) {
            return Ok(());
        }
        if let Some(s) = w.session.take() {
            let _ = s.tx.try_send(Err(tonic::Status::aborted(format!("session closed: {why}"))));
        }
        tracing::warn!(worker, session, why, "worker disconnected");
        let builds: Vec<u64> = w.builds.values().copied().collect();
        for id in builds {
            self.lose_build(st, id, &format!("worker {worker} was lost ({why})"))?;
        }
        self.emit(Event::Worker { name: worker.to_owned() });
        Ok(())
    }

    /// A running build lost its worker: its running step becomes RETRY, the build finishes
    /// as RETRY and a new attempt is queued (EXCEPTION after the last attempt).
    fn lose_build(&self, st: &mut Inner, id: u64, why: &str) -> Result<(), EngineError> {
        let leases: Vec<u64> = st.leases.iter().filter(|(_, l)| l.build == id).map(|(k, _)| *k).collect();
        for l in leases {
            st.leases.remove(&l);
        }
        let Some(b) = st.builds.get_mut(&id) else { return Ok(()) };
        if b.state == State::Finished {
            return Ok(());
        }
        let now = now_ms();
        let mut closed_logs = Vec::new();
        for s in &mut b.steps {
            if s.state == State::Running {
                s.state = State::Finished;
                s.result = Some(Outcome::Retry);
                s.reason = why.to_owned();
                s.finished_at = Some(now);
                closed_logs.extend(s.log_id);
            }
        }
        let retry = !b.cancelled && b.attempt < MAX_ATTEMPTS;
        b.result = Some(if b.cancelled {
            Outcome::Cancelled
        } else if retry {
            Outcome::Retry
        } else {
            Outcome::Exception
        });
        b.result_reason =
            if retry || b.cancelled { why.to_owned() } else { format!("{why}; gave up after {} attempts", b.attempt) };
        for log in closed_logs {
            self.close_log(st, log)?;
        }
        let old = st.builds[&id].clone();
        self.finish_build(st, id)?;
        if retry {
            let new_id = st.next_build;
            st.next_build += 1;
            let mut nb = old.clone();
            nb.id = new_id;
            nb.reason = format!("retry of build {id}");
            nb.state = State::Pending;
            nb.result = None;
            nb.result_reason = String::new();
            nb.worker = None;
            nb.halted = false;
            nb.checked_out = false;
            nb.attempt = old.attempt + 1;
            nb.submitted_at = now_ms();
            nb.started_at = None;
            nb.finished_at = None;
            nb.waits_for = Vec::new();
            for s in &mut nb.steps {
                *s = StepRecord::pending(s.number, &s.name);
            }
            // Builds waiting for the lost one wait for its retry instead.
            let mut touched = vec![new_id];
            for b in st.builds.values_mut() {
                if b.state == State::Pending && b.waits_for.contains(&id) {
                    for w in &mut b.waits_for {
                        if *w == id {
                            *w = new_id;
                        }
                    }
                    touched.push(b.id);
                }
            }
            st.builds.insert(new_id, nb);
            let recs: Vec<&BuildRecord> = touched.iter().filter_map(|i| st.builds.get(i)).collect();
            self.store.put_builds(recs, Sync::Durable)?;
            tracing::info!(build = new_id, retry_of = id, "build queued again");
            self.emit(Event::Build { id: new_id });
        }
        Ok(())
    }

    /// A message from a worker's session.
    pub fn on_message(&self, worker: &str, session: u64, msg: proto::worker_message::Msg) -> Result<(), EngineError> {
        use proto::worker_message::Msg;
        let mut st = self.lock();
        {
            let Some(w) = st.workers.get_mut(worker) else { return Ok(()) };
            match w.session.as_mut() {
                Some(s) if s.id == session => s.last_seen = Instant::now(),
                _ => return Ok(()), // a message from a replaced session
            }
            w.last_seen_ms = Some(now_ms());
        }
        match msg {
            Msg::Hello(_) | Msg::Heartbeat(_) => Ok(()),
            Msg::Started(s) => {
                let Some(l) = st.leases.get(&s.lease) else { return Ok(()) };
                let (build, step) = (l.build, l.step);
                self.emit(Event::Step { build, step });
                Ok(())
            }
            Msg::Log(chunk) => {
                let Some(l) = st.leases.get(&chunk.lease) else { return Ok(()) };
                let Some(log) =
                    st.builds.get(&l.build).and_then(|b| b.steps.get(l.step as usize)).and_then(|s| s.log_id)
                else {
                    return Ok(());
                };
                drop(st);
                if let Some(bytes) = self.logs.append(log, &chunk.data)? {
                    self.emit(Event::Log { id: log, bytes });
                }
                Ok(())
            }
            Msg::Finished(f) => self.step_finished(&mut st, f),
            Msg::Refused(r) => self.lease_refused(&mut st, worker, r),
        }
    }

    /// The worker could not take a lease. Not a result: the step goes back to pending and
    /// is leased again when the worker has a free slot.
    fn lease_refused(&self, st: &mut Inner, worker: &str, r: proto::LeaseRefused) -> Result<(), EngineError> {
        let Some(lease) = st.leases.remove(&r.lease) else { return Ok(()) };
        tracing::warn!(worker, lease = r.lease, build = lease.build, reason = %r.reason, "lease refused; step queued again");
        let log = st.builds.get_mut(&lease.build).and_then(|b| {
            let s = b.steps.get_mut(lease.step as usize)?;
            s.state = State::Pending;
            s.started_at = None;
            s.log_id.take()
        });
        if let Some(log) = log {
            self.close_log(st, log)?;
        }
        st.stalled.insert(lease.build);
        self.emit(Event::Step { build: lease.build, step: lease.step });
        Ok(())
    }

    fn step_finished(&self, st: &mut Inner, f: proto::StepFinished) -> Result<(), EngineError> {
        let Some(lease) = st.leases.remove(&f.lease) else {
            tracing::debug!(lease = f.lease, "result for an unknown lease (ignored)");
            return Ok(());
        };
        let result = match proto::StepResult::try_from(f.result) {
            Ok(proto::StepResult::Success) => Outcome::Success,
            Ok(proto::StepResult::Warnings) => Outcome::Warnings,
            Ok(proto::StepResult::Failure) => Outcome::Failure,
            Ok(proto::StepResult::Skipped) => Outcome::Skipped,
            Ok(proto::StepResult::Cancelled) => Outcome::Cancelled,
            Ok(proto::StepResult::Retry) | Ok(proto::StepResult::Exception) | Err(_) => Outcome::Exception,
        };
        let plan = self.plan_of(st, lease.build);
        let Some(b) = st.builds.get_mut(&lease.build) else { return Ok(()) };
        let spec =
            plan.as_ref().and_then(|p| p.builder(&b.builder)).and_then(|pb| pb.steps.get(lease.step as usize)).cloned();
        let now = now_ms();
        let log_id = {
            let s = &mut b.steps[lease.step as usize];
            s.state = State::Finished;
            s.result = Some(result);
            s.exit_code = f.exit_code;
            s.reason = f.reason.clone();
            s.finished_at = Some(now);
            s.log_id
        };
        let (flunk, warn, halt) =
            spec.map_or((true, false, true), |s| (s.flunk_on_failure, s.warn_on_failure, s.halt_on_failure));
        let contribution = match result {
            Outcome::Failure if flunk => Some(Outcome::Failure),
            Outcome::Failure if warn => Some(Outcome::Warnings),
            Outcome::Failure => None,
            Outcome::Success | Outcome::Skipped | Outcome::Cached | Outcome::NotAffected => None,
            other => Some(other),
        };
        if let Some(c) = contribution {
            let before = b.result;
            b.result = Some(b.result.map_or(c, |r| r.worst(c)));
            // The reason names the step that made the result what it is.
            let stopped = b.cancelled && !b.result_reason.is_empty();
            if !stopped && (b.result != before || b.result_reason.is_empty()) {
                b.result_reason =
                    format!("step {} ({}): {}", lease.step + 1, b.steps[lease.step as usize].name, f.reason);
            }
        }
        if (result == Outcome::Failure && halt) || matches!(result, Outcome::Exception) {
            b.halted = true;
        }
        if result == Outcome::Cancelled {
            b.cancelled = true;
        }
        tracing::info!(build = lease.build, step = lease.step, result = %result, reason = %f.reason, "step finished");
        if let Some(log) = log_id {
            self.close_log(st, log)?;
        }
        self.emit(Event::Step { build: lease.build, step: lease.step });
        self.next_step(st, lease.build)?;
        self.dispatch(st)
    }

    fn close_log(&self, st: &mut Inner, log: u64) -> Result<(), EngineError> {
        let len = self.logs.close(log);
        if let Some(rec) = st.logs.get_mut(&log) {
            if let Some(len) = len {
                rec.bytes = len;
            }
            rec.finished = true;
            self.store.put_log(rec, Sync::Lazy)?;
        }
        Ok(())
    }

    fn plan_of(&self, st: &Inner, build: u64) -> Option<Arc<Plan>> {
        let hash = &st.builds.get(&build)?.plan_hash;
        st.plans.get(hash).cloned()
    }

    /// Leases the build's next runnable step, skipping what must be skipped; finishes the
    /// build when nothing is left.
    fn next_step(&self, st: &mut Inner, id: u64) -> Result<(), EngineError> {
        let plan = self.plan_of(st, id);
        let Some(b) = st.builds.get(&id) else { return Ok(()) };
        let Some(pb) = plan.as_ref().and_then(|p| p.builder(&b.builder)).cloned() else {
            if let Some(b) = st.builds.get_mut(&id) {
                b.result = Some(Outcome::Exception);
                b.result_reason = format!("builder {} is not in plan {}", b.builder, b.plan_hash);
            }
            return self.finish_build(st, id);
        };
        loop {
            let Some(b) = st.builds.get_mut(&id) else { return Ok(()) };
            let Some(i) = b.steps.iter().position(|s| s.state == State::Pending) else {
                return self.finish_build(st, id);
            };
            let spec = &pb.steps[i];
            let skip = if b.cancelled {
                Some("the build was stopped".to_owned())
            } else if b.halted && !spec.always_run {
                Some("an earlier step halted the build".to_owned())
            } else if let Some(cond) = &spec.condition {
                let scope = condition_scope(b, &pb);
                match condition::parse(cond) {
                    Ok(expr) if expr.eval(&scope) => None,
                    Ok(_) => Some(format!("`if: {cond}` is false")),
                    Err(e) => Some(format!("`if: {cond}` does not parse: {}", e.message)),
                }
            } else {
                None
            };
            if let Some(why) = skip {
                let s = &mut b.steps[i];
                s.state = State::Finished;
                s.result = Some(Outcome::Skipped);
                s.reason = why;
                self.emit(Event::Step { build: id, step: i as u32 });
                continue;
            }
            return self.lease(st, id, i as u32, &pb);
        }
    }

    fn lease(&self, st: &mut Inner, id: u64, step: u32, pb: &PlanBuilder) -> Result<(), EngineError> {
        let lease = st.next_lease;
        st.next_lease += 1;
        let log = st.next_log;
        st.next_log += 1;
        let file = self.logs.create(log)?;
        let rec = LogRecord { id: log, build: id, step, file, bytes: 0, finished: false };
        self.store.put_log(&rec, Sync::Lazy)?;
        st.logs.insert(log, rec);
        let Some(b) = st.builds.get_mut(&id) else { return Ok(()) };
        let Some(worker) = b.worker.clone() else { return Ok(()) };
        let spec = &pb.steps[step as usize];
        let checkout = (!b.checked_out).then(|| proto::Checkout { url: b.repo_url.clone(), commit: b.commit.clone() });
        b.checked_out = true;
        let s = &mut b.steps[step as usize];
        s.state = State::Running;
        s.started_at = Some(now_ms());
        s.log_id = Some(log);
        let mut env: HashMap<String, String> = spec.env.clone().into_iter().collect();
        env.insert("RBB_BUILD_ID".into(), id.to_string());
        env.insert("RBB_BUILDER".into(), b.builder.clone());
        env.insert("RBB_REPO".into(), b.repo.clone());
        env.insert("RBB_BRANCH".into(), b.branch.clone());
        env.insert("RBB_COMMIT".into(), b.commit.clone());
        env.insert("RBB_STEP".into(), spec.name.clone());
        env.insert("BRANCH".into(), b.branch.clone());
        for (k, v) in &pb.matrix {
            env.insert(format!("RBB_MATRIX_{}", k.to_uppercase().replace('-', "_")), v.clone());
        }
        let msg = proto::Lease {
            lease,
            build: id,
            builder: b.builder.clone(),
            step_name: spec.name.clone(),
            step_index: step,
            checkout_dir: checkout_dir(&b.builder),
            checkout,
            command: spec.run.clone(),
            env,
            workdir: spec.workdir.clone().unwrap_or_default(),
            timeout_secs: spec.timeout_secs,
            image: spec.image.clone().unwrap_or_default(),
        };
        let session = st.workers.get(&worker).and_then(|w| w.session.as_ref().map(|s| s.id)).unwrap_or(0);
        st.leases.insert(lease, LeaseInfo { build: id, step, worker: worker.clone() });
        self.store.put_build(&st.builds[&id], Sync::Lazy)?;
        self.emit(Event::Step { build: id, step });
        if !self.send(st, &worker, MasterMsg::Lease(msg)) {
            self.lose_session(st, &worker, session, "its message queue is full or closed")?;
        }
        Ok(())
    }

    fn send(&self, st: &Inner, worker: &str, msg: MasterMsg) -> bool {
        let Some(s) = st.workers.get(worker).and_then(|w| w.session.as_ref()) else { return false };
        s.tx.try_send(Ok(MasterMessage { msg: Some(msg) })).is_ok()
    }

    fn finish_build(&self, st: &mut Inner, id: u64) -> Result<(), EngineError> {
        st.stalled.remove(&id);
        let Some(b) = st.builds.get_mut(&id) else { return Ok(()) };
        for s in &mut b.steps {
            if s.state != State::Finished {
                s.state = State::Finished;
                s.result = Some(Outcome::Skipped);
                if s.reason.is_empty() {
                    s.reason = "the build ended first".into();
                }
            }
        }
        b.state = State::Finished;
        let result = *b.result.get_or_insert(Outcome::Success);
        b.finished_at = Some(now_ms());
        let (worker, builder) = (b.worker.clone(), b.builder.clone());
        self.store.put_build(b, Sync::Durable)?;
        tracing::info!(build = id, builder = %builder, result = %result, "build finished");
        if let Some(w) = worker.and_then(|w| st.workers.get_mut(&w))
            && w.builds.get(&builder) == Some(&id)
        {
            w.builds.remove(&builder);
        }
        self.emit(Event::Build { id });
        self.trigger_downstream(st, id)?;
        Ok(())
    }

    /// A build of a change succeeded: builders of other repositories that need it start for
    /// the same change (at their own branch head), unless one is already queued for it.
    fn trigger_downstream(&self, st: &mut Inner, id: u64) -> Result<(), EngineError> {
        let Some(b) = st.builds.get(&id).cloned() else { return Ok(()) };
        if b.changes.is_empty()
            || b.event != "push"
            || !b.result.is_some_and(Outcome::is_ok)
            || b.result == Some(Outcome::NotAffected)
        {
            return Ok(());
        }
        let Some(plan) = st.plans.get(&b.plan_hash).cloned() else { return Ok(()) };
        let mut created = Vec::new();
        for x in plan.builders.iter().filter(|x| x.repo != b.repo && x.needs.contains(&b.builder)) {
            let queued =
                st.builds.values().any(|o| o.builder == x.id && o.changes.iter().any(|c| b.changes.contains(c)));
            if queued {
                continue;
            }
            let Some(repo) = self.repos.get(&x.repo).cloned() else { continue };
            let Ok(commit) = resolve(&repo.git_dir, &repo.branch) else { continue };
            let why = format!("{} succeeded for change {}", b.builder, b.changes.last().copied().unwrap_or(0));
            self.create_build(
                st,
                &plan,
                x,
                &repo,
                &repo.branch,
                &commit,
                &why,
                "push",
                &BTreeMap::new(),
                &b.changes,
                &mut created,
            )?;
        }
        if !created.is_empty() {
            self.persist_created(st, &created)?;
        }
        Ok(())
    }

    /// Whether every lock `pb` takes has room (running builds hold their locks).
    fn locks_free(&self, st: &Inner, pb: &PlanBuilder) -> bool {
        if pb.locks.is_empty() {
            return true;
        }
        let mut held: HashMap<&str, (u32, bool)> = HashMap::new();
        for b in st.builds.values().filter(|b| b.state == State::Running) {
            let Some(p) = st.plans.get(&b.plan_hash).and_then(|p| p.builder(&b.builder)) else { continue };
            for l in &p.locks {
                let e = held.entry(l.name.as_str()).or_default();
                e.0 += 1;
                e.1 |= l.mode == rbb_schema::pipeline::LockMode::Exclusive;
            }
        }
        pb.locks.iter().all(|l| {
            let (count, exclusive) = held.get(l.name.as_str()).copied().unwrap_or((0, false));
            let max = self.locks.get(&l.name).copied().unwrap_or(1).max(1);
            match l.mode {
                rbb_schema::pipeline::LockMode::Exclusive => count == 0,
                rbb_schema::pipeline::LockMode::Counting => !exclusive && count < max,
            }
        })
    }

    /// Starts every pending build whose needs are met on a capable, free worker.
    fn dispatch(&self, st: &mut Inner) -> Result<(), EngineError> {
        // Running builds whose lease was refused go first: their worker holds their checkout.
        for id in std::mem::take(&mut st.stalled) {
            let Some(worker) = st.builds.get(&id).filter(|b| b.state == State::Running).and_then(|b| b.worker.clone())
            else {
                continue;
            };
            let busy = st.leases.values().filter(|l| l.worker == worker).count() as u32;
            let max = st.workers.get(&worker).map_or(0, |w| w.max_steps);
            if busy < max {
                self.next_step(st, id)?;
            } else {
                st.stalled.insert(id);
            }
        }
        let mut pending: Vec<(i32, u64)> =
            st.builds.values().filter(|b| b.state == State::Pending).map(|b| (-b.priority, b.id)).collect();
        pending.sort();
        for (_, id) in pending {
            let waits = st.builds[&id].waits_for.clone();
            let mut blocked = false;
            let mut failed = None;
            for w in &waits {
                match st.builds.get(w) {
                    Some(d) if d.state != State::Finished => blocked = true,
                    Some(d) if !d.result.is_some_and(Outcome::is_ok) => {
                        failed = Some(format!(
                            "needed build {} ({}) ended {}",
                            d.id,
                            d.builder,
                            d.result.unwrap_or(Outcome::Exception)
                        ));
                    }
                    _ => {}
                }
            }
            if let Some(why) = failed {
                if let Some(b) = st.builds.get_mut(&id) {
                    b.result = Some(Outcome::Skipped);
                    b.result_reason = why;
                }
                self.finish_build(st, id)?;
                continue;
            }
            if blocked {
                continue;
            }
            let plan = self.plan_of(st, id);
            let b = &st.builds[&id];
            let Some(pb) = plan.as_ref().and_then(|p| p.builder(&b.builder)) else { continue };
            let mut need: BTreeSet<&str> = pb.labels.iter().map(String::as_str).collect();
            if pb.image.is_some() || pb.steps.iter().any(|s| s.image.is_some()) {
                need.insert("docker");
            }
            if let Some(max) = pb.concurrency {
                let running =
                    st.builds.values().filter(|x| x.state == State::Running && x.builder == pb.id).count() as u32;
                if running >= max {
                    continue;
                }
            }
            if !self.locks_free(st, pb) {
                continue;
            }
            let leases_of = |name: &str| st.leases.values().filter(|l| l.worker == name).count() as u32;
            let chosen = st
                .workers
                .values()
                .filter(|w| w.session.is_some())
                .filter(|w| need.iter().all(|l| w.labels.contains(*l)))
                .filter(|w| !w.builds.contains_key(&b.builder))
                .filter(|w| (w.builds.len() as u32) < w.max_steps && leases_of(&w.config.name) < w.max_steps)
                .min_by_key(|w| (w.builds.len(), w.config.name.clone()))
                .map(|w| w.config.name.clone());
            let Some(worker) = chosen else { continue };
            let builder = b.builder.clone();
            if let Some(w) = st.workers.get_mut(&worker) {
                w.builds.insert(builder.clone(), id);
            }
            if let Some(b) = st.builds.get_mut(&id) {
                b.state = State::Running;
                b.worker = Some(worker.clone());
                b.started_at = Some(now_ms());
                // Durable: after a crash, a build that had started must be known as such.
                self.store.put_build(b, Sync::Durable)?;
            }
            tracing::info!(build = id, builder = %builder, worker = %worker, "build started");
            self.emit(Event::Build { id });
            self.next_step(st, id)?;
        }
        Ok(())
    }
}

fn condition_scope(b: &BuildRecord, pb: &PlanBuilder) -> condition::Scope {
    let mut vars = BTreeMap::new();
    vars.insert("branch".into(), b.branch.clone());
    vars.insert("event".into(), b.event.clone());
    vars.insert("repo".into(), b.repo.clone());
    vars.insert("builder".into(), b.builder.clone());
    for (k, v) in &pb.matrix {
        vars.insert(format!("matrix.{k}"), v.clone());
    }
    for (k, v) in &b.properties {
        vars.insert(format!("props.{k}"), v.clone());
    }
    condition::Scope { vars, so_far_ok: b.result.is_none_or(Outcome::is_ok) }
}

/// Directory name of a builder's checkout on a worker.
pub fn checkout_dir(builder: &str) -> String {
    builder
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect()
}

/// Resolves a revision (branch, tag, commit) in a local repository to a commit id.
pub fn resolve(path: &std::path::Path, rev: &str) -> Result<String, String> {
    rbb_compiler::git::resolve_commit(path, rev).map_err(|e| e.to_string())
}

fn to_api(b: &BuildRecord, logs: &HashMap<u64, LogRecord>, files: &LogFiles) -> api::Build {
    api::Build {
        id: b.id,
        builder: b.builder.clone(),
        repo: b.repo.clone(),
        branch: b.branch.clone(),
        commit: b.commit.clone(),
        plan_hash: b.plan_hash.clone(),
        pipeline_blob: b.pipeline_blob.clone(),
        reason: b.reason.clone(),
        state: b.state,
        result: b.result.filter(|_| b.state == State::Finished),
        result_reason: b.result_reason.clone(),
        worker: b.worker.clone(),
        changes: b.changes.clone(),
        waits_for: b.waits_for.clone(),
        submitted_at: b.submitted_at,
        started_at: b.started_at,
        finished_at: b.finished_at,
        steps: b
            .steps
            .iter()
            .map(|s| api::Step {
                number: s.number,
                name: s.name.clone(),
                state: s.state,
                result: s.result,
                reason: s.reason.clone(),
                exit_code: s.exit_code,
                started_at: s.started_at,
                finished_at: s.finished_at,
                log_id: s.log_id,
                log_bytes: s.log_id.map_or(0, |l| files.len(l).or_else(|| logs.get(&l).map(|r| r.bytes)).unwrap_or(0)),
            })
            .collect(),
    }
}

/// Builder-name suffix of the build that reports a pipeline that does not compile.
pub const PIPELINE_BUILDER: &str = "(pipeline)";
const PIPELINE_PATH: &str = rbb_schema::config::PIPELINE_PATH;

/// A commit as a change source reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewCommit {
    pub id: String,
    pub author: String,
    pub email: String,
    pub time: i64,
    pub message: String,
    pub files: Vec<String>,
}

/// A pull request opened or updated.
#[derive(Debug, Clone, PartialEq)]
pub struct PullRequestChange {
    pub number: u64,
    pub target_branch: String,
    pub source_branch: String,
    pub commit: NewCommit,
}

fn glob_set(globs: &[String]) -> Option<globset::GlobSet> {
    let mut b = globset::GlobSetBuilder::new();
    for g in globs {
        b.add(globset::Glob::new(g).ok()?);
    }
    b.build().ok()
}

/// Whether `branch` passes a trigger's branch globs (empty means every branch).
pub fn branch_matches(f: &rbb_schema::plan::PlanBranchFilter, branch: &str) -> bool {
    let inc = f.branches.is_empty() || glob_set(&f.branches).is_some_and(|s| s.is_match(branch));
    let exc = !f.branches_ignore.is_empty() && glob_set(&f.branches_ignore).is_some_and(|s| s.is_match(branch));
    inc && !exc
}

/// Whether the changed files make a builder with `paths:`/`paths_ignore:` run.
pub fn paths_match(t: &rbb_schema::plan::PlanTriggers, files: &BTreeSet<&str>) -> bool {
    if t.paths.is_empty() && t.paths_ignore.is_empty() {
        return true;
    }
    let inc = glob_set(&t.paths);
    let exc = glob_set(&t.paths_ignore);
    files.iter().any(|f| {
        let wanted = t.paths.is_empty() || inc.as_ref().is_some_and(|s| s.is_match(f));
        let ignored = !t.paths_ignore.is_empty() && exc.as_ref().is_some_and(|s| s.is_match(f));
        wanted && !ignored
    })
}

/// Whether a cron schedule fires in minute `m` (Unix minutes, UTC).
fn cron_matches(cron: &rbb_compiler::cron::Cron, m: i64) -> bool {
    let secs = m * 60;
    let days = secs.div_euclid(86_400);
    let in_day = secs.rem_euclid(86_400);
    let (hour, minute) = ((in_day / 3600) as u8, ((in_day % 3600) / 60) as u8);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let weekday = (days + 4).rem_euclid(7) as u8; // 1970-01-01 was a Thursday
    cron.matches(minute, hour, day, month, weekday)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_minutes_map_to_the_calendar() {
        let c = rbb_compiler::cron::Cron::parse("30 3 24 11 *").expect("cron");
        // 2026-11-24T03:30:00Z
        assert!(cron_matches(&c, 1_795_491_000 / 60));
        assert!(!cron_matches(&c, 1_795_491_000 / 60 + 1));
        let tuesday = rbb_compiler::cron::Cron::parse("0 0 * * tue").expect("cron");
        assert!(cron_matches(&tuesday, 1_795_478_400 / 60)); // 2026-11-24 is a Tuesday
    }
}
