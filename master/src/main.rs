//! `rbb`: the command line of the rbb master.
//!
//! `rbb compile` previews the merged plan (text, JSON, DOT) and diffs it against a saved plan
//! or a git revision; `rbb validate` checks pipeline files on their own; `rbb schema` prints
//! the JSON Schemas; `rbb cache` shows and collects a running master's step cache through its
//! REST API. Diagnostics go to stderr, results to stdout; the exit code is 0 when all is well,
//! 1 when the input has errors, 2 when the command itself cannot run.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use rbb_compiler::snippet::{ChildEvaluator, Limits};
use rbb_compiler::{Compilation, Options, Source, compile, decode_text, diff, git, render, render_diagnostics};
use rbb_schema::plan::Plan;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Compiling a large fleet allocates heavily on every core; mimalloc is about a third
/// faster than the system allocator there (see `cargo xtask bench`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    #[cfg(target_os = "linux")]
    fn prctl(option: std::ffi::c_int, ...) -> std::ffi::c_int;
}

/// `mi_option_purge_delay` and `mi_option_allow_thp` in mimalloc 3's `mi_option_e`
/// (libmimalloc-sys 0.1.49); `PR_SET_THP_DISABLE` of <linux/prctl.h>.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
const MI_OPTION_ALLOW_THP: std::ffi::c_int = 43;
#[cfg(target_os = "linux")]
const PR_SET_THP_DISABLE: std::ffi::c_int = 41;

/// The master gives freed memory back to the OS at once, in small pages. mimalloc's defaults
/// purge freed pages 1 s later but only when a later allocation runs its collector, and back
/// its arenas with transparent huge pages: an idle master sat at 33 MiB instead of 18.5, and
/// kept +30–50 MiB after a 50 MiB log for good. The `MIMALLOC_*` variables still win.
fn return_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option, which mimalloc reads atomically.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: as above. The arena reserved before `main` was already advised for huge
        // pages, hence the process-wide switch too (children inherit it).
        unsafe { mi_option_set(MI_OPTION_ALLOW_THP, 0) };
        #[cfg(target_os = "linux")]
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
        unsafe {
            prctl(
                PR_SET_THP_DISABLE,
                1 as std::ffi::c_ulong,
                0 as std::ffi::c_ulong,
                0 as std::ffi::c_ulong,
                0 as std::ffi::c_ulong,
            )
        };
    }
}

#[derive(Parser)]
#[command(name = "rbb", version, about = "rbb: git-native CI. Compile, preview and run pipelines.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile every configured repository's .rbb/pipeline.yaml into one plan and print it.
    Compile {
        /// Master config listing the repositories.
        #[arg(long, short, default_value = "rbb.yaml")]
        config: PathBuf,
        /// Compile pipeline files from a directory instead of git: every `<repo>.yaml` and
        /// `<repo>/.rbb/pipeline.yaml` in DIR is repository <repo>'s pipeline.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["revs", "diff"])]
        pipelines: Option<PathBuf>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Read REPO's pipeline at REV instead of its configured branch (repeatable).
        #[arg(long = "rev", value_name = "REPO=REV")]
        revs: Vec<String>,
        /// Show what changed against OLD: a saved JSON plan file, a revision REV of every
        /// repository, or REPO@REV for one repository.
        #[arg(long, value_name = "OLD")]
        diff: Option<String>,
        #[command(flatten)]
        snippets: SnippetArgs,
    },
    /// Run the master: compile the plan, open the state, serve workers and the REST API.
    Master {
        /// Master config listing the repositories and workers.
        #[arg(long, short, default_value = "rbb.yaml")]
        config: PathBuf,
        /// State directory (database and logs); default: `state_dir` of the config.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// HTTP address (REST API and UI).
        #[arg(long, default_value = "127.0.0.1:8010")]
        http: std::net::SocketAddr,
        /// gRPC address workers connect to.
        #[arg(long, default_value = "127.0.0.1:9989")]
        grpc: std::net::SocketAddr,
        /// Interval workers send heartbeats at; a worker silent for three is lost.
        #[arg(long, default_value_t = 1000)]
        heartbeat_ms: u64,
        /// Migrate a PostgreSQL state whose schema is older than this binary's (back it up
        /// first). Without it such a state is refused, and `rbb state check` says so.
        #[arg(long)]
        migrate: bool,
        /// With a PostgreSQL state another master holds: wait as a standby (forwarding this
        /// master's ports to it) until that master stops or its lease runs out, then take
        /// over its state and its builds. The default on a PostgreSQL state; refused on a
        /// redb one.
        #[arg(long)]
        standby: bool,
    },
    /// The state database: its schema version, and copying a single master's state into
    /// PostgreSQL (docs/postgres.md).
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Check pipeline files on their own (no master config, no git).
    Validate {
        /// Pipeline files, e.g. .rbb/pipeline.yaml.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        snippets: SnippetArgs,
    },
    /// Evaluate Python snippets for a compile (started by rbb itself, in a child process).
    #[command(hide = true)]
    SnippetRunner {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print the JSON Schema of the pipeline file or the master config.
    Schema {
        #[arg(value_enum, default_value_t = SchemaKind::Pipeline)]
        kind: SchemaKind,
    },
    /// Inspect or collect a running master's step cache (through its REST API).
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// API tokens for the master config's `tokens` (docs/security.md).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Report the state's schema version against this binary's, and what it holds. Exit 0
    /// when they match, 1 when the state is older (or newer) than this binary.
    Check {
        /// Master config naming the state (`state`, `state_dir`).
        #[arg(long, short, default_value = "rbb.yaml", conflicts_with = "state")]
        config: PathBuf,
        /// The state itself instead: a `postgres://` URL or a state directory.
        #[arg(long)]
        state: Option<String>,
        /// Migrate an older state forward (back it up first).
        #[arg(long)]
        migrate: bool,
    },
    /// Copy a single master's state (its redb file) into an empty PostgreSQL database,
    /// then compare every table's row count. Stop the master first; logs, mirrors and cache
    /// blobs stay in the state directory.
    Migrate {
        /// The state directory (or its state.redb).
        #[arg(long)]
        from: PathBuf,
        /// `postgres://user@host/database`; the password from `PGPASSWORD` when the URL has
        /// none.
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh random token (give it to its holder) and the config entry holding its
    /// hash (paste it under `tokens:`).
    New {
        /// Who holds it: the audit log names actions by it.
        name: String,
        /// What it may do.
        #[arg(long, value_enum, default_value_t = RoleArg::Read)]
        role: RoleArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Read,
    Control,
    Admin,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Entries, blobs, stored bytes against the limit, and hits and misses per builder.
    Stats {
        /// The master's HTTP address, e.g. http://127.0.0.1:8010.
        #[arg(long)]
        master: String,
    },
    /// Evict least recently used entries down to the size limit now.
    Gc {
        /// The master's HTTP address, e.g. http://127.0.0.1:8010.
        #[arg(long)]
        master: String,
        /// The master's `api_token`.
        #[arg(long)]
        token: Option<String>,
    },
}

#[derive(clap::Args)]
struct SnippetArgs {
    /// Wall-clock limit per Python snippet, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    snippet_timeout_ms: u64,
    /// Memory limit of the snippet runner, in MiB.
    #[arg(long, default_value_t = 512)]
    snippet_memory_mib: u64,
    /// Show what snippets printed (`print()`), also when they succeed. A failing snippet's
    /// output is always part of its diagnostic.
    #[arg(long, short)]
    verbose: bool,
}

impl SnippetArgs {
    fn evaluator(&self) -> ChildEvaluator {
        rbb_master::planner::snippet_evaluator(Limits {
            wall: Duration::from_millis(self.snippet_timeout_ms),
            memory_mib: self.snippet_memory_mib,
        })
    }

    /// Prints what snippets printed, with `--verbose`.
    fn show_printed(&self, result: &Compilation) {
        if self.verbose {
            for p in &result.printed {
                eprint!("{}", p.render());
            }
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
    Dot,
}

#[derive(Clone, Copy, ValueEnum)]
enum SchemaKind {
    Pipeline,
    Config,
}

fn main() -> ExitCode {
    // The snippet runner must not set up anything else in its process.
    if std::env::args().nth(1).as_deref() == Some("snippet-runner") {
        let code = rbb_compiler::runner::main(std::env::args().skip(2));
        return ExitCode::from(u8::try_from(code).unwrap_or(70));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RBB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rbb: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Compile { pipelines: Some(dir), format, snippets, .. } => cmd_compile_dir(&dir, format, &snippets),
        Command::Compile { config, format, revs, diff, snippets, pipelines: None } => {
            cmd_compile(&config, format, &revs, diff.as_deref(), &snippets)
        }
        Command::Validate { files, snippets } => cmd_validate(&files, &snippets),
        Command::Master { config, state_dir, http, grpc, heartbeat_ms, migrate, standby } => {
            cmd_master(rbb_master::server::MasterOptions {
                config,
                state_dir,
                http,
                grpc,
                heartbeat: Duration::from_millis(heartbeat_ms.max(50)),
                migrate,
                standby,
            })
        }
        Command::State { command: StateCommand::Check { config, state, migrate } } => {
            cmd_state_check(&config, state.as_deref(), migrate)
        }
        Command::State { command: StateCommand::Migrate { from, to } } => cmd_state_migrate(&from, &to),
        Command::SnippetRunner { args } => {
            Ok(ExitCode::from(u8::try_from(rbb_compiler::runner::main(args)).unwrap_or(70)))
        }
        Command::Cache { command: CacheCommand::Stats { master } } => {
            let stats: rbb_schema::api::CacheStats = api_request("GET", &master, "/api/v2/cache", None)?;
            print!("{}", render_cache_stats(&stats));
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache { command: CacheCommand::Gc { master, token } } => {
            let gc: rbb_schema::api::CacheGc = api_request("POST", &master, "/api/v2/cache/gc", token.as_deref())?;
            println!(
                "removed {} {}, {} {}, {}",
                gc.entries,
                plural(gc.entries, "entry", "entries"),
                gc.blobs,
                plural(gc.blobs, "blob", "blobs"),
                human_bytes(gc.bytes)
            );
            print!("{}", render_cache_stats(&gc.stats));
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { command: TokenCommand::New { name, role } } => {
            if name.trim().is_empty() || name.contains(['"', '\\', '\n']) {
                bail!("a token's name must be non-empty text without quotes, backslashes or newlines");
            }
            let (token, hash) = rbb_master::auth::new_token().context("reading the system's random source")?;
            let role = match role {
                RoleArg::Read => "read",
                RoleArg::Control => "control",
                RoleArg::Admin => "admin",
            };
            println!("token: {token}");
            println!();
            println!("# under `tokens:` in the master config:");
            println!("  - name: \"{name}\"");
            println!("    role: {role}");
            println!("    hash: \"{hash}\"");
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { kind } => {
            print!(
                "{}",
                match kind {
                    SchemaKind::Pipeline => rbb_schema::pipeline_json_schema(),
                    SchemaKind::Config => rbb_schema::config_json_schema(),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Threads of the master's blocking pool.
const MAX_BLOCKING_THREADS: usize = 64;

fn cmd_master(opts: rbb_master::server::MasterOptions) -> Result<ExitCode> {
    return_freed_memory();
    // Blocking work (store reads, flushes, fetches) gets a bounded pool: threads and their
    // allocator heaps follow the machine, not the number of connected workers.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .build()
        .context("starting the async runtime")?;
    // On a PostgreSQL state another master holds, this one is a standby: it forwards its
    // ports to the active master while it waits for the state.
    let mut opts = opts;
    let view = rbb_master::server::standby_state(&opts)?;
    opts.standby = view.is_some();
    let mut forwarding = None;
    let mut bound = None;
    let master = rbb_master::server::open_starting_or_wait(&opts, |_holder| {
        let Some(state) = view else { return };
        let listen = |addr: std::net::SocketAddr, what: &str| {
            runtime.block_on(tokio::net::TcpListener::bind(addr)).unwrap_or_else(|e| {
                eprintln!("rbb: binding {what} on {addr}: {e}");
                std::process::exit(1)
            })
        };
        let (http, grpc) = (listen(opts.http, "HTTP"), listen(opts.grpc, "gRPC"));
        let addrs = (http.local_addr().unwrap_or(opts.http), grpc.local_addr().unwrap_or(opts.grpc));
        println!("rbb master standby: http=http://{} grpc=http://{} forward to the active master", addrs.0, addrs.1);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let stop = tokio_util::sync::CancellationToken::new();
        let state = std::sync::Arc::new(state);
        let tasks = [
            runtime.spawn(rbb_master::standby::forward(http, "http", state.clone(), stop.clone())),
            runtime.spawn(rbb_master::standby::forward(grpc, "grpc", state, stop.clone())),
        ];
        forwarding = Some((stop, tasks));
        bound = Some(addrs);
    })?;
    if let Some((http, grpc)) = bound {
        // The standby's addresses are the master's.
        opts.http = http;
        opts.grpc = grpc;
    }
    if let Some((stop, tasks)) = forwarding {
        stop.cancel();
        // The listeners are closed when the tasks end: the addresses are free for the
        // master's own.
        for task in tasks {
            let _ = runtime.block_on(task);
        }
    }
    // Another master fencing this one off (its lease ran out) stops it: it may no longer
    // write, and what it would show is no longer the state.
    let lost = master.engine.store().lost();
    let fenced = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let fenced_seen = fenced.clone();
    let lost_state = async move {
        let Some(mut lost) = lost else { return std::future::pending::<()>().await };
        if let Ok(why) = lost.wait_for(Option::is_some).await {
            *fenced_seen.lock().unwrap_or_else(|p| p.into_inner()) = why.clone();
        }
    };
    runtime.block_on(rbb_master::server::serve(
        master,
        &opts,
        |bound| {
            // The one line scripts and tests wait for.
            let scheme = if bound.tls { "https" } else { "http" };
            println!("rbb master listening: http={scheme}://{} grpc={scheme}://{}", bound.http, bound.grpc);
            use std::io::Write;
            let _ = std::io::stdout().flush();
        },
        async {
            tokio::select! {
                () = signalled() => {}
                () = lost_state => {
                    tracing::error!("stopping: another master took the state over");
                    tokio::spawn(async move {
                        signalled().await;
                        std::process::exit(130);
                    });
                    return;
                }
            }
            tracing::info!("stopping (a second signal stops at once)");
            tokio::spawn(async move {
                signalled().await;
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            });
        },
    ))?;
    // Tasks still blocked (a git fetch, a slow client) do not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Some(why) = fenced.lock().unwrap_or_else(|p| p.into_inner()).take() {
        anyhow::bail!(
            "this master no longer holds its state: {why}. Start it again with --standby to take over when the other master stops"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn signalled() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
    }
}

/// One request to a master's REST API with the `curl` binary (the token goes to curl on
/// its standard input, never on its command line); the JSON answer, or the API's error
/// message.
fn api_request<T: serde::de::DeserializeOwned>(
    method: &str,
    master: &str,
    path: &str,
    token: Option<&str>,
) -> Result<T> {
    use std::io::Write;
    let url = format!("{}{path}", master.trim_end_matches('/'));
    // curl's config syntax: a quoted string with `\` escapes (a newline cannot start a line).
    let quote = |s: &str| {
        let escaped = s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n").replace('\r', "\\r");
        format!("\"{escaped}\"")
    };
    let mut config = format!("url = {}\nrequest = {}\n", quote(&url), quote(method));
    if let Some(t) = token {
        config.push_str(&format!("header = {}\n", quote(&format!("Authorization: Bearer {t}"))));
    }
    // A master serving TLS with a private CA.
    if let Some(ca) = std::env::var_os("RBB_CA_FILE") {
        config.push_str(&format!("cacert = {}\n", quote(&ca.to_string_lossy())));
    }
    let mut child = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "120", "--write-out", "\n%{http_code}", "--config", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running curl")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(config.as_bytes()).context("talking to curl")?;
    }
    let out = child.wait_with_output().context("running curl")?;
    if !out.status.success() {
        bail!("cannot reach the master at {master}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let code: u16 = code.trim().parse().with_context(|| format!("curl gave no HTTP status: {stdout:?}"))?;
    if !(200..300).contains(&code) {
        let message = serde_json::from_str::<rbb_schema::api::ErrorBody>(body)
            .map(|e| e.error.message)
            .unwrap_or_else(|_| body.trim().to_owned());
        bail!("{method} {url}: the master answered {code}: {message}");
    }
    serde_json::from_str(body).with_context(|| format!("{method} {url}: the answer is not what this rbb expects"))
}

fn plural<'a>(n: u64, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

/// `1536` → `1.5 KiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

fn render_cache_stats(s: &rbb_schema::api::CacheStats) -> String {
    let pct = if s.max_size == 0 { 0.0 } else { s.stored_bytes as f64 * 100.0 / s.max_size as f64 };
    let mut out = format!(
        "entries  {}\nblobs    {}\nstored   {} of {} ({pct:.0}%)\n",
        s.entries,
        s.blobs,
        human_bytes(s.stored_bytes),
        human_bytes(s.max_size)
    );
    if !s.builders.is_empty() {
        let width = s.builders.iter().map(|b| b.builder.len()).max().unwrap_or(0).max("builder".len());
        out.push_str(&format!("\n{:<width$}  {:>8}  {:>8}  {:>8}\n", "builder", "hits", "misses", "hit rate"));
        for b in &s.builders {
            let total = b.hits + b.misses;
            let rate =
                if total == 0 { "-".to_owned() } else { format!("{:.0}%", b.hits as f64 * 100.0 / total as f64) };
            out.push_str(&format!("{:<width$}  {:>8}  {:>8}  {:>8}\n", b.builder, b.hits, b.misses, rate));
        }
    }
    out
}

fn parse_revs(revs: &[String]) -> Result<BTreeMap<String, String>> {
    revs.iter()
        .map(|r| match r.split_once('=') {
            Some((repo, rev)) if !repo.is_empty() && !rev.is_empty() => Ok((repo.to_owned(), rev.to_owned())),
            _ => bail!("--rev takes REPO=REV, got `{r}`"),
        })
        .collect()
}

/// Compiles the configured repositories (at `revs` where given). Prints diagnostics.
fn compile_config(
    cfg: &git::LoadedConfig,
    revs: &BTreeMap<String, String>,
    eval: &ChildEvaluator,
) -> (Compilation, Vec<Source>) {
    let (mut sources, mut read_diags) = git::sources_from_config(cfg, revs);
    let opts = Options {
        worker_labels: Some(cfg.config.workers.iter().map(|w| w.labels.clone()).collect()),
        // Names only: `rbb compile` never reads a secret's value.
        secrets: Some(cfg.config.secrets.iter().map(|(n, s)| (n.clone(), s.repositories.clone())).collect()),
        ..Options::default()
    };
    let mut result = compile(&sources, eval, &opts);
    let read_failed = read_diags.iter().any(|d| d.is_error());
    read_diags.append(&mut result.diagnostics);
    result.diagnostics = read_diags;
    if read_failed {
        result.plan = None;
    }
    // The config itself, so diagnostics pointing into it show its lines.
    sources.push(Source {
        repo: String::new(),
        file: cfg.path.display().to_string(),
        text: cfg.text.clone(),
        branch: String::new(),
        files: Default::default(),
        origin: rbb_compiler::Origin::default(),
        not_utf8: None,
    });
    (result, sources)
}

fn cmd_compile(
    config: &Path,
    format: Format,
    revs: &[String],
    diff_against: Option<&str>,
    snippets: &SnippetArgs,
) -> Result<ExitCode> {
    let cfg = match git::load_config(config) {
        Ok(cfg) => cfg,
        Err(diags) => {
            // Show the config's own lines under its diagnostics.
            let shown = Source {
                repo: String::new(),
                file: config.display().to_string(),
                text: std::fs::read_to_string(config).unwrap_or_default(),
                branch: String::new(),
                files: Default::default(),
                origin: rbb_compiler::Origin::default(),
                not_utf8: None,
            };
            eprint!("{}", render_diagnostics(&diags, &[shown]));
            return Ok(ExitCode::from(1));
        }
    };
    let revs = parse_revs(revs)?;
    let eval = snippets.evaluator();
    let (result, sources) = compile_config(&cfg, &revs, &eval);
    snippets.show_printed(&result);
    if !result.diagnostics.is_empty() {
        eprint!("{}", render_diagnostics(&result.diagnostics, &sources));
    }
    let Some(plan) = result.plan else {
        return Ok(ExitCode::from(1));
    };

    if let Some(old) = diff_against {
        let old_plan = load_old_plan(&cfg, old, &revs, &eval)?;
        let d = diff::diff(&old_plan, &plan);
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&d)?),
            _ => print!("{}", diff::render(&d)),
        }
        return Ok(ExitCode::SUCCESS);
    }
    print_plan(&plan, format)?;
    Ok(ExitCode::SUCCESS)
}

/// The plan to diff against: a saved JSON plan, or the configured repositories at a revision.
fn load_old_plan(
    cfg: &git::LoadedConfig,
    old: &str,
    revs: &BTreeMap<String, String>,
    eval: &ChildEvaluator,
) -> Result<Plan> {
    let as_path = Path::new(old);
    if as_path.is_file() {
        let text = std::fs::read_to_string(as_path).with_context(|| format!("reading {old}"))?;
        let plan: Plan = serde_json::from_str(&text)
            .with_context(|| format!("{old} is not a plan saved by `rbb compile --format json`"))?;
        return Ok(plan);
    }
    let mut old_revs = revs.clone();
    match old.split_once('@') {
        Some((repo, rev)) => {
            if !cfg.config.repositories.iter().any(|r| r.effective_name() == repo) {
                let names: Vec<String> = cfg.config.repositories.iter().map(|r| r.effective_name()).collect();
                bail!(
                    "--diff {old}: no repository `{repo}` in {} (repositories: {})",
                    cfg.path.display(),
                    names.join(", ")
                );
            }
            old_revs.insert(repo.to_owned(), rev.to_owned());
        }
        None => {
            for r in &cfg.config.repositories {
                old_revs.insert(r.effective_name(), old.to_owned());
            }
        }
    }
    let (result, sources) = compile_config(cfg, &old_revs, eval);
    match result.plan {
        Some(plan) => Ok(plan),
        None => {
            eprint!("{}", render_diagnostics(&result.diagnostics, &sources));
            bail!("the old side of --diff ({old}) does not compile")
        }
    }
}

fn print_plan(plan: &Plan, format: Format) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match format {
        Format::Text => out.write_all(render::text(plan).as_bytes())?,
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, plan)?;
            out.write_all(b"\n")?;
        }
        Format::Dot => out.write_all(render::dot(plan).as_bytes())?,
    }
    out.flush()?;
    Ok(())
}

/// Sources from a directory of pipeline files (no git): `<repo>.yaml` or
/// `<repo>/.rbb/pipeline.yaml`.
fn sources_from_dir(dir: &Path) -> Result<Vec<Source>> {
    let mut sources = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let (repo, file) = if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            (p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(), p.clone())
        } else if p.join(".rbb/pipeline.yaml").is_file() {
            (p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(), p.join(".rbb/pipeline.yaml"))
        } else {
            continue;
        };
        // Not UTF-8 is the file's mistake (a diagnostic), not a failure of the command.
        let (text, not_utf8) =
            decode_text(std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?);
        sources.push(Source {
            repo,
            file: file.display().to_string(),
            text,
            branch: rbb_schema::config::DEFAULT_BRANCH.to_owned(),
            files: Default::default(),
            origin: rbb_compiler::Origin {
                url: file.display().to_string(),
                pipeline_path: rbb_schema::config::PIPELINE_PATH.to_owned(),
                ..Default::default()
            },
            not_utf8,
        });
    }
    if sources.is_empty() {
        bail!("{} holds no <repo>.yaml or <repo>/.rbb/pipeline.yaml", dir.display());
    }
    Ok(sources)
}

fn cmd_compile_dir(dir: &Path, format: Format, snippets: &SnippetArgs) -> Result<ExitCode> {
    let sources = sources_from_dir(dir)?;
    let eval = snippets.evaluator();
    let result = compile(&sources, &eval, &Options::default());
    snippets.show_printed(&result);
    if !result.diagnostics.is_empty() {
        eprint!("{}", render_diagnostics(&result.diagnostics, &sources));
    }
    match result.plan {
        Some(plan) => {
            print_plan(&plan, format)?;
            Ok(ExitCode::SUCCESS)
        }
        None => Ok(ExitCode::from(1)),
    }
}

fn cmd_validate(files: &[PathBuf], snippets: &SnippetArgs) -> Result<ExitCode> {
    let mut sources = Vec::new();
    for f in files {
        let (text, not_utf8) = decode_text(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
        sources.push(Source {
            repo: repo_name_for(f),
            file: f.display().to_string(),
            text,
            branch: rbb_schema::config::DEFAULT_BRANCH.to_owned(),
            files: Default::default(),
            origin: rbb_compiler::Origin {
                url: f.display().to_string(),
                pipeline_path: f.display().to_string(),
                ..Default::default()
            },
            not_utf8,
        });
    }
    let eval = snippets.evaluator();
    let mut failed = false;
    // Each file is checked on its own: `needs` of other repositories cannot be resolved
    // here, so only `rbb compile` checks them.
    for source in &sources {
        let opts = Options { other_repos_unknown: true, ..Options::default() };
        let result = compile(std::slice::from_ref(source), &eval, &opts);
        snippets.show_printed(&result);
        if !result.diagnostics.is_empty() {
            eprint!("{}", render_diagnostics(&result.diagnostics, std::slice::from_ref(source)));
        }
        match result.plan {
            Some(plan) => {
                println!("{}: ok ({} builders, {} steps)", source.file, plan.builders.len(), plan.step_count())
            }
            None => failed = true,
        }
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn repo_name_for(file: &Path) -> String {
    let abs = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let parent = abs.parent();
    let dir = match parent {
        Some(p) if p.file_name().is_some_and(|n| n == ".rbb") => p.parent(),
        other => other,
    };
    dir.and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| rbb_compiler::valid_name(n))
        .unwrap_or_else(|| "local".to_owned())
}

/// Where `rbb state` finds the state: a URL or directory given, else the config's.
fn state_location(config: &Path, state: Option<&str>) -> Result<rbb_master::store::Location> {
    use rbb_master::store::Location;
    if let Some(s) = state {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(Location::Postgres {
                url: s.to_owned(),
                password: std::env::var("PGPASSWORD").ok(),
                lease: rbb_master::store::pg::DEFAULT_LEASE,
            });
        }
        let p = PathBuf::from(s);
        return Ok(Location::File(if p.is_dir() { p.join("state.redb") } else { p }));
    }
    let cfg = rbb_compiler::git::load_config(config)
        .map_err(|diags| anyhow::anyhow!("the master config has errors:\n{}", render_diagnostics(&diags, &[])))?;
    Location::from_config(cfg.config.state.as_ref(), &cfg.state_dir(), &cfg.dir())
        .map_err(|e| anyhow::anyhow!("the master config: {e}"))
}

fn cmd_state_check(config: &Path, state: Option<&str>, migrate: bool) -> Result<ExitCode> {
    use rbb_master::store::{Location, Migrate, SCHEMA_VERSION, Store};
    let at = state_location(config, state)?;
    if let Location::File(p) = &at
        && !p.exists()
    {
        anyhow::bail!("no state at {}: a master has not run there yet", p.display());
    }
    let peek = match &at {
        Location::File(p) => rbb_master::store::peek_redb_version(p)?,
        Location::Postgres { url, password, .. } => rbb_master::store::peek_postgres_version(url, password.as_deref())?,
    };
    println!("state:          {}", at.shown());
    println!(
        "schema version: {} (this rbb: {SCHEMA_VERSION})",
        peek.map_or("none (empty)".to_owned(), |v| v.to_string())
    );
    match peek {
        Some(v) if v > SCHEMA_VERSION => {
            println!("newer than this rbb: run the rbb version that wrote it (or newer)");
            return Ok(ExitCode::from(1));
        }
        Some(v) if v < SCHEMA_VERSION && !migrate => {
            println!(
                "older than this rbb: back it up, then run `rbb state check --migrate` (or start the master with --migrate)"
            );
            return Ok(ExitCode::from(1));
        }
        _ => {}
    }
    // Without --migrate a PostgreSQL state is only read: no lock, so a running master's
    // database can be checked.
    let store = match &at {
        Location::Postgres { url, password, .. } if !migrate => Store::peek_postgres(url, password.as_deref())?,
        _ => Store::open_at(&at, if migrate { Migrate::Yes } else { Migrate::No })?,
    };
    if peek.is_some_and(|v| v < SCHEMA_VERSION) {
        println!("migrated to schema version {SCHEMA_VERSION}");
    }
    if let Some(status) = store.master_status()? {
        println!("active master:  {status}");
    }
    for (table, n) in store.table_counts()? {
        if n > 0 {
            println!("  {table:<24} {n:>10}");
        }
    }
    match store.check_indexes()? {
        None => println!("indexes and counts: consistent"),
        Some(diff) => {
            println!("indexes and counts: {diff}");
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_state_migrate(from: &Path, to: &str) -> Result<ExitCode> {
    use rbb_master::store::{Migrate, Store};
    let file = if from.is_dir() { from.join("state.redb") } else { from.to_owned() };
    if !file.exists() {
        anyhow::bail!("no state at {}: give the state directory of a master (its state.redb)", file.display());
    }
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        anyhow::bail!("--to must be a postgres:// URL");
    }
    let source =
        Store::open(&file).with_context(|| format!("opening {} (is its master still running?)", file.display()))?;
    let target = Store::open_postgres(to, std::env::var("PGPASSWORD").ok().as_deref(), Migrate::No)?;
    let shown = rbb_master::store::pg::redact(to);
    if !target.is_blank()? {
        anyhow::bail!(
            "{shown} is not empty: rbb copies a state only into an empty database (create a new one, or drop this one's rbb_ tables)"
        );
    }
    let started = std::time::Instant::now();
    let copied = source.copy_into(&target)?;
    let (want, got) = (source.table_counts()?, target.table_counts()?);
    let mut differ = Vec::new();
    println!(
        "{:<24} {:>10} {:>10}",
        "table",
        file.display().to_string().rsplit('/').next().unwrap_or("redb"),
        "postgres"
    );
    for ((table, a), (_, b)) in want.iter().zip(&got) {
        if *a > 0 || *b > 0 {
            println!("{table:<24} {a:>10} {b:>10}");
        }
        if a != b {
            differ.push(table.clone());
        }
    }
    if !differ.is_empty() {
        anyhow::bail!("the copy's row counts differ from the source's in {}", differ.join(", "));
    }
    if let Some(diff) = target.check_indexes()? {
        anyhow::bail!("the copy's indexes do not match its records: {diff}");
    }
    let rows: u64 = copied.iter().map(|(_, n)| n).sum();
    println!(
        "copied {rows} rows into {shown} in {:.1} s; counts match. Set `state: {shown}` in the master config, keep state_dir (logs, mirrors, cache blobs), and start the master.",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
