//! The read side: what the REST API shows of the engine's state, converted to the API's
//! own types. Nothing here changes state.

use super::{Engine, Inner};
use crate::logs::LogFiles;
use crate::model::{BuildRecord, ChangeRecord, LogRecord};
use rbb_schema::api::{self, State};
use rbb_schema::plan::Plan;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

impl Engine {
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
            .map(|b| to_api(b, &st, &self.logs))
            .collect()
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
        let st = self.lock();
        st.builds.get(&id).map(|b| to_api(b, &st, &self.logs))
    }

    pub fn log(&self, id: u64) -> Option<(LogRecord, PathBuf, bool)> {
        let st = self.lock();
        let mut rec = st.logs.get(&id)?.clone();
        let live = self.logs.len(id);
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
                    last_seen: w.last_seen_ms,
                }
            })
            .collect()
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
}

fn to_api(b: &BuildRecord, st: &Inner, files: &LogFiles) -> api::Build {
    let logs = &st.logs;
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
        waiting: st.waiting.get(&b.id).cloned().filter(|_| b.state == State::Pending),
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
