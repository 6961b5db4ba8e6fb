//! Where sources come from: the master config, and each repository's pipeline file read
//! straight from git at a branch or revision (gix; no checkout, no `git` process).
//!
//! This is the only module of the compiler that touches the filesystem. Failures to read a
//! repository are diagnostics pointing at its entry in the master config.
//!
//! Remote repositories (`https://`, `ssh://`, `git@host:path`, `git://`) are fetched into a
//! bare mirror by [`Remote::fetch`], which runs the `git` binary (already needed for
//! `file://`): its transports bring TLS, proxies, ssh and the forges' auth quirks, and a
//! process can be stopped when the forge stalls. Credentials reach git only through the
//! child's environment, never its arguments, and never appear in an error.

use crate::diagnostic::{Diagnostic, Severity};
use crate::parse::{FileCtx, NotUtf8, Origin, Source, decode_text, type_diag};
use crate::spans::{Pos, Seg, SpanIndex, key};
use rbb_schema::config::{MasterConfig, PIPELINE_PATH, RepoAuth, RepositoryConfig};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
        } else if is_remote_url(url) {
            return Err(format!("`{url}` is a remote URL; it is read through its mirror"));
        } else {
            url
        };
        Ok(self.resolve(raw))
    }

    fn resolve(&self, raw: &str) -> PathBuf {
        let p = PathBuf::from(raw);
        if p.is_absolute() { p } else { self.dir().join(p) }
    }

    /// The state directory the config names (`state_dir`, default `.rbb-state`).
    pub fn state_dir(&self) -> PathBuf {
        self.resolve(self.config.state_dir.as_deref().unwrap_or(".rbb-state"))
    }

    /// How to fetch a remote repository entry; `None` for a local one.
    pub fn remote(&self, repo: &RepositoryConfig) -> Result<Option<Remote>, String> {
        if !is_remote_url(&repo.url) {
            return Ok(None);
        }
        let timeout = match &repo.fetch_timeout {
            Some(v) => Duration::from_millis(crate::duration::parse_duration_ms(v.as_str())?.max(1)),
            None => DEFAULT_FETCH_TIMEOUT,
        };
        let auth = repo.auth.clone().map(|mut a| {
            for path in [&mut a.password_file, &mut a.ssh_key, &mut a.known_hosts].into_iter().flatten() {
                *path = self.resolve(path).display().to_string();
            }
            a
        });
        Ok(Some(Remote { url: repo.url.clone(), auth, timeout }))
    }
}

/// How long a remote fetch may take when the config does not say.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// Whether `url` names a repository behind a transport (not a local path or `file://`).
pub fn is_remote_url(url: &str) -> bool {
    match url.split_once("://") {
        Some((scheme, _)) => !scheme.eq_ignore_ascii_case("file"),
        None => scp_like(url),
    }
}

/// `[user@]host:path`, git's scp-like ssh syntax: a colon before any slash, after more than
/// one character (so `C:/x` stays a path).
fn scp_like(url: &str) -> bool {
    match (url.find(':'), url.find('/')) {
        (Some(colon), slash) => colon > 1 && slash.is_none_or(|s| colon < s),
        (None, _) => false,
    }
}

/// Whether a `scheme://user:password@host` URL carries a password.
fn url_has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else { return false };
    let authority = rest.split('/').next().unwrap_or("");
    authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// A remote repository and how to reach it. Its `Debug` hides the credentials.
#[derive(Clone, PartialEq)]
pub struct Remote {
    pub url: String,
    auth: Option<RepoAuth>,
    pub timeout: Duration,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url)
            .field("auth", &self.auth)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why a remote fetch failed. Messages name the repository URL and never hold a secret.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot fetch {url}: the forge refused the credentials ({detail})")]
    Auth { url: String, detail: String },
    #[error("cannot fetch {url}: it took longer than {}s and was stopped", timeout.as_secs_f64())]
    Timeout { url: String, timeout: Duration },
    #[error("cannot fetch {url}: the remote has no {reference}")]
    NoSuchRef { url: String, reference: String },
    #[error("cannot fetch {url}: {detail}")]
    Failed { url: String, detail: String },
    #[error("cannot fetch {url}: cannot read the credential file {path}: {source}")]
    CredentialFile {
        url: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot fetch {url}: cannot run git: {source}")]
    Spawn {
        url: String,
        #[source]
        source: std::io::Error,
    },
}

impl Remote {
    /// A remote without credentials (public repositories, tests).
    pub fn new(url: &str, auth: Option<RepoAuth>, timeout: Duration) -> Remote {
        Remote { url: url.to_owned(), auth, timeout }
    }

    /// Fetches `refspecs` from the remote into the bare repository `git_dir` (created if
    /// missing), forced; `prune` deletes local refs under the refspecs' destinations that the
    /// remote no longer has. Only new objects cross the wire. Blocking.
    pub fn fetch(&self, git_dir: &Path, refspecs: &[&str], prune: bool) -> Result<(), FetchError> {
        let url = self.url.clone();
        if !git_dir.join("HEAD").exists() {
            let out = std::process::Command::new("git")
                .args(["init", "--bare", "--quiet"])
                .arg(git_dir)
                .output()
                .map_err(|source| FetchError::Spawn { url: url.clone(), source })?;
            if !out.status.success() {
                return Err(FetchError::Failed { url, detail: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
            }
        }
        let mut cmd = std::process::Command::new("git");
        cmd.arg("--git-dir").arg(git_dir);
        // No prompt or askpass of the host's; credential helpers are reset in `credentials`.
        cmd.args(["-c", "core.askPass="]);
        cmd.args(["fetch", "--quiet", "--force", "--no-tags", "--no-write-fetch-head", "--no-auto-gc"]);
        if prune {
            cmd.arg("--prune");
        }
        cmd.arg("--").arg(&self.url).args(refspecs);
        cmd.env("GIT_TERMINAL_PROMPT", "0").env("GIT_SSH_VARIANT", "ssh").env_remove("GIT_ASKPASS");
        cmd.env_remove("SSH_ASKPASS").env("GIT_CONFIG_NOSYSTEM", "1");
        let secrets = self.credentials(&mut cmd)?;
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
        cmd.stderr(std::process::Stdio::piped());
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: a timeout stops git and the ssh or https helper it runs.
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().map_err(|source| FetchError::Spawn { url: url.clone(), source })?;
        let pid = child.id() as libc::pid_t;
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let timeout = self.timeout;
        let watchdog = std::thread::spawn(move || {
            let expired = matches!(done_rx.recv_timeout(timeout), Err(std::sync::mpsc::RecvTimeoutError::Timeout));
            if expired {
                // SAFETY: signals the process group this fetch started; no memory is touched.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            expired
        });
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let mut bytes = Vec::new();
            // A read error only loses the message; the exit status still tells.
            let _ = pipe.read_to_end(&mut bytes);
            stderr = String::from_utf8_lossy(&bytes).into_owned();
        }
        let status = child.wait().map_err(|source| FetchError::Spawn { url: url.clone(), source })?;
        let _ = done_tx.send(());
        let timed_out = watchdog.join().unwrap_or(false);
        if timed_out {
            return Err(FetchError::Timeout { url, timeout });
        }
        if status.success() {
            return Ok(());
        }
        let mut detail = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        for secret in &secrets {
            detail = detail.replace(secret.as_str(), "<hidden>");
        }
        if detail.is_empty() {
            detail = format!("git fetch ended with {status}");
        }
        let lower = detail.to_ascii_lowercase();
        if let Some(reference) = lower.contains("couldn't find remote ref").then(|| refspecs.join(" ")) {
            let reference = reference.trim_start_matches('+').split(':').next().unwrap_or("").to_owned();
            return Err(FetchError::NoSuchRef { url, reference });
        }
        let auth_words = [
            "authentication failed",
            "permission denied",
            "could not read username",
            "could not read password",
            "host key verification failed",
            "403",
            "401",
        ];
        if auth_words.iter().any(|w| lower.contains(w)) {
            return Err(FetchError::Auth { url, detail });
        }
        Err(FetchError::Failed { url, detail })
    }

    /// Puts the credentials into `cmd`'s environment; returns the secret values, which are
    /// scrubbed from whatever git prints.
    fn credentials(&self, cmd: &mut std::process::Command) -> Result<Vec<String>, FetchError> {
        // An empty helper resets the list: no helper of the host's answers for this fetch.
        cmd.env("GIT_CONFIG_COUNT", "1").env("GIT_CONFIG_KEY_0", "credential.helper").env("GIT_CONFIG_VALUE_0", "");
        cmd.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o ConnectTimeout=30");
        let Some(auth) = &self.auth else { return Ok(Vec::new()) };
        let mut secrets = Vec::new();
        let password = match (&auth.password, &auth.token, &auth.password_file) {
            (Some(p), _, _) | (None, Some(p), _) => Some(p.clone()),
            (None, None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| FetchError::CredentialFile { url: self.url.clone(), path: path.clone(), source })?
                    .trim()
                    .to_owned(),
            ),
            (None, None, None) => None,
        };
        if let Some(password) = password {
            let user = auth.username.clone().unwrap_or_else(|| "x-access-token".to_owned());
            // A helper that answers from the child's environment: nothing on a command line.
            cmd.env("GIT_CONFIG_COUNT", "2")
                .env("GIT_CONFIG_KEY_1", "credential.helper")
                .env(
                    "GIT_CONFIG_VALUE_1",
                    "!f() { test \"$1\" = get && printf 'username=%s\\npassword=%s\\n' \"$RBB_GIT_USERNAME\" \"$RBB_GIT_PASSWORD\"; }; f",
                )
                .env("RBB_GIT_USERNAME", &user)
                .env("RBB_GIT_PASSWORD", &password);
            if !password.is_empty() {
                secrets.push(password);
            }
        }
        if auth.ssh_key.is_some() || auth.known_hosts.is_some() {
            let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
            let mut ssh = String::from("ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=30");
            if let Some(key) = &auth.ssh_key {
                ssh.push_str(&format!(" -o IdentitiesOnly=yes -i {}", quote(key)));
            }
            if let Some(known) = &auth.known_hosts {
                ssh.push_str(&format!(" -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null", quote(known)));
            }
            cmd.env("GIT_SSH_COMMAND", ssh);
        }
        Ok(secrets)
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
        files: Default::default(),
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
    // Before typing: a type error would quote a value written inline, and that is a secret.
    let inline = inline_secrets(&value);
    if !inline.is_empty() {
        let spans = SpanIndex::build(&text);
        return Err(inline
            .into_iter()
            .map(|name| {
                let pos = spans.value(&[key("secrets"), key(&name)]);
                fix(ctx.diag(
                    "secret-inline",
                    pos,
                    format!("secret `{name}` is written in the master config"),
                    Some(format!(
                        "secret values never go in the config: put it in a file (`{name}: {{ file: /etc/rbb/{} }}`) or an environment variable of the master (`{name}: {{ env: RBB_{name} }}`)",
                        name.to_lowercase()
                    )),
                ))
            })
            .collect());
    }
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
    for (i, r) in loaded.config.repositories.iter().enumerate() {
        if url_has_password(&r.url) {
            let pos = loaded.pos(&[key("repositories"), Seg::Index(i), key("url")]);
            diags.push(Diagnostic {
                severity: Severity::Error,
                code: "secret-in-url",
                repo: None,
                file: shown.clone(),
                line: pos.line,
                col: pos.col,
                message: format!("the url of repository {} holds a password", i + 1),
                hint: Some("remove it from the URL and set `auth: {password_file: ...}` (or `token:`)".into()),
            });
        }
        let Some(auth) = &r.auth else { continue };
        let given = [auth.password.is_some(), auth.token.is_some(), auth.password_file.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            let pos = loaded.pos(&[key("repositories"), Seg::Index(i), key("auth")]);
            diags.push(Diagnostic {
                severity: Severity::Error,
                code: "auth-ambiguous",
                repo: None,
                file: shown.clone(),
                line: pos.line,
                col: pos.col,
                message: format!("repository {} sets more than one of password, token and password_file", i + 1),
                hint: Some("keep one of them".into()),
            });
        }
    }
    for (name, secret) in &loaded.config.secrets {
        let at = |field: &str| {
            let mut path = vec![key("secrets"), key(name)];
            if !field.is_empty() {
                path.push(key(field));
            }
            loaded.pos(&path)
        };
        let mut problem = |pos: Pos, message: String, hint: String| {
            diags.push(Diagnostic {
                severity: Severity::Error,
                code: "bad-secret",
                repo: None,
                file: shown.clone(),
                line: pos.line,
                col: pos.col,
                message,
                hint: Some(hint),
            })
        };
        if !crate::parse::valid_env_name(name) {
            problem(
                at(""),
                format!("`{name}` is not a valid secret name"),
                "a secret's name is a letter or `_`, then letters, digits and `_` (pipelines write `${{ secrets.NAME }}`)"
                    .into(),
            );
        }
        match (&secret.file, &secret.env) {
            (Some(_), Some(_)) => {
                problem(at("env"), format!("secret `{name}` sets both `file` and `env`"), "keep one of them".into())
            }
            (None, None) => problem(
                at(""),
                format!("secret `{name}` says neither where its value is"),
                format!(
                    "add `file: /path/to/{}` or `env: VARIABLE` (an environment variable of the master)",
                    name.to_lowercase()
                ),
            ),
            _ => {}
        }
        if secret.version == Some(0) {
            problem(at("version"), format!("secret `{name}` has version 0"), "versions start at 1".into());
        }
        for (i, repo) in secret.repositories.iter().enumerate() {
            if !names.contains_key(repo) {
                let pos = loaded.pos(&[key("secrets"), key(name), key("repositories"), Seg::Index(i)]);
                let known: Vec<&str> = names.keys().map(String::as_str).collect();
                problem(
                    pos,
                    format!("secret `{name}` is given to repository `{repo}`, which the master config does not list"),
                    crate::diagnostic::did_you_mean(repo, known.iter().copied())
                        .unwrap_or_else(|| format!("repositories: {}", crate::diagnostic::name_list(&known, 10))),
                );
            }
        }
    }
    if diags.is_empty() { Ok(loaded) } else { Err(diags) }
}

/// Names of the `secrets:` entries written with their value in the config (a scalar, or a
/// mapping with `value:`) rather than where to read it.
fn inline_secrets(config: &serde_yaml::Value) -> Vec<String> {
    let Some(serde_yaml::Value::Mapping(secrets)) = config.get("secrets") else { return Vec::new() };
    secrets
        .iter()
        .filter(|(_, v)| match v {
            serde_yaml::Value::Mapping(m) => m.contains_key("value"),
            serde_yaml::Value::Null => false,
            _ => true,
        })
        .map(|(k, _)| k.as_str().map(str::to_owned).unwrap_or_else(|| format!("{k:?}")))
        .collect()
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
        let path = match cfg.remote(r) {
            Err(msg) => {
                let pos = cfg.pos(&[key("repositories"), Seg::Index(i), key("fetch_timeout")]);
                diags.push(diag(Severity::Error, "repo-url", format!("fetch_timeout: {msg}"), None, pos));
                continue;
            }
            Ok(Some(remote)) => {
                let mirror = cfg.state_dir().join("mirrors").join(format!("{name}.git"));
                if let Err(e) = remote.fetch(&mirror, &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"], true)
                {
                    let hint = match e {
                        FetchError::Auth { .. } | FetchError::CredentialFile { .. } => {
                            format!("check `auth:` of repository `{name}`")
                        }
                        FetchError::NoSuchRef { .. } => {
                            format!("set `branch:` for repository `{name}` to a branch that exists")
                        }
                        _ => "check `url:` and that the forge is reachable from here".to_owned(),
                    };
                    diags.push(diag(Severity::Error, "repo-fetch", e.to_string(), Some(hint), url_pos));
                    continue;
                }
                mirror
            }
            Ok(None) => match cfg.repo_path(r) {
                Ok(p) => p,
                Err(msg) => {
                    diags.push(diag(Severity::Error, "repo-url", msg, None, url_pos));
                    continue;
                }
            },
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
                    files: found.files.into(),
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
