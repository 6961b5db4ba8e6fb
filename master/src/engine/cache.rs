//! The engine's side of the step cache (docs/cache.md): answering a worker's `Lookup` for a
//! leased step (its full key and, when an intact entry has that key, a hit), and what a
//! finished step records and stores. Whether a step is cacheable at all is decided when it
//! is leased ([`super::rules::cache_eligible`]).
//!
//! A hit is offered only for an entry whose every blob is on disk, and it is pinned (never
//! evicted) while the lease that restores it lives. Only a SUCCESS that ran stores an entry.

use super::{Engine, EngineError, Tx};
use crate::cache::key::{Manifest, changed};
use crate::cache::{CacheEntry, LastRun, OutputFile};
use crate::model::{CacheSourceRecord, StepCacheRecord, now_ms};
use rbb_schema::api::CacheState;
use rbb_schema::proto;
use rbb_schema::results::Outcome;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The step cache rows a transaction writes, in the same store transaction as the results
/// they come from.
#[derive(Debug, Default)]
pub(super) struct TxCache {
    pub entries: Vec<CacheEntry>,
    /// Entries reused, with when.
    pub touches: Vec<(String, u64)>,
    /// Hits and misses per builder.
    pub counts: BTreeMap<String, (u64, u64)>,
    /// The last successful execution of (builder, step).
    pub last: Vec<(String, String, LastRun)>,
}

impl Tx<'_> {
    fn cache_hit(&mut self, builder: &str, key: &str) {
        self.cache.touches.push((key.to_owned(), now_ms()));
        self.cache.counts.entry(builder.to_owned()).or_default().0 += 1;
    }

    fn cache_miss(&mut self, builder: &str) {
        self.cache.counts.entry(builder.to_owned()).or_default().1 += 1;
    }

    fn cache_store(&mut self, entry: CacheEntry) {
        self.cache.entries.push(entry);
    }

    fn cache_last(&mut self, builder: &str, step: &str, last: LastRun) {
        self.cache.last.push((builder.to_owned(), step.to_owned(), last));
    }
}

/// What `Lookup` answered for a lease.
#[derive(Debug, Clone)]
pub(super) struct LeaseCache {
    pub key: String,
    pub manifest: Manifest,
    /// The entry offered for reuse.
    pub hit: Option<CacheEntry>,
    /// On a miss: what differs from the last successful execution.
    pub changed: Vec<String>,
    pub reason: Option<String>,
}

/// Why a lookup has no answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("lease {0} is not running on this worker")]
    NoLease(u64),
    #[error("the step of lease {0} is not cacheable")]
    NotCacheable(u64),
    #[error("cannot compute the step's key: {0}")]
    Key(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What the lock-free part of a lookup needs to know about the leased step.
struct Probe {
    git_dir: PathBuf,
    commit: String,
    builder: String,
    step_name: String,
    static_key: String,
    definition: serde_json::Value,
    inputs: Vec<String>,
    pass_env: Vec<String>,
    platform: String,
    after: Option<String>,
    salt: Option<String>,
    secrets: std::collections::BTreeMap<String, Option<u64>>,
}

impl Engine {
    /// Answers a worker's `Lookup` for one of its leases: computes the step's full key from
    /// the mirror (outside the engine's lock) and offers the stored entry with that key if
    /// every blob of it is intact. The answer is remembered on the lease (and a hit pinned)
    /// until the step's result arrives.
    pub fn cache_lookup(&self, worker: &str, q: &proto::CacheQuery) -> Result<proto::CacheAnswer, LookupError> {
        let probe = self.probe(worker, q.lease)?;
        let inputs = self
            .inputs
            .resolve(&probe.git_dir, &probe.commit, &probe.inputs)
            .map_err(|e| LookupError::Key(e.to_string()))?;
        let pass_env = crate::cache::key::pass_env_digests(&probe.pass_env, &q.pass_env);
        let manifest = Manifest {
            format: crate::cache::key::FULL_KEY_FORMAT.to_owned(),
            epoch: self.cache_epoch(&probe.builder)?,
            static_key: probe.static_key,
            inputs,
            pass_env,
            image: Some(q.image_digest.clone()).filter(|d| !d.is_empty()),
            platform: probe.platform,
            after: probe.after,
            salt: probe.salt,
            secrets: probe.secrets,
            definition: probe.definition,
        };
        let key = manifest.key();
        // From here until the hit is pinned on the lease, no collection may remove it.
        let _no_gc = self.cache_gc.lock().unwrap_or_else(|p| p.into_inner());
        let mut hit = self.store.cache_entry(&key).map_err(EngineError::from)?;
        if let Some(entry) = &hit
            && let Some(missing) = entry.digests().into_iter().find(|d| !self.blobs.has(d))
        {
            tracing::warn!(key, blob = missing, "a cache entry lost a blob; it is removed and the step runs");
            self.cache_remove_entry(&key)?;
            hit = None;
        }
        let (changed_fields, reason) = match &hit {
            Some(_) => (Vec::new(), None),
            None => match self.store.cache_last(&probe.builder, &probe.step_name).map_err(EngineError::from)? {
                None => (Vec::new(), Some("no earlier successful execution".to_owned())),
                Some(last) => match serde_json::from_value::<Manifest>(last.manifest) {
                    Ok(old) => {
                        let c = changed(&old, &manifest);
                        let why = c.is_empty().then(|| {
                            format!(
                                "nothing changed since build {}, but its entry is gone (evicted, reset or incomplete)",
                                last.build
                            )
                        });
                        (c, why)
                    }
                    Err(_) => (Vec::new(), Some("the earlier execution's manifest is of another format".to_owned())),
                },
            },
        };
        let answer = proto::CacheAnswer {
            key: key.clone(),
            hit: hit.is_some(),
            files: hit.as_ref().map(|e| e.files.iter().map(proto::OutputFile::from).collect()).unwrap_or_default(),
            source: hit.as_ref().map(|e| format!("build {}, step {}", e.build, e.step)).unwrap_or_default(),
        };
        let remembered = LeaseCache { key, manifest, hit, changed: changed_fields, reason };
        let mut st = self.lock();
        let Some(l) = st.leases.get_mut(&q.lease).filter(|l| l.worker == worker) else {
            return Err(LookupError::NoLease(q.lease));
        };
        l.cache = Some(Box::new(remembered));
        Ok(answer)
    }

    fn probe(&self, worker: &str, lease: u64) -> Result<Probe, LookupError> {
        let st = self.lock();
        let l = st.leases.get(&lease).filter(|l| l.worker == worker).ok_or(LookupError::NoLease(lease))?;
        let b = st.builds.get(&l.build).ok_or(LookupError::NoLease(lease))?;
        let plan = st.plans.get(&b.plan_hash).ok_or(LookupError::NotCacheable(lease))?;
        let pb = plan.builder(&b.builder).ok_or(LookupError::NotCacheable(lease))?;
        let spec = pb.steps.get(l.step as usize).ok_or(LookupError::NotCacheable(lease))?;
        super::rules::cache_eligible(b, spec, l.step).map_err(|_| LookupError::NotCacheable(lease))?;
        let repo = self.repos.get(&b.repo).ok_or(LookupError::NotCacheable(lease))?;
        let platform = st.workers.get(worker).and_then(|w| w.platform.clone()).unwrap_or_default();
        let definition = rbb_compiler::cache_key::plan_step_document(pb, l.step as usize, |id| {
            plan.builder(id).and_then(|u| u.steps.last()).map(|s| s.key.as_str())
        })
        .unwrap_or_default();
        Ok(Probe {
            git_dir: repo.git_dir.clone(),
            commit: b.commit.clone(),
            builder: b.builder.clone(),
            step_name: spec.name.clone(),
            static_key: spec.key.clone(),
            definition,
            inputs: spec.inputs.clone(),
            pass_env: spec.pass_env.clone(),
            platform,
            after: super::rules::previous_key(b, l.step),
            salt: pb.cache_salt.clone(),
            secrets: self.secrets().versions(spec),
        })
    }

    /// Records what the cache did for a finished step, and stores a new entry for a SUCCESS
    /// that ran and whose outputs all reached the store. Returns the result to record: a
    /// restore the master did not offer is an EXCEPTION, never a pass.
    pub(super) fn cache_finished(
        &self,
        tx: &mut Tx<'_>,
        lease: &super::LeaseInfo,
        f: &proto::StepFinished,
        result: Outcome,
        declared_outputs: bool,
    ) -> Outcome {
        let Some(c) = lease.cache.as_deref() else {
            if f.cached {
                return Outcome::Exception;
            }
            return result;
        };
        let Some(b) = tx.builds.get(&lease.build) else { return result };
        let (builder, step_name) =
            (b.builder.clone(), b.steps.get(lease.step as usize).map(|s| s.name.clone()).unwrap_or_default());
        if f.cached {
            let Some(entry) = &c.hit else { return Outcome::Exception };
            if result != Outcome::Success {
                return Outcome::Exception;
            }
            tx.cache_hit(&builder, &entry.key);
            if let Some(s) = tx.build_mut(lease.build).and_then(|b| b.steps.get_mut(lease.step as usize)) {
                s.cache = Some(StepCacheRecord {
                    state: CacheState::Hit,
                    key: Some(c.key.clone()),
                    reason: None,
                    changed: Vec::new(),
                    from: Some(CacheSourceRecord {
                        build: entry.build,
                        builder: entry.builder.clone(),
                        step: entry.step_index,
                        step_name: entry.step.clone(),
                        log_id: entry.log_id,
                    }),
                    stored: false,
                });
            }
            return Outcome::Cached;
        }
        tx.cache_miss(&builder);
        let outputs: Vec<OutputFile> = f.outputs.iter().cloned().map(OutputFile::from).collect();
        // Outputs were declared but none came back: they were not stored (or matched
        // nothing). Either way there is nothing a later hit could restore faithfully.
        let complete = !(declared_outputs && outputs.is_empty())
            && outputs.iter().all(|o| o.digest.is_empty() || self.blobs.has(&o.digest));
        let store = result == Outcome::Success && complete;
        let log_id = tx.builds.get(&lease.build).and_then(|b| b.steps.get(lease.step as usize)).and_then(|s| s.log_id);
        if store {
            let now = now_ms();
            let entry = CacheEntry {
                key: c.key.clone(),
                builder: builder.clone(),
                step: step_name.clone(),
                build: lease.build,
                step_index: lease.step,
                log_id,
                bytes: outputs.iter().map(|o| o.size).sum(),
                files: outputs,
                created_at: now,
            };
            tx.cache_store(entry);
            tx.cache_last(
                &builder,
                &step_name,
                LastRun {
                    key: c.key.clone(),
                    build: lease.build,
                    step_index: lease.step,
                    manifest: serde_json::to_value(&c.manifest).unwrap_or_default(),
                    at_ms: now,
                },
            );
        }
        if let Some(s) = tx.build_mut(lease.build).and_then(|b| b.steps.get_mut(lease.step as usize)) {
            s.cache = Some(StepCacheRecord {
                state: CacheState::Miss,
                key: Some(c.key.clone()),
                reason: if c.hit.is_some() {
                    // Offered, but the worker could not restore it (a blob gone or damaged).
                    Some("its entry was found but could not be restored; see the step's log".to_owned())
                } else {
                    c.reason.clone()
                },
                changed: c.changed.clone(),
                from: None,
                stored: store,
            });
        }
        result
    }

    /// Whether a running step is restoring the entry `key` (eviction must leave it): the
    /// hit its lease was offered pins it until the step's result arrives or the lease ends.
    pub fn cache_pinned(&self, key: &str) -> bool {
        let st = self.lock();
        st.leases.values().any(|l| l.cache.as_ref().and_then(|c| c.hit.as_ref()).is_some_and(|e| e.key == key))
    }
}
