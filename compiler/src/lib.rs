//! The rbb compiler: every repository's `.rbb/pipeline.yaml` in, one plan (a DAG of builders
//! and steps) and a list of diagnostics out.
//!
//! The core ([`compile`]) is pure: it reads no files and talks to no network. Sources come
//! from [`git`] (or from memory in tests), Python snippets go through the
//! [`snippet::Evaluator`] the caller passes in. A user's mistake is never a panic or an
//! `Err`: it is a [`Diagnostic`] with file:line:col, and compilation carries on to find the
//! next one.

pub mod cache_key;
pub mod condition;
pub mod cron;
pub mod diagnostic;
pub mod diff;
pub mod duration;
pub mod git;
mod incremental;
mod lower;
mod merge;
mod parse;
pub mod render;
pub mod runner;
pub mod snippet;
pub mod spans;

pub use diagnostic::{Diagnostic, Diagnostics, Printed, Severity};
pub use incremental::FrontEndCache;
pub use parse::{FileList, NotUtf8, Origin, Source, decode_text, valid_env_name, valid_name};
use rbb_schema::plan::Plan;

/// Knobs of one compile.
#[derive(Debug, Clone)]
pub struct Options {
    /// Most combinations one matrix may expand to.
    pub max_matrix: usize,
    /// Step timeout when neither the step nor its builder sets one.
    pub default_timeout_secs: u64,
    /// Label sets of the configured workers; when given, a builder no worker can run is
    /// reported (as a warning).
    pub worker_labels: Option<Vec<Vec<String>>>,
    /// Other repositories are not part of this compile (`rbb validate`): `needs` naming
    /// them are not checked.
    pub other_repos_unknown: bool,
    /// Lock names the master config declares; when given, a builder taking another lock is
    /// an error.
    pub locks: Option<Vec<String>>,
    /// Repositories left out of this compile because their pipeline does not compile (name →
    /// the file to fix). A builder that needs one of their builders is left out of the plan
    /// with a warning naming that repository, and so is everything that needs it: one
    /// repository's mistake never becomes another's error.
    pub broken_repos: std::collections::BTreeMap<String, String>,
    /// Secrets the master config declares (name → the repositories that may use it; empty
    /// means every repository). Names only: the compiler never sees a value. When given, a
    /// step using another secret, or one its repository may not use, is an error.
    pub secrets: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_matrix: 256,
            default_timeout_secs: 3600,
            worker_labels: None,
            other_repos_unknown: false,
            locks: None,
            broken_repos: std::collections::BTreeMap::new(),
            secrets: None,
        }
    }
}

/// The result of a compile: a plan when there were no errors, and every diagnostic.
#[derive(Debug, Clone)]
pub struct Compilation {
    pub plan: Option<Plan>,
    /// Sorted by file, line and column.
    pub diagnostics: Vec<Diagnostic>,
    /// What snippets printed (`rbb compile --verbose` shows it; a failing snippet's output
    /// is also part of its diagnostic).
    pub printed: Vec<Printed>,
}

impl Compilation {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Compiles every source into one plan.
pub fn compile(sources: &[Source], eval: &dyn snippet::Evaluator, opts: &Options) -> Compilation {
    compile_with(sources, eval, opts, None)
}

/// [`compile`], reusing the per-file work (parsing, lowering, snippets) of every source that
/// `cache` has seen unchanged: only the files that changed are parsed again, then the whole
/// plan is merged. The result is the one [`compile`] gives for the same input.
pub fn compile_incremental(
    sources: &[Source],
    eval: &dyn snippet::Evaluator,
    opts: &Options,
    cache: &FrontEndCache,
) -> Compilation {
    compile_with(sources, eval, opts, Some(cache))
}

fn compile_with(
    sources: &[Source],
    eval: &dyn snippet::Evaluator,
    opts: &Options,
    cache: Option<&FrontEndCache>,
) -> Compilation {
    let mut diags = Diagnostics::default();
    let mut seen_repos = std::collections::BTreeMap::new();
    for s in sources {
        let repo_error = |code, message: String, hint: String| Diagnostic {
            severity: Severity::Error,
            code,
            repo: Some(s.repo.clone()),
            file: s.file.clone(),
            line: 0,
            col: 0,
            message,
            hint: Some(hint),
        };
        if !valid_name(&s.repo) {
            diags.push(repo_error(
                "bad-name",
                format!("invalid repository name `{}`", s.repo),
                "set `name:` for this repository in the master config (letters, digits, `.`, `_`, `-`)".into(),
            ));
        }
        if let Some(other) = seen_repos.insert(s.repo.clone(), s.file.clone()) {
            diags.push(repo_error(
                "duplicate-repo",
                format!("two repositories are named `{}`", s.repo),
                format!("the other is {other}; set a distinct `name:` in the master config"),
            ));
        }
    }
    let parts = match cache {
        None => front_ends(sources, eval, opts),
        Some(cache) => cache.front_ends(sources, eval, opts),
    };
    let mut lowered = Vec::new();
    let mut broken = merge::Broken::default();
    for part in parts {
        lowered.extend(part.lowered);
        broken.builders.extend(part.broken.builders);
        broken.repos.extend(part.broken.repos);
        diags.extend(part.diags);
    }
    // Merge even after errors, to report unknown `needs` and cycles among what did compile.
    let plan = merge::merge(sources, lowered, &broken, opts, &mut diags);
    let plan = if diags.has_errors() { None } else { plan };
    let printed = diags.take_printed();
    Compilation { plan, diagnostics: diags.into_sorted(), printed }
}

/// Parses and lowers every source: files are independent until the merge, so this runs on
/// every core.
fn front_ends(sources: &[Source], eval: &dyn snippet::Evaluator, opts: &Options) -> Vec<FrontEnd> {
    if sources.is_empty() {
        return Vec::new();
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunk = if sources.len() < 16 { sources.len() } else { sources.len().div_ceil(threads) };
    std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .chunks(chunk)
            .enumerate()
            .map(|(n, part)| scope.spawn(move || front_end(part, n * chunk, eval, opts)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}

/// What the per-file passes produce for a run of sources.
#[derive(Clone)]
struct FrontEnd {
    lowered: Vec<lower::Lowered>,
    broken: merge::Broken,
    diags: Diagnostics,
}

/// Parses and lowers `sources`, the first of which is number `first` of the compile.
fn front_end(sources: &[Source], first: usize, eval: &dyn snippet::Evaluator, opts: &Options) -> FrontEnd {
    let mut out = FrontEnd { lowered: Vec::new(), broken: Default::default(), diags: Diagnostics::default() };
    for (i, src) in sources.iter().enumerate() {
        let parsed = parse::parse_file(src, eval, &mut out.diags);
        if parsed.unreadable {
            out.broken.repos.insert(src.repo.clone());
        }
        for name in parsed.broken {
            out.broken.builders.insert((src.repo.clone(), name));
        }
        for b in &parsed.builders {
            let lowered = lower::lower(&parsed.ctx, first + i, b, eval, opts, &mut out.diags);
            if lowered.is_empty() {
                out.broken.builders.insert((src.repo.clone(), b.name.clone()));
            }
            out.lowered.extend(lowered);
        }
    }
    out
}

/// Renders diagnostics the way the CLI prints them, with source lines from `sources`.
pub fn render_diagnostics(diagnostics: &[Diagnostic], sources: &[Source]) -> String {
    let mut out = String::new();
    for d in diagnostics {
        let text = sources.iter().find(|s| s.file == d.file).map(|s| s.text.as_str());
        out.push_str(&d.render(text));
        out.push('\n');
    }
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = diagnostics.len() - errors;
    if errors > 0 || warnings > 0 {
        out.push_str(&format!("{errors} error(s), {warnings} warning(s)\n"));
    }
    out
}
