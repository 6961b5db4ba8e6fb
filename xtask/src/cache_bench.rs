//! `cargo xtask bench` figures for the step cache: a real release `rbb master` and one
//! `rbb-worker` on loopback.
//!
//! - A 20-step builder whose inputs do not change: its second run (every step reused)
//!   against its first (every step run), force to finished as a client sees it.
//! - Restoring 100 MiB of outputs in 1,000 files on a hit, against `cp -r` of the same tree
//!   on the same disk.
//!
//! Every build is checked: the first runs must pass with every step run, the second ones
//! must have every cacheable step CACHED and the check steps must find the restored files;
//! anything else stops the bench.

use crate::runs::{Cluster, get, str_of, wait_finished};
use anyhow::{Result, bail};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const STEPS: usize = 20;
const BIG_FILES: usize = 1000;
const BIG_FILE_KIB: usize = 100;

pub fn run(bin: &Path, work: &Path) -> Result<()> {
    let dir = work.join("cache");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("app-src");
    std::fs::create_dir_all(src.join(".rbb"))?;
    std::fs::create_dir_all(src.join("src"))?;
    let mut pipeline = String::from("builders:\n  twenty:\n    steps:\n");
    for i in 0..STEPS {
        std::fs::write(src.join(format!("src/s{i:02}.txt")), format!("input {i}\n"))?;
        let _ = write!(
            pipeline,
            "      - name: s{i:02}\n        run: mkdir -p out && cp src/s{i:02}.txt out/s{i:02}.txt\n        inputs: [src/s{i:02}.txt]\n        outputs: [out/s{i:02}.txt]\n"
        );
    }
    let _ = write!(
        pipeline,
        "  big:\n    steps:\n      - name: make\n        run: sh gen.sh\n        inputs: [gen.sh]\n        outputs: [big]\n        timeout: 10m\n      - name: check\n        run: test \"$(ls big | wc -l)\" -eq {BIG_FILES} && test \"$(du -sk big | cut -f1)\" -ge {}\n        cache: false\n",
        BIG_FILES * BIG_FILE_KIB
    );
    std::fs::write(src.join(".rbb/pipeline.yaml"), pipeline)?;
    std::fs::write(
        src.join("gen.sh"),
        format!(
            "mkdir -p big\nhead -c {} /dev/urandom > big.all\nsplit -a 4 -d -b {}k big.all big/f\nrm big.all\n",
            BIG_FILES * BIG_FILE_KIB * 1024,
            BIG_FILE_KIB
        ),
    )?;
    crate::make_repo_from(&crate::root(), &src, &dir.join("app"))?;
    std::fs::write(
        dir.join("rbb.yaml"),
        "repositories:\n  - url: app\nworkers:\n  - name: w\n    token: t\n    max_steps: 1\n",
    )?;
    let c = crate::runs::start(bin, &dir)?;

    println!(
        "step cache: {STEPS}-step builder with unchanged inputs; {BIG_FILES} files of {BIG_FILE_KIB} KiB restored"
    );
    let (first_ms, first) = timed_build(&c, "app/twenty")?;
    expect_steps(&first, "SUCCESS", STEPS)?;
    let mut seconds = Vec::new();
    for _ in 0..5 {
        let (t, b) = timed_build(&c, "app/twenty")?;
        expect_steps(&b, "CACHED", STEPS)?;
        if b["result"] != "CACHED" {
            bail!("build {} of app/twenty reused every step but ended {}", b["id"], str_of(&b["result"]));
        }
        seconds.push(t);
    }
    seconds.sort_by(f64::total_cmp);
    let second = seconds[seconds.len() / 2];
    println!(
        "  second run, every step reused    {:>9.1} ms   target ≤ 100 ms ({:.2} of target; median of 5)",
        second,
        second / 100.0
    );
    println!(
        "  baseline: first run, all run     {:>9.1} ms   (the reused run takes {:.2}× that)",
        first_ms,
        second / first_ms.max(1e-9)
    );

    let (_, big1) = timed_build(&c, "app/big")?;
    expect_results(&big1, &[("make", "SUCCESS"), ("check", "SUCCESS")])?;
    let stored_ms = step_ms(&big1, "make")?;
    let (_, big2) = timed_build(&c, "app/big")?;
    expect_results(&big2, &[("make", "CACHED"), ("check", "SUCCESS")])?;
    let hit_step_ms = step_ms(&big2, "make")?;
    let restore_ms = restored_ms(&c, &big2, "make")?;
    let tree = find_dir(&dir.join("work"), "big")?;
    let copy = dir.join("copy");
    let mut cps = Vec::new();
    for _ in 0..3 {
        if copy.exists() {
            std::fs::remove_dir_all(&copy)?;
        }
        let t = Instant::now();
        let s = Command::new("cp").arg("-r").arg(&tree).arg(&copy).status()?;
        if !s.success() {
            bail!("cp -r {} failed", tree.display());
        }
        cps.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    cps.sort_by(f64::total_cmp);
    let cp = cps[1];
    println!(
        "  restore 100 MiB / {BIG_FILES} files (hit) {:>8.1} ms   target ≤ 2× cp -r ({:.2}× cp -r)",
        restore_ms,
        restore_ms / cp.max(1e-9)
    );
    println!("  baseline: cp -r of the same tree {cp:>9.1} ms   (same disk, median of 3)");
    println!(
        "  the hit step in all             {hit_step_ms:>9.1} ms   (checkout, git clean of the last build's files, lookup, restore)"
    );
    println!("  first run: generate + store     {stored_ms:>9.1} ms   (hash, upload, compress)");

    let stats = get(&c.http, "/api/v2/cache")?;
    let mut hits = 0;
    let mut misses = 0;
    for b in stats["builders"].as_array().map(Vec::as_slice).unwrap_or_default() {
        hits += b["hits"].as_u64().unwrap_or(0);
        misses += b["misses"].as_u64().unwrap_or(0);
    }
    println!(
        "  after the bench: {hits} hits, {misses} misses, {} entries, {} blobs, {:.1} MiB stored\n",
        stats["entries"],
        stats["blobs"],
        stats["stored_bytes"].as_u64().unwrap_or(0) as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// Forces `builder` and waits for the build; returns the wall time from the force request
/// to the finished state, as a client sees it.
fn timed_build(c: &Cluster, builder: &str) -> Result<(f64, Value)> {
    let t = Instant::now();
    let id = crate::runs::force(&c.http, builder)?;
    let b = wait_finished(&c.http, id)?;
    Ok((t.elapsed().as_secs_f64() * 1000.0, b))
}

fn expect_steps(b: &Value, result: &str, n: usize) -> Result<()> {
    let steps = b["steps"].as_array().map(Vec::as_slice).unwrap_or_default();
    let good = steps.iter().filter(|s| s["result"] == result).count();
    if good != n || steps.len() != n {
        bail!(
            "the bench stopped: build {} of {} has {good} of {n} steps {result}: {}",
            b["id"],
            str_of(&b["builder"]),
            describe(b)
        );
    }
    Ok(())
}

fn expect_results(b: &Value, want: &[(&str, &str)]) -> Result<()> {
    for (name, result) in want {
        let s = b["steps"].as_array().and_then(|a| a.iter().find(|s| s["name"] == *name));
        if s.is_none_or(|s| s["result"] != *result) {
            bail!("the bench stopped: build {} step {name} is not {result}: {}", b["id"], describe(b));
        }
    }
    Ok(())
}

fn describe(b: &Value) -> String {
    b["steps"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| format!("{}={} ({})", str_of(&s["name"]), str_of(&s["result"]), str_of(&s["reason"])))
        .collect::<Vec<_>>()
        .join(", ")
}

fn step_ms(b: &Value, name: &str) -> Result<f64> {
    let s = b["steps"].as_array().and_then(|a| a.iter().find(|s| s["name"] == name));
    match s.map(|s| (s["started_at"].as_u64(), s["finished_at"].as_u64())) {
        Some((Some(a), Some(z))) if z >= a => Ok((z - a) as f64),
        _ => bail!("step {name} of build {} has no times", b["id"]),
    }
}

/// The restore time the worker reports in the step's log (`... restored N files, X MiB in
/// Y ms`): the fetch from its local copy, the digest checks and the copy into the checkout.
fn restored_ms(c: &Cluster, b: &Value, name: &str) -> Result<f64> {
    let s = b["steps"].as_array().and_then(|a| a.iter().find(|s| s["name"] == name));
    let Some(log) = s.and_then(|s| s["log_id"].as_u64()) else { bail!("step {name} of build {} has no log", b["id"]) };
    let text = crate::http_request(&c.http, "GET", &format!("/api/v2/logs/{log}/raw"), "")?;
    let line = text.lines().find(|l| l.starts_with("# cache hit") && l.contains(" restored "));
    let ms = line
        .and_then(|l| l.rsplit_once(" in "))
        .and_then(|(_, t)| t.strip_suffix(" ms"))
        .and_then(|t| t.trim().parse::<f64>().ok());
    match ms {
        Some(ms) => Ok(ms),
        None => {
            bail!("the bench stopped: build {} step {name} does not say how long its restore took:\n{text}", b["id"])
        }
    }
}

/// The first directory named `name` under `root` (the worker's checkout of the outputs).
fn find_dir(root: &Path, name: &str) -> Result<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(d) = stack.pop() {
        if Instant::now() > deadline {
            break;
        }
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) && !p.ends_with(".git") && !p.ends_with(".rbb-cache") {
                if p.file_name().is_some_and(|n| n == name) {
                    return Ok(p);
                }
                stack.push(p);
            }
        }
    }
    bail!("no directory {name} under {}", root.display())
}
