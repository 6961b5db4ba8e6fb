//! `rbb master`: loads the config, compiles the plan, opens the state, and serves workers
//! (gRPC) and people (HTTP) until stopped.

use crate::engine::{Engine, Repo};
use anyhow::{Context, Result, bail};
use rbb_compiler::snippet::{ChildEvaluator, Limits};
use rbb_compiler::{Options, compile, git, render_diagnostics};
use rbb_schema::proto::worker_server::WorkerServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::TcpListenerStream;

#[derive(Debug, Clone)]
pub struct MasterOptions {
    pub config: PathBuf,
    /// Overrides the config's `state_dir`.
    pub state_dir: Option<PathBuf>,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub heartbeat: Duration,
}

/// Where the master listens, once it does.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

/// Compiles the configured repositories and opens the engine.
pub fn open_engine(opts: &MasterOptions) -> Result<Arc<Engine>> {
    let cfg = git::load_config(&opts.config).map_err(|diags| {
        anyhow::anyhow!("the master config has errors:\n{}", render_diagnostics(&diags, &[]))
    })?;
    let (sources, mut diags) = git::sources_from_config(&cfg, &Default::default());
    let eval = ChildEvaluator::current_exe_with(&["snippet-runner"], Limits::default());
    let opts_c = Options {
        worker_labels: Some(cfg.config.workers.iter().map(|w| w.labels.clone()).collect()),
        ..Options::default()
    };
    let result = compile(&sources, &eval, &opts_c);
    diags.extend(result.diagnostics.iter().cloned());
    if !diags.is_empty() {
        eprint!("{}", render_diagnostics(&diags, &sources));
    }
    let Some(plan) = result.plan.filter(|_| !diags.iter().any(|d| d.is_error())) else {
        bail!("the pipelines do not compile; fix the errors above (`rbb compile` shows them too)");
    };
    let mut repos = Vec::new();
    for r in &cfg.config.repositories {
        let path = cfg.repo_path(r).map_err(anyhow::Error::msg)?;
        // Workers run elsewhere: give them an absolute path.
        let path = std::fs::canonicalize(&path).with_context(|| format!("repository {}: {}", r.effective_name(), path.display()))?;
        repos.push(Repo { name: r.effective_name(), path, branch: r.effective_branch().to_owned() });
    }
    let state_dir = opts
        .state_dir
        .clone()
        .unwrap_or_else(|| cfg.dir().join(cfg.config.state_dir.as_deref().unwrap_or(".rbb-state")));
    tracing::info!(plan = %plan.hash, builders = plan.builders.len(), state = %state_dir.display(), "plan compiled");
    Engine::open(&state_dir, plan, repos, cfg.config.workers.clone(), opts.heartbeat)
        .with_context(|| format!("opening the state in {}", state_dir.display()))
}

/// Serves until `shutdown` resolves. Calls `ready` once both listeners are bound.
pub async fn serve(
    engine: Arc<Engine>,
    opts: &MasterOptions,
    ready: impl FnOnce(Bound),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let grpc = tokio::net::TcpListener::bind(opts.grpc).await.with_context(|| format!("binding gRPC on {}", opts.grpc))?;
    let http = tokio::net::TcpListener::bind(opts.http).await.with_context(|| format!("binding HTTP on {}", opts.http))?;
    let bound = Bound { http: http.local_addr()?, grpc: grpc.local_addr()? };
    let stop = tokio_util::sync::CancellationToken::new();

    let hb_engine = engine.clone();
    let hb_stop = stop.clone();
    let every = engine.heartbeat / 2;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(50)));
        loop {
            tokio::select! {
                _ = hb_stop.cancelled() => break,
                _ = tick.tick() => {
                    let e = hb_engine.clone();
                    let _ = tokio::task::spawn_blocking(move || e.check_heartbeats()).await;
                }
            }
        }
    });

    let svc = WorkerServer::new(crate::grpc::WorkerService { engine: engine.clone() });
    let grpc_stop = stop.clone();
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            // Workers stream logs in 64 KiB chunks: with the default 64 KiB window every chunk
            // would wait a round trip for a window update.
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), async move { grpc_stop.cancelled().await }),
    );
    let http_stop = stop.clone();
    let app = crate::http::router(engine.clone());
    let http_task = tokio::spawn(async move {
        axum::serve(http, app).with_graceful_shutdown(async move { http_stop.cancelled().await }).await
    });
    ready(bound);
    shutdown.await;
    stop.cancel();
    let _ = grpc_task.await;
    let _ = http_task.await;
    Ok(())
}
