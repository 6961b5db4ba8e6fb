//! `cargo xtask bench` figures for Docker steps: a real `rbb master` and one
//! `rbb-worker --docker` on this machine's engine, against the Docker CLI doing the same work
//! as the baseline (`docker run --rm` for a step-level container, `docker exec` for a step in
//! the build's container). Skipped, saying so, when no engine answers.
//!
//! Every build is checked SUCCESS through the REST API before its times count.

use crate::runs::{force, get, not_success, wait_finished};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "rbb-test/busybox:1";
const STEPS: usize = 10;
/// A step printing 52,500,000 bytes of text (500,000 lines of 105 bytes).
const BIG: &str = "yes 'rbb bench log line: the quick brown fox jumps over the lazy dog 0123456789 rbb bench log line: th' | head -n 500000";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the Docker engine answers here.
pub(crate) fn engine_answers() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Builds the test images (testdata/docker/build-images.sh) if they are missing.
pub(crate) fn images(root: &Path) -> Result<()> {
    crate::run(Command::new("sh").arg(root.join("testdata/docker/build-images.sh")))
}

pub fn run(root: &Path, bin: &Path, work: &Path) -> Result<()> {
    println!("docker: {STEPS} steps running `true` in {IMAGE}");
    if !engine_answers() {
        println!("  skipped: no Docker engine answers on this machine\n");
        return Ok(());
    }
    images(root)?;
    let dir = work.join("docker");
    std::fs::create_dir_all(&dir)?;
    let mut pipeline = String::from("builders:\n  step-containers:\n    steps:\n");
    for i in 0..STEPS {
        pipeline.push_str(&format!("      - {{ name: s{i}, image: \"{IMAGE}\", run: \"true\" }}\n"));
    }
    pipeline.push_str(&format!(
        "  build-container:\n    image: \"{IMAGE}\"\n    steps:\n      - {{ name: start, run: \"true\" }}\n"
    ));
    for i in 0..STEPS {
        pipeline.push_str(&format!("      - {{ name: s{i}, run: \"true\" }}\n"));
    }
    pipeline.push_str(&format!("  big-log:\n    steps:\n      - {{ image: \"{IMAGE}\", run: \"{BIG}\" }}\n"));
    let src = dir.join("repo-src");
    std::fs::create_dir_all(src.join(".rbb"))?;
    std::fs::write(src.join(".rbb/pipeline.yaml"), pipeline)?;
    crate::make_repo_from(root, &src, &dir.join("repo"))?;
    std::fs::write(
        dir.join("rbb.yaml"),
        "repositories:\n  - url: repo\nworkers:\n  - name: bench-docker\n    token: t\n    max_steps: 1\n",
    )?;
    let mut master = Command::new(bin.join("rbb"))
        .args(["master", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .arg("--config")
        .arg(dir.join("rbb.yaml"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RBB_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting rbb master")?;
    let (http, grpc) = crate::listening(&mut master)?;
    let _master = Proc(master);
    let _worker = Proc(
        Command::new(bin.join("rbb-worker"))
            .args(["--master", &format!("http://{grpc}"), "--name", "bench-docker", "--token", "t", "--docker"])
            .arg("--workdir")
            .arg(dir.join("work"))
            .env("RBB_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .context("starting rbb-worker --docker")?,
    );
    let t = Instant::now();
    while get(&http, "/api/v2/workers")?["workers"][0]["connected"] != true {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the Docker worker did not connect");
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    let step_container = median(steps_ms(&http, "repo/step-containers", |_| true)?);
    let run_rm = median((0..STEPS).map(|_| cli_ms(&["run", "--rm", IMAGE, "true"])).collect::<Result<_>>()?);
    // The build's first step makes the container; the others are the per-step figure.
    let in_build = median(steps_ms(&http, "repo/build-container", |name| name != "start")?);
    let idle = Command::new("docker")
        .args(["run", "-d", "--rm", "--label", "rbb.bench=1", IMAGE, "sleep", "600"])
        .output()
        .context("docker run -d")?;
    if !idle.status.success() {
        bail!("docker run -d failed: {}", String::from_utf8_lossy(&idle.stderr));
    }
    let id = String::from_utf8_lossy(&idle.stdout).trim().to_owned();
    let exec = (0..STEPS).map(|_| cli_ms(&["exec", &id, "true"])).collect::<Result<Vec<_>>>();
    let _ = Command::new("docker").args(["rm", "-f", &id]).stdout(Stdio::null()).status();
    let exec = median(exec?);
    println!(
        "  step-level container, per step   {step_container:>7.1} ms   {:.2}× `docker run --rm` (target ≤ 1.1×)",
        step_container / run_rm
    );
    println!("  baseline: docker run --rm true   {run_rm:>7.1} ms");
    println!(
        "  in the build's container         {in_build:>7.1} ms   {:.2}× `docker exec` (target ≤ 1.5×)",
        in_build / exec
    );
    println!("  baseline: docker exec true       {exec:>7.1} ms");
    let big = median((0..3).map(|_| steps_ms(&http, "repo/big-log", |_| true).map(|v| v[0])).collect::<Result<_>>()?);
    let into_file = median(
        (0..3)
            .map(|_| cli_ms(&["run", "--rm", IMAGE, "sh", "-c", &format!("{BIG} > /tmp/log")]))
            .collect::<Result<_>>()?,
    );
    println!(
        "  50 MiB log from a container      {big:>7.1} ms   {:.2}× the same into a file in the container (target ≤ 3×)",
        big / into_file
    );
    println!("  baseline: docker run, into file  {into_file:>7.1} ms\n");
    Ok(())
}

/// Forces `builder`, checks it succeeded, and returns the durations of its steps `keep` selects.
fn steps_ms(http: &str, builder: &str, keep: impl Fn(&str) -> bool) -> Result<Vec<f64>> {
    let b = wait_finished(http, force(http, builder)?)?;
    if let Some(why) = not_success(&b) {
        bail!("the bench stopped: {why}; its figures would be meaningless");
    }
    let mut out = Vec::new();
    for s in b["steps"].as_array().context("steps")? {
        if !keep(s["name"].as_str().unwrap_or_default()) {
            continue;
        }
        match (s["started_at"].as_u64(), s["finished_at"].as_u64()) {
            (Some(a), Some(z)) if z >= a => out.push((z - a) as f64),
            _ => bail!("no start and finish time in {s}"),
        }
    }
    Ok(out)
}

fn cli_ms(args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new("docker").args(args).stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!("docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
