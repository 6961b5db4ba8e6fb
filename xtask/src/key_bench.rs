//! `cargo xtask bench key`: resolving a step's inputs from git for its full cache key.
//!
//! Builds a repository of 10,000 files (one commit, with the git CLI) and its bare mirror
//! under `.rbb-state/bench-key/`, then resolves 50 inputs (directories, files, a missing
//! path and globs) with the master's `InputResolver`, many times, and prints the median and
//! p99 per step against the 5 ms target, next to a baseline measured in the same run (one
//! literal path: the fixed cost of a call). Every answer it times is checked against `git
//! rev-parse` and the known layout; a wrong answer stops the bench.
//!
//! The resolver is timed in this process, so the measuring runs in a release build of
//! xtask (`bench key` re-runs itself with `cargo run --release`).

use crate::{cargo, run};
use anyhow::{Context, Result, bail, ensure};
use rbb_master::cache::key::{FULL_KEY_FORMAT, Input, InputResolver, Manifest};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Repository shape: modules × (sources, headers, tests, README) = 10,000 files.
const MODULES: usize = 100;
const SOURCES: usize = 60;
const HEADERS: usize = 20;
const TESTS: usize = 19;
const RUNS: usize = 500;
const TARGET: Duration = Duration::from_millis(5);

/// `cargo xtask bench key`: builds xtask in release and measures there.
pub fn main(root: &Path, args: &[String]) -> Result<()> {
    if args == ["--measure"] {
        return measure(root);
    }
    if !args.is_empty() {
        bail!("cargo xtask bench key takes no arguments");
    }
    run(cargo().current_dir(root).args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "xtask",
        "--",
        "bench",
        "key",
        "--measure",
    ]))
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=rbb", "-c", "user.email=rbb@localhost", "-c", "commit.gpgsign=false"])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running git {args:?}"))?;
    if !out.status.success() {
        bail!("git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A directory of each module: its name, how many files, the name of file `i`.
type FileKind = (&'static str, usize, fn(usize) -> String);

/// The 10,000-file repository and its bare mirror; returns the mirror and the commit.
fn make_repo(work: &Path) -> Result<(std::path::PathBuf, String)> {
    if work.exists() {
        std::fs::remove_dir_all(work)?;
    }
    let tree = work.join("repo");
    for m in 0..MODULES {
        let module = tree.join(format!("mod{m:02}"));
        let kinds: [FileKind; 3] = [
            ("src", SOURCES, |i| format!("f{i:03}.c")),
            ("include", HEADERS, |i| format!("h{i:02}.h")),
            ("tests", TESTS, |i| format!("t{i:02}.txt")),
        ];
        for (dir, count, name) in kinds {
            std::fs::create_dir_all(module.join(dir))?;
            for i in 0..count {
                std::fs::write(module.join(dir).join(name(i)), format!("module {m} {dir} {i}\n"))?;
            }
        }
        std::fs::write(module.join("README.md"), format!("# module {m}\n"))?;
    }
    git(&tree, &["init", "-q", "-b", "main"])?;
    git(&tree, &["add", "-A"])?;
    git(&tree, &["commit", "-q", "-m", "10,000 files"])?;
    let commit = git(&tree, &["rev-parse", "HEAD"])?;
    let files = git(&tree, &["ls-files"])?.lines().count();
    ensure!(files == MODULES * (SOURCES + HEADERS + TESTS + 1), "the repository has {files} files");
    let mirror = work.join("mirror.git");
    git(work, &["clone", "-q", "--bare", "repo", "mirror.git"])?;
    Ok((mirror, commit))
}

/// 50 inputs: 15 directories, 15 files, 14 deeper files, a missing path and 5 globs.
fn inputs() -> Vec<String> {
    let mut p = Vec::new();
    for m in 0..15 {
        p.push(format!("mod{m:02}/src"));
        p.push(format!("./mod{:02}/README.md", m + 20));
        p.push(format!("mod{:02}/include/h{:02}.h", m + 40, m));
    }
    p.pop();
    p.push("mod05/nope".to_owned());
    p.extend(
        ["mod01/src/*.c", "mod02/tests/*.txt", "mod03/**/*.h", "*/README.md", "mod04/src/f0[0-4]?.c"]
            .map(str::to_owned),
    );
    p
}

/// What the resolution must say, checked against git for the literal paths.
fn check(mirror: &Path, commit: &str, patterns: &[String], got: &[Input]) -> Result<()> {
    ensure!(got.len() == patterns.len(), "{} inputs resolved for {} patterns", got.len(), patterns.len());
    let expected_globs: BTreeMap<&str, usize> = BTreeMap::from([
        ("mod01/src/*.c", SOURCES),
        ("mod02/tests/*.txt", TESTS),
        ("mod03/**/*.h", HEADERS),
        ("*/README.md", MODULES),
        ("mod04/src/f0[0-4]?.c", 50),
    ]);
    for input in got {
        match input {
            Input::Path { pattern, path, entry } if pattern == "mod05/nope" => {
                ensure!(entry.is_none(), "{path} should be missing")
            }
            Input::Path { path, entry, .. } => {
                let entry = entry.as_ref().with_context(|| format!("{path} not found"))?;
                let id = git(mirror, &["rev-parse", &format!("{commit}:{path}")])?;
                ensure!(entry.id == id, "{path}: {} but git says {id}", entry.id);
            }
            Input::Glob { pattern, matches, .. } => {
                let want =
                    expected_globs.get(pattern.as_str()).with_context(|| format!("unexpected glob {pattern}"))?;
                ensure!(matches.len() == *want, "{pattern} matched {} entries, not {want}", matches.len());
            }
        }
    }
    Ok(())
}

fn measure(root: &Path) -> Result<()> {
    let work = root.join(".rbb-state/bench-key");
    let started = Instant::now();
    let (mirror, commit) = make_repo(&work)?;
    let built = started.elapsed();
    let patterns = inputs();
    ensure!(patterns.len() == 50);
    println!("full cache key: 50 inputs (15 dirs, 29 files, 1 missing, 5 globs), 10,000-file repository");
    println!("  repository built with git in {:.1} s", built.as_secs_f64());

    let resolver = InputResolver::new();
    let t = Instant::now();
    let first = resolver.resolve(&mirror, &commit, &patterns)?;
    let cold = t.elapsed();
    check(&mirror, &commit, &patterns, &first)?;

    let one = vec![patterns[0].clone()];
    let mut steps = Vec::with_capacity(RUNS);
    let mut baseline = Vec::with_capacity(RUNS);
    let mut keys = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let got = resolver.resolve(&mirror, &commit, &patterns)?;
        steps.push(t.elapsed());
        ensure!(got == first, "a warm resolution differs from the first");
        let t = Instant::now();
        let base = resolver.resolve(&mirror, &commit, &one)?;
        baseline.push(t.elapsed());
        ensure!(base.len() == 1 && base[0] == first[0], "the one-path resolution differs");
        let m = Manifest {
            format: FULL_KEY_FORMAT.to_owned(),
            static_key: "sha256:00".to_owned(),
            inputs: got,
            pass_env: BTreeMap::new(),
            image: None,
            platform: "linux/x86_64".to_owned(),
            after: None,
            salt: None,
            epoch: 0,
            secrets: BTreeMap::new(),
            definition: serde_json::Value::Null,
        };
        let t = Instant::now();
        let key = m.key();
        keys.push(t.elapsed());
        ensure!(key.len() == 7 + 64 && key.starts_with("sha256:"), "bad key {key}");
    }
    ensure!(resolver.opened() == 1, "the repository was opened {} times", resolver.opened());
    let (median, p99) = stats(&mut steps);
    let (base_median, _) = stats(&mut baseline);
    let (key_median, key_p99) = stats(&mut keys);
    println!(
        "  resolve 50 inputs, warm         median {:>8}   p99 {:>8}   target < {} ({:.2} of target)",
        ms(median),
        ms(p99),
        ms(TARGET),
        median.as_secs_f64() / TARGET.as_secs_f64()
    );
    println!("  first call (opens the mirror)          {:>8}", ms(cold));
    println!(
        "  baseline: resolve 1 path        median {:>8}   (50 inputs = {:.1}× one)",
        ms(base_median),
        median.as_secs_f64() / base_median.as_secs_f64().max(1e-9)
    );
    println!("  manifest key (canonical JSON + SHA-256) median {:>8}   p99 {:>8}", ms(key_median), ms(key_p99));
    Ok(())
}

fn stats(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let n = samples.len();
    (samples[n / 2], samples[(n * 99 / 100).min(n - 1)])
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}
