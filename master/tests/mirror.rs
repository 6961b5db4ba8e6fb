//! The bare mirror against real git repositories made by the fixture scripts.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rbb_master::mirror::{Mirror, MirrorError, RefUpdate};

/// 2026-01-01T00:00:00Z, the fixture scripts' epoch.
const EPOCH: i64 = 1_767_225_600;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/fixtures").join(name)
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn git(repo: &Path, args: &[&str]) -> String {
    run(
        Command::new("git").arg("-C").arg(repo).args(args).env("GIT_CONFIG_NOSYSTEM", "1").env("HOME", repo),
        &format!("git {args:?}"),
    )
}

/// A source repository at `dir/src.git` (a normal repository despite the name) holding
/// `files` on `main`. Returns its path and the first commit.
fn make_repo(dir: &Path, files: &[(&str, &str)]) -> (PathBuf, String) {
    let src = dir.join("content");
    for (name, content) in files {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write fixture file");
    }
    let repo = dir.join("src");
    let id = run(Command::new("sh").arg(fixture("mkrepo.sh")).arg(&src).arg(&repo), "mkrepo.sh");
    (repo, id)
}

/// Commits `content` as `file` (the shared fixture helper takes the content first).
fn commit(repo: &Path, file: &str, minutes: u32, message: &str, content: &str) -> String {
    support::commit(repo, file, content, minutes, message)
}

fn globs(g: &[&str]) -> Vec<String> {
    g.iter().map(|s| s.to_string()).collect()
}

fn update(branch: &str, old: Option<&str>, new: Option<&str>) -> RefUpdate {
    RefUpdate { branch: branch.into(), old: old.map(Into::into), new: new.map(Into::into) }
}

fn setup(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf, String, Mirror) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, first) = make_repo(tmp.path(), files);
    let mirror = Mirror::open(src.to_str().expect("utf-8 path"), &tmp.path().join("state/mirrors/src.git"))
        .expect("open mirror");
    (tmp, src, first, mirror)
}

#[test]
fn mirror_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Mirror>();
    check::<MirrorError>();
}

#[test]
fn first_fetch_lists_only_matching_branches() {
    let (_tmp, src, first, mirror) = setup(&[("a.txt", "a\n")]);
    for b in ["release/1.0", "release/2/rc", "feature/x"] {
        git(&src, &["branch", b]);
    }
    let updates = mirror.fetch(&globs(&["main", "release/*"])).unwrap();
    assert_eq!(updates, vec![update("main", None, Some(&first)), update("release/1.0", None, Some(&first))]);
    // Non-matching branches are mirrored all the same.
    assert_eq!(mirror.head("feature/x").unwrap().as_deref(), Some(first.as_str()));
    assert_eq!(mirror.head("release/2/rc").unwrap().as_deref(), Some(first.as_str()));
    assert_eq!(mirror.head("nope").unwrap(), None);
    // Nothing moved: nothing reported.
    assert_eq!(mirror.fetch(&globs(&["**"])).unwrap(), vec![]);
    // `**` matches everything, including names with slashes.
    let fresh = Mirror::open(src.to_str().unwrap(), &_tmp.path().join("other.git")).unwrap();
    let all: Vec<String> = fresh.fetch(&globs(&["**"])).unwrap().into_iter().map(|u| u.branch).collect();
    assert_eq!(all, ["feature/x", "main", "release/1.0", "release/2/rc"]);
}

#[test]
fn new_commit_is_reported_with_author_message_and_changed_paths() {
    let (_tmp, src, first, mirror) =
        setup(&[("a.txt", "a\n"), ("b.txt", "b\n"), ("dir/c.txt", "c\n"), ("dir/keep.txt", "k\n")]);
    mirror.fetch(&globs(&["main"])).unwrap();

    // One commit that modifies a.txt, adds d/e.txt, deletes b.txt and dir/c.txt.
    git(&src, &["rm", "-q", "b.txt", "dir/c.txt"]);
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/e.txt"), "e\n").unwrap();
    git(&src, &["add", "d/e.txt"]);
    let second = commit(&src, "a.txt", 5, "Change things\n\nWith a body.", "a2\n");

    let updates = mirror.fetch(&globs(&["main"])).unwrap();
    assert_eq!(updates, vec![update("main", Some(&first), Some(&second))]);

    let commits = mirror.commits_between(Some(&first), &second, 10).unwrap();
    assert_eq!(commits.len(), 1);
    let c = &commits[0];
    assert_eq!(c.id, second);
    assert_eq!(c.author, "rbb fixtures");
    assert_eq!(c.email, "fixtures@rbb.invalid");
    assert_eq!(c.time, EPOCH + 5 * 60);
    assert_eq!(c.message, "Change things\n\nWith a body.");
    assert_eq!(c.files, ["a.txt", "b.txt", "d/e.txt", "dir/c.txt"]);

    // A root commit lists every file.
    let root = mirror.commits_between(None, &first, 10).unwrap();
    assert_eq!(root.len(), 1);
    assert_eq!(root[0].files, ["a.txt", "b.txt", "dir/c.txt", "dir/keep.txt"]);
    assert_eq!(root[0].time, EPOCH);
}

#[test]
fn several_commits_come_newest_first_within_limit() {
    let (_tmp, src, first, mirror) = setup(&[("a.txt", "a\n")]);
    mirror.fetch(&globs(&["main"])).unwrap();
    let ids: Vec<String> = (1..=3).map(|i| commit(&src, "a.txt", i, &format!("c{i}"), &format!("{i}\n"))).collect();

    assert_eq!(mirror.fetch(&globs(&["main"])).unwrap(), vec![update("main", Some(&first), Some(&ids[2]))]);
    let all: Vec<String> =
        mirror.commits_between(Some(&first), &ids[2], 10).unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(all, [ids[2].clone(), ids[1].clone(), ids[0].clone()]);
    let two: Vec<String> =
        mirror.commits_between(Some(&first), &ids[2], 2).unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(two, [ids[2].clone(), ids[1].clone()]);
    let only_new: Vec<String> = mirror.commits_between(None, &ids[2], 10).unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(only_new, [ids[2].clone()]);
    assert!(mirror.commits_between(Some(&first), &ids[2], 0).unwrap().is_empty());
    // An old id the mirror never saw: only the new head.
    let unknown = "0123456789012345678901234567890123456789";
    let ids_unknown: Vec<String> =
        mirror.commits_between(Some(unknown), &ids[2], 10).unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(ids_unknown, [ids[2].clone()]);
}

#[test]
fn new_and_deleted_branches() {
    let (_tmp, src, first, mirror) = setup(&[("a.txt", "a\n")]);
    mirror.fetch(&globs(&["**"])).unwrap();

    git(&src, &["checkout", "-q", "-b", "feature/x"]);
    let f = commit(&src, "f.txt", 1, "feature", "f\n");
    git(&src, &["checkout", "-q", "main"]);
    assert_eq!(mirror.fetch(&globs(&["**"])).unwrap(), vec![update("feature/x", None, Some(&f))]);
    let commits = mirror.commits_between(Some(&first), &f, 10).unwrap();
    assert_eq!(commits.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [f.as_str()]);
    assert_eq!(commits[0].files, ["f.txt"]);

    git(&src, &["branch", "-q", "-D", "feature/x"]);
    assert_eq!(mirror.fetch(&globs(&["**"])).unwrap(), vec![update("feature/x", Some(&f), None)]);
    assert_eq!(mirror.head("feature/x").unwrap(), None);
    assert_eq!(mirror.head("main").unwrap().as_deref(), Some(first.as_str()));
    // Commits of a deleted branch stay readable.
    assert_eq!(mirror.files(&f).unwrap(), ["a.txt", "f.txt"]);
}

#[test]
fn deleting_a_non_matching_branch_reports_nothing() {
    let (_tmp, src, _first, mirror) = setup(&[("a.txt", "a\n")]);
    git(&src, &["branch", "scratch"]);
    mirror.fetch(&globs(&["main"])).unwrap();
    git(&src, &["branch", "-q", "-D", "scratch"]);
    assert_eq!(mirror.fetch(&globs(&["main"])).unwrap(), vec![]);
    assert_eq!(mirror.head("scratch").unwrap(), None);
}

#[test]
fn force_push_reports_old_and_new() {
    let (_tmp, src, first, mirror) = setup(&[("a.txt", "a\n")]);
    let b = commit(&src, "a.txt", 1, "b", "b\n");
    let c = commit(&src, "a.txt", 2, "c", "c\n");
    mirror.fetch(&globs(&["main"])).unwrap();

    // Rewrite history: main goes back to the first commit and grows elsewhere.
    git(&src, &["reset", "-q", "--hard", &first]);
    let d = commit(&src, "x.txt", 3, "d", "d\n");
    let e = commit(&src, "x.txt", 4, "e", "e\n");

    assert_eq!(mirror.fetch(&globs(&["main"])).unwrap(), vec![update("main", Some(&c), Some(&e))]);
    assert_eq!(mirror.head("main").unwrap().as_deref(), Some(e.as_str()));
    let ids: Vec<String> = mirror.commits_between(Some(&c), &e, 10).unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(ids, [e.clone(), d.clone()], "only the new commits, not the shared root nor the dropped ones");
    assert!(!ids.contains(&b));
    // A plain rewind (new is an ancestor of old) has no new commits.
    git(&src, &["reset", "-q", "--hard", &d]);
    assert_eq!(mirror.fetch(&globs(&["main"])).unwrap(), vec![update("main", Some(&e), Some(&d))]);
    assert!(mirror.commits_between(Some(&e), &d, 10).unwrap().is_empty());
}

#[test]
fn read_file_and_files() {
    let (_tmp, src, first, mirror) = setup(&[("a.txt", "hello\n"), ("dir/sub/b.txt", "b\n"), ("c.txt", "c\n")]);
    mirror.fetch(&globs(&["main"])).unwrap();

    let (blob, bytes) = mirror.read_file(&first, "dir/sub/b.txt").unwrap().unwrap();
    assert_eq!(blob, git(&src, &["rev-parse", &format!("{first}:dir/sub/b.txt")]));
    assert_eq!(bytes, b"b\n");
    let (blob, bytes) = mirror.read_file(&first, "a.txt").unwrap().unwrap();
    assert_eq!(blob, git(&src, &["rev-parse", &format!("{first}:a.txt")]));
    assert_eq!(bytes, b"hello\n");
    assert_eq!(mirror.read_file(&first, "missing.txt").unwrap(), None);
    assert_eq!(mirror.read_file(&first, "dir/missing/x").unwrap(), None);
    assert_eq!(mirror.read_file(&first, "dir").unwrap(), None, "a directory is not a file");
    // Branch names work as the commit too.
    assert_eq!(mirror.read_file("main", "c.txt").unwrap().unwrap().1, b"c\n");

    assert_eq!(mirror.files(&first).unwrap(), ["a.txt", "c.txt", "dir/sub/b.txt"]);
}

#[test]
fn resolve_branches_tags_short_ids_and_unknown_revs() {
    let (_tmp, src, first, mirror) = setup(&[("a.txt", "a\n")]);
    let second = commit(&src, "a.txt", 1, "second", "2\n");
    git(&src, &["tag", "v1", &first]);
    mirror.fetch(&globs(&["main"])).unwrap();

    assert_eq!(mirror.resolve("main").unwrap(), second);
    assert_eq!(mirror.resolve(&second[..8]).unwrap(), second);
    assert_eq!(mirror.resolve(&first).unwrap(), first);
    assert_eq!(mirror.resolve("v1").unwrap(), first);
    assert_eq!(mirror.resolve("main~1").unwrap(), first);
    let err = mirror.resolve("no-such-branch").unwrap_err();
    assert!(matches!(err, MirrorError::Resolve { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-branch"), "{err}");
    assert!(mirror.files("no-such-branch").is_err());
}

#[test]
fn file_url_and_reopened_mirror() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, first) = make_repo(tmp.path(), &[("a.txt", "a\n")]);
    let url = format!("file://{}", src.display());
    let path = tmp.path().join("mirror.git");
    let mirror = Mirror::open(&url, &path).unwrap();
    assert_eq!(mirror.fetch(&globs(&["main"])).unwrap(), vec![update("main", None, Some(&first))]);
    drop(mirror);

    // Reopening keeps the state: only what moved since is reported.
    let second = commit(&src, "a.txt", 1, "second", "2\n");
    let mirror = Mirror::open(&url, &path).unwrap();
    assert_eq!(mirror.head("main").unwrap().as_deref(), Some(first.as_str()));
    assert_eq!(mirror.fetch(&globs(&["main"])).unwrap(), vec![update("main", Some(&first), Some(&second))]);
    assert_eq!(mirror.commits_between(Some(&first), &second, 5).unwrap()[0].message, "second");
}

#[test]
fn fetch_from_missing_url_names_the_url() {
    let tmp = tempfile::tempdir().unwrap();
    for url in [
        format!("file://{}/does-not-exist.git", tmp.path().display()),
        format!("{}/does-not-exist", tmp.path().display()),
    ] {
        let mirror = Mirror::open(&url, &tmp.path().join("m.git")).unwrap();
        let err = mirror.fetch(&globs(&["main"])).unwrap_err();
        assert!(matches!(err, MirrorError::Fetch { .. }), "{err:?}");
        assert!(err.to_string().contains(&url), "{err}");
    }
}

#[test]
fn invalid_glob_is_an_error() {
    let (_tmp, _src, _first, mirror) = setup(&[("a.txt", "a\n")]);
    let err = mirror.fetch(&globs(&["release/[", "main"])).unwrap_err();
    assert!(matches!(&err, MirrorError::Glob { glob, .. } if glob == "release/["), "{err:?}");
}

#[test]
fn open_rejects_a_directory_that_is_not_a_repository() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("junk"), "x").unwrap();
    let err = Mirror::open("file:///nowhere", tmp.path()).unwrap_err();
    assert!(matches!(err, MirrorError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains(&tmp.path().display().to_string()), "{err}");
}

#[test]
fn merges_list_both_sides_once() {
    let (_tmp, src, first, mirror) = setup(&[("a.txt", "a\n")]);
    mirror.fetch(&globs(&["main"])).unwrap();
    git(&src, &["checkout", "-q", "-b", "topic"]);
    let t1 = commit(&src, "t.txt", 1, "t1", "t1\n");
    git(&src, &["checkout", "-q", "main"]);
    let m1 = commit(&src, "m.txt", 2, "m1", "m1\n");
    run(
        Command::new("git")
            .arg("-C")
            .arg(&src)
            .args(["merge", "-q", "--no-ff", "-m", "merge topic", "topic"])
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", &src)
            .env("GIT_AUTHOR_NAME", "rbb fixtures")
            .env("GIT_AUTHOR_EMAIL", "fixtures@rbb.invalid")
            .env("GIT_COMMITTER_NAME", "rbb fixtures")
            .env("GIT_COMMITTER_EMAIL", "fixtures@rbb.invalid")
            .env("GIT_AUTHOR_DATE", "2026-01-01T00:03:00Z")
            .env("GIT_COMMITTER_DATE", "2026-01-01T00:03:00Z"),
        "git merge",
    );
    let merge = git(&src, &["rev-parse", "HEAD"]);

    assert_eq!(mirror.fetch(&globs(&["main"])).unwrap(), vec![update("main", Some(&first), Some(&merge))]);
    let commits = mirror.commits_between(Some(&first), &merge, 10).unwrap();
    let ids: Vec<&str> = commits.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, [merge.as_str(), m1.as_str(), t1.as_str()]);
    // A merge's paths are against its first parent.
    assert_eq!(commits[0].files, ["t.txt"]);
}

#[test]
fn empty_remote_fetches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("empty");
    std::fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "-q", "-b", "main"]);
    let mirror = Mirror::open(src.to_str().unwrap(), &tmp.path().join("m.git")).unwrap();
    assert_eq!(mirror.fetch(&globs(&["**"])).unwrap(), vec![]);
    assert_eq!(mirror.head("main").unwrap(), None);
    // The first commit then shows up as a new branch.
    let first = commit(&src, "a.txt", 0, "first", "a\n");
    assert_eq!(mirror.fetch(&globs(&["**"])).unwrap(), vec![update("main", None, Some(&first))]);
}

// ---- the poller over the mirror: recorded refs, long pushes, new branches -----------------

use rbb_master::engine::NewCommit;
use rbb_master::sources::{MAX_COMMITS, PollReport, SourceRepo};

fn source_repo(src: &Path, mirror_dir: &Path, branches: &[&str]) -> SourceRepo {
    let mirror = Mirror::open(src.to_str().expect("utf-8 path"), mirror_dir).expect("open mirror");
    SourceRepo::new(
        "src".into(),
        src.display().to_string(),
        mirror,
        globs(branches),
        std::time::Duration::from_secs(60),
    )
}

/// Polls, collecting what is handed over: (branch, commits newest first).
fn poll_ok(repo: &SourceRepo) -> (PollReport, Vec<(String, Vec<NewCommit>)>) {
    let mut seen = Vec::new();
    let report = repo
        .poll(false, &mut |branch: &str, commits: &[NewCommit]| {
            seen.push((branch.to_owned(), commits.to_vec()));
            Ok::<(), String>(())
        })
        .expect("poll");
    (report, seen)
}

/// `count` commits on `branch` in one step, commit i writing `pattern` with `%d` = i.
fn commits(src: &Path, branch: &str, count: u32, pattern: &str, minutes: u32) -> String {
    run(
        Command::new("sh").arg(fixture("commits.sh")).arg(src).args([
            branch,
            &count.to_string(),
            pattern,
            "Bulk",
            &minutes.to_string(),
        ]),
        "commits.sh",
    )
}

#[test]
fn a_failed_record_leaves_the_push_to_the_next_poll() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _first) = make_repo(tmp.path(), &[("a.txt", "a\n")]);
    let repo = source_repo(&src, &tmp.path().join("m.git"), &["main"]);
    let base = repo.poll(true, &mut |_: &str, _: &[NewCommit]| Err::<(), _>("a baseline hands nothing over")).unwrap();
    assert_eq!(base.baseline, 1);
    let second = commit(&src, "a.txt", 1, "second", "a2\n");

    // The engine fails (or the master dies) after the fetch: nothing is recorded...
    let mut calls = 0;
    let report = repo
        .poll(false, &mut |_: &str, _: &[NewCommit]| {
            calls += 1;
            Err("the disk is full")
        })
        .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(report.failed, [("main".to_owned(), "the disk is full".to_owned())]);
    assert_eq!(repo.mirror.head("main").unwrap().as_deref(), Some(second.as_str()), "the fetch itself happened");
    // ... so the next poll hands the same push over again, and once recorded it is done.
    let (report, seen) = poll_ok(&repo);
    assert_eq!(report.recorded, [("main".to_owned(), 1)]);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1[0].id, second);
    assert_eq!(seen[0].1[0].files, ["a.txt"]);
    let (report, seen) = poll_ok(&repo);
    assert!(seen.is_empty() && report == PollReport::default(), "{report:?}");
}

#[test]
fn a_push_made_while_nobody_polled_is_reported_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _first) = make_repo(tmp.path(), &[("a.txt", "a\n")]);
    let dir = tmp.path().join("m.git");
    let repo = source_repo(&src, &dir, &["main"]);
    repo.poll(true, &mut |_: &str, _: &[NewCommit]| Ok::<(), String>(())).unwrap();
    drop(repo);

    let second = commit(&src, "b.txt", 1, "pushed while down", "b\n");
    // A restart: the mirror is opened again and fetched once before any poll (as `rbb master`
    // does to compile the plan); that fetch must not swallow the push.
    let repo = source_repo(&src, &dir, &["main"]);
    repo.mirror.fetch(&globs(&["main"])).unwrap();
    let (_, seen) = poll_ok(&repo);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, "main");
    assert_eq!(seen[0].1.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [second.as_str()]);
}

#[test]
fn a_mirror_without_recorded_refs_adopts_its_fetched_branches() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, first) = make_repo(tmp.path(), &[("a.txt", "a\n")]);
    let dir = tmp.path().join("m.git");
    // A mirror as an earlier master left it: fetched, nothing recorded.
    Mirror::open(src.to_str().unwrap(), &dir).unwrap().fetch(&globs(&["main"])).unwrap();
    let second = commit(&src, "a.txt", 1, "second", "a2\n");
    let repo = source_repo(&src, &dir, &["main"]);
    assert_eq!(repo.mirror.recorded().unwrap().get("main"), Some(&first));
    let (_, seen) = poll_ok(&repo);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [second.as_str()]);
}

#[test]
fn a_long_push_records_at_most_max_commits_but_its_paths_cover_every_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _first) = make_repo(tmp.path(), &[("README.md", "r\n")]);
    let repo = source_repo(&src, &tmp.path().join("m.git"), &["main"]);
    repo.poll(true, &mut |_: &str, _: &[NewCommit]| Ok::<(), String>(())).unwrap();
    // 300 commits in one push: only the oldest touches src/.
    let oldest = commit(&src, "src/lib.c", 1, "code", "int x;\n");
    let tip = commits(&src, "main", 299, "docs/%d.md", 2);
    let (_, seen) = poll_ok(&repo);
    let pushed = &seen[0].1;
    assert_eq!(pushed.len(), MAX_COMMITS);
    assert_eq!(pushed[0].id, tip, "newest first");
    assert!(pushed.iter().all(|c| c.id != oldest), "the oldest commit is past the limit");
    let files: std::collections::BTreeSet<&str> =
        pushed.iter().flat_map(|c| c.files.iter().map(String::as_str)).collect();
    assert!(files.contains("src/lib.c"), "the oldest commit's path is lost");
    assert_eq!(files.len(), 300, "every path of the push, once");
    // The older commits' paths ride on the oldest recorded change.
    let last = pushed.last().unwrap();
    assert!(last.files.contains(&"src/lib.c".to_owned()) && last.files.contains(&"docs/1.md".to_owned()));
}

#[test]
fn a_new_branch_is_compared_with_the_recorded_branches_not_its_tip_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, first) = make_repo(tmp.path(), &[("README.md", "r\n")]);
    let repo = source_repo(&src, &tmp.path().join("m.git"), &["main", "release/*"]);
    repo.poll(true, &mut |_: &str, _: &[NewCommit]| Ok::<(), String>(())).unwrap();
    let main2 = commit(&src, "src/main.c", 1, "on main", "m\n");
    poll_ok(&repo);

    // A release branch: one code commit, then a docs commit at its tip.
    git(&src, &["checkout", "-q", "-b", "release/1"]);
    let code = commit(&src, "src/fix.c", 2, "fix", "f\n");
    let docs = commit(&src, "NOTES.md", 3, "notes", "n\n");
    git(&src, &["checkout", "-q", "main"]);
    // And one made at main's head, with nothing new.
    git(&src, &["branch", "release/2"]);
    let (report, seen) = poll_ok(&repo);
    assert_eq!(report.recorded, [("release/1".to_owned(), 2), ("release/2".to_owned(), 1)]);
    let r1 = &seen[0].1;
    assert_eq!(r1.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [docs.as_str(), code.as_str()]);
    assert_eq!(r1[1].files, ["src/fix.c"]);
    let r2 = &seen[1].1;
    assert_eq!(r2.len(), 1);
    assert_eq!(r2[0].id, main2);
    assert!(r2[0].files.is_empty(), "nothing changed against the recorded branches: {:?}", r2[0].files);
    let _ = first;
    // Deleting a branch forgets it; recreating it reports it again.
    git(&src, &["branch", "-q", "-D", "release/2"]);
    let (report, _) = poll_ok(&repo);
    assert_eq!(report.deleted, ["release/2"]);
    assert!(!repo.mirror.recorded().unwrap().contains_key("release/2"));
}

#[test]
fn an_unreachable_remote_does_not_hold_back_a_push_already_fetched() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _first) = make_repo(tmp.path(), &[("a.txt", "a\n")]);
    let repo = source_repo(&src, &tmp.path().join("m.git"), &["main"]);
    repo.poll(true, &mut |_: &str, _: &[NewCommit]| Ok::<(), String>(())).unwrap();
    let second = commit(&src, "a.txt", 1, "second", "a2\n");
    let report = repo.poll(false, &mut |_: &str, _: &[NewCommit]| Err("the engine is busy")).unwrap();
    assert_eq!(report.failed.len(), 1);
    // The remote goes away; the push fetched before is handed over all the same.
    std::fs::rename(&src, tmp.path().join("gone")).unwrap();
    let (report, seen) = poll_ok(&repo);
    assert!(report.fetch_error.as_deref().is_some_and(|e| e.contains("cannot fetch")), "{report:?}");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1[0].id, second);
}

#[test]
fn only_private_refs_are_moved() {
    let (_tmp, _src, first, mirror) = setup(&[("a.txt", "a\n")]);
    mirror.fetch(&globs(&["main"])).unwrap();
    let err = mirror.move_ref("refs/heads/main", Some(&first), None).unwrap_err();
    assert!(matches!(err, MirrorError::NotPrivate { .. }), "{err:?}");
    assert_eq!(mirror.head("main").unwrap().as_deref(), Some(first.as_str()));
    // A compare-and-swap: a stale expectation moves nothing.
    mirror.move_ref("refs/rbb/recorded/main", None, Some(&first)).unwrap();
    let stale = "0123456789abcdef0123456789abcdef01234567";
    assert!(mirror.move_ref("refs/rbb/recorded/main", Some(stale), Some(&first)).is_err());
    assert!(mirror.move_ref("refs/rbb/recorded/main", Some(stale), None).is_err());
    assert_eq!(mirror.recorded().unwrap().get("main"), Some(&first));
    mirror.move_ref("refs/rbb/recorded/main", Some(&first), None).unwrap();
    assert!(mirror.recorded().unwrap().is_empty());
}

/// The branch heads the master reads from a local repository at start, before its mirror
/// exists: loose refs, packed refs, a bare repository, a missing branch, and globs left out,
/// all the same as git answers.
#[test]
fn local_heads_read_at_start_match_git_for_loose_packed_and_bare_refs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (repo, first) = make_repo(dir.path(), &[("a.txt", "a\n")]);
    git(&repo, &["branch", "release/1"]);
    let second = commit(&repo, "b.txt", 5, "second", "b\n");
    let branches = globs(&["main", "release/1", "gone", "feature/*"]);
    let want = |main: &str| {
        let mut m = std::collections::BTreeMap::new();
        m.insert("main".to_owned(), Some(main.to_owned()));
        m.insert("release/1".to_owned(), Some(first.clone()));
        m.insert("gone".to_owned(), None);
        m
    };
    assert_eq!(git(&repo, &["rev-parse", "main"]), second);
    assert_eq!(Mirror::local_heads(&repo, &branches), want(&second), "loose refs");
    git(&repo, &["pack-refs", "--all"]);
    assert!(!repo.join(".git/refs/heads/main").exists(), "packed");
    assert_eq!(Mirror::local_heads(&repo, &branches), want(&second), "packed refs");
    let third = commit(&repo, "c.txt", 9, "third", "c\n");
    assert_eq!(Mirror::local_heads(&repo, &branches), want(&third), "a loose ref newer than the packed one");
    let bare = dir.path().join("bare.git");
    run(Command::new("git").args(["clone", "-q", "--bare"]).arg(&repo).arg(&bare), "git clone --bare");
    assert_eq!(Mirror::local_heads(&bare, &branches), want(&third), "a bare repository");
    assert!(Mirror::local_heads(&dir.path().join("nothing"), &branches).is_empty(), "not a repository");
}
