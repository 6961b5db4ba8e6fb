//! Data-driven compiler tests: one folder per case under `testdata/compiler/<case>/`.
//!
//! Inputs: every `<repo>.yaml` in the folder is that repository's `.rbb/pipeline.yaml`;
//! optional `files.txt` lists the commit's files (given to snippets), optional `workers.txt`
//! gives one worker label set per line, optional `locks.txt` the lock names the master config
//! declares, optional `secrets.txt` one declared secret per line (`NAME [repo...]`: the
//! repositories that may use it, all when none), optional `broken.txt` one `<repo> <file>` per line for repositories left out
//! because their pipeline does not compile. Expected output: `expected.txt` (diagnostics as the
//! CLI prints them, what snippets printed, then the text plan and the DOT picture), and `plan.json` when the case
//! compiles. A case with a `before/` folder (the same kind of inputs) is also a diff: the plan
//! of `before/` against the case's, as `rbb compile --diff` prints it (`diff.txt`) and as JSON
//! (`diff.json`). `RBB_BLESS=1 cargo test -p rbb-compiler --test golden` rewrites them.

use rbb_compiler::snippet::{ChildEvaluator, Limits};
use rbb_compiler::{Options, Origin, Source, cache_key, compile, decode_text, diff, render, render_diagnostics};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/compiler")
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn load_case(dir: &Path) -> (Vec<Source>, Options) {
    let files = read_lines(&dir.join("files.txt"));
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("case dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    let sources = paths
        .iter()
        .map(|p| {
            let repo = p.file_stem().expect("stem").to_string_lossy().into_owned();
            let (text, not_utf8) = decode_text(std::fs::read(p).expect("read input"));
            Source {
                file: format!("{repo}/.rbb/pipeline.yaml"),
                text,
                branch: "main".into(),
                files: files.clone().into(),
                origin: Origin {
                    url: format!("repos/{repo}"),
                    pipeline_path: ".rbb/pipeline.yaml".into(),
                    ..Default::default()
                },
                not_utf8,
                repo,
            }
        })
        .collect();
    let workers = dir.join("workers.txt");
    let locks = dir.join("locks.txt");
    let broken_repos = read_lines(&dir.join("broken.txt"))
        .iter()
        .filter_map(|l| l.split_once(' ').map(|(r, f)| (r.to_owned(), f.trim().to_owned())))
        .collect();
    let secrets = dir.join("secrets.txt");
    let opts = Options {
        secrets: secrets.exists().then(|| {
            read_lines(&secrets)
                .iter()
                .map(|l| {
                    let mut words = l.split_whitespace();
                    let name = words.next().unwrap_or_default().to_owned();
                    (name, words.map(str::to_owned).collect())
                })
                .collect()
        }),
        broken_repos,
        locks: locks.exists().then(|| read_lines(&locks)),
        worker_labels: workers
            .exists()
            .then(|| read_lines(&workers).iter().map(|l| l.split_whitespace().map(str::to_owned).collect()).collect()),
        ..Options::default()
    };
    (sources, opts)
}

fn check_file(path: &Path, actual: &str, bless: bool, failures: &mut Vec<String>) {
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    if expected == actual {
        return;
    }
    if bless {
        std::fs::write(path, actual).expect("write expectation");
        return;
    }
    failures.push(format!("── {} differs ──\n--- expected\n{expected}\n--- actual\n{actual}", path.display()));
}

#[test]
fn golden_cases() {
    let bless = std::env::var_os("RBB_BLESS").is_some();
    let eval = ChildEvaluator::new(
        env!("CARGO_BIN_EXE_rbb-snippet"),
        Limits { wall: Duration::from_secs(3), memory_mib: 256 },
    );
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(cases_dir())
        .expect("testdata/compiler exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 25, "expected at least 25 cases, found {}", dirs.len());
    let mut failures = Vec::new();
    for dir in &dirs {
        let (sources, opts) = load_case(dir);
        assert!(!sources.is_empty(), "{}: no <repo>.yaml input", dir.display());
        let result = compile(&sources, &eval, &opts);
        let mut out = render_diagnostics(&result.diagnostics, &sources);
        for p in &result.printed {
            out.push_str(&p.render());
        }
        if let Some(plan) = &result.plan {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&render::text(plan));
            out.push('\n');
            out.push_str(&render::dot(plan));
            let json = serde_json::to_string_pretty(plan).expect("plan serialises") + "\n";
            check_file(&dir.join("plan.json"), &json, bless, &mut failures);
            // Every step's key document, rebuilt from the plan, hashes to its key (the master
            // keeps these documents to say what changed).
            let last = cache_key::last_keys(plan);
            for b in &plan.builders {
                for (i, s) in b.steps.iter().enumerate() {
                    let doc = cache_key::plan_step_document(b, i, |id| last.get(id).copied()).expect("step");
                    let key = cache_key::sha256(&cache_key::canonical_json(&doc));
                    assert_eq!(key, s.key, "{}: {} step {} document {doc}", dir.display(), b.id, s.name);
                }
            }
            // The published JSON reads back into the same plan.
            let back: rbb_schema::plan::Plan = serde_json::from_str(&json).expect("plan JSON reads back");
            assert_eq!(&back, plan, "{}: plan JSON does not round-trip", dir.display());
        } else {
            assert!(result.has_errors(), "{}: no plan but no error either", dir.display());
            if bless {
                let _ = std::fs::remove_file(dir.join("plan.json"));
            }
            assert!(
                !dir.join("plan.json").exists(),
                "{}: plan.json exists but the case does not compile",
                dir.display()
            );
        }
        check_file(&dir.join("expected.txt"), &out, bless, &mut failures);
        let before = dir.join("before");
        if before.is_dir() {
            let plan = result.plan.as_ref().unwrap_or_else(|| panic!("{}: a diff case must compile", dir.display()));
            let (old_sources, old_opts) = load_case(&before);
            let old = compile(&old_sources, &eval, &old_opts);
            let old_plan = old
                .plan
                .unwrap_or_else(|| panic!("{}: before/ does not compile: {:?}", dir.display(), old.diagnostics));
            let d = diff::diff(&old_plan, plan);
            check_file(&dir.join("diff.txt"), &diff::render(&d), bless, &mut failures);
            let json = serde_json::to_string_pretty(&d).expect("diff serialises") + "\n";
            check_file(&dir.join("diff.json"), &json, bless, &mut failures);
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden file(s) differ (RBB_BLESS=1 rewrites them):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
