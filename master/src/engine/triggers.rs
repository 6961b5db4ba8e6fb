//! What starts and stops builds: changes (pushes, pull requests), forces, rebuilds, stops,
//! queue policy (collapse, cancel superseded) and cron schedules. One change makes at most
//! one build per builder, whatever else needs that builder.

use super::rules;
use super::{Engine, EngineError, Event, PIPELINE_BUILDER, PIPELINE_PATH, Repo, Tx, resolve};
use crate::model::{BuildRecord, ChangeRecord, LogRecord, ScheduleRecord, StepRecord, now_ms};
use crate::planner::PlanError;
use rbb_schema::api::{self, State};
use rbb_schema::plan::{Plan, PlanBuilder};
use rbb_schema::proto::{self, master_message::Msg as MasterMsg};
use rbb_schema::results::Outcome;
use std::collections::{BTreeMap, BTreeSet};

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
    /// The head lives in another repository than the base (or the forge does not say
    /// where): its builds get no secrets.
    pub from_fork: bool,
}

/// What a new build is for.
pub(super) struct NewBuild<'a> {
    pub branch: &'a str,
    pub commit: &'a str,
    pub reason: &'a str,
    pub event: &'a str,
    pub props: &'a BTreeMap<String, String>,
    pub changes: &'a [u64],
    pub rebuild_of: Option<u64>,
}

impl Engine {
    /// Forces `builder` at a branch or revision. Builders it needs get builds at the same
    /// commit too, unless one is already queued, running or succeeded there.
    pub fn force(&self, builder: &str, req: api::ForceRequest) -> Result<api::ForceResponse, EngineError> {
        self.wait_heads();
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
        let commit = resolve(&repo.git_dir, &rev)
            .map_err(|_| EngineError::BadRequest(format!("cannot resolve `{rev}` in repository `{}`", repo.name)))?;
        let reason = req.reason.clone().unwrap_or_else(|| "force".to_owned());
        // The plan comes from the commit being built.
        let plan = match self.planner.plan_at(&repo.name, &commit) {
            Ok(p) => p,
            Err(err) => {
                let id = self.run(|e, tx| e.plan_failure(tx, &repo, &branch, &commit, &err, "force", &[]))?;
                return Ok(api::ForceResponse { build: id, needed: Vec::new() });
            }
        };
        let Some(pb) = plan.builder(builder).cloned() else {
            return Err(EngineError::NotFound(format!("builder `{builder}` does not exist at commit {commit}")));
        };
        if !pb.triggers.force {
            return Err(EngineError::BadRequest(format!("builder `{builder}` cannot be forced (`on.force: false`)")));
        }
        self.run(|e, tx| {
            if tx.closing {
                return Err(EngineError::ShuttingDown);
            }
            tx.remember_plan(&plan);
            let mut created = Vec::new();
            let req = NewBuild {
                branch: &branch,
                commit: &commit,
                reason: &reason,
                event: "force",
                props: &req.properties,
                changes: &[],
                rebuild_of: None,
            };
            let id = e.create_build(tx, &plan, &pb, &repo, &req, &mut created)?;
            e.announce_created(tx, &created);
            e.dispatch(tx)?;
            Ok(api::ForceResponse { build: id, needed: created.into_iter().filter(|i| *i != id).collect() })
        })
    }

    /// Runs a finished build again with exactly the plan it was pinned to.
    pub fn rebuild(&self, id: u64) -> Result<u64, EngineError> {
        self.wait_heads();
        self.run(|e, tx| {
            if tx.closing {
                return Err(EngineError::ShuttingDown);
            }
            let Some(old) = tx.build(id)?.map(std::borrow::Cow::into_owned) else {
                return Err(EngineError::NotFound(format!("no build {id}")));
            };
            if old.state != State::Finished {
                return Err(EngineError::Conflict(format!("build {id} has not finished yet")));
            }
            let Some(plan) = tx.plan(&old.plan_hash) else {
                return Err(EngineError::Conflict(format!("build {id} has no plan to run again")));
            };
            let Some(pb) = plan.builder(&old.builder).cloned() else {
                return Err(EngineError::Conflict(format!("build {id} is not a builder's build")));
            };
            let repo = e
                .repos
                .get(&old.repo)
                .cloned()
                .ok_or_else(|| EngineError::NotFound(format!("repository `{}` is not configured", old.repo)))?;
            let mut created = Vec::new();
            let reason = format!("rebuild of build {id}");
            let req = NewBuild {
                branch: &old.branch,
                commit: &old.commit,
                reason: &reason,
                event: &old.event,
                props: &old.properties,
                changes: &old.changes,
                rebuild_of: Some(id),
            };
            let new = e.create_build(tx, &plan, &pb, &repo, &req, &mut created)?;
            e.announce_created(tx, &created);
            e.dispatch(tx)?;
            Ok(new)
        })
    }

    /// Cancels a build request (a build that has not started).
    pub fn cancel_request(&self, id: u64) -> Result<(), EngineError> {
        match self.build(id).map(|b| b.state) {
            None => Err(EngineError::NotFound(format!("no build request {id}"))),
            Some(State::Pending) => self.stop(id, "request cancelled through the API"),
            Some(_) => Err(EngineError::Conflict(format!("build {id} has already started; stop it instead"))),
        }
    }

    /// Stops a build: a pending one ends CANCELLED at once, a running one once its worker
    /// killed the current step. Either way it ends CANCELLED, and the stop is on disk before
    /// this returns.
    pub fn stop(&self, id: u64, reason: &str) -> Result<(), EngineError> {
        self.run(|e, tx| {
            let Some(b) = tx.build(id)? else {
                return Err(EngineError::NotFound(format!("no build {id}")));
            };
            if b.state == State::Finished {
                return Err(EngineError::Conflict(format!("build {id} already finished")));
            }
            e.stop_in(tx, id, &format!("stopped: {reason}"))?;
            e.dispatch(tx)
        })
    }

    /// Marks a build stopped and cancels its running step, if any.
    fn stop_in(&self, tx: &mut Tx<'_>, id: u64, reason: &str) -> Result<(), EngineError> {
        let Some(b) = tx.build_mut(id) else { return Ok(()) };
        rules::stop(b, reason);
        tx.durable();
        let lease = tx.leases.iter().find(|(_, l)| l.build == id).map(|(k, l)| (*k, l.worker.clone()));
        match lease {
            Some((lease, worker)) => {
                tx.send(&worker, MasterMsg::Cancel(proto::Cancel { lease, reason: reason.to_owned() }));
                tx.emit(Event::Build { id });
                Ok(())
            }
            None => self.finish_build(tx, id),
        }
    }

    /// Commits pushed to `branch` of `repo` (newest first, as the mirror lists them). Records
    /// one change per commit, then schedules the builders whose `on:` wants them. The
    /// changes are on disk when this returns Ok.
    pub fn on_push(
        &self,
        repo: &str,
        branch: &str,
        commits: &[NewCommit],
        source: &str,
    ) -> Result<Vec<u64>, EngineError> {
        let Some(head) = commits.first() else { return Ok(Vec::new()) };
        self.wait_heads();
        let r =
            self.repos.get(repo).cloned().ok_or_else(|| EngineError::NotFound(format!("no repository `{repo}`")))?;
        if branch == r.branch
            && let Err(e) = self.planner.head_moved(repo, &head.id)
        {
            tracing::warn!(repo, error = %e, "cannot read the new head's pipeline");
        }
        let plan = self.planner.plan_at(repo, &head.id);
        let head_plan = (branch == r.branch).then(|| self.planner.head_plan());
        self.run(|e, tx| {
            if let Some(hp) = head_plan {
                tx.set_head_plan(hp);
            }
            let ids = e.record_changes(tx, repo, branch, commits.iter().rev(), "push", source, None);
            let files: BTreeSet<&str> = commits.iter().flat_map(|c| c.files.iter().map(String::as_str)).collect();
            let plan = match plan {
                Ok(p) => p,
                Err(err) => return Ok(vec![e.plan_failure(tx, &r, branch, &head.id, &err, "push", &ids)?]),
            };
            tx.remember_plan(&plan);
            let mut created = Vec::new();
            let mut out = Vec::new();
            for pb in plan.builders.iter().filter(|b| b.repo == repo) {
                let Some(filter) = &pb.triggers.push else { continue };
                if !branch_matches(filter, branch) {
                    continue;
                }
                if let Some(id) = already_made(tx, &created, &pb.id, &head.id) {
                    // Made already in this change, because another builder needs it.
                    out.push(id);
                    continue;
                }
                if !paths_match(&pb.triggers, &files) {
                    out.push(e.not_affected(tx, &plan, pb, &r, branch, &head.id, &ids)?);
                    continue;
                }
                let reason = format!("push to {branch}");
                let req = NewBuild {
                    branch,
                    commit: &head.id,
                    reason: &reason,
                    event: "push",
                    props: &BTreeMap::new(),
                    changes: &ids,
                    rebuild_of: None,
                };
                out.push(e.create_build(tx, &plan, pb, &r, &req, &mut created)?);
            }
            e.announce_created(tx, &created);
            e.dispatch(tx)?;
            Ok(out)
        })
    }

    /// A pull request opened or updated: builders whose `on.pull_request` matches its target
    /// branch build its head.
    pub fn on_pull_request(&self, repo: &str, pr: &PullRequestChange, source: &str) -> Result<Vec<u64>, EngineError> {
        self.wait_heads();
        let r =
            self.repos.get(repo).cloned().ok_or_else(|| EngineError::NotFound(format!("no repository `{repo}`")))?;
        let plan = self.planner.plan_at(repo, &pr.commit.id);
        self.run(|e, tx| {
            let ids = e.record_changes(
                tx,
                repo,
                &pr.source_branch,
                std::iter::once(&pr.commit),
                "pull_request",
                source,
                Some(pr.number),
            );
            let plan = match plan {
                Ok(p) => p,
                Err(err) => {
                    return Ok(vec![e.plan_failure(
                        tx,
                        &r,
                        &pr.source_branch,
                        &pr.commit.id,
                        &err,
                        "pull_request",
                        &ids,
                    )?]);
                }
            };
            tx.remember_plan(&plan);
            let mut props = BTreeMap::new();
            props.insert("pr_number".to_owned(), pr.number.to_string());
            props.insert("target_branch".to_owned(), pr.target_branch.clone());
            props.insert(super::rules::FORK_PROPERTY.to_owned(), pr.from_fork.to_string());
            let mut created = Vec::new();
            let mut out = Vec::new();
            for pb in plan.builders.iter().filter(|b| b.repo == repo) {
                let Some(filter) = &pb.triggers.pull_request else { continue };
                if !branch_matches(filter, &pr.target_branch) {
                    continue;
                }
                if let Some(id) = already_made(tx, &created, &pb.id, &pr.commit.id) {
                    out.push(id);
                    continue;
                }
                let why = format!("pull request #{} into {}", pr.number, pr.target_branch);
                let req = NewBuild {
                    branch: &pr.source_branch,
                    commit: &pr.commit.id,
                    reason: &why,
                    event: "pull_request",
                    props: &props,
                    changes: &ids,
                    rebuild_of: None,
                };
                out.push(e.create_build(tx, &plan, pb, &r, &req, &mut created)?);
            }
            e.announce_created(tx, &created);
            e.dispatch(tx)?;
            Ok(out)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn record_changes<'c>(
        &self,
        tx: &mut Tx<'_>,
        repo: &str,
        branch: &str,
        oldest_first: impl Iterator<Item = &'c NewCommit>,
        event: &str,
        source: &str,
        pull_request: Option<u64>,
    ) -> Vec<u64> {
        let now = now_ms();
        let ids: Vec<u64> = oldest_first
            .map(|c| {
                tx.insert_change(ChangeRecord {
                    id: 0,
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
                    recorded_at: now,
                    pull_request,
                })
            })
            .collect();
        tx.durable();
        tracing::info!(repo, branch, count = ids.len(), source, "changes recorded");
        ids
    }

    /// A finished build that says why the commit has no plan: its pipeline does not compile
    /// (FAILURE, the diagnostics as its log) or it could not be read (EXCEPTION, the cause).
    #[allow(clippy::too_many_arguments)]
    fn plan_failure(
        &self,
        tx: &mut Tx<'_>,
        repo: &Repo,
        branch: &str,
        commit: &str,
        err: &PlanError,
        event: &str,
        changes: &[u64],
    ) -> Result<u64, EngineError> {
        let short = &commit[..commit.len().min(12)];
        let (result, text, reason, step_reason) = match err {
            PlanError::Pipeline(diags) => (
                Outcome::Failure,
                diags.as_str(),
                format!("{PIPELINE_PATH} at {short} does not compile"),
                "the pipeline does not compile".to_owned(),
            ),
            PlanError::Read(cause) => (
                Outcome::Exception,
                cause.as_str(),
                format!("{PIPELINE_PATH} at {short} cannot be read"),
                "the commit's pipeline cannot be read from git".to_owned(),
            ),
        };
        let id = tx.next_build_id();
        let log = tx.next_log_id();
        let file = self.logs.create(log)?;
        self.logs.append(log, crate::logs::Stream::Stdout, text.as_bytes())?;
        let bytes = self.logs.close(log).unwrap_or(0);
        tx.insert_log(LogRecord {
            id: log,
            build: id,
            step: 0,
            file,
            bytes,
            finished: true,
            created_at: Some(now_ms()),
            compressed: false,
            expired: false,
        });
        let now = now_ms();
        tx.insert_build(BuildRecord {
            id,
            builder: format!("{}/{}", repo.name, PIPELINE_BUILDER),
            repo: repo.name.clone(),
            repo_url: repo.path.display().to_string(),
            branch: branch.to_owned(),
            commit: commit.to_owned(),
            plan_hash: String::new(),
            pipeline_blob: None,
            reason,
            event: event.to_owned(),
            properties: BTreeMap::new(),
            priority: 0,
            state: State::Finished,
            result: Some(result),
            result_reason: text.lines().find(|l| !l.trim().is_empty()).unwrap_or(&step_reason).to_owned(),
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
            rebuild_of: None,
            worker_losses: 0,
            steps: vec![StepRecord {
                number: 0,
                name: "compile pipeline".to_owned(),
                state: State::Finished,
                result: Some(result),
                reason: step_reason,
                exit_code: None,
                started_at: Some(now),
                finished_at: Some(now),
                log_id: Some(log),
                log_bytes: Some(bytes),
                image_digest: None,
                cache: None,
            }],
        });
        tx.durable();
        tracing::warn!(build = id, repo = %repo.name, commit, result = %result, "no plan for the commit");
        tx.emit(Event::Build { id });
        Ok(id)
    }

    /// A builder whose `paths:` no changed file matches: recorded as NOT_AFFECTED (it counts
    /// as passing for required checks) without running anything. It replaces nothing: an
    /// earlier change's pending build still runs.
    #[allow(clippy::too_many_arguments)]
    fn not_affected(
        &self,
        tx: &mut Tx<'_>,
        plan: &Plan,
        pb: &PlanBuilder,
        repo: &Repo,
        branch: &str,
        commit: &str,
        changes: &[u64],
    ) -> Result<u64, EngineError> {
        let id = tx.next_build_id();
        let now = now_ms();
        let mut b = new_record(
            id,
            plan,
            pb,
            repo,
            &NewBuild {
                branch,
                commit,
                reason: "no changed file matches `paths`",
                event: "push",
                props: &BTreeMap::new(),
                changes,
                rebuild_of: None,
            },
            Vec::new(),
            now,
        );
        b.result = Some(Outcome::NotAffected);
        b.result_reason = "no changed file matches `paths`".to_owned();
        for s in &mut b.steps {
            s.reason = "not affected by the change".to_owned();
        }
        tx.insert_build(b);
        self.finish_build(tx, id)?;
        Ok(id)
    }

    /// Queues a build of `pb`, and first the builds it needs at the same commit (reusing a
    /// pending, running or successful one). Returns its id; every build made is in `created`.
    pub(super) fn create_build(
        &self,
        tx: &mut Tx<'_>,
        plan: &Plan,
        pb: &PlanBuilder,
        repo: &Repo,
        req: &NewBuild<'_>,
        created: &mut Vec<u64>,
    ) -> Result<u64, EngineError> {
        let mut waits = Vec::new();
        for need in &pb.needs {
            let Some(nb) = plan.builder(need) else { continue };
            let nrepo = self.repos.get(&nb.repo).cloned().unwrap_or_else(|| repo.clone());
            // A builder of the same repository runs at the same commit; another repository's
            // at the head of its pipeline branch.
            let (ncommit, nbranch) = if nrepo.name == repo.name {
                (req.commit.to_owned(), req.branch.to_owned())
            } else {
                let c = resolve(&nrepo.git_dir, &nrepo.branch).map_err(|_| {
                    EngineError::BadRequest(format!("cannot resolve `{}` in repository `{}`", nrepo.branch, nrepo.name))
                })?;
                (c, nrepo.branch.clone())
            };
            // A live build in memory is newer than its stored copy.
            let usable = |b: &BuildRecord| {
                b.builder == nb.id
                    && b.commit == ncommit
                    && (b.state != State::Finished
                        || (b.result.is_some_and(Outcome::is_ok) && b.result != Some(Outcome::NotAffected)))
            };
            let mut existing = already_made(tx, created, &nb.id, &ncommit)
                .or_else(|| tx.builds.values().rev().find(|b| usable(b)).map(|b| b.id));
            if existing.is_none() {
                tx.store.scan_builds(Some(&crate::store::index_key("commit", &ncommit)), true, |b| {
                    let current = tx.builds.get(&b.id).unwrap_or(&b);
                    if usable(current) {
                        existing = Some(b.id);
                    }
                    existing.is_none()
                })?;
            }
            let id = match existing {
                Some(id) => id,
                None => {
                    let why = format!("needed by {}", pb.id);
                    let sub = NewBuild { branch: &nbranch, commit: &ncommit, reason: &why, ..*req };
                    self.create_build(tx, plan, nb, &nrepo, &sub, created)?
                }
            };
            waits.push(id);
        }
        let id = tx.next_build_id();
        let rec = new_record(id, plan, pb, repo, req, waits, now_ms());
        tx.insert_build(rec);
        created.push(id);
        tx.durable();
        tracing::info!(build = id, builder = %pb.id, commit = %req.commit, reason = req.reason, "build queued");
        if pb.collapse || pb.cancel_superseded {
            self.apply_queue_policy(tx, pb, id, created)?;
        }
        Ok(id)
    }

    pub(super) fn announce_created(&self, tx: &mut Tx<'_>, created: &[u64]) {
        for i in created {
            tx.emit(Event::Build { id: *i });
        }
    }

    /// Replaces older builds of the same builder, event and source by the new one, as the
    /// builder's queue policy says: pending ones are collapsed into it (`collapse`), running
    /// ones are stopped (`cancel_superseded`). Builds waiting for a collapsed build are not
    /// moved onto another commit: they end SKIPPED, saying which build replaced it.
    fn apply_queue_policy(
        &self,
        tx: &mut Tx<'_>,
        pb: &PlanBuilder,
        new: u64,
        created: &[u64],
    ) -> Result<(), EngineError> {
        let Some(nb) = tx.builds.get(&new).cloned() else { return Ok(()) };
        if pb.collapse {
            let older: Vec<u64> = tx
                .pending
                .iter()
                .map(|(_, id)| *id)
                .filter(|id| !created.contains(id))
                .filter(|id| tx.builds.get(id).is_some_and(|b| rules::may_replace(b, &nb)))
                .collect();
            for old in older {
                let moved = tx.builds.get(&old).map(|b| b.changes.clone()).unwrap_or_default();
                if let Some(b) = tx.build_mut(old) {
                    b.result = Some(Outcome::Skipped);
                    b.result_reason = format!("collapsed into build {new} (a newer commit)");
                }
                self.finish_build(tx, old)?;
                if let Some(n) = tx.build_mut(new) {
                    let all: BTreeSet<u64> = n.changes.iter().copied().chain(moved).collect();
                    n.changes = all.into_iter().collect();
                }
                tracing::info!(build = old, into = new, "build request collapsed");
            }
        }
        if pb.cancel_superseded {
            let running: Vec<u64> = tx
                .running
                .iter()
                .copied()
                .filter(|id| tx.builds.get(id).is_some_and(|b| rules::may_replace(b, &nb)))
                .collect();
            for id in running {
                self.stop_in(tx, id, &format!("superseded by build {new}"))?;
                tracing::info!(build = id, by = new, "running build superseded");
            }
        }
        Ok(())
    }

    /// Fires the cron schedules due at `now` (Unix seconds). Each schedule fires at most
    /// once per minute it matches, and a minute missed while the master was down fires once
    /// at the next tick (the newest missed minute only, within a day). The schedule's state
    /// and the build it fires are stored in one transaction: a crash never fires a minute
    /// twice, and an error still records that the minute was looked at.
    pub fn cron_tick(&self, now: i64) -> Result<Vec<u64>, EngineError> {
        if !self.heads_read() {
            // Minutes missed until then fire at the first tick after (see above).
            return Ok(Vec::new());
        }
        let plan = self.plan();
        let minute = now.div_euclid(60);
        let mut due = Vec::new();
        {
            let st = self.lock();
            if st.closing {
                return Ok(Vec::new());
            }
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
                    let fire = rbb_compiler::cron::Cron::parse(&sched.cron).ok().and_then(|cron| {
                        let from = (rec.checked_minute + 1).max(minute - 24 * 60);
                        (from..=minute).rev().find(|m| cron_matches(&cron, *m))
                    });
                    due.push((pb.clone(), sched.clone(), key, rec, fire));
                }
            }
        }
        let mut out = Vec::new();
        for (pb, sched, key, mut rec, fire) in due {
            rec.checked_minute = minute;
            let fire = fire.filter(|m| rec.fired_minute.is_none_or(|f| f < *m));
            let Some(m) = fire else {
                self.run(|_, tx| {
                    tx.put_schedule(&key, rec.clone());
                    Ok(())
                })?;
                continue;
            };
            rec.fired_minute = Some(m);
            let Some(repo) = self.repos.get(&pb.repo).cloned() else { continue };
            let commit = match resolve(&repo.git_dir, &sched.branch) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(builder = %pb.id, error = %e, "schedule due, but its branch cannot be resolved");
                    self.run(|_, tx| {
                        tx.put_schedule(&key, rec.clone());
                        Ok(())
                    })?;
                    continue;
                }
            };
            if sched.only_if_changed && rec.last_commit.as_deref() == Some(commit.as_str()) {
                tracing::info!(builder = %pb.id, "schedule due, but {} has not moved; not building", sched.branch);
                self.run(|_, tx| {
                    tx.put_schedule(&key, rec.clone());
                    Ok(())
                })?;
                continue;
            }
            rec.last_commit = Some(commit.clone());
            let plan = self.planner.plan_at(&repo.name, &commit);
            let fired = self.run(|e, tx| {
                tx.put_schedule(&key, rec.clone());
                let plan = match plan {
                    Ok(p) => p,
                    Err(err) => {
                        return e.plan_failure(tx, &repo, &sched.branch, &commit, &err, "schedule", &[]).map(Some);
                    }
                };
                let Some(b) = plan.builder(&pb.id).cloned() else { return Ok(None) };
                tx.remember_plan(&plan);
                let mut created = Vec::new();
                let why = format!("schedule \"{}\"", sched.cron);
                let req = NewBuild {
                    branch: &sched.branch,
                    commit: &commit,
                    reason: &why,
                    event: "schedule",
                    props: &BTreeMap::new(),
                    changes: &[],
                    rebuild_of: None,
                };
                let id = e.create_build(tx, &plan, &b, &repo, &req, &mut created)?;
                e.announce_created(tx, &created);
                e.dispatch(tx)?;
                Ok(Some(id))
            })?;
            out.extend(fired);
        }
        Ok(out)
    }
}

/// A build of `builder` at `commit` made earlier in the same change.
fn already_made(tx: &Tx<'_>, created: &[u64], builder: &str, commit: &str) -> Option<u64> {
    created.iter().copied().find(|id| tx.builds.get(id).is_some_and(|b| b.builder == builder && b.commit == commit))
}

fn new_record(
    id: u64,
    plan: &Plan,
    pb: &PlanBuilder,
    repo: &Repo,
    req: &NewBuild<'_>,
    waits: Vec<u64>,
    now: u64,
) -> BuildRecord {
    let source = plan.repos.iter().find(|r| r.name == pb.repo);
    BuildRecord {
        id,
        builder: pb.id.clone(),
        repo: pb.repo.clone(),
        repo_url: repo.path.display().to_string(),
        branch: req.branch.to_owned(),
        commit: req.commit.to_owned(),
        plan_hash: plan.hash.clone(),
        pipeline_blob: source.and_then(|r| r.pipeline_blob.clone()),
        reason: req.reason.to_owned(),
        event: req.event.to_owned(),
        properties: req.props.clone(),
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
        changes: req.changes.to_vec(),
        submitted_at: now,
        started_at: None,
        finished_at: None,
        rebuild_of: req.rebuild_of,
        worker_losses: 0,
        steps: pb.steps.iter().enumerate().map(|(i, s)| StepRecord::pending(i as u32, &s.name)).collect(),
    }
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
mod cron_tests {
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
