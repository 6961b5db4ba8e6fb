//! The step cache's upkeep: its size limit and eviction, the counters the API shows, and
//! builder resets. Deciding hits and misses is not here (that is the step path's); this
//! only keeps the store and the blob files in bounds and in agreement.

use super::{Engine, EngineError};
use crate::cache::Evicted;
use std::sync::atomic::Ordering;

impl Engine {
    /// The cache's size limit in stored bytes (`cache.max_size`).
    pub fn cache_limit(&self) -> u64 {
        self.cache_limit.load(Ordering::Relaxed)
    }

    pub fn set_cache_limit(&self, bytes: u64) {
        self.cache_limit.store(bytes, Ordering::Relaxed);
    }

    /// Removes unused uploads older than an hour and, when the blobs take more than the
    /// limit, the least recently used entries that are not pinned, down to 90% of it. The
    /// files of blobs no entry uses any more are removed after the store let go of them.
    pub fn cache_gc(&self) -> Result<Evicted, EngineError> {
        // One collection at a time (the janitor and `rbb cache gc` may meet).
        let _one = self.cache_gc.lock().unwrap_or_else(|p| p.into_inner());
        let limit = self.cache_limit();
        let stored = self.store.cache_stats()?.stored_bytes;
        let target = if stored > limit { limit - limit / 10 } else { u64::MAX };
        let out = self.store.cache_evict(target, |key| self.cache_pinned(key))?;
        self.remove_blob_files(&out)?;
        if !out.is_empty() {
            tracing::info!(
                entries = out.entries,
                blobs = out.blobs.len(),
                bytes = out.bytes,
                limit,
                "evicted from the step cache"
            );
        }
        Ok(out)
    }

    /// Removes an entry whose blobs are missing or damaged (a hit found out), and the files
    /// of the blobs only it used.
    pub fn cache_remove_entry(&self, key: &str) -> Result<Evicted, EngineError> {
        let out = self.store.cache_remove_entry(key)?;
        self.remove_blob_files(&out)?;
        Ok(out)
    }

    /// Removes the files of blobs the store no longer has a row for (an upload of the same
    /// digest since then keeps its file).
    fn remove_blob_files(&self, out: &Evicted) -> Result<(), EngineError> {
        for d in &out.blobs {
            if self.store.cache_blob(d)?.is_none()
                && let Err(e) = self.blobs.remove(d)
            {
                tracing::error!(blob = %d, error = %e, "cannot remove an evicted blob");
            }
        }
        Ok(())
    }

    /// The builder's cache epoch, part of its steps' full keys.
    pub fn cache_epoch(&self, builder: &str) -> Result<u64, EngineError> {
        Ok(self.store.cache_epoch(builder)?)
    }

    /// Makes every later step of the builder miss once: its epoch grows (durably).
    /// Answers the new epoch; [`EngineError::NotFound`] for a builder not in the plan.
    pub fn cache_reset(&self, builder: &str) -> Result<u64, EngineError> {
        self.wait_heads();
        if self.plan().builder(builder).is_none() {
            return Err(EngineError::NotFound(format!("no builder `{builder}` in the plan")));
        }
        let epoch = self.store.cache_reset(builder)?;
        tracing::info!(builder, epoch, "cache reset");
        Ok(epoch)
    }

    /// The cache's totals and per-builder hits and misses.
    pub fn cache_stats(&self) -> Result<crate::cache::CacheStats, EngineError> {
        Ok(self.store.cache_stats()?)
    }
}
