//! `cargo xtask soak`: a chaos soak of the real binaries, judged only through the REST API
//! and `/proc`.
//!
//! One release (`--debug`: debug) `rbb master` and four `rbb-worker` processes on loopback run
//! N builds (2,000 by default, `--builds N`) of mixed builders: trivial steps, sleeps, output, and builders
//! whose failures are expected (each with its exact build and step results). Meanwhile workers
//! are killed with SIGKILL and restarted, the master is killed once with SIGKILL and once
//! stopped with SIGTERM, and restarted each time. At the end it checks that every build ended
//! as its builder must (or RETRY, followed by an attempt that did, when its worker or the
//! master was killed while it ran), that nothing is left running (builds, steps, leases,
//! processes) and that the master's RSS came back to what it was after warm-up. It prints the
//! counts and exits non-zero on any violation. It is a program, not a test: it decides
//! nothing about the code beyond what it prints.

use crate::runs::{force, get, rss_kib, str_of};
use crate::{cargo, make_repo_from, run, target_dir};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a SIGTERM-ed process may take to exit.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// How long the processes of a killed worker's step may outlive it.
const ORPHAN_GRACE: Duration = Duration::from_secs(3);
/// Quiet time before RSS is read (mimalloc purges freed memory after a delay).
const SETTLE: Duration = Duration::from_secs(3);
/// Allowed growth of the master's RSS from after warm-up to after the soak.
const RSS_TOLERANCE: f64 = 0.10;

/// A builder of the soak's pipeline with the results it must end with.
struct Kind {
    name: &'static str,
    /// Share of the builds forced.
    weight: u32,
    /// Each step as YAML flow mapping fields, and the step's expected result.
    steps: &'static [(&'static str, &'static str)],
    result: &'static str,
}

const KINDS: &[Kind] = &[
    Kind {
        name: "ok",
        weight: 30,
        steps: &[("run: \"true\"", "SUCCESS"), ("run: \"true\"", "SUCCESS"), ("run: \"true\"", "SUCCESS")],
        result: "SUCCESS",
    },
    Kind {
        name: "sleepy",
        weight: 20,
        steps: &[("run: sleep 0.2", "SUCCESS"), ("run: sleep 0.1", "SUCCESS")],
        result: "SUCCESS",
    },
    Kind {
        name: "chatty",
        weight: 15,
        steps: &[("run: seq 1 20000", "SUCCESS"), ("run: seq 1 2000 >&2", "SUCCESS")],
        result: "SUCCESS",
    },
    Kind { name: "slow", weight: 3, steps: &[("run: sleep 8", "SUCCESS")], result: "SUCCESS" },
    Kind {
        name: "fails",
        weight: 12,
        steps: &[
            ("run: \"true\"", "SUCCESS"),
            ("run: exit 3", "FAILURE"),
            ("run: \"true\"", "SKIPPED"),
            ("run: echo cleanup, always_run: true", "SUCCESS"),
        ],
        result: "FAILURE",
    },
    Kind {
        name: "warns",
        weight: 10,
        steps: &[
            ("run: exit 1, warn_on_failure: true, flunk_on_failure: false, halt_on_failure: false", "FAILURE"),
            ("run: \"true\"", "SUCCESS"),
        ],
        result: "WARNINGS",
    },
    Kind {
        name: "goes_on",
        weight: 10,
        steps: &[("run: \"false\", halt_on_failure: false", "FAILURE"), ("run: \"true\"", "SUCCESS")],
        result: "FAILURE",
    },
];

/// Builders per kind, so several builds of a kind can run at once.
const COPIES: usize = 2;

/// The workers: name and slots.
const WORKERS: &[(&str, u32)] = &[("w0", 1), ("w1", 1), ("w2", 2), ("w3", 2)];

struct Options {
    builds: usize,
    /// Debug binaries instead of release (quicker to build while developing).
    debug: bool,
    seed: u64,
    in_flight: usize,
    /// The state in a throwaway PostgreSQL cluster (fsync on) instead of redb.
    postgres: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options { builds: 2000, debug: false, seed: 0, in_flight: 10, postgres: false };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<u64> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--builds" => o.builds = value("--builds")? as usize,
            "--seed" => o.seed = value("--seed")?,
            "--debug" => o.debug = true,
            "--postgres" => o.postgres = true,
            "--in-flight" => o.in_flight = (value("--in-flight")? as usize).max(1),
            other => {
                bail!(
                    "unknown argument `{other}` (cargo xtask soak [--builds N] [--seed S] [--in-flight K] [--debug] [--postgres])"
                )
            }
        }
    }
    if o.builds < 10 {
        bail!("--builds must be at least 10");
    }
    if o.seed == 0 {
        o.seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
    }
    Ok(o)
}

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Something the soak did to the processes, with when (Unix ms).
#[derive(Clone)]
enum Chaos {
    KillWorker(String),
    KillMaster,
    TermMaster,
}

/// A step process seen in `/proc`.
#[derive(Clone)]
struct StepProc {
    pid: u32,
    start: u64,
    cmdline: String,
    build: String,
    cwd: String,
}

impl std::fmt::Display for StepProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} (build {}, cwd {}): {}", self.pid, self.build, self.cwd, self.cmdline)
    }
}

struct Soak {
    bin: PathBuf,
    dir: PathBuf,
    marker: String,
    http: String,
    grpc: String,
    master: Option<Child>,
    master_runs: u32,
    workers: BTreeMap<String, Option<Child>>,
    /// Workers killed and when each is started again.
    restarts: Vec<(Instant, String)>,
    /// Step processes of killed workers, checked once the grace period is over.
    orphan_checks: Vec<(Instant, String, Vec<StepProc>)>,
    chaos: Vec<(u64, Chaos)>,
    /// Build ids the force answers gave.
    forced: BTreeSet<u64>,
    in_flight: BTreeSet<u64>,
    force_errors: u32,
    /// (class, what): every way the run fell short of the acceptance criteria.
    violations: Vec<(&'static str, String)>,
    notes: Vec<String>,
    rng: Rng,
}

pub fn main(root: &Path, args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let mut build = cargo();
    build.current_dir(root).args(["build", "--quiet", "-p", "rbb-master", "-p", "rbb-worker", "--bins"]);
    if !opts.debug {
        build.arg("--release");
    }
    run(&mut build)?;
    let bin = target_dir(root).join(if opts.debug { "debug" } else { "release" });
    let dir = root.join(".rbb-state/soak");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("logs"))?;
    let marker = format!("soak-{:x}", opts.seed);
    setup(root, &dir, &marker)?;
    // Kept until the soak ends: dropping it stops the cluster.
    let cluster = if opts.postgres { Some(crate::postgres::Cluster::start_durable()?) } else { None };
    if let Some(c) = &cluster {
        let config = dir.join("rbb.yaml");
        std::fs::write(&config, format!("{}state: {}\n", std::fs::read_to_string(&config)?, c.url))?;
    }
    let (http, grpc) = (free_addr()?, free_addr()?);
    let mut soak = Soak {
        bin,
        dir,
        marker,
        http,
        grpc,
        master: None,
        master_runs: 0,
        workers: WORKERS.iter().map(|(w, _)| ((*w).to_owned(), None)).collect(),
        restarts: Vec::new(),
        orphan_checks: Vec::new(),
        chaos: Vec::new(),
        forced: BTreeSet::new(),
        in_flight: BTreeSet::new(),
        force_errors: 0,
        violations: Vec::new(),
        notes: Vec::new(),
        rng: Rng(opts.seed),
    };
    println!(
        "rbb soak: {} builds, {} workers, {} binaries, seed {} (state in {}{})",
        opts.builds,
        WORKERS.len(),
        if opts.debug { "debug" } else { "release" },
        opts.seed,
        soak.dir.display(),
        cluster.as_ref().map(|c| format!(", the store in PostgreSQL at {}", c.url)).unwrap_or_default()
    );
    let outcome = soak.run(&opts);
    // Whatever happened, leave nothing running.
    soak.stop_all();
    if let Err(e) = &outcome {
        soak.violations.push(("the soak could not finish", format!("the soak could not finish: {e:#}")));
    }
    soak.report(&opts)
}

/// Writes the pipeline, the repository and the master config.
fn setup(root: &Path, dir: &Path, marker: &str) -> Result<()> {
    let mut p = String::from("builders:\n");
    for k in KINDS {
        for c in 0..COPIES {
            let _ = writeln!(p, "  {}{c}:\n    env: {{ RBB_SOAK: \"{marker}\" }}\n    steps:", k.name);
            for (i, (fields, _)) in k.steps.iter().enumerate() {
                let _ = writeln!(p, "      - {{ name: s{i}, {fields} }}");
            }
        }
    }
    let src = dir.join("repo-src");
    std::fs::create_dir_all(src.join(".rbb"))?;
    std::fs::write(src.join(".rbb/pipeline.yaml"), p)?;
    make_repo_from(root, &src, &dir.join("repo"))?;
    let mut cfg = String::from("repositories:\n  - url: repo\nworkers:\n");
    for (w, slots) in WORKERS {
        let _ = writeln!(cfg, "  - name: {w}\n    token: t-{w}\n    max_steps: {slots}");
    }
    // The soak is the master's only client and forces builds in bursts: no rate limit.
    cfg.push_str("rate_limits:\n  control: { per_second: 1000000, burst: 1000000 }\n");
    std::fs::write(dir.join("rbb.yaml"), cfg)?;
    Ok(())
}

/// A loopback address nobody listens on now (the master keeps its ports across restarts so
/// that workers find it again).
fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

fn kind_of(builder: &str) -> Option<&'static Kind> {
    let name = builder.rsplit('/').next().unwrap_or(builder).trim_end_matches(|c: char| c.is_ascii_digit());
    KINDS.iter().find(|k| k.name == name)
}

impl Soak {
    fn run(&mut self, o: &Options) -> Result<()> {
        self.start_master()?;
        for w in WORKERS.iter().map(|(w, _)| (*w).to_owned()).collect::<Vec<_>>() {
            self.start_worker(&w)?;
        }
        self.wait_workers(Duration::from_secs(30))?;

        let n = o.builds;
        let kill_master_at = n * 3 / 10;
        let term_master_at = n * 55 / 100;
        let warm_at = n * 7 / 10;
        let worker_kills = (n / 100).max(3);
        let mut kill_points: Vec<usize> =
            (0..worker_kills).map(|_| n / 20 + self.rng.below((n * 9 / 10) as u64) as usize).collect();
        kill_points.sort_unstable();
        let mut kill_points = kill_points.into_iter().peekable();
        let total_weight: u32 = KINDS.iter().map(|k| k.weight).sum();
        let mut warm_rss = None;
        let mut submitted = 0;
        let mut last_poll = Instant::now();
        let started = Instant::now();
        while submitted < n {
            self.tick();
            if submitted == kill_master_at && self.master_runs == 1 {
                self.kill_master()?;
            }
            if submitted == term_master_at && self.master_runs == 2 {
                self.term_master()?;
            }
            if submitted == warm_at && warm_rss.is_none() {
                self.drain(Duration::from_secs(300))?;
                warm_rss = Some(self.idle_rss());
            }
            while kill_points.peek().is_some_and(|p| *p <= submitted) {
                kill_points.next();
                self.kill_worker();
            }
            if last_poll.elapsed() >= Duration::from_millis(50) {
                self.poll_in_flight();
                last_poll = Instant::now();
            }
            if self.in_flight.len() < o.in_flight {
                let mut pick = self.rng.below(u64::from(total_weight)) as u32;
                let kind = KINDS
                    .iter()
                    .find(|k| {
                        if pick < k.weight {
                            true
                        } else {
                            pick -= k.weight;
                            false
                        }
                    })
                    .unwrap_or(&KINDS[0]);
                let builder = format!("repo/{}{}", kind.name, self.rng.below(COPIES as u64));
                match force(&self.http, &builder) {
                    Ok(id) => {
                        self.forced.insert(id);
                        self.in_flight.insert(id);
                        submitted += 1;
                        if submitted % (n / 10).max(1) == 0 {
                            println!("  {submitted} builds forced ({:.0} s)", started.elapsed().as_secs_f64());
                        }
                    }
                    Err(_) => {
                        self.force_errors += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.drain(Duration::from_secs(600))?;
        println!("  all builds finished ({:.0} s)", started.elapsed().as_secs_f64());
        // Killed workers come back before the end is judged.
        while !self.restarts.is_empty() || !self.orphan_checks.is_empty() {
            self.tick();
            std::thread::sleep(Duration::from_millis(20));
        }
        self.wait_workers(Duration::from_secs(30))?;
        let end_rss = self.idle_rss();
        if let Some(warm) = warm_rss {
            let limit = warm as f64 * (1.0 + RSS_TOLERANCE);
            let line = format!(
                "master RSS: {:.1} MiB after warm-up, {:.1} MiB after the soak ({:+.1}%; limit +{:.0}%)",
                warm as f64 / 1024.0,
                end_rss as f64 / 1024.0,
                (end_rss as f64 / warm.max(1) as f64 - 1.0) * 100.0,
                RSS_TOLERANCE * 100.0
            );
            if end_rss as f64 > limit {
                self.violations.push(("master RSS grew", line));
            } else {
                self.notes.push(line);
            }
        }
        self.check_api()?;
        let left = self.step_processes(None);
        for p in &left {
            self.violations
                .push(("step process left running", format!("step process left running after the soak: {p}")));
        }
        Ok(())
    }

    // ---- processes -------------------------------------------------------------------

    fn start_master(&mut self) -> Result<()> {
        self.master_runs += 1;
        let log = std::fs::File::create(self.dir.join(format!("logs/master-{}.log", self.master_runs)))?;
        let mut child = Command::new(self.bin.join("rbb"))
            .args(["master", "--http", &self.http, "--grpc", &self.grpc])
            .arg("--config")
            .arg(self.dir.join("rbb.yaml"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .current_dir(&self.dir)
            .env("RBB_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting rbb master")?;
        crate::listening(&mut child).with_context(|| {
            format!("master run {} did not start (see logs/master-{}.log)", self.master_runs, self.master_runs)
        })?;
        self.master = Some(child);
        Ok(())
    }

    fn start_worker(&mut self, name: &str) -> Result<()> {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("logs/{name}.log")))?;
        let slots = WORKERS.iter().find(|(w, _)| *w == name).map_or(1, |(_, s)| *s);
        let child = Command::new(self.bin.join("rbb-worker"))
            .args(["--master", &format!("http://{}", self.grpc), "--name", name, "--token", &format!("t-{name}")])
            .args(["--max-steps", &slots.to_string()])
            .arg("--workdir")
            .arg(self.dir.join("work").join(name))
            .current_dir(&self.dir)
            .env("RBB_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting rbb-worker {name}"))?;
        self.workers.insert(name.to_owned(), Some(child));
        Ok(())
    }

    fn wait_workers(&mut self, limit: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            let ok = get(&self.http, "/api/v2/workers").ok().is_some_and(|v| {
                v["workers"].as_array().is_some_and(|ws| {
                    ws.len() == WORKERS.len() && ws.iter().all(|w| w["connected"] == true && w["running"] == 0)
                })
            });
            if ok {
                return Ok(());
            }
            if t.elapsed() > limit {
                let state = get(&self.http, "/api/v2/workers").map(|v| v.to_string()).unwrap_or_default();
                bail!("the workers are not all connected and idle after {} s: {state}", limit.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills a worker with SIGKILL and schedules its restart and the check that its steps
    /// died with it. It prefers a worker running a `slow` step (a step that would outlive the
    /// grace period if orphaned), then any busy worker.
    fn kill_worker(&mut self) {
        let listed =
            get(&self.http, "/api/v2/workers").ok().and_then(|v| v["workers"].as_array().cloned()).unwrap_or_default();
        // A build lost three times ends EXCEPTION by design: a worker running an attempt that
        // already lost its worker is spared, so every kill tests recovery, not the give-up.
        let spared: BTreeSet<String> = listed
            .iter()
            .filter(|w| {
                w["current"].as_array().is_some_and(|c| {
                    c.iter().any(|s| {
                        get(&self.http, &format!("/api/v2/builds/{}", s["build"]))
                            .is_ok_and(|b| str_of(&b["reason"]).starts_with("retry of"))
                    })
                })
            })
            .map(|w| str_of(&w["name"]).to_owned())
            .collect();
        let alive = |w: &&Value| {
            let name = str_of(&w["name"]);
            self.workers.get(name).is_some_and(Option::is_some) && !spared.contains(name)
        };
        let names = |f: &dyn Fn(&Value) -> bool| -> Vec<String> {
            listed.iter().filter(alive).filter(|w| f(w)).map(|w| str_of(&w["name"]).to_owned()).collect()
        };
        let slow = names(&|w| {
            w["current"].as_array().is_some_and(|c| c.iter().any(|s| str_of(&s["builder"]).contains("/slow")))
        });
        let busy = names(&|w| w["running"].as_u64().unwrap_or(0) > 0);
        let idle: Vec<String> =
            self.workers.iter().filter(|(w, c)| c.is_some() && !spared.contains(*w)).map(|(w, _)| w.clone()).collect();
        let pool = [slow, busy, idle].into_iter().find(|p| !p.is_empty()).unwrap_or_default();
        if pool.is_empty() {
            return;
        }
        let name = pool[self.rng.below(pool.len() as u64) as usize].clone();
        let procs = self.step_processes(Some(&name));
        self.chaos.push((now_ms(), Chaos::KillWorker(name.clone())));
        if let Some(Some(mut child)) = self.workers.insert(name.clone(), None) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let now = Instant::now();
        self.orphan_checks.push((now + ORPHAN_GRACE, name.clone(), procs));
        let delay = Duration::from_millis(100 + self.rng.below(1400));
        self.restarts.push((now + delay, name));
    }

    fn kill_master(&mut self) -> Result<()> {
        println!("  kill -9 of the master");
        self.chaos.push((now_ms(), Chaos::KillMaster));
        if let Some(mut m) = self.master.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
        self.start_master()
    }

    fn term_master(&mut self) -> Result<()> {
        println!("  SIGTERM to the master, then a restart");
        if let Some(m) = self.master.take() {
            self.chaos.push((now_ms(), Chaos::TermMaster));
            match self.terminate(m, "master") {
                Ok(took) => self.notes.push(format!("master exited {:.1} s after SIGTERM", took.as_secs_f64())),
                Err(e) => self.violations.push(("SIGTERM restart", format!("SIGTERM restart: {e}"))),
            }
        }
        self.start_master()
    }

    /// Sends SIGTERM and waits; after `STOP_LIMIT` the process is killed and that is an error.
    fn terminate(&self, mut child: Child, what: &str) -> Result<Duration> {
        let t = Instant::now();
        run(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("{what} exited with {status} after SIGTERM");
                }
                return Ok(t.elapsed());
            }
            if t.elapsed() > STOP_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{what} still running {} s after SIGTERM (killed)", STOP_LIMIT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Restarts killed workers that are due and checks orphans whose grace period is over.
    fn tick(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self.restarts.iter().filter(|(t, _)| *t <= now).map(|(_, w)| w.clone()).collect();
        self.restarts.retain(|(t, _)| *t > now);
        for w in due {
            if let Err(e) = self.start_worker(&w) {
                self.violations.push(("worker restart failed", format!("restarting worker {w}: {e:#}")));
            }
        }
        let checks: Vec<(String, Vec<StepProc>)> =
            self.orphan_checks.iter().filter(|(t, _, _)| *t <= now).map(|(_, w, p)| (w.clone(), p.clone())).collect();
        self.orphan_checks.retain(|(t, _, _)| *t > now);
        for (w, procs) in checks {
            for p in procs.into_iter().filter(|p| proc_start(p.pid) == Some(p.start)) {
                self.violations.push((
                    "step outlived its killed worker",
                    format!("step process of killed worker {w} still running {} s later: {p}", ORPHAN_GRACE.as_secs()),
                ));
            }
        }
    }

    /// Forgets finished builds of the in-flight set.
    fn poll_in_flight(&mut self) {
        let ids: Vec<u64> = self.in_flight.iter().copied().collect();
        for id in ids {
            match get(&self.http, &format!("/api/v2/builds/{id}")) {
                Ok(b) if b["state"] == "finished" => {
                    self.in_flight.remove(&id);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    /// Waits until no build is pending or running.
    fn drain(&mut self, limit: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            self.tick();
            let open = get(&self.http, "/api/v2/builds?state__ne=finished&limit=20").ok();
            if let Some(v) = &open
                && v["meta"]["total"] == 0
            {
                self.in_flight.clear();
                return Ok(());
            }
            if t.elapsed() > limit {
                let ids: Vec<String> = open
                    .as_ref()
                    .and_then(|v| v["builds"].as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .map(|b| format!("{} {} {}", b["id"], str_of(&b["builder"]), str_of(&b["state"])))
                    .collect();
                bail!("builds still open after {} s: {}", limit.as_secs(), ids.join(", "));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn idle_rss(&self) -> u64 {
        std::thread::sleep(SETTLE);
        self.master.as_ref().map_or(0, |m| rss_kib(m.id(), "VmRSS:"))
    }

    /// Processes of the soak's steps: the pipeline's marker in their environment, or a
    /// working directory under a worker's directory (`only`: that worker's).
    fn step_processes(&self, only: Option<&str>) -> Vec<StepProc> {
        let work = self.dir.join("work");
        let prefix = match only {
            Some(w) => work.join(w),
            None => work,
        };
        let needle = format!("RBB_SOAK={}", self.marker);
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else { return out };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
            let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
            let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
            let marked = vars.contains(&needle.as_bytes());
            let under = cwd.starts_with(&prefix);
            if !(under || (only.is_none() && marked)) {
                continue;
            }
            let build = vars
                .iter()
                .find_map(|v| v.strip_prefix(b"RBB_BUILD_ID="))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| "?".to_owned());
            let cmdline = std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim().to_owned())
                .unwrap_or_default();
            let Some(start) = proc_start(pid) else { continue };
            out.push(StepProc { pid, start, cmdline, build, cwd: cwd.display().to_string() });
        }
        out
    }

    fn stop_all(&mut self) {
        let names: Vec<String> = self.workers.keys().cloned().collect();
        for w in names {
            if let Some(Some(child)) = self.workers.insert(w.clone(), None)
                && let Err(e) = self.terminate(child, &format!("worker {w}"))
            {
                self.violations.push(("stop at the end", format!("stopping: {e}")));
            }
        }
        if let Some(m) = self.master.take() {
            match self.terminate(m, "master") {
                Ok(took) => {
                    self.notes.push(format!("final stop: master exited {:.1} s after SIGTERM", took.as_secs_f64()))
                }
                Err(e) => self.violations.push(("stop at the end", format!("final stop: {e}"))),
            }
        }
        // What the stopped workers left behind is theirs too; the soak cleans it up.
        for p in self.step_processes(None) {
            self.violations.push((
                "step process left after the workers stopped",
                format!("step process left after the workers stopped: {p}"),
            ));
            let _ = Command::new("kill").args(["-KILL", &p.pid.to_string()]).status();
        }
    }

    // ---- judging ---------------------------------------------------------------------

    /// Every build ended as its builder must, or RETRY with a later attempt that did; nothing
    /// is left running.
    fn check_api(&mut self) -> Result<()> {
        let mut builds: BTreeMap<u64, Value> = BTreeMap::new();
        let mut offset = 0;
        loop {
            let page = get(&self.http, &format!("/api/v2/builds?order=id&limit=1000&offset={offset}"))?;
            let list = page["builds"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                break;
            }
            offset += list.len();
            for b in list {
                if let Some(id) = b["id"].as_u64() {
                    builds.insert(id, b);
                }
            }
        }
        let mut retry_of: BTreeMap<u64, u64> = BTreeMap::new();
        for (id, b) in &builds {
            if let Some(prev) = str_of(&b["reason"]).strip_prefix("retry of build ").and_then(|s| s.parse().ok()) {
                retry_of.insert(prev, *id);
            }
        }
        let mut c = Counts::default();
        for id in &self.forced {
            if !builds.contains_key(id) {
                self.violations.push(("forced build lost", format!("build {id} was accepted by a force but is gone")));
            }
        }
        for (id, b) in &builds {
            *c.by_result.entry(str_of(&b["result"]).to_owned()).or_default() += 1;
            if b["state"] != "finished" {
                self.violations.push(("build left open", format!("build {id} is still {}", str_of(&b["state"]))));
            }
            for s in b["steps"].as_array().map(Vec::as_slice).unwrap_or_default() {
                if s["state"] != "finished" {
                    self.violations.push((
                        "step left open",
                        format!("build {id} step {} is still {}", s["number"], str_of(&s["state"])),
                    ));
                }
            }
            if b["result"] == "EXCEPTION" {
                self.violations.push((
                    "EXCEPTION",
                    format!("build {id} ({}): EXCEPTION: {}", str_of(&b["builder"]), str_of(&b["result_reason"])),
                ));
            }
            let reason = str_of(&b["reason"]);
            let is_retry = reason.starts_with("retry of build ");
            if !is_retry && reason != "force" {
                self.violations
                    .push(("build with an unexpected reason", format!("build {id}: unexpected reason `{reason}`")));
                continue;
            }
            if is_retry {
                continue;
            }
            if !self.forced.contains(id) {
                c.unanswered += 1;
            }
            // Follow the attempts of this forced build.
            let mut cur = *id;
            let mut attempts = 1;
            while let Some(b) = builds.get(&cur) {
                if b["result"] != "RETRY" {
                    break;
                }
                match self.retry_cause(b) {
                    Some(Chaos::KillWorker(_)) => c.retried_worker += 1,
                    Some(Chaos::KillMaster) | Some(Chaos::TermMaster) => c.retried_master += 1,
                    None => self.violations.push((
                        "RETRY with no kill while it ran",
                        format!(
                            "build {cur} ({}): RETRY with no kill while it ran: {}",
                            str_of(&b["builder"]),
                            str_of(&b["result_reason"])
                        ),
                    )),
                }
                match retry_of.get(&cur) {
                    Some(next) => {
                        cur = *next;
                        attempts += 1;
                    }
                    None => {
                        self.violations
                            .push(("RETRY without a new attempt", format!("build {cur}: RETRY without a new attempt")));
                        break;
                    }
                }
            }
            if attempts > 1 {
                c.chains += 1;
            }
            let Some(last) = builds.get(&cur) else { continue };
            let builder = str_of(&last["builder"]);
            let Some(kind) = kind_of(builder) else {
                self.violations.push(("unknown builder", format!("build {cur}: unknown builder {builder}")));
                continue;
            };
            let got: Vec<&str> = last["steps"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|s| str_of(&s["result"]))
                .collect();
            let want: Vec<&str> = kind.steps.iter().map(|(_, r)| *r).collect();
            let result = str_of(&last["result"]);
            if result == "RETRY" || result == "EXCEPTION" {
                continue; // already reported
            }
            if result != kind.result || got != want {
                c.wrong += 1;
                self.violations.push((
                    "result other than expected",
                    format!(
                        "build {cur} ({builder}): {result} with steps {got:?}, expected {} with {want:?}: {}",
                        kind.result,
                        str_of(&last["result_reason"])
                    ),
                ));
            } else {
                *c.as_expected.entry(kind.name).or_default() += 1;
            }
        }
        // Leases: the workers run nothing now.
        let workers = get(&self.http, "/api/v2/workers")?;
        for w in workers["workers"].as_array().map(Vec::as_slice).unwrap_or_default() {
            if w["running"] != 0 || w["current"].as_array().is_some_and(|c| !c.is_empty()) {
                self.violations
                    .push(("lease left running", format!("worker {} still holds leases: {}", str_of(&w["name"]), w)));
            }
            if w["connected"] != true {
                self.violations.push((
                    "worker not connected at the end",
                    format!("worker {} is not connected at the end", str_of(&w["name"])),
                ));
            }
        }
        c.total = builds.len();
        self.print_counts(&c);
        Ok(())
    }

    /// The chaos event that explains a RETRY: its worker (or the master) was killed while it
    /// ran.
    fn retry_cause(&self, b: &Value) -> Option<Chaos> {
        let start = b["started_at"].as_u64().unwrap_or(0);
        let end = b["finished_at"].as_u64().unwrap_or(u64::MAX);
        let worker = str_of(&b["worker"]);
        self.chaos
            .iter()
            // The clocks are the same machine's; a second either side covers the gap between
            // the kill and the moment it was noted.
            .filter(|(at, _)| *at + 1000 >= start && *at <= end.saturating_add(1000))
            .map(|(_, c)| c)
            .find(|c| match c {
                Chaos::KillWorker(w) => w == worker,
                Chaos::KillMaster | Chaos::TermMaster => true,
            })
            .cloned()
    }

    fn print_counts(&self, c: &Counts) {
        let kills = self.chaos.iter().filter(|(_, c)| matches!(c, Chaos::KillWorker(_))).count();
        println!();
        println!("builds in the API: {}", c.total);
        let by: Vec<String> = c.by_result.iter().map(|(r, n)| format!("{r} {n}")).collect();
        println!("  by result: {}", by.join(", "));
        println!(
            "  forced: {} answered{}; force requests refused or unanswered while the master was down: {}",
            self.forced.len(),
            if c.unanswered > 0 {
                format!(", {} more accepted without an answer", c.unanswered)
            } else {
                String::new()
            },
            self.force_errors
        );
        for k in KINDS {
            let n = c.as_expected.get(k.name).copied().unwrap_or(0);
            let expected = if k.result == "SUCCESS" { String::new() } else { " (expected failure)".to_owned() };
            let steps: Vec<&str> = k.steps.iter().map(|(_, r)| *r).collect();
            println!("  {:<8} {:>5} ended {}{} with steps {:?}", k.name, n, k.result, expected, steps);
        }
        println!("  ended otherwise than expected: {}", c.wrong);
        println!(
            "  RETRY attempts: {} after a worker kill, {} after a master kill or stop; {} builds needed more than one attempt",
            c.retried_worker, c.retried_master, c.chains
        );
        println!("chaos: {kills} worker kills (SIGKILL), master runs {} (one SIGKILL, one SIGTERM)", self.master_runs);
    }

    /// Prints the notes and the violations by class; the exit code says whether there were any.
    fn report(&self, o: &Options) -> Result<()> {
        for n in &self.notes {
            println!("{n}");
        }
        if self.violations.is_empty() {
            println!("soak passed: {} builds, no violation", o.builds);
            return Ok(());
        }
        println!("\n{} violations:", self.violations.len());
        let mut by_class: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
        for (class, v) in &self.violations {
            by_class.entry(class).or_default().push(v);
        }
        for (class, list) in &by_class {
            println!("  {class}: {}", list.len());
            for v in list.iter().take(5) {
                println!("    {v}");
            }
            if list.len() > 5 {
                println!("    ... {} more", list.len() - 5);
            }
        }
        println!("(state and logs kept in {}; seed {})", self.dir.display(), o.seed);
        std::process::exit(1)
    }
}

impl Drop for Soak {
    fn drop(&mut self) {
        for c in self.workers.values_mut().chain(std::iter::once(&mut self.master)).flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_result: BTreeMap<String, usize>,
    as_expected: BTreeMap<&'static str, usize>,
    wrong: usize,
    unanswered: usize,
    retried_worker: usize,
    retried_master: usize,
    chains: usize,
}

/// A process's start time (field 22 of /proc/PID/stat), to tell it from a later one with the
/// same pid.
fn proc_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command come field 3 (state) onward: starttime is field 22.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}
