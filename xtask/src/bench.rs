//! `cargo xtask bench`: performance figures, each next to a baseline measured in the same run.
//!
//! Builds release binaries, generates inputs under `.rbb-state/bench/`, times whole commands
//! (median of several runs) and prints figures with their ratio to the baseline and target.
//! Figures are not asserted (benchmarks inform, tests decide), but the work they time is: a
//! command or build that fails stops the bench, since its time would mean nothing.

use crate::{cargo, run, target_dir};
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const REPOS: usize = 1000;
const BUILDERS: usize = 10;
const STEPS: usize = 5;
const SNIPPETS: usize = 40;
const GIT_REPOS: usize = 100;

pub fn main(root: &Path, args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("scale") {
        return crate::scale::main(root, &args[1..]);
    }
    if args.first().map(String::as_str) == Some("postgres") {
        return crate::scale::postgres_main(root, &args[1..]);
    }
    if args.first().map(String::as_str) == Some("repos") {
        return crate::repos_bench::main(root, &args[1..]);
    }
    if args.first().map(String::as_str) == Some("key") {
        return crate::key_bench::main(root, &args[1..]);
    }
    if args == ["docker"] {
        // Only the Docker figures, with the debug binaries: the engine's work dominates them.
        run(cargo().current_dir(root).args(["build", "--quiet", "-p", "rbb-master", "-p", "rbb-worker", "--bins"]))?;
        let work = root.join(".rbb-state/bench-docker");
        std::fs::create_dir_all(&work)?;
        return crate::docker_bench::run(root, &target_dir(root).join("debug"), &work);
    }
    if args == ["cache"] {
        // Only the step cache's figures.
        build_release(root)?;
        let work = root.join(".rbb-state/bench");
        std::fs::create_dir_all(&work)?;
        return crate::cache_bench::run(&target_dir(root).join("release"), &work);
    }
    if args == ["forge"] {
        // Only the forge figures: webhook to commit status, and the mirror's fetch.
        build_release(root)?;
        let work = root.join(".rbb-state/bench");
        std::fs::create_dir_all(&work)?;
        return crate::forge_bench::run(root, &target_dir(root).join("release"), &work);
    }
    if args == ["log"] {
        // Only the 50 MiB log, without and with a secret to mask.
        build_release(root)?;
        let work = root.join(".rbb-state/bench");
        std::fs::create_dir_all(&work)?;
        return crate::runs::log_masking(root, &target_dir(root).join("release"), &work);
    }
    if args.first().map(String::as_str) == Some("tls") && args.len() <= 2 {
        // TLS against plain text, in the same run: the 50 MiB log and trigger → first step.
        // `tls --debug` uses the debug binaries (quicker to build; slower crypto).
        let profile = match args.get(1).map(String::as_str) {
            None => {
                build_release(root)?;
                "release"
            }
            Some("--debug") => {
                run(cargo().current_dir(root).args([
                    "build",
                    "--quiet",
                    "-p",
                    "rbb-master",
                    "-p",
                    "rbb-worker",
                    "--bins",
                ]))?;
                "debug"
            }
            Some(other) => bail!("cargo xtask bench tls takes no argument but --debug, not `{other}`"),
        };
        let work = root.join(".rbb-state/bench-tls");
        if work.exists() {
            std::fs::remove_dir_all(&work)?;
        }
        std::fs::create_dir_all(&work)?;
        return crate::tls_bench::run(root, &target_dir(root).join(profile), &work);
    }
    if !args.is_empty() {
        bail!(
            "cargo xtask bench takes no arguments, or `docker`, `cache`, `forge`, `log`, `tls` or `key` for those figures alone, or `scale [options]` or `repos [options]`"
        );
    }
    build_release(root)?;
    let bin = target_dir(root).join("release");
    let rbb = bin.join("rbb");
    let work = root.join(".rbb-state/bench");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    println!("rbb bench (release build, median of runs; lower is better)\n");

    // 1. Compile a fleet without snippets.
    let fleet = work.join("fleet");
    std::fs::create_dir_all(&fleet)?;
    for r in 0..REPOS {
        std::fs::write(fleet.join(format!("repo{r:04}.yaml")), fleet_pipeline(r))?;
    }
    let tiny = work.join("tiny");
    std::fs::create_dir_all(&tiny)?;
    std::fs::write(tiny.join("one.yaml"), "builders:\n  b:\n    steps:\n      - run: \"true\"\n")?;
    let compile = |dir: &Path| {
        let mut c = Command::new(&rbb);
        c.args(["compile", "--format", "json", "--pipelines"]).arg(dir);
        c
    };
    let fleet_t = median(7, || time(&mut compile(&fleet)))?;
    let tiny_t = median(7, || time(&mut compile(&tiny)))?;
    let cat_t = median(7, || time(Command::new("sh").arg("-c").arg(format!("cat {}/*.yaml", fleet.display()))))?;
    let steps = REPOS * BUILDERS * STEPS;
    println!("compile: {REPOS} repositories × {BUILDERS} builders × {STEPS} steps ({steps} steps), no snippets");
    println!(
        "  rbb compile --format json        {:>9}   target < 1000 ms ({:.2} of target)",
        ms(fleet_t),
        fleet_t.as_secs_f64()
    );
    println!("  baseline: 1-builder compile      {:>9}   (process start, config, output)", ms(tiny_t));
    println!(
        "  baseline: cat of the same files  {:>9}   (reading the input only; compile is {:.0}× that)",
        ms(cat_t),
        ratio(fleet_t, cat_t)
    );
    println!("  per step                         {:>9.2} µs\n", fleet_t.as_secs_f64() * 1e6 / steps as f64);

    // 2. Snippet cost: N matrix snippets versus the same matrices written out in YAML.
    let snip = work.join("snippets");
    let stat = work.join("static");
    std::fs::create_dir_all(&snip)?;
    std::fs::create_dir_all(&stat)?;
    let one = work.join("one-snippet");
    std::fs::create_dir_all(&one)?;
    std::fs::write(snip.join("app.yaml"), snippet_pipeline(SNIPPETS, true))?;
    std::fs::write(stat.join("app.yaml"), snippet_pipeline(SNIPPETS, false))?;
    std::fs::write(one.join("app.yaml"), snippet_pipeline(1, true))?;
    let one_static = work.join("one-static");
    std::fs::create_dir_all(&one_static)?;
    std::fs::write(one_static.join("app.yaml"), snippet_pipeline(1, false))?;
    let snip_t = median(5, || time(&mut compile(&snip)))?;
    let stat_t = median(5, || time(&mut compile(&stat)))?;
    let one_t = median(5, || time(&mut compile(&one)))?;
    let one_static_t = median(5, || time(&mut compile(&one_static)))?;
    let per = (snip_t.saturating_sub(one_t)).as_secs_f64() * 1000.0 / (SNIPPETS - 1) as f64;
    println!("python snippets: {SNIPPETS} `matrix: python:` snippets in one pipeline");
    println!("  with snippets                    {:>9}", ms(snip_t));
    println!("  baseline: same matrices in YAML  {:>9}", ms(stat_t));
    println!("  cost per snippet (after the 1st) {:>9.2} ms   target < 50 ms ({:.3} of target)", per, per / 50.0);
    println!(
        "  first snippet (runner start-up)  {:>9}   (one snippet minus its YAML twin)\n",
        ms(one_t.saturating_sub(one_static_t))
    );

    // 3. Reading pipelines from real git repositories.
    let gitdir = work.join("git");
    std::fs::create_dir_all(gitdir.join("repos"))?;
    let mut config = String::from("repositories:\n");
    let src = work.join("git-src");
    for r in 0..GIT_REPOS {
        let s = src.join(format!("repo{r:03}"));
        std::fs::create_dir_all(s.join(".rbb"))?;
        std::fs::write(s.join(".rbb/pipeline.yaml"), fleet_pipeline_local(r))?;
        std::fs::write(s.join("README.md"), "bench\n")?;
        run(Command::new("sh")
            .arg(crate::root().join("testdata/fixtures/mkrepo.sh"))
            .arg(&s)
            .arg(gitdir.join("repos").join(format!("repo{r:03}")))
            .stdout(Stdio::null()))?;
        let _ = writeln!(config, "  - url: repos/repo{r:03}");
    }
    std::fs::write(gitdir.join("rbb.yaml"), config)?;
    let git_t = median(5, || {
        time(Command::new(&rbb).args(["compile", "--format", "json", "--config"]).arg(gitdir.join("rbb.yaml")))
    })?;
    let git_files_t = median(5, || time(&mut compile(&src_flat(&src, &work.join("git-flat"))?)))?;
    println!("git: {GIT_REPOS} repositories read with gix at `main` ({} builders)", GIT_REPOS * BUILDERS);
    println!("  rbb compile --config (git)       {:>9}", ms(git_t));
    println!("  baseline: same files, no git     {:>9}", ms(git_files_t));
    println!(
        "  git cost per repository          {:>9.2} ms\n",
        git_t.saturating_sub(git_files_t).as_secs_f64() * 1000.0 / GIT_REPOS as f64
    );

    // 4. Running builds.
    crate::runs::run(root, &bin, &work)?;
    crate::runs::log_masking(root, &bin, &work)?;

    // 5. The step cache.
    crate::cache_bench::run(&bin, &work)?;

    // 6. Docker steps.
    crate::docker_bench::run(root, &bin, &work)?;

    // 7. The forges: webhook to commit status, and the mirror's incremental fetch.
    println!();
    crate::forge_bench::run(root, &bin, &work)?;

    // 8. Full cache keys: inputs resolved from git.
    crate::key_bench::main(root, &[])
}

fn build_release(root: &Path) -> Result<()> {
    run(cargo().current_dir(root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "rbb-master",
        "-p",
        "rbb-compiler",
        "-p",
        "rbb-worker",
        "--bins",
    ]))
}

/// Copies `<src>/<repo>/.rbb/pipeline.yaml` to `<dst>/<repo>.yaml`.
fn src_flat(src: &Path, dst: &Path) -> Result<std::path::PathBuf> {
    if !dst.exists() {
        std::fs::create_dir_all(dst)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            std::fs::copy(e.path().join(".rbb/pipeline.yaml"), dst.join(format!("{name}.yaml")))?;
        }
    }
    Ok(dst.to_path_buf())
}

fn fleet_pipeline(r: usize) -> String {
    let mut s = String::from("builders:\n");
    for b in 0..BUILDERS {
        let _ = writeln!(s, "  b{b}:");
        let _ = writeln!(s, "    labels: [linux]");
        if b > 0 {
            let _ = writeln!(s, "    needs: [b{}]", b - 1);
        } else if r > 0 {
            let _ = writeln!(s, "    needs: [repo{:04}/b{}]", r - 1, BUILDERS - 1);
        }
        let _ = writeln!(s, "    on:\n      push: {{ branches: [main, \"release/*\"] }}");
        let _ = writeln!(s, "    steps:");
        for st in 0..STEPS {
            let _ = writeln!(
                s,
                "      - name: s{st}\n        run: make target-{r}-{b}-{st}\n        env: {{ LEVEL: \"{st}\" }}\n        inputs: [src]"
            );
        }
    }
    s
}

fn fleet_pipeline_local(r: usize) -> String {
    fleet_pipeline(r).replace(&format!("needs: [repo{:04}/b{}]", r.saturating_sub(1), BUILDERS - 1), "needs: []")
}

fn snippet_pipeline(n: usize, snippets: bool) -> String {
    let mut s = String::from("builders:\n");
    for b in 0..n {
        let _ = writeln!(s, "  b{b}:\n    matrix:");
        if snippets {
            let _ = writeln!(s, "      python: |\n        return [{{\"shard\": i}} for i in range({})]", 2 + b % 3);
        } else {
            let vals: Vec<String> = (0..2 + b % 3).map(|i| i.to_string()).collect();
            let _ = writeln!(s, "      shard: [{}]", vals.join(", "));
        }
        let _ = writeln!(s, "    steps:\n      - run: make shard-${{{{ matrix.shard }}}}");
    }
    s
}

fn time(cmd: &mut Command) -> Result<Duration> {
    let start = Instant::now();
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().with_context(|| format!("running {cmd:?}"))?;
    let elapsed = start.elapsed();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(elapsed)
}

fn median(n: usize, mut f: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    f()?; // warm-up (page cache, first start)
    let mut all = (0..n).map(|_| f()).collect::<Result<Vec<_>>>()?;
    all.sort();
    Ok(all[n / 2])
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}
