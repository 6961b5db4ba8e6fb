//! Retention: the janitor that compresses, then deletes old step logs, deletes old builds
//! (keeping the newest few of every builder), and collects the changes and plans nothing
//! references any more. It works in small batches, each its own store transaction, outside
//! the engine's lock, and only on finished history: live builds and open logs are never
//! touched. Logs and builds are visited in id order (their creation order) from cursors
//! kept in the store, so a run costs what has aged since the last one. Each run also holds
//! the step cache to its size limit ([`Engine::cache_gc`]).

use super::{Engine, EngineError};
use crate::model::{BuildRecord, LogRecord};
use crate::store::{Batch, Sync, index_key};
use rbb_schema::api::State;
use rbb_schema::config::RetentionConfig;

/// Records handled per store transaction.
const BATCH: usize = 256;
const DAY_MS: u64 = 86_400_000;

/// The retention policy in milliseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub build_age_ms: Option<u64>,
    pub keep_builds: u32,
    pub compress_age_ms: Option<u64>,
    pub log_age_ms: Option<u64>,
    pub audit_age_ms: Option<u64>,
}

impl Policy {
    pub fn from_config(c: &RetentionConfig) -> Policy {
        let days = |d: Option<u32>| d.map(|d| u64::from(d) * DAY_MS);
        Policy {
            build_age_ms: days(c.build_days),
            keep_builds: c.keep_builds.unwrap_or(0),
            compress_age_ms: days(c.compress_logs_days),
            log_age_ms: days(c.log_days),
            audit_age_ms: days(c.audit_days),
        }
    }
}

/// What one janitor run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub logs_compressed: u64,
    pub logs_deleted: u64,
    pub builds_deleted: u64,
    pub changes_deleted: u64,
    pub plans_deleted: u64,
    pub audit_deleted: u64,
    /// What the step cache's collection removed.
    pub cache: crate::cache::Evicted,
}

impl Engine {
    /// One janitor run at `now` (Unix milliseconds).
    pub fn retention(&self, policy: &Policy, now: u64) -> Result<Report, EngineError> {
        let mut report = Report::default();
        self.logs.clear_cache()?;
        if let Some(age) = policy.log_age_ms {
            report.logs_deleted = self.age_logs("janitor.logs_deleted", now.saturating_sub(age), |e, l| {
                e.logs.delete(&l.file)?;
                l.expired = true;
                Ok(())
            })?;
        }
        if let Some(age) = policy.compress_age_ms {
            report.logs_compressed = self.age_logs("janitor.logs_compressed", now.saturating_sub(age), |e, l| {
                if !l.expired && !l.compressed {
                    l.file = e.logs.compress(&l.file)?;
                    l.compressed = true;
                }
                Ok(())
            })?;
        }
        if let Some(age) = policy.build_age_ms {
            let before = now.saturating_sub(age);
            report.builds_deleted = self.delete_old_builds(before, policy.keep_builds)?;
            report.changes_deleted = self.delete_unreferenced_changes(before)?;
        }
        report.plans_deleted = self.delete_unreferenced_plans()?;
        if let Some(age) = policy.audit_age_ms {
            report.audit_deleted = crate::store::audit_expire(self.database(), now.saturating_sub(age), BATCH)?;
        }
        report.cache = self.cache_gc()?;
        if report != Report::default() {
            tracing::info!(?report, "retention");
        }
        Ok(report)
    }

    /// Applies `act` to every finished log created before `before`, from the cursor `key`
    /// on, in batches; moves the cursor past what it handled.
    fn age_logs(
        &self,
        key: &str,
        before: u64,
        act: impl Fn(&Engine, &mut LogRecord) -> Result<(), EngineError>,
    ) -> Result<u64, EngineError> {
        let mut done = 0;
        loop {
            let from = self.store.meta(key)?;
            let mut batch: Vec<LogRecord> = Vec::new();
            let mut next = from;
            let mut stop = false;
            self.store.scan_logs(from, |l| {
                let old = self.log_time(&l).is_some_and(|t| t < before);
                if !l.finished || !old {
                    stop = true;
                    return false;
                }
                next = l.id + 1;
                batch.push(l);
                batch.len() < BATCH
            })?;
            let mut changed = Vec::new();
            for mut l in batch {
                let was = l.clone();
                act(self, &mut l)?;
                if l != was {
                    changed.push(l);
                }
            }
            done += changed.len() as u64;
            self.store.commit(Batch { logs: changed.iter().collect(), ..Batch::default() }, Sync::Lazy)?;
            self.store.set_meta(key, next)?;
            if stop || next == from {
                return Ok(done);
            }
        }
    }

    /// When a log was written: its own stamp, else its build's finish.
    fn log_time(&self, l: &LogRecord) -> Option<u64> {
        l.created_at.or_else(|| {
            self.store.build(l.build).ok().flatten().map_or(Some(0), |b| b.finished_at.or(Some(b.submitted_at)))
        })
    }

    fn delete_old_builds(&self, before: u64, keep: u32) -> Result<u64, EngineError> {
        let mut deleted = 0;
        let mut from = self.store.meta("janitor.builds")?;
        loop {
            let mut batch: Vec<BuildRecord> = Vec::new();
            let mut stop = false;
            let mut next = from;
            self.store.scan_builds(None, false, |b| {
                if b.id < from {
                    return true;
                }
                if b.submitted_at >= before {
                    stop = true;
                    return false;
                }
                next = b.id + 1;
                batch.push(b);
                batch.len() < BATCH
            })?;
            let mut builds = Vec::new();
            let mut logs = Vec::new();
            let mut blocked = None;
            for b in &batch {
                if b.state != State::Finished || b.finished_at.is_none_or(|t| t >= before) {
                    // A build still live (or finished late): the cursor waits for it.
                    blocked.get_or_insert(b.id);
                    continue;
                }
                if self.newer_builds_of(&b.builder, b.id, keep)? < keep {
                    continue;
                }
                builds.push(b.id);
                for s in &b.steps {
                    if let Some(id) = s.log_id {
                        if let Some(l) = self.store.log(id)? {
                            self.logs.delete(&l.file)?;
                        }
                        logs.push(id);
                    }
                }
            }
            self.store.delete(&builds, &logs, &[], &[])?;
            deleted += builds.len() as u64;
            let cursor = blocked.unwrap_or(next);
            self.store.set_meta("janitor.builds", cursor)?;
            if stop || batch.len() < BATCH || blocked.is_some() {
                return Ok(deleted);
            }
            from = cursor;
        }
    }

    /// How many builds of `builder` are newer than `id`, counting up to `keep`.
    fn newer_builds_of(&self, builder: &str, id: u64, keep: u32) -> Result<u32, EngineError> {
        let mut n = 0;
        if keep == 0 {
            return Ok(0);
        }
        self.store.scan_builds(Some(&index_key("builder", builder)), true, |b| {
            if b.id <= id {
                return false;
            }
            n += 1;
            n < keep
        })?;
        Ok(n)
    }

    fn delete_unreferenced_changes(&self, before: u64) -> Result<u64, EngineError> {
        let mut ids = Vec::new();
        self.store.scan_changes(None, false, |c| {
            if c.recorded_at >= before || ids.len() >= BATCH * 16 {
                return false;
            }
            ids.push(c.id);
            true
        })?;
        let mut unreferenced = Vec::new();
        for id in ids {
            if self.store.count(&index_key("change", &id.to_string()))? == 0 {
                unreferenced.push(id);
            }
        }
        self.store.delete(&[], &[], &unreferenced, &[])?;
        Ok(unreferenced.len() as u64)
    }

    fn delete_unreferenced_plans(&self) -> Result<u64, EngineError> {
        let in_memory: Vec<String> = self.lock().plans.keys().cloned().collect();
        let mut deleted = 0;
        let mut after = String::new();
        loop {
            let hashes = self.store.plan_hashes(&after, BATCH)?;
            let Some(last) = hashes.last().cloned() else { return Ok(deleted) };
            let mut gone = Vec::new();
            for h in hashes {
                if !in_memory.contains(&h) && self.store.count(&index_key("plan", &h))? == 0 {
                    gone.push(h);
                }
            }
            self.store.delete(&[], &[], &[], &gone)?;
            deleted += gone.len() as u64;
            after = last;
        }
    }
}
