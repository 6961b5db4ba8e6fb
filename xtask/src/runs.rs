//! `cargo xtask bench` figures for running builds: a real release `rbb master` and one
//! `rbb-worker` on loopback, with the same commands timed in a bare shell as the baseline.
//!
//! Every build the bench starts is checked through the REST API (the build and each of its
//! steps SUCCESS); the first one that is not aborts the bench with its id, result and reason,
//! so a failure can never pass for a fast build. Figures of other systems are printed as what
//! they are: reported elsewhere, not measured here.

use crate::{http_request, make_repo_from};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) struct Cluster {
    master: Proc,
    _worker: Proc,
    pub(crate) http: String,
}

/// Where the Buildbot figures printed next to ours come from.
const BUILDBOT: &str = "Buildbot 4.3.0, reported, not measured here";

/// Lines the 50 MiB step prints, and the bytes of each (newline included): 52,500,000 bytes
/// of text, the shape of the 500,000-line log Buildbot's figure was reported for.
const BIG_LINES: u64 = 500_000;
const BIG_LINE_BYTES: u64 = 105;
/// Room for what the worker writes around a step's output (checkout commands, exit line).
const LOG_FRAME: u64 = 64 << 10;

/// The 50 MiB step's command; its baseline runs the same command into a file.
fn big_command() -> String {
    let line: String = "rbb bench log line: the quick brown fox jumps over the lazy dog 0123456789 "
        .chars()
        .cycle()
        .take(BIG_LINE_BYTES as usize - 1)
        .collect();
    format!("yes '{line}' | head -n {BIG_LINES}")
}

pub(crate) fn get(http: &str, path: &str) -> Result<Value> {
    Ok(serde_json::from_str(&http_request(http, "GET", path, "")?)?)
}

pub(crate) fn force(http: &str, builder: &str) -> Result<u64> {
    let path = format!("/api/v2/builders/{}/force", builder.replace('/', "%2F"));
    let v: Value = serde_json::from_str(&http_request(http, "POST", &path, "{}")?)?;
    v["build"].as_u64().context("force returned no build id")
}

/// Why `build` (a finished build's JSON) is not a success: its result and reason, and each
/// step that did not succeed. `None` when the build and all its steps are SUCCESS.
pub(crate) fn not_success(build: &Value) -> Option<String> {
    let steps = build["steps"].as_array().map(Vec::as_slice).unwrap_or_default();
    let bad: Vec<String> = steps
        .iter()
        .filter(|s| s["result"] != "SUCCESS" && s["result"] != "SKIPPED")
        .map(|s| {
            let n = s["number"].as_u64().map_or_else(|| "?".to_owned(), |n| (n + 1).to_string());
            format!("step {n} ({}): {} ({})", str_of(&s["name"]), str_of(&s["result"]), str_of(&s["reason"]))
        })
        .collect();
    let skipped = steps.iter().filter(|s| s["result"] == "SKIPPED").count();
    if build["result"] == "SUCCESS" && bad.is_empty() && skipped == 0 && !steps.is_empty() {
        return None;
    }
    let mut why = format!(
        "build {} of {}: result {} ({})",
        build["id"],
        str_of(&build["builder"]),
        str_of(&build["result"]),
        str_of(&build["result_reason"])
    );
    for b in bad {
        why.push_str("; ");
        why.push_str(&b);
    }
    if skipped > 0 {
        why.push_str(&format!("; {skipped} of {} steps SKIPPED", steps.len()));
    }
    Some(why)
}

pub(crate) fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// Forces `builder`, waits for the build and checks it succeeded; a failed build aborts.
fn run_build(http: &str, builder: &str) -> Result<Value> {
    let b = wait_finished(http, force(http, builder)?)?;
    check_success(&b)?;
    Ok(b)
}

fn check_success(build: &Value) -> Result<()> {
    match not_success(build) {
        None => Ok(()),
        Some(why) => bail!("the bench stopped: {why}; its figures would be meaningless"),
    }
}

/// The duration of a finished build or step from its API timestamps.
fn elapsed_ms(v: &Value) -> Result<f64> {
    match (v["started_at"].as_u64(), v["finished_at"].as_u64()) {
        (Some(s), Some(f)) if f >= s => Ok((f - s) as f64),
        _ => bail!("no start and finish time in {v}"),
    }
}

pub(crate) fn wait_finished(http: &str, id: u64) -> Result<Value> {
    let start = Instant::now();
    loop {
        let b = get(http, &format!("/api/v2/builds/{id}"))?;
        if b["state"] == "finished" {
            return Ok(b);
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("build {id} did not finish in 5 minutes");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub(crate) fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) fn start(bin: &Path, dir: &Path) -> Result<Cluster> {
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
    let worker = Command::new(bin.join("rbb-worker"))
        .args(["--master", &format!("http://{grpc}"), "--name", "w", "--token", "t", "--max-steps", "1"])
        .arg("--workdir")
        .arg(dir.join("work"))
        .env("RBB_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .context("starting rbb-worker")?;
    let c = Cluster { master: Proc(master), _worker: Proc(worker), http };
    let t = Instant::now();
    while get(&c.http, "/api/v2/workers")?["workers"][0]["connected"] != true {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the worker did not connect");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(c)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `sh -c cmd` `n` times in a row; the bare-shell floor.
fn shell_floor(cmd: &str, n: usize) -> Result<Duration> {
    let t = Instant::now();
    for _ in 0..n {
        let s = Command::new("sh").args(["-c", cmd]).stdout(Stdio::null()).status()?;
        if !s.success() {
            bail!("sh -c {cmd} failed");
        }
    }
    Ok(t.elapsed())
}

pub fn run(root: &Path, bin: &Path, work: &Path) -> Result<()> {
    let dir = work.join("run");
    std::fs::create_dir_all(&dir)?;
    let marker = dir.join("started-at");
    let mut pipeline = String::from("builders:\n");
    // 50 trivial steps in one builder.
    pipeline.push_str("  fifty:\n    steps:\n");
    for i in 0..50 {
        pipeline.push_str(&format!("      - {{ name: s{i}, run: \"true\" }}\n"));
    }
    // 20 builders of 10 trivial steps.
    for b in 0..20 {
        pipeline.push_str(&format!("  b{b}:\n    steps:\n"));
        for i in 0..10 {
            pipeline.push_str(&format!("      - {{ name: s{i}, run: \"true\" }}\n"));
        }
    }
    pipeline.push_str(&format!("  big:\n    steps:\n      - run: \"{}\"\n", big_command()));
    pipeline.push_str(&format!("  stamp:\n    steps:\n      - run: date +%s%N > {}\n", marker.display()));
    let src = dir.join("repo-src");
    std::fs::create_dir_all(src.join(".rbb"))?;
    std::fs::write(src.join(".rbb/pipeline.yaml"), pipeline)?;
    make_repo_from(root, &src, &dir.join("repo"))?;
    std::fs::write(
        dir.join("rbb.yaml"),
        "repositories:\n  - url: repo\nworkers:\n  - name: w\n    token: t\n    max_steps: 1\n",
    )?;
    let c = start(bin, &dir)?;
    let pid = c.master.0.id();
    // RSS is read after a quiet moment, at the start and after the run alike.
    let settle = Duration::from_secs(3);
    std::thread::sleep(settle);
    let idle_rss = rss_kib(pid, "VmRSS:");

    println!("running builds: release rbb master + one rbb-worker (1 slot) on loopback");

    // Overhead per trivial step.
    let mut per_step = Vec::new();
    let mut floors = Vec::new();
    for _ in 0..5 {
        let b = run_build(&c.http, "repo/fifty")?;
        let ms = elapsed_ms(&b)?;
        let floor = shell_floor("true", 50)?.as_secs_f64() * 1000.0;
        per_step.push((ms - floor) / 50.0);
        floors.push(floor / 50.0);
    }
    let overhead = median(per_step);
    println!(
        "  overhead per trivial step          {:>8.2} ms   target ≤ 3 ms   (50 × `true`; bare shell {:.2} ms per `sh -c true`, subtracted)",
        overhead,
        median(floors)
    );

    // Throughput: 20 builds × 10 steps.
    let t = Instant::now();
    let ids: Vec<u64> = (0..20).map(|b| force(&c.http, &format!("repo/b{b}"))).collect::<Result<_>>()?;
    let done: Vec<Value> = ids.iter().map(|id| wait_finished(&c.http, *id)).collect::<Result<_>>()?;
    let secs = t.elapsed().as_secs_f64();
    for b in &done {
        check_success(b)?;
    }
    let floor = shell_floor("true", 200)?.as_secs_f64();
    println!(
        "  20 builds × 10 steps, one worker   {:>8.0} steps/s   target ≥ 200   (bare shell: {:.0} steps/s; {BUILDBOT}: 5.7)",
        200.0 / secs,
        200.0 / floor
    );

    // Trigger → first step started.
    let mut lat = Vec::new();
    for _ in 0..7 {
        let _ = std::fs::remove_file(&marker);
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        run_build(&c.http, "repo/stamp")?;
        let stamp: u128 = std::fs::read_to_string(&marker)?.trim().parse().context("stamp")?;
        lat.push((stamp.saturating_sub(before)) as f64 / 1e6);
    }
    let spawn_floor = {
        let t = Instant::now();
        Command::new("sh").args(["-c", "date +%s%N > /dev/null"]).status()?;
        t.elapsed().as_secs_f64() * 1000.0
    };
    println!(
        "  trigger → first step started       {:>8.2} ms   target ≤ 20 ms  (HTTP force to the step's first instruction; a bare `sh -c date` takes {:.2} ms; {BUILDBOT}: 339 ms)",
        median(lat),
        spawn_floor
    );

    // 500,000 lines (50 MiB) of output (the first run also clones the checkout: it is left out).
    let file = dir.join("big.out");
    let big_bytes = BIG_LINES * BIG_LINE_BYTES;
    let mut steps = Vec::new();
    let mut bases = Vec::new();
    let mut b = Value::Null;
    for i in 0..6 {
        b = run_build(&c.http, "repo/big")?;
        let s = &b["steps"][0];
        // The log is the output plus the worker's header (checkout, command) and trailer.
        let logged = s["log_bytes"].as_u64().unwrap_or(0);
        if !(big_bytes..big_bytes + LOG_FRAME).contains(&logged) {
            bail!(
                "the bench stopped: build {}: the step's log holds {logged} bytes, not {big_bytes} and a frame",
                b["id"]
            );
        }
        if i > 0 {
            steps.push(elapsed_ms(s)?);
        }
        let bt = Instant::now();
        crate::run(Command::new("sh").args(["-c", &format!("{} > {}", big_command(), file.display())]))?;
        bases.push(bt.elapsed().as_secs_f64() * 1000.0);
    }
    if std::fs::metadata(&file)?.len() != big_bytes {
        bail!("the baseline command wrote {} bytes, not {big_bytes}", std::fs::metadata(&file)?.len());
    }
    let (step_ms, base_ms) = (median(steps), median(bases));
    let peak_rss = rss_kib(pid, "VmHWM:");
    println!(
        "  step writing 500,000 lines (50 MiB){:>7.0} ms   target ≤ 3× baseline ({:.1}×; the same command into a file: {:.0} ms; {BUILDBOT}: 16 s)",
        step_ms,
        step_ms / base_ms.max(0.001),
        base_ms
    );
    let log = b["steps"][0]["log_id"].as_u64().context("log id")?;
    let rt = Instant::now();
    let body = raw_len(&c.http, &format!("/api/v2/logs/{log}/raw"))?;
    let mbps = body as f64 / 1048576.0 / rt.elapsed().as_secs_f64();
    let logged = b["steps"][0]["log_bytes"].as_u64().unwrap_or(0);
    if body != logged {
        bail!("the bench stopped: log {log} served {body} bytes, not the {logged} it holds");
    }
    println!("  raw log served back                {:>8.0} MiB/s target ≥ 200 MB/s ({} bytes)", mbps, body);
    // Idle again: what the master keeps once the work is done (retention, not peak).
    std::thread::sleep(settle);
    let after_rss = rss_kib(pid, "VmRSS:");
    println!(
        "  master RSS idle                    {:>8.1} MiB  target ≤ 25 MiB ({BUILDBOT}: 81 MiB)",
        idle_rss as f64 / 1024.0
    );
    println!(
        "  master peak RSS over the run       {:>8.1} MiB  (+{:.1} MiB over idle while ingesting; target ≤ +16 MiB)",
        peak_rss as f64 / 1024.0,
        (peak_rss.saturating_sub(idle_rss)) as f64 / 1024.0
    );
    println!(
        "  master RSS idle after the run      {:>8.1} MiB  (+{:.1} MiB over idle, {} s after the last build)",
        after_rss as f64 / 1024.0,
        after_rss.saturating_sub(idle_rss) as f64 / 1024.0,
        settle.as_secs()
    );
    Ok(())
}

/// The 50 MiB log with one secret declared: the same step as `run`'s, once without and once
/// with a secret in its environment (so the worker masks its output), on a fresh master and
/// worker. Prints both times and their ratio.
pub fn log_masking(root: &Path, bin: &Path, work: &Path) -> Result<()> {
    let dir = work.join("masking");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let pipeline = format!(
        "builders:\n  big:\n    steps:\n      - run: \"{cmd}\"\n  big-masked:\n    env:\n      TOKEN: ${{{{ secrets.BENCH_TOKEN }}}}\n    steps:\n      - run: \"{cmd}\"\n",
        cmd = big_command()
    );
    let src = dir.join("repo-src");
    std::fs::create_dir_all(src.join(".rbb"))?;
    std::fs::write(src.join(".rbb/pipeline.yaml"), pipeline)?;
    make_repo_from(root, &src, &dir.join("repo"))?;
    std::fs::write(dir.join("bench-token"), "rbb-bench-token-0123456789abcdef\n")?;
    std::fs::write(
        dir.join("rbb.yaml"),
        "repositories:\n  - url: repo\nworkers:\n  - name: w\n    token: t\n    max_steps: 1\nsecrets:\n  BENCH_TOKEN: { file: bench-token }\n",
    )?;
    let c = start(bin, &dir)?;
    let big_bytes = BIG_LINES * BIG_LINE_BYTES;
    let mut times = [Vec::new(), Vec::new()];
    // The first build of each clones the checkout: left out. Runs alternate, so load on the
    // machine weighs on both alike.
    for i in 0..8 {
        for (k, builder) in ["repo/big", "repo/big-masked"].iter().enumerate() {
            let b = run_build(&c.http, builder)?;
            let logged = b["steps"][0]["log_bytes"].as_u64().unwrap_or(0);
            if !(big_bytes..big_bytes + LOG_FRAME).contains(&logged) {
                bail!("the bench stopped: build {}: the step's log holds {logged} bytes, not {big_bytes}", b["id"]);
            }
            if i > 1 {
                times[k].push(elapsed_ms(&b["steps"][0])?);
            }
        }
    }
    let [plain, masked] = times.map(median);
    let gib = |ms: f64| big_bytes as f64 / (1u64 << 30) as f64 / (ms / 1000.0);
    println!("log masking: the 50 MiB step, release master + worker");
    println!("  no secret                          {plain:>8.0} ms   ({:.2} GiB/s)", gib(plain));
    println!(
        "  one secret declared (masked)       {masked:>8.0} ms   ({:.2} GiB/s; {:.2}× the step without; target ≤ 1.5×)",
        gib(masked),
        masked / plain.max(0.001)
    );
    Ok(())
}

/// GETs `path` and counts the body bytes without keeping them.
fn raw_len(http: &str, path: &str) -> Result<u64> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::net::TcpStream::connect(http)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n")?;
    let mut r = BufReader::with_capacity(1 << 20, s);
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    Ok(n)
}
