//! The read side: what the REST API shows, converted to the API's own types. Live state
//! (pending and running builds, workers, leases) comes from memory; history from the
//! store's indexes, so a page costs what it shows. Nothing here changes state.

use super::{Engine, EngineError};
use crate::model::{BuildHead, BuildRecord, ChangeRecord, LogRecord};
use crate::query::ListQuery;
use crate::store::{BUILD_INDEXES, index_key};
use rbb_schema::api::{self, State};
use rbb_schema::plan::Plan;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

/// Build fields of the API whose `field=value` filter an index answers.
const INDEXED_BUILD_FILTERS: &[&str] = &["builder", "repo", "branch", "commit", "result", "state", "worker"];

impl Engine {
    pub fn plan(&self) -> Arc<Plan> {
        self.lock().plan.clone()
    }

    pub fn builders(&self) -> Vec<api::Builder> {
        let plan = self.plan();
        plan.builders
            .iter()
            .map(|b| {
                let mut last = None;
                let _ = self.store.scan_builds(Some(&index_key("builder", &b.id)), true, |r| {
                    last = Some(api::BuildSummary { id: r.id, state: r.state, result: r.result });
                    false
                });
                api::Builder {
                    id: b.id.clone(),
                    repo: b.repo.clone(),
                    name: b.name.clone(),
                    description: b.description.clone(),
                    labels: b.labels.clone(),
                    tags: b.tags.clone(),
                    needs: b.needs.clone(),
                    steps: b.steps.iter().map(|s| s.name.clone()).collect(),
                    last_build: last,
                }
            })
            .collect()
    }

    /// The newest `limit` builds of `builder`, newest first.
    pub fn builds_of(&self, builder: &str, limit: usize) -> Result<Vec<api::Build>, EngineError> {
        let mut out = Vec::new();
        self.store.scan_builds(Some(&index_key("builder", builder)), true, |b| {
            out.push(b);
            out.len() < limit
        })?;
        Ok(out.iter().map(|b| self.to_api(b)).collect())
    }

    /// A page of builds as the list endpoint asks: an indexed `field=value` filter is a
    /// key-range scan; the total comes from the maintained counts when that filter (or none)
    /// is all there is, else from the scanned range.
    ///
    /// `builder=` a matrix builder's base name (`app/test`, no builder of that exact id)
    /// lists every combination's builds (`app/test[os=linux]`, ...): see
    /// [`Engine::list_builds_of_combinations`].
    pub fn list_builds(&self, q: &ListQuery) -> Result<(Vec<Value>, usize), EngineError> {
        if let Some((_, name)) = q.indexed_eq(&["builder"])
            && let Some(keys) = self.matrix_combinations(name)?
        {
            return self.list_builds_of_combinations(q, name, &keys);
        }
        debug_assert!(INDEXED_BUILD_FILTERS.iter().all(|f| BUILD_INDEXES.contains(f)));
        let index = q.indexed_eq(INDEXED_BUILD_FILTERS).map(|(f, v)| index_key(f, v));
        let known_total = match (&index, q.filter_count()) {
            (None, 0) => Some(self.store.count("builds")? as usize),
            (Some(k), 1) => Some(self.store.count(k)? as usize),
            _ => None,
        };
        match q.id_order() {
            Some(newest_first) => {
                let mut pager = q.pager(known_total);
                // With a known total the index (or no filter) answered every filter: items
                // before the offset are counted without being converted.
                let covered = known_total.is_some();
                let mut skipped = 0;
                self.store.scan_builds(index.as_deref(), newest_first, |b| {
                    if covered && skipped < q.offset() {
                        skipped += 1;
                        return pager.skip_matching();
                    }
                    let v = serde_json::to_value(self.to_api(&b)).unwrap_or(Value::Null);
                    if covered { pager.push_matching(v) } else { pager.push(v) }
                })?;
                Ok(pager.finish())
            }
            None => {
                // Another order: every matching build of the range, sorted.
                let mut all = Vec::new();
                self.store.scan_builds(index.as_deref(), true, |b| {
                    let v = serde_json::to_value(self.to_api(&b)).unwrap_or(Value::Null);
                    if q.matches(&v) {
                        all.push(v);
                    }
                    true
                })?;
                Ok(q.apply(all))
            }
        }
    }

    /// The builder index keys (with their counts) of the combinations of the matrix builder
    /// `name`, when `name` is no builder id itself (in the plan or in the history) but the
    /// base of some: every `name[...]` that has builds, current combinations and older ones.
    fn matrix_combinations(&self, name: &str) -> Result<Option<Vec<(String, u64)>>, EngineError> {
        if self.plan().builder(name).is_some() || self.store.count(&index_key("builder", name))? > 0 {
            return Ok(None);
        }
        let keys = self.store.index_keys_under("builder", &format!("{name}["))?;
        Ok(Some(keys).filter(|k| !k.is_empty()))
    }

    /// A page of the builds of every combination of a matrix builder: one index range scan
    /// per combination, merged in id order. The builder filter is answered by the indexes;
    /// with no other filter the total is the sum of the combinations' kept counts and the
    /// scan stops when the page is full.
    fn list_builds_of_combinations(
        &self,
        q: &ListQuery,
        name: &str,
        keys: &[(String, u64)],
    ) -> Result<(Vec<Value>, usize), EngineError> {
        let rest = q.without_eq("builder", name);
        let keys_only: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
        let known_total = (rest.filter_count() == 0).then(|| keys.iter().map(|(_, n)| *n as usize).sum::<usize>());
        match rest.id_order() {
            Some(newest_first) => {
                let mut pager = rest.pager(known_total);
                let covered = known_total.is_some();
                let mut skipped = 0;
                self.store.scan_builds_any(&keys_only, newest_first, |b| {
                    if covered && skipped < rest.offset() {
                        skipped += 1;
                        return pager.skip_matching();
                    }
                    let v = serde_json::to_value(self.to_api(&b)).unwrap_or(Value::Null);
                    if covered { pager.push_matching(v) } else { pager.push(v) }
                })?;
                Ok(pager.finish())
            }
            None => {
                let mut all = Vec::new();
                self.store.scan_builds_any(&keys_only, true, |b| {
                    let v = serde_json::to_value(self.to_api(&b)).unwrap_or(Value::Null);
                    if rest.matches(&v) {
                        all.push(v);
                    }
                    true
                })?;
                Ok(rest.apply(all))
            }
        }
    }

    /// Builds waiting to start, oldest first, each with why it waits.
    pub fn build_requests(&self) -> Vec<api::BuildRequest> {
        let st = self.lock();
        let mut ids: Vec<u64> = st.pending.iter().map(|(_, id)| *id).collect();
        ids.sort_unstable();
        ids.iter()
            .filter_map(|id| st.builds.get(id))
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
                waiting: st.waiting.get(&b.id).cloned(),
                changes: b.changes.clone(),
            })
            .collect()
    }

    pub fn build(&self, id: u64) -> Option<api::Build> {
        let live = self.lock().builds.get(&id).cloned();
        let rec = match live {
            Some(b) => b,
            None => self.store.build(id).ok().flatten()?,
        };
        Some(self.to_api(&rec))
    }

    pub fn log(&self, id: u64) -> Option<(LogRecord, PathBuf, bool)> {
        let live = self.lock().logs.get(&id).cloned();
        let mut rec = match live {
            Some(l) => l,
            None => self.store.log(id).ok().flatten()?,
        };
        let open = self.logs.len(id);
        if let Some(len) = open {
            rec.bytes = len;
        }
        // A compressed log is read through a decompressed copy; an expired one has no file.
        let path = if rec.compressed && !rec.expired {
            match self.logs.readable(&rec.file) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(log = id, error = %e, "cannot decompress a log");
                    self.logs.path(&rec.file)
                }
            }
        } else {
            self.logs.path(&rec.file)
        };
        Some((rec, path, open.is_some()))
    }

    /// Log `id`'s size and its stream runs overlapping bytes `[from, to)` (see
    /// [`crate::logs::LogFiles::runs`]), read from its sidecar alone: a compressed log is not
    /// decompressed for it. `None`: no such log.
    pub fn log_runs(
        &self,
        id: u64,
        from: u64,
        to: u64,
    ) -> Result<Option<(LogRecord, Vec<crate::logs::Run>)>, EngineError> {
        let live = self.lock().logs.get(&id).cloned();
        let mut rec = match live {
            Some(l) => l,
            None => match self.store.log(id)? {
                Some(l) => l,
                None => return Ok(None),
            },
        };
        if let Some(len) = self.logs.len(id) {
            rec.bytes = len;
        }
        let runs = self.logs.runs(&rec.file, from, to)?;
        Ok(Some((rec, runs)))
    }

    pub fn workers(&self) -> Vec<api::Worker> {
        let st = self.lock();
        st.workers
            .values()
            .map(|w| {
                let mut current: Vec<api::CurrentStep> = st
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
                current.sort_by_key(|c| c.build);
                api::Worker {
                    name: w.config.name.clone(),
                    connected: w.session.is_some(),
                    labels: w.labels.iter().cloned().collect(),
                    max_steps: w.max_steps,
                    running: current.len() as u32,
                    current,
                    platform: w.platform.clone(),
                    image_platform: w.image_platform.clone(),
                    allowed_mounts: w.allowed_mounts.clone(),
                    last_seen: w.last_seen_ms,
                }
            })
            .collect()
    }

    /// The grid: builders × the `limit` newest commits (of changes and builds), with the
    /// newest build of each builder at each commit. Reads the newest changes and builds
    /// until it has `limit` commits, then each commit's builds through the commit index.
    pub fn grid(&self, limit: usize) -> Result<Value, EngineError> {
        use serde_json::json;
        let plan = self.plan();
        // (when seen, repo, commit, branch), newest first, from both changes and builds.
        let mut seen_at: Vec<(u64, String, String, String)> = Vec::new();
        let mut from_changes: BTreeSet<(String, String)> = BTreeSet::new();
        let mut change_of: HashMap<(String, String), ChangeRecord> = HashMap::new();
        self.store.scan_changes(None, true, |c| {
            let key = (c.repo.clone(), c.commit.clone());
            if from_changes.insert(key.clone()) {
                seen_at.push((c.recorded_at, c.repo.clone(), c.commit.clone(), c.branch.clone()));
                change_of.insert(key, c);
            }
            from_changes.len() < limit
        })?;
        let mut from_builds: BTreeSet<(String, String)> = BTreeSet::new();
        // Builds newer than the oldest column the changes gave can still be newer columns.
        let cutoff = if from_changes.len() >= limit { seen_at.iter().map(|c| c.0).min().unwrap_or(0) } else { 0 };
        self.store.scan_build_heads(None, true, |b| {
            if b.submitted_at < cutoff {
                return false;
            }
            let key = (b.repo.clone(), b.commit.clone());
            if from_builds.insert(key) {
                seen_at.push((b.submitted_at, b.repo.clone(), b.commit.clone(), b.branch.clone()));
            }
            from_builds.len() < limit
        })?;
        seen_at.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
        let mut columns = Vec::new();
        for (_, repo, commit, branch) in &seen_at {
            if columns.len() >= limit {
                break;
            }
            if seen.insert((repo.clone(), commit.clone())) {
                let mut col = json!({ "repo": repo, "commit": commit, "branch": branch });
                if let Some(c) = change_of.get(&(repo.clone(), commit.clone())) {
                    col["message"] = json!(c.message.lines().next().unwrap_or(""));
                    col["author"] = json!(c.author);
                    col["time"] = json!(c.time);
                }
                columns.push(col);
            }
        }
        let mut cells: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        let mut extra: BTreeSet<String> = BTreeSet::new();
        let live: HashMap<u64, BuildHead> =
            self.lock().builds.iter().map(|(id, b)| (*id, BuildHead::from(b))).collect();
        for (repo, commit) in &seen {
            self.store.scan_build_heads(Some(&index_key("commit", commit)), true, |b| {
                if &b.repo != repo {
                    return true;
                }
                let b = live.get(&b.id).cloned().unwrap_or(b);
                let row = cells.entry(b.builder.clone()).or_default();
                row.entry(b.commit.clone()).or_insert_with(|| {
                    json!({ "build": b.id, "state": b.state, "result": b.result.filter(|_| b.state == State::Finished) })
                });
                if plan.builder(&b.builder).is_none() {
                    extra.insert(b.builder.clone());
                }
                true
            })?;
        }
        let mut builders: Vec<Value> = plan
            .builders
            .iter()
            .map(
                |b| json!({ "id": b.id, "repo": b.repo, "name": b.name, "tags": b.tags, "description": b.description }),
            )
            .collect();
        for id in extra {
            let (repo, name) = id.split_once('/').unwrap_or(("", id.as_str()));
            builders.push(json!({ "id": id, "repo": repo, "name": name, "tags": [] }));
        }
        Ok(json!({ "builders": builders, "columns": columns, "cells": cells }))
    }

    /// A page of the change log, newest first unless ordered otherwise.
    pub fn list_changes(&self, q: &ListQuery) -> Result<(Vec<Value>, usize), EngineError> {
        let known_total = (q.filter_count() == 0).then(|| self.store.count("changes")).transpose()?.map(|n| n as usize);
        match q.id_order() {
            Some(newest_first) => {
                let mut pager = q.pager(known_total);
                self.store.scan_changes(None, newest_first, |c| {
                    pager.push(serde_json::to_value(self.change_to_api(&c)).unwrap_or(Value::Null))
                })?;
                Ok(pager.finish())
            }
            None => {
                let mut all = Vec::new();
                self.store.scan_changes(None, true, |c| {
                    let v = serde_json::to_value(self.change_to_api(&c)).unwrap_or(Value::Null);
                    if q.matches(&v) {
                        all.push(v);
                    }
                    true
                })?;
                Ok(q.apply(all))
            }
        }
    }

    fn change_to_api(&self, c: &ChangeRecord) -> api::Change {
        let mut builds = Vec::new();
        let _ = self.store.scan_builds(Some(&index_key("change", &c.id.to_string())), false, |b| {
            builds.push(b.id);
            true
        });
        api::Change {
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
            builds,
        }
    }

    fn to_api(&self, b: &BuildRecord) -> api::Build {
        let waiting = if b.state == State::Pending { self.lock().waiting.get(&b.id).cloned() } else { None };
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
            waiting,
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
                    log_bytes: s.log_id.map_or(0, |l| {
                        self.logs
                            .len(l)
                            .or(s.log_bytes)
                            .or_else(|| self.store.log(l).ok().flatten().map(|r| r.bytes))
                            .unwrap_or(0)
                    }),
                    image_digest: s.image_digest.clone(),
                    cache: s.cache.as_ref().map(|c| c.to_api()),
                })
                .collect(),
        }
    }
}

/// What a finished build's notification needs from the store.
pub struct FinishedBuild {
    pub build: BuildRecord,
    /// The result of the builder's previous finished build on the same branch.
    pub previous: Option<rbb_schema::results::Outcome>,
    /// (name, e-mail) of the authors of the build's changes.
    pub authors: Vec<(String, String)>,
}

impl Engine {
    /// Build `id` if it has finished, with its builder's previous result on its branch and
    /// the authors of its changes.
    pub fn finished_build(&self, id: u64) -> Result<Option<FinishedBuild>, EngineError> {
        let Some(build) = self.store.build(id)?.filter(|b| b.state == State::Finished) else { return Ok(None) };
        let mut previous = None;
        self.store.scan_builds(Some(&index_key("builder", &build.builder)), true, |b| {
            if b.id < id && b.branch == build.branch && b.state == State::Finished {
                previous = b.result;
                return false;
            }
            true
        })?;
        let mut authors = Vec::new();
        for c in &build.changes {
            if let Some(c) = self.store.change(*c)? {
                let a = (c.author.clone(), c.email.clone());
                if !authors.contains(&a) {
                    authors.push(a);
                }
            }
        }
        Ok(Some(FinishedBuild { build, previous, authors }))
    }
}
