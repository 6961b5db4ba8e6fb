//! The real `rbb` binary against real git repositories made by the fixture scripts.

mod support;

use rbb_schema::plan::Plan;
use std::path::Path;
use std::process::{Command, Output};
use support::{commit, git, root, sh};

/// Makes the demo repositories under a temp dir; returns (dir, commit ids by repo).
fn demo() -> (tempfile::TempDir, Vec<(String, String)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(root().join("testdata/demo/rbb.yaml"), dir.path().join("rbb.yaml")).expect("copy config");
    let mut commits = Vec::new();
    for repo in ["lib", "app", "docs"] {
        let src = root().join("testdata/repos").join(repo);
        let dst = dir.path().join("repos").join(repo);
        let id = sh(
            &root().join("testdata/fixtures/mkrepo.sh"),
            &[src.to_str().expect("utf8"), dst.to_str().expect("utf8")],
        );
        commits.push((repo.to_owned(), id));
    }
    (dir, commits)
}

fn rbb(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rbb")).current_dir(dir).args(args).output().expect("run rbb")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn explain(out: &Output) -> String {
    format!("status {}\n--- stdout\n{}\n--- stderr\n{}", out.status, text(&out.stdout), text(&out.stderr))
}

#[test]
fn compiles_the_demo_repositories_from_git() {
    let (dir, commits) = demo();
    let out = rbb(dir.path(), &["compile", "--format", "json"]);
    assert!(out.status.success(), "{}", explain(&out));
    let plan: Plan = serde_json::from_slice(&out.stdout).expect("plan JSON");
    let ids: Vec<&str> = plan.builders.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "app/lint-src",
            "app/nightly",
            "app/package",
            "app/test[mode=debug,shard=1]",
            "app/test[mode=debug,shard=2]",
            "app/test[mode=release,shard=1]",
            "docs/site",
            "lib/build"
        ]
    );
    // Provenance: the commit each pipeline was read at, and its blob id, straight from git.
    for (repo, id) in &commits {
        let r = plan.repos.iter().find(|r| &r.name == repo).expect("repo in plan");
        assert_eq!(r.commit.as_deref(), Some(id.as_str()), "{repo}");
        let blob = git(&dir.path().join("repos").join(repo), &["rev-parse", "main:.rbb/pipeline.yaml"]);
        assert_eq!(r.pipeline_blob.as_deref(), Some(blob.as_str()), "{repo}");
    }
    // Cross-repository needs and matrix families resolved.
    let test = plan.builder("app/test[mode=debug,shard=1]").expect("test builder");
    assert_eq!(test.needs, ["lib/build"]);
    assert_eq!(plan.builder("app/package").expect("package").needs.len(), 3);
    // The generate snippet saw the commit's files (src/ exists, .rbb/ is skipped).
    assert!(plan.builder("app/lint-src").is_some());

    let txt = rbb(dir.path(), &["compile"]);
    assert!(txt.status.success(), "{}", explain(&txt));
    let t = text(&txt.stdout);
    assert!(t.starts_with("plan "), "{t}");
    assert!(t.contains("repository lib (branch main @ "), "{t}");
    let dot = rbb(dir.path(), &["compile", "--format", "dot"]);
    let d = text(&dot.stdout);
    assert!(d.starts_with("digraph rbb {") && d.contains("\"lib/build\" -> \"app/test[mode=debug,shard=1]\""), "{d}");
    assert_eq!(d.matches("subgraph cluster_").count(), 3);
}

#[test]
fn same_inputs_give_byte_identical_json_in_any_repository_order() {
    let (dir, _) = demo();
    let a = rbb(dir.path(), &["compile", "--format", "json"]);
    assert!(a.status.success(), "{}", explain(&a));
    let reversed = "repositories:\n  - url: repos/docs\n  - url: repos/app\n  - url: repos/lib\nworkers:\n  - name: local\n    labels: [linux]\n";
    std::fs::write(dir.path().join("reversed.yaml"), reversed).expect("write");
    let b = rbb(dir.path(), &["compile", "--format", "json", "--config", "reversed.yaml"]);
    assert!(b.status.success(), "{}", explain(&b));
    assert_eq!(text(&a.stdout), text(&b.stdout));
}

#[test]
fn diff_against_a_revision_and_a_saved_plan() {
    let (dir, commits) = demo();
    let saved = rbb(dir.path(), &["compile", "--format", "json"]);
    assert!(saved.status.success(), "{}", explain(&saved));
    std::fs::write(dir.path().join("before.json"), &saved.stdout).expect("save plan");
    let app = dir.path().join("repos/app");
    let old_app = &commits.iter().find(|(r, _)| r == "app").expect("app").1;
    let pipeline = std::fs::read_to_string(app.join(".rbb/pipeline.yaml")).expect("read");
    let changed = pipeline
        .replace("run: tar cf app.tar src", "run: tar czf app.tar.gz src")
        .replace("  nightly:\n", "  deploy:\n    needs: package\n    steps:\n      - run: ./deploy.sh\n\n  nightly:\n");
    commit(&app, ".rbb/pipeline.yaml", &changed, 10, "Compress the package, add deploy");

    let by_rev = rbb(dir.path(), &["compile", "--diff", &format!("app@{old_app}")]);
    assert!(by_rev.status.success(), "{}", explain(&by_rev));
    let d = text(&by_rev.stdout);
    assert!(d.contains("1 added, 0 removed, 1 changed"), "{d}");
    assert!(d.contains("+ app/deploy"), "{d}");
    assert!(d.contains("~ app/package\n    ~ step tarball: run"), "{d}");
    assert!(d.contains("re-keyed (will not reuse cached results): tarball, notify"), "{d}");

    let by_file = rbb(dir.path(), &["compile", "--diff", "before.json"]);
    assert!(by_file.status.success(), "{}", explain(&by_file));
    assert_eq!(text(&by_file.stdout), d, "a saved plan and the revision give the same diff");

    let same = rbb(dir.path(), &["compile", "--diff", "main"]);
    assert!(text(&same.stdout).starts_with("no changes"), "{}", explain(&same));

    let unknown = rbb(dir.path(), &["compile", "--diff", "nope@main"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("no repository `nope`"), "{}", explain(&unknown));
}

#[test]
fn a_broken_pipeline_in_git_is_reported_with_its_position() {
    let (dir, _) = demo();
    let lib = dir.path().join("repos/lib");
    commit(
        &lib,
        ".rbb/pipeline.yaml",
        "builders:\n  build:\n    steps:\n      - run: make\n    needs: [nope]\n",
        5,
        "Break it",
    );
    let out = rbb(dir.path(), &["compile"]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = text(&out.stderr);
    assert!(err.contains("error[needs-unknown]"), "{err}");
    assert!(err.contains("--> lib/.rbb/pipeline.yaml:5:13 (repository lib)"), "{err}");
    // app/test needs lib/build, which still exists: only one error.
    assert!(err.contains("1 error(s)"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn config_mistakes_point_into_the_config() {
    let (dir, _) = demo();
    std::fs::write(dir.path().join("bad.yaml"), "repositories:\n  - url: repos/app\n    brnach: main\n")
        .expect("write");
    let out = rbb(dir.path(), &["compile", "--config", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("unknown key `brnach`")
            && err.contains("bad.yaml:3:5")
            && err.contains(" 3 |     brnach: main")
            && err.contains("did you mean `branch`"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("missing.yaml"),
        "repositories:\n  - url: repos/nothing-here\n  - url: repos/app\n    branch: develop\n",
    )
    .expect("write");
    let out = rbb(dir.path(), &["compile", "--config", "missing.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = text(&out.stderr);
    assert!(err.contains("error[repo-read]") && err.contains("missing.yaml:2:10"), "{err}");
    assert!(
        err.contains("revision `develop` does not exist")
            && err.contains("missing.yaml:4:13")
            && err.contains(" 4 |     branch: develop"),
        "{err}"
    );

    let out = rbb(dir.path(), &["compile", "--config", "absent.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read the master config"), "{}", explain(&out));
}

#[test]
fn validate_checks_files_on_their_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = root().join("testdata/repos/app/.rbb/pipeline.yaml");
    let out = rbb(dir.path(), &["validate", good.to_str().expect("utf8")]);
    // app/test needs lib/build: another repository, not checked by validate. Without git
    // there is no file list, so the generate snippet adds no lint builders.
    assert!(out.status.success(), "{}", explain(&out));
    assert!(text(&out.stdout).contains(": ok (5 builders, 6 steps)"), "{}", explain(&out));

    let bad = dir.path().join("pipeline.yaml");
    std::fs::write(&bad, "builders:\n  x:\n    steps:\n      - run: make\n        timeout: forever\n  y:\n    needs: [z]\n    steps: [{ run: a }]\n").expect("write");
    let out = rbb(dir.path(), &["validate", "pipeline.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = text(&out.stderr);
    assert!(err.contains("pipeline.yaml:5:18") && err.contains("pipeline.yaml:7:13"), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");
}

#[test]
fn compiles_a_directory_of_pipeline_files() {
    let dir = root().join("testdata/compiler/cross-repo-needs");
    let out = rbb(&root(), &["compile", "--pipelines", dir.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", explain(&out));
    assert!(text(&out.stdout).contains("builder app/integration"), "{}", explain(&out));
}

#[test]
fn snippets_run_in_the_rbb_binary_itself() {
    let dir = root().join("testdata/compiler/err-snippet-sandbox");
    let out = rbb(&root(), &["compile", "--pipelines", dir.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert_eq!(text(&out.stderr).matches("error[snippet-forbidden]").count(), 4, "{}", explain(&out));
    let ok = root().join("testdata/compiler/matrix-python");
    let out = rbb(&root(), &["compile", "--pipelines", ok.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", explain(&out));
    assert!(text(&out.stdout).contains("app/shards[shard=0,kind=slow]"), "{}", explain(&out));
}

#[test]
fn schema_command_prints_the_committed_schema() {
    let out = rbb(&root(), &["schema", "pipeline"]);
    assert!(out.status.success());
    let committed = std::fs::read(root().join("schema/pipeline.schema.json")).expect("read");
    assert_eq!(out.stdout, committed);
}

#[test]
fn a_pipeline_that_is_not_utf8_is_a_diagnostic_at_the_first_bad_byte() {
    // `rbb validate`: exit 1 (the input has errors) with a location, not exit 2.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pipeline.yaml"), b"builders:\n  x:\n    steps:\n      - run: echo \"caf\xe9\"\n")
        .expect("write");
    let out = rbb(dir.path(), &["validate", "pipeline.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = text(&out.stderr);
    assert!(err.contains("error[not-utf8]") && err.contains("byte 0xE9"), "{err}");
    assert!(err.contains("--> pipeline.yaml:4:23"), "{err}");

    // `--pipelines`: the other repository is still compiled (its own mistake is reported).
    let case = root().join("testdata/compiler/err-not-utf8");
    let out = rbb(&root(), &["compile", "--pipelines", case.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = text(&out.stderr);
    assert!(err.contains("err-not-utf8/app.yaml:5:23"), "{err}");
    assert!(err.contains("unknown key `timout`") && err.contains("2 error(s)"), "{err}");

    // From git: the committed bytes, never a lossy copy of them.
    let (dir, _) = demo();
    let lib = dir.path().join("repos/lib");
    std::fs::write(lib.join(".rbb/pipeline.yaml"), b"builders:\n  build:\n    steps:\n      - run: echo \xff\n")
        .expect("write");
    git(&lib, &["add", ".rbb/pipeline.yaml"]);
    git(&lib, &["-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "Latin-1"]);
    let out = rbb(dir.path(), &["compile"]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("error[not-utf8]") && err.contains("--> lib/.rbb/pipeline.yaml:4:19 (repository lib)"),
        "{err}"
    );
    // app/test needs lib/build: not reported again as an unknown builder.
    assert!(!err.contains("needs-unknown") && err.contains("1 error(s)"), "{err}");

    // The master config too.
    std::fs::write(dir.path().join("latin1.yaml"), b"repositories:\n  - url: repos/caf\xe9\n").expect("write");
    let out = rbb(dir.path(), &["compile", "--config", "latin1.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = text(&out.stderr);
    assert!(err.contains("error[not-utf8]") && err.contains("--> latin1.yaml:2:19"), "{err}");
}

#[test]
fn a_snippet_that_crashes_the_interpreter_is_its_own_diagnostic() {
    let case = root().join("testdata/compiler/err-snippet-crash");
    let out = rbb(&root(), &["compile", "--verbose", "--pipelines", case.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("error[snippet-crash]: the snippet of `matrix:` of builder `crash` crashed the interpreter")
            && err.contains("err-snippet-crash/app.yaml:5:9"),
        "{err}"
    );
    assert!(!err.contains("exited unexpectedly") && !err.contains("NoneType"), "{err}");
    // A native stack overflow is said as such, not as running out of memory.
    assert!(err.contains("builder `nested` crashed the interpreter (stack overflow: deep recursion)"), "{err}");
    assert!(!err.contains("MiB"), "{err}");
    // The snippets after the crash still ran, in a fresh runner.
    assert!(err.contains("`sys.setrecursionlimit()` is not available"), "{err}");
    assert!(err.contains("RecursionError"), "{err}");
    // print() works: with the failing snippet's diagnostic, and with --verbose.
    assert!(err.contains("raised ValueError: no shards (it printed"), "{err}");
    assert!(
        err.contains("note: the snippet of `matrix:` of builder `fine` printed:") && err.contains("   | two shards"),
        "{err}"
    );
}

#[test]
fn a_master_starts_while_one_pipeline_is_broken() {
    let dir = tempfile::tempdir().expect("tempdir");
    support::make_repo(&dir.path().join("lib"), "builders:\n  build:\n    stepz: []\n", &[]);
    support::make_repo(
        &dir.path().join("app"),
        "builders:\n  test:\n    needs: [lib/build]\n    steps: [{ run: make test }]\n  lint:\n    steps: [{ run: make lint }]\n",
        &[],
    );
    let config = support::write_config(dir.path(), &["lib", "app"], &[("w", "t", &["linux"])]);
    let m = support::Master::start(&config, &dir.path().join("state"));
    let plan = m.get("/api/v2/plan").json();
    let ids: Vec<&str> =
        plan["builders"].as_array().expect("builders").iter().filter_map(|b| b["id"].as_str()).collect();
    // lib has no builders until it compiles; what needs it is left out, the rest runs.
    assert_eq!(ids, ["app/lint"], "{plan}");
    let log = m.log_text();
    assert!(log.contains("lib/.rbb/pipeline.yaml:3:5") && log.contains("needs-broken-repo"), "{log}");
}
