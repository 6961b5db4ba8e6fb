//! The worker's side of the step cache (docs/cache.md): collecting what a step's `outputs`
//! match, the local blob store, restoring a cache entry into a checkout, and the cache calls
//! to the master (`Lookup`, `MissingBlobs`, `GetBlob`, `PutBlob`) around a leased step.
//!
//! The cache can never make a step fail: every error here ends as one header line in the
//! step's log, and the step runs (before) or stays SUCCESS without stored outputs (after).
//! A wrong hit is the worst possible bug, so whatever looks doubtful is refused: a path with
//! `..`, a symlink leaving the checkout, a blob whose size or digest differs, an entry naming
//! a file outside its step's outputs. This module must not run step commands itself (the
//! [`Executor`] does) nor decide a step's result beyond "restored".

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use globset::{GlobBuilder, GlobMatcher};
use rbb_schema::proto::worker_client::WorkerClient;
use rbb_schema::proto::{BlobData, BlobList, BlobRef, CacheAnswer, CacheQuery, Lease, OutputFile, StepResult};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::executor::{Executor, MAX_CHUNK, Output, StepOutcome};

/// The cache's directory inside the worker's work directory.
pub const CACHE_DIR: &str = ".rbb-cache";
/// How many bytes of blobs the local store keeps by default (as the master's `max_size`).
pub const DEFAULT_MAX_BYTES: u64 = 10 << 30;
/// How long the master may take to answer Lookup (the step runs without the cache after).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the master may take to answer MissingBlobs.
const MISSING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a blob stream may stay silent before the transfer is given up.
const STREAM_IDLE: Duration = Duration::from_secs(60);
/// Largest answer the cache calls accept (a Lookup hit lists every file of the entry).
const MAX_ANSWER: usize = 256 << 20;
/// Read and write buffer for hashing and copying files.
const BUFFER: usize = 256 << 10;
/// Most threads a restore copies and checks blobs on.
const STAGING_THREADS: usize = 4;

/// Why the cache could not do something. Never a step's result: the session writes it in the
/// step's log and goes on without the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("output pattern {pattern:?} {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("{path} {reason}")]
    Refused { path: String, reason: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid blob digest {digest:?}")]
    BadDigest { digest: String },
    #[error("blob {digest} is corrupt ({where_}): {reason}")]
    Corrupt { digest: String, where_: &'static str, reason: String },
    #[error("{path} changed while it was being stored")]
    Changed { path: String },
    #[error("the master's cache entry is unusable: {reason}")]
    BadEntry { reason: String },
    #[error("{call} failed ({code:?}): {message}")]
    Rpc { call: &'static str, code: tonic::Code, message: String },
    #[error("{call}: no answer within {}s", limit.as_secs())]
    Timeout { call: &'static str, limit: Duration },
    #[error("the cache's file work ended abnormally: {reason}")]
    Aborted { reason: String },
    #[error("cancelled")]
    Cancelled,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CacheError {
    let path = path.to_owned();
    move |source| CacheError::Io { action, path, source }
}

fn rpc_error(call: &'static str) -> impl FnOnce(tonic::Status) -> CacheError {
    move |status| CacheError::Rpc { call, code: status.code(), message: status.message().to_owned() }
}

// ---------------------------------------------------------------------------------------------
// Digests and paths

/// `sha256:<64 lowercase hex>` of what `hasher` has seen.
fn finish_digest(hasher: Sha256) -> String {
    let bytes = hasher.finalize();
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for b in bytes {
        text.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        text.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    text
}

/// `sha256:<hex>` of `bytes` (a `pass_env` value in a Lookup).
pub fn sha256_of(bytes: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(bytes);
    finish_digest(hasher)
}

/// The hex part of a well-formed digest.
fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(hex)
}

/// A path the protocol allows: relative, `/`-separated, no empty, `.` or `..` component,
/// not inside the checkout's `.git`.
fn valid_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && path.split('/').next() != Some(".git")
}

/// Whether a symlink at `path` (relative to the checkout) pointing at `link` stays inside
/// the checkout, read lexically: relative, and its `..` never climb above the root.
fn link_stays_inside(path: &str, link: &str) -> bool {
    if link.is_empty() || link.starts_with('/') || link.contains('\0') {
        return false;
    }
    let mut at: Vec<&str> = path.split('/').collect();
    at.pop();
    for c in link.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if at.pop().is_none() {
                    return false;
                }
            }
            c => at.push(c),
        }
    }
    true
}

fn join_rel(base: &str, name: &str) -> String {
    if base.is_empty() { name.to_owned() } else { format!("{base}/{name}") }
}

/// Permission bits kept in the cache (no setuid, setgid or sticky bit).
fn mode_of(meta: &fs::Metadata) -> u32 {
    meta.permissions().mode() & 0o777
}

// ---------------------------------------------------------------------------------------------
// Output patterns

/// One output pattern: a path (a file, a symlink or a directory taken whole) or a glob.
#[derive(Debug)]
struct Pattern {
    text: String,
    /// The leading components without glob characters (the whole path for a literal).
    prefix: Vec<String>,
    glob: Option<Glob>,
}

#[derive(Debug)]
struct Glob {
    matcher: GlobMatcher,
    /// How deep a match can lie (in components); `None` with `**`.
    depth: Option<usize>,
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, CacheError> {
        let bad = |reason: &str| CacheError::BadPattern { pattern: text.to_owned(), reason: reason.to_owned() };
        if text.starts_with('/') {
            return Err(bad("is absolute (outputs are relative to the checkout)"));
        }
        let mut comps = Vec::new();
        for c in text.split('/') {
            match c {
                "" | "." => {}
                ".." => return Err(bad("climbs out with `..`")),
                c if c.contains('\0') => return Err(bad("contains a NUL character")),
                c => comps.push(c.to_owned()),
            }
        }
        if comps.is_empty() {
            return Err(bad("names the whole checkout"));
        }
        if comps[0] == ".git" {
            return Err(bad("is inside the checkout's .git"));
        }
        let is_glob = |c: &String| c.contains(['*', '?', '[', '{']);
        let Some(first_glob) = comps.iter().position(is_glob) else {
            return Ok(Pattern { text: text.to_owned(), prefix: comps, glob: None });
        };
        let joined = comps.join("/");
        let matcher = GlobBuilder::new(&joined)
            .literal_separator(true)
            .build()
            .map_err(|err| bad(&format!("is not a valid glob: {}", err.kind())))?
            .compile_matcher();
        let depth = (!joined.contains("**")).then_some(comps.len());
        Ok(Pattern { text: text.to_owned(), prefix: comps[..first_glob].to_vec(), glob: Some(Glob { matcher, depth }) })
    }

    fn parse_all(patterns: &[String]) -> Result<Vec<Pattern>, CacheError> {
        patterns.iter().map(|p| Pattern::parse(p)).collect()
    }

    /// Whether `path` is something this pattern takes: the path itself or inside it, or for a
    /// glob, a path of which the path or one of its ancestors matches.
    fn covers(&self, path: &str) -> bool {
        match &self.glob {
            None => {
                let literal = self.prefix.join("/");
                path == literal || path.strip_prefix(&literal).is_some_and(|rest| rest.starts_with('/'))
            }
            Some(glob) => {
                let comps: Vec<&str> = path.split('/').collect();
                (self.prefix.len() + 1..=comps.len()).any(|n| glob.matcher.is_match(comps[..n].join("/")))
            }
        }
    }

    /// The paths (relative to `checkout`) of what exists and matches, sorted. Symlinks are
    /// not followed: one on the way to a match is refused, one that matches is the match.
    fn matches(&self, checkout: &Path) -> Result<Vec<String>, CacheError> {
        let mut dir = checkout.to_owned();
        for (i, comp) in self.prefix.iter().enumerate() {
            dir.push(comp);
            let last_of_literal = self.glob.is_none() && i + 1 == self.prefix.len();
            let meta = match fs::symlink_metadata(&dir) {
                Ok(meta) => meta,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(source) => return Err(CacheError::Io { action: "read", path: dir, source }),
            };
            if last_of_literal {
                return Ok(vec![self.prefix.join("/")]);
            }
            if meta.file_type().is_symlink() {
                return Err(CacheError::Refused {
                    path: self.prefix[..=i].join("/"),
                    reason: format!("is a symlink on the way to output {:?}", self.text),
                });
            }
            if !meta.is_dir() {
                return Ok(Vec::new());
            }
        }
        let Some(glob) = &self.glob else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        let mut stack = vec![(dir, self.prefix.join("/"), self.prefix.len())];
        while let Some((dir, rel, depth)) = stack.pop() {
            for entry in fs::read_dir(&dir).map_err(io_error("list", &dir))? {
                let entry = entry.map_err(io_error("list", &dir))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    return Err(CacheError::Refused {
                        path: format!("{}/{}", rel, name.to_string_lossy()),
                        reason: "is not a UTF-8 name".to_owned(),
                    });
                };
                if rel.is_empty() && name == ".git" {
                    continue;
                }
                let child = join_rel(&rel, name);
                if glob.matcher.is_match(&child) {
                    found.push(child);
                    continue;
                }
                let is_dir = entry.file_type().map_err(io_error("read", &entry.path()))?.is_dir();
                if is_dir && glob.depth.is_none_or(|max| depth + 1 < max) {
                    stack.push((entry.path(), child, depth + 1));
                }
            }
        }
        found.sort();
        Ok(found)
    }
}

// ---------------------------------------------------------------------------------------------
// Collecting outputs

/// What `patterns` match in `checkout`: every regular file (hashed, streamed), symlink and
/// empty directory, directories taken whole, sorted by path without duplicates. A pattern
/// that matches nothing adds nothing. A symlink that is absolute or leaves the checkout, a
/// special file or a name that is not UTF-8 refuses the whole collection.
pub fn collect_outputs(
    checkout: &Path,
    patterns: &[String],
    cancel: &CancellationToken,
) -> Result<Vec<OutputFile>, CacheError> {
    let mut found: BTreeMap<String, OutputFile> = BTreeMap::new();
    for pattern in Pattern::parse_all(patterns)? {
        for rel in pattern.matches(checkout)? {
            collect_tree(checkout, rel, &mut found, cancel)?;
        }
    }
    Ok(found.into_values().collect())
}

fn collect_tree(
    checkout: &Path,
    top: String,
    found: &mut BTreeMap<String, OutputFile>,
    cancel: &CancellationToken,
) -> Result<(), CacheError> {
    let mut stack = vec![top];
    while let Some(rel) = stack.pop() {
        if cancel.is_cancelled() {
            return Err(CacheError::Cancelled);
        }
        if found.contains_key(&rel) {
            continue;
        }
        let path = checkout.join(&rel);
        let meta = fs::symlink_metadata(&path).map_err(io_error("read", &path))?;
        let kind = meta.file_type();
        let entry = if kind.is_symlink() {
            let target = fs::read_link(&path).map_err(io_error("read the symlink", &path))?;
            let Some(link) = target.to_str() else {
                return Err(CacheError::Refused { path: rel, reason: "is a symlink to a non-UTF-8 path".to_owned() });
            };
            if !link_stays_inside(&rel, link) {
                return Err(CacheError::Refused {
                    path: rel,
                    reason: format!(
                        "is a symlink to {link:?}, outside the checkout (only relative links inside it are kept)"
                    ),
                });
            }
            OutputFile { path: rel.clone(), mode: mode_of(&meta), link: link.to_owned(), ..OutputFile::default() }
        } else if kind.is_file() {
            let mut file = File::open(&path).map_err(io_error("open", &path))?;
            let (digest, size) = hash_reader(&mut file, cancel).map_err(|err| err.at("read", &path))?;
            OutputFile { path: rel.clone(), mode: mode_of(&meta), digest, size, ..OutputFile::default() }
        } else if kind.is_dir() {
            let mut empty = true;
            for child in fs::read_dir(&path).map_err(io_error("list", &path))? {
                let child = child.map_err(io_error("list", &path))?;
                let name = child.file_name();
                let Some(name) = name.to_str() else {
                    return Err(CacheError::Refused {
                        path: format!("{rel}/{}", name.to_string_lossy()),
                        reason: "is not a UTF-8 name".to_owned(),
                    });
                };
                empty = false;
                stack.push(format!("{rel}/{name}"));
            }
            if !empty {
                continue;
            }
            OutputFile { path: rel.clone(), mode: mode_of(&meta), dir: true, ..OutputFile::default() }
        } else {
            return Err(CacheError::Refused {
                path: rel,
                reason: "is not a regular file, directory or symlink".to_owned(),
            });
        };
        found.insert(rel, entry);
    }
    Ok(())
}

/// Why streaming a file failed: an I/O error (placed by the caller) or a cancel.
enum StreamError {
    Io(io::Error),
    Cancelled,
}

impl StreamError {
    fn at(self, action: &'static str, path: &Path) -> CacheError {
        match self {
            StreamError::Io(source) => CacheError::Io { action, path: path.to_owned(), source },
            StreamError::Cancelled => CacheError::Cancelled,
        }
    }
}

/// Digest and size of everything `reader` yields, read in [`BUFFER`] pieces.
fn hash_reader(reader: &mut impl Read, cancel: &CancellationToken) -> Result<(String, u64), StreamError> {
    copy_hashing(reader, &mut io::sink(), cancel).map_err(|(err, _)| err)
}

/// Copies `reader` to `writer`, hashing on the way; the error says which side failed
/// (`true`: the writer).
fn copy_hashing(
    reader: &mut impl Read,
    writer: &mut impl Write,
    cancel: &CancellationToken,
) -> Result<(String, u64), (StreamError, bool)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUFFER];
    let mut size = 0u64;
    loop {
        if cancel.is_cancelled() {
            return Err((StreamError::Cancelled, false));
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err((StreamError::Io(err), false)),
        };
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n]).map_err(|err| (StreamError::Io(err), true))?;
        size += n as u64;
    }
    Ok((finish_digest(hasher), size))
}

// ---------------------------------------------------------------------------------------------
// The local blob store

/// Blobs this worker fetched or uploaded, by digest: `<work dir>/.rbb-cache/blobs/<2 hex>/<64
/// hex>`, uncompressed. Each is written to a temporary file, checked against its size and
/// digest, then renamed into place, so a blob's name always matches its content when it was
/// written; it is checked again whenever it is restored. A blob's modification time is when
/// it was last stored or restored: [`BlobStore::trim`] removes the oldest past the limit.
#[derive(Debug, Clone)]
pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
    /// Bytes the blobs may take before [`BlobStore::trim`] removes some.
    limit: u64,
    /// Bytes of the blobs, counted at open and as blobs are added (exact again after a trim).
    bytes: Arc<AtomicU64>,
    /// One trim at a time.
    trimming: Arc<Mutex<()>>,
}

/// One blob in the store, for a trim.
struct Held {
    used: SystemTime,
    size: u64,
    path: PathBuf,
}

impl BlobStore {
    /// The store of the work directory `workdir`, made if missing, holding at most about
    /// `limit` bytes; temporary files an earlier run left are removed (only one worker uses a
    /// work directory at a time).
    pub fn open(workdir: &Path, limit: u64) -> Result<BlobStore, CacheError> {
        let root = workdir.join(CACHE_DIR);
        let store = BlobStore {
            blobs: root.join("blobs"),
            tmp: root.join("tmp"),
            limit,
            bytes: Arc::new(AtomicU64::new(0)),
            trimming: Arc::new(Mutex::new(())),
        };
        if store.tmp.exists() {
            remove_all(&store.tmp)?;
        }
        for dir in [&store.blobs, &store.tmp] {
            fs::create_dir_all(dir).map_err(io_error("create", dir))?;
        }
        let held: u64 = store.held()?.iter().map(|h| h.size).sum();
        store.bytes.store(held, Ordering::Relaxed);
        Ok(store)
    }

    /// Bytes the blobs take (as counted; exact after [`BlobStore::open`] and a trim).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Every blob in the store.
    fn held(&self) -> Result<Vec<Held>, CacheError> {
        let mut held = Vec::new();
        for dir in fs::read_dir(&self.blobs).map_err(io_error("list", &self.blobs))? {
            let dir = dir.map_err(io_error("list", &self.blobs))?.path();
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_file() {
                    let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    held.push(Held { used, size: meta.len(), path: entry.path() });
                }
            }
        }
        Ok(held)
    }

    /// When the blobs take more than the limit, removes the least recently stored or restored
    /// ones down to 90% of it; returns how many went. A restore that needed one of them fails
    /// and its step runs.
    pub fn trim(&self) -> Result<usize, CacheError> {
        if self.bytes() <= self.limit {
            return Ok(0);
        }
        let _one = self.trimming.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut held = self.held()?;
        held.sort_by_key(|h| h.used);
        let mut total: u64 = held.iter().map(|h| h.size).sum();
        let target = self.limit / 10 * 9;
        let mut removed = 0;
        for h in &held {
            if total <= target {
                break;
            }
            match fs::remove_file(&h.path) {
                Ok(()) => {
                    total -= h.size;
                    removed += 1;
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => total -= h.size,
                Err(source) => return Err(CacheError::Io { action: "remove", path: h.path.clone(), source }),
            }
        }
        self.bytes.store(total, Ordering::Relaxed);
        Ok(removed)
    }

    /// Where the blob `digest` lives (it may not be there).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        let hex = digest_hex(digest).ok_or_else(|| CacheError::BadDigest { digest: digest.to_owned() })?;
        Ok(self.blobs.join(&hex[..2]).join(hex))
    }

    /// Whether the blob is here with the expected size (its content is checked on use).
    pub fn contains(&self, digest: &str, size: u64) -> bool {
        self.blob_path(digest).is_ok_and(|path| fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size))
    }

    /// Removes the blob (a corrupt one, so that it is fetched again).
    pub fn remove(&self, digest: &str) {
        if let Ok(path) = self.blob_path(digest)
            && let Err(err) = fs::remove_file(&path)
            && err.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %path.display(), %err, "cannot remove a corrupt cache blob");
        }
    }

    /// A fresh path in the store's temporary directory.
    fn temp_path(&self, what: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{what}-{}-{n}", std::process::id()))
    }

    /// Copies `src` into the store as the blob `digest` of `size` bytes, unless the store has
    /// it. The copy is hashed on the way: a file that no longer has this content is refused.
    pub fn add_file(&self, src: &Path, digest: &str, size: u64, cancel: &CancellationToken) -> Result<(), CacheError> {
        let dest = self.blob_path(digest)?;
        if self.contains(digest, size) {
            return Ok(());
        }
        let tmp = TempPath::new(self.temp_path("add"));
        let mut input = File::open(src).map_err(io_error("open", src))?;
        let mut output = File::create(tmp.path()).map_err(io_error("create", tmp.path()))?;
        let (got, got_size) = copy_hashing(&mut input, &mut output, cancel)
            .map_err(|(err, writing)| if writing { err.at("write", tmp.path()) } else { err.at("read", src) })?;
        if got != digest || got_size != size {
            return Err(CacheError::Changed { path: src.display().to_string() });
        }
        drop(output);
        tmp.persist(&dest)?;
        self.bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Copies the blob to `dest` (a new file), checking its size and digest on the way. A blob
    /// that does not match is removed from the store and reported as corrupt.
    fn copy_out(&self, digest: &str, size: u64, dest: &Path, cancel: &CancellationToken) -> Result<(), CacheError> {
        let src = self.blob_path(digest)?;
        let mut input = File::open(&src).map_err(io_error("open", &src))?;
        let mut output = File::create_new(dest).map_err(io_error("create", dest))?;
        let (got, got_size) = copy_hashing(&mut input, &mut output, cancel)
            .map_err(|(err, writing)| if writing { err.at("write", dest) } else { err.at("read", &src) })?;
        if got != digest || got_size != size {
            self.remove(digest);
            return Err(CacheError::Corrupt {
                digest: digest.to_owned(),
                where_: "in the worker's store",
                reason: format!("it holds {got_size} bytes with digest {got}"),
            });
        }
        // Restored now: the last a trim removes.
        if let Err(err) = input.set_modified(SystemTime::now()) {
            debug!(path = %src.display(), %err, "cannot mark a cache blob as used");
        }
        Ok(())
    }
}

/// A temporary file removed on drop unless persisted.
struct TempPath(Option<PathBuf>);

impl TempPath {
    fn new(path: PathBuf) -> TempPath {
        TempPath(Some(path))
    }

    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// Renames the file to `dest` (its directory made if missing).
    fn persist(mut self, dest: &Path) -> Result<(), CacheError> {
        let Some(tmp) = self.0.take() else {
            return Ok(());
        };
        let renamed = dest
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| fs::rename(&tmp, dest))
            .map_err(io_error("store", dest));
        if renamed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        renamed
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Restoring an entry

/// What a restore put into the checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Regular files and symlinks.
    pub files: usize,
    /// Bytes of the regular files.
    pub bytes: u64,
}

/// Checks an entry's file list against the step's output patterns: valid paths, each inside
/// some pattern, one kind each, valid digests and links, no path inside another entry.
fn check_entry(patterns: &[Pattern], files: &[OutputFile]) -> Result<(), CacheError> {
    let bad = |reason: String| Err(CacheError::BadEntry { reason });
    let mut paths = BTreeSet::new();
    for f in files {
        if !valid_path(&f.path) {
            return bad(format!("path {:?} is not a plain relative path", f.path));
        }
        if !patterns.iter().any(|p| p.covers(&f.path)) {
            return bad(format!("{} is not in the step's outputs", f.path));
        }
        let kinds = usize::from(f.dir) + usize::from(!f.link.is_empty()) + usize::from(!f.digest.is_empty());
        if kinds != 1 {
            return bad(format!("{} is not exactly one of a file, a symlink or an empty directory", f.path));
        }
        if !f.digest.is_empty() && digest_hex(&f.digest).is_none() {
            return bad(format!("{} has an invalid digest {:?}", f.path, f.digest));
        }
        if !f.link.is_empty() && !link_stays_inside(&f.path, &f.link) {
            return bad(format!("{} is a symlink to {:?}, outside the checkout", f.path, f.link));
        }
        if !paths.insert(f.path.as_str()) {
            return bad(format!("{} is listed twice", f.path));
        }
    }
    for f in files {
        let mut ancestor = f.path.as_str();
        while let Some((parent, _)) = ancestor.rsplit_once('/') {
            if paths.contains(parent) {
                return bad(format!("{} lies inside {parent}, which is itself an entry", f.path));
            }
            ancestor = parent;
        }
    }
    Ok(())
}

/// Puts the entry `files` into `checkout`: every blob is first copied out of `store` into a
/// staging directory and checked (size and digest); only then is whatever exists at the
/// `patterns` removed and the entry put in its place (files renamed from staging, modes set,
/// symlinks and empty directories made). Every blob must be in the store. A failure before
/// the swap leaves the checkout as it was; a corrupt blob is removed from the store
/// ([`CacheError::Corrupt`]) so that it can be fetched again.
pub fn restore(
    checkout: &Path,
    patterns: &[String],
    files: &[OutputFile],
    store: &BlobStore,
    cancel: &CancellationToken,
) -> Result<Restored, CacheError> {
    let patterns = Pattern::parse_all(patterns)?;
    check_entry(&patterns, files)?;
    let staging = store.temp_path("restore");
    fs::create_dir(&staging).map_err(io_error("create", &staging))?;
    let result = restore_staged(checkout, &patterns, files, store, &staging, cancel);
    if let Err(err) = remove_all(&staging) {
        warn!(%err, "cannot remove a restore's staging directory");
    }
    result
}

fn restore_staged(
    checkout: &Path,
    patterns: &[Pattern],
    files: &[OutputFile],
    store: &BlobStore,
    staging: &Path,
    cancel: &CancellationToken,
) -> Result<Restored, CacheError> {
    let mut restored = Restored { files: 0, bytes: stage_all(files, store, staging, cancel)? };

    // What goes away first: everything the patterns match now.
    let mut doomed = BTreeSet::new();
    for pattern in patterns {
        doomed.extend(pattern.matches(checkout)?);
    }
    // Every directory an entry needs is there, missing, or among what goes away: nothing is
    // removed unless the whole entry can be put in place. Directories are walked from the top,
    // so the first one that goes away or is missing ends the walk.
    let mut directories = BTreeSet::new();
    for f in files {
        let mut parent = String::new();
        let comps: Vec<&str> = f.path.split('/').collect();
        for comp in &comps[..comps.len() - 1] {
            parent = join_rel(&parent, comp);
            if doomed.contains(&parent) {
                break;
            }
            if directories.contains(&parent) {
                continue;
            }
            match fs::symlink_metadata(checkout.join(&parent)) {
                Ok(meta) if meta.is_dir() => {
                    directories.insert(parent.clone());
                }
                Ok(_) => {
                    return Err(CacheError::Refused {
                        path: parent,
                        reason: format!("is not a directory, and {} must be restored inside it", f.path),
                    });
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => break,
                Err(source) => return Err(CacheError::Io { action: "read", path: checkout.join(parent), source }),
            }
        }
    }
    if cancel.is_cancelled() {
        return Err(CacheError::Cancelled);
    }

    for rel in &doomed {
        remove_all(&checkout.join(rel))?;
    }
    for (i, f) in files.iter().enumerate() {
        let dest = checkout.join(&f.path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_error("create", parent))?;
        }
        if f.dir {
            fs::create_dir(&dest).map_err(io_error("create", &dest))?;
            fs::set_permissions(&dest, fs::Permissions::from_mode(f.mode & 0o777))
                .map_err(io_error("set the mode of", &dest))?;
        } else if !f.link.is_empty() {
            symlink(&f.link, &dest).map_err(io_error("create the symlink", &dest))?;
            restored.files += 1;
        } else {
            let staged = staging.join(i.to_string());
            move_file(&staged, &dest)?;
            restored.files += 1;
        }
    }
    Ok(restored)
}

/// Copies every regular file of `files` out of the store into `staging/<index>` with its
/// mode, on a few threads (checking digests is CPU work); returns the bytes staged. The first
/// error stops the others.
fn stage_all(
    files: &[OutputFile],
    store: &BlobStore,
    staging: &Path,
    cancel: &CancellationToken,
) -> Result<u64, CacheError> {
    let work: Vec<(usize, &OutputFile)> = files.iter().enumerate().filter(|(_, f)| !f.digest.is_empty()).collect();
    let threads = std::thread::available_parallelism().map_or(1, usize::from).clamp(1, STAGING_THREADS).min(work.len());
    let next = AtomicUsize::new(0);
    let stop = cancel.child_token();
    let first_error: Mutex<Option<CacheError>> = Mutex::new(None);
    let stage = |i: usize, f: &OutputFile| -> Result<(), CacheError> {
        let staged = staging.join(i.to_string());
        store.copy_out(&f.digest, f.size, &staged, &stop)?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(f.mode & 0o777))
            .map_err(io_error("set the mode of", &staged))
    };
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while let Some((i, f)) = work.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if stop.is_cancelled() {
                        return;
                    }
                    if let Err(err) = stage(*i, f) {
                        let mut first = first_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        // A cancel is reported below; one caused by stopping the others is no reason.
                        if first.is_none() && !matches!(err, CacheError::Cancelled) {
                            *first = Some(err);
                        }
                        stop.cancel();
                        return;
                    }
                }
            });
        }
    });
    if let Some(err) = first_error.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Err(err);
    }
    if cancel.is_cancelled() {
        return Err(CacheError::Cancelled);
    }
    Ok(work.iter().map(|(_, f)| f.size).sum())
}

/// Renames `from` to `to` (a new path), copying when they are on different filesystems.
fn move_file(from: &Path, to: &Path) -> Result<(), CacheError> {
    if fs::symlink_metadata(to).is_ok() {
        return Err(CacheError::Refused { path: to.display().to_string(), reason: "already exists".to_owned() });
    }
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::CrossesDevices => {
            fs::copy(from, to).map(|_| ()).map_err(io_error("copy to", to))
        }
        Err(source) => Err(CacheError::Io { action: "move a restored file to", path: to.to_owned(), source }),
    }
}

/// Removes a file, symlink (not its target) or directory tree; directories without write
/// permission are made writable first. A missing path is fine.
fn remove_all(path: &Path) -> Result<(), CacheError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(CacheError::Io { action: "read", path: path.to_owned(), source }),
    };
    if !meta.is_dir() {
        return fs::remove_file(path).map_err(io_error("remove", path));
    }
    if fs::remove_dir_all(path).is_ok() {
        return Ok(());
    }
    // Read-only directories (a tool's cache, say): open them up, then try again.
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }
    fs::remove_dir_all(path).map_err(io_error("remove", path))
}

// ---------------------------------------------------------------------------------------------
// The cache calls

/// The cache calls to the master, on the session's channel and with its metadata (protocol
/// version, worker name, bearer token).
#[derive(Clone)]
pub struct CacheClient {
    client: WorkerClient<Channel>,
    metadata: Vec<(&'static str, AsciiMetadataValue)>,
}

impl std::fmt::Debug for CacheClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheClient").finish_non_exhaustive()
    }
}

impl CacheClient {
    /// Calls go over `channel` with each of `metadata` set.
    pub fn new(channel: Channel, metadata: Vec<(&'static str, AsciiMetadataValue)>) -> CacheClient {
        CacheClient { client: WorkerClient::new(channel).max_decoding_message_size(MAX_ANSWER), metadata }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        for (key, value) in &self.metadata {
            request.metadata_mut().insert(*key, value.clone());
        }
        request
    }

    /// May this lease's step be reused?
    pub async fn lookup(&self, query: CacheQuery) -> Result<CacheAnswer, CacheError> {
        let mut client = self.client.clone();
        let mut request = self.request(query);
        request.set_timeout(LOOKUP_TIMEOUT);
        match tokio::time::timeout(LOOKUP_TIMEOUT, client.lookup(request)).await {
            Ok(answer) => Ok(answer.map_err(rpc_error("Lookup"))?.into_inner()),
            Err(_) => Err(CacheError::Timeout { call: "Lookup", limit: LOOKUP_TIMEOUT }),
        }
    }

    /// Which of `digests` the master lacks (only those asked about are kept).
    pub async fn missing_blobs(&self, digests: Vec<String>) -> Result<BTreeSet<String>, CacheError> {
        let asked: BTreeSet<String> = digests.iter().cloned().collect();
        let mut client = self.client.clone();
        let mut request = self.request(BlobList { digests });
        request.set_timeout(MISSING_TIMEOUT);
        let answer = match tokio::time::timeout(MISSING_TIMEOUT, client.missing_blobs(request)).await {
            Ok(answer) => answer.map_err(rpc_error("MissingBlobs"))?.into_inner(),
            Err(_) => return Err(CacheError::Timeout { call: "MissingBlobs", limit: MISSING_TIMEOUT }),
        };
        Ok(answer.digests.into_iter().filter(|d| asked.contains(d)).collect())
    }

    /// Fetches the blob `digest` of `size` bytes into `store`, checking size and digest as it
    /// streams into a temporary file.
    pub async fn fetch(&self, store: &BlobStore, digest: &str, size: u64) -> Result<(), CacheError> {
        let dest = store.blob_path(digest)?;
        let mut client = self.client.clone();
        let request = self.request(BlobRef { digest: digest.to_owned() });
        let timed_out = || CacheError::Timeout { call: "GetBlob", limit: STREAM_IDLE };
        let mut stream = tokio::time::timeout(STREAM_IDLE, client.get_blob(request))
            .await
            .map_err(|_| timed_out())?
            .map_err(rpc_error("GetBlob"))?
            .into_inner();
        let tmp = TempPath::new(store.temp_path("fetch"));
        let mut file = tokio::fs::File::create(tmp.path()).await.map_err(io_error("create", tmp.path()))?;
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        let corrupt =
            |reason: String| CacheError::Corrupt { digest: digest.to_owned(), where_: "as the master sent it", reason };
        while let Some(chunk) = tokio::time::timeout(STREAM_IDLE, stream.message())
            .await
            .map_err(|_| timed_out())?
            .map_err(rpc_error("GetBlob"))?
        {
            if !chunk.digest.is_empty() && chunk.digest != digest {
                return Err(corrupt(format!("a chunk names blob {}", chunk.digest)));
            }
            got += chunk.data.len() as u64;
            if got > size {
                return Err(corrupt(format!("more than the {size} bytes expected")));
            }
            hasher.update(&chunk.data);
            file.write_all(&chunk.data).await.map_err(io_error("write", tmp.path()))?;
        }
        file.flush().await.map_err(io_error("write", tmp.path()))?;
        drop(file);
        let computed = finish_digest(hasher);
        if got != size || computed != digest {
            return Err(corrupt(format!("{got} bytes with digest {computed}, expected {size} bytes")));
        }
        tmp.persist(&dest)?;
        store.bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Uploads the blob `digest` of `size` bytes from `store`: the first message names the
    /// digest and size, data follows in chunks of at most 1 MiB read from the file.
    pub async fn put(&self, store: &BlobStore, digest: &str, size: u64) -> Result<u64, CacheError> {
        let path = store.blob_path(digest)?;
        let file = tokio::fs::File::open(&path).await.map_err(io_error("open", &path))?;
        let failure: Arc<Mutex<Option<io::Error>>> = Arc::new(Mutex::new(None));
        let stream = blob_chunks(file, digest.to_owned(), size, Arc::clone(&failure));
        let mut client = self.client.clone();
        let limit = upload_limit(size);
        let sent = tokio::time::timeout(limit, client.put_blob(self.request(stream)))
            .await
            .map_err(|_| CacheError::Timeout { call: "PutBlob", limit })?;
        if let Some(source) = failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            return Err(CacheError::Io { action: "read", path, source });
        }
        Ok(sent.map_err(rpc_error("PutBlob"))?.into_inner().stored_bytes)
    }
}

/// How long an upload of `size` bytes may take: [`STREAM_IDLE`], plus a second per MiB (a
/// master that stops reading must not hold the step's slot forever).
fn upload_limit(size: u64) -> Duration {
    STREAM_IDLE + Duration::from_secs(size >> 20)
}

/// The PutBlob stream of a file: the first message carries digest and size (and the first
/// chunk, or nothing for an empty file). A read error ends the stream early and is kept in
/// `failure`.
fn blob_chunks(
    file: tokio::fs::File,
    digest: String,
    size: u64,
    failure: Arc<Mutex<Option<io::Error>>>,
) -> impl futures::Stream<Item = BlobData> + Send + 'static {
    futures::stream::unfold(Some((file, true)), move |state| {
        let digest = digest.clone();
        let failure = Arc::clone(&failure);
        async move {
            let (mut file, first) = state?;
            let mut data = vec![0u8; MAX_CHUNK];
            let mut filled = 0;
            while filled < data.len() {
                match file.read(&mut data[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        *failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(err);
                        return None;
                    }
                }
            }
            data.truncate(filled);
            if filled == 0 && !first {
                return None;
            }
            let message =
                if first { BlobData { digest, size, data } } else { BlobData { data, ..BlobData::default() } };
            let next = (filled > 0).then_some((file, false));
            Some((message, next))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Around a leased step

/// A step's values of its `pass_env` names on this worker (`None`: unset), read once so the
/// Lookup and the step see the same.
pub fn pass_env_values(names: &[String]) -> BTreeMap<String, Option<OsString>> {
    names
        .iter()
        .map(|name| {
            let usable = !name.is_empty() && !name.contains(['=', '\0']);
            (name.clone(), if usable { std::env::var_os(name) } else { None })
        })
        .collect()
}

/// What the step's cache needs around one lease.
pub(crate) struct StepCache<'a> {
    pub client: &'a CacheClient,
    pub store: &'a BlobStore,
    pub executor: &'a dyn Executor,
    pub lease: &'a Lease,
    pub outputs: &'a [String],
    pub checkout: &'a Path,
    pub pass_env: &'a BTreeMap<String, Option<OsString>>,
    pub out: &'a mpsc::Sender<Output>,
    pub cancel: &'a CancellationToken,
}

/// What Lookup answered for a step that then runs: its outputs may be stored under that key.
#[derive(Debug, Clone)]
pub(crate) struct Answered {
    pub key: String,
    pub image_digest: String,
}

/// The cache's decision before a step runs.
pub(crate) enum Before {
    /// Reused: the outputs are in the checkout; the step is not run.
    Restored(StepOutcome),
    /// Run the step; `Some` when Lookup answered (its outputs may then be stored).
    Run(Option<Answered>),
    /// A Cancel came while the cache was working.
    Cancelled,
}

/// What became of a successful step's outputs.
pub(crate) enum After {
    /// Uploaded and reported (possibly no file at all).
    Stored(Vec<OutputFile>),
    /// Not stored; the log says why.
    NotStored,
    Cancelled,
}

async fn header(out: &mpsc::Sender<Output>, line: String) {
    let _ = out.send(Output::Header(format!("# {line}\n").into_bytes())).await;
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 20))
}

/// Runs `work` until it ends or `cancel` fires.
async fn cancellable<T>(
    cancel: &CancellationToken,
    work: impl Future<Output = Result<T, CacheError>>,
) -> Result<T, CacheError> {
    tokio::select! {
        result = work => result,
        () = cancel.cancelled() => Err(CacheError::Cancelled),
    }
}

/// Runs blocking file work on the blocking pool and waits for it to end (it watches `cancel`
/// itself, so a Cancel stops it promptly, and nothing touches the checkout afterwards).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(err) => Err(CacheError::Aborted { reason: err.to_string() }),
    }
}

impl StepCache<'_> {
    /// Lookup, then on a hit the restore. Every failure is a header line and the step runs.
    pub(crate) async fn before(&self) -> Before {
        let image_digest = if self.lease.image.is_empty() {
            String::new()
        } else {
            let resolved = tokio::select! {
                resolved = self.executor.image_digest(&self.lease.image) => resolved,
                () = self.cancel.cancelled() => return Before::Cancelled,
            };
            match resolved {
                // Without it the key would not tell one image from another.
                Ok(digest) if digest.is_empty() => {
                    let image = &self.lease.image;
                    header(self.out, format!("cache not used: the engine gives no digest for image `{image}`")).await;
                    return Before::Run(None);
                }
                Ok(digest) => digest,
                Err(reason) => {
                    header(self.out, format!("cache not used: {reason}")).await;
                    return Before::Run(None);
                }
            }
        };
        let query = CacheQuery {
            lease: self.lease.lease,
            pass_env: self
                .pass_env
                .iter()
                .map(|(name, value)| {
                    (name.clone(), value.as_ref().map(|v| sha256_of(v.as_bytes())).unwrap_or_default())
                })
                .collect(),
            image_digest: image_digest.clone(),
        };
        let answer = match cancellable(self.cancel, self.client.lookup(query)).await {
            Ok(answer) => answer,
            Err(CacheError::Cancelled) => return Before::Cancelled,
            Err(err) => {
                warn!(%err, "cache lookup failed");
                header(self.out, format!("cache lookup failed, running the step: {err}")).await;
                return Before::Run(None);
            }
        };
        if digest_hex(&answer.key).is_none() {
            header(self.out, format!("cache lookup answered an invalid key {:?}, running the step", answer.key)).await;
            return Before::Run(None);
        }
        let answered = Answered { key: answer.key.clone(), image_digest };
        if !answer.hit {
            info!(key = %answer.key, "cache miss");
            header(self.out, format!("cache miss {}", answer.key)).await;
            return Before::Run(Some(answered));
        }
        let start = Instant::now();
        match self.reuse(&answer).await {
            Ok(restored) => {
                let took = start.elapsed();
                info!(key = %answer.key, source = %answer.source, files = restored.files, "cache hit");
                header(
                    self.out,
                    format!(
                        "cache hit {}: reused from {}; restored {} files, {} MiB in {} ms",
                        answer.key,
                        answer.source,
                        restored.files,
                        mib(restored.bytes),
                        took.as_millis()
                    ),
                )
                .await;
                Before::Restored(StepOutcome {
                    result: StepResult::Success,
                    exit_code: None,
                    reason: String::new(),
                    duration: took,
                    image_digest: answered.image_digest,
                })
            }
            Err(CacheError::Cancelled) => Before::Cancelled,
            Err(err) => {
                warn!(key = %answer.key, %err, "cache hit not restored; running the step");
                header(self.out, format!("cache hit {} not restored, running the step: {err}", answer.key)).await;
                Before::Run(Some(answered))
            }
        }
    }

    /// Fetches what the store lacks, then restores; a blob found corrupt in the store is
    /// fetched again once.
    async fn reuse(&self, answer: &CacheAnswer) -> Result<Restored, CacheError> {
        let mut refetched = BTreeSet::new();
        loop {
            let mut wanted: BTreeMap<&str, u64> = BTreeMap::new();
            for f in answer.files.iter().filter(|f| !f.digest.is_empty()) {
                wanted.insert(&f.digest, f.size);
            }
            for (digest, size) in wanted {
                if !self.store.contains(digest, size) {
                    debug!(digest, size, "fetching a cache blob");
                    cancellable(self.cancel, self.client.fetch(self.store, digest, size)).await?;
                }
            }
            let (checkout, outputs, files, store, cancel) = (
                self.checkout.to_owned(),
                self.outputs.to_vec(),
                answer.files.clone(),
                self.store.clone(),
                self.cancel.clone(),
            );
            let restored = blocking(move || restore(&checkout, &outputs, &files, &store, &cancel)).await;
            self.trim().await;
            match restored {
                Err(CacheError::Corrupt { digest, .. }) if refetched.insert(digest.clone()) => {
                    warn!(%digest, "a blob in the worker's store was corrupt; fetching it again");
                    header(
                        self.out,
                        format!("cache blob {digest} was corrupt in the worker's store; fetching it again"),
                    )
                    .await;
                }
                result => return result,
            }
        }
    }

    /// Keeps the local store within its limit (after this step's blobs are in place).
    async fn trim(&self) {
        let store = self.store.clone();
        match blocking(move || store.trim()).await {
            Ok(0) => {}
            Ok(removed) => info!(removed, bytes = self.store.bytes(), "trimmed the worker's cache store"),
            Err(err) => warn!(%err, "cannot trim the worker's cache store"),
        }
    }

    /// After a SUCCESS: collect, ask what the master lacks, copy those into the store and
    /// upload them. Every failure is a header line and nothing is reported.
    pub(crate) async fn after(&self, answered: Option<&Answered>, outcome: &StepOutcome) -> After {
        let Some(answered) = answered else {
            header(self.out, "outputs not stored in the cache: the cache lookup did not answer".to_owned()).await;
            return After::NotStored;
        };
        if !self.lease.image.is_empty() && outcome.image_digest != answered.image_digest {
            header(
                self.out,
                format!(
                    "outputs not stored in the cache: the step ran in image {} but its key has {}",
                    outcome.image_digest, answered.image_digest
                ),
            )
            .await;
            return After::NotStored;
        }
        match self.upload().await {
            Ok((files, uploaded, uploaded_bytes)) => {
                let bytes: u64 = files.iter().map(|f| f.size).sum();
                header(
                    self.out,
                    format!(
                        "outputs stored in the cache under {}: {} entries, {} MiB ({uploaded} blobs, {} MiB uploaded)",
                        answered.key,
                        files.len(),
                        mib(bytes),
                        mib(uploaded_bytes)
                    ),
                )
                .await;
                After::Stored(files)
            }
            Err(CacheError::Cancelled) => After::Cancelled,
            Err(err) => {
                warn!(%err, "outputs not stored in the cache");
                header(self.out, format!("outputs not stored in the cache: {err}")).await;
                After::NotStored
            }
        }
    }

    /// The files, how many blobs were uploaded, and their bytes.
    async fn upload(&self) -> Result<(Vec<OutputFile>, usize, u64), CacheError> {
        let (checkout, outputs, cancel) = (self.checkout.to_owned(), self.outputs.to_vec(), self.cancel.clone());
        let files = blocking(move || collect_outputs(&checkout, &outputs, &cancel)).await?;
        // One file per digest to copy it from.
        let mut blobs: BTreeMap<String, (String, u64)> = BTreeMap::new();
        for f in files.iter().filter(|f| !f.digest.is_empty()) {
            blobs.entry(f.digest.clone()).or_insert_with(|| (f.path.clone(), f.size));
        }
        if blobs.is_empty() {
            return Ok((files, 0, 0));
        }
        let missing = cancellable(self.cancel, self.client.missing_blobs(blobs.keys().cloned().collect())).await?;
        let mut uploaded_bytes = 0;
        for digest in &missing {
            let Some((path, size)) = blobs.get(digest).cloned() else { continue };
            let (src, store, cancel, owned) =
                (self.checkout.join(&path), self.store.clone(), self.cancel.clone(), digest.clone());
            blocking(move || store.add_file(&src, &owned, size, &cancel)).await?;
            cancellable(self.cancel, self.client.put(self.store, digest, size)).await?;
            uploaded_bytes += size;
        }
        self.trim().await;
        Ok((files, missing.len(), uploaded_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_read_lexically() {
        assert!(link_stays_inside("out/a", "b"));
        assert!(link_stays_inside("out/a", "../src/x"));
        assert!(link_stays_inside("out/sub/a", "../.."));
        assert!(!link_stays_inside("out/a", "../.."));
        assert!(!link_stays_inside("a", ".."));
        assert!(!link_stays_inside("out/a", "/etc/passwd"));
        assert!(!link_stays_inside("out/a", ""));
    }

    #[test]
    fn patterns_are_relative_and_inside() {
        for bad in ["/abs", "..", "a/../b", "", ".", "./", ".git", ".git/config"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} accepted");
        }
        let p = Pattern::parse("./out//bin/").unwrap();
        assert_eq!(p.prefix, ["out", "bin"]);
        assert!(p.glob.is_none());
        assert!(p.covers("out/bin") && p.covers("out/bin/x") && !p.covers("out/binx") && !p.covers("out"));
        let g = Pattern::parse("out/*.o").unwrap();
        assert_eq!(g.prefix, ["out"]);
        assert!(g.covers("out/a.o") && g.covers("out/a.o/inner") && !g.covers("out/sub/a.o"));
        let deep = Pattern::parse("**/*.o").unwrap();
        assert!(deep.prefix.is_empty() && deep.covers("a.o") && deep.covers("x/y/a.o"));
    }

    #[test]
    fn unusable_pass_env_names_are_unset() {
        let names: Vec<String> = ["", "A=B", "NUL\0", "PATH"].iter().map(|n| (*n).to_owned()).collect();
        let values = pass_env_values(&names);
        assert_eq!(values.len(), 4);
        assert!(values[""].is_none() && values["A=B"].is_none() && values["NUL\0"].is_none());
        assert_eq!(values["PATH"], std::env::var_os("PATH"));
    }

    #[test]
    fn digests_are_checked() {
        assert_eq!(sha256_of(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert!(digest_hex(&sha256_of(b"x")).is_some());
        for bad in ["", "sha256:", "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855", "md5:00"]
        {
            assert!(digest_hex(bad).is_none(), "{bad:?}");
        }
    }
}
