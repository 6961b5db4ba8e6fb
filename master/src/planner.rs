//! Plans per commit: the pipeline a build runs comes from the commit being built, and one
//! repository's broken pipeline fails only that repository.
//!
//! A plan for commit C of repository R is R's `.rbb/pipeline.yaml` at C, merged with every
//! other repository's pipeline at the head of its pipeline branch, or, while that head does
//! not compile, at the last head that did. "Last good" is kept in memory only: after a restart
//! a repository whose head does not compile has no builders until it is fixed, and
//! [`Planner::broken`] says why. A builder that needs a builder of such a repository is left
//! out of the plan with a warning naming that repository.
//!
//! Plans are cached by everything a snippet can read: per repository its name, branch,
//! pipeline blob id (which fixes `ctx["pipeline"]`) and the list of file paths of the commit
//! (`ctx["files"]`), plus the set of repositories left out. The cache holds a bounded number
//! of compiles: its cost follows the commits in flight, not history. Below it, each file's
//! parsed and lowered builders are kept too ([`FrontEndCache`]): a new commit of one
//! repository in a fleet of a thousand parses one file and merges, it does not recompile the
//! fleet.
//!
//! A git read error (a commit or object that is not there) is a [`PlanError::Read`], never a
//! pipeline that does not compile.

use rbb_compiler::snippet::{ChildEvaluator, Limits, NoSnippets};
use rbb_compiler::{Diagnostic, FrontEndCache, Options, Source, compile, compile_incremental, git, render_diagnostics};
use rbb_schema::config::PIPELINE_PATH;
use rbb_schema::hex;
use rbb_schema::plan::Plan;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// How many compiles the cache keeps.
const CACHE_ENTRIES: usize = 64;

/// A repository as the planner reads it.
#[derive(Debug, Clone)]
pub struct PlanRepo {
    pub name: String,
    pub url: String,
    /// Where to read git objects from (the repository itself, or its mirror).
    pub path: PathBuf,
    pub branch: String,
}

/// Why there is no plan for a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// The repository's own pipeline at that commit does not compile: rendered diagnostics
    /// of that repository's file only. The engine records a FAILURE build with them as log.
    Pipeline(Arc<String>),
    /// The commit or pipeline could not be read from git (cause included). The engine records
    /// an EXCEPTION, never a compile failure.
    Read(Arc<String>),
}

impl PlanError {
    /// The rendered diagnostics, or the git error.
    pub fn text(&self) -> &str {
        match self {
            PlanError::Pipeline(t) | PlanError::Read(t) => t,
        }
    }
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::Pipeline(d) => write!(f, "the pipeline does not compile:\n{d}"),
            PlanError::Read(e) => write!(f, "cannot read the pipeline from git: {e}"),
        }
    }
}

/// One compile, as cached: the plan when there were no errors, and every diagnostic.
struct Compiled {
    plan: Option<Arc<Plan>>,
    diagnostics: Vec<Diagnostic>,
}

/// A plan compiled with every repository that does not compile left out.
struct Isolated {
    plan: Arc<Plan>,
    /// The source each repository in the plan was compiled from.
    used: BTreeMap<String, Arc<Source>>,
    /// Repositories whose preferred source did not compile, with its diagnostics.
    failed: BTreeMap<String, Arc<String>>,
}

/// The branch heads and what the head plan was compiled from.
struct Heads {
    /// Each repository's pipeline at the head of its branch (`None`: no pipeline file).
    sources: BTreeMap<String, Option<Arc<Source>>>,
    /// The last head of each repository that compiled (memory only).
    good: BTreeMap<String, Arc<Source>>,
    /// What the head plan was compiled from (a head, or a last good version).
    used: BTreeMap<String, Arc<Source>>,
    /// Repositories whose head does not compile.
    broken: BTreeMap<String, Arc<String>>,
    plan: Arc<Plan>,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<String, Arc<Compiled>>,
    order: VecDeque<String>,
}

pub struct Planner {
    repos: BTreeMap<String, PlanRepo>,
    eval: ChildEvaluator,
    opts: Options,
    heads: Mutex<Heads>,
    /// Serialises head updates (reads and compiles run outside `heads`' lock).
    updating: Mutex<()>,
    cache: Mutex<Cache>,
    /// Each file's parsed and lowered builders: a compile after one repository changed
    /// parses that repository's file only (room for every repository twice: a head and the
    /// commit being built).
    front_ends: FrontEndCache,
}

impl Planner {
    pub fn new(repos: Vec<PlanRepo>, opts: Options, eval: ChildEvaluator) -> Planner {
        let plan = Arc::new(empty_plan(&opts));
        let front_ends = FrontEndCache::new(2 * repos.len() + CACHE_ENTRIES);
        Planner {
            front_ends,
            repos: repos.into_iter().map(|r| (r.name.clone(), r)).collect(),
            eval,
            opts,
            heads: Mutex::new(Heads {
                sources: BTreeMap::new(),
                good: BTreeMap::new(),
                used: BTreeMap::new(),
                broken: BTreeMap::new(),
                plan,
            }),
            updating: Mutex::new(()),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// An evaluator that runs snippets in `rbb snippet-runner`.
    pub fn default_evaluator() -> ChildEvaluator {
        snippet_evaluator(Limits::default())
    }

    fn source_at(&self, repo: &PlanRepo, rev: &str) -> Result<Option<Arc<Source>>, String> {
        let found = git::read_pipeline(&repo.path, rev).map_err(|e| e.to_string())?;
        Ok(found.text.map(|text| {
            Arc::new(Source {
                repo: repo.name.clone(),
                file: format!("{}/{PIPELINE_PATH}", repo.name),
                text,
                branch: repo.branch.clone(),
                files: found.files.into(),
                origin: rbb_compiler::Origin {
                    url: repo.url.clone(),
                    commit: Some(found.commit),
                    blob: found.blob,
                    pipeline_path: PIPELINE_PATH.to_owned(),
                },
                not_utf8: found.not_utf8,
            })
        }))
    }

    fn heads(&self) -> std::sync::MutexGuard<'_, Heads> {
        self.heads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads every repository's pipeline at its branch head again and recompiles the head
    /// plan. A repository that cannot be read keeps its previous head; the error lists them.
    pub fn refresh_heads(&self) -> Result<(), String> {
        let _updating = self.updating.lock().unwrap_or_else(|p| p.into_inner());
        let mut sources = self.heads().sources.clone();
        let mut errors = Vec::new();
        for r in self.repos.values() {
            match self.source_at(r, &r.branch) {
                Ok(s) => {
                    sources.insert(r.name.clone(), s);
                }
                Err(e) => errors.push(format!("repository `{}`: {e}", r.name)),
            }
        }
        self.settle(sources);
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }

    /// Records that `repo`'s pipeline branch moved to `commit`, and recompiles the head plan.
    pub fn head_moved(&self, repo: &str, commit: &str) -> Result<(), String> {
        let r = self.repos.get(repo).ok_or_else(|| format!("unknown repository {repo}"))?;
        let _updating = self.updating.lock().unwrap_or_else(|p| p.into_inner());
        let s = self.source_at(r, commit)?;
        let mut sources = self.heads().sources.clone();
        sources.insert(repo.to_owned(), s);
        self.settle(sources);
        Ok(())
    }

    /// Compiles the head plan from `sources`, falling back to the last good version of each
    /// repository whose head does not compile.
    fn settle(&self, sources: BTreeMap<String, Option<Arc<Source>>>) {
        let mut good = self.heads().good.clone();
        let candidates: BTreeMap<String, Vec<Arc<Source>>> = sources
            .iter()
            .filter_map(|(name, head)| {
                let head = head.clone()?;
                let mut list = vec![head.clone()];
                if let Some(g) = good.get(name)
                    && !same_input(g, &head)
                {
                    list.push(g.clone());
                }
                Some((name.clone(), list))
            })
            .collect();
        let isolated = self.compile_isolated(&candidates, &BTreeMap::new(), true);
        for (name, used) in &isolated.used {
            if candidates.get(name).and_then(|c| c.first()).is_some_and(|head| same_input(head, used)) {
                good.insert(name.clone(), used.clone());
            }
        }
        let before = self.heads().broken.clone();
        for (name, diags) in &isolated.failed {
            if before.get(name) == Some(diags) {
                continue;
            }
            let fallback = if isolated.used.contains_key(name) {
                "its last good version stays in the plan"
            } else {
                "it has no builders in the plan until it compiles"
            };
            tracing::warn!(repo = %name, "the pipeline at the branch head does not compile; {fallback}:\n{diags}");
        }
        for name in before.keys().filter(|n| !isolated.failed.contains_key(*n)) {
            tracing::info!(repo = %name, "the pipeline at the branch head compiles again");
        }
        let mut heads = self.heads();
        heads.sources = sources;
        heads.good = good;
        heads.used = isolated.used;
        heads.broken = isolated.failed;
        heads.plan = isolated.plan;
    }

    /// Whether `repo`'s branch head has been read (with or without a pipeline file).
    pub fn has_head(&self, repo: &str) -> bool {
        self.heads().sources.contains_key(repo)
    }

    /// The plan of every repository at its branch head (a broken one at its last good
    /// version, or left out).
    pub fn head_plan(&self) -> Arc<Plan> {
        self.heads().plan.clone()
    }

    /// Repositories whose pipeline at their branch head does not compile, with diagnostics.
    /// For one with no last good version, the text also lists the builders of other
    /// repositories left out of the head plan because they need its builders.
    pub fn broken(&self) -> BTreeMap<String, Arc<String>> {
        self.heads().broken.clone()
    }

    /// The plan a build of `repo` at `commit` runs. Fails only for `repo`'s own mistakes.
    pub fn plan_at(&self, repo: &str, commit: &str) -> Result<Arc<Plan>, PlanError> {
        let r = self.repos.get(repo).ok_or_else(|| PlanError::Read(Arc::new(format!("unknown repository {repo}"))))?;
        let own = self.source_at(r, commit).map_err(|e| PlanError::Read(Arc::new(e)))?;
        let (mut candidates, left_out) = {
            let heads = self.heads();
            let candidates: BTreeMap<String, Vec<Arc<Source>>> = heads
                .used
                .iter()
                .filter(|(name, _)| name.as_str() != repo)
                .map(|(name, s)| (name.clone(), vec![s.clone()]))
                .collect();
            let left_out: BTreeMap<String, String> = heads
                .broken
                .keys()
                .filter(|name| name.as_str() != repo && !heads.used.contains_key(*name))
                .map(|name| (name.clone(), format!("{name}/{PIPELINE_PATH}")))
                .collect();
            (candidates, left_out)
        };
        if let Some(own) = own {
            candidates.insert(repo.to_owned(), vec![own]);
        }
        let isolated = self.compile_isolated(&candidates, &left_out, false);
        match isolated.failed.get(repo) {
            Some(diags) => Err(PlanError::Pipeline(diags.clone())),
            None => Ok(isolated.plan),
        }
    }

    /// Compiles one candidate source per repository (the first of its list). Each repository
    /// with errors in its own file moves on to its next candidate, or is left out, and the
    /// rest compiles again, until nothing has errors.
    fn compile_isolated(
        &self,
        candidates: &BTreeMap<String, Vec<Arc<Source>>>,
        left_out: &BTreeMap<String, String>,
        explain_left_out: bool,
    ) -> Isolated {
        let mut next: BTreeMap<&str, usize> = candidates.keys().map(|k| (k.as_str(), 0)).collect();
        let mut failed = BTreeMap::new();
        // Each round moves at least one repository on, so this ends.
        loop {
            let mut used = BTreeMap::new();
            let mut broken = left_out.clone();
            for (name, list) in candidates {
                match list.get(next[name.as_str()]) {
                    Some(s) => {
                        used.insert(name.clone(), s.clone());
                    }
                    None => {
                        broken.insert(name.clone(), format!("{name}/{PIPELINE_PATH}"));
                    }
                }
            }
            let sources: Vec<Arc<Source>> = used.values().cloned().collect();
            let compiled = self.compile_cached(&sources, &broken);
            if let Some(plan) = &compiled.plan {
                // For the head plan, a repository left out says which builders of the others
                // went with it (a build's diagnostics stay its own repository's).
                for (name, text) in failed.iter_mut().filter(|_| explain_left_out) {
                    let needing = format!("pipeline of repository `{name}` does not compile");
                    let left: Vec<Diagnostic> = compiled
                        .diagnostics
                        .iter()
                        .filter(|d| d.code == "needs-broken-repo" && d.message.contains(&needing))
                        .cloned()
                        .collect();
                    if !left.is_empty() && !used.contains_key(name) {
                        *text = Arc::new(format!(
                            "{text}\nWhile it does not compile, these builders of other repositories are left out:\n{}",
                            render_diagnostics(&left, &owned(&sources))
                        ));
                    }
                }
                return Isolated { plan: with_origins(plan, &sources), used, failed };
            }
            let mut failing: Vec<&str> = compiled
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .filter_map(|d| d.repo.as_deref())
                .filter(|r| used.contains_key(*r))
                .collect();
            if failing.is_empty() {
                // Errors no repository owns: leave every repository out rather than loop.
                failing = used.keys().map(String::as_str).collect();
            }
            failing.sort_unstable();
            failing.dedup();
            if failing.is_empty() {
                return Isolated { plan: Arc::new(empty_plan(&self.opts)), used: BTreeMap::new(), failed };
            }
            for name in failing {
                let Some((key, n)) = next.get_key_value(name).map(|(k, n)| (*k, *n)) else { continue };
                if n == 0 {
                    let own: Vec<Diagnostic> =
                        compiled.diagnostics.iter().filter(|d| d.repo.as_deref() == Some(name)).cloned().collect();
                    failed.insert(name.to_owned(), Arc::new(render_diagnostics(&own, &owned(&sources))));
                }
                next.insert(key, n + 1);
            }
        }
    }

    fn compile_cached(&self, sources: &[Arc<Source>], left_out: &BTreeMap<String, String>) -> Arc<Compiled> {
        let key = cache_key(sources, left_out);
        if let Some(hit) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).entries.get(&key) {
            return hit.clone();
        }
        let opts = Options { broken_repos: left_out.clone(), ..self.opts.clone() };
        let sources = owned(sources);
        let result = compile_incremental(&sources, &self.eval, &opts, &self.front_ends);
        if !result.diagnostics.is_empty() && !result.has_errors() {
            tracing::warn!("pipeline warnings:\n{}", render_diagnostics(&result.diagnostics, &sources));
        }
        let has_errors = result.has_errors();
        let compiled = Arc::new(Compiled {
            plan: result.plan.filter(|_| !has_errors).map(Arc::new),
            diagnostics: result.diagnostics,
        });
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.entries.insert(key.clone(), compiled.clone()).is_none() {
            cache.order.push_back(key);
        }
        while cache.order.len() > CACHE_ENTRIES {
            if let Some(old) = cache.order.pop_front() {
                cache.entries.remove(&old);
            }
        }
        compiled
    }
}

/// Everything a compile of `sources` depends on: per repository its name, branch, pipeline
/// blob and the paths of its commit's files (what snippets see as `ctx`), and the
/// repositories left out. Commits are not part of it: they only change provenance.
fn cache_key(sources: &[Arc<Source>], left_out: &BTreeMap<String, String>) -> String {
    let mut sorted: Vec<&Source> = sources.iter().map(|s| &**s).collect();
    sorted.sort_by(|a, b| a.repo.cmp(&b.repo));
    let mut key = String::new();
    for s in sorted {
        key.push_str(&format!(
            "{}\u{1}{}\u{1}{}\u{1}{}\u{0}",
            s.repo,
            s.branch,
            s.origin.blob.clone().unwrap_or_else(|| format!("text:{}", hex(&Sha256::digest(s.text.as_bytes())))),
            hex(s.files.digest())
        ));
    }
    for name in left_out.keys() {
        key.push_str(&format!("left-out\u{1}{name}\u{0}"));
    }
    key
}

/// Copies of `sources` for the compiler (a compile that is not in the cache, diagnostics).
fn owned(sources: &[Arc<Source>]) -> Vec<Source> {
    sources.iter().map(|s| Source::clone(s)).collect()
}

/// Whether two sources of one repository give snippets the same input.
fn same_input(a: &Source, b: &Source) -> bool {
    a.origin.blob == b.origin.blob && a.text == b.text && a.branch == b.branch && a.files == b.files
}

/// The plan of no repository at all.
fn empty_plan(opts: &Options) -> Plan {
    compile(&[], &NoSnippets, opts).plan.unwrap_or_else(|| Plan {
        format: rbb_schema::plan::PLAN_FORMAT,
        hash: String::new(),
        repos: Vec::new(),
        builders: Vec::new(),
    })
}

/// Runs snippets in this executable (`rbb snippet-runner`). rbb uses mimalloc, whose default
/// 1 GiB arena reservation would not fit under the runner's address-space limit: the runner
/// reserves small arenas instead.
pub fn snippet_evaluator(limits: Limits) -> ChildEvaluator {
    ChildEvaluator::current_exe_with(&["snippet-runner"], limits).env("MIMALLOC_ARENA_RESERVE", "16MiB")
}

/// `plan` with its repositories' commits and blob ids taken from `sources` (the plan itself
/// when they are already its own).
fn with_origins(plan: &Arc<Plan>, sources: &[Arc<Source>]) -> Arc<Plan> {
    let by_repo: HashMap<&str, &Source> = sources.iter().map(|s| (s.repo.as_str(), &**s)).collect();
    let differs = |r: &rbb_schema::plan::PlanRepo| {
        by_repo.get(r.name.as_str()).is_some_and(|s| r.commit != s.origin.commit || r.pipeline_blob != s.origin.blob)
    };
    if !plan.repos.iter().any(differs) {
        return plan.clone();
    }
    let mut p = Plan::clone(plan);
    for r in &mut p.repos {
        if let Some(s) = by_repo.get(r.name.as_str()) {
            r.commit = s.origin.commit.clone();
            r.pipeline_blob = s.origin.blob.clone();
        }
    }
    Arc::new(p)
}
