//! Plans per commit: the pipeline a build runs comes from the commit being built.
//!
//! A plan for commit C of repository R is R's `.rbb/pipeline.yaml` at C, merged with every
//! other repository's pipeline at the head of its pipeline branch. Plans are cached by the
//! blob ids of the files they came from, so a commit that does not touch a pipeline reuses
//! the plan compiled before. A pipeline that does not compile yields the rendered
//! diagnostics; the engine turns them into a visible failed build.

use rbb_compiler::snippet::{ChildEvaluator, Limits};
use rbb_compiler::{Options, Source, compile, git, render_diagnostics};
use rbb_schema::config::PIPELINE_PATH;
use rbb_schema::plan::Plan;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A repository as the planner reads it.
#[derive(Debug, Clone)]
pub struct PlanRepo {
    pub name: String,
    pub url: String,
    /// Where to read git objects from (the repository itself, or its mirror).
    pub path: PathBuf,
    pub branch: String,
}

/// A compiled plan, or the rendered diagnostics of a pipeline that does not compile.
pub type Compiled = Result<Arc<Plan>, Arc<String>>;

/// Why a commit has no plan.
#[derive(Debug, Clone)]
pub enum PlanError {
    /// The repository's own pipeline at that commit does not compile: rendered diagnostics.
    Pipeline(Arc<String>),
    /// The commit or its pipeline could not be read from git: the cause.
    Read(Arc<String>),
}

pub struct Planner {
    repos: BTreeMap<String, PlanRepo>,
    eval: ChildEvaluator,
    opts: Options,
    /// Each repository's pipeline at the head of its pipeline branch.
    heads: Mutex<BTreeMap<String, Option<Source>>>,
    cache: Mutex<HashMap<String, Compiled>>,
    last_head: Mutex<Option<Arc<Plan>>>,
}

impl Planner {
    pub fn new(repos: Vec<PlanRepo>, opts: Options, eval: ChildEvaluator) -> Planner {
        Planner {
            repos: repos.into_iter().map(|r| (r.name.clone(), r)).collect(),
            eval,
            opts,
            heads: Mutex::new(BTreeMap::new()),
            cache: Mutex::new(HashMap::new()),
            last_head: Mutex::new(None),
        }
    }

    /// An evaluator that runs snippets in `rbb snippet-runner`.
    pub fn default_evaluator() -> ChildEvaluator {
        snippet_evaluator(Limits::default())
    }

    fn source_at(&self, repo: &PlanRepo, rev: &str) -> Result<Option<Source>, String> {
        let found = git::read_pipeline(&repo.path, rev).map_err(|e| e.to_string())?;
        Ok(found.text.map(|text| Source {
            repo: repo.name.clone(),
            file: format!("{}/{PIPELINE_PATH}", repo.name),
            text,
            branch: repo.branch.clone(),
            files: found.files,
            origin: rbb_compiler::Origin {
                url: repo.url.clone(),
                commit: Some(found.commit),
                blob: found.blob,
                pipeline_path: PIPELINE_PATH.to_owned(),
            },
        }))
    }

    /// Reads every repository's pipeline at its branch head again.
    pub fn refresh_heads(&self) -> Result<(), String> {
        let mut heads = BTreeMap::new();
        for r in self.repos.values() {
            heads.insert(r.name.clone(), self.source_at(r, &r.branch)?);
        }
        *self.heads.lock().unwrap_or_else(|p| p.into_inner()) = heads;
        Ok(())
    }

    /// Records that `repo`'s pipeline branch moved to `commit`.
    pub fn head_moved(&self, repo: &str, commit: &str) -> Result<(), String> {
        let r = self.repos.get(repo).ok_or_else(|| format!("unknown repository {repo}"))?;
        let s = self.source_at(r, commit)?;
        self.heads.lock().unwrap_or_else(|p| p.into_inner()).insert(repo.to_owned(), s);
        Ok(())
    }

    /// The plan of every repository at its branch head.
    pub fn head_plan(&self) -> Arc<Plan> {
        let sources: Vec<Source> =
            self.heads.lock().unwrap_or_else(|p| p.into_inner()).values().flatten().cloned().collect();
        let mut last = self.last_head.lock().unwrap_or_else(|p| p.into_inner());
        match self.compile_cached(sources) {
            Ok(p) => {
                *last = Some(p.clone());
                p
            }
            Err(_) => last.clone().unwrap_or_else(|| {
                Arc::new(Plan {
                    format: rbb_schema::plan::PLAN_FORMAT,
                    hash: String::new(),
                    repos: Vec::new(),
                    builders: Vec::new(),
                })
            }),
        }
    }

    /// Repositories whose pipeline at the branch head does not compile, with diagnostics.
    pub fn broken(&self) -> BTreeMap<String, Arc<String>> {
        BTreeMap::new()
    }

    /// The plan a build of `repo` at `commit` runs.
    pub fn plan_at(&self, repo: &str, commit: &str) -> Result<Arc<Plan>, PlanError> {
        let r = self.repos.get(repo).ok_or_else(|| PlanError::Read(Arc::new(format!("unknown repository {repo}"))))?;
        let own = self.source_at(r, commit).map_err(|e| PlanError::Read(Arc::new(e)))?;
        let mut sources: Vec<Source> = self
            .heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(name, _)| name.as_str() != repo)
            .filter_map(|(_, s)| s.clone())
            .collect();
        sources.extend(own);
        self.compile_cached(sources).map_err(PlanError::Pipeline)
    }

    fn compile_cached(&self, mut sources: Vec<Source>) -> Result<Arc<Plan>, Arc<String>> {
        sources.sort_by(|a, b| a.repo.cmp(&b.repo));
        let key: String =
            sources.iter().map(|s| format!("{}={};", s.repo, s.origin.blob.as_deref().unwrap_or(""))).collect();
        if let Some(hit) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            // Same pipeline files: same plan; provenance (commits) follows the newest read.
            return hit.clone().map(|p| Arc::new(with_origins(&p, &sources)));
        }
        let result = compile(&sources, &self.eval, &self.opts);
        let out = match result.plan {
            Some(plan) if !result.has_errors() => Ok(Arc::new(plan)),
            _ => Err(Arc::new(render_diagnostics(&result.diagnostics, &sources))),
        };
        if !result.diagnostics.is_empty() && out.is_ok() {
            tracing::warn!("pipeline warnings:\n{}", render_diagnostics(&result.diagnostics, &sources));
        }
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, out.clone());
        out
    }
}

/// Runs snippets in this executable (`rbb snippet-runner`). rbb uses mimalloc, whose default
/// 1 GiB arena reservation would not fit under the runner's address-space limit: the runner
/// reserves small arenas instead.
pub fn snippet_evaluator(limits: Limits) -> ChildEvaluator {
    ChildEvaluator::current_exe_with(&["snippet-runner"], limits).env("MIMALLOC_ARENA_RESERVE", "16MiB")
}

/// `plan` with its repositories' commits and blob ids taken from `sources`.
fn with_origins(plan: &Plan, sources: &[Source]) -> Plan {
    let mut p = plan.clone();
    for r in &mut p.repos {
        if let Some(s) = sources.iter().find(|s| s.repo == r.name) {
            r.commit = s.origin.commit.clone();
            r.pipeline_blob = s.origin.blob.clone();
        }
    }
    p
}
