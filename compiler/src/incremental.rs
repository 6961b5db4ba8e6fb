//! Recompiling a fleet after one repository changed: the per-file passes (parsing, lowering,
//! snippets) of every source seen before are reused, so a push parses one file, not a
//! thousand. Only the merge runs over the whole plan again.
//!
//! A file's front-end result depends on its text, its name and repository, its branch and
//! file list (what snippets can read) and the compile options; that is its key here. Where
//! it came from (commit, blob, URL) only reaches the plan at the merge, so two commits with
//! the same pipeline share one entry. Results with errors are not kept: a snippet that timed
//! out on a loaded machine is tried again next time. The cache holds a bounded number of
//! files, least recently used first out.

use crate::{FrontEnd, Options, Source, front_end, snippet};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;

/// Front-end results of single files, kept between compiles.
pub struct FrontEndCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Key → (result, last use).
    entries: HashMap<[u8; 32], (FrontEnd, u64)>,
    clock: u64,
    hits: u64,
    misses: u64,
}

impl std::fmt::Debug for FrontEndCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (len, hits, misses) = self.stats();
        f.debug_struct("FrontEndCache")
            .field("capacity", &self.capacity)
            .field("len", &len)
            .field("hits", &hits)
            .field("misses", &misses)
            .finish()
    }
}

impl FrontEndCache {
    /// A cache of at most `capacity` files (at least one).
    pub fn new(capacity: usize) -> FrontEndCache {
        FrontEndCache { capacity: capacity.max(1), inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (files kept, reuses, files compiled) since the cache was made.
    pub fn stats(&self) -> (usize, u64, u64) {
        let inner = self.lock();
        (inner.entries.len(), inner.hits, inner.misses)
    }

    /// The front end of every source, in order: kept results renumbered to their place in
    /// this compile, the others computed (on every core) and kept when they have no errors.
    pub(crate) fn front_ends(
        &self,
        sources: &[Source],
        eval: &dyn snippet::Evaluator,
        opts: &Options,
    ) -> Vec<FrontEnd> {
        let options = options_key(opts);
        let keys: Vec<[u8; 32]> = sources.iter().map(|s| key(s, &options)).collect();
        let mut out: Vec<Option<FrontEnd>> = vec![None; sources.len()];
        {
            let mut inner = self.lock();
            inner.clock += 1;
            let now = inner.clock;
            for (i, k) in keys.iter().enumerate() {
                if let Some((fe, used)) = inner.entries.get_mut(k) {
                    *used = now;
                    let mut fe = fe.clone();
                    for l in &mut fe.lowered {
                        l.file = i;
                    }
                    out[i] = Some(fe);
                }
            }
            let reused = out.iter().filter(|o| o.is_some()).count() as u64;
            inner.hits += reused;
            inner.misses += sources.len() as u64 - reused;
        }
        let missing: Vec<usize> = (0..sources.len()).filter(|i| out[*i].is_none()).collect();
        let computed = compute(sources, &missing, eval, opts);
        let mut inner = self.lock();
        let now = inner.clock;
        for (i, fe) in missing.iter().zip(computed) {
            if !fe.diags.has_errors() {
                inner.entries.insert(keys[*i], (fe.clone(), now));
            }
            out[*i] = Some(fe);
        }
        if inner.entries.len() > self.capacity {
            let mut by_age: Vec<([u8; 32], u64)> = inner.entries.iter().map(|(k, (_, t))| (*k, *t)).collect();
            by_age.sort_unstable_by_key(|(_, t)| *t);
            let excess = inner.entries.len() - self.capacity;
            for (k, _) in by_age.into_iter().take(excess) {
                inner.entries.remove(&k);
            }
        }
        out.into_iter().flatten().collect()
    }
}

/// The front ends of `sources[i]` for each `i` in `which`, one per file, on every core.
fn compute(sources: &[Source], which: &[usize], eval: &dyn snippet::Evaluator, opts: &Options) -> Vec<FrontEnd> {
    if which.is_empty() {
        return Vec::new();
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunk = which.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = which
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|&i| front_end(std::slice::from_ref(&sources[i]), i, eval, opts))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}

/// What of the options the per-file passes read (not `broken_repos`: that is the merge's).
/// Destructured field by field: a new option does not compile until it is placed here.
fn options_key(opts: &Options) -> String {
    let Options {
        max_matrix,
        default_timeout_secs,
        worker_labels,
        other_repos_unknown,
        locks,
        broken_repos: _,
        secrets,
    } = opts;
    format!(
        "{max_matrix}\u{0}{default_timeout_secs}\u{0}{worker_labels:?}\u{0}{other_repos_unknown}\u{0}{locks:?}\u{0}{secrets:?}"
    )
}

fn key(s: &Source, options: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [s.repo.as_str(), s.file.as_str(), s.branch.as_str(), options] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update((s.text.len() as u64).to_le_bytes());
    h.update(s.text.as_bytes());
    h.update(format!("{:?}", s.not_utf8).as_bytes());
    h.update(s.files.digest());
    h.finalize().into()
}
