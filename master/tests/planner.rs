//! The planner against real git repositories made by the fixture scripts: plans follow
//! everything a snippet reads, one repository's broken pipeline fails only that repository,
//! and a git read error is never a pipeline that does not compile.

mod support;

use rbb_compiler::Options;
use rbb_compiler::snippet::{ChildEvaluator, Limits};
use rbb_master::planner::{PlanError, PlanRepo, Planner};
use std::path::Path;
use std::time::Duration;
use support::{commit, make_repo};

fn planner(repos: &[(&str, &Path)]) -> Planner {
    let eval =
        ChildEvaluator::new(env!("CARGO_BIN_EXE_rbb"), Limits { wall: Duration::from_secs(10), memory_mib: 512 })
            .arg("snippet-runner")
            .env("MIMALLOC_ARENA_RESERVE", "16MiB");
    let repos = repos
        .iter()
        .map(|(name, path)| PlanRepo {
            name: (*name).to_owned(),
            url: path.display().to_string(),
            path: path.to_path_buf(),
            branch: "main".to_owned(),
        })
        .collect();
    Planner::new(repos, Options::default(), eval)
}

fn ids(plan: &rbb_schema::plan::Plan) -> Vec<&str> {
    plan.builders.iter().map(|b| b.id.as_str()).collect()
}

#[test]
fn a_commit_that_adds_a_module_gets_its_generated_builder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = dir.path().join("app");
    let pipeline = r#"generate:
  python: |
    mods = sorted({f.split("/")[1] for f in ctx["files"] if f.startswith("mods/")})
    return {"test-" + m: {"steps": [{"run": "make -C mods/" + m}]} for m in mods}
"#;
    let first = make_repo(&app, pipeline, &[("mods/a/lib.rs", "a")]);
    let p = planner(&[("app", &app)]);
    p.refresh_heads().expect("heads");
    assert_eq!(ids(&p.plan_at("app", &first).expect("plan")), ["app/test-a"]);
    // The pipeline file is untouched: only ctx["files"] changes.
    let second = commit(&app, "mods/b/lib.rs", "b", 1, "Add module b");
    assert_eq!(ids(&p.plan_at("app", &second).expect("plan")), ["app/test-a", "app/test-b"]);
    p.head_moved("app", &second).expect("head");
    assert_eq!(ids(&p.head_plan()), ["app/test-a", "app/test-b"]);
    // The first commit still gets its own plan.
    assert_eq!(ids(&p.plan_at("app", &first).expect("plan")), ["app/test-a"]);
}

const LIB: &str = "builders:\n  build:\n    steps:\n      - run: make\n";
const LIB_BROKEN: &str = "builders:\n  build:\n    stepz:\n      - run: make\n";
const APP: &str = "builders:\n  test:\n    needs: [lib/build]\n    steps:\n      - run: make test\n  lint:\n    steps:\n      - run: make lint\n";

#[test]
fn a_broken_repository_fails_only_its_own_builds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (lib, app) = (dir.path().join("lib"), dir.path().join("app"));
    make_repo(&lib, LIB, &[]);
    let app_first = make_repo(&app, APP, &[]);
    let p = planner(&[("app", &app), ("lib", &lib)]);
    p.refresh_heads().expect("heads");
    assert_eq!(ids(&p.head_plan()), ["app/lint", "app/test", "lib/build"]);

    let broken = commit(&lib, ".rbb/pipeline.yaml", LIB_BROKEN, 1, "Break lib");
    p.head_moved("lib", &broken).expect("head");
    // lib's own build fails with lib's diagnostics only.
    match p.plan_at("lib", &broken) {
        Err(PlanError::Pipeline(d)) => {
            assert!(d.contains("lib/.rbb/pipeline.yaml:3:5") && !d.contains("app/"), "{d}")
        }
        other => panic!("expected lib's pipeline errors, got {other:?}"),
    }
    assert!(p.broken().contains_key("lib"), "{:?}", p.broken());
    // app still compiles, against lib's last good pipeline.
    let plan = p.plan_at("app", &app_first).expect("app's plan while lib is broken");
    assert_eq!(ids(&plan), ["app/lint", "app/test", "lib/build"]);
    assert_eq!(ids(&p.head_plan()), ["app/lint", "app/test", "lib/build"]);
    // A mistake in app is reported as app's, without lib's.
    let app_bad =
        commit(&app, ".rbb/pipeline.yaml", &APP.replace("steps:\n      - run: make lint", "stepz: []"), 2, "x");
    match p.plan_at("app", &app_bad) {
        Err(PlanError::Pipeline(d)) => {
            assert!(d.contains("app/.rbb/pipeline.yaml") && !d.contains("lib/.rbb"), "{d}")
        }
        other => panic!("expected app's pipeline errors, got {other:?}"),
    }
    let app_head = commit(&app, ".rbb/pipeline.yaml", APP, 3, "Fix app");

    // A planner started while lib is broken (nothing remembered): it starts, lib has no
    // builders, and what needs lib is left out rather than failing app.
    let restarted = planner(&[("app", &app), ("lib", &lib)]);
    restarted.refresh_heads().expect("heads");
    assert_eq!(ids(&restarted.head_plan()), ["app/lint"], "{:?}", restarted.broken());
    let why = &restarted.broken()["lib"];
    assert!(why.contains("lib/.rbb/pipeline.yaml:3:5"), "{why}");
    assert!(why.contains("builder `app/test` needs `lib/build`, but the pipeline of repository `lib`"), "{why}");
    let plan = restarted.plan_at("app", &app_head).expect("app's plan after a restart");
    assert_eq!(ids(&plan), ["app/lint"]);

    // Fixing lib brings everything back.
    let fixed = commit(&lib, ".rbb/pipeline.yaml", LIB, 4, "Fix lib");
    restarted.head_moved("lib", &fixed).expect("head");
    assert!(restarted.broken().is_empty());
    assert_eq!(ids(&restarted.head_plan()), ["app/lint", "app/test", "lib/build"]);
}

#[test]
fn a_git_read_error_is_not_a_pipeline_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = dir.path().join("lib");
    make_repo(&lib, LIB, &[]);
    let p = planner(&[("lib", &lib)]);
    p.refresh_heads().expect("heads");
    match p.plan_at("lib", "0123456789012345678901234567890123456789") {
        Err(PlanError::Read(e)) => assert!(e.contains("0123456789012345678901234567890123456789"), "{e}"),
        other => panic!("expected a read error, got {other:?}"),
    }
}
