//! A bare mirror of one watched repository under the master's state dir, fetched with gix.
//!
//! Its one job is to keep the mirror's branches equal to the remote's (forced, pruned), keep the
//! poller's private refs, and read commits, trees and files out of it. It must not decide what
//! a moved branch means (that is the poller's job: turning updates into changes), must not
//! serialise callers (the caller runs one call per repository at a time), and never touches a
//! working tree: the mirror is bare.
//!
//! Refs: `refs/heads/*` and `refs/tags/*` are the remote's, as last fetched. The poller's own
//! state lives under `refs/rbb/`, which fetches never touch:
//! - `refs/rbb/recorded/<branch>`: the head whose changes the engine has recorded;
//! - `refs/rbb/pr-head/<n>`: pull request `n`'s head as fetched from the forge's PR ref;
//! - `refs/rbb/pr/<n>`: the head of pull request `n` the engine has recorded.
//!
//! All ids crossing this API are lowercase hex strings.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use rbb_compiler::git::{FetchError, Remote};

use gix::bstr::{BString, ByteSlice};
use gix::hash::ObjectId;
use gix::refs::transaction::{Change, PreviousValue, RefEdit, RefLog};
use tracing::{debug, info, warn};

/// Refspecs used for every fetch: all branches and tags, forced, into the same names.
const FETCH_REFSPECS: [&str; 2] = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];
/// Namespaces pruned after a fetch: local refs there that the remote no longer has are deleted.
const PRUNED_PREFIXES: [&str; 2] = ["refs/heads/", "refs/tags/"];
/// Where the recorded head of each branch is kept (`<prefix><branch>`).
const RECORDED_PREFIX: &str = "refs/rbb/recorded/";

/// Branch heads of a local repository as the master saw them at start (`None`: no such
/// branch then).
pub type LocalHeads = BTreeMap<String, Option<String>>;

/// Branch heads read straight from a repository's files (`.git/` or a bare directory):
/// loose refs, then `packed-refs`. `None` when the layout is not that plain (the caller asks
/// gix), or a ref is not a plain object id.
fn plain_heads(path: &Path, branches: &[&String]) -> Option<LocalHeads> {
    let dot_git = path.join(".git");
    let git_dir = if dot_git.is_dir() {
        dot_git
    } else if path.join("HEAD").is_file() {
        path.to_owned()
    } else {
        return None;
    };
    if git_dir.join("reftable").exists() {
        return None;
    }
    let is_id = |s: &str| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut packed: Option<String> = None;
    let mut out = LocalHeads::new();
    for b in branches {
        let name = format!("refs/heads/{b}");
        let id = match std::fs::read_to_string(git_dir.join(&name)) {
            Ok(text) if is_id(text.trim()) => Some(text.trim().to_owned()),
            Ok(_) => return None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if packed.is_none() {
                    packed = Some(match std::fs::read_to_string(git_dir.join("packed-refs")) {
                        Ok(t) => t,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                        Err(_) => return None,
                    });
                }
                packed.as_deref().unwrap_or_default().lines().find_map(|l| {
                    let (id, r) = l.split_once(' ')?;
                    (r == name && is_id(id)).then(|| id.to_owned())
                })
            }
            Err(_) => return None,
        };
        out.insert((*b).clone(), id);
    }
    Some(out)
}

/// A bare mirror of one repository. Cheap to clone and `Send + Sync`: it holds only the url
/// and path, and each call opens its own view of the repository (gix's repository handles are
/// not `Send` without gix's `parallel` feature).
#[derive(Debug, Clone)]
pub struct Mirror {
    url: String,
    path: PathBuf,
    /// Set for a remote repository: fetched by the `git` binary with the configured
    /// credentials and timeout. Local paths and `file://` are fetched with gix.
    remote: Option<Arc<Remote>>,
}

/// A branch that moved during a [`Mirror::fetch`]. `old: None` means the branch is new to the
/// mirror, `new: None` that it was deleted on the remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    /// The short branch name, e.g. `main` or `release/1.0`.
    pub branch: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// One commit as reported by [`Mirror::commits_between`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub id: String,
    pub author: String,
    pub email: String,
    /// Author time, seconds since the unix epoch.
    pub time: i64,
    /// The full commit message (subject and body), without trailing newlines.
    pub message: String,
    /// Paths changed against the first parent (every file for a root commit), sorted.
    pub files: Vec<String>,
}

/// The commits of a push: reachable from its new head but from none of the hidden tips.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Range {
    /// Newest first (by commit time), at most the `limit` asked for.
    pub commits: Vec<CommitInfo>,
    /// How many commits the range holds in all.
    pub total: usize,
    /// Paths changed by the commits beyond `limit` (each against its first parent), sorted.
    pub older_files: std::collections::BTreeSet<String>,
}

/// What went wrong, naming the mirror (url or path) and the operation.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("cannot create the directory for the mirror of {url} at {}", path.display())]
    CreateDir {
        url: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot initialise a bare mirror of {url} at {}", path.display())]
    Init {
        url: String,
        path: PathBuf,
        #[source]
        source: gix::Error,
    },
    #[error("cannot open the mirror of {url} at {}", path.display())]
    Open {
        url: String,
        path: PathBuf,
        #[source]
        source: gix::Error,
    },
    #[error("invalid branch glob {glob:?}")]
    Glob {
        glob: String,
        #[source]
        source: globset::Error,
    },
    /// A remote fetch failed; the message names the url and never holds a credential.
    #[error(transparent)]
    Remote(#[from] FetchError),
    #[error("cannot fetch {url} into {}: {step}", path.display())]
    Fetch {
        url: String,
        path: PathBuf,
        step: &'static str,
        #[source]
        source: gix::Error,
    },
    #[error("cannot {action} in the mirror of {url} at {}", path.display())]
    Refs {
        url: String,
        path: PathBuf,
        action: String,
        #[source]
        source: gix::Error,
    },
    #[error("{name} in the mirror of {url} is the remote's: only refs under refs/rbb/ are moved by rbb")]
    NotPrivate { url: String, name: String },
    #[error("cannot resolve {rev:?} to a commit in the mirror of {url}")]
    Resolve {
        url: String,
        rev: String,
        #[source]
        source: gix::Error,
    },
    #[error("cannot read {what} of commit {commit} in the mirror of {url}")]
    Read {
        url: String,
        commit: String,
        what: String,
        #[source]
        source: gix::Error,
    },
}

impl Mirror {
    /// Opens the bare mirror at `path`, creating it (bare init) if missing or empty. Nothing is
    /// fetched here: the first [`fetch`](Self::fetch) reports every branch as new.
    pub fn open(url: &str, path: &Path) -> Result<Mirror, MirrorError> {
        let mirror = Mirror::at(url, path);
        mirror.prepare()?;
        Ok(mirror)
    }

    /// The mirror at `path`, without touching the disk: [`prepare`](Self::prepare) it before
    /// anything else.
    pub fn at(url: &str, path: &Path) -> Mirror {
        Mirror { url: url.to_owned(), path: path.to_owned(), remote: None }
    }

    /// Creates the bare mirror if its directory is missing or empty; otherwise opens it (and
    /// adopts fetched branches as recorded when it has none recorded).
    pub fn prepare(&self) -> Result<(), MirrorError> {
        let (url, path) = (self.url.as_str(), self.path.as_path());
        let is_empty_or_missing = match std::fs::read_dir(path) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(source) => {
                return Err(MirrorError::CreateDir { url: url.to_owned(), path: path.to_owned(), source });
            }
        };
        if is_empty_or_missing {
            std::fs::create_dir_all(path).map_err(|source| MirrorError::CreateDir {
                url: url.to_owned(),
                path: path.to_owned(),
                source,
            })?;
            info!(url, path = %path.display(), "creating bare mirror");
            gix::init_bare(path).map_err(|source| MirrorError::Init {
                url: url.to_owned(),
                path: path.to_owned(),
                source,
            })?;
        }
        let repo = self.repo()?;
        if !is_empty_or_missing {
            self.adopt_heads(&repo)?;
        }
        Ok(())
    }

    /// A mirror that has branches but no recorded refs was made before they existed (or its
    /// first poll never finished): what it has fetched counts as recorded.
    fn adopt_heads(&self, repo: &gix::Repository) -> Result<(), MirrorError> {
        if !self.prefixed_heads(repo, RECORDED_PREFIX)?.is_empty() {
            return Ok(());
        }
        let heads = self.branch_heads(repo)?;
        if heads.is_empty() {
            return Ok(());
        }
        info!(url = %self.url, branches = heads.len(), "adopting the fetched branches as recorded");
        let edits = heads
            .iter()
            .map(|(branch, id)| self.set_edit(&format!("{RECORDED_PREFIX}{branch}"), None, *id))
            .collect::<Result<Vec<_>, _>>()?;
        repo.edit_references(edits).map_err(|source| self.refs_err("record the fetched branches", source))?;
        Ok(())
    }

    /// Fetches from `remote` (its url must be this mirror's) with its credentials and timeout.
    pub fn with_remote(mut self, remote: Remote) -> Mirror {
        self.remote = Some(Arc::new(remote));
        self
    }

    fn repo(&self) -> Result<gix::Repository, MirrorError> {
        gix::open(&self.path).map_err(|source| MirrorError::Open {
            url: self.url.clone(),
            path: self.path.clone(),
            source,
        })
    }

    /// The url this mirror fetches from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The mirror's git directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fetches every branch (and tag) of the remote into the same names in the mirror, forced,
    /// deleting those the remote no longer has, and returns the branches matching any of
    /// `branch_globs` whose head changed, sorted by branch name.
    ///
    /// Globs match the short branch name; `*` does not cross `/`, `**` does.
    pub fn fetch(&self, branch_globs: &[String]) -> Result<Vec<RefUpdate>, MirrorError> {
        let span = tracing::info_span!("mirror_fetch", url = %self.url);
        let _guard = span.enter();
        let globs = compile_globs(branch_globs)?;
        let mut repo = self.repo()?;
        // Reflogs are off in bare repositories, but a committer keeps ref transactions happy
        // where a user's config turns them on without an identity.
        if let Err(e) = repo.committer_or_set_fallback("rbb", "rbb@localhost") {
            debug!(error = %e, "cannot set a fallback committer");
        }

        let before = self.branch_heads(&repo)?;
        if let Some(remote) = &self.remote {
            remote.fetch(&self.path, &FETCH_REFSPECS, true)?;
            return self.moved(&repo, &before, &globs);
        }
        let fetch_err = |step: &'static str| {
            move |source: gix::Error| MirrorError::Fetch {
                url: self.url.clone(),
                path: self.path.clone(),
                step,
                source,
            }
        };
        let remote = repo
            .remote_at(self.url.as_str())
            .map_err(fetch_err("invalid url"))?
            .with_refspecs(FETCH_REFSPECS, gix::remote::Direction::Fetch)
            .map_err(fetch_err("invalid refspec"))?
            .with_fetch_tags(gix::remote::fetch::Tags::None);
        let outcome = remote
            .connect(gix::remote::Direction::Fetch)
            .map_err(fetch_err("connecting"))?
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(fetch_err("listing remote refs"))?
            .receive(gix::progress::Discard, &AtomicBool::new(false))
            .map_err(fetch_err("receiving objects"))?;
        let update_refs = match &outcome.status {
            gix::remote::fetch::Status::NoPackReceived { update_refs, .. }
            | gix::remote::fetch::Status::Change { update_refs, .. } => update_refs,
        };
        for (update, mapping) in update_refs.updates.iter().zip(&outcome.ref_map.mappings) {
            use gix::remote::fetch::refs::update::Mode;
            match &update.mode {
                Mode::RejectedSourceObjectNotFound { .. }
                | Mode::RejectedTagUpdate
                | Mode::RejectedNonFastForward
                | Mode::RejectedToReplaceWithUnborn
                | Mode::RejectedCurrentlyCheckedOut { .. } => {
                    warn!(local = ?mapping.local, mode = %update.mode, "ref update rejected");
                }
                _ => {}
            }
        }

        // Prune: the remote's refs are exactly the mappings' local names.
        let on_remote: HashSet<BString> = outcome.ref_map.mappings.iter().filter_map(|m| m.local.clone()).collect();
        self.prune(&repo, &on_remote)?;
        self.moved(&repo, &before, &globs)
    }

    /// The watched branches whose heads differ from `before`, logged.
    fn moved(
        &self,
        repo: &gix::Repository,
        before: &BTreeMap<String, ObjectId>,
        globs: &globset::GlobSet,
    ) -> Result<Vec<RefUpdate>, MirrorError> {
        let after = self.branch_heads(repo)?;
        let updates = diff_heads(before, &after, globs);
        for u in &updates {
            info!(branch = %u.branch, old = ?u.old, new = ?u.new, "branch moved");
        }
        debug!(branches = after.len(), moved = updates.len(), "fetched");
        Ok(updates)
    }

    /// Current head of `branch` (short name) in the mirror, or `None` if there is no such branch.
    pub fn head(&self, branch: &str) -> Result<Option<String>, MirrorError> {
        self.find_ref(&format!("refs/heads/{branch}"))
    }

    /// The id `name` (a full ref name) points at, or `None` if there is no such ref.
    pub fn find_ref(&self, name: &str) -> Result<Option<String>, MirrorError> {
        let repo = self.repo()?;
        let reference = repo.try_find_reference(name).map_err(|source| self.refs_err(name, source))?;
        match reference {
            None => Ok(None),
            Some(mut r) => {
                let id = r.peel_to_id().map_err(|source| self.refs_err(name, source))?;
                Ok(Some(id.to_hex().to_string()))
            }
        }
    }

    /// Moves the private ref `name` (under `refs/rbb/`) from `expected` to `new` (`None`:
    /// delete it), failing if it no longer points at `expected` (`None`: must not exist).
    pub fn move_ref(&self, name: &str, expected: Option<&str>, new: Option<&str>) -> Result<(), MirrorError> {
        if !name.starts_with("refs/rbb/") {
            return Err(MirrorError::NotPrivate { url: self.url.clone(), name: name.to_owned() });
        }
        let repo = self.repo()?;
        let id = |hex: &str| {
            ObjectId::from_hex(hex.as_bytes())
                .map_err(|e| self.refs_err(&format!("move {name}"), gix::Error::from_error(e)))
        };
        let expected = expected.map(id).transpose()?;
        let edit = match new {
            Some(new) => self.set_edit(name, expected, id(new)?)?,
            None => {
                let Some(expected) = expected else { return Ok(()) };
                RefEdit {
                    change: Change::Delete {
                        expected: PreviousValue::MustExistAndMatch(gix::refs::Target::Object(expected)),
                        log: RefLog::AndReference,
                    },
                    name: self.ref_name(name)?,
                    deref: false,
                }
            }
        };
        repo.edit_references([edit]).map_err(|source| self.refs_err(&format!("move {name}"), source))?;
        Ok(())
    }

    fn ref_name(&self, name: &str) -> Result<gix::refs::FullName, MirrorError> {
        gix::refs::FullName::try_from(name)
            .map_err(|e| self.refs_err(&format!("name a ref {name:?}"), gix::Error::from_error(e)))
    }

    fn set_edit(&self, name: &str, expected: Option<ObjectId>, new: ObjectId) -> Result<RefEdit, MirrorError> {
        Ok(RefEdit {
            change: Change::Update {
                log: gix::refs::transaction::LogChange::default(),
                expected: match expected {
                    Some(old) => PreviousValue::MustExistAndMatch(gix::refs::Target::Object(old)),
                    None => PreviousValue::MustNotExist,
                },
                new: gix::refs::Target::Object(new),
            },
            name: self.ref_name(name)?,
            deref: false,
        })
    }

    /// The recorded ref of `branch`: where the engine last recorded its changes.
    pub fn recorded_ref(branch: &str) -> String {
        format!("{RECORDED_PREFIX}{branch}")
    }

    /// Recorded head per branch (short name), for every recorded branch.
    pub fn recorded(&self) -> Result<BTreeMap<String, String>, MirrorError> {
        let repo = self.repo()?;
        Ok(self
            .prefixed_heads(&repo, RECORDED_PREFIX)?
            .into_iter()
            .map(|(branch, id)| (branch, id.to_hex().to_string()))
            .collect())
    }

    /// Fetched head per branch (short name), for every branch in the mirror.
    pub fn heads(&self) -> Result<BTreeMap<String, String>, MirrorError> {
        let repo = self.repo()?;
        Ok(self.branch_heads(&repo)?.into_iter().map(|(branch, id)| (branch, id.to_hex().to_string())).collect())
    }

    /// Branches matching `branch_globs` whose fetched head differs from their recorded head,
    /// sorted by name: `old` is the recorded head (`None`: never recorded), `new` the fetched
    /// one (`None`: gone from the remote).
    pub fn pending(&self, branch_globs: &[String]) -> Result<Vec<RefUpdate>, MirrorError> {
        let globs = compile_globs(branch_globs)?;
        let repo = self.repo()?;
        let recorded = self.prefixed_heads(&repo, RECORDED_PREFIX)?;
        let fetched = self.branch_heads(&repo)?;
        Ok(diff_heads(&recorded, &fetched, &globs))
    }

    /// Records every branch matching `branch_globs` where it is now (a new mirror's baseline)
    /// and forgets recorded branches the remote no longer has. Returns how many moved.
    pub fn record_all(&self, branch_globs: &[String]) -> Result<usize, MirrorError> {
        let pending = self.pending(branch_globs)?;
        for u in &pending {
            self.move_ref(&Self::recorded_ref(&u.branch), u.old.as_deref(), u.new.as_deref())?;
        }
        Ok(pending.len())
    }

    /// A new mirror's baseline when the master saw its branches earlier than its first fetch:
    /// a branch named in `seen` is recorded where it was seen (what was pushed since is then
    /// built), a branch that did not exist then stays unrecorded (it is a new branch), and
    /// the other branches matching `branch_globs` are recorded where they are now.
    pub fn record_baseline(&self, branch_globs: &[String], seen: &LocalHeads) -> Result<usize, MirrorError> {
        let pending = self.pending(branch_globs)?;
        let mut moved = 0;
        for u in &pending {
            let to = match seen.get(&u.branch) {
                Some(Some(id)) if self.has_commit(id)? => Some(id.as_str()),
                Some(_) => continue,
                None => u.new.as_deref(),
            };
            if to != u.old.as_deref() {
                self.move_ref(&Self::recorded_ref(&u.branch), u.old.as_deref(), to)?;
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// The heads of `branches` (exact names; globs are left out) in the local repository at
    /// `path`: `None` for a branch it does not have. Empty when it cannot be read.
    pub fn local_heads(path: &Path, branches: &[String]) -> LocalHeads {
        let exact: Vec<&String> = branches.iter().filter(|b| !b.contains(['*', '?', '['])).collect();
        // The common layouts are read as files (a thousand repositories at start); anything
        // else (a `.git` file, symbolic refs, reftables) through gix.
        if let Some(heads) = plain_heads(path, &exact) {
            return heads;
        }
        let Ok(repo) = gix::open(path) else { return LocalHeads::new() };
        exact
            .into_iter()
            .map(|b| {
                let id = repo
                    .try_find_reference(format!("refs/heads/{b}").as_str())
                    .ok()
                    .flatten()
                    .and_then(|mut r| r.peel_to_id().ok().map(|id| id.to_hex().to_string()));
                (b.clone(), id)
            })
            .collect()
    }

    /// Fetches `remote_ref` (e.g. `refs/pull/7/head`) into `local_ref` (under `refs/rbb/`),
    /// forced. Returns the fetched id, or `None` when the remote has no such ref.
    pub fn fetch_ref(&self, remote_ref: &str, local_ref: &str) -> Result<Option<String>, MirrorError> {
        let span = tracing::info_span!("mirror_fetch_ref", url = %self.url, remote_ref);
        let _guard = span.enter();
        let mut repo = self.repo()?;
        if let Err(e) = repo.committer_or_set_fallback("rbb", "rbb@localhost") {
            debug!(error = %e, "cannot set a fallback committer");
        }
        let fetch_err = |step: &'static str| {
            move |source: gix::Error| MirrorError::Fetch {
                url: self.url.clone(),
                path: self.path.clone(),
                step,
                source,
            }
        };
        let spec = format!("+{remote_ref}:{local_ref}");
        if let Some(remote) = &self.remote {
            return match remote.fetch(&self.path, &[spec.as_str()], false) {
                Ok(()) => self.find_ref(local_ref),
                Err(FetchError::NoSuchRef { .. }) => {
                    debug!("the remote has no such ref");
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            };
        }
        let prepared = repo
            .remote_at(self.url.as_str())
            .map_err(fetch_err("invalid url"))?
            .with_refspecs([spec.as_str()], gix::remote::Direction::Fetch)
            .map_err(fetch_err("invalid refspec"))?
            .with_fetch_tags(gix::remote::fetch::Tags::None)
            .connect(gix::remote::Direction::Fetch)
            .map_err(fetch_err("connecting"))?
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(fetch_err("listing remote refs"))?;
        if prepared.ref_map().mappings.is_empty() {
            debug!("the remote has no such ref");
            return Ok(None);
        }
        prepared.receive(gix::progress::Discard, &AtomicBool::new(false)).map_err(fetch_err("receiving objects"))?;
        self.find_ref(local_ref)
    }

    /// Whether the mirror holds commit `id` (a full hex id).
    pub fn has_commit(&self, id: &str) -> Result<bool, MirrorError> {
        let repo = self.repo()?;
        let Ok(oid) = ObjectId::from_hex(id.as_bytes()) else { return Ok(false) };
        if !repo.has_object(oid) {
            return Ok(false);
        }
        Ok(repo.find_commit(oid).is_ok())
    }

    /// One commit with its author, message and the paths it changed against its first parent.
    pub fn commit(&self, rev: &str) -> Result<CommitInfo, MirrorError> {
        let repo = self.repo()?;
        let id = self.resolve_in(&repo, rev)?;
        self.commit_info(&repo, id)
    }

    /// The commits reachable from `new` and from none of `hidden` (revisions the mirror does not
    /// have are left out), newest first. The newest `limit` come with their details; the paths
    /// changed by the others are gathered into one set as the walk goes, so memory follows the
    /// number of distinct paths, not of commits.
    pub fn range(&self, hidden: &[String], new: &str, limit: usize) -> Result<Range, MirrorError> {
        let repo = self.repo()?;
        let new_id = self.resolve_in(&repo, new)?;
        let mut hidden_ids = Vec::new();
        for h in hidden {
            match self.resolve_in(&repo, h) {
                Ok(id) => hidden_ids.push(id),
                Err(e) => warn!(url = %self.url, rev = %h, error = %e, "a hidden tip is unknown to the mirror"),
            }
        }
        let walk = repo
            .rev_walk([new_id])
            .with_hidden(hidden_ids)
            .sorting(gix::revision::walk::Sorting::ByCommitTime(
                gix::traverse::commit::simple::CommitTimeOrder::NewestFirst,
            ))
            .all()
            .map_err(|source| self.read_err(new, "history", source))?;
        let mut range = Range::default();
        for info in walk {
            let id = info.map_err(|source| self.read_err(new, "history", source))?.id;
            if range.commits.len() < limit {
                range.commits.push(self.commit_info(&repo, id)?);
            } else {
                let commit = repo.find_commit(id).map_err(|source| self.read_err(new, "commit", source))?;
                range.older_files.extend(self.changed_paths(&repo, &id.to_hex().to_string(), &commit)?);
            }
            range.total += 1;
        }
        Ok(range)
    }

    /// Commits reachable from `new` but not from `old`, newest first (by commit time), at most
    /// `limit`. With `old: None`, or an `old` id the mirror does not have, only `new` itself.
    ///
    /// Each commit comes with its author, message and the paths changed against its first
    /// parent (all files for a root commit).
    pub fn commits_between(&self, old: Option<&str>, new: &str, limit: usize) -> Result<Vec<CommitInfo>, MirrorError> {
        let repo = self.repo()?;
        let new_id = self.resolve_in(&repo, new)?;
        let old_id = match old {
            None => None,
            Some(old) => match ObjectId::from_hex(old.as_bytes()) {
                Ok(id) if !repo.has_object(id) => {
                    warn!(url = %self.url, old, new, "old commit is unknown to the mirror; reporting only the new head");
                    None
                }
                _ => Some(self.resolve_in(&repo, old)?),
            },
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let ids: Vec<ObjectId> = match old_id {
            None => vec![new_id],
            Some(old_id) => repo
                .rev_walk([new_id])
                .with_hidden([old_id])
                .sorting(gix::revision::walk::Sorting::ByCommitTime(
                    gix::traverse::commit::simple::CommitTimeOrder::NewestFirst,
                ))
                .all()
                .map_err(|source| self.read_err(new, "history", source))?
                .take(limit)
                .map(|info| info.map(|info| info.id).map_err(|source| self.read_err(new, "history", source)))
                .collect::<Result<_, _>>()?,
        };
        ids.into_iter().map(|id| self.commit_info(&repo, id)).collect()
    }

    /// A file at `commit`: its blob id and content, or `None` if there is no file at `path`
    /// (absent, or a directory or submodule).
    pub fn read_file(&self, commit: &str, path: &str) -> Result<Option<(String, Vec<u8>)>, MirrorError> {
        let repo = self.repo()?;
        let id = self.resolve_in(&repo, commit)?;
        let what = || format!("file {path:?}");
        let tree = self.tree_of(&repo, id)?;
        let Some(entry) = tree.lookup_entry_by_path(path).map_err(|source| self.read_err(commit, what(), source))?
        else {
            return Ok(None);
        };
        if !(entry.mode().is_blob() || entry.mode().is_link()) {
            return Ok(None);
        }
        let object = entry.object().map_err(|source| self.read_err(commit, what(), source))?;
        Ok(Some((entry.object_id().to_hex().to_string(), object.detach().data)))
    }

    /// Every file path (blobs, symlinks, submodules; not directories) in `commit`'s tree, sorted.
    pub fn files(&self, commit: &str) -> Result<Vec<String>, MirrorError> {
        let repo = self.repo()?;
        let id = self.resolve_in(&repo, commit)?;
        let tree = self.tree_of(&repo, id)?;
        let entries = tree.traverse().breadthfirst.files().map_err(|source| self.read_err(commit, "tree", source))?;
        let mut files: Vec<String> =
            entries.into_iter().filter(|e| !e.mode.is_tree()).map(|e| e.filepath.to_str_lossy().into_owned()).collect();
        files.sort();
        Ok(files)
    }

    /// Resolves any revision (branch, tag, full or short commit id, `main~1`, ...) to a full
    /// commit id.
    pub fn resolve(&self, rev: &str) -> Result<String, MirrorError> {
        let repo = self.repo()?;
        Ok(self.resolve_in(&repo, rev)?.to_hex().to_string())
    }

    fn resolve_in(&self, repo: &gix::Repository, rev: &str) -> Result<ObjectId, MirrorError> {
        let err = |source| MirrorError::Resolve { url: self.url.clone(), rev: rev.to_owned(), source };
        let id = repo.rev_parse_single(rev).map_err(err)?;
        let commit = id.object().and_then(|o| o.peel_to_commit()).map_err(err)?;
        Ok(commit.id)
    }

    fn tree_of<'r>(&self, repo: &'r gix::Repository, id: ObjectId) -> Result<gix::Tree<'r>, MirrorError> {
        repo.find_commit(id)
            .and_then(|c| c.tree())
            .map_err(|source| self.read_err(&id.to_hex().to_string(), "tree", source))
    }

    fn commit_info(&self, repo: &gix::Repository, id: ObjectId) -> Result<CommitInfo, MirrorError> {
        let hex = id.to_hex().to_string();
        let err = |what: &str| {
            let hex = hex.clone();
            let what = what.to_owned();
            move |source| MirrorError::Read { url: self.url.clone(), commit: hex, what, source }
        };
        let commit = repo.find_commit(id).map_err(err("commit"))?;
        let author = commit.author().map_err(err("author"))?.trim();
        let time = author.time().map_err(err("author time"))?.seconds;
        let message = commit.message_raw().map_err(err("message"))?;
        let message = message.to_str_lossy().trim_end().to_owned();

        let files = self.changed_paths(repo, &hex, &commit)?;

        Ok(CommitInfo {
            id: hex,
            author: author.name.to_str_lossy().into_owned(),
            email: author.email.to_str_lossy().into_owned(),
            time,
            message,
            files,
        })
    }

    /// Paths `commit` changed against its first parent (every file for a root commit), sorted.
    fn changed_paths(
        &self,
        repo: &gix::Repository,
        hex: &str,
        commit: &gix::Commit<'_>,
    ) -> Result<Vec<String>, MirrorError> {
        let err = |what: &str| {
            let what = what.to_owned();
            move |source| MirrorError::Read { url: self.url.clone(), commit: hex.to_owned(), what, source }
        };
        let tree = commit.tree().map_err(err("tree"))?;
        let parent_tree = match commit.parent_ids().next() {
            Some(parent) => Some(repo.find_commit(parent).and_then(|p| p.tree()).map_err(err("first parent's tree"))?),
            None => None,
        };
        let empty = repo.empty_tree();
        let lhs = parent_tree.as_ref().unwrap_or(&empty);
        let mut recorder = gix::diff::tree::Recorder::default();
        gix::diff::tree(
            gix::objs::TreeRefIter::from_bytes(&lhs.data, lhs.id.kind()),
            gix::objs::TreeRefIter::from_bytes(&tree.data, tree.id.kind()),
            gix::diff::tree::State::default(),
            &repo.objects,
            &mut recorder,
        )
        .map_err(|e| err("changed paths")(gix::Error::from_error(e)))?;
        let mut files: Vec<String> = recorder
            .records
            .into_iter()
            .filter_map(|change| {
                use gix::diff::tree::recorder::Change;
                match change {
                    Change::Addition { entry_mode, path, .. } | Change::Deletion { entry_mode, path, .. } => {
                        (!entry_mode.is_tree()).then_some(path)
                    }
                    Change::Modification { previous_entry_mode, entry_mode, path, .. } => {
                        (!(entry_mode.is_tree() && previous_entry_mode.is_tree())).then_some(path)
                    }
                }
            })
            .map(|p| p.to_str_lossy().into_owned())
            .collect();
        files.sort();
        files.dedup();
        Ok(files)
    }

    /// Short name → id, for every ref under `prefix` (e.g. `refs/rbb/recorded/`).
    fn prefixed_heads(&self, repo: &gix::Repository, prefix: &str) -> Result<BTreeMap<String, ObjectId>, MirrorError> {
        let err = |source| self.refs_err("list recorded branches", source);
        let mut heads = BTreeMap::new();
        let platform = repo.references().map_err(err)?;
        for r in platform.prefixed(prefix).map_err(err)? {
            let mut r = r.map_err(err)?;
            let name = r.name().as_bstr().to_str_lossy().into_owned();
            let id = r.peel_to_id().map_err(err)?.detach();
            heads.insert(name.strip_prefix(prefix).unwrap_or(&name).to_owned(), id);
        }
        Ok(heads)
    }

    /// Short branch name → head id, for every branch in the mirror.
    fn branch_heads(&self, repo: &gix::Repository) -> Result<BTreeMap<String, ObjectId>, MirrorError> {
        let err = |source| self.refs_err("list branches", source);
        let mut heads = BTreeMap::new();
        for r in repo.references().map_err(err)?.local_branches().map_err(err)? {
            let r = r.map_err(err)?;
            let Some(id) = r.try_id() else { continue };
            let name = r.name().as_bstr().to_str_lossy();
            let short = name.strip_prefix("refs/heads/").unwrap_or(&name).to_owned();
            heads.insert(short, id.detach());
        }
        Ok(heads)
    }

    /// Deletes local branches and tags that are not in `on_remote` (full ref names).
    fn prune(&self, repo: &gix::Repository, on_remote: &HashSet<BString>) -> Result<(), MirrorError> {
        let err = |source| self.refs_err("list refs to prune", source);
        let platform = repo.references().map_err(err)?;
        let mut edits = Vec::new();
        for prefix in PRUNED_PREFIXES {
            for r in platform.prefixed(prefix).map_err(err)? {
                let r = r.map_err(err)?;
                if on_remote.contains(r.name().as_bstr()) {
                    continue;
                }
                debug!(name = %r.name().as_bstr(), "pruning ref gone from the remote");
                edits.push(RefEdit {
                    change: Change::Delete {
                        expected: PreviousValue::MustExistAndMatch(r.target().into_owned()),
                        log: RefLog::AndReference,
                    },
                    name: r.name().to_owned(),
                    deref: false,
                });
            }
        }
        if !edits.is_empty() {
            repo.edit_references(edits).map_err(|source| self.refs_err("delete refs gone from the remote", source))?;
        }
        Ok(())
    }

    fn refs_err(&self, action: &str, source: gix::Error) -> MirrorError {
        MirrorError::Refs { url: self.url.clone(), path: self.path.clone(), action: action.to_owned(), source }
    }

    fn read_err(&self, commit: &str, what: impl Into<String>, source: gix::Error) -> MirrorError {
        MirrorError::Read { url: self.url.clone(), commit: commit.to_owned(), what: what.into(), source }
    }
}

fn compile_globs(globs: &[String]) -> Result<globset::GlobSet, MirrorError> {
    let mut set = globset::GlobSetBuilder::new();
    for glob in globs {
        let g = globset::GlobBuilder::new(glob)
            .literal_separator(true)
            .build()
            .map_err(|source| MirrorError::Glob { glob: glob.clone(), source })?;
        set.add(g);
    }
    set.build().map_err(|source| MirrorError::Glob { glob: globs.join(", "), source })
}

/// Branches matching `globs` whose head differs between `before` and `after`, sorted by name.
fn diff_heads(
    before: &BTreeMap<String, ObjectId>,
    after: &BTreeMap<String, ObjectId>,
    globs: &globset::GlobSet,
) -> Vec<RefUpdate> {
    let names: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    names
        .into_iter()
        .filter(|name| globs.is_match(name.as_str()))
        .filter_map(|name| {
            let old = before.get(name);
            let new = after.get(name);
            (old != new).then(|| RefUpdate {
                branch: name.clone(),
                old: old.map(|id| id.to_hex().to_string()),
                new: new.map(|id| id.to_hex().to_string()),
            })
        })
        .collect()
}
