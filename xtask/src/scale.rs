//! `cargo xtask bench scale`: the master at fleet scale, measured against the same
//! measurements on an empty state dir in the same run.
//!
//! It writes a synthetic history (finished builds of 10 steps with their log records, across
//! 1,000 builders and their changes) through the store's own API, then starts the real
//! release `rbb master` on it and on an empty state dir and prints, for each: start → API
//! answering, RSS, list latencies, the grid, and a simulated fleet (real gRPC sessions in
//! this process answering every lease with SUCCESS at once) with its step rate and the
//! master's CPU time per step. Every answer it times is checked (totals, page sizes, every
//! fleet build SUCCESS); a wrong answer stops the bench, since its time would mean nothing.
//! Figures are printed, not asserted: benchmarks inform, tests decide.

use crate::runs::{force, get, not_success, rss_kib};
use crate::{cargo, make_repo_from, run, target_dir};
use anyhow::{Context, Result, bail};
use rbb_master::model::{BuildRecord, ChangeRecord, LogRecord, StepRecord};
use rbb_master::store::{Batch, Store, Sync};
use rbb_schema::api::State;
use rbb_schema::proto::{self, MasterMessage, WorkerMessage, master_message, worker_message::Msg};
use rbb_schema::results::Outcome;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// History shape: builders per repository and repositories (1,000 builders), and the steps
/// of each build. A change of a repository builds each of its builders once.
const HISTORY_REPOS: u64 = 10;
const BUILDERS_PER_REPO: u64 = 100;
const HISTORY_STEPS: u32 = 10;
/// Every 20th build failed (at its 7th step; the rest were skipped).
const FAIL_EVERY: u64 = 20;
const BATCH_BUILDS: u64 = 10_000;
/// The builder the `builder=X` list asks for.
const BUILDER_X: &str = "hrepo3/b042";

/// Fleet shape: builders in the fleet's pipeline, steps each.
const FLEET_BUILDERS: usize = 20;
const FLEET_STEPS: u32 = 5;
const WORKER_TOKEN: &str = "t";
/// Hard limit on one fleet run: a run that stalls stops the bench.
const FLEET_LIMIT: Duration = Duration::from_secs(1800);

struct Args {
    builds: u64,
    fleet_builds: u64,
    workers: u32,
    slots: u32,
    /// Builds kept queued beyond the slots while the fleet runs.
    queue: u64,
    requests: usize,
    reuse: bool,
    /// When set, the fleet runs builds for this long instead of `fleet_builds` (RSS after a
    /// long load).
    fleet_secs: u64,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        builds: 1_000_000,
        fleet_builds: 10_000,
        workers: 200,
        slots: 4,
        queue: 200,
        requests: 500,
        reuse: false,
        fleet_secs: 0,
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        if k == "--reuse" {
            a.reuse = true;
            continue;
        }
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        let n: u64 = v.replace('_', "").parse().with_context(|| format!("{k} {v}: not a number"))?;
        match k.as_str() {
            "--builds" => a.builds = n,
            "--fleet-builds" => a.fleet_builds = n,
            "--workers" => a.workers = n as u32,
            "--slots" => a.slots = n as u32,
            "--queue" => a.queue = n,
            "--requests" => a.requests = n as usize,
            "--fleet-secs" => a.fleet_secs = n,
            _ => bail!(
                "unknown option {k}; options: --builds N --fleet-builds N --fleet-secs S --workers N --slots N --queue N --requests N --reuse"
            ),
        }
    }
    if a.builds < BUILDERS_PER_REPO * HISTORY_REPOS * 5 {
        bail!("--builds must be at least {} (50 grid columns of 100 builds)", BUILDERS_PER_REPO * HISTORY_REPOS * 5);
    }
    if a.workers == 0 || a.slots == 0 || a.fleet_builds == 0 || a.requests == 0 {
        bail!("--workers, --slots, --fleet-builds and --requests must be positive");
    }
    Ok(a)
}

pub fn main(root: &Path, args: &[String]) -> Result<()> {
    let a = parse(args)?;
    // The history writer and the fleet must not be the bottleneck: run them optimised.
    // RBB_SCALE_IN_PLACE=1 runs this build as it is (a quick check of the bench itself).
    if cfg!(debug_assertions) && std::env::var_os("RBB_SCALE_IN_PLACE").is_none() {
        return rerun_in_release(root, "scale", args);
    }
    let bin = std::env::current_exe()?.parent().context("xtask has no directory")?.to_path_buf();
    let work = root.join(".rbb-state/scale");
    std::fs::create_dir_all(&work)?;
    let big = work.join("history");
    let empty = work.join("empty");
    if empty.exists() {
        std::fs::remove_dir_all(&empty)?;
    }
    for log in [empty.with_extension("log"), big.with_extension("log")] {
        let _ = std::fs::remove_file(log);
    }
    let config = fleet_setup(root, &work, &a)?;
    println!("rbb bench scale (release build; each figure next to the same measurement on an empty state dir)\n");

    // 1. The history.
    let facts = history(&big, &a)?;
    println!(
        "history: {} finished builds × {HISTORY_STEPS} steps (and their {} log records), {} builders, {} changes",
        facts.builds,
        facts.builds * HISTORY_STEPS as u64,
        HISTORY_REPOS * BUILDERS_PER_REPO,
        facts.changes
    );
    match facts.write_secs {
        Some(s) => println!(
            "  written through Store::commit in {s:.1} s ({:.0} builds/s, batches of {BATCH_BUILDS}, then one sync)",
            facts.builds as f64 / s
        ),
        None => println!("  reused from an earlier run (--reuse)"),
    }
    let meta = std::fs::metadata(big.join("state.redb"))?;
    // Blocks allocated, not the file's length (redb grows its file ahead of use).
    let size = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    println!(
        "  state.redb {:.1} MiB on disk (file length {:.1} MiB): {:.1} KiB per 1,000 builds\n",
        size as f64 / 1048576.0,
        meta.len() as f64 / 1048576.0,
        size as f64 / 1024.0 / (facts.builds as f64 / 1000.0)
    );

    // 2. The same measurements on an empty state dir, then on the history.
    let base = measure(&bin, &config, &empty, None, &a)?;
    let hist = measure(&bin, &config, &big, Some(&facts), &a)?;
    summary(&a, &facts, size, &base, &hist);
    println!("\nmaster logs: {} and {}", empty.with_extension("log").display(), big.with_extension("log").display());
    Ok(())
}

/// What the history holds, to check the answers against.
#[derive(serde::Serialize, serde::Deserialize)]
struct Facts {
    builds: u64,
    changes: u64,
    failures: u64,
    builder_x: u64,
    write_secs: Option<f64>,
}

fn sha(n: u64) -> String {
    // splitmix64: commit ids that look like commit ids.
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    format!("{:016x}{:016x}{:08x}", mix(n), mix(n ^ 0xaaaa), mix(n ^ 0x5555) as u32)
}

/// Writes the history under `dir` (or reuses it with `--reuse` when it has the same size).
fn history(dir: &Path, a: &Args) -> Result<Facts> {
    let facts_file = dir.join("facts.json");
    if a.reuse
        && let Ok(text) = std::fs::read_to_string(&facts_file)
        && let Ok(f) = serde_json::from_str::<Facts>(&text)
        && f.builds == a.builds
    {
        // A fleet run added builds of its own: drop the state the master made, keep the history.
        return Ok(Facts { write_secs: None, ..f });
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    // The disk may be shared: leave it at least 2 GiB after the history (about 5.6 KiB a build).
    let need = a.builds * 5_800 + (2 << 30);
    if let Some(free) = free_bytes(dir)
        && free < need
    {
        bail!(
            "{} builds need about {:.1} GiB and 2 GiB must stay free; {:.1} GiB is free under {}: use a smaller --builds",
            a.builds,
            (a.builds * 5_800) as f64 / f64::from(1u32 << 30),
            free as f64 / f64::from(1u32 << 30),
            dir.display()
        );
    }
    let store = Store::open(&dir.join("state.redb")).context("opening the history store")?;
    let per_change = BUILDERS_PER_REPO;
    let changes = a.builds / per_change;
    let builds = changes * per_change;
    // Builds happened one minute per change, ending an hour ago.
    let t0 = rbb_master::model::now_ms().saturating_sub(3_600_000 + changes * 60_000);
    let mut facts = Facts { builds, changes, failures: 0, builder_x: 0, write_secs: None };
    let start = Instant::now();
    let mut c = 0;
    while c < changes {
        let last = (c + BATCH_BUILDS / per_change).min(changes);
        let mut cs = Vec::new();
        let mut bs = Vec::new();
        let mut ls = Vec::new();
        for ch in c..last {
            let change = history_change(ch, t0);
            for k in 0..per_change {
                let id = ch * per_change + k + 1;
                let b = history_build(id, &change, k);
                facts.failures += u64::from(b.result == Some(Outcome::Failure));
                facts.builder_x += u64::from(b.builder == BUILDER_X);
                for s in &b.steps {
                    ls.push(LogRecord {
                        id: s.log_id.unwrap_or(0),
                        build: id,
                        step: s.number,
                        file: rbb_master::logs::LogFiles::file_name(s.log_id.unwrap_or(0)),
                        bytes: s.log_bytes.unwrap_or(0),
                        finished: true,
                        created_at: s.started_at,
                        compressed: false,
                        expired: false,
                    });
                }
                bs.push(b);
            }
            cs.push(change);
        }
        store
            .commit(
                Batch {
                    builds: bs.iter().collect(),
                    logs: ls.iter().collect(),
                    changes: cs.iter().collect(),
                    ..Batch::default()
                },
                Sync::Lazy,
            )
            .context("writing the history")?;
        c = last;
        if (c * per_change).is_multiple_of(100_000) {
            eprintln!("  … {} builds written, {:.0} s", c * per_change, start.elapsed().as_secs_f64());
        }
    }
    store.sync().context("syncing the history")?;
    drop(store);
    facts.write_secs = Some(start.elapsed().as_secs_f64());
    std::fs::write(&facts_file, serde_json::to_string(&facts)?)?;
    Ok(facts)
}

/// Free bytes on the file system holding `dir`, as `df` reports them.
fn free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df").args(["--output=avail", "-B1"]).arg(dir).output().ok()?;
    String::from_utf8(out.stdout).ok()?.lines().nth(1)?.trim().parse().ok()
}

fn history_change(ch: u64, t0: u64) -> ChangeRecord {
    let repo = format!("hrepo{}", ch % HISTORY_REPOS);
    ChangeRecord {
        id: ch + 1,
        repo: repo.clone(),
        branch: "main".to_owned(),
        commit: sha(ch),
        author: format!("Dev {}", ch % 97),
        email: format!("dev{}@example.com", ch % 97),
        time: (t0 / 1000) as i64 + ch as i64 * 60,
        message: format!("{repo}: change {ch}\n\nA change of the synthetic history."),
        files: vec![format!("src/mod{}.rs", ch % 13), "Cargo.toml".to_owned()],
        event: "push".to_owned(),
        source: "poll".to_owned(),
        recorded_at: t0 + ch * 60_000,
        pull_request: None,
    }
}

fn history_build(id: u64, change: &ChangeRecord, k: u64) -> BuildRecord {
    let failed = id % FAIL_EVERY == 7;
    let submitted = change.recorded_at + k;
    let started = submitted + 500;
    let steps: Vec<StepRecord> = (0..HISTORY_STEPS)
        .map(|n| {
            let s0 = started + u64::from(n) * 2_000;
            let (state, result, reason, exit, ran) = match (failed, n) {
                (true, 6) => (State::Finished, Outcome::Failure, "exit code 2".to_owned(), Some(2), true),
                (true, n) if n > 6 => {
                    (State::Finished, Outcome::Skipped, "an earlier step failed".to_owned(), None, false)
                }
                _ => (State::Finished, Outcome::Success, String::new(), Some(0), true),
            };
            StepRecord {
                number: n,
                name: format!("step-{n}"),
                state,
                result: Some(result),
                reason,
                exit_code: exit,
                started_at: ran.then_some(s0),
                finished_at: Some(s0 + 1_900),
                log_id: ran.then_some((id - 1) * u64::from(HISTORY_STEPS) + u64::from(n) + 1),
                log_bytes: ran.then_some(1_000 + (id * 7 + u64::from(n)) % 5_000),
                image_digest: None,
                cache: None,
            }
        })
        .collect();
    BuildRecord {
        id,
        builder: format!("{}/b{k:03}", change.repo),
        repo: change.repo.clone(),
        repo_url: format!("/srv/git/{}", change.repo),
        branch: change.branch.clone(),
        commit: change.commit.clone(),
        plan_hash: "0".repeat(64),
        pipeline_blob: Some(sha(change.id ^ 0xb10b)),
        reason: "push".to_owned(),
        event: "push".to_owned(),
        properties: Default::default(),
        priority: 0,
        state: State::Finished,
        result: Some(if failed { Outcome::Failure } else { Outcome::Success }),
        result_reason: if failed { "step step-6 failed".to_owned() } else { String::new() },
        worker: Some(format!("hw{:03}", id % 200)),
        waits_for: Vec::new(),
        halted: failed,
        cancelled: false,
        attempt: 1,
        worker_losses: 0,
        checked_out: true,
        changes: vec![change.id],
        submitted_at: submitted,
        started_at: Some(started),
        finished_at: Some(started + u64::from(HISTORY_STEPS) * 2_000),
        rebuild_of: None,
        steps,
    }
}

/// The fleet's repository (a real git repository made by the fixture script) and the
/// master config naming it and the simulated workers.
fn fleet_setup(root: &Path, work: &Path, a: &Args) -> Result<PathBuf> {
    let src = work.join("fleet-src");
    std::fs::create_dir_all(src.join(".rbb"))?;
    let mut p = String::from("builders:\n");
    for b in 0..FLEET_BUILDERS {
        let _ = writeln!(p, "  f{b:02}:\n    steps:");
        for s in 0..FLEET_STEPS {
            let _ = writeln!(p, "      - {{ name: s{s}, run: \"true\" }}");
        }
    }
    std::fs::write(src.join(".rbb/pipeline.yaml"), p)?;
    make_repo_from(root, &src, &work.join("fleet"))?;
    let mut c = String::from("repositories:\n  - url: fleet\n    poll_interval: 60s\nworkers:\n");
    for w in 0..a.workers {
        let _ = writeln!(c, "  - name: w{w:03}\n    token: {WORKER_TOKEN}\n    max_steps: {}", a.slots);
    }
    // The bench is the master's only client and forces thousands of builds: no rate limit.
    c.push_str("rate_limits:\n  control: { per_second: 1000000, burst: 1000000 }\n");
    let config = work.join("rbb.yaml");
    std::fs::write(&config, c)?;
    Ok(config)
}

/// A running `rbb master`, stopped with SIGTERM (a clean close: redb need not repair).
pub(crate) struct Master {
    pub(crate) child: Child,
    pub(crate) http: String,
    pub(crate) grpc: String,
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).stderr(Stdio::null()).status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the release `rbb` and xtask, then runs `xtask bench <bench> <args>` with them:
/// a bench whose own work (history writer, simulated fleet) must not be the bottleneck.
pub(crate) fn rerun_in_release(root: &Path, bench: &str, args: &[String]) -> Result<()> {
    run(cargo().current_dir(root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "rbb-master",
        "-p",
        "xtask",
        "--bins",
    ]))?;
    let xtask = target_dir(root).join("release/xtask");
    run(Command::new(xtask).args(["bench", bench]).args(args))
}

/// Starts the master and waits for its API to answer: (master, spawn → first answer).
/// The master's log goes to `<state>.log` (shutting the fleet down makes it warn of every
/// session it loses).
/// `rbb master` on `config` and `state` with `args` (its addresses, `--standby`), its
/// stdout piped and its log in `log`.
fn spawn_master(bin: &Path, config: &Path, state: &Path, args: &[&str], log: std::fs::File) -> Result<Child> {
    Command::new(bin.join("rbb"))
        .arg("master")
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .env("RBB_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting rbb master")
}

pub(crate) fn start(bin: &Path, config: &Path, state: &Path) -> Result<(Master, Duration)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.with_extension("log"))
        .context("opening the master's log")?;
    let t = Instant::now();
    let mut child = spawn_master(bin, config, state, &["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"], log)?;
    let (http, grpc) = crate::listening(&mut child)?;
    let m = Master { child, http, grpc };
    loop {
        if get(&m.http, "/api/v2/builds?limit=1").is_ok() {
            return Ok((m, t.elapsed()));
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the master's API did not answer in 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[derive(Default)]
struct Figures {
    start_ms: f64,
    rss_start_mib: f64,
    by_builder: (f64, f64),
    by_failure: (f64, f64),
    grid: (f64, f64),
    grid_cells: usize,
    fleet: Fleet,
    rss_after_mib: f64,
    open_after_stop_ms: f64,
    open_clean_ms: f64,
    /// Start → API answering after the master was killed with SIGKILL.
    restart_after_kill_ms: f64,
    /// The machine's 1-minute load average before and after (the machine is shared).
    load: (f64, f64),
}

pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

#[derive(Default)]
struct Fleet {
    steps_per_s: f64,
    cpu_ms_per_step: f64,
    secs: f64,
    builds: u64,
}

fn measure(bin: &Path, config: &Path, state: &Path, facts: Option<&Facts>, a: &Args) -> Result<Figures> {
    let what = if facts.is_some() { "history" } else { "empty state dir" };
    eprintln!("measuring on the {what}");
    let load_before = loadavg();
    // A first start makes the repository's mirror and stores the plan: not timed.
    drop(start(bin, config, state)?);
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        drop(last.take());
        let (m, t) = start(bin, config, state)?;
        times.push(t.as_secs_f64() * 1000.0);
        last = Some(m);
    }
    let m = last.context("no master")?;
    let mut f = Figures { start_ms: median(times), ..Figures::default() };
    // RSS after a quiet moment (the allocator returns freed pages after a delay).
    std::thread::sleep(Duration::from_secs(2));
    f.rss_start_mib = rss_kib(m.child.id(), "VmRSS:") as f64 / 1024.0;

    let (x_total, fail_total) = facts.map_or((0, 0), |h| (h.builder_x, h.failures));
    f.by_builder = latency(&m.http, &format!("/api/v2/builds?builder={BUILDER_X}&limit=50"), a.requests, |v| {
        check_page(v, x_total, Some(BUILDER_X), None)
    })?;
    f.by_failure = latency(&m.http, "/api/v2/builds?result=FAILURE&order=-id&limit=50", a.requests, |v| {
        check_page(v, fail_total, None, Some("FAILURE"))
    })?;
    let cells_seen = std::sync::atomic::AtomicUsize::new(0);
    f.grid = latency(&m.http, "/api/v2/grid", 20, |v| {
        let (cells, cols) = check_grid(v, facts.is_some())?;
        cells_seen.store(cells, Ordering::Relaxed);
        if facts.is_some() && cols != 50 {
            bail!("the grid has {cols} columns, not 50");
        }
        Ok(())
    })?;
    f.grid_cells = cells_seen.load(Ordering::Relaxed);
    f.fleet = fleet(&m, a)?;
    std::thread::sleep(Duration::from_secs(2));
    f.rss_after_mib = rss_kib(m.child.id(), "VmRSS:") as f64 / 1024.0;
    f.load = (load_before, loadavg());
    // How the master leaves its database: opening it right after a SIGTERM stop, then again
    // after this process closed it cleanly (redb walks the whole file when it was not).
    drop(m);
    let db = state.join("state.redb");
    let t = Instant::now();
    drop(Store::open(&db).context("opening the state after the master stopped")?);
    f.open_after_stop_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    drop(Store::open(&db).context("opening the state again")?);
    f.open_clean_ms = t.elapsed().as_secs_f64() * 1000.0;
    // A master killed with SIGKILL, started again: redb opens without walking the file.
    let (mut m, _) = start(bin, config, state)?;
    m.child.kill().context("kill -9 of the master")?;
    m.child.wait()?;
    let (m, t) = start(bin, config, state)?;
    f.restart_after_kill_ms = t.as_secs_f64() * 1000.0;
    drop(m);
    Ok(f)
}

/// Checks the grid: every column of the history holds one build of each of its
/// repository's builders, and the history's builders are all rows. (cells, columns).
fn check_grid(v: &Value, history: bool) -> Result<(usize, usize)> {
    let cols = v["columns"].as_array().context("no columns in the grid")?;
    let cells = v["cells"].as_object().context("no cells in the grid")?;
    let rows = v["builders"].as_array().map_or(0, Vec::len);
    if history && rows < (HISTORY_REPOS * BUILDERS_PER_REPO) as usize {
        bail!("the grid has {rows} builders, not at least {}", HISTORY_REPOS * BUILDERS_PER_REPO);
    }
    let mut total = 0;
    for c in cols {
        let commit = c["commit"].as_str().context("column without commit")?;
        let n = cells.values().filter(|r| r.get(commit).is_some()).count();
        if c["repo"].as_str().is_some_and(|r| r.starts_with("hrepo")) && n != BUILDERS_PER_REPO as usize {
            bail!("the grid's column {commit} has {n} cells, not {BUILDERS_PER_REPO}");
        }
        total += n;
    }
    Ok((total, cols.len()))
}

/// Checks a list page: its total, its size and that every build matches the filter.
fn check_page(v: &Value, total: u64, builder: Option<&str>, result: Option<&str>) -> Result<()> {
    let builds = v["builds"].as_array().context("no builds in the answer")?;
    let got = v["meta"]["total"].as_u64();
    if got != Some(total) {
        bail!("meta.total is {got:?}, not {total}");
    }
    if builds.len() as u64 != total.min(50) {
        bail!("{} builds in the page, not {}", builds.len(), total.min(50));
    }
    for b in builds {
        if builder.is_some_and(|x| b["builder"] != x) || result.is_some_and(|r| b["result"] != r) {
            bail!("build {} does not match the filter", b["id"]);
        }
    }
    let ids: Vec<u64> = builds.iter().filter_map(|b| b["id"].as_u64()).collect();
    if ids.windows(2).any(|w| w[0] <= w[1]) {
        bail!("the page is not newest first");
    }
    Ok(())
}

/// Times `n` GETs of `path` (one connection each, as a browser's first request): (p50, p99)
/// in ms. Each answer is checked.
fn latency(http: &str, path: &str, n: usize, check: impl Fn(&Value) -> Result<()>) -> Result<(f64, f64)> {
    check(&get(http, path)?).with_context(|| format!("GET {path}"))?;
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        let v = get(http, path)?;
        t.push(s.elapsed().as_secs_f64() * 1000.0);
        check(&v).with_context(|| format!("GET {path}"))?;
    }
    t.sort_by(f64::total_cmp);
    let pct = |p: f64| t[((t.len() as f64 * p).ceil() as usize).clamp(1, t.len()) - 1];
    Ok((pct(0.50), pct(0.99)))
}

/// utime + stime of a process, in milliseconds.
pub(crate) fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    Ok(ticks as f64 * 1000.0 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// What the simulated workers saw.
#[derive(Default)]
struct Seen {
    steps: AtomicU64,
    builds: AtomicU64,
    /// Builds the master said ended (each must end once).
    ended: std::sync::Mutex<std::collections::HashSet<u64>>,
    connected: AtomicU64,
    /// Anything a fleet that only succeeds must never get (a Cancel, a stream error).
    wrong: std::sync::Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// Runs `a.fleet_builds` builds on `a.workers` simulated workers: (steps/s, CPU per step).
fn fleet(m: &Master, a: &Args) -> Result<Fleet> {
    fleet_through(m, None, a)
}

/// [`fleet`], every other worker attached to `standby` (a master waiting on the same
/// PostgreSQL state, forwarding to `m`); CPU is both masters'.
fn fleet_through(m: &Master, standby: Option<&Master>, a: &Args) -> Result<Fleet> {
    let seen = Arc::new(Seen::default());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    for w in 0..a.workers {
        let seen = seen.clone();
        let grpc = match standby {
            Some(s) if w % 2 == 1 => s.grpc.clone(),
            _ => m.grpc.clone(),
        };
        let slots = a.slots;
        rt.spawn(async move {
            let name = format!("w{w:03}");
            if let Err(e) = worker(&grpc, &name, slots, &seen).await
                && !seen.stop.load(Ordering::Acquire)
            {
                seen.wrong.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{name}: {e:#}"));
            }
        });
    }
    let t = Instant::now();
    while seen.connected.load(Ordering::Acquire) < u64::from(a.workers) {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{} of {} workers connected in 60 s", seen.connected.load(Ordering::Acquire), a.workers);
        }
        check_wrong(&seen)?;
        std::thread::sleep(Duration::from_millis(5));
    }
    let pids: Vec<u32> = std::iter::once(m.child.id()).chain(standby.map(|s| s.child.id())).collect();
    let cpu_all = || -> Result<f64> { pids.iter().map(|p| cpu_ms(*p)).sum() };
    let cpu0 = cpu_all()?;
    let cap = u64::from(a.workers) * u64::from(a.slots) + a.queue;
    // With --fleet-secs, builds are forced until that time is up: the count is known after.
    let timed = a.fleet_secs > 0;
    let mut want = if timed { u64::MAX } else { a.fleet_builds };
    let mut total_steps = want.saturating_mul(u64::from(FLEET_STEPS));
    let mut forced: Vec<u64> = Vec::with_capacity(a.fleet_builds as usize);
    // (elapsed s, steps done) samples, for the sustained rate between 10% and 90%.
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let t = Instant::now();
    loop {
        let done = seen.builds.load(Ordering::Acquire);
        if timed && want == u64::MAX && t.elapsed().as_secs() >= a.fleet_secs {
            want = forced.len() as u64;
            total_steps = want * u64::from(FLEET_STEPS);
        }
        while (forced.len() as u64) < want && (forced.len() as u64).saturating_sub(done) < cap {
            let builder = format!("fleet/f{:02}", forced.len() % FLEET_BUILDERS);
            forced.push(force(&m.http, &builder)?);
        }
        let steps = seen.steps.load(Ordering::Acquire);
        samples.push((t.elapsed().as_secs_f64(), steps));
        if done >= want {
            break;
        }
        check_wrong(&seen)?;
        if t.elapsed() > FLEET_LIMIT + Duration::from_secs(a.fleet_secs) {
            bail!("the fleet did {steps} of {total_steps} steps in {} s: stopped", FLEET_LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_all()? - cpu0;
    check_wrong(&seen)?;
    // Nothing is left to finish before the fleet disconnects (a disconnect would lose it).
    let unfinished = || -> Result<u64> {
        let running = get(&m.http, "/api/v2/builds?state=running&limit=1")?["meta"]["total"].as_u64().unwrap_or(0);
        let queued = get(&m.http, "/api/v2/buildrequests?limit=1")?["meta"]["total"].as_u64().unwrap_or(0);
        Ok(running + queued)
    };
    let t_end = Instant::now();
    while unfinished()? > 0 {
        if t_end.elapsed() > Duration::from_secs(60) {
            bail!("{} builds still unfinished 60 s after the fleet saw every build end", unfinished()?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    seen.stop.store(true, Ordering::Release);
    rt.shutdown_timeout(Duration::from_secs(5));
    check_wrong(&seen)?;
    let steps = seen.steps.load(Ordering::Acquire);
    let at = |frac: f64| samples.iter().find(|(_, s)| *s as f64 >= frac * total_steps as f64).copied();
    let sustained = match (at(0.1), at(0.9)) {
        (Some((t1, s1)), Some((t2, s2))) if t2 > t1 => (s2 - s1) as f64 / (t2 - t1),
        _ => steps as f64 / secs,
    };
    check_fleet_results(&m.http, &forced)?;
    eprintln!("  fleet: {} builds, {steps} steps in {secs:.1} s, all SUCCESS (checked through the API)", forced.len());
    Ok(Fleet { steps_per_s: sustained, cpu_ms_per_step: cpu / steps as f64, secs, builds: forced.len() as u64 })
}

fn check_wrong(seen: &Seen) -> Result<()> {
    let wrong = seen.wrong.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = wrong.first() {
        bail!("the bench stopped: {w} ({} such events)", wrong.len());
    }
    Ok(())
}

/// Every forced build finished SUCCESS with each step SUCCESS, read back page by page (a
/// worker counts a build done when it sends its last result: the master may still be
/// recording it, so unfinished builds are read again, for a minute at most).
fn check_fleet_results(http: &str, forced: &[u64]) -> Result<()> {
    let want: BTreeSet<u64> = forced.iter().copied().collect();
    let t = Instant::now();
    loop {
        let mut finished = BTreeSet::new();
        let mut offset = 0;
        loop {
            let v = get(http, &format!("/api/v2/builds?repo=fleet&order=id&limit=1000&offset={offset}"))?;
            let page = v["builds"].as_array().context("no builds in the answer")?;
            if page.is_empty() {
                break;
            }
            for b in page {
                let id = b["id"].as_u64().context("build id")?;
                if !want.contains(&id) || b["state"] != "finished" {
                    continue;
                }
                if let Some(why) = not_success(b) {
                    bail!("the bench stopped: {why}; its figures would be meaningless");
                }
                finished.insert(id);
            }
            offset += page.len();
        }
        if finished == want {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{} of the {} forced builds finished", finished.len(), want.len());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One simulated worker: a real gRPC session that answers each lease at once.
async fn worker(grpc: &str, name: &str, slots: u32, seen: &Seen) -> Result<()> {
    use tokio_stream::wrappers::ReceiverStream;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?.connect().await?;
    let mut client = proto::worker_client::WorkerClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel::<WorkerMessage>(1024);
    let hello = proto::Hello {
        name: name.to_owned(),
        labels: Vec::new(),
        max_steps: slots,
        platform: "linux/x86_64".to_owned(),
        version: "scale-bench".to_owned(),
        ..Default::default()
    };
    tx.send(WorkerMessage { msg: Some(Msg::Hello(hello)) }).await?;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert("rbb-protocol", proto::PROTOCOL_VERSION.parse()?);
    req.metadata_mut().insert("rbb-worker", name.parse()?);
    req.metadata_mut().insert("authorization", format!("Bearer {WORKER_TOKEN}").parse()?);
    let mut inbound = client.session(req).await?.into_inner();
    while let Some(MasterMessage { msg }) = inbound.message().await? {
        match msg {
            Some(master_message::Msg::Welcome(w)) => {
                seen.connected.fetch_add(1, Ordering::AcqRel);
                let tx = tx.clone();
                let every = Duration::from_millis(u64::from(w.heartbeat_interval_ms.max(50)));
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tick.tick().await;
                        let hb = proto::Heartbeat { sent_unix_ms: rbb_master::model::now_ms() };
                        if tx.send(WorkerMessage { msg: Some(Msg::Heartbeat(hb)) }).await.is_err() {
                            break;
                        }
                    }
                });
            }
            Some(master_message::Msg::Lease(l)) => {
                tx.send(WorkerMessage { msg: Some(Msg::Started(proto::StepStarted { lease: l.lease })) }).await?;
                let done = proto::StepFinished {
                    lease: l.lease,
                    result: proto::StepResult::Success as i32,
                    exit_code: Some(0),
                    reason: String::new(),
                    duration_ms: 0,
                    ..Default::default()
                };
                tx.send(WorkerMessage { msg: Some(Msg::Finished(done)) }).await?;
                seen.steps.fetch_add(1, Ordering::AcqRel);
            }
            // A build is done once the master says so (its result durable): a result only
            // sent could still be lost when the fleet disconnects.
            Some(master_message::Msg::Ended(e)) => {
                if !seen.ended.lock().unwrap_or_else(|p| p.into_inner()).insert(e.build) {
                    seen.wrong.lock().unwrap_or_else(|p| p.into_inner()).push(format!("build {} ended twice", e.build));
                }
                seen.builds.fetch_add(1, Ordering::AcqRel);
            }
            Some(master_message::Msg::Cancel(c)) => {
                bail!("lease {} was cancelled: {}", c.lease, c.reason);
            }
            None => {}
        }
    }
    if seen.stop.load(Ordering::Acquire) {
        return Ok(());
    }
    bail!("the master closed the session")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn summary(a: &Args, facts: &Facts, size: u64, e: &Figures, h: &Figures) {
    let verdict = |target: &str, ok: bool| match (target.is_empty(), ok) {
        (true, _) => "",
        (false, true) => "meets",
        (false, false) => "MISSES",
    };
    let fleet_runs = if a.fleet_secs > 0 {
        format!("builds for {} s ({} on the history)", a.fleet_secs, h.fleet.builds)
    } else {
        format!("{} builds", a.fleet_builds)
    };
    println!(
        "\nsummary: history of {} builds; fleet of {} workers × {} slots, {fleet_runs} × {FLEET_STEPS} steps, {} queued beyond the slots",
        facts.builds, a.workers, a.slots, a.queue
    );
    println!("{:<46} {:>12} {:>12} {:>12}  verdict", "figure", "history", "empty", "target");
    let row = |name: &str, hv: String, ev: String, target: &str, ok: bool| {
        println!("{name:<46} {hv:>12} {ev:>12} {target:>12}  {}", verdict(target, ok));
    };
    row(
        "master start → API answering",
        format!("{:.0} ms", h.start_ms),
        format!("{:.0} ms", e.start_ms),
        "≤ 1000 ms",
        h.start_ms <= 1000.0,
    );
    row(
        "master RSS after start",
        format!("{:.1} MiB", h.rss_start_mib),
        format!("{:.1} MiB", e.rss_start_mib),
        "≤ 64 MiB",
        h.rss_start_mib <= 64.0,
    );
    row(
        &format!("builds?builder=X&limit=50 p50 ({} req)", a.requests),
        format!("{:.2} ms", h.by_builder.0),
        format!("{:.2} ms", e.by_builder.0),
        "",
        true,
    );
    row(
        "builds?builder=X&limit=50 p99",
        format!("{:.2} ms", h.by_builder.1),
        format!("{:.2} ms", e.by_builder.1),
        "≤ 10 ms",
        h.by_builder.1 <= 10.0,
    );
    row(
        "builds?result=FAILURE&order=-id p50",
        format!("{:.2} ms", h.by_failure.0),
        format!("{:.2} ms", e.by_failure.0),
        "",
        true,
    );
    row(
        "builds?result=FAILURE&order=-id p99",
        format!("{:.2} ms", h.by_failure.1),
        format!("{:.2} ms", e.by_failure.1),
        "≤ 10 ms",
        h.by_failure.1 <= 10.0,
    );
    row(
        &format!("grid 1,000 builders × 50 commits p50 ({} cells)", h.grid_cells),
        format!("{:.1} ms", h.grid.0),
        format!("{:.1} ms", e.grid.0),
        "≤ 100 ms",
        h.grid.0 <= 100.0,
    );
    row("grid max of 20", format!("{:.1} ms", h.grid.1), format!("{:.1} ms", e.grid.1), "", true);
    row(
        "fleet: steps finished per second",
        format!("{:.0}/s", h.fleet.steps_per_s),
        format!("{:.0}/s", e.fleet.steps_per_s),
        "",
        true,
    );
    row(
        "fleet: step transitions/s (started+finished)",
        format!("{:.0}/s", 2.0 * h.fleet.steps_per_s),
        format!("{:.0}/s", 2.0 * e.fleet.steps_per_s),
        "≥ 2000/s",
        2.0 * h.fleet.steps_per_s >= 2000.0,
    );
    row(
        "fleet: master CPU per step",
        format!("{:.3} ms", h.fleet.cpu_ms_per_step),
        format!("{:.3} ms", e.fleet.cpu_ms_per_step),
        "",
        true,
    );
    let ratio = h.fleet.cpu_ms_per_step / e.fleet.cpu_ms_per_step.max(1e-9);
    row("dispatch cost per step, history / empty", format!("{ratio:.2}"), "1.00".to_owned(), "≤ 1.2", ratio <= 1.2);
    row("fleet: wall time", format!("{:.1} s", h.fleet.secs), format!("{:.1} s", e.fleet.secs), "", true);
    row(
        "master RSS after the fleet",
        format!("{:.1} MiB", h.rss_after_mib),
        format!("{:.1} MiB", e.rss_after_mib),
        "≤ 64 MiB",
        h.rss_after_mib <= 64.0,
    );
    row(
        "store open after the master's SIGTERM stop",
        format!("{:.0} ms", h.open_after_stop_ms),
        format!("{:.0} ms", e.open_after_stop_ms),
        "",
        true,
    );
    row(
        "store open after a clean close",
        format!("{:.0} ms", h.open_clean_ms),
        format!("{:.0} ms", e.open_clean_ms),
        "",
        true,
    );
    row(
        "master start → API after a kill -9",
        format!("{:.0} ms", h.restart_after_kill_ms),
        format!("{:.0} ms", e.restart_after_kill_ms),
        "≤ 1000 ms",
        h.restart_after_kill_ms <= 1000.0,
    );
    row(
        "machine load (1-min loadavg) before → after",
        format!("{:.1} → {:.1}", h.load.0, h.load.1),
        format!("{:.1} → {:.1}", e.load.0, e.load.1),
        "",
        true,
    );
    let per_k = size as f64 / 1024.0 / (facts.builds as f64 / 1000.0);
    row("state size per 1,000 builds (10 steps)", format!("{per_k:.0} KiB"), "-".to_owned(), "", true);
    if let Some(s) = facts.write_secs {
        row("history write time", format!("{s:.0} s"), "-".to_owned(), "minutes", s <= 1800.0);
    }
    let _ = (h.fleet.builds, e.fleet.builds);
}

/// `cargo xtask bench postgres`: the same simulated fleet against a master whose state is a
/// redb file and one whose state is a PostgreSQL database (a throwaway cluster with the
/// server's default durability, on this machine), in the same run: step transitions per
/// second, master CPU per step, and trigger → first step of builds forced one at a time.
pub fn postgres_main(root: &Path, args: &[String]) -> Result<()> {
    if cfg!(debug_assertions) && std::env::var_os("RBB_SCALE_IN_PLACE").is_none() {
        return rerun_in_release(root, "postgres", args);
    }
    let mut a = Args {
        builds: 0,
        fleet_builds: 2_000,
        workers: 50,
        slots: 4,
        queue: 200,
        requests: 0,
        reuse: false,
        fleet_secs: 0,
    };
    let mut latency_builds = 100;
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        let n: u64 = v.replace('_', "").parse().with_context(|| format!("{k} {v}: not a number"))?;
        match k.as_str() {
            "--fleet-builds" => a.fleet_builds = n,
            "--workers" => a.workers = n as u32,
            "--latency-builds" => latency_builds = n,
            _ => bail!("unknown option {k}; options: --fleet-builds N --workers N --latency-builds N"),
        }
    }
    let bin = std::env::current_exe()?.parent().context("xtask has no directory")?.to_path_buf();
    let work = root.join(".rbb-state/bench-postgres");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let config = fleet_setup(root, &work, &a)?;
    let cluster = crate::postgres::Cluster::start_durable()?;
    let pg_config = work.join("rbb-postgres.yaml");
    std::fs::write(&pg_config, format!("{}state: {}\n", std::fs::read_to_string(&config)?, cluster.url))?;
    println!(
        "rbb bench postgres (release build; {} simulated workers × {} slots; PostgreSQL {} on this machine, fsync on)\n",
        a.workers, a.slots, cluster.url
    );
    let mut rows = Vec::new();
    for (name, cfg) in [("redb", &config), ("postgres", &pg_config)] {
        let state = work.join(name);
        let (m, started) = start(&bin, cfg, &state)?;
        let latency = first_step_latency(&m, latency_builds)?;
        let load0 = loadavg();
        let f = fleet(&m, &a)?;
        rows.push((name, started, latency, f, load0, loadavg()));
        drop(m);
    }
    let (_, _, base_lat, base, _, _) = &rows[0];
    println!(
        "{:<9} {:>9} {:>14} {:>14} {:>12} {:>10} {:>7}",
        "state", "start", "first step p50", "first step p99", "transitions/s", "CPU/step", "load"
    );
    for (name, started, lat, f, l0, l1) in &rows {
        println!(
            "{name:<9} {:>7.0}ms {:>12.2}ms {:>12.2}ms {:>13.0} {:>8.2}ms {:>3.1}-{:.1}",
            started.as_secs_f64() * 1000.0,
            lat.0,
            lat.1,
            f.steps_per_s,
            f.cpu_ms_per_step,
            l0,
            l1
        );
    }
    let (_, _, pg_lat, pg, _, _) = &rows[1];
    let two = two_masters(&bin, &work, &config, &cluster.url, &a)?;
    let take = takeover(&bin, &work, &config, &cluster.url)?;
    println!(
        "\npostgres / redb: transitions/s {:.2}×, trigger → first step p50 {:.2}×, master CPU per step {:.2}×",
        pg.steps_per_s / base.steps_per_s,
        pg_lat.0 / base_lat.0.max(0.001),
        pg.cpu_ms_per_step / base.cpu_ms_per_step
    );
    println!(
        "(both masters on this machine, each with the fleet as its only client; every build checked SUCCESS through the API)"
    );
    println!(
        "\ntwo masters on one database (the active one and a standby; every other worker attached to the standby, which forwards):\n  {:.0} transitions/s, {:.2} ms CPU per step (both masters) — {:.2}× one master's transitions/s on PostgreSQL",
        two.steps_per_s,
        two.cpu_ms_per_step,
        two.steps_per_s / pg.steps_per_s
    );
    println!(
        "\ntakeover (an active master and a --standby on one database; a worker attached to the standby's address):\n  kill -9 of the active → the standby listens {:.0} ms, its API answers {:.0} ms, a build forced on it has finished {:.0} ms",
        take.0, take.1, take.2
    );
    println!(
        "  the active master stopped (SIGSTOP; its lease 2 s) → the standby listens {:.0} ms (its API then answers, and the stopped master, continued, exits fenced off)",
        take.3
    );
    Ok(())
}

/// A database of its own on `server` for one part of the bench, and its config.
fn bench_database(work: &Path, config: &Path, server: &str, name: &str) -> Result<PathBuf> {
    let url = rbb_master::store::testing::with_database(server, name);
    rbb_master::store::pg::Pg::connect(server, None)?
        .read_conn()?
        .execute_batch(&format!("CREATE DATABASE {name}"))
        .with_context(|| format!("creating the database {name}"))?;
    let cfg = work.join(format!("{name}.yaml"));
    std::fs::write(&cfg, format!("{}state: {url}\n", std::fs::read_to_string(config)?))?;
    Ok(cfg)
}

/// A second `rbb master` on `config`'s PostgreSQL state while another holds it: a standby,
/// once it says where it forwards; and the lines it prints after that.
fn start_standby(bin: &Path, config: &Path, state: &Path) -> Result<(Master, std::sync::mpsc::Receiver<String>)> {
    use std::io::BufRead;
    let log = std::fs::File::create(state.with_extension("standby.log"))?;
    let mut child = spawn_master(bin, config, state, &["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"], log)?;
    let stdout = child.stdout.take().context("standby stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let line = lines.next().context("the standby printed nothing")??;
    if !line.contains("standby") {
        bail!("the second master is not a standby: {line}");
    }
    let get = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(|a| a.trim_start_matches("http://").to_owned())
            .context("malformed standby line")
    };
    let (http, grpc) = (get("http=")?, get("grpc=")?);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Ok((Master { child, http, grpc }, rx))
}

/// An active master with a 2 s lease stopped (SIGSTOP, as a hung process): ms until the
/// standby listens in its place. The stopped master, continued, must exit fenced off.
fn hung_takeover(bin: &Path, work: &Path, config: &Path, server: &str) -> Result<f64> {
    let cfg = bench_database(work, config, server, "rbb_hung")?;
    let text = std::fs::read_to_string(&cfg)?;
    let (head, url) = text.rsplit_once("state: ").context("a state line")?;
    std::fs::write(&cfg, format!("{head}state:\n  url: {}\n  lease: 2s\n", url.trim()))?;
    let state = work.join("hung");
    let (mut active, _) = start(bin, &cfg, &state)?;
    let (standby, lines) = start_standby(bin, &cfg, &state)?;
    let signal = |sig: &str| Command::new("kill").arg(format!("-{sig}")).arg(active.child.id().to_string()).status();
    // A few renewals first: the lease is held, not merely taken.
    std::thread::sleep(Duration::from_secs(1));
    signal("STOP")?;
    let stopped = Instant::now();
    let line = lines.recv_timeout(Duration::from_secs(60)).context("the standby did not take over in 60 s")?;
    let took = stopped.elapsed();
    if !line.contains("listening") {
        bail!("the standby said {line:?}");
    }
    get(&standby.http, "/api/v2/builds?limit=1").context("the new active master's API")?;
    signal("CONT")?;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = active.child.try_wait()? {
            break s;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the stopped master, continued, did not stop in 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if status.success() {
        bail!("the fenced master exited 0");
    }
    drop(standby);
    Ok(took.as_secs_f64() * 1000.0)
}

/// The fleet against two masters on one database: half the workers through the standby.
fn two_masters(bin: &Path, work: &Path, config: &Path, server: &str, a: &Args) -> Result<Fleet> {
    let cfg = bench_database(work, config, server, "rbb_two")?;
    let state = work.join("two");
    let (active, _) = start(bin, &cfg, &state)?;
    let (standby, _) = start_standby(bin, &cfg, &state)?;
    let f = fleet_through(&active, Some(&standby), a);
    // The standby first: stopping the active one would hand it the state.
    drop(standby);
    drop(active);
    f
}

/// Builds forced one at a time on one simulated worker: the force request sent → the first
/// step's lease received by the worker (measured here, in µs), p50 and p99 in ms.
fn first_step_latency(m: &Master, n: u64) -> Result<(f64, f64)> {
    let seen = Arc::new(Seen::default());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    {
        let (seen, grpc) = (seen.clone(), m.grpc.clone());
        rt.spawn(async move {
            if let Err(e) = worker(&grpc, "w000", 4, &seen).await
                && !seen.stop.load(Ordering::Acquire)
            {
                seen.wrong.lock().unwrap_or_else(|p| p.into_inner()).push(format!("w000: {e:#}"));
            }
        });
    }
    let t = Instant::now();
    while seen.connected.load(Ordering::Acquire) < 1 {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the latency worker did not connect in 30 s");
        }
        check_wrong(&seen)?;
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut waits = Vec::new();
    for i in 0..n {
        let steps = seen.steps.load(Ordering::Acquire);
        let t = Instant::now();
        let id = force(&m.http, &format!("fleet/f{:02}", i as usize % FLEET_BUILDERS))?;
        while seen.steps.load(Ordering::Acquire) == steps {
            check_wrong(&seen)?;
            if t.elapsed() > Duration::from_secs(30) {
                bail!("build {id}'s first step was not leased in 30 s");
            }
            std::hint::spin_loop();
        }
        waits.push(t.elapsed().as_secs_f64() * 1000.0);
        while seen.builds.load(Ordering::Acquire) < i + 1 {
            check_wrong(&seen)?;
            if t.elapsed() > Duration::from_secs(30) {
                bail!("build {id} did not end in 30 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let b = get(&m.http, &format!("/api/v2/builds/{id}"))?;
        if let Some(why) = crate::runs::not_success(&b) {
            bail!("build {id} did not succeed: {why}");
        }
    }
    seen.stop.store(true, Ordering::Release);
    rt.shutdown_timeout(Duration::from_secs(5));
    waits.sort_by(f64::total_cmp);
    let p = |q: f64| waits[((waits.len() - 1) as f64 * q).round() as usize];
    Ok((p(0.5), p(0.99)))
}

/// An active master and a standby on one database, a simulated worker attached to the
/// standby's gRPC address: after a `kill -9` of the active master, (ms until the standby
/// listens, until its API answers, until a build forced on it finished).
fn takeover(bin: &Path, work: &Path, config: &Path, server: &str) -> Result<(f64, f64, f64, f64)> {
    let hung = hung_takeover(bin, work, config, server)?;
    let cfg = bench_database(work, config, server, "rbb_takeover")?;
    let state = work.join("takeover");
    let (mut a, _) = start(bin, &cfg, &state)?;
    let free = || -> Result<String> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string()) };
    let (b_http, b_grpc) = (free()?, free()?);
    let log = std::fs::File::create(work.join("takeover-standby.log"))?;
    let mut b = spawn_master(bin, &cfg, &state, &["--standby", "--http", &b_http, "--grpc", &b_grpc], log)?;
    let result = (|| -> Result<(f64, f64, f64, f64)> {
        let t = Instant::now();
        while get(&b_http, "/api/v2/builds?limit=1").is_err() {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the standby did not forward its API in 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // The worker reconnects whenever its session ends, as rbb-worker does.
        let seen = Arc::new(Seen::default());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        {
            let (seen, grpc) = (seen.clone(), b_grpc.clone());
            rt.spawn(async move {
                while !seen.stop.load(Ordering::Acquire) {
                    let _ = worker(&grpc, "w000", 4, &seen).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
        let done = |n: u64, what: &str| -> Result<()> {
            let t = Instant::now();
            while seen.builds.load(Ordering::Acquire) < n {
                if t.elapsed() > Duration::from_secs(60) {
                    bail!("{what}: no build ended in 60 s");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        };
        let first = force(&b_http, "fleet/f00")?;
        done(1, "through the standby")?;
        if let Some(why) = crate::runs::not_success(&get(&b_http, &format!("/api/v2/builds/{first}"))?) {
            bail!("build {first} did not succeed: {why}");
        }
        let killed = Instant::now();
        let _ = a.child.kill();
        let _ = a.child.wait();
        crate::listening(&mut b)?;
        let listens = killed.elapsed();
        while get(&b_http, "/api/v2/builds?limit=1").is_err() {
            if killed.elapsed() > Duration::from_secs(120) {
                bail!("the standby's API did not answer in 2 minutes after the takeover");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let answers = killed.elapsed();
        let second = force(&b_http, "fleet/f01")?;
        done(2, "after the takeover")?;
        let finished = killed.elapsed();
        if let Some(why) = crate::runs::not_success(&get(&b_http, &format!("/api/v2/builds/{second}"))?) {
            bail!("build {second} did not succeed: {why}");
        }
        seen.stop.store(true, Ordering::Release);
        rt.shutdown_timeout(Duration::from_secs(2));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Ok((ms(listens), ms(answers), ms(finished), hung))
    })();
    let _ = b.kill();
    let _ = b.wait();
    result
}
