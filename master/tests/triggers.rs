//! Builds start by themselves: real git commits seen by the poller, signed forge webhooks,
//! per-commit plans, broken pipelines, paths filters, queue policy, bursts. The real `rbb
//! master` and `rbb-worker` on loopback.

mod support;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(60);

struct Fixture {
    dir: tempfile::TempDir,
    repo: PathBuf,
    config: PathBuf,
    state: PathBuf,
}

fn fixture(pipeline: &str, extra_config: &str, poll: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("app");
    make_repo(&repo, pipeline, &[("README.md", "readme\n"), ("src/main.c", "int main;\n")]);
    let config = dir.path().join("rbb.yaml");
    std::fs::write(
        &config,
        format!(
            "repositories:\n  - url: app\n    branches: [main, \"release/*\"]\n    poll_interval: {poll}\nworkers:\n  - name: w1\n    token: t\n    max_steps: 4\n{extra_config}"
        ),
    )
    .expect("config");
    let state = dir.path().join("state");
    Fixture { dir, repo, config, state }
}

fn start(f: &Fixture) -> (Master, Worker) {
    let m = Master::start(&f.config, &f.state);
    let w = Worker::start(&m, "w1", "t", &f.dir.path().join("w1"), &[]);
    wait_for(T, "the worker to connect", || {
        (m.get("/api/v2/workers").json()["workers"][0]["connected"] == true).then_some(())
    });
    // The start is over once every repository's poller has fetched: a commit made after
    // this is a new push to whichever of the poller and a webhook sees it first.
    wait_for(T, "every repository's first poll", || {
        let v = m.get("/api/v2/repositories").json();
        let list = v["repositories"].as_array().cloned().unwrap_or_default();
        (!list.is_empty() && list.iter().all(|r| !r["last_success"].is_null())).then_some(())
    });
    (m, w)
}

fn build_for<'a>(all: &'a [serde_json::Value], builder: &str, commit: &str) -> Option<&'a serde_json::Value> {
    all.iter().find(|b| b["builder"] == builder && b["commit"] == commit)
}

const SIMPLE: &str =
    "builders:\n  build:\n    on:\n      push: { branches: [main] }\n    steps: [{ run: echo built }]\n";

#[test]
fn a_commit_is_polled_recorded_and_built() {
    let f = fixture(SIMPLE, "", "100ms");
    let (m, _w) = start(&f);
    let id = commit(&f.repo, "src/lib.c", "int lib;\n", 5, "Add the library\n\nWith a body.");
    let b = wait_for(T, "a build of the new commit", || build_for(&builds(&m), "app/build", &id).cloned());
    let b = m.finished(b["id"].as_u64().expect("id"), T);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    let ch = changes(&m);
    let c = ch.iter().find(|c| c["commit"] == id.as_str()).expect("change recorded");
    assert_eq!(c["author"], "rbb fixtures");
    assert_eq!(c["message"], "Add the library\n\nWith a body.");
    assert_eq!(c["files"], serde_json::json!(["src/lib.c"]));
    assert_eq!(c["source"], "poll");
    assert_eq!(c["builds"], serde_json::json!([b["id"]]));
    assert_eq!(b["changes"], serde_json::json!([c["id"]]));
}

#[test]
fn unwatched_branches_and_paths_filters() {
    let pipeline = "builders:\n  code:\n    on:\n      push: { branches: [main] }\n      paths: [\"src/**\"]\n    steps: [{ run: echo code }]\n";
    let f = fixture(pipeline, "", "100ms");
    let (m, _w) = start(&f);
    git(&f.repo, &["checkout", "-q", "-b", "feature"]);
    let feature = commit(&f.repo, "src/feature.c", "x\n", 1, "On an unwatched branch");
    git(&f.repo, &["checkout", "-q", "main"]);
    let docs = commit(&f.repo, "README.md", "more docs\n", 2, "Docs only");
    let b = wait_for(T, "the docs commit's record", || build_for(&builds(&m), "app/code", &docs).cloned());
    assert_eq!(b["state"], "finished");
    assert_eq!(b["result"], "NOT_AFFECTED", "{b:#}");
    assert!(b["steps"][0]["started_at"].is_null(), "nothing ran");
    // The feature branch was committed first: had it been watched, it would be seen by now.
    assert!(changes(&m).iter().all(|c| c["commit"] != feature.as_str()), "an unwatched branch made a change");
    let code = commit(&f.repo, "src/x.c", "y\n", 3, "Code");
    let b = wait_for(T, "the code commit's build", || build_for(&builds(&m), "app/code", &code).cloned());
    assert_eq!(m.finished(b["id"].as_u64().expect("id"), T)["result"], "SUCCESS");
}

#[test]
fn the_plan_comes_from_the_commit_and_a_broken_pipeline_is_a_visible_failure() {
    let f = fixture(SIMPLE, "", "100ms");
    let (m, _w) = start(&f);
    let first = git(&f.repo, &["rev-parse", "HEAD"]);
    let plan0 = m.get("/api/v2/plan").json()["hash"].clone();
    // A commit that adds a builder: its build runs with the new plan.
    let with_lint = format!("{SIMPLE}  lint:\n    steps: [{{ run: echo linted }}]\n");
    let c2 = commit(&f.repo, ".rbb/pipeline.yaml", &with_lint, 5, "Add lint");
    let lint = wait_for(T, "the new builder's build", || build_for(&builds(&m), "app/lint", &c2).cloned());
    let lint = m.finished(lint["id"].as_u64().expect("id"), T);
    assert_eq!(lint["result"], "SUCCESS");
    assert_ne!(lint["plan_hash"], plan0);
    assert_eq!(
        lint["pipeline_blob"].as_str().expect("blob"),
        git(&f.repo, &["rev-parse", &format!("{c2}:.rbb/pipeline.yaml")])
    );
    assert_ne!(m.get("/api/v2/plan").json()["hash"], plan0, "the head plan follows main");

    // A broken pipeline: a failed build says why, with file:line:col.
    let broken = commit(
        &f.repo,
        ".rbb/pipeline.yaml",
        "builders:\n  build:\n    needs: [nope]\n    steps: [{ run: x }]\n",
        6,
        "Break it",
    );
    let fail = wait_for(T, "the failure build", || build_for(&builds(&m), "app/(pipeline)", &broken).cloned());
    assert_eq!(fail["result"], "FAILURE");
    let log = fail["steps"][0]["log_id"].as_u64().expect("log");
    let text = m.get(&format!("/api/v2/logs/{log}/raw")).text();
    assert!(text.contains("app/.rbb/pipeline.yaml:3:13") && text.contains("needs-unknown"), "{text}");
    // The old plan still serves other commits.
    let r = m.post("/api/v2/builders/app%2Fbuild/force", &format!("{{\"revision\": \"{first}\"}}"));
    assert_eq!(r.status, 201, "{}", r.text());
    let old = m.finished(r.json()["build"].as_u64().expect("id"), T);
    assert_eq!(old["result"], "SUCCESS");
    assert_eq!(old["plan_hash"], plan0);
    // Rebuild reruns exactly the pinned plan.
    let r = m.post(&format!("/api/v2/builds/{}/rebuild", lint["id"]), "");
    assert_eq!(r.status, 201, "{}", r.text());
    let again = m.finished(r.json()["build"].as_u64().expect("id"), T);
    assert_eq!(again["plan_hash"], lint["plan_hash"]);
    assert_eq!(again["commit"], lint["commit"]);
    assert_eq!(again["result"], "SUCCESS");
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn payload(forge: &str, file: &str, f: impl FnOnce(&mut serde_json::Value)) -> String {
    let path = root().join("testdata/webhooks").join(forge).join(file);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("payload")).expect("json");
    f(&mut v);
    v.to_string()
}

fn post_hook(m: &Master, forge: &str, headers: &[(&str, &str)], body: &str) -> Http {
    http(&m.http, "POST", &format!("/api/v2/hooks/{forge}"), headers, Some(body))
}

const HOOKS: &str = "webhooks:\n  github_secret: gh-secret\n  gitlab_token: gl-token\n  gitea_secret: gt-secret\n";

#[test]
fn signed_webhooks_start_builds_at_once_and_bad_ones_are_refused() {
    // Polling is slow here: builds must come from the webhooks.
    let f = fixture(SIMPLE, HOOKS, "1h");
    let (m, _w) = start(&f);
    let mut minute = 10;
    for (forge, file) in [("github", "push.json"), ("gitlab", "push.json"), ("gitea", "push.json")] {
        minute += 1;
        let id = commit(&f.repo, "src/x.c", &format!("{forge}\n"), minute, &format!("Change for {forge}"));
        let body = payload(forge, file, |_| {});
        let (sig_header, sig) = match forge {
            "github" => ("X-Hub-Signature-256", format!("sha256={}", sign("gh-secret", body.as_bytes()))),
            "gitlab" => ("X-Gitlab-Token", "gl-token".to_owned()),
            _ => ("X-Gitea-Signature", sign("gt-secret", body.as_bytes())),
        };
        let event = match forge {
            "github" => ("X-GitHub-Event", "push"),
            "gitlab" => ("X-Gitlab-Event", "Push Hook"),
            _ => ("X-Gitea-Event", "push"),
        };
        let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
        let started = Instant::now();
        let r = post_hook(&m, forge, &[(sig_header, &sig), event], &body);
        assert_eq!(r.status, 202, "{forge}: {}", r.text());
        let b = wait_for(T, "the webhook's build", || build_for(&builds(&m), "app/build", &id).cloned());
        let latency = b["submitted_at"].as_u64().expect("submitted") as i64 - t0 as i64;
        eprintln!("{forge}: webhook → build queued in {latency} ms (seen by the test after {:?})", started.elapsed());
        assert!(latency < 2000, "{forge}: {latency} ms");
        let c = changes(&m).into_iter().find(|c| c["commit"] == id.as_str()).expect("change");
        assert_eq!(c["source"], format!("webhook:{forge}"));
        assert_eq!(m.finished(b["id"].as_u64().expect("id"), T)["result"], "SUCCESS");
    }
    let body = payload("github", "push.json", |_| {});
    let r = post_hook(&m, "github", &[("X-GitHub-Event", "push")], &body);
    assert_eq!(r.status, 401, "{}", r.text());
    let r = post_hook(
        &m,
        "github",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &format!("sha256={}", sign("wrong", body.as_bytes())))],
        &body,
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = post_hook(
        &m,
        "gitlab",
        &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", "nope")],
        &payload("gitlab", "push.json", |_| {}),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let junk = "{not json";
    let r = post_hook(
        &m,
        "github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &format!("sha256={}", sign("gh-secret", junk.as_bytes()))),
        ],
        junk,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "bad_request");
    assert_eq!(post_hook(&m, "bitbucket", &[], "{}").status, 404);
    wait_for(T, "refusals in the master's log", || {
        (m.log_text().matches("webhook refused").count() >= 4).then_some(())
    });
    // A push to a branch that is not watched starts nothing.
    git(&f.repo, &["checkout", "-q", "-b", "experiment"]);
    let exp = commit(&f.repo, "src/e.c", "e\n", 30, "Experiment");
    let body = payload("github", "push.json", |v| v["ref"] = "refs/heads/experiment".into());
    let r = post_hook(
        &m,
        "github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &format!("sha256={}", sign("gh-secret", body.as_bytes()))),
        ],
        &body,
    );
    assert_eq!(r.status, 202);
    git(&f.repo, &["checkout", "-q", "main"]);
    let marker = commit(&f.repo, "src/m.c", "m\n", 31, "After the experiment");
    let body = payload("github", "push.json", |_| {});
    let r = post_hook(
        &m,
        "github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &format!("sha256={}", sign("gh-secret", body.as_bytes()))),
        ],
        &body,
    );
    assert_eq!(r.status, 202);
    wait_for(T, "the main commit's build", || build_for(&builds(&m), "app/build", &marker).map(|_| ()));
    assert!(builds(&m).iter().all(|b| b["commit"] != exp.as_str()), "the unwatched branch was built");
}

#[test]
fn a_pull_request_webhook_builds_its_head() {
    let pipeline = "builders:\n  check:\n    on:\n      pull_request: { branches: [main] }\n    steps: [{ run: 'echo pr $RBB_BRANCH' }]\n";
    let f = fixture(pipeline, HOOKS, "1h");
    let (m, _w) = start(&f);
    // The PR's head branch lives in the repository (as a forge keeps refs/pull/N/head).
    git(&f.repo, &["checkout", "-q", "-b", "release/pr-42"]);
    let head = commit(&f.repo, "src/pr.c", "pr\n", 3, "PR work");
    git(&f.repo, &["checkout", "-q", "main"]);
    let body = payload("github", "pull_request_opened.json", |v| {
        v["pull_request"]["head"]["sha"] = head.clone().into();
        v["pull_request"]["head"]["ref"] = "release/pr-42".into();
    });
    let r = post_hook(
        &m,
        "github",
        &[
            ("X-GitHub-Event", "pull_request"),
            ("X-Hub-Signature-256", &format!("sha256={}", sign("gh-secret", body.as_bytes()))),
        ],
        &body,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let b = wait_for(T, "the pull request build", || build_for(&builds(&m), "app/check", &head).cloned());
    let b = m.finished(b["id"].as_u64().expect("id"), T);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    assert!(b["reason"].as_str().expect("reason").contains("pull request #42 into main"), "{b:#}");
    let c = changes(&m).into_iter().find(|c| c["commit"] == head.as_str()).expect("change");
    assert_eq!(c["event"], "pull_request");
    assert_eq!(c["pull_request"], 42);
}

#[test]
fn a_burst_of_pushes_is_collapsed_and_every_change_is_kept() {
    let pipeline =
        "builders:\n  build:\n    on:\n      push: { branches: [main] }\n    steps: [{ run: 'sleep 0.2' }]\n";
    let f = fixture(pipeline, "", "100ms");
    let (m, _w) = start(&f);
    let script = format!(
        "cd {} && for i in $(seq 1 100); do echo $i > burst.txt; git add burst.txt; GIT_AUTHOR_NAME=b GIT_AUTHOR_EMAIL=b@x GIT_COMMITTER_NAME=b GIT_COMMITTER_EMAIL=b@x git commit -qm \"burst $i\"; done; git rev-parse HEAD",
        f.repo.display()
    );
    let out = std::process::Command::new("sh").args(["-c", &script]).output().expect("burst");
    assert!(out.status.success());
    let last = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let b = wait_for(T, "a build of the last commit", || build_for(&builds(&m), "app/build", &last).cloned());
    m.finished(b["id"].as_u64().expect("id"), T);
    let ch = changes(&m);
    let burst: Vec<&serde_json::Value> =
        ch.iter().filter(|c| c["message"].as_str().is_some_and(|s| s.starts_with("burst "))).collect();
    assert_eq!(burst.len(), 100, "every commit is in the change log");
    let all = builds(&m);
    let ran = all.iter().filter(|b| b["result"] != "SKIPPED").count();
    eprintln!("100 pushes → {} builds, {ran} not collapsed", all.len());
    assert!(ran < 100, "nothing was collapsed");
    // Every change belongs to some build (collapsed builds hand their changes on).
    let live: std::collections::BTreeSet<u64> = all
        .iter()
        .filter(|b| b["result"] != "SKIPPED")
        .flat_map(|b| b["changes"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c.as_u64())
        .collect();
    for c in burst {
        assert!(live.contains(&c["id"].as_u64().expect("id")), "change {} was lost", c["id"]);
    }
}

#[test]
fn a_newer_commit_stops_a_superseded_build_and_locks_serialise() {
    let pipeline = "builders:\n  slow:\n    cancel_superseded: true\n    on:\n      push: { branches: [main] }\n    steps: [{ run: 'echo start; sleep 30' }]\n  a:\n    on: { force: true }\n    locks: [{ name: db, mode: exclusive }]\n    steps: [{ run: 'sleep 0.3' }]\n  b:\n    on: { force: true }\n    locks: [{ name: db }]\n    steps: [{ run: 'sleep 0.3' }]\n";
    let f = fixture(pipeline, "locks:\n  db: { max: 2 }\n", "100ms");
    let (m, _w) = start(&f);
    let c1 = commit(&f.repo, "src/1.c", "1\n", 1, "one");
    let b1 = wait_for(T, "the first build running", || {
        build_for(&builds(&m), "app/slow", &c1).filter(|b| b["state"] == "running").cloned()
    });
    let c2 = commit(&f.repo, "src/2.c", "2\n", 2, "two");
    let b1 = m.finished(b1["id"].as_u64().expect("id"), T);
    assert_eq!(b1["result"], "CANCELLED", "{b1:#}");
    assert!(b1["result_reason"].as_str().expect("reason").contains("superseded"), "{b1:#}");
    let b2 = wait_for(T, "the second build", || build_for(&builds(&m), "app/slow", &c2).cloned());
    assert_eq!(b2["state"], "running");
    m.post(&format!("/api/v2/builds/{}/stop", b2["id"]), "");

    // `a` holds `db` exclusively: `b` (counting) waits for it, though the worker has room.
    let a = m.force("app/a");
    let b = m.force("app/b");
    let a = m.finished(a, T);
    let b = m.finished(b, T);
    assert!(b["started_at"].as_u64() >= a["finished_at"].as_u64(), "b ran while a held the lock: {a:#} {b:#}");
}

#[test]
fn a_downstream_builder_in_another_repository_starts_when_its_upstream_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = dir.path().join("lib");
    make_repo(
        &lib,
        "builders:\n  build:\n    on:\n      push: { branches: [main] }\n    steps: [{ run: echo lib }]\n",
        &[],
    );
    make_repo(
        &dir.path().join("app"),
        "builders:\n  test:\n    needs: [lib/build]\n    on:\n      push: { branches: [main] }\n    steps: [{ run: echo app }]\n",
        &[],
    );
    let config = dir.path().join("rbb.yaml");
    std::fs::write(&config, "repositories:\n  - url: lib\n    poll_interval: 100ms\n  - url: app\n    poll_interval: 100ms\nworkers:\n  - name: w1\n    token: t\n    max_steps: 2\n").expect("config");
    let m = Master::start(&config, &dir.path().join("state"));
    let _w = Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let c = commit(&lib, "lib.c", "1\n", 1, "lib change");
    let up = wait_for(T, "lib/build", || build_for(&builds(&m), "lib/build", &c).cloned());
    let up = m.finished(up["id"].as_u64().expect("id"), T);
    assert_eq!(up["result"], "SUCCESS");
    let down = wait_for(T, "app/test for the same change", || {
        builds(&m).into_iter().find(|b| b["builder"] == "app/test" && b["changes"] == up["changes"])
    });
    let down = m.finished(down["id"].as_u64().expect("id"), T);
    assert_eq!(down["result"], "SUCCESS", "{down:#}");
    assert!(down["reason"].as_str().expect("reason").contains("lib/build succeeded"), "{down:#}");
    let _ = Path::new("");
}

#[test]
fn a_push_made_while_the_master_was_down_is_built_after_it_starts() {
    let f = fixture(SIMPLE, "", "100ms");
    let (m, w) = start(&f);
    let seen = commit(&f.repo, "src/a.c", "a\n", 1, "Seen by the master");
    let b = wait_for(T, "the first commit's build", || build_for(&builds(&m), "app/build", &seen).cloned());
    m.finished(b["id"].as_u64().expect("id"), T);
    drop(w);
    drop(m);
    let down = commit(&f.repo, "src/b.c", "b\n", 2, "Pushed while the master was down");
    let (m, _w) = start(&f);
    let b =
        wait_for(T, "a build of the commit pushed meanwhile", || build_for(&builds(&m), "app/build", &down).cloned());
    assert_eq!(m.finished(b["id"].as_u64().expect("id"), T)["result"], "SUCCESS");
    let ch = changes(&m);
    let c: Vec<_> = ch.iter().filter(|c| c["commit"] == down.as_str()).collect();
    assert_eq!(c.len(), 1, "{ch:#?}");
    assert_eq!(c[0]["files"], serde_json::json!(["src/b.c"]));
    assert_eq!(ch.iter().filter(|c| c["commit"] == seen.as_str()).count(), 1, "the first commit again: {ch:#?}");
}

const CODE_ON_RELEASES: &str = "builders:\n  code:\n    on:\n      push: { branches: [main, \"release/*\"] }\n      paths: [\"src/**\"]\n    steps: [{ run: echo code }]\n";

/// Runs the `commits.sh` fixture: `count` commits on `branch` in one step.
fn bulk_commits(repo: &Path, branch: &str, count: u32, pattern: &str, minutes: u32) -> String {
    sh(
        &root().join("testdata/fixtures/commits.sh"),
        &[repo.to_str().expect("utf8"), branch, &count.to_string(), pattern, "Bulk", &minutes.to_string()],
    )
}

#[test]
fn a_paths_filter_sees_every_commit_of_a_long_push() {
    let f = fixture(CODE_ON_RELEASES, "", "100ms");
    let (m, _w) = start(&f);
    // 300 commits reach main in one push; only the oldest touches src/.
    git(&f.repo, &["checkout", "-q", "-b", "work"]);
    let oldest = commit(&f.repo, "src/old.c", "old\n", 1, "The only code change");
    let tip = bulk_commits(&f.repo, "work", 299, "docs/%d.md", 2);
    git(&f.repo, &["checkout", "-q", "main"]);
    git(&f.repo, &["merge", "-q", "--ff-only", "work"]);
    let b = wait_for(T, "the long push's build", || build_for(&builds(&m), "app/code", &tip).cloned());
    let b = m.finished(b["id"].as_u64().expect("id"), T);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    let ch = changes(&m);
    let pushed = ch.iter().filter(|c| c["branch"] == "main" && c["commit"] != oldest.as_str()).count();
    assert_eq!(pushed, 200, "at most 200 changes per push");
}

#[test]
fn a_paths_filter_compares_a_new_branch_with_the_known_branches_not_its_tip_alone() {
    let f = fixture(CODE_ON_RELEASES, "", "100ms");
    let (m, _w) = start(&f);
    // A new release branch whose tip touches only docs, after a code commit.
    git(&f.repo, &["checkout", "-q", "-b", "work2"]);
    commit(&f.repo, "src/fix.c", "fix\n", 20, "Fix");
    let docs = commit(&f.repo, "NOTES.md", "notes\n", 21, "Notes");
    git(&f.repo, &["checkout", "-q", "main"]);
    git(&f.repo, &["branch", "release/1", "work2"]);
    let b = wait_for(T, "the new branch's build", || build_for(&builds(&m), "app/code", &docs).cloned());
    let b = m.finished(b["id"].as_u64().expect("id"), T);
    assert_eq!(b["result"], "SUCCESS", "compared with main, the branch changes src/: {b:#}");
    assert_eq!(b["branch"], "release/1");
}

fn post_signed_github(m: &Master, event: &str, body: &str) -> Http {
    post_hook(
        m,
        "github",
        &[
            ("X-GitHub-Event", event),
            ("X-Hub-Signature-256", &format!("sha256={}", sign("gh-secret", body.as_bytes()))),
        ],
        body,
    )
}

#[test]
fn a_fork_pull_request_is_fetched_and_a_redelivery_builds_nothing_new() {
    let pipeline = "builders:\n  check:\n    on:\n      pull_request: { branches: [main] }\n    steps: [{ run: 'echo pr $RBB_BRANCH' }]\n";
    let f = fixture(pipeline, HOOKS, "1h");
    // The fork's commit exists only under the forge's PR ref.
    git(&f.repo, &["checkout", "-q", "-b", "fork"]);
    let head = commit(&f.repo, "src/pr.c", "pr\n", 3, "PR from a fork");
    git(&f.repo, &["checkout", "-q", "main"]);
    git(&f.repo, &["update-ref", "refs/pull/42/head", &head]);
    git(&f.repo, &["branch", "-q", "-D", "fork"]);
    let (m, _w) = start(&f);
    let body = payload("github", "pull_request_opened.json", |v| {
        v["pull_request"]["head"]["sha"] = head.clone().into();
    });
    let r = post_signed_github(&m, "pull_request", &body);
    assert_eq!(r.status, 202, "{}", r.text());
    let b = wait_for(T, "the pull request build", || build_for(&builds(&m), "app/check", &head).cloned());
    let b = m.finished(b["id"].as_u64().expect("id"), T);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    let before = builds(&m).len();

    // The forge redelivers the same event: no new change, no new build.
    let r = post_signed_github(&m, "pull_request", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("already recorded"), "{}", r.text());
    assert_eq!(builds(&m).len(), before);
    assert_eq!(changes(&m).iter().filter(|c| c["commit"] == head.as_str()).count(), 1);

    // A head the forge does not publish: a clear refusal, no "(pipeline)" failure.
    let missing = "0123456789abcdef0123456789abcdef01234567";
    let body = payload("github", "pull_request_opened.json", |v| {
        v["number"] = 43.into();
        v["pull_request"]["number"] = 43.into();
        v["pull_request"]["head"]["sha"] = missing.into();
    });
    let r = post_signed_github(&m, "pull_request", &body);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("refs/pull/43/head") && r.text().contains(missing), "{}", r.text());
    assert_eq!(builds(&m).len(), before);
    assert!(builds(&m).iter().all(|b| b["builder"] != "app/(pipeline)"));
}

#[test]
fn a_webhook_racing_the_poller_on_one_push_records_it_once() {
    let f = fixture(SIMPLE, HOOKS, "50ms");
    let (m, _w) = start(&f);
    let id = commit(&f.repo, "src/race.c", "r\n", 1, "Raced");
    let body = payload("github", "push.json", |_| {});
    let hooks: Vec<_> = (0..4)
        .map(|_| {
            let (addr, body) = (m.http.clone(), body.clone());
            std::thread::spawn(move || {
                let sig = format!("sha256={}", sign("gh-secret", body.as_bytes()));
                http(
                    &addr,
                    "POST",
                    "/api/v2/hooks/github",
                    &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
                    Some(&body),
                )
                .status
            })
        })
        .collect();
    for h in hooks {
        assert_eq!(h.join().expect("hook thread"), 202);
    }
    wait_for(T, "the raced commit's build", || build_for(&builds(&m), "app/build", &id).map(|_| ()));
    // Pushes of one repository are handled in order: once a later commit is recorded, a
    // duplicate of the raced one would be too.
    let later = commit(&f.repo, "src/later.c", "l\n", 2, "Later");
    wait_for(T, "the later commit's change", || {
        changes(&m).iter().any(|c| c["commit"] == later.as_str()).then_some(())
    });
    assert_eq!(changes(&m).iter().filter(|c| c["commit"] == id.as_str()).count(), 1);
    assert_eq!(builds(&m).iter().filter(|b| b["commit"] == id.as_str()).count(), 1);
}

/// The master answers before it has read a fleet's pipelines (new mirrors are fetched and
/// the head plan compiled in the background), and nothing answers from a half-read plan:
/// right after it says it listens, the builder list is whole, a force finds its builder, the
/// builds list answers, and a commit pushed at that moment is built, not taken as the new
/// mirror's starting point.
#[test]
fn right_after_start_the_plan_is_whole_and_a_push_at_that_moment_is_built() {
    const REPOS: usize = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = String::from("repositories:\n");
    for i in 0..REPOS {
        make_repo(&dir.path().join(format!("r{i:02}")), SIMPLE, &[("README.md", "readme\n")]);
        config.push_str(&format!("  - url: r{i:02}\n    poll_interval: 100ms\n"));
    }
    config.push_str("workers:\n  - name: w1\n    token: t\n    max_steps: 4\n");
    std::fs::write(dir.path().join("rbb.yaml"), config).expect("config");
    let m = Master::start(&dir.path().join("rbb.yaml"), &dir.path().join("state"));
    // At once, before anything could have been read in the background.
    let pushed = commit(&dir.path().join("r07"), "src/a.c", "int a;\n", 5, "Pushed while the master starts");
    let builds = m.get("/api/v2/builds?limit=1");
    assert_eq!(builds.status, 200, "{}", builds.text());
    let list = m.get("/api/v2/builders?limit=1000");
    assert_eq!(list.status, 200, "{}", list.text());
    assert_eq!(list.json()["meta"]["total"], REPOS, "every repository's builder: {}", list.text());
    let forced = m.force("r31/build");
    assert!(forced > 0);
    let _w = Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let b = wait_for(T, "a build of the commit pushed at start", || {
        build_for(&support::builds(&m), "r07/build", &pushed).cloned()
    });
    let b = m.finished(b["id"].as_u64().expect("id"), T);
    assert_eq!(b["result"], "SUCCESS", "{b}");
    let f = m.finished(forced, T);
    assert_eq!(f["result"], "SUCCESS", "{f}");
    // Only that push and that force: the other repositories' first fetches built nothing.
    let all = support::builds(&m);
    assert_eq!(all.len(), 2, "{all:?}");
}

/// A configured local path that is not a git repository stops the start with a message that
/// names the repository, before anything listens.
#[test]
fn a_local_path_that_is_not_a_git_repository_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("plain")).expect("mkdir");
    std::fs::write(dir.path().join("plain/README.md"), "not a repository\n").expect("file");
    std::fs::write(dir.path().join("rbb.yaml"), "repositories:\n  - url: plain\n").expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rbb"))
        .args(["master", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--config"])
        .arg(dir.path().join("rbb.yaml"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .expect("run rbb master");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the master started: {stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"), "it listened");
    assert!(stderr.contains("repository plain:") && stderr.contains("is not a git repository"), "{stderr}");
}
