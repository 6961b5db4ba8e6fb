//! Where sources come from: the master config, and each repository's pipeline file read
//! straight from git at a branch or revision (gix; no checkout, no `git` process).
//!
//! This is the only module of the compiler that touches the filesystem. Failures to read a
//! repository are diagnostics pointing at its entry in the master config.

use crate::diagnostic::{Diagnostic, Severity};
use crate::parse::{FileCtx, NotUtf8, Origin, Source, decode_text, type_diag};
use crate::spans::{Pos, Seg, SpanIndex, key};
use rbb_schema::config::{MasterConfig, PIPELINE_PATH, RepositoryConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A pipeline file as found at one commit.
#[derive(Debug, Clone)]
pub struct PipelineAtRev {
    pub commit: String,
    /// Blob id and text of `.rbb/pipeline.yaml`; `None` if the commit has no such file.
    pub blob: Option<String>,
    pub text: Option<String>,
    /// Where the file stops being UTF-8, if it does (`text` is then for display only).
    pub not_utf8: Option<NotUtf8>,
    /// Every file path in the commit's tree.
    pub files: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot open git repository at {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("revision `{rev}` does not exist in {path}")]
    Rev { path: PathBuf, rev: String },
    #[error("cannot read {what} at `{rev}` in {path}: {message}")]
    Read { path: PathBuf, rev: String, what: String, message: String },
}

/// The commit `rev` names: a local branch, a remote-tracking branch of `origin`, or any
/// revision (tags are peeled).
fn find_commit<'r>(repo: &'r gix::Repository, repo_path: &Path, rev: &str) -> Result<gix::Commit<'r>, GitError> {
    let not_found = || GitError::Rev { path: repo_path.to_owned(), rev: rev.to_owned() };
    let candidates = [format!("refs/heads/{rev}"), format!("refs/remotes/origin/{rev}"), rev.to_owned()];
    let id = candidates.iter().find_map(|spec| repo.rev_parse_single(spec.as_str()).ok()).ok_or_else(not_found)?;
    id.object().and_then(|o| o.peel_to_commit()).map_err(|e| GitError::Read {
        path: repo_path.to_owned(),
        rev: rev.to_owned(),
        what: "commit".to_owned(),
        message: e.to_string(),
    })
}

/// Resolves `rev` in the repository at `repo_path` to a commit id.
pub fn resolve_commit(repo_path: &Path, rev: &str) -> Result<String, GitError> {
    let repo =
        gix::open(repo_path).map_err(|e| GitError::Open { path: repo_path.to_owned(), message: e.to_string() })?;
    Ok(find_commit(&repo, repo_path, rev)?.id.to_string())
}

/// Reads the pipeline file and the file list at `rev` (a branch, tag or commit id).
pub fn read_pipeline(repo_path: &Path, rev: &str) -> Result<PipelineAtRev, GitError> {
    let repo =
        gix::open(repo_path).map_err(|e| GitError::Open { path: repo_path.to_owned(), message: e.to_string() })?;
    let read_err = |what: &str, e: &dyn std::fmt::Display| GitError::Read {
        path: repo_path.to_owned(),
        rev: rev.to_owned(),
        what: what.to_owned(),
        message: e.to_string(),
    };
    let commit = find_commit(&repo, repo_path, rev)?;
    let tree = commit.tree().map_err(|e| read_err("tree", &e))?;
    let (blob, text, not_utf8) =
        match tree.lookup_entry_by_path(PIPELINE_PATH).map_err(|e| read_err(PIPELINE_PATH, &e))? {
            None => (None, None, None),
            Some(entry) => {
                let object = entry.object().map_err(|e| read_err(PIPELINE_PATH, &e))?;
                let (text, not_utf8) = decode_text(object.detach().data);
                (Some(entry.oid().to_string()), Some(text), not_utf8)
            }
        };
    let mut recorder = gix::traverse::tree::Recorder::default();
    tree.traverse().breadthfirst(&mut recorder).map_err(|e| read_err("file list", &e))?;
    let mut files: Vec<String> =
        recorder.records.into_iter().filter(|e| !e.mode.is_tree()).map(|e| e.filepath.to_string()).collect();
    files.sort();
    Ok(PipelineAtRev { commit: commit.id.to_string(), blob, text, not_utf8, files })
}

/// A master config read from disk.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: MasterConfig,
    pub path: PathBuf,
    pub text: String,
    spans: SpanIndex,
}

impl LoadedConfig {
    /// The directory relative paths in the config are relative to.
    pub fn dir(&self) -> PathBuf {
        self.path.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    fn pos(&self, path: &[Seg]) -> Pos {
        self.spans.value(path)
    }

    /// Local filesystem path of a repository entry (`file://` stripped, relative to the config).
    pub fn repo_path(&self, repo: &RepositoryConfig) -> Result<PathBuf, String> {
        let url = repo.url.as_str();
        let raw = if let Some(rest) = url.strip_prefix("file://") {
            rest
        } else if url.contains("://") || url.starts_with("git@") {
            return Err(format!("`{url}` is a remote URL; only local paths and file:// URLs can be read here"));
        } else {
            url
        };
        let p = PathBuf::from(raw);
        Ok(if p.is_absolute() { p } else { self.dir().join(p) })
    }
}

/// Reads and types a master config; mistakes come back as diagnostics.
pub fn load_config(path: &Path) -> Result<LoadedConfig, Vec<Diagnostic>> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| {
        vec![Diagnostic {
            severity: Severity::Error,
            code: "config-read",
            repo: None,
            file: shown.clone(),
            line: 0,
            col: 0,
            message: format!("cannot read the master config: {e}"),
            hint: Some("pass the config with --config PATH".into()),
        }]
    })?;
    let (text, not_utf8) = decode_text(bytes);
    if let Some(bad) = not_utf8 {
        return Err(vec![Diagnostic {
            severity: Severity::Error,
            code: "not-utf8",
            repo: None,
            file: shown,
            line: bad.line,
            col: bad.col,
            message: format!("the master config is not UTF-8: byte 0x{:02X} cannot be read as text", bad.byte),
            hint: Some("save the file as UTF-8".into()),
        }]);
    }
    let src = Source {
        repo: String::new(),
        file: shown.clone(),
        text: text.clone(),
        branch: String::new(),
        files: Vec::new(),
        origin: Origin::default(),
        not_utf8: None,
    };
    let ctx = FileCtx { src: &src, spans: SpanIndex::build(&text) };
    let fix = |mut d: Diagnostic| {
        d.repo = None;
        d
    };
    let value: serde_yaml::Value = match serde_yaml::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            let (line, col) = e.location().map(|l| (l.line() as u32, l.column() as u32)).unwrap_or((1, 1));
            return Err(vec![fix(ctx.diag(
                "yaml-syntax",
                Pos { line, col },
                format!(
                    "YAML syntax error in the master config: {}",
                    e.to_string().split(" at line ").next().unwrap_or("")
                ),
                Some("check the indentation and quoting around this position".into()),
            ))]);
        }
    };
    let value = if value.is_null() { serde_yaml::Value::Mapping(Default::default()) } else { value };
    let config: MasterConfig = serde_path_to_error::deserialize(value)
        .map_err(|e| vec![fix(type_diag(&ctx, &Vec::new(), None, e, "the master config"))])?;
    let loaded = LoadedConfig { config, path: path.to_owned(), spans: SpanIndex::build(&text), text };
    let mut diags = Vec::new();
    let mut names = BTreeMap::new();
    for (i, r) in loaded.config.repositories.iter().enumerate() {
        let name = r.effective_name();
        if let Some(prev) = names.insert(name.clone(), i) {
            let pos = loaded.pos(&[key("repositories"), Seg::Index(i)]);
            diags.push(Diagnostic {
                severity: Severity::Error,
                code: "duplicate-repo",
                repo: None,
                file: shown.clone(),
                line: pos.line,
                col: pos.col,
                message: format!("repositories {} and {} are both named `{name}`", prev + 1, i + 1),
                hint: Some("give one of them a distinct `name:`".into()),
            });
        }
    }
    if diags.is_empty() { Ok(loaded) } else { Err(diags) }
}

/// Reads every configured repository's pipeline; `revs` overrides the branch per repository
/// name. Repositories that cannot be read become diagnostics at their config entry.
pub fn sources_from_config(cfg: &LoadedConfig, revs: &BTreeMap<String, String>) -> (Vec<Source>, Vec<Diagnostic>) {
    let mut sources = Vec::new();
    let mut diags = Vec::new();
    for (i, r) in cfg.config.repositories.iter().enumerate() {
        let name = r.effective_name();
        let rev = revs.get(&name).cloned().unwrap_or_else(|| r.effective_branch().to_owned());
        let url_pos = cfg.pos(&[key("repositories"), Seg::Index(i), key("url")]);
        let branch_pos = cfg.pos(&[key("repositories"), Seg::Index(i), key("branch")]);
        let diag = |severity, code, message: String, hint: Option<String>, pos: Pos| Diagnostic {
            severity,
            code,
            repo: Some(name.clone()),
            file: cfg.path.display().to_string(),
            line: pos.line,
            col: pos.col,
            message,
            hint,
        };
        let path = match cfg.repo_path(r) {
            Ok(p) => p,
            Err(msg) => {
                diags.push(diag(Severity::Error, "repo-url", msg, None, url_pos));
                continue;
            }
        };
        match read_pipeline(&path, &rev) {
            Err(e) => {
                let (hint, pos) = match e {
                    GitError::Rev { .. } => (
                        format!("set `branch:` for repository `{name}` to a branch that exists"),
                        if r.branch.is_some() && !revs.contains_key(&name) { branch_pos } else { url_pos },
                    ),
                    _ => ("check `url:`; it must be a git repository".into(), url_pos),
                };
                diags.push(diag(Severity::Error, "repo-read", e.to_string(), Some(hint), pos));
            }
            Ok(found) => match found.text {
                None => diags.push(diag(
                    Severity::Warning,
                    "no-pipeline",
                    format!("repository `{name}` has no {PIPELINE_PATH} at `{rev}`; it adds no builders"),
                    Some(format!("commit a {PIPELINE_PATH} to `{rev}`")),
                    url_pos,
                )),
                Some(text) => sources.push(Source {
                    repo: name.clone(),
                    file: format!("{name}/{PIPELINE_PATH}"),
                    text,
                    branch: r.effective_branch().to_owned(),
                    files: found.files,
                    origin: Origin {
                        url: r.url.clone(),
                        commit: Some(found.commit),
                        blob: found.blob,
                        pipeline_path: PIPELINE_PATH.to_owned(),
                    },
                    not_utf8: found.not_utf8,
                }),
            },
        }
    }
    (sources, diags)
}
