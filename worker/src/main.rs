//! `rbb-worker`: the command line around [`rbb_worker::run`].
//!
//! Parses flags, sets up logging and signals, starts the guard that kills the steps if this
//! process dies, and maps the outcome to an exit code: 0 after SIGTERM/ctrl-c, 2 when the
//! master refuses this worker, 1 for anything else. Run as `rbb-worker __rbb-guard <dir>` it is
//! that guard ([`rbb_worker::guard::serve`]). It holds no protocol or process logic.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use rbb_worker::docker::Registry;
use rbb_worker::guard::{self, Guard};
use rbb_worker::{DockerExecutor, Executor, NativeExecutor, WorkerConfig, WorkerError};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// Connects to an rbb master and runs the steps it leases.
#[derive(Debug, Parser)]
#[command(name = "rbb-worker", version)]
struct Cli {
    /// Master URL, e.g. http://127.0.0.1:7070, or https://ci.internal:7070 with --ca-file. Several,
    /// comma-separated (an active master and its standbys): tried in turn.
    #[arg(long)]
    master: String,
    /// CA certificates (PEM) that an https:// master's certificate must chain to; also used
    /// for checkouts from the master over https.
    #[arg(long, env = "RBB_WORKER_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// This worker's client certificate (PEM) for a master that requires one; its subject
    /// must be the worker's name.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// This worker's name, as configured on the master.
    #[arg(long)]
    name: String,
    /// Token the master expects from this worker.
    #[arg(long, env = "RBB_WORKER_TOKEN", hide_env_values = true)]
    token: String,
    /// Labels offered to the master, comma-separated.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Directory holding the checkouts.
    #[arg(long, default_value = "./rbb-work")]
    workdir: PathBuf,
    /// Steps run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    max_steps: u32,
    /// Bytes the local copy of step cache blobs (<workdir>/.rbb-cache) may take, or with a
    /// suffix k, m, g (powers of 1024); the least recently used are removed past it.
    #[arg(long, default_value = "10g", value_parser = parse_size)]
    cache_max_size: u64,
    /// Run steps that name an image in containers on the local Docker engine (its socket, or
    /// DOCKER_HOST). The `docker` label is offered only when the engine answers.
    #[arg(long, env = "RBB_WORKER_DOCKER")]
    docker: bool,
    /// With --docker: a host path (and everything under it) that steps may mount read-only
    /// into their containers (`mounts:` in a pipeline). Repeatable, or several joined by `:`;
    /// nothing is allowed without it.
    #[arg(long = "allow-mount", value_name = "PATH", env = "RBB_WORKER_ALLOW_MOUNTS", value_delimiter = ':')]
    allow_mounts: Vec<PathBuf>,
    /// With --docker: pull images that are not on the engine from this registry (HOST[:PORT]).
    /// Without it a missing image fails the step.
    #[arg(long, value_name = "HOST[:PORT]", env = "RBB_WORKER_REGISTRY")]
    registry: Option<String>,
    /// A file holding `USER:PASSWORD` for --registry.
    #[arg(long, value_name = "FILE", requires = "registry", env = "RBB_WORKER_REGISTRY_AUTH")]
    registry_auth: Option<PathBuf>,
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|arg| guard::is_guard_arg(&arg)) {
        init_logs();
        let _span = tracing::info_span!("guard").entered();
        let Some(dir) = args.next() else {
            error!("usage: rbb-worker {} <steps directory>", guard::GUARD_ARG);
            return ExitCode::from(2);
        };
        return match guard::serve(Path::new(&dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                error!(%err, "guard failed");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    init_logs();
    match serve(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            if err
                .downcast_ref::<WorkerError>()
                .is_some_and(|err| matches!(err, WorkerError::Refused { .. } | WorkerError::Tls { .. }))
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logs() {
    let filter = EnvFilter::try_from_env("RBB_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn serve(cli: Cli) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cli.workdir)
        .with_context(|| format!("creating the work directory {}", cli.workdir.display()))?;
    // Before the runtime starts: the guard is forked from a single-threaded process. It is
    // this very binary, re-executed.
    let (guard, swept) = Guard::start(&cli.workdir, Path::new("/proc/self/exe")).context("starting the step guard")?;
    if !swept.is_empty() {
        info!(records = swept.len(), "cleaned up after an earlier run of this worker");
    }
    let native = NativeExecutor::guarded(guard.link());
    let mut labels: Vec<String> = cli.labels.into_iter().filter(|l| !l.is_empty()).collect();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    if !cli.docker && (!cli.allow_mounts.is_empty() || cli.registry.is_some()) {
        warn!("--allow-mount and --registry apply to containers: without --docker they do nothing");
    }
    let registry = match &cli.registry {
        Some(host) => Some(registry(host, cli.registry_auth.as_deref())?),
        None => None,
    };
    let docker = if cli.docker {
        runtime.block_on(start_docker(&cli.name, native.clone(), &cli.allow_mounts, registry))?
    } else {
        None
    };
    let executor: Arc<dyn Executor> = match &docker {
        Some(docker) => {
            if !labels.iter().any(|l| l == "docker") {
                labels.push("docker".to_owned());
            }
            docker.clone()
        }
        None => Arc::new(native),
    };
    let config = WorkerConfig {
        master: cli.master,
        name: cli.name,
        token: cli.token,
        labels,
        workdir: cli.workdir,
        max_steps: cli.max_steps,
        cache_max_bytes: cli.cache_max_size,
        guard: Some(guard.link()),
        tls: cli.ca_file.map(|ca_file| rbb_worker::tls::TlsFiles { ca_file, client: cli.cert.zip(cli.key) }),
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => info!("interrupted; stopping"),
                _ = sigterm.recv() => info!("terminated; stopping"),
            }
            on_signal.cancel();
        });
        let served = rbb_worker::run_with_executor(config, executor, shutdown).await;
        if let Some(docker) = &docker {
            docker.close().await;
        }
        served?;
        drop(guard);
        Ok(())
    })
}

/// `123`, `64k`, `512m`, `10g` (powers of 1024) as bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&text[..text.len() - 1], 10),
        Some('m') => (&text[..text.len() - 1], 20),
        Some('g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size such as 500m or 10g"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

/// `--registry HOST[:PORT]` with the credentials of `--registry-auth FILE` (`USER:PASSWORD`).
fn registry(host: &str, auth: Option<&Path>) -> anyhow::Result<Registry> {
    let host = host.trim().trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/');
    if host.is_empty() || host.contains(['/', ' ']) {
        anyhow::bail!("--registry {host:?}: write HOST or HOST:PORT, e.g. registry.example.com:5000");
    }
    let credentials = match auth {
        None => None,
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading --registry-auth {}", path.display()))?;
            let (user, password) = text.trim_end_matches(['\n', '\r']).split_once(':').with_context(|| {
                format!("--registry-auth {}: the file must hold USER:PASSWORD on one line", path.display())
            })?;
            Some((user.to_owned(), password.to_owned()))
        }
    };
    Ok(Registry { host: host.to_owned(), credentials })
}

/// The Docker executor, after sweeping what an earlier run of this worker left; `None` (said
/// loudly) when no engine answers, so the worker runs native steps only. An allowed mount
/// that does not exist stops the worker.
async fn start_docker(
    name: &str,
    native: NativeExecutor,
    allow_mounts: &[PathBuf],
    registry: Option<Registry>,
) -> anyhow::Result<Option<Arc<DockerExecutor>>> {
    let docker = match DockerExecutor::connect(name, native).await {
        Ok(docker) => docker,
        Err(err) => {
            error!("--docker: {err}; not offering the `docker` label, steps with an image will not come here");
            return Ok(None);
        }
    };
    let docker = docker.allow_mounts(allow_mounts).map_err(anyhow::Error::msg)?.with_registry(registry);
    if let Err(err) = docker.sweep().await {
        warn!("--docker: cannot sweep what an earlier run left: {err}");
    }
    info!(platform = docker.platform(), "running steps with an image on the local Docker engine");
    Ok(Some(Arc::new(docker)))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        for bad in ["", "g", "ten", "1.5g", "-1", "99999999999999999999g"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
