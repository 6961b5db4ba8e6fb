//! The step cache end to end: the real `rbb master` and `rbb-worker` binaries, real git
//! repositories, real blob files. What must hold: an unchanged step is reused with its
//! outputs, a changed input re-runs exactly the steps that depend on it, a failure is never
//! reused, and a lost or corrupt blob turns a hit into a run, never into a wrong build.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(60);

const PIPELINE: &str = r#"
builders:
  build:
    steps:
      - name: compile
        run: mkdir -p out && cat src/a.txt src/b.txt > out/app.bin && chmod 755 out/app.bin
        inputs: [src]
        outputs: [out/app.bin]
      - name: docs
        run: mkdir -p out/doc && cp docs/*.md out/doc/ && mkdir -p out/doc/empty
        inputs: ["docs/*.md"]
        outputs: [out/doc]
      - name: package
        run: cat out/app.bin out/doc/guide.md > out/package.txt
        inputs: [package.sh]
        outputs: [out/package.txt]
      - name: show
        run: echo "package:"; cat out/package.txt; ls -l out/app.bin; ls -d out/doc/empty
        cache: false
"#;

struct Fixture {
    dir: tempfile::TempDir,
    repo: PathBuf,
    config: PathBuf,
    state: PathBuf,
}

fn fixture(pipeline: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("app");
    make_repo(
        &repo,
        pipeline,
        &[
            ("src/a.txt", "A1\n"),
            ("src/b.txt", "B1\n"),
            ("docs/guide.md", "guide v1\n"),
            ("package.sh", "#!/bin/sh\n"),
            ("README.md", "readme\n"),
        ],
    );
    let config = dir.path().join("rbb.yaml");
    std::fs::write(
        &config,
        "repositories:\n  - url: app\n    poll_interval: 100ms\nworkers:\n  - name: w1\n    token: t\n    max_steps: 2\n",
    )
    .expect("config");
    let state = dir.path().join("state");
    Fixture { dir, repo, config, state }
}

fn steps(b: &serde_json::Value) -> Vec<(String, String)> {
    b["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| (s["name"].as_str().unwrap_or("").to_owned(), s["result"].as_str().unwrap_or("").to_owned()))
        .collect()
}

fn step<'a>(b: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    b["steps"].as_array().expect("steps").iter().find(|s| s["name"] == name).expect("step")
}

fn log(m: &Master, b: &serde_json::Value, name: &str) -> String {
    let id = step(b, name)["log_id"].as_u64().expect("log id");
    m.get(&format!("/api/v2/logs/{id}/raw")).text()
}

/// Waits for the finished build of `commit` (started by the poller).
fn build_of(m: &Master, commit: &str) -> serde_json::Value {
    let id = wait_for(T, &format!("a build of {commit}"), || {
        builds(m).iter().find(|b| b["commit"] == commit && b["builder"] == "app/build").and_then(|b| b["id"].as_u64())
    });
    m.finished(id, T)
}

/// Waits until the master sees worker `w1` connected (`true`) or gone (`false`).
fn worker_connected(m: &Master, connected: bool) {
    wait_for(T, &format!("w1 connected = {connected}"), || {
        (m.get("/api/v2/workers").json()["workers"][0]["connected"] == connected).then_some(())
    });
}

/// Replaces the running worker by a fresh one: the old session is over before any build is
/// forced, so no lease goes to a dead worker (its build would be retried under another id).
fn restart_worker(m: &Master, old: &mut Worker, dir: &Path, env: &[(&str, &str)]) -> Worker {
    old.kill9();
    worker_connected(m, false);
    let w = Worker::start(m, "w1", "t", dir, env);
    worker_connected(m, true);
    w
}

fn expect(b: &serde_json::Value, want: &[(&str, &str)]) {
    let got = steps(b);
    let want: Vec<(String, String)> = want.iter().map(|(n, r)| ((*n).to_owned(), (*r).to_owned())).collect();
    assert_eq!(got, want, "build {}: {b:#}", b["id"]);
}

fn blob_files(state: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let root = state.join("cache/blobs");
    for d in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            if f.path().is_file() {
                out.push(f.path());
            }
        }
    }
    out
}

#[test]
fn an_unchanged_step_is_reused_and_a_changed_input_reruns_exactly_what_depends_on_it() {
    let f = fixture(PIPELINE);
    let m = Master::start(&f.config, &f.state);
    let _w = Worker::start(&m, "w1", "t", &f.dir.path().join("w1"), &[]);

    // First run: everything runs; each cacheable step stores its outputs.
    let b1 = m.finished(m.force("app/build"), T);
    assert_eq!(b1["result"], "SUCCESS", "{b1:#}");
    for name in ["compile", "docs", "package"] {
        let c = &step(&b1, name)["cache"];
        assert_eq!(c["state"], "miss", "{name}: {c}");
        assert_eq!(c["stored"], true, "{name}: {c}");
        assert_eq!(c["reason"], "no earlier successful execution", "{name}: {c}");
    }
    assert_eq!(step(&b1, "show")["cache"]["state"], "disabled");
    assert_eq!(step(&b1, "show")["cache"]["reason"], "`cache: false`");

    // Same commit again: every cacheable step is reused, outputs restored (the uncached
    // step reads them), and each links to the execution it reused.
    let b2 = m.finished(m.force("app/build"), T);
    expect(&b2, &[("compile", "CACHED"), ("docs", "CACHED"), ("package", "CACHED"), ("show", "SUCCESS")]);
    for name in ["compile", "docs", "package"] {
        let c = &step(&b2, name)["cache"];
        assert_eq!(c["state"], "hit", "{c}");
        assert_eq!(c["from"]["build"], b1["id"], "{c}");
        assert_eq!(c["from"]["step_name"], name, "{c}");
        assert_eq!(c["key"], step(&b1, name)["cache"]["key"], "same inputs, same key");
        assert!(log(&m, &b2, name).contains("cache hit"), "{}", log(&m, &b2, name));
    }
    let shown = log(&m, &b2, "show");
    assert!(shown.contains("A1\nB1\nguide v1"), "restored outputs: {shown}");
    assert!(shown.contains("-rwxr-xr-x"), "restored mode: {shown}");
    assert!(shown.contains("out/doc/empty"), "restored empty directory: {shown}");

    // A file outside every input: nothing re-runs.
    let readme = commit(&f.repo, "README.md", "readme v2\n", 1, "Docs outside the inputs");
    let b3 = build_of(&m, &readme);
    expect(&b3, &[("compile", "CACHED"), ("docs", "CACHED"), ("package", "CACHED"), ("show", "SUCCESS")]);

    // A file inside `docs/*.md`: docs runs, and package, which comes after it; compile,
    // before it, is reused.
    let guide = commit(&f.repo, "docs/guide.md", "guide v2\n", 2, "New guide");
    let b4 = build_of(&m, &guide);
    expect(&b4, &[("compile", "CACHED"), ("docs", "SUCCESS"), ("package", "SUCCESS"), ("show", "SUCCESS")]);
    let docs = &step(&b4, "docs")["cache"];
    assert_eq!(docs["state"], "miss");
    let changed: Vec<&str> = docs["changed"].as_array().expect("changed").iter().filter_map(|c| c.as_str()).collect();
    assert!(changed.iter().any(|c| c.starts_with("inputs.docs/*.md")), "{changed:?}");
    let package = &step(&b4, "package")["cache"];
    let changed: Vec<&str> =
        package["changed"].as_array().expect("changed").iter().filter_map(|c| c.as_str()).collect();
    assert_eq!(changed, ["after"], "package ran because an earlier step changed: {package}");
    assert!(log(&m, &b4, "show").contains("A1\nB1\nguide v2"), "{}", log(&m, &b4, "show"));

    // A new file matched by the glob is an input change too.
    let extra = commit(&f.repo, "docs/extra.md", "extra\n", 3, "Another page");
    let b5 = build_of(&m, &extra);
    expect(&b5, &[("compile", "CACHED"), ("docs", "SUCCESS"), ("package", "SUCCESS"), ("show", "SUCCESS")]);

    // The counts per builder follow.
    let stats = m.get("/api/v2/cache").json();
    let per = stats["builders"].as_array().expect("per-builder stats");
    let mine = per.iter().find(|b| b["builder"] == "app/build").expect("app/build stats");
    assert_eq!(mine["hits"], 3 + 3 + 1 + 1, "{stats:#}");
    assert_eq!(mine["misses"], 3 + 2 + 2, "{stats:#}");
}

#[test]
fn a_failure_is_never_reused_and_the_why_names_the_changed_command() {
    let f = fixture(
        r#"
builders:
  build:
    steps:
      - name: flaky
        run: test -f src/ok || exit 3
        inputs: [src]
"#,
    );
    let m = Master::start(&f.config, &f.state);
    let _w = Worker::start(&m, "w1", "t", &f.dir.path().join("w1"), &[]);
    for _ in 0..2 {
        let b = m.finished(m.force("app/build"), T);
        assert_eq!(b["result"], "FAILURE", "{b:#}");
        assert_eq!(step(&b, "flaky")["cache"]["state"], "miss");
        assert!(step(&b, "flaky")["cache"].get("stored").is_none(), "a failure is not stored");
    }
    // The same key after a pipeline change that fixes it: runs (a failure was never stored).
    let fixed = commit(
        &f.repo,
        ".rbb/pipeline.yaml",
        "builders:\n  build:\n    steps:\n      - name: flaky\n        run: test -f src/a.txt\n        inputs: [src]\n",
        1,
        "Fix the check",
    );
    let b = build_of(&m, &fixed);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    let c = &step(&b, "flaky")["cache"];
    assert_eq!(c["state"], "miss", "{c}");
    assert_eq!(c["reason"], "no earlier successful execution", "{c}");
    let again = m.finished(m.force("app/build"), T);
    assert_eq!(again["result"], "CACHED", "{again:#}");
}

#[test]
fn a_lost_or_corrupt_blob_makes_the_step_run_again_and_a_restart_keeps_the_cache() {
    let f = fixture(PIPELINE);
    let mut m = Master::start(&f.config, &f.state);
    let first = f.dir.path().join("w1-first");
    let mut w = Worker::start(&m, "w1", "t", &first, &[]);
    let b1 = m.finished(m.force("app/build"), T);
    assert_eq!(b1["result"], "SUCCESS", "{b1:#}");
    let blobs = blob_files(&f.state);
    assert!(blobs.len() >= 3, "blobs stored: {blobs:?}");

    // A master restart keeps the entries.
    m.kill();
    w.kill9();
    let m = Master::start_on(&f.config, &f.state, &m.grpc.clone());
    // A fresh worker directory: the worker has no local copy and must fetch every blob.
    let mut w2 = Worker::start(&m, "w1", "t", &f.dir.path().join("w1-second"), &[]);
    worker_connected(&m, true);
    let b2 = m.finished(m.force("app/build"), T);
    expect(&b2, &[("compile", "CACHED"), ("docs", "CACHED"), ("package", "CACHED"), ("show", "SUCCESS")]);

    // Every blob deleted from the store: the steps run again (and store their outputs
    // again), the build passes.
    for b in blob_files(&f.state) {
        std::fs::remove_file(b).expect("remove blob");
    }
    let mut w3 = restart_worker(&m, &mut w2, &f.dir.path().join("w1-third"), &[]);
    let b3 = m.finished(m.force("app/build"), T);
    expect(&b3, &[("compile", "SUCCESS"), ("docs", "SUCCESS"), ("package", "SUCCESS"), ("show", "SUCCESS")]);
    assert!(log(&m, &b3, "show").contains("A1\nB1\nguide v1"));

    // Every blob corrupted on disk (a fresh worker must fetch them): the master detects it
    // as it streams, the step runs, the build passes with the right content.
    for b in blob_files(&f.state) {
        std::fs::write(&b, b"not zstd at all").expect("corrupt blob");
    }
    let _w4 = restart_worker(&m, &mut w3, &f.dir.path().join("w1-fourth"), &[]);
    let b4 = m.finished(m.force("app/build"), T);
    assert_eq!(b4["result"], "SUCCESS", "{b4:#}");
    assert_eq!(step(&b4, "compile")["result"], "SUCCESS", "a corrupt blob is a miss: {b4:#}");
    let why = step(&b4, "compile")["cache"]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(why.contains("could not be restored"), "{why}");
    assert!(log(&m, &b4, "show").contains("A1\nB1\nguide v1"), "{}", log(&m, &b4, "show"));
    // ... and the fresh upload repaired the store.
    let b5 = m.finished(m.force("app/build"), T);
    expect(&b5, &[("compile", "CACHED"), ("docs", "CACHED"), ("package", "CACHED"), ("show", "SUCCESS")]);
}

#[test]
fn pass_env_values_are_part_of_the_key_and_a_reset_runs_everything_again() {
    let f = fixture(
        r#"
builders:
  build:
    steps:
      - name: greet
        run: echo "$GREETING" > greeting.txt
        inputs: [src]
        pass_env: [GREETING]
        outputs: [greeting.txt]
      - name: show
        run: cat greeting.txt
        cache: false
"#,
    );
    let m = Master::start(&f.config, &f.state);
    let mut w = Worker::start(&m, "w1", "t", &f.dir.path().join("w1"), &[("GREETING", "hello")]);
    let b1 = m.finished(m.force("app/build"), T);
    assert_eq!(b1["result"], "SUCCESS", "{b1:#}");
    assert!(log(&m, &b1, "show").contains("hello"), "pass_env reaches the step");
    let b2 = m.finished(m.force("app/build"), T);
    assert_eq!(step(&b2, "greet")["result"], "CACHED");
    let _w = restart_worker(&m, &mut w, &f.dir.path().join("w1"), &[("GREETING", "bonjour")]);
    let b3 = m.finished(m.force("app/build"), T);
    assert_eq!(step(&b3, "greet")["result"], "SUCCESS", "{b3:#}");
    assert_eq!(step(&b3, "greet")["cache"]["changed"], serde_json::json!(["pass_env.GREETING"]));
    assert!(log(&m, &b3, "show").contains("bonjour"));
    // No value reaches the master: only its hash is in the key.
    assert!(!m.get(&format!("/api/v2/builds/{}", b3["id"])).text().contains("bonjour"));

    // Reset: the next run runs, and says why.
    let r = http(&m.http, "POST", "/api/v2/builders/app%2Fbuild/cache/reset", &[], Some("{}"));
    assert!(r.status < 300, "reset: {} {}", r.status, r.text());
    let b4 = m.finished(m.force("app/build"), T);
    assert_eq!(step(&b4, "greet")["result"], "SUCCESS", "{b4:#}");
    assert_eq!(step(&b4, "greet")["cache"]["changed"], serde_json::json!(["epoch"]));
    let b5 = m.finished(m.force("app/build"), T);
    assert_eq!(step(&b5, "greet")["result"], "CACHED", "{b5:#}");
}

#[test]
fn a_worker_killed_mid_upload_leaves_no_entry_and_the_retry_stores_a_whole_one() {
    let f = fixture(
        r#"
builders:
  build:
    steps:
      - name: produce
        run: head -c 33554432 /dev/urandom > big.bin && sha256sum big.bin
        inputs: [src]
        outputs: [big.bin]
      - name: show
        run: sha256sum big.bin
        cache: false
"#,
    );
    let m = Master::start(&f.config, &f.state);
    let mut w = Worker::start(&m, "w1", "t", &f.dir.path().join("w1"), &[]);
    let first = m.force("app/build");
    // The upload is under way once the master has a temporary file for it.
    let tmp = f.state.join("cache/tmp");
    wait_for(T, "an upload in progress", || std::fs::read_dir(&tmp).ok().and_then(|mut d| d.next()).map(|_| ()));
    w.kill9();
    let lost = m.finished(first, T);
    assert_eq!(lost["result"], "RETRY", "{lost:#}");
    // The cut upload left nothing: no temporary file, no entry.
    wait_for(T, "the cut upload to be discarded", || {
        std::fs::read_dir(&tmp).ok().is_some_and(|mut d| d.next().is_none()).then_some(())
    });
    assert_eq!(m.get("/api/v2/cache").json()["entries"], 0);

    let _w = Worker::start(&m, "w1", "t", &f.dir.path().join("w1-again"), &[]);
    let retry = wait_for(T, "the retry", || {
        builds(&m).iter().find(|b| b["reason"] == format!("retry of build {first}")).and_then(|b| b["id"].as_u64())
    });
    let b = m.finished(retry, T);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    assert_eq!(step(&b, "produce")["cache"]["state"], "miss", "{b:#}");
    assert_eq!(step(&b, "produce")["cache"]["stored"], true, "{b:#}");
    let digest = |text: String| {
        text.lines().find(|l| l.len() == 64 + "  big.bin".len() && l.ends_with("  big.bin")).map(|l| l[..64].to_owned())
    };
    let made = digest(log(&m, &b, "produce")).expect("digest printed");
    let reused = m.finished(m.force("app/build"), T);
    assert_eq!(step(&reused, "produce")["result"], "CACHED", "{reused:#}");
    assert_eq!(digest(log(&m, &reused, "show")), Some(made), "the restored file is the stored one");
}

#[test]
fn a_new_cache_salt_runs_the_builders_steps_again_and_says_so() {
    let pipeline = |salt: &str| {
        format!(
            "builders:\n  build:\n{salt}    steps:\n      - name: make\n        run: cat src/a.txt > made.txt\n        inputs: [src]\n        outputs: [made.txt]\n"
        )
    };
    let f = fixture(&pipeline(""));
    let m = Master::start(&f.config, &f.state);
    let _w = Worker::start(&m, "w1", "t", &f.dir.path().join("w1"), &[]);
    let b1 = m.finished(m.force("app/build"), T);
    assert_eq!(step(&b1, "make")["result"], "SUCCESS", "{b1:#}");
    let b2 = m.finished(m.force("app/build"), T);
    assert_eq!(step(&b2, "make")["result"], "CACHED", "{b2:#}");
    let salted = commit(&f.repo, ".rbb/pipeline.yaml", &pipeline("    cache_salt: \"2\"\n"), 1, "Salt the cache");
    let b3 = build_of(&m, &salted);
    assert_eq!(step(&b3, "make")["result"], "SUCCESS", "{b3:#}");
    assert_eq!(step(&b3, "make")["cache"]["changed"], serde_json::json!(["salt"]), "{b3:#}");
    let b4 = m.finished(m.force("app/build"), T);
    assert_eq!(step(&b4, "make")["result"], "CACHED", "{b4:#}");
}
