//! Step semantics: leasing a running build's next step, recording a step's result,
//! finishing a build, and losing a build whose worker went away. The decisions are the
//! pure rules of [`super::rules`]; this module applies them through a transaction.

use super::rules::{self, StepFlags, StepReport};
use super::{Engine, EngineError, Event, LeaseInfo, MAX_WORKER_LOSSES, Tx, checkout_dir, resolve};
use crate::model::{BuildRecord, LogRecord, StepCacheRecord, now_ms};
use crate::secrets::StepSecrets;
use rbb_compiler::condition;
use rbb_schema::api::State;
use rbb_schema::plan::{Plan, PlanBuilder};
use rbb_schema::proto::{self, master_message::Msg as MasterMsg};
use rbb_schema::results::Outcome;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

impl Engine {
    pub(super) fn plan_of(&self, tx: &mut Tx<'_>, build: u64) -> Option<Arc<Plan>> {
        let hash = tx.builds.get(&build)?.plan_hash.clone();
        tx.plan(&hash)
    }

    /// Leases the build's next runnable step, skipping what must be skipped; finishes the
    /// build when nothing is left.
    pub(super) fn next_step(&self, tx: &mut Tx<'_>, id: u64) -> Result<(), EngineError> {
        let plan = self.plan_of(tx, id);
        let Some(b) = tx.builds.get(&id) else { return Ok(()) };
        let Some(pb) = plan.as_ref().and_then(|p| p.builder(&b.builder)).cloned() else {
            if let Some(b) = tx.build_mut(id) {
                b.result = Some(Outcome::Exception);
                b.result_reason = format!("builder {} is not in plan {}", b.builder, b.plan_hash);
            }
            return self.finish_build(tx, id);
        };
        loop {
            let Some(b) = tx.builds.get(&id) else { return Ok(()) };
            let Some(i) = b.steps.iter().position(|s| s.state == State::Pending) else {
                return self.finish_build(tx, id);
            };
            let Some(spec) = pb.steps.get(i) else { return self.finish_build(tx, id) };
            let cond = spec.condition.as_deref().map(|c| {
                (c, condition::parse(c).map(|expr| expr.eval(&condition_scope(b, &pb))).map_err(|e| e.message))
            });
            let skip = rules::skip_reason(b, spec.always_run, cond).or_else(|| {
                (!spec.secrets.is_empty() && rules::from_fork(b))
                    .then(|| "secrets are not given to pull requests from forks".to_owned())
            });
            if let Some(why) = skip {
                let now = now_ms();
                if let Some(s) = tx.build_mut(id).and_then(|b| b.steps.get_mut(i)) {
                    rules::skip_step(s, why, now);
                }
                tx.emit(Event::Step { build: id, step: i as u32 });
                continue;
            }
            let secrets = if spec.secrets.is_empty() {
                StepSecrets::default()
            } else {
                match self.secrets().for_step(&b.repo, spec) {
                    Ok(s) => s,
                    Err(why) => {
                        // The plan names a secret this config no longer gives it (a rebuild of
                        // an older plan): the step cannot run as written.
                        let flags = StepFlags {
                            flunk_on_failure: spec.flunk_on_failure,
                            warn_on_failure: spec.warn_on_failure,
                            halt_on_failure: spec.halt_on_failure,
                        };
                        let report = StepReport { result: Outcome::Exception, exit_code: None, reason: why };
                        let now = now_ms();
                        if let Some(b) = tx.build_mut(id) {
                            rules::finish_step(b, i as u32, &report, flags, now);
                        }
                        tx.emit(Event::Step { build: id, step: i as u32 });
                        continue;
                    }
                }
            };
            return self.lease(tx, id, i as u32, &pb, secrets);
        }
    }

    fn lease(
        &self,
        tx: &mut Tx<'_>,
        id: u64,
        step: u32,
        pb: &PlanBuilder,
        secrets: StepSecrets,
    ) -> Result<(), EngineError> {
        let Some(worker) = tx.builds.get(&id).and_then(|b| b.worker.clone()) else { return Ok(()) };
        let lease = tx.next_lease_id();
        let log = tx.next_log_id();
        let file = self.logs.create(log)?;
        tx.insert_log(LogRecord {
            id: log,
            build: id,
            step,
            file,
            bytes: 0,
            finished: false,
            created_at: Some(now_ms()),
            compressed: false,
            expired: false,
        });
        let spec = &pb.steps[step as usize];
        let now = now_ms();
        let Some(b) = tx.build_mut(id) else { return Ok(()) };
        let cache = match rules::cache_eligible(b, spec, step) {
            Ok(()) => {
                b.steps[step as usize].cache = None;
                Some(proto::StepCache { outputs: spec.outputs.clone() })
            }
            Err(why) => {
                b.steps[step as usize].cache = Some(StepCacheRecord::disabled(why));
                None
            }
        };
        let checkout = (!b.checked_out).then(|| {
            let (url, from_master) = self.checkout_url(&b.repo, &b.repo_url);
            proto::Checkout { url, commit: b.commit.clone(), from_master }
        });
        b.checked_out = true;
        let s = &mut b.steps[step as usize];
        s.state = State::Running;
        s.started_at = Some(now);
        s.log_id = Some(log);
        // A variable that takes a secret travels only in `secret_env`, filled in.
        let mut env: HashMap<String, String> = spec
            .env
            .iter()
            .filter(|(k, _)| !spec.secrets.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
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
            build_container: in_build_container(pb, spec),
            last_in_container: in_build_container(pb, spec)
                && !pb.steps[step as usize + 1..].iter().any(|later| in_build_container(pb, later)),
            memory_bytes: spec.memory_bytes.unwrap_or(0),
            cpus_milli: spec.cpus_milli.unwrap_or(0),
            network: spec.network.clone().unwrap_or_default(),
            user: spec.user.clone().unwrap_or_default(),
            pass_env: spec.pass_env.clone(),
            cache,
            services: if spec.image.is_some() { pb.services.iter().map(lease_service).collect() } else { Vec::new() },
            mounts: spec
                .mounts
                .iter()
                .map(|m| proto::Mount { source: m.source.clone(), target: m.target.clone() })
                .collect(),
            platform: spec.platform.clone().unwrap_or_default(),
            secret_env: secrets.env,
            mask: secrets.mask,
        };
        let carries_checkout = msg.checkout.is_some();
        tx.leases_mut().insert(
            lease,
            LeaseInfo { build: id, step, worker: worker.clone(), checkout: carries_checkout, cache: None },
        );
        tx.emit(Event::Step { build: id, step });
        tx.send(&worker, MasterMsg::Lease(msg));
        Ok(())
    }

    /// A worker reported a step's result.
    pub(super) fn step_finished(&self, tx: &mut Tx<'_>, f: proto::StepFinished) -> Result<(), EngineError> {
        let Some(lease) = tx.leases.get(&f.lease).cloned() else {
            tracing::debug!(lease = f.lease, "result for an unknown lease (ignored)");
            return Ok(());
        };
        tx.leases_mut().remove(&f.lease);
        let result = match proto::StepResult::try_from(f.result) {
            Ok(proto::StepResult::Success) => Outcome::Success,
            Ok(proto::StepResult::Warnings) => Outcome::Warnings,
            Ok(proto::StepResult::Failure) => Outcome::Failure,
            Ok(proto::StepResult::Skipped) => Outcome::Skipped,
            Ok(proto::StepResult::Cancelled) => Outcome::Cancelled,
            Ok(proto::StepResult::Retry) | Ok(proto::StepResult::Exception) | Err(_) => Outcome::Exception,
        };
        let plan = self.plan_of(tx, lease.build);
        let Some(b) = tx.builds.get(&lease.build) else { return Ok(()) };
        let flags = plan
            .as_ref()
            .and_then(|p| p.builder(&b.builder))
            .and_then(|pb| pb.steps.get(lease.step as usize))
            .map_or(StepFlags::default(), |s| StepFlags {
                flunk_on_failure: s.flunk_on_failure,
                warn_on_failure: s.warn_on_failure,
                halt_on_failure: s.halt_on_failure,
            });
        let declared_outputs = plan
            .as_ref()
            .and_then(|p| p.builder(&b.builder))
            .and_then(|pb| pb.steps.get(lease.step as usize))
            .is_some_and(|s| !s.outputs.is_empty());
        let cached = self.cache_finished(tx, &lease, &f, result, declared_outputs);
        let reason = if cached == Outcome::Exception && result != Outcome::Exception {
            "the worker restored a cache entry the master did not offer".to_owned()
        } else {
            f.reason.clone()
        };
        let result = cached;
        let report = StepReport { result, exit_code: f.exit_code, reason };
        let now = now_ms();
        let digest = Some(f.image_digest.clone()).filter(|d| !d.is_empty());
        let log_id = tx.build_mut(lease.build).and_then(|b| {
            rules::finish_step(b, lease.step, &report, flags, now);
            if let Some(s) = b.steps.get_mut(lease.step as usize) {
                s.image_digest = digest;
            }
            b.steps.get(lease.step as usize).and_then(|s| s.log_id)
        });
        tracing::info!(build = lease.build, step = lease.step, result = %result, reason = %f.reason, "step finished");
        if let Some(log) = log_id {
            self.close_log(tx, log)?;
        }
        tx.emit(Event::Step { build: lease.build, step: lease.step });
        self.next_step(tx, lease.build)?;
        self.dispatch(tx)
    }

    /// The worker could not take a lease. Not a result: the step goes back to pending and
    /// is leased again when the worker has a free slot.
    pub(super) fn lease_refused(
        &self,
        tx: &mut Tx<'_>,
        worker: &str,
        r: proto::LeaseRefused,
    ) -> Result<(), EngineError> {
        let Some(lease) = tx.leases.get(&r.lease).cloned() else { return Ok(()) };
        tx.leases_mut().remove(&r.lease);
        tracing::warn!(worker, lease = r.lease, build = lease.build, reason = %r.reason, "lease refused; step queued again");
        let log = tx.build_mut(lease.build).and_then(|b| {
            if lease.checkout {
                // The checkout travels with the first lease that runs.
                b.checked_out = false;
            }
            let s = b.steps.get_mut(lease.step as usize)?;
            s.state = State::Pending;
            s.started_at = None;
            s.log_id.take()
        });
        if let Some(log) = log {
            self.close_log(tx, log)?;
        }
        tx.stalled_mut().insert(lease.build);
        tx.emit(Event::Step { build: lease.build, step: lease.step });
        Ok(())
    }

    pub(super) fn close_log(&self, tx: &mut Tx<'_>, log: u64) -> Result<(), EngineError> {
        let len = self.logs.close(log);
        let Some(rec) = tx.log_mut(log) else { return Ok(()) };
        if let Some(len) = len {
            rec.bytes = len;
        }
        rec.finished = true;
        let (build, step, bytes) = (rec.build, rec.step, rec.bytes);
        if let Some(s) = tx.build_mut(build).and_then(|b| b.steps.get_mut(step as usize)) {
            s.log_bytes = Some(bytes);
        }
        Ok(())
    }

    pub(super) fn finish_build(&self, tx: &mut Tx<'_>, id: u64) -> Result<(), EngineError> {
        tx.stalled_mut().remove(&id);
        let now = now_ms();
        let Some(b) = tx.build_mut(id) else { return Ok(()) };
        let result = rules::close_build(b, now);
        let (worker, builder) = (b.worker.clone(), b.builder.clone());
        tx.set_state(id, State::Finished);
        tx.durable();
        if let Some(w) = &worker {
            // What the worker keeps for the build alone (its container) can go now, also
            // when the build's last steps were skipped.
            tx.send(w, MasterMsg::Ended(proto::BuildEnded { build: id }));
        }
        tracing::info!(build = id, builder = %builder, result = %result, "build finished");
        if let Some(w) = worker
            && let Some(builds) = tx.worker_builds_mut(&w)
            && builds.get(&builder) == Some(&id)
        {
            builds.remove(&builder);
        }
        tx.emit(Event::Build { id });
        self.trigger_downstream(tx, id)
    }

    /// A running build lost its worker: its running step becomes RETRY, the build finishes
    /// as RETRY and a new attempt is queued (EXCEPTION after the last attempt; CANCELLED if
    /// it had been stopped).
    pub(super) fn lose_build(&self, tx: &mut Tx<'_>, id: u64, why: &str, loss: rules::Loss) -> Result<(), EngineError> {
        let leases: Vec<u64> = tx.leases.iter().filter(|(_, l)| l.build == id).map(|(k, _)| *k).collect();
        for l in leases {
            tx.leases_mut().remove(&l);
        }
        if tx.builds.get(&id).is_none_or(|b| b.state == State::Finished) {
            return Ok(());
        }
        let now = now_ms();
        let Some(b) = tx.build_mut(id) else { return Ok(()) };
        let lost = rules::lose(b, why, loss, MAX_WORKER_LOSSES, now);
        for log in lost.logs {
            self.close_log(tx, log)?;
        }
        let old = tx.builds[&id].clone();
        self.finish_build(tx, id)?;
        if lost.retry {
            let new_id = tx.next_build_id();
            let nb = rules::retry_of(&old, new_id, now_ms());
            // Builds waiting for the lost one wait for its retry instead.
            let waiters: Vec<u64> = tx
                .pending
                .iter()
                .map(|(_, i)| *i)
                .filter(|i| tx.builds.get(i).is_some_and(|b| b.waits_for.contains(&id)))
                .collect();
            for w in waiters {
                if let Some(b) = tx.build_mut(w) {
                    for x in &mut b.waits_for {
                        if *x == id {
                            *x = new_id;
                        }
                    }
                }
            }
            tx.insert_build(nb);
            tracing::info!(build = new_id, retry_of = id, "build queued again");
            tx.emit(Event::Build { id: new_id });
        }
        Ok(())
    }

    /// A build of a change succeeded: builders of other repositories that need it start for
    /// the same change (at their own branch head), unless one is already queued for it.
    fn trigger_downstream(&self, tx: &mut Tx<'_>, id: u64) -> Result<(), EngineError> {
        let Some(b) = tx.builds.get(&id).cloned() else { return Ok(()) };
        if b.changes.is_empty()
            || b.event != "push"
            || !b.result.is_some_and(Outcome::is_ok)
            || b.result == Some(Outcome::NotAffected)
        {
            return Ok(());
        }
        let Some(plan) = tx.plan(&b.plan_hash) else { return Ok(()) };
        let mut created = Vec::new();
        for x in plan.builders.iter().filter(|x| x.repo != b.repo && x.needs.contains(&b.builder)) {
            let mut queued =
                tx.builds.values().any(|o| o.builder == x.id && o.changes.iter().any(|c| b.changes.contains(c)));
            for c in &b.changes {
                if queued {
                    break;
                }
                tx.store.scan_builds(Some(&crate::store::index_key("change", &c.to_string())), true, |o| {
                    queued |= o.builder == x.id;
                    !queued
                })?;
            }
            if queued {
                continue;
            }
            let Some(repo) = self.repos.get(&x.repo).cloned() else { continue };
            let Ok(commit) = resolve(&repo.git_dir, &repo.branch) else { continue };
            let why = format!("{} succeeded for change {}", b.builder, b.changes.last().copied().unwrap_or(0));
            let req = super::triggers::NewBuild {
                branch: &repo.branch,
                commit: &commit,
                reason: &why,
                event: "push",
                props: &BTreeMap::new(),
                changes: &b.changes,
                rebuild_of: None,
            };
            self.create_build(tx, &plan, x, &repo, &req, &mut created)?;
        }
        self.announce_created(tx, &created);
        Ok(())
    }
}

pub(super) fn condition_scope(b: &BuildRecord, pb: &PlanBuilder) -> condition::Scope {
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

/// A builder's service as a lease carries it.
fn lease_service(s: &rbb_schema::plan::PlanService) -> proto::Service {
    let health = s.health.as_ref();
    proto::Service {
        name: s.name.clone(),
        image: s.image.clone(),
        env: s.env.clone().into_iter().collect(),
        command: s.command.clone().unwrap_or_default(),
        health_command: health.map(|h| h.command.clone()).unwrap_or_default(),
        health_interval_ms: health.map_or(0, |h| h.interval_ms),
        health_retries: health.map_or(0, |h| h.retries),
        health_timeout_ms: health.map_or(0, |h| h.timeout_ms),
    }
}

/// Whether `step` runs in its build's container: it uses its builder's image (the steps of a
/// builder with an image share one container for the build; a step with its own image gets a
/// fresh one).
fn in_build_container(pb: &PlanBuilder, step: &rbb_schema::plan::PlanStep) -> bool {
    pb.image.is_some() && step.image == pb.image
}
