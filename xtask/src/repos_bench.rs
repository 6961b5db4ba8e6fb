//! `cargo xtask bench repos`: a master watching many repositories, against the same master
//! watching one, in the same run.
//!
//! It makes N real git repositories (1,000 by default, `--repos N`; each with its own
//! pipeline of two builders), a master config polling each every 60 s (`--interval`), and
//! starts the real release `rbb master` on it. It prints: start → API answering, start →
//! every mirror fetched, RSS and threads after start and after an idle minute (`--idle S`),
//! the master's CPU while idle, and push → build queued: a commit that changes the
//! repository's pipeline, announced by a signed GitHub push webhook, until the build of
//! that commit is in `/api/v2/buildrequests` (median of several pushes to different
//! repositories). The baseline is the same master watching one repository.
//!
//! Every timed answer is checked: the API lists every repository's builders, every
//! repository's mirror reports a successful fetch, each queued build is of the pushed
//! commit and of the builder the new pipeline added. A wrong answer stops the bench.

use crate::forge_bench::{git, poll, post, sign};
use crate::runs::{get, rss_kib};
use crate::scale::{Master, cpu_ms, loadavg, start};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SECRET: &str = "bench-webhook-secret";
const PUSHES: usize = 9;

struct Args {
    repos: usize,
    interval_s: u64,
    idle_s: u64,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args { repos: 1000, interval_s: 60, idle_s: 60 };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        let n: u64 = v.replace('_', "").parse().with_context(|| format!("{k} {v}: not a number"))?;
        match k.as_str() {
            "--repos" => a.repos = n as usize,
            "--interval" => a.interval_s = n,
            "--idle" => a.idle_s = n,
            _ => bail!("unknown option {k}; options: --repos N --interval SECONDS --idle SECONDS"),
        }
    }
    if a.repos < PUSHES {
        bail!("--repos must be at least {PUSHES}");
    }
    Ok(a)
}

fn pipeline(extra: usize) -> String {
    let mut p = String::from(
        "builders:\n  build:\n    on:\n      push: { branches: [main] }\n    steps:\n      - run: make\n      - run: make test\n  lint:\n    on:\n      push: { branches: [main] }\n    steps: [{ run: make lint }]\n",
    );
    if extra > 0 {
        p.push_str(&format!(
            "  extra{extra}:\n    on:\n      push: {{ branches: [main] }}\n    steps: [{{ run: echo {extra} }}]\n"
        ));
    }
    p
}

pub fn main(root: &Path, args: &[String]) -> Result<()> {
    let a = parse(args)?;
    if cfg!(debug_assertions) {
        return crate::scale::rerun_in_release(root, "repos", args);
    }
    let bin = std::env::current_exe()?.parent().context("xtask has no directory")?.to_path_buf();
    let work = root.join(".rbb-state/bench-repos");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    println!(
        "rbb bench repos (release build): a master watching {} repositories polled every {} s, against one watching 1\n",
        a.repos, a.interval_s
    );
    let t = Instant::now();
    let template = work.join("template");
    let src = work.join("template-src");
    std::fs::create_dir_all(src.join(".rbb"))?;
    std::fs::write(src.join(".rbb/pipeline.yaml"), pipeline(0))?;
    std::fs::write(src.join("Makefile"), "all:\n\ttrue\n")?;
    crate::make_repo_from(root, &src, &template)?;
    let fleet = setup(&work.join("fleet"), &template, a.repos, a.interval_s)?;
    let one = setup(&work.join("one"), &template, 1, a.interval_s)?;
    eprintln!("  {} repositories made in {:.1} s", a.repos + 1, t.elapsed().as_secs_f64());

    let big = measure(&fleet, &bin, a.repos, &a)?;
    let small = measure(&one, &bin, 1, &a)?;
    println!("{:<44} {:>14} {:>14} {:>10}", "figure", format!("{} repos", a.repos), "1 repo", "target");
    let row = |name: &str, b: String, s: String, target: &str| println!("{name:<44} {b:>14} {s:>14} {target:>10}");
    row("start → API answering", ms(big.start), ms(small.start), "≤ 1 s");
    row("start → every repository's builders listed", ms(big.planned), ms(small.planned), "");
    row("start → every mirror fetched once", ms(big.mirrors), ms(small.mirrors), "");
    row("RSS after start", mib(big.rss_start), mib(small.rss_start), "≤ 128 MiB");
    row(&format!("RSS after {} s idle", a.idle_s), mib(big.rss_idle), mib(small.rss_idle), "≤ 128 MiB");
    row("threads after idle", big.threads.to_string(), small.threads.to_string(), "");
    row(
        &format!("CPU while idle ({} s)", a.idle_s),
        format!("{:.2}%", big.idle_cpu),
        format!("{:.2}%", small.idle_cpu),
        "≤ 2%",
    );
    row("push → build queued (webhook, p50)", ms(big.push.0), ms(small.push.0), "≤ 50 ms");
    row("push → build queued (webhook, max)", ms(big.push.1), ms(small.push.1), "");
    println!(
        "\npushes change the repository's pipeline (a new builder), so each one compiles a plan; \
         CPU is the master's utime+stime over the idle window from /proc; load average {:.1}",
        loadavg()
    );
    Ok(())
}

/// `n` copies of the template repository and a config watching them.
fn setup(dir: &Path, template: &Path, n: usize, interval_s: u64) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir.join("repos"))?;
    let mut config = String::from("repositories:\n");
    for r in 0..n {
        let name = format!("r{r:04}");
        let out = Command::new("cp").arg("-a").arg(template).arg(dir.join("repos").join(&name)).output()?;
        if !out.status.success() {
            bail!("cp -a of the template repository failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        config.push_str(&format!("  - url: repos/{name}\n    poll_interval: {interval_s}s\n"));
    }
    config.push_str(&format!("webhooks:\n  github_secret: {SECRET}\nworkers:\n  - name: w\n    token: t\n"));
    std::fs::write(dir.join("rbb.yaml"), config)?;
    Ok(dir.to_path_buf())
}

struct Figures {
    start: Duration,
    planned: Duration,
    mirrors: Duration,
    rss_start: u64,
    rss_idle: u64,
    threads: u64,
    idle_cpu: f64,
    push: (Duration, Duration),
}

fn measure(dir: &Path, bin: &Path, n: usize, a: &Args) -> Result<Figures> {
    eprintln!("measuring {n} repositories");
    let t0 = Instant::now();
    let (m, start_t) = start(bin, &dir.join("rbb.yaml"), &dir.join("state"))?;
    let pid = m.child.id();
    let rss_start = rss_kib(pid, "VmRSS:");
    // Every repository's builders are in the plan, and every mirror fetched once.
    poll(Duration::from_secs(600), "every repository's builders in the API", || {
        let total = get(&m.http, "/api/v2/builders?limit=1")?["meta"]["total"].as_u64().unwrap_or(0);
        Ok((total == 2 * n as u64).then_some(()))
    })?;
    let planned = t0.elapsed();
    poll(Duration::from_secs(600), "every mirror fetched", || {
        let v = get(&m.http, "/api/v2/repositories")?;
        let list = v["repositories"].as_array().cloned().unwrap_or_default();
        let done = list.iter().filter(|r| !r["last_success"].is_null() && r["error"].is_null()).count();
        Ok((list.len() == n && done == n).then_some(()))
    })?;
    let mirrors = t0.elapsed();
    // Idle: nothing pushed, the pollers on their interval.
    let cpu0 = cpu_ms(pid)?;
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(a.idle_s));
    let idle_cpu = (cpu_ms(pid)? - cpu0) / t.elapsed().as_secs_f64() / 10.0;
    let rss_idle = rss_kib(pid, "VmRSS:");
    let threads = rss_kib(pid, "Threads:");
    let push = pushes(&m, dir, n)?;
    drop(m);
    Ok(Figures { start: start_t, planned, mirrors, rss_start, rss_idle, threads, idle_cpu, push })
}

/// Pushes a pipeline change to `PUSHES` repositories in turn: (median, max) push → queued.
fn pushes(m: &Master, dir: &Path, n: usize) -> Result<(Duration, Duration)> {
    let template: Value =
        serde_json::from_str(&std::fs::read_to_string(crate::root().join("testdata/webhooks/github/push.json"))?)?;
    let mut times = Vec::new();
    for i in 0..=PUSHES {
        let name = format!("r{:04}", (i * 7919) % n);
        let repo = dir.join("repos").join(&name);
        let before = git(&repo, &["rev-parse", "HEAD"])?;
        std::fs::write(repo.join(".rbb/pipeline.yaml"), pipeline(i + 1))?;
        git(&repo, &["commit", "-q", "-am", &format!("bench push {i}")])?;
        let sha = git(&repo, &["rev-parse", "HEAD"])?;
        let mut payload = template.clone();
        payload["before"] = before.into();
        payload["after"] = sha.clone().into();
        payload["repository"]["name"] = name.clone().into();
        payload["repository"]["full_name"] = format!("acme/{name}").into();
        payload["repository"]["clone_url"] = Value::Null;
        payload["repository"]["html_url"] = Value::Null;
        payload["repository"]["ssh_url"] = Value::Null;
        payload["repository"]["git_url"] = Value::Null;
        payload["repository"]["url"] = Value::Null;
        let body = payload.to_string();
        let signature = format!("sha256={}", sign(body.as_bytes())?);
        let t = Instant::now();
        let code = post(
            &m.http,
            "/api/v2/hooks/github",
            &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &signature)],
            &body,
        )?;
        if code != 202 {
            bail!("the push webhook for {name} {sha} was answered {code}, not 202");
        }
        let queued = poll(Duration::from_secs(60), "the pushed commit's builds queued", || {
            let v = get(&m.http, "/api/v2/buildrequests")?;
            let mine: Vec<Value> = v["buildrequests"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["commit"] == sha.as_str())
                .cloned()
                .collect();
            Ok((mine.len() == 3).then_some(mine))
        })?;
        let took = t.elapsed();
        let extra = format!("{name}/extra{}", i + 1);
        if !queued.iter().any(|b| b["builder"] == extra.as_str()) {
            bail!("the builds of {name} {sha} do not include the builder its new pipeline adds ({extra}): {queued:?}");
        }
        // Cancel them, so the queue stays as short as it was.
        for b in &queued {
            let id = b["id"].as_u64().context("build request without id")?;
            post(&m.http, &format!("/api/v2/buildrequests/{id}/cancel"), &[], "{}")?;
        }
        if i > 0 {
            times.push(took); // the first push warms the path
        }
    }
    times.sort();
    Ok((times[times.len() / 2], times[times.len() - 1]))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
