//! The full cache key of a step (docs/cache-key.md): its manifest, canonical encoding and
//! hash, the git ids of its inputs, and what differs between two manifests.
//!
//! Inputs are resolved from the master's bare mirror at the commit being built: a literal
//! path is the id and mode of its tree entry (or nothing), a glob the sorted entries it
//! matches. No file is read or hashed: git already named every blob and tree by content.
//! This module decides nothing about builds (whether a step is cacheable, what a hit
//! restores); it only says what a step's key is and why two keys differ.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use gix::bstr::ByteSlice;
use gix::hash::ObjectId;
use gix::objs::tree::EntryKind;
use rbb_compiler::cache_key::{canonical_json, document_changes, sha256};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Identifies the manifest's encoding; bump it when its fields or their meaning change.
pub const FULL_KEY_FORMAT: &str = "rbb-step-full-key/1";

/// Repositories each resolver keeps open per thread.
const DEFAULT_OPEN_REPOS: usize = 8;
/// Repositories kept open per thread by all resolvers together.
const MAX_OPEN_REPOS_PER_THREAD: usize = 64;
/// Bytes of decoded objects each open repository keeps.
const OBJECT_CACHE_BYTES: usize = 8 << 20;
/// Compiled globs a resolver keeps (all threads together); more empty the cache.
const MAX_GLOBS: usize = 4096;
/// Matched paths a `changed` line names before it says how many more there are.
const NAMED_PATHS: usize = 5;

/// What went wrong resolving a step's inputs, naming the repository, commit and pattern.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("input `{pattern}` {reason}")]
    Pattern { pattern: String, reason: &'static str },
    #[error("input `{pattern}` is not a valid glob")]
    Glob {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("cannot open the git repository at {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<gix::Error>,
    },
    #[error("commit {commit} is not in the git repository at {}: {message}", path.display())]
    Commit { path: PathBuf, commit: String, message: String },
    #[error("cannot read {what} of commit {commit} in the git repository at {}: {message}", path.display())]
    Read { path: PathBuf, commit: String, what: String, message: String },
}

/// The id and kind of one tree entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The git object id, lowercase hex (a blob, a tree, or a submodule's commit).
    pub id: String,
    /// The git mode, six octal digits: `100644` file, `100755` executable, `120000` symlink,
    /// `040000` directory, `160000` submodule.
    pub mode: String,
}

/// One tree entry a glob matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Match {
    /// Relative to the repository root, `/`-separated.
    pub path: String,
    pub id: String,
    pub mode: String,
}

/// One declared input, resolved at a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Input {
    /// A literal path: the entry there, or `None` when the commit has none.
    Path {
        /// As declared.
        pattern: String,
        /// Normalised: no `./`, no empty or `.` components, no trailing `/`; `.` is the root.
        path: String,
        entry: Option<Entry>,
    },
    /// A glob: every entry it matches, sorted by path (empty when it matches nothing). A
    /// directory it matches counts whole (its tree id).
    Glob {
        /// As declared.
        pattern: String,
        /// Normalised like a path.
        glob: String,
        matches: Vec<Match>,
    },
}

impl Input {
    /// The pattern as declared.
    pub fn pattern(&self) -> &str {
        match self {
            Input::Path { pattern, .. } | Input::Glob { pattern, .. } => pattern,
        }
    }
}

/// Everything a step's full key is made of: stored with each execution, so "why did this
/// step run?" is the difference of two manifests ([`changed`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FULL_KEY_FORMAT`].
    pub format: String,
    /// The compiler's static key (`sha256:<hex>`).
    pub static_key: String,
    /// The step's inputs in the order declared.
    pub inputs: Vec<Input>,
    /// Each `pass_env` name → `sha256:<hex>` of its value on the worker, or `None` when unset.
    pub pass_env: BTreeMap<String, Option<String>>,
    /// The image's digest on the worker (`sha256:...`), `None` for a native step.
    pub image: Option<String>,
    /// The worker's `os/arch`.
    pub platform: String,
    /// The full key of the previous step of the same build, `None` for the first.
    pub after: Option<String>,
    /// The builder's `cache_salt`.
    pub salt: Option<String>,
    /// Grows when the builder's cache is reset.
    pub epoch: u64,
    /// Each secret the step uses → its `version` in the master config (`None`: no longer
    /// declared). Names and versions only, never a value or a hash of one. Left out of the
    /// encoding when the step uses none, so such keys are what they were before secrets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, Option<u64>>,
    /// The static key's document (what the compiler hashed into `static_key`), kept to name
    /// what changed in the definition. Not part of the hash: `static_key` already is.
    #[serde(default)]
    pub definition: Value,
}

impl Manifest {
    /// `sha256:<hex>` of the canonical JSON of every field but `definition`.
    pub fn key(&self) -> String {
        sha256(&self.canonical())
    }

    /// The canonical JSON the key hashes (docs/cache-key.md).
    pub fn canonical(&self) -> String {
        let mut doc = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut doc {
            map.remove("definition");
        }
        canonical_json(&doc)
    }
}

/// The `pass_env` of a manifest from what a worker reported (`CacheQuery.pass_env`): each
/// declared name → its reported digest, `None` when the worker reported it unset (empty) or
/// not at all. Names the step does not declare are ignored.
pub fn pass_env_digests(declared: &[String], reported: &HashMap<String, String>) -> BTreeMap<String, Option<String>> {
    declared.iter().map(|name| (name.clone(), reported.get(name).filter(|d| !d.is_empty()).cloned())).collect()
}

/// The digest a worker reports for a `pass_env` value: `sha256:<hex>` of its bytes.
pub fn env_value_digest(value: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", rbb_schema::hex(&sha2::Sha256::digest(value)))
}

/// The components of two manifests that differ, named precisely, in manifest order:
/// `format`; the fields of the definition that differ when the static keys do (`run`,
/// `env.CC`, `inputs` (the patterns), `needs`, ... or `static_key` when a manifest has no
/// definition); `inputs.<pattern>` (for a glob, with the matched paths that differ:
/// `inputs.src/*.c: src/a.c`); `pass_env.<NAME>`; `image`; `platform`; `after` (an earlier
/// step of the build changed); `salt`; `epoch`. Empty when the keys are equal.
pub fn changed(old: &Manifest, new: &Manifest) -> Vec<String> {
    if old.key() == new.key() {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    if old.format != new.format {
        out.push("format".to_owned());
    }
    if old.static_key != new.static_key {
        let fields = match (&old.definition, &new.definition) {
            (Value::Object(_), Value::Object(_)) => document_changes(&old.definition, &new.definition),
            _ => Vec::new(),
        };
        if fields.is_empty() {
            out.push("static_key".to_owned());
        }
        out.extend(fields.into_iter().filter(|f| f != "format"));
    }
    out.extend(input_changes(&old.inputs, &new.inputs));
    let names: BTreeSet<&String> = old.pass_env.keys().chain(new.pass_env.keys()).collect();
    for name in names {
        if old.pass_env.get(name) != new.pass_env.get(name) {
            out.push(format!("pass_env.{name}"));
        }
    }
    let mut field = |name: &str, differs: bool| {
        if differs {
            out.push(name.to_owned());
        }
    };
    field("image", old.image != new.image);
    field("platform", old.platform != new.platform);
    field("after", old.after != new.after);
    field("salt", old.salt != new.salt);
    field("epoch", old.epoch != new.epoch);
    let names: BTreeSet<&String> = old.secrets.keys().chain(new.secrets.keys()).collect();
    for name in names {
        if old.secrets.get(name) != new.secrets.get(name) {
            out.push(format!("secrets.{name}"));
        }
    }
    // The definition and the dynamic part can name the same field (`after`, `image`).
    let mut seen = BTreeSet::new();
    out.retain(|f| seen.insert(f.clone()));
    if out.is_empty() {
        out.push("key".to_owned());
    }
    out
}

/// `inputs.<pattern>` for each pattern whose resolution differs, matched by pattern (the
/// n-th occurrence of a pattern with the n-th), in the new order, then the patterns only the
/// old side has. `inputs` alone when only the order moved.
fn input_changes(old: &[Input], new: &[Input]) -> Vec<String> {
    if old == new {
        return Vec::new();
    }
    let mut unused: Vec<Option<&Input>> = old.iter().map(Some).collect();
    let mut out = Vec::new();
    for n in new {
        let found = unused.iter_mut().find(|o| o.is_some_and(|o| o.pattern() == n.pattern())).and_then(Option::take);
        match found {
            None => out.push(format!("inputs.{}", n.pattern())),
            Some(o) if o == n => {}
            Some(o) => out.push(describe_input_change(o, n)),
        }
    }
    out.extend(unused.into_iter().flatten().map(|o| format!("inputs.{}", o.pattern())));
    if out.is_empty() {
        out.push("inputs".to_owned());
    }
    out
}

fn describe_input_change(old: &Input, new: &Input) -> String {
    let (Input::Glob { matches: a, .. }, Input::Glob { matches: b, .. }) = (old, new) else {
        return format!("inputs.{}", new.pattern());
    };
    let before: BTreeMap<&str, &Match> = a.iter().map(|m| (m.path.as_str(), m)).collect();
    let after: BTreeMap<&str, &Match> = b.iter().map(|m| (m.path.as_str(), m)).collect();
    let paths: BTreeSet<&str> = before.keys().chain(after.keys()).copied().collect();
    let differ: Vec<&str> = paths.into_iter().filter(|p| before.get(p) != after.get(p)).collect();
    if differ.is_empty() {
        return format!("inputs.{}", new.pattern());
    }
    let mut names = differ.iter().take(NAMED_PATHS).copied().collect::<Vec<_>>().join(", ");
    if differ.len() > NAMED_PATHS {
        names.push_str(&format!(" and {} more", differ.len() - NAMED_PATHS));
    }
    format!("inputs.{}: {names}", new.pattern())
}

/// A declared input after normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// Components of a literal path; empty for the root.
    Path(Vec<String>),
    Glob(Glob),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Glob {
    /// Leading components without glob characters: where the walk starts.
    prefix: Vec<String>,
    /// The components after the prefix.
    rest: Vec<String>,
}

/// Characters that make a pattern a glob (globset's syntax: `*`, `**`, `?`, `[..]`, `{a,b}`,
/// `\` escapes).
fn is_glob(component: &str) -> bool {
    component.contains(['*', '?', '[', ']', '{', '}', '\\'])
}

/// Normalises a declared input: `./src/` is `src`, `a//b` is `a/b`, `.` is the root. An
/// absolute pattern, one with a `..` component, or an empty one is an error.
fn normalise(pattern: &str) -> Result<(String, Pattern), KeyError> {
    let err = |reason| KeyError::Pattern { pattern: pattern.to_owned(), reason };
    if pattern.is_empty() {
        return Err(err("is empty"));
    }
    if pattern.starts_with('/') {
        return Err(err("is absolute: inputs are relative to the repository root"));
    }
    let components: Vec<String> =
        pattern.split('/').filter(|c| !c.is_empty() && *c != ".").map(str::to_owned).collect();
    if components.iter().any(|c| c == "..") {
        return Err(err("uses `..`: inputs stay inside the repository"));
    }
    let normal = if components.is_empty() { ".".to_owned() } else { components.join("/") };
    match components.iter().position(|c| is_glob(c)) {
        None => Ok((normal, Pattern::Path(components))),
        Some(at) => {
            let mut prefix = components;
            let rest = prefix.split_off(at);
            Ok((normal, Pattern::Glob(Glob { prefix, rest })))
        }
    }
}

/// Resolves declared inputs against a bare repository at a commit, keeping repositories
/// open between calls.
///
/// gix's repository handles cannot move between threads (gix is built without its
/// `parallel` feature), so each thread keeps its own small set of open repositories; a
/// resolver is `Send + Sync` and can be shared freely. Objects are immutable, and an open
/// repository sees objects fetched into it later, so a kept repository is never stale.
#[derive(Debug)]
pub struct InputResolver {
    id: u64,
    capacity: usize,
    opened: AtomicU64,
    globs: GlobCache,
}

/// Compiled glob matchers by glob text: compiling one costs more than walking a few trees.
#[derive(Debug, Default)]
struct GlobCache(std::sync::Mutex<HashMap<String, globset::GlobMatcher>>);

impl GlobCache {
    fn matcher(&self, pattern: &str, glob: &str) -> Result<globset::GlobMatcher, KeyError> {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = map.get(glob) {
            return Ok(m.clone());
        }
        let m = globset::GlobBuilder::new(glob)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map(|g| g.compile_matcher())
            .map_err(|source| KeyError::Glob { pattern: pattern.to_owned(), source })?;
        if map.len() >= MAX_GLOBS {
            map.clear();
        }
        map.insert(glob.to_owned(), m.clone());
        Ok(m)
    }
}

struct OpenRepo {
    resolver: u64,
    path: PathBuf,
    repo: gix::Repository,
    used: u64,
}

thread_local! {
    static OPEN_REPOS: RefCell<Vec<OpenRepo>> = const { RefCell::new(Vec::new()) };
}

static RESOLVER_IDS: AtomicU64 = AtomicU64::new(0);
static USE_CLOCK: AtomicU64 = AtomicU64::new(0);

impl Default for InputResolver {
    fn default() -> Self {
        InputResolver::new()
    }
}

impl InputResolver {
    /// A resolver keeping up to 8 repositories open per thread.
    pub fn new() -> InputResolver {
        InputResolver::with_capacity(DEFAULT_OPEN_REPOS)
    }

    /// A resolver keeping up to `capacity` (at least 1) repositories open per thread.
    pub fn with_capacity(capacity: usize) -> InputResolver {
        InputResolver {
            id: RESOLVER_IDS.fetch_add(1, Ordering::Relaxed),
            capacity: capacity.max(1),
            opened: AtomicU64::new(0),
            globs: GlobCache::default(),
        }
    }

    /// How many times a repository was opened (not found open on the calling thread).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Resolves `patterns` (a step's `inputs`, in the order declared) in the bare repository
    /// `git_dir` at `commit` (a full hex id, or any revision git understands).
    pub fn resolve(&self, git_dir: &Path, commit: &str, patterns: &[String]) -> Result<Vec<Input>, KeyError> {
        let normalised = patterns.iter().map(|p| normalise(p)).collect::<Result<Vec<_>, _>>()?;
        let repo = self.take(git_dir)?;
        let result = resolve_in(&repo, &self.globs, git_dir, commit, patterns, &normalised);
        self.give_back(git_dir, repo);
        result
    }

    fn take(&self, git_dir: &Path) -> Result<gix::Repository, KeyError> {
        let cached = OPEN_REPOS.with_borrow_mut(|open| {
            let at = open.iter().position(|o| o.resolver == self.id && o.path == git_dir)?;
            Some(open.swap_remove(at).repo)
        });
        if let Some(repo) = cached {
            return Ok(repo);
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(path = %git_dir.display(), "opening repository to resolve inputs");
        let mut repo = gix::open(git_dir)
            .map_err(|source| KeyError::Open { path: git_dir.to_owned(), source: Box::new(source) })?;
        repo.object_cache_size_if_unset(OBJECT_CACHE_BYTES);
        Ok(repo)
    }

    fn give_back(&self, git_dir: &Path, repo: gix::Repository) {
        let used = USE_CLOCK.fetch_add(1, Ordering::Relaxed);
        OPEN_REPOS.with_borrow_mut(|open| {
            open.push(OpenRepo { resolver: self.id, path: git_dir.to_owned(), repo, used });
            let mine = open.iter().filter(|o| o.resolver == self.id).count();
            if mine > self.capacity
                && let Some(at) = lru(open.iter().enumerate().filter(|(_, o)| o.resolver == self.id))
            {
                open.swap_remove(at);
            }
            if open.len() > MAX_OPEN_REPOS_PER_THREAD
                && let Some(at) = lru(open.iter().enumerate())
            {
                open.swap_remove(at);
            }
        });
    }
}

fn lru<'a>(entries: impl Iterator<Item = (usize, &'a OpenRepo)>) -> Option<usize> {
    entries.min_by_key(|(_, o)| o.used).map(|(i, _)| i)
}

impl Drop for InputResolver {
    fn drop(&mut self) {
        // Other threads' repositories go when those threads need the room.
        let _ = OPEN_REPOS.try_with(|open| {
            if let Ok(mut open) = open.try_borrow_mut() {
                open.retain(|o| o.resolver != self.id);
            }
        });
    }
}

/// One entry of a decoded tree.
struct Ent {
    name: Vec<u8>,
    kind: EntryKind,
    id: ObjectId,
}

/// Trees read during one resolution, decoded once each (inputs share their parents).
struct Trees<'r> {
    repo: &'r gix::Repository,
    git_dir: &'r Path,
    commit: &'r str,
    decoded: HashMap<ObjectId, Rc<[Ent]>>,
}

impl Trees<'_> {
    fn read(&mut self, id: ObjectId, at: &str) -> Result<Rc<[Ent]>, KeyError> {
        if let Some(t) = self.decoded.get(&id) {
            return Ok(t.clone());
        }
        let read_err = |message: String| KeyError::Read {
            path: self.git_dir.to_owned(),
            commit: self.commit.to_owned(),
            what: format!("the tree at `{at}`"),
            message,
        };
        let tree = self.repo.find_tree(id).map_err(|e| read_err(e.to_string()))?;
        let decoded = tree.decode().map_err(|e| read_err(e.to_string()))?;
        let entries: Rc<[Ent]> = decoded
            .entries
            .iter()
            .map(|e| Ent { name: e.filename.to_vec(), kind: e.mode.kind(), id: e.oid.to_owned() })
            .collect();
        self.decoded.insert(id, entries.clone());
        Ok(entries)
    }

    /// The entry at `components` below the tree `root`: (kind, id), `None` when missing.
    fn lookup(&mut self, root: ObjectId, components: &[String]) -> Result<Option<(EntryKind, ObjectId)>, KeyError> {
        let mut current = (EntryKind::Tree, root);
        for (depth, name) in components.iter().enumerate() {
            if current.0 != EntryKind::Tree {
                return Ok(None);
            }
            let entries = self.read(current.1, &display(&components[..depth]))?;
            match entries.iter().find(|e| e.name == name.as_bytes()) {
                Some(e) => current = (e.kind, e.id),
                None => return Ok(None),
            }
        }
        Ok(Some(current))
    }
}

fn display(components: &[String]) -> String {
    if components.is_empty() { ".".to_owned() } else { components.join("/") }
}

/// The mode as `git ls-tree` prints it.
fn mode(kind: EntryKind) -> String {
    match kind {
        EntryKind::Tree => "040000",
        EntryKind::Blob => "100644",
        EntryKind::BlobExecutable => "100755",
        EntryKind::Link => "120000",
        EntryKind::Commit => "160000",
    }
    .to_owned()
}

fn resolve_in(
    repo: &gix::Repository,
    globs: &GlobCache,
    git_dir: &Path,
    commit: &str,
    patterns: &[String],
    normalised: &[(String, Pattern)],
) -> Result<Vec<Input>, KeyError> {
    let root = commit_tree(repo, git_dir, commit)?;
    let mut trees = Trees { repo, git_dir, commit, decoded: HashMap::new() };
    let mut out = Vec::with_capacity(patterns.len());
    for (pattern, (normal, parsed)) in patterns.iter().zip(normalised) {
        let input = match parsed {
            Pattern::Path(components) => Input::Path {
                pattern: pattern.clone(),
                path: normal.clone(),
                entry: trees
                    .lookup(root, components)?
                    .map(|(kind, id)| Entry { id: id.to_hex().to_string(), mode: mode(kind) }),
            },
            Pattern::Glob(glob) => Input::Glob {
                pattern: pattern.clone(),
                glob: normal.clone(),
                matches: glob_matches(&mut trees, globs, root, pattern, normal, glob)?,
            },
        };
        out.push(input);
    }
    Ok(out)
}

/// The root tree of `commit` (a hex id, or a revision).
fn commit_tree(repo: &gix::Repository, git_dir: &Path, commit: &str) -> Result<ObjectId, KeyError> {
    let err = |message: String| KeyError::Commit { path: git_dir.to_owned(), commit: commit.to_owned(), message };
    let id = match ObjectId::from_hex(commit.as_bytes()) {
        Ok(id) => id,
        Err(_) => repo.rev_parse_single(commit).map_err(|e| err(e.to_string()))?.detach(),
    };
    let object = repo.find_object(id).map_err(|e| err(e.to_string()))?;
    let commit_obj = object.peel_to_commit().map_err(|e| err(e.to_string()))?;
    commit_obj.tree_id().map(|t| t.detach()).map_err(|e| err(e.to_string()))
}

/// Every entry under the glob's literal prefix that the glob matches, sorted by path. `*`,
/// `?` and `[..]` stay within one path component, `**` crosses them. Without `**` or `{..}`
/// the walk descends only as deep as the glob has components, and only into directories
/// whose names match the glob's component at that depth.
fn glob_matches(
    trees: &mut Trees,
    globs: &GlobCache,
    root: ObjectId,
    pattern: &str,
    normal: &str,
    glob: &Glob,
) -> Result<Vec<Match>, KeyError> {
    let whole = globs.matcher(pattern, normal)?;
    let Some((EntryKind::Tree, start)) = trees.lookup(root, &glob.prefix)? else {
        return Ok(Vec::new());
    };
    let bounded = !glob.rest.iter().any(|c| c.contains("**") || c.contains(['{', '}']));
    let levels: Option<Vec<globset::GlobMatcher>> = if bounded {
        Some(glob.rest.iter().map(|c| globs.matcher(pattern, c)).collect::<Result<_, _>>()?)
    } else {
        None
    };
    let mut found = BTreeMap::new();
    let base = glob.prefix.join("/");
    walk(trees, start, base.as_bytes(), 0, levels.as_deref(), &whole, &mut found)?;
    Ok(found.into_values().collect())
}

fn walk(
    trees: &mut Trees,
    tree: ObjectId,
    dir: &[u8],
    depth: usize,
    levels: Option<&[globset::GlobMatcher]>,
    whole: &globset::GlobMatcher,
    found: &mut BTreeMap<Vec<u8>, Match>,
) -> Result<(), KeyError> {
    let entries = trees.read(tree, &if dir.is_empty() { ".".into() } else { dir.to_str_lossy() })?;
    for e in entries.iter() {
        let mut raw = dir.to_vec();
        if !raw.is_empty() {
            raw.push(b'/');
        }
        raw.extend_from_slice(&e.name);
        let (descend, candidate) = match levels {
            Some(levels) => {
                let Some(level) = levels.get(depth) else { continue };
                if !level.is_match(e.name.to_str_lossy().as_ref()) {
                    continue;
                }
                let last = depth + 1 == levels.len();
                (!last, last)
            }
            None => (true, true),
        };
        // Keyed by the raw bytes: names that are not UTF-8 stay distinct entries.
        if candidate && whole.is_match(raw.to_str_lossy().as_ref()) {
            let m = Match { path: raw.to_str_lossy().into_owned(), id: e.id.to_hex().to_string(), mode: mode(e.kind) };
            found.insert(raw.clone(), m);
        }
        if descend && e.kind == EntryKind::Tree {
            walk(trees, e.id, &raw, depth + 1, levels, whole, found)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::process::{Command, Stdio};

    /// Runs git in `dir` with a fixed identity and no user or system config.
    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=rbb", "-c", "user.email=rbb@localhost", "-c", "commit.gpgsign=false"])
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", dir)
            .stdin(Stdio::null())
            .output()
            .expect("run git");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A work tree holding `files`, committed; returns the repository and the commit.
    fn repo_with(files: &[(&str, &str)]) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        git(dir.path(), &["init", "-q", "-b", "main"]);
        for (path, content) in files {
            write(dir.path(), path, content);
        }
        let commit = commit_all(dir.path(), "initial");
        (dir, commit)
    }

    fn write(root: &Path, path: &str, content: &str) {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write file");
    }

    fn commit_all(root: &Path, message: &str) -> String {
        git(root, &["add", "-A"]);
        git(root, &["commit", "-q", "--allow-empty", "-m", message]);
        git(root, &["rev-parse", "HEAD"])
    }

    fn pats(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| (*s).to_owned()).collect()
    }

    fn manifest(inputs: Vec<Input>) -> Manifest {
        Manifest {
            format: FULL_KEY_FORMAT.to_owned(),
            static_key: "sha256:00".to_owned(),
            inputs,
            pass_env: BTreeMap::new(),
            image: None,
            platform: "linux/x86_64".to_owned(),
            after: None,
            salt: None,
            epoch: 0,
            secrets: BTreeMap::new(),
            definition: Value::Null,
        }
    }

    /// The full-key vectors of docs/cache-key.md: each manifest is written in canonical JSON
    /// and hashes to the key printed under it.
    #[test]
    fn documented_vectors() {
        let docs = include_str!("../../../docs/cache-key.md");
        let section = &docs[docs.find("### Full key").expect("docs/cache-key.md has a `### Full key` section")..];
        let mut vectors = Vec::new();
        let mut rest = section;
        while let Some(start) = rest.find("```json\n") {
            let body = &rest[start + 8..];
            let end = body.find("\n```").expect("closed code block");
            let json = &body[..end];
            let after = &body[end..];
            let line =
                after.lines().find(|l| l.starts_with("full key: ")).expect("a `full key:` line after the manifest");
            let key = line.trim_start_matches("full key: ").trim_matches('`');
            vectors.push((json.to_owned(), key.to_owned()));
            rest = &body[end..];
        }
        assert_eq!(vectors.len(), 3, "docs/cache-key.md should document three full-key vectors");
        for (json, key) in &vectors {
            let m: Manifest = serde_json::from_str(json).expect("a documented manifest parses");
            assert_eq!(&m.canonical(), json, "the documented manifest is not in canonical JSON");
            assert_eq!(&m.key(), key, "documented key of {json}");
            assert_eq!(m.format, FULL_KEY_FORMAT);
        }
        // The second step's `after` is the first's key, and the static keys are the static
        // vectors of the same page.
        let second: Manifest = serde_json::from_str(&vectors[1].0).expect("parses");
        assert_eq!(second.after.as_deref(), Some(vectors[0].1.as_str()));
        let first: Manifest = serde_json::from_str(&vectors[0].0).expect("parses");
        let static_section = &docs[docs.find("### Static key").expect("static vectors")..];
        assert!(static_section.contains(&first.static_key) && static_section.contains(&second.static_key));
        // A definition is kept but not hashed.
        let mut with_definition = first.clone();
        with_definition.definition = serde_json::json!({"run": "make"});
        assert_eq!(with_definition.key(), vectors[0].1);
        // Each kind of input is there: a found path, a missing one, a glob with and without matches.
        assert!(matches!(&first.inputs[0], Input::Path { entry: Some(_), .. }));
        assert!(matches!(&first.inputs[1], Input::Path { entry: None, .. }));
        assert!(matches!(&first.inputs[2], Input::Glob { matches, .. } if matches.len() == 1));
        assert!(matches!(&second.inputs[0], Input::Glob { matches, .. } if matches.is_empty()));
        assert_eq!(first.pass_env["CC"].as_deref(), Some(env_value_digest(b"gcc").as_str()));
        // A step without secrets has no `secrets` field at all; the third uses one: same
        // step, its name and version added, and so another key.
        assert!(!vectors[0].0.contains("secrets"));
        let third: Manifest = serde_json::from_str(&vectors[2].0).expect("parses");
        assert_eq!(third.secrets.get("DEPLOY_TOKEN"), Some(&Some(2)));
        let mut without = third.clone();
        without.secrets.clear();
        assert_eq!(without.key(), vectors[0].1, "the same step without its secret is the first vector");
        let mut bumped = third.clone();
        bumped.secrets.insert("DEPLOY_TOKEN".into(), Some(3));
        assert_ne!(bumped.key(), third.key());
        assert_eq!(changed(&third, &bumped), vec!["secrets.DEPLOY_TOKEN".to_owned()]);
    }

    #[test]
    fn paths_resolve_to_their_entries_and_modes() {
        let (dir, commit) =
            repo_with(&[("src/a.c", "int a;\n"), ("src/lib/b.c", "int b;\n"), ("Makefile", "all:\n"), ("run.sh", "x")]);
        let root = dir.path();
        let r = InputResolver::new();
        let got = r
            .resolve(
                &root.join(".git"),
                &commit,
                &pats(&["src", "./Makefile", "src/lib/b.c", "nope", "Makefile/x", "."]),
            )
            .expect("resolve");
        let entry = |i: usize| match &got[i] {
            Input::Path { entry, .. } => entry.clone(),
            other => panic!("{other:?} is not a path"),
        };
        let src = entry(0).expect("src exists");
        assert_eq!((src.id.as_str(), src.mode.as_str()), (git(root, &["rev-parse", "HEAD:src"]).as_str(), "040000"));
        let mk = entry(1).expect("Makefile exists");
        assert_eq!((mk.id.as_str(), mk.mode.as_str()), (git(root, &["rev-parse", "HEAD:Makefile"]).as_str(), "100644"));
        assert!(matches!(&got[1], Input::Path { pattern, path, .. } if pattern == "./Makefile" && path == "Makefile"));
        assert_eq!(entry(2).expect("nested file").id, git(root, &["rev-parse", "HEAD:src/lib/b.c"]));
        assert_eq!(entry(3), None, "a missing path");
        assert_eq!(entry(4), None, "below a file");
        assert_eq!(entry(5).expect("the root").id, git(root, &["rev-parse", "HEAD^{tree}"]));

        // Made executable: same blob, other mode, other key.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let exec = commit_all(root, "chmod");
        let before = r.resolve(&root.join(".git"), &commit, &pats(&["run.sh"])).expect("resolve");
        let after = r.resolve(&root.join(".git"), &exec, &pats(&["run.sh"])).expect("resolve");
        let (Input::Path { entry: Some(a), .. }, Input::Path { entry: Some(b), .. }) = (&before[0], &after[0]) else {
            panic!("run.sh resolves: {before:?} {after:?}");
        };
        assert_eq!((a.id == b.id, a.mode.as_str(), b.mode.as_str()), (true, "100644", "100755"));
        assert_ne!(manifest(before).key(), manifest(after).key());

        // A file replaced by a directory of the same name.
        std::fs::remove_file(root.join("Makefile")).expect("rm");
        write(root, "Makefile/part.mk", "all:\n");
        let as_dir = commit_all(root, "dir");
        let d = r.resolve(&root.join(".git"), &as_dir, &pats(&["Makefile"])).expect("resolve");
        assert!(matches!(&d[0], Input::Path { entry: Some(e), .. } if e.mode == "040000"), "{d:?}");
    }

    #[test]
    fn globs_list_their_matches_sorted_and_stay_in_their_components() {
        let (dir, commit) = repo_with(&[
            ("src/b.c", "b"),
            ("src/a.c", "a"),
            ("src/a.h", "h"),
            ("src/sub/c.c", "c"),
            ("src/sub/deep/d.c", "d"),
            ("tests/x.txt", "x"),
            ("top.c", "t"),
        ]);
        let git_dir = dir.path().join(".git");
        let r = InputResolver::new();
        let got = r
            .resolve(
                &git_dir,
                &commit,
                &pats(&["src/*.c", "src/**/*.c", "*/sub", "nothere/*", "tests/[xy].txt", "{top,src/a}.c"]),
            )
            .expect("resolve");
        let paths = |i: usize| match &got[i] {
            Input::Glob { matches, .. } => matches.iter().map(|m| m.path.as_str()).collect::<Vec<_>>(),
            other => panic!("{other:?} is not a glob"),
        };
        assert_eq!(paths(0), ["src/a.c", "src/b.c"]);
        assert_eq!(paths(1), ["src/a.c", "src/b.c", "src/sub/c.c", "src/sub/deep/d.c"]);
        assert_eq!(paths(2), ["src/sub"], "a matched directory counts whole");
        assert!(matches!(&got[2], Input::Glob { matches, .. } if matches[0].mode == "040000"));
        assert_eq!(paths(3), Vec::<&str>::new());
        assert_eq!(paths(4), ["tests/x.txt"]);
        assert_eq!(paths(5), ["src/a.c", "top.c"]);
        let Input::Glob { matches, .. } = &got[0] else { panic!("glob") };
        assert_eq!(matches[0].id, git(dir.path(), &["rev-parse", "HEAD:src/a.c"]));
    }

    /// A glob matching nothing, a missing path and an empty directory are three different
    /// inputs, so three different keys.
    #[test]
    fn nothing_missing_and_empty_differ() {
        let (dir, _) = repo_with(&[("keep", "k")]);
        let root = dir.path();
        // git cannot commit an empty directory from a work tree; build the tree by hand.
        let empty = git(root, &["hash-object", "-w", "-t", "tree", "/dev/null"]);
        let blob = git(root, &["rev-parse", "HEAD:keep"]);
        let listing = format!("040000 tree {empty}\tgen\n100644 blob {blob}\tkeep\n");
        let mut mktree = Command::new("git")
            .arg("-C")
            .arg(root)
            .arg("mktree")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("git mktree");
        std::io::Write::write_all(&mut mktree.stdin.take().expect("stdin"), listing.as_bytes()).expect("write");
        let out = mktree.wait_with_output().expect("mktree");
        let tree = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let commit = git(root, &["commit-tree", &tree, "-m", "empty dir"]);
        let r = InputResolver::new();
        let resolve = |p: &str| r.resolve(&root.join(".git"), &commit, &pats(&[p])).expect("resolve");
        let (glob_none, missing, empty_dir) = (resolve("gen/*"), resolve("out"), resolve("gen"));
        assert!(matches!(&glob_none[0], Input::Glob { matches, .. } if matches.is_empty()));
        assert!(matches!(&missing[0], Input::Path { entry: None, .. }));
        assert!(matches!(&empty_dir[0], Input::Path { entry: Some(e), .. } if e.id == empty && e.mode == "040000"));
        let keys: BTreeSet<String> = [glob_none, missing, empty_dir].into_iter().map(|i| manifest(i).key()).collect();
        assert_eq!(keys.len(), 3);
    }

    #[test]
    fn patterns_are_normalised_and_escapes_refused() {
        let (dir, commit) = repo_with(&[("src/a.c", "a")]);
        let r = InputResolver::new();
        let git_dir = dir.path().join(".git");
        let a = r.resolve(&git_dir, &commit, &pats(&["./src/", "src", "src//", "./src/./"])).expect("resolve");
        let entries: Vec<_> = a
            .iter()
            .map(|i| match i {
                Input::Path { path, entry, .. } => (path.clone(), entry.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(entries.iter().all(|e| e == &entries[0] && e.0 == "src"), "{entries:?}");
        for bad in ["../x", "src/../../x", "/etc/passwd", ""] {
            let err = r.resolve(&git_dir, &commit, &pats(&[bad])).expect_err(bad);
            assert!(matches!(err, KeyError::Pattern { .. }), "{bad}: {err}");
        }
        assert!(matches!(r.resolve(&git_dir, &commit, &pats(&["src/[a"])), Err(KeyError::Glob { .. })));
        let unknown = r.resolve(&git_dir, "0123456789012345678901234567890123456789", &pats(&["src"]));
        assert!(matches!(unknown, Err(KeyError::Commit { .. })), "{unknown:?}");
        let not_a_repo = r.resolve(&dir.path().join("nope"), &commit, &pats(&["src"]));
        assert!(matches!(not_a_repo, Err(KeyError::Open { .. })), "{not_a_repo:?}");
    }

    #[test]
    fn repositories_stay_open_per_thread_within_capacity() {
        let (one, c1) = repo_with(&[("a", "1")]);
        let (two, c2) = repo_with(&[("a", "2")]);
        let r = InputResolver::with_capacity(1);
        let p = pats(&["a"]);
        let first = r.resolve(&one.path().join(".git"), &c1, &p).expect("resolve");
        assert_eq!(r.resolve(&one.path().join(".git"), &c1, &p).expect("resolve"), first);
        assert_eq!(r.opened(), 1, "the second call reuses the open repository");
        // Objects fetched after the repository was opened are found.
        write(one.path(), "a", "changed");
        let c1b = commit_all(one.path(), "later");
        assert_ne!(r.resolve(&one.path().join(".git"), &c1b, &p).expect("resolve"), first);
        assert_eq!(r.opened(), 1);
        // Capacity 1: a second repository pushes the first out.
        r.resolve(&two.path().join(".git"), &c2, &p).expect("resolve");
        r.resolve(&one.path().join(".git"), &c1, &p).expect("resolve");
        assert_eq!(r.opened(), 3);
        // Another thread opens its own; threads share one resolver.
        fn shared<T: Send + Sync>(_: &T) {}
        shared(&r);
        std::thread::scope(|s| {
            s.spawn(|| r.resolve(&one.path().join(".git"), &c1, &p).expect("resolve on another thread"));
        });
        assert_eq!(r.opened(), 4);
        // Bare mirrors, as the master keeps them.
        let bare = tempfile::tempdir().expect("temp dir");
        git(bare.path(), &["clone", "-q", "--bare", &one.path().display().to_string(), "m.git"]);
        let from_bare = r.resolve(&bare.path().join("m.git"), &c1, &p).expect("resolve in a bare mirror");
        assert_eq!(from_bare, first);
    }

    #[test]
    fn changed_names_each_component() {
        let (dir, c1) = repo_with(&[("src/a.c", "a"), ("src/b.c", "b"), ("doc", "d")]);
        write(dir.path(), "src/a.c", "a2");
        write(dir.path(), "src/c.c", "c");
        let c2 = commit_all(dir.path(), "edit");
        let r = InputResolver::new();
        let p = pats(&["src/*.c", "doc", "src"]);
        let git_dir = dir.path().join(".git");
        let mut old = manifest(r.resolve(&git_dir, &c1, &p).expect("resolve"));
        let mut new = manifest(r.resolve(&git_dir, &c2, &p).expect("resolve"));
        assert!(changed(&old, &old).is_empty());
        assert_eq!(changed(&old, &new), ["inputs.src/*.c: src/a.c, src/c.c", "inputs.src"]);

        let step = |run: &str, cc: &str| {
            serde_json::json!({"after": null, "env": {"CC": cc}, "format": "rbb-step-key/1", "image": null,
                "inputs": ["src/*.c", "doc", "src"], "needs": [], "outputs": [], "pass_env": ["HOME"], "run": run,
                "workdir": null})
        };
        old.definition = step("make", "gcc");
        new.definition = step("make all", "clang");
        new.static_key = "sha256:11".to_owned();
        new.pass_env.insert("HOME".to_owned(), Some(env_value_digest(b"/root")));
        new.image = Some("sha256:ab".to_owned());
        new.platform = "linux/aarch64".to_owned();
        new.after = Some("sha256:22".to_owned());
        new.salt = Some("2".to_owned());
        new.epoch = 1;
        assert_eq!(
            changed(&old, &new),
            [
                "env.CC",
                "run",
                "inputs.src/*.c: src/a.c, src/c.c",
                "inputs.src",
                "pass_env.HOME",
                "image",
                "platform",
                "after",
                "salt",
                "epoch"
            ]
        );
        // Without definitions, the static key is named as such.
        old.definition = Value::Null;
        assert_eq!(changed(&old, &new)[0], "static_key");
        // Reordered inputs, each resolving the same.
        let mut swapped = manifest(old.inputs.iter().rev().cloned().collect());
        swapped.static_key = old.static_key.clone();
        assert_eq!(changed(&manifest(old.inputs.clone()), &swapped), ["inputs"]);
    }

    #[test]
    fn pass_env_digests_keep_declared_names_only() {
        let reported = HashMap::from([
            ("CC".to_owned(), env_value_digest(b"gcc")),
            ("HOME".to_owned(), String::new()),
            ("EXTRA".to_owned(), env_value_digest(b"x")),
        ]);
        let d = pass_env_digests(&pats(&["CC", "HOME", "LANG"]), &reported);
        assert_eq!(d.len(), 3);
        assert_eq!(d["CC"].as_deref(), Some("sha256:94f0fa7f897ccce65856dc5a98bae4bf6957a346766613d79414c976d093aa4a"));
        assert_eq!((d["HOME"].as_deref(), d["LANG"].as_deref()), (None, None));
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        ("[0-9a-f]{40}", prop::sample::select(vec!["100644", "100755", "120000", "040000", "160000"]))
            .prop_map(|(id, mode)| Entry { id, mode: mode.to_owned() })
    }

    fn arb_input() -> impl Strategy<Value = Input> {
        prop_oneof![
            ("[a-z]{1,6}(/[a-z]{1,6}){0,2}", proptest::option::of(arb_entry())).prop_map(|(path, entry)| Input::Path {
                pattern: path.clone(),
                path,
                entry
            }),
            ("[a-z]{1,4}/\\*", proptest::collection::vec(("[a-z]{1,6}", arb_entry()), 0..3)).prop_map(|(glob, m)| {
                let matches = m
                    .into_iter()
                    .map(|(name, e)| Match {
                        path: format!("{}/{name}", &glob[..glob.len() - 2]),
                        id: e.id,
                        mode: e.mode,
                    })
                    .collect();
                Input::Glob { pattern: glob.clone(), glob, matches }
            }),
        ]
    }

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        (
            "sha256:[0-9a-f]{8}",
            proptest::collection::vec(arb_input(), 0..4),
            proptest::collection::btree_map("[A-Z]{1,4}", proptest::option::of("sha256:[0-9a-f]{8}"), 0..3),
            proptest::option::of("sha256:[0-9a-f]{8}"),
            prop::sample::select(vec!["linux/x86_64", "linux/aarch64", "darwin/arm64"]),
            proptest::option::of("sha256:[0-9a-f]{8}"),
            proptest::option::of("[a-z0-9]{0,3}"),
            0u64..4,
        )
            .prop_map(|(static_key, inputs, pass_env, image, platform, after, salt, epoch)| Manifest {
                format: FULL_KEY_FORMAT.to_owned(),
                static_key,
                inputs,
                pass_env,
                image,
                platform: platform.to_owned(),
                after,
                salt,
                epoch,
                secrets: BTreeMap::new(),
                definition: Value::Null,
            })
    }

    /// Changes component `which` of `m` to a value it certainly did not have; returns its name.
    fn mutate(m: &mut Manifest, which: usize, pick: usize) -> &'static str {
        let other = |v: &Option<String>, x: &str| match v {
            Some(s) if s.ends_with(x) => None,
            Some(s) => Some(format!("{s}{x}")),
            None => Some(x.to_owned()),
        };
        match which {
            0 => {
                m.static_key.push('0');
                "static_key"
            }
            1 => {
                if m.inputs.is_empty() {
                    m.inputs.push(Input::Glob { pattern: "x/*".into(), glob: "x/*".into(), matches: vec![] });
                } else {
                    let n = pick % m.inputs.len();
                    match &mut m.inputs[n] {
                        Input::Path { entry, .. } => {
                            *entry = match entry.take() {
                                None => Some(Entry { id: "0".repeat(40), mode: "100644".into() }),
                                Some(e) if e.mode == "100644" => Some(Entry { mode: "100755".into(), ..e }),
                                Some(_) => None,
                            }
                        }
                        Input::Glob { matches, .. } => match matches.first_mut() {
                            Some(first) => {
                                let last = if first.id.ends_with('1') { '2' } else { '1' };
                                first.id.pop();
                                first.id.push(last);
                            }
                            None => {
                                matches.push(Match { path: "x/y".into(), id: "1".repeat(40), mode: "100644".into() })
                            }
                        },
                    }
                }
                "inputs"
            }
            2 => {
                let name = m.pass_env.keys().nth(pick % m.pass_env.len().max(1)).cloned();
                match name {
                    Some(n) => {
                        let v = m.pass_env.get(&n).cloned().flatten();
                        m.pass_env.insert(n, other(&v, "e"));
                    }
                    None => {
                        m.pass_env.insert("NEW".into(), None);
                    }
                }
                "pass_env"
            }
            3 => {
                m.image = other(&m.image, "i");
                "image"
            }
            4 => {
                m.platform.push_str("-v2");
                "platform"
            }
            5 => {
                m.after = other(&m.after, "a");
                "after"
            }
            6 => {
                m.salt = other(&m.salt, "s");
                "salt"
            }
            _ => {
                m.epoch += 1;
                "epoch"
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Changing any component of a manifest changes the key, and `changed` names it.
        #[test]
        fn every_component_changes_the_key(m in arb_manifest(), which in 0usize..8, pick in 0usize..8) {
            let mut n = m.clone();
            let name = mutate(&mut n, which, pick);
            prop_assert_ne!(&m, &n);
            prop_assert_ne!(m.key(), n.key());
            let why = changed(&m, &n);
            prop_assert!(why.iter().any(|w| w.starts_with(name)), "{name} not in {why:?}");
            // The key reads back from the manifest's JSON.
            let back: Manifest = serde_json::from_str(&serde_json::to_string(&n).expect("json")).expect("parses");
            prop_assert_eq!(back.key(), n.key());
        }
    }

    /// Files in a generated tree: (path, content); paths are distinct and none is a prefix
    /// directory of another file.
    fn arb_tree() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::btree_map(
            prop::sample::select(vec![
                "a.c",
                "b.h",
                "src/a.c",
                "src/b.c",
                "src/x.h",
                "src/sub/c.c",
                "src/sub/d.txt",
                "lib/e.c",
                "lib/f.txt",
                "docs/g.md",
                "tests/t1.txt",
                "tests/t2.txt",
            ]),
            "[a-z]{0,4}",
            1..10,
        )
        .prop_map(|m| m.into_iter().map(|(p, c)| (p.to_owned(), c)).collect())
    }

    /// Whether `path` is covered by one of the step's inputs below (by construction).
    fn covered(path: &str) -> bool {
        path.starts_with("src/") && (path.ends_with(".c") || path.starts_with("src/sub/"))
            || path == "a.c"
            || path.starts_with("tests/")
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// In a real repository: editing a file outside a step's inputs leaves the resolved
        /// inputs (and the key) as they were; editing one inside changes them.
        #[test]
        fn only_files_inside_the_inputs_change_the_key(files in arb_tree(), edit in any::<prop::sample::Index>()) {
            let refs: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), c.as_str())).collect();
            let (dir, before) = repo_with(&refs);
            let (path, content) = edit.get(&files).clone();
            write(dir.path(), &path, &format!("{content}+"));
            let after = commit_all(dir.path(), "edit");
            let inputs = pats(&["src/**/*.c", "src/sub", "a.c", "tests/*.txt", "./tests"]);
            let r = InputResolver::new();
            let git_dir = dir.path().join(".git");
            let old = manifest(r.resolve(&git_dir, &before, &inputs).expect("resolve"));
            let new = manifest(r.resolve(&git_dir, &after, &inputs).expect("resolve"));
            if covered(&path) {
                prop_assert_ne!(old.key(), new.key(), "{} is an input", path);
                prop_assert!(!changed(&old, &new).is_empty());
            } else {
                prop_assert_eq!(&old.inputs, &new.inputs, "{} is not an input", path);
                prop_assert_eq!(old.key(), new.key());
            }
        }
    }
}
