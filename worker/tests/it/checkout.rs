//! Checkouts against real git repositories made by the fixture scripts.

use std::path::Path;
use std::process::Command;

use rbb_worker::Output;
use rbb_worker::checkout::{CheckoutError, CheckoutSpec, checkout, marked_build};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{commit, init_logs, make_repo};

/// Runs a checkout, returning its result and the header text it streamed.
async fn run(
    workdir: &Path,
    dir: &str,
    url: &Path,
    commit: &str,
) -> (Result<std::path::PathBuf, CheckoutError>, String) {
    let (tx, mut rx) = mpsc::channel(4);
    let log = tokio::spawn(async move {
        let mut text = Vec::new();
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Output::Header(data) => text.extend_from_slice(&data),
                other => panic!("checkout sent {other:?}"),
            }
        }
        String::from_utf8(text).unwrap()
    });
    let spec = CheckoutSpec {
        workdir,
        checkout_dir: dir,
        url: url.to_str().unwrap(),
        commit,
        build: 1,
        auth: None,
        ca_file: None,
    };
    let result = checkout(&spec, &tx, &CancellationToken::new(), None).await;
    drop(tx);
    (result, log.await.unwrap())
}

fn head(repo: &Path) -> String {
    let out = Command::new("git").arg("-C").arg(repo).args(["rev-parse", "HEAD"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn checks_out_commits_into_a_clean_directory() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    let repo = scratch.path().join("repo");
    let first = make_repo(scratch.path(), &repo, &[("hello.txt", "one\n"), ("lib/a.txt", "a\n")]);
    let workdir = scratch.path().join("work");

    let (result, log) = run(&workdir, "builds/1", &repo, &first).await;
    let dir = result.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert_eq!(dir, workdir.join("builds/1"));
    assert_eq!(std::fs::read_to_string(dir.join("hello.txt")).unwrap(), "one\n");
    assert_eq!(head(&dir), first);
    assert!(log.contains("$ git clone --quiet --no-checkout"), "{log}");

    // Leftovers of a previous build: an untracked file, an ignored-style dir, an edit.
    std::fs::write(dir.join("junk.txt"), "junk").unwrap();
    std::fs::create_dir_all(dir.join("target/debug")).unwrap();
    std::fs::write(dir.join("lib/a.txt"), "edited\n").unwrap();

    let second = commit(&repo, "hello.txt", 1, "two\n");
    let (result, log) = run(&workdir, "builds/1", &repo, &second).await;
    let dir = result.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert_eq!(head(&dir), second);
    assert_eq!(std::fs::read_to_string(dir.join("hello.txt")).unwrap(), "two\n");
    assert_eq!(std::fs::read_to_string(dir.join("lib/a.txt")).unwrap(), "a\n");
    assert!(!dir.join("junk.txt").exists());
    assert!(!dir.join("target").exists());
    assert!(!log.contains("git clone"), "the checkout should be reused: {log}");
    assert!(log.contains("$ git fetch"), "{log}");

    // Back to the first commit: already present, no fetch needed.
    let (result, log) = run(&workdir, "builds/1", &repo, &first).await;
    let dir = result.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert_eq!(head(&dir), first);
    assert_eq!(std::fs::read_to_string(dir.join("hello.txt")).unwrap(), "one\n");
}

#[tokio::test]
async fn a_missing_commit_is_an_error() {
    let scratch = tempfile::tempdir().unwrap();
    let repo = scratch.path().join("repo");
    make_repo(scratch.path(), &repo, &[("hello.txt", "one\n")]);
    let workdir = scratch.path().join("work");
    let missing = "0123456789abcdef0123456789abcdef01234567";
    let (result, log) = run(&workdir, "b", &repo, missing).await;
    match result {
        Err(CheckoutError::CommitNotFound { commit, .. }) => assert_eq!(commit, missing),
        other => panic!("expected CommitNotFound, got {other:?}\n{log}"),
    }

    let (result, _) = run(&workdir, "b", &repo, "--upload-pack=evil").await;
    assert!(matches!(result, Err(CheckoutError::BadCommit { .. })), "{result:?}");
}

#[tokio::test]
async fn a_bad_url_is_an_error_with_gits_message() {
    let scratch = tempfile::tempdir().unwrap();
    let (result, _) = run(
        &scratch.path().join("work"),
        "b",
        &scratch.path().join("no-such-repo"),
        "0123456789abcdef0123456789abcdef01234567",
    )
    .await;
    let err = result.unwrap_err();
    assert!(matches!(err, CheckoutError::Git { .. }), "{err:?}");
    assert!(err.to_string().contains("git clone"), "{err}");
}

#[tokio::test]
async fn checkout_dirs_cannot_escape_the_workdir() {
    let scratch = tempfile::tempdir().unwrap();
    let repo = scratch.path().join("repo");
    let id = make_repo(scratch.path(), &repo, &[("a", "a")]);
    let workdir = scratch.path().join("work");
    for bad in ["../escape", "/tmp/abs", "", ".", "a/../../b"] {
        let (result, _) = run(&workdir, bad, &repo, &id).await;
        assert!(matches!(result, Err(CheckoutError::Path(_))), "{bad:?}: {result:?}");
    }
    assert!(!scratch.path().join("escape").exists());
}

#[tokio::test]
async fn a_failed_checkout_leaves_no_tree_behind() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    let repo = scratch.path().join("repo");
    let first = make_repo(scratch.path(), &repo, &[("hello.txt", "one\n")]);
    let workdir = scratch.path().join("work");
    let dir = workdir.join("builds/1");
    let missing = "0123456789abcdef0123456789abcdef01234567";

    let (result, log) = run(&workdir, "builds/1", &repo, &first).await;
    result.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert_eq!(marked_build(&dir), Some(1));

    // The commit is not there: the earlier tree goes, with a word in the log.
    let (result, log) = run(&workdir, "builds/1", &repo, missing).await;
    assert!(matches!(result, Err(CheckoutError::CommitNotFound { .. })), "{result:?}");
    assert!(!dir.exists(), "a failed checkout left {} behind", dir.display());
    assert!(log.contains("# removing"), "{log}");

    // Same for a commit id refused before git runs.
    let (result, log) = run(&workdir, "builds/1", &repo, &first).await;
    result.unwrap_or_else(|err| panic!("{err}\n{log}"));
    let (result, _) = run(&workdir, "builds/1", &repo, "-x").await;
    assert!(matches!(result, Err(CheckoutError::BadCommit { .. })), "{result:?}");
    assert!(!dir.exists());
}
