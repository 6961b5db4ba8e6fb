//! Integration tests of the worker, against real processes, real git repositories made by
//! the fixture scripts, and an in-test master speaking the real gRPC protocol.
//!
//! One test binary (modules below) so the crate links once. Test helpers may unwrap like
//! the tests themselves (clippy.toml allows it only inside `#[test]` functions).

#![allow(clippy::unwrap_used)]

mod binary;
mod cache;
mod cache_session;
mod checkout;
mod docker;
mod fake_executor;
mod fake_master;
mod guard;
mod native;
mod session;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Logs of the code under test go to the test's captured output (shown on failure).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RBB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("rbb_worker=debug"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fixture_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/fixtures").join(name)
}

/// A real git repository at `dest` holding `files` as one commit on `main`; returns its id.
pub fn make_repo(scratch: &Path, dest: &Path, files: &[(&str, &str)]) -> String {
    let src = scratch.join(format!("src-{}", dest.file_name().unwrap().to_string_lossy()));
    for (name, content) in files {
        let path = src.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let output = Command::new("sh").arg(fixture_script("mkrepo.sh")).arg(&src).arg(dest).output().unwrap();
    assert!(output.status.success(), "mkrepo.sh failed: {output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// `<workdir>/<dir>` as the worker leaves it after a successful checkout for `build`, for
/// steps that need a checkout directory but not its contents.
pub fn prepared_checkout(workdir: &Path, dir: &str, build: u64) {
    let dir = workdir.join(dir);
    std::fs::create_dir_all(dir.join(".git")).unwrap();
    rbb_worker::checkout::mark_build(&dir, build).unwrap();
}

/// Commits `file` with `content` to `repo`; returns the new commit id.
pub fn commit(repo: &Path, file: &str, minutes: u32, content: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("sh")
        .arg(fixture_script("commit.sh"))
        .arg(repo)
        .arg(file)
        .arg(minutes.to_string())
        .arg(format!("change {file}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(content.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "commit.sh failed: {output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Whether process `pid` is gone (no such process, or a zombie nobody reaped yet).
pub fn process_gone(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}
