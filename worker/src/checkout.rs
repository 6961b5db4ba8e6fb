//! Making `<workdir>/<checkout_dir>` a clean checkout of one commit with the `git` binary,
//! and keeping every path a lease names inside the directory it is relative to.
//!
//! A checkout directory says which build's checkout it holds (`.git/rbb-build`, written when a
//! checkout succeeds); a checkout that fails removes the directory, so no later step of the
//! build can run in the tree an earlier build left.
//!
//! Each git command line and its output are streamed as [`Output::Header`] chunks. This module
//! must not run step commands or know about the master; a failure is a [`CheckoutError`] with
//! the command, directory and git's own message.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::executor::{MAX_CHUNK, Output};
use crate::guard::{GuardLink, ProcessGroup, own_group};

/// A lease named a path that is not a plain relative path inside its base directory.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path:?} must be a relative path inside {}, without `..`", base.display())]
pub struct PathError {
    /// Which path it is, e.g. `checkout_dir`.
    pub what: &'static str,
    pub path: String,
    pub base: PathBuf,
}

/// Why a checkout could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("invalid commit id {commit:?}")]
    BadCommit { commit: String },
    #[error("cannot prepare {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run `{command}` in {}: {source}", dir.display())]
    Spawn {
        command: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed in {} ({status}): {message}", dir.display())]
    Git {
        command: String,
        dir: PathBuf,
        status: String,
        /// The tail of git's stderr (or stdout).
        message: String,
    },
    #[error("commit {commit} is not in {url}")]
    CommitNotFound { commit: String, url: String },
    #[error("checkout cancelled")]
    Cancelled,
}

/// `base` joined with `relative`, which must consist of normal components only (no root, no
/// `..`, no `.`-only path). An empty `relative` is allowed only when `allow_empty`.
pub fn join_inside(base: &Path, relative: &str, what: &'static str, allow_empty: bool) -> Result<PathBuf, PathError> {
    let error = || PathError { what, path: relative.to_owned(), base: base.to_owned() };
    let mut joined = base.to_path_buf();
    let mut normal = 0;
    for component in Path::new(relative).components() {
        match component {
            Component::Normal(part) => {
                joined.push(part);
                normal += 1;
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(error());
            }
        }
    }
    if normal == 0 && !allow_empty {
        return Err(error());
    }
    Ok(joined)
}

/// Where a checkout directory names the build whose checkout it holds.
const BUILD_MARK: &str = ".git/rbb-build";

/// Records that `dir` holds the checkout of `build` (`dir/.git` must exist).
pub fn mark_build(dir: &Path, build: u64) -> std::io::Result<()> {
    std::fs::write(dir.join(BUILD_MARK), format!("{build}\n"))
}

/// The build whose checkout `dir` holds, if a checkout into it succeeded and none started since.
pub fn marked_build(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(dir.join(BUILD_MARK)).ok()?.trim().parse().ok()
}

/// Which checkout to make.
#[derive(Debug, Clone, Copy)]
pub struct CheckoutSpec<'a> {
    /// The worker's work directory.
    pub workdir: &'a Path,
    /// The checkout's directory, relative to `workdir`.
    pub checkout_dir: &'a str,
    /// Path or URL `git clone` accepts.
    pub url: &'a str,
    pub commit: &'a str,
    /// The build the checkout is for.
    pub build: u64,
    /// An `Authorization` header value for `url` (the master's own git service), given to
    /// git through its environment: never on a command line, never in the log.
    pub auth: Option<&'a str>,
    /// CA certificates an `https://` `url` is verified with (`GIT_SSL_CAINFO`).
    pub ca_file: Option<&'a Path>,
}

/// Makes `<workdir>/<checkout_dir>` a clean, detached checkout of `commit` from `url` for
/// `build`: clones if missing (reuses it otherwise), fetches branches and tags when the commit
/// is not there yet, then `git checkout --force --detach` and `git clean -ffdx`. Returns the
/// checkout's path. On failure (cancel included) the directory is removed: an older build's
/// tree must not stay behind for this build's later steps. Each git command runs in a process
/// group of its own, registered with `guard` when there is one.
pub async fn checkout(
    spec: &CheckoutSpec<'_>,
    out: &mpsc::Sender<Output>,
    cancel: &CancellationToken,
    guard: Option<&Arc<GuardLink>>,
) -> Result<PathBuf, CheckoutError> {
    let dir = join_inside(spec.workdir, spec.checkout_dir, "checkout_dir", false)?;
    let git = Git { out, cancel, guard, auth: spec.auth, ca_file: spec.ca_file };
    match checkout_into(spec.workdir, &dir, spec.url, spec.commit, &git).await {
        Ok(()) => {
            mark_build(&dir, spec.build).map_err(|source| CheckoutError::Io { path: dir.join(BUILD_MARK), source })?;
            Ok(dir)
        }
        Err(err) => {
            discard(&dir, out).await;
            Err(err)
        }
    }
}

/// Removes what a failed checkout left in `dir`.
async fn discard(dir: &Path, out: &mpsc::Sender<Output>) {
    if std::fs::symlink_metadata(dir).is_err() {
        return;
    }
    header(out, format!("# removing {}: the checkout failed\n", dir.display())).await;
    if let Err(err) = std::fs::remove_dir_all(dir) {
        warn!(dir = %dir.display(), %err, "cannot remove a failed checkout");
        header(out, format!("# cannot remove {}: {err}\n", dir.display())).await;
    }
}

async fn checkout_into(
    workdir: &Path,
    dir: &Path,
    url: &str,
    commit: &str,
    git: &Git<'_>,
) -> Result<(), CheckoutError> {
    let dir = dir.to_owned();
    let out = git.out;
    if commit.is_empty() || commit.starts_with('-') || commit.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CheckoutError::BadCommit { commit: commit.to_owned() });
    }
    let reused = dir.join(".git").exists();
    if reused {
        // From here on the tree is no build's checkout until this one succeeds.
        match std::fs::remove_file(dir.join(BUILD_MARK)) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CheckoutError::Io { path: dir.join(BUILD_MARK), source }),
        }
        git.ok(&dir, &["remote", "set-url", "origin", url]).await?;
    } else {
        if dir.exists() {
            header(out, format!("# removing {} (not a git checkout)\n", dir.display())).await;
            std::fs::remove_dir_all(&dir).map_err(|source| CheckoutError::Io { path: dir.clone(), source })?;
        }
        std::fs::create_dir_all(workdir).map_err(|source| CheckoutError::Io { path: workdir.to_owned(), source })?;
        let dir_arg = dir.as_os_str().to_owned();
        git.ok_os(
            workdir,
            &["clone".into(), "--quiet".into(), "--no-checkout".into(), "--".into(), url.into(), dir_arg],
        )
        .await?;
    }

    let wanted = format!("{commit}^{{commit}}");
    if !git.succeeds(&dir, &["cat-file", "-e", &wanted]).await? {
        if reused {
            git.ok(&dir, &["fetch", "--quiet", "--force", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"])
                .await?;
        }
        if !git.succeeds(&dir, &["cat-file", "-e", &wanted]).await? {
            // Not on any branch or tag: ask for the commit itself (servers may refuse).
            let fetched = git.succeeds(&dir, &["fetch", "--quiet", "origin", commit]).await?;
            if !fetched || !git.succeeds(&dir, &["cat-file", "-e", &wanted]).await? {
                return Err(CheckoutError::CommitNotFound { commit: commit.to_owned(), url: url.to_owned() });
            }
        }
    }
    git.ok(&dir, &["checkout", "--quiet", "--force", "--detach", commit, "--"]).await?;
    // A fresh clone has nothing untracked to remove.
    if reused {
        git.ok(&dir, &["clean", "-ffdx"]).await?;
    }
    Ok(())
}

async fn header(out: &mpsc::Sender<Output>, text: String) {
    send_chunks(out, text.as_bytes()).await;
}

async fn send_chunks(out: &mpsc::Sender<Output>, data: &[u8]) {
    for chunk in data.chunks(MAX_CHUNK) {
        // A gone receiver only means nobody reads the log any more.
        let _ = out.send(Output::Header(chunk.to_vec())).await;
    }
}

/// Runs git commands, echoing each command line and its output as header chunks.
struct Git<'a> {
    out: &'a mpsc::Sender<Output>,
    cancel: &'a CancellationToken,
    guard: Option<&'a Arc<GuardLink>>,
    auth: Option<&'a str>,
    ca_file: Option<&'a Path>,
}

impl Git<'_> {
    async fn ok(&self, dir: &Path, args: &[&str]) -> Result<(), CheckoutError> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        self.ok_os(dir, &args).await
    }

    async fn ok_os(&self, dir: &Path, args: &[OsString]) -> Result<(), CheckoutError> {
        let (command, output) = self.run(dir, args).await?;
        if output.status.success() {
            return Ok(());
        }
        let text = if output.stderr.is_empty() { &output.stdout } else { &output.stderr };
        Err(CheckoutError::Git { command, dir: dir.to_owned(), status: output.status.to_string(), message: tail(text) })
    }

    /// Whether the command exits 0 (a non-zero exit is an answer, not an error).
    async fn succeeds(&self, dir: &Path, args: &[&str]) -> Result<bool, CheckoutError> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let (_, output) = self.run(dir, &args).await?;
        Ok(output.status.success())
    }

    async fn run(&self, dir: &Path, args: &[OsString]) -> Result<(String, std::process::Output), CheckoutError> {
        let command = std::iter::once("git".to_owned())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        debug!(%command, dir = %dir.display(), "git");
        header(self.out, format!("$ {command}\n")).await;
        let mut git = Command::new("git");
        // Config from the environment (git 2.31+): `-c` would show the token in `ps`.
        let mut config: Vec<(&str, OsString)> = Vec::new();
        if let Some(auth) = self.auth {
            config.push(("http.extraHeader", format!("Authorization: {auth}").into()));
        }
        if let Some(ca) = self.ca_file {
            // The environment's form: git builds linked to GnuTLS ignore `http.sslCAInfo` set
            // through GIT_CONFIG_* (checked with git 2.47), not GIT_SSL_CAINFO.
            git.env("GIT_SSL_CAINFO", ca);
        }
        if !config.is_empty() {
            git.env("GIT_CONFIG_COUNT", config.len().to_string());
            for (i, (key, value)) in config.into_iter().enumerate() {
                git.env(format!("GIT_CONFIG_KEY_{i}"), key).env(format!("GIT_CONFIG_VALUE_{i}"), value);
            }
        }
        git.args(args)
            .current_dir(dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Git starts helpers (ssh, remote helpers, pack tools): the whole group goes when the
        // command is done, cancelled, or the worker dies.
        own_group(&mut git, self.guard);
        let spawn_error = |source| CheckoutError::Spawn { command: command.clone(), dir: dir.to_owned(), source };
        let child = git.spawn().map_err(spawn_error)?;
        let mut group = child
            .id()
            .and_then(|pid| libc::pid_t::try_from(pid).ok())
            .map(|pgid| ProcessGroup::new(pgid, self.guard.cloned()));
        let output = tokio::select! {
            output = child.wait_with_output() => output.map_err(spawn_error)?,
            () = self.cancel.cancelled() => return Err(CheckoutError::Cancelled),
        };
        if let Some(group) = group.as_mut() {
            group.kill_and_forget();
        }
        send_chunks(self.out, &output.stdout).await;
        send_chunks(self.out, &output.stderr).await;
        Ok((command, output))
    }
}

/// The last few lines of git's message, for an error.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let start = lines.len().saturating_sub(5);
    let joined = lines[start..].join(" / ");
    if joined.is_empty() { "no output".to_owned() } else { joined }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside() {
        let base = Path::new("/w");
        assert_eq!(join_inside(base, "a/b", "x", false).unwrap(), PathBuf::from("/w/a/b"));
        assert_eq!(join_inside(base, "./a", "x", false).unwrap(), PathBuf::from("/w/a"));
        assert_eq!(join_inside(base, "", "x", true).unwrap(), PathBuf::from("/w"));
        for bad in ["", ".", "/etc", "../x", "a/../../x", "a/.."] {
            assert!(join_inside(base, bad, "x", false).is_err(), "{bad:?} accepted");
        }
    }
}

/// `Basic <base64(name:token)>`: how a worker authenticates to the master's git service.
pub fn basic_auth(name: &str, token: &str) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{name}:{token}");
    let mut out = String::from("Basic ");
    for chunk in raw.as_bytes().chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod auth_tests {
    #[test]
    fn basic_auth_is_rfc_7617() {
        // RFC 7617's example.
        assert_eq!(super::basic_auth("Aladdin", "open sesame"), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert_eq!(super::basic_auth("w", "t"), "Basic dzp0");
        assert_eq!(super::basic_auth("w1", "t"), "Basic dzE6dA==");
    }
}
