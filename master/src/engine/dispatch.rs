//! The queue: which pending build starts on which worker, and, for each build that cannot
//! start yet, why (its needs, a lock, the concurrency limit, no capable or free worker).
//! Pending builds are kept in priority order and running ones in their own set, so a
//! dispatch costs what is in flight, not the history.

use super::rules::{self, Needs};
use super::{Engine, EngineError, Event, Tx};
use crate::model::now_ms;
use rbb_schema::api::State;
use rbb_schema::pipeline::LockMode;
use rbb_schema::plan::PlanBuilder;
use rbb_schema::results::Outcome;
use std::collections::{BTreeSet, HashMap};

impl Engine {
    /// Starts every pending build whose needs are met on a capable, free worker, and
    /// records why the others wait.
    pub(super) fn dispatch(&self, tx: &mut Tx<'_>) -> Result<(), EngineError> {
        if tx.closing {
            return Ok(());
        }
        // Running builds whose lease was refused go first: their worker holds their checkout.
        let stalled: Vec<u64> = tx.stalled.iter().copied().collect();
        for id in stalled {
            let Some(worker) = tx.builds.get(&id).filter(|b| b.state == State::Running).and_then(|b| b.worker.clone())
            else {
                tx.stalled_mut().remove(&id);
                continue;
            };
            let max = tx.workers.get(&worker).filter(|w| w.session.is_some()).map_or(0, |w| w.max_steps);
            if self.leases_of(tx, &worker) < max {
                tx.stalled_mut().remove(&id);
                self.next_step(tx, id)?;
            }
        }
        let pending: Vec<u64> = tx.pending.iter().map(|(_, id)| *id).collect();
        for id in pending {
            let Some(b) = tx.builds.get(&id).filter(|b| b.state == State::Pending) else { continue };
            // Needed builds may have finished and left memory: read them where they are.
            let mut deps = Vec::new();
            for w in &b.waits_for {
                if let Some(d) = tx.build(*w)? {
                    deps.push(d.into_owned());
                }
            }
            let b = &tx.builds[&id];
            match rules::needs(b, |i| deps.iter().find(|d| d.id == i)) {
                Needs::Failed(why) => {
                    if let Some(b) = tx.build_mut(id) {
                        b.result = Some(Outcome::Skipped);
                        b.result_reason = why;
                    }
                    self.finish_build(tx, id)?;
                    continue;
                }
                Needs::Waiting(on) => {
                    let names: Vec<String> = on
                        .iter()
                        .filter_map(|i| deps.iter().find(|d| d.id == *i))
                        .map(|d| format!("build {} ({}, {})", d.id, d.builder, state_word(d.state)))
                        .collect();
                    let why = format!("waiting for {}", names.join(", "));
                    tx.st.waiting.insert(id, why);
                    continue;
                }
                Needs::Ready => {}
            }
            let plan = self.plan_of(tx, id);
            let b = &tx.builds[&id];
            let Some(pb) = plan.as_ref().and_then(|p| p.builder(&b.builder)) else {
                let why = format!("builder {} is not in plan {}", b.builder, b.plan_hash);
                if let Some(b) = tx.build_mut(id) {
                    b.result = Some(Outcome::Exception);
                    b.result_reason = why;
                }
                self.finish_build(tx, id)?;
                continue;
            };
            if let Some(why) = self.held_back(tx, pb) {
                tx.st.waiting.insert(id, why);
                continue;
            }
            let worker = match self.choose_worker(tx, pb, &b.builder) {
                Ok(w) => w,
                Err(why) => {
                    tx.st.waiting.insert(id, why);
                    continue;
                }
            };
            let builder = b.builder.clone();
            if let Some(builds) = tx.worker_builds_mut(&worker) {
                builds.insert(builder.clone(), id);
            }
            if let Some(b) = tx.build_mut(id) {
                b.worker = Some(worker.clone());
                b.started_at = Some(now_ms());
            }
            tx.set_state(id, State::Running);
            // Durable: after a crash, a build that had started must be known as such.
            tx.durable();
            tracing::info!(build = id, builder = %builder, worker = %worker, "build started");
            tx.emit(Event::Build { id });
            self.next_step(tx, id)?;
        }
        Ok(())
    }

    fn leases_of(&self, tx: &Tx<'_>, worker: &str) -> u32 {
        tx.leases.values().filter(|l| l.worker == worker).count() as u32
    }

    /// Why the builder's concurrency limit or locks hold a ready build back, if they do.
    fn held_back(&self, tx: &Tx<'_>, pb: &PlanBuilder) -> Option<String> {
        if pb.concurrency.is_none() && pb.locks.is_empty() {
            return None;
        }
        let running: Vec<(u64, &str, &str)> = tx
            .running
            .iter()
            .filter_map(|id| tx.builds.get(id))
            .map(|b| (b.id, b.builder.as_str(), b.plan_hash.as_str()))
            .collect();
        if let Some(max) = pb.concurrency {
            let same: Vec<String> =
                running.iter().filter(|(_, builder, _)| *builder == pb.id).map(|(id, _, _)| id.to_string()).collect();
            if same.len() as u32 >= max {
                return Some(format!(
                    "concurrency limit: {max} build(s) of {} may run at once (running: build {})",
                    pb.id,
                    same.join(", ")
                ));
            }
        }
        // Running builds hold their locks: (count, exclusive, holders) per lock.
        let mut held: HashMap<&str, (u32, bool, Vec<u64>)> = HashMap::new();
        for (id, builder, hash) in &running {
            let Some(p) = tx.plans.get(*hash).and_then(|p| p.builder(builder)) else { continue };
            for l in &p.locks {
                let e = held.entry(l.name.as_str()).or_default();
                e.0 += 1;
                e.1 |= l.mode == LockMode::Exclusive;
                e.2.push(*id);
            }
        }
        for l in &pb.locks {
            let Some((count, exclusive, holders)) = held.get(l.name.as_str()) else { continue };
            let max = self.locks.get(&l.name).copied().unwrap_or(1).max(1);
            let free = match l.mode {
                LockMode::Exclusive => *count == 0,
                LockMode::Counting => !exclusive && *count < max,
            };
            if !free {
                let by: Vec<String> = holders.iter().map(|h| format!("build {h}")).collect();
                return Some(format!("lock `{}` is held by {}", l.name, by.join(", ")));
            }
        }
        None
    }

    /// The connected worker to run a build of `pb` on, or why there is none now.
    fn choose_worker(&self, tx: &Tx<'_>, pb: &PlanBuilder, builder: &str) -> Result<String, String> {
        let mut need: BTreeSet<&str> = pb.labels.iter().map(String::as_str).collect();
        if pb.image.is_some() || pb.steps.iter().any(|s| s.image.is_some()) {
            need.insert("docker");
        }
        let labelled: Vec<&super::WorkerState> = tx
            .workers
            .values()
            .filter(|w| w.session.is_some())
            .filter(|w| need.iter().all(|l| w.labels.contains(*l)))
            .collect();
        let capable = containers_fit(pb, &labelled)?;
        if capable.is_empty() {
            let wanted: Vec<&str> = need.iter().copied().collect();
            return Err(if wanted.is_empty() {
                "no worker is connected".to_owned()
            } else if wanted.contains(&"docker") && pb.labels.iter().all(|l| l != "docker") {
                format!("no connected worker can run containers (needs labels: {})", wanted.join(", "))
            } else {
                format!("no connected worker has the labels {}", wanted.join(", "))
            });
        }
        let mut leases: HashMap<&str, u32> = HashMap::new();
        for l in tx.leases.values() {
            *leases.entry(l.worker.as_str()).or_default() += 1;
        }
        let free: Vec<&&super::WorkerState> = capable
            .iter()
            .filter(|w| !w.builds.contains_key(builder))
            .filter(|w| {
                (w.builds.len() as u32) < w.max_steps
                    && leases.get(w.config.name.as_str()).copied().unwrap_or(0) < w.max_steps
            })
            .collect();
        match free.iter().min_by_key(|w| (w.builds.len(), w.config.name.clone())) {
            Some(w) => Ok(w.config.name.clone()),
            None => {
                let mut busy: Vec<String> = capable
                    .iter()
                    .take(5)
                    .map(|w| {
                        if w.builds.contains_key(builder) {
                            format!("{} runs another build of {builder}", w.config.name)
                        } else {
                            format!("{} has {}/{} slots busy", w.config.name, w.builds.len(), w.max_steps)
                        }
                    })
                    .collect();
                if capable.len() > busy.len() {
                    busy.push(format!("and {} more", capable.len() - busy.len()));
                }
                Err(format!("every capable worker is busy ({})", busy.join("; ")))
            }
        }
    }
}

/// The workers (of those with the labels) whose engine runs the platform of every image of
/// `pb` and allows every host path its steps mount; or why none does, when some had the labels.
fn containers_fit<'w>(
    pb: &PlanBuilder,
    workers: &[&'w super::WorkerState],
) -> Result<Vec<&'w super::WorkerState>, String> {
    let containers = pb.steps.iter().filter(|s| s.image.is_some());
    let platforms: BTreeSet<&str> = containers.clone().filter_map(|s| s.platform.as_deref()).collect();
    let mounts: BTreeSet<&str> = containers.flat_map(|s| s.mounts.iter().map(|m| m.source.as_str())).collect();
    if workers.is_empty() || (platforms.is_empty() && mounts.is_empty()) {
        return Ok(workers.to_vec());
    }
    let on_platform: Vec<&super::WorkerState> =
        workers.iter().copied().filter(|w| platforms.iter().all(|p| w.image_platform.as_deref() == Some(*p))).collect();
    if on_platform.is_empty() {
        let wanted: Vec<&str> = platforms.into_iter().collect();
        return Err(format!("no connected worker runs {} images", wanted.join(" and ")));
    }
    let mut fit = Vec::new();
    let mut refused: Option<&str> = None;
    for w in on_platform {
        match mounts.iter().find(|m| !mount_allowed(m, &w.allowed_mounts)) {
            None => fit.push(w),
            Some(m) => refused = refused.or(Some(m)),
        }
    }
    match (fit.is_empty(), refused) {
        (true, Some(m)) => Err(format!(
            "no connected worker allows mounting {m} (a worker allows it with `rbb-worker --allow-mount PATH`)"
        )),
        _ => Ok(fit),
    }
}

/// Whether host path `source` lies under one of `allowed` (whole path components; the worker
/// checks again after resolving symlinks).
pub(crate) fn mount_allowed(source: &str, allowed: &[String]) -> bool {
    let path = std::path::Path::new(source);
    path.is_absolute()
        && !path.components().any(|c| matches!(c, std::path::Component::ParentDir | std::path::Component::CurDir))
        && allowed.iter().any(|a| path.starts_with(a))
}

fn state_word(s: State) -> &'static str {
    match s {
        State::Pending => "pending",
        State::Running => "running",
        State::Finished => "finished",
    }
}
