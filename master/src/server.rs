//! `rbb master`: loads the config, compiles the plan, opens the state, and serves workers
//! (gRPC) and people (HTTP) until stopped.

use crate::engine::{Engine, Repo};
use crate::mirror::Mirror;
use crate::planner::{PlanRepo, Planner};
use crate::sources::{SourceRepo, Sources};
use anyhow::{Context, Result};
use rbb_compiler::duration::parse_duration_ms;
use rbb_compiler::{Options, git, render_diagnostics};
use rbb_schema::proto::worker_server::WorkerServer;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Migrate a PostgreSQL state with an older schema forward (without it such a state is
    /// refused; a redb file is always migrated).
    pub migrate: bool,
    /// With a PostgreSQL state held by another master: wait for it to stop and take over,
    /// instead of refusing to start.
    pub standby: bool,
}

/// Where the master listens, once it does.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// Whether both ports serve TLS.
    pub tls: bool,
}

/// The engine and the change sources feeding it.
pub struct Master {
    pub engine: Arc<Engine>,
    pub sources: Arc<Sources>,
    pub api_token: Option<String>,
    /// Tokens, roles and rate limits of the HTTP API.
    pub security: Arc<crate::http::Security>,
    /// TLS of both ports, when the config gives a certificate.
    pub tls: Option<crate::tls::ServerTls>,
    /// Workers that must present a client certificate.
    pub client_certs: crate::grpc::ClientCerts,
    /// Per repository: whether its mirror was just created (its first fetch is a baseline).
    fresh: Vec<bool>,
    /// What is left of the start when the master was opened with [`open_starting`]: the
    /// first fetch of new mirrors and reading the head plan, which [`serve`] finishes in the
    /// background while the API answers.
    starting: Option<Starting>,
    /// The janitor's policy and how often it runs, if the config sets `retention`.
    retention: Option<(crate::engine::RetentionPolicy, Duration)>,
    /// Repositories that report commit statuses, with where to, and the configured UI address.
    status_targets: BTreeMap<String, crate::forge::status::StatusTarget>,
    public_url: Option<String>,
    /// The master's HTTP address as workers (and standbys) reach it.
    checkout_url: Option<String>,
    notifications: Vec<rbb_schema::config::NotificationConfig>,
}

/// The engine's database, for the forge outbox's reader.
struct EngineDatabase(Arc<Engine>);

impl crate::forge::outbox_store::DatabaseHandle for EngineDatabase {
    fn database(&self) -> &crate::store::kv::Db {
        self.0.database()
    }
}

/// The start's work after the engine opened: new mirrors to fetch, then the head plan to
/// read.
struct Starting {
    /// Every mirror, to open (or make) before anything reads it.
    prepare: Vec<Arc<SourceRepo>>,
    fetch: Vec<FirstFetch>,
}

/// A new mirror's first fetch.
struct FirstFetch {
    /// Its place in the config (and in `Master::fresh`).
    index: usize,
    repo: Arc<SourceRepo>,
    /// A forge's repository (a failed fetch is retried, not an error).
    remote: bool,
    /// A local repository's branch heads, read before the API answered: its baseline, so
    /// that what is pushed after the master said it listens is built.
    seen: crate::mirror::LocalHeads,
}

impl Starting {
    /// Fetches the new mirrors and records their baselines, then reads every pipeline at its
    /// branch head. A mirror whose baseline is recorded is no longer fresh to its poller. A
    /// forge that is down does not stop the start (its poller retries, and its builders join
    /// the plan once a fetch brings its branch); a local repository that cannot be fetched
    /// is an error, returned after the head plan is read all the same.
    ///
    /// The engine is held only while the head plan is read: a master stopped meanwhile
    /// closes its state cleanly (redb would otherwise walk the whole file at the next
    /// start). `stopping` ends the fetches early and skips the plan.
    fn finish(self, engine: &std::sync::Weak<Engine>, fresh: &mut [bool], stopping: &AtomicBool) -> Result<()> {
        let prepared = in_parallel(&self.prepare, |repo| {
            repo.mirror.prepare().with_context(|| format!("mirroring repository {}", repo.name))
        });
        let (done, fetched) = first_fetches(&self.fetch, stopping);
        for i in done {
            fresh[i] = false;
        }
        if stopping.load(Ordering::Acquire) {
            return prepared.and(fetched);
        }
        let Some(engine) = engine.upgrade() else { return prepared.and(fetched) };
        engine.read_heads().context("storing the head plan")?;
        let plan = engine.plan();
        tracing::info!(plan = %plan.hash, builders = plan.builders.len(), "plan compiled");
        prepared.and(fetched)
    }
}

/// Runs `f` on every item, a few at a time; the first error, after all ran.
fn in_parallel<T: Sync>(items: &[T], f: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures: std::sync::Mutex<Vec<anyhow::Error>> = Default::default();
    std::thread::scope(|scope| {
        for _ in 0..crate::sources::POLL_SLOTS.min(items.len()) {
            scope.spawn(|| {
                while let Some(item) = items.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                    if let Err(e) = f(item) {
                        failures.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                    }
                }
            });
        }
    });
    match failures.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Fetches every new mirror once, a few at a time, and records its baseline: a mirror must
/// hold its repository before the plan is read from it. A mirror that exists already is not
/// fetched here (its poller's first fetch reports what was pushed while the master was
/// down), so a restart with a thousand repositories does not wait for a thousand fetches.
/// Returns the config indexes of the mirrors whose baseline is recorded, and the first
/// error of a local repository.
fn first_fetches(todo: &[FirstFetch], stopping: &AtomicBool) -> (Vec<usize>, Result<()>) {
    let done: std::sync::Mutex<Vec<usize>> = Default::default();
    let fetched = in_parallel(todo, |f| {
        if stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        let fetched = f
            .repo
            .mirror
            .fetch(&f.repo.branches)
            .and_then(|_| f.repo.mirror.record_baseline(&f.repo.branches, &f.seen));
        match fetched {
            Ok(_) => {
                done.lock().unwrap_or_else(|p| p.into_inner()).push(f.index);
                Ok(())
            }
            // A forge that is down does not stop the master: its poller retries with backoff.
            // A local repository that cannot be read is a mistake.
            Err(e) if !f.remote => Err(anyhow::Error::new(e).context(format!("fetching repository {}", f.repo.name))),
            Err(e) => {
                tracing::warn!(repo = %f.repo.name, error = %e, "first fetch failed; retrying in the background");
                Ok(())
            }
        }
    });
    (done.into_inner().unwrap_or_else(|p| p.into_inner()), fetched)
}

/// Opens the mirrors, fetches the new ones, opens the engine and compiles the plan at every
/// branch head.
pub fn open(opts: &MasterOptions) -> Result<Master> {
    let mut master = open_starting(opts)?;
    if let Some(start) = master.starting.take() {
        start.finish(&Arc::downgrade(&master.engine), &mut master.fresh, &AtomicBool::new(false))?;
    }
    Ok(master)
}

/// For a master on a PostgreSQL state: a view of that state (no lock, no writes), to find
/// the active master by while it waits as a standby. None on a redb state (where
/// `--standby` is refused).
pub fn standby_state(opts: &MasterOptions) -> Result<Option<crate::store::Store>> {
    let cfg = git::load_config(&opts.config)
        .map_err(|diags| anyhow::anyhow!("the master config has errors:\n{}", render_diagnostics(&diags, &[])))?;
    let state_dir = opts.state_dir.clone().unwrap_or_else(|| cfg.state_dir());
    match crate::store::Location::from_config(cfg.config.state.as_ref(), &state_dir, &cfg.dir())
        .map_err(|e| anyhow::anyhow!("the master config: {e}"))?
    {
        crate::store::Location::Postgres { url, password, .. } => {
            Ok(Some(crate::store::Store::peek_postgres(&url, password.as_deref())?))
        }
        crate::store::Location::File(_) if opts.standby => {
            anyhow::bail!(
                "--standby needs a PostgreSQL state (`state:` in the master config): a redb file has one master"
            )
        }
        crate::store::Location::File(_) => Ok(None),
    }
}

/// Opens the mirrors and the engine, leaving the first fetch of new mirrors and the head
/// plan to [`serve`], which does them in the background while the API answers (what decides
/// from the head plan waits for it). A local repository path that is not a git repository
/// is an error here.
pub fn open_starting(opts: &MasterOptions) -> Result<Master> {
    open_starting_or_wait(opts, |_| {})
}

/// [`open_starting`]; with `opts.standby`, a PostgreSQL state another master holds is
/// waited for (`waiting` is told who holds it first, before the wait) instead of refused.
pub fn open_starting_or_wait(opts: &MasterOptions, waiting: impl FnOnce(&str)) -> Result<Master> {
    let cfg = git::load_config(&opts.config)
        .map_err(|diags| anyhow::anyhow!("the master config has errors:\n{}", render_diagnostics(&diags, &[])))?;
    // Read first: a missing value stops the start, naming the secret (never showing a value).
    let secrets = crate::secrets::Secrets::load(&cfg).map_err(|e| anyhow::anyhow!("the master config: {e}"))?;
    let state_dir = opts
        .state_dir
        .clone()
        .unwrap_or_else(|| cfg.dir().join(cfg.config.state_dir.as_deref().unwrap_or(".rbb-state")));
    std::fs::create_dir_all(state_dir.join("mirrors")).with_context(|| format!("creating {}", state_dir.display()))?;
    // The state first: a standby waits here, before it reads anything the active master
    // changes (mirrors, heads).
    let at = crate::store::Location::from_config(cfg.config.state.as_ref(), &state_dir, &cfg.dir())
        .map_err(|e| anyhow::anyhow!("the master config: {e}"))?;
    let migrate = if opts.migrate { crate::store::Migrate::Yes } else { crate::store::Migrate::No };
    let store = match (&at, opts.standby) {
        (crate::store::Location::Postgres { url, password, lease }, true) => {
            crate::store::Store::open_postgres_as(
                url,
                password.as_deref(),
                migrate,
                *lease,
                Some(|holder: &str| {
                    tracing::info!(state = %at.shown(), %holder, "standby: another master holds the state; taking over when it stops");
                    waiting(holder);
                }),
            )
        }
        _ => crate::store::Store::open_at(&at, migrate),
    }
    .with_context(|| format!("opening the state in {}", at.shown()))?;
    let mut repos = Vec::new();
    let mut plan_repos = Vec::new();
    let mut source_repos = Vec::new();
    let mut fresh = Vec::new();
    let mut first_fetch = Vec::new();
    for (index, r) in cfg.config.repositories.iter().enumerate() {
        let name = r.effective_name();
        let mirror_dir = state_dir.join("mirrors").join(format!("{name}.git"));
        // Missing or empty: the mirror is made (bare init) in the background at start.
        let new = std::fs::read_dir(&mirror_dir).map_or(true, |mut d| d.next().is_none());
        fresh.push(new);
        std::fs::create_dir_all(&mirror_dir).with_context(|| format!("creating {}", mirror_dir.display()))?;
        let (path, mirror, remote) =
            match cfg.remote(r).map_err(|e| anyhow::anyhow!("repository {name}: fetch_timeout: {e}"))? {
                Some(remote) => {
                    let mirror = Mirror::at(&r.url, &mirror_dir);
                    // Workers hold no forge credentials: they fetch the commit from the mirror.
                    let path = std::fs::canonicalize(&mirror_dir)
                        .with_context(|| format!("repository {name}: {}", mirror_dir.display()))?;
                    (path, mirror.with_remote(remote), true)
                }
                None => {
                    let path = cfg.repo_path(r).map_err(anyhow::Error::msg)?;
                    // Workers run elsewhere: give them an absolute path.
                    let path = std::fs::canonicalize(&path)
                        .with_context(|| format!("repository {name}: {}", path.display()))?;
                    if !(path.join("HEAD").is_file() || path.join(".git").exists()) {
                        anyhow::bail!(
                            "repository {name}: {} is not a git repository (no .git and no HEAD in it)",
                            path.display()
                        );
                    }
                    let mirror = Mirror::at(&path.display().to_string(), &mirror_dir);
                    (path, mirror, false)
                }
            };
        let branch = r.effective_branch().to_owned();
        let mut branches = if r.branches.is_empty() { vec![branch.clone()] } else { r.branches.clone() };
        if !branches.iter().any(|b| b == &branch) {
            // The pipeline branch is always fetched: plans are read from it.
            branches.push(branch.clone());
        }
        let interval = match &r.poll_interval {
            Some(v) => Duration::from_millis(
                parse_duration_ms(v.as_str())
                    .map_err(|e| anyhow::anyhow!("repository {name}: poll_interval: {e}"))?
                    .max(50),
            ),
            None => Duration::from_secs(60),
        };
        repos.push(Repo {
            name: name.clone(),
            path: path.clone(),
            git_dir: mirror_dir.clone(),
            branch: branch.clone(),
        });
        plan_repos.push(PlanRepo {
            name: name.clone(),
            url: r.url.clone(),
            path: mirror_dir.clone(),
            branch: branch.clone(),
        });
        // A local repository's heads are read now, before the API answers: its baseline.
        let mut seen = if new && !remote { Mirror::local_heads(&path, &branches) } else { Default::default() };
        if new {
            // A new mirror of a repository the state has history of (the state came from
            // another master, whose state_dir this one does not share, or the mirror was
            // lost): the newest push the state recorded on a branch is that branch's
            // baseline, so what was pushed since is built, once.
            let recorded = store
                .recorded_heads(&name, &branches, 1000)
                .with_context(|| format!("repository {name}: reading the pushes the state recorded"))?;
            for (branch, commit) in recorded {
                seen.insert(branch, Some(commit));
            }
        }
        let repo = Arc::new(SourceRepo::new(name, r.url.clone(), mirror, branches, interval));
        if new {
            first_fetch.push(FirstFetch { index, repo: repo.clone(), remote, seen });
        }
        source_repos.push(repo);
    }
    let starting = Starting { prepare: source_repos.clone(), fetch: first_fetch };
    let copts = Options {
        worker_labels: Some(cfg.config.workers.iter().map(|w| w.labels.clone()).collect()),
        locks: Some(cfg.config.locks.keys().cloned().collect()),
        secrets: Some(secrets.declared()),
        ..Options::default()
    };
    let planner = Planner::new(plan_repos, copts, Planner::default_evaluator());
    let locks: BTreeMap<String, u32> = cfg.config.locks.iter().map(|(k, v)| (k.clone(), v.max)).collect();
    let cache_limit =
        crate::cache::max_size(cfg.config.cache.as_ref()).map_err(|e| anyhow::anyhow!("the master config: {e}"))?;
    if let Some(url) = &cfg.config.checkout_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        anyhow::bail!(
            "the master config: checkout_url: `{url}` is not an http:// or https:// URL (the master's HTTP address as workers reach it, e.g. http://ci.internal:8010)"
        );
    }
    let engine = Engine::open(&state_dir, store, planner, repos, cfg.config.workers.clone(), locks, opts.heartbeat)
        .with_context(|| format!("opening the state in {}", at.shown()))?;
    engine.set_cache_limit(cache_limit);
    engine.set_secrets(secrets);
    if let Some(url) = &cfg.config.checkout_url {
        engine.serve_checkouts_from(url);
    }
    tracing::info!(state = %at.shown(), files = %state_dir.display(), "state opened");
    let sources = Arc::new(Sources {
        repos: source_repos,
        webhooks: cfg.config.webhooks.clone().unwrap_or_default(),
        poll_slots: Arc::new(tokio::sync::Semaphore::new(crate::sources::POLL_SLOTS)),
    });
    let security =
        crate::http::Security::from_config(&cfg.config).map_err(|e| anyhow::anyhow!("the master config: {e}"))?;
    if !security.tokens.any() {
        tracing::warn!(
            "no tokens and no api_token in the master config: every action is open to anyone who reaches the HTTP port"
        );
    }
    let tls = match &cfg.config.tls {
        Some(t) => Some(crate::tls::ServerTls::load(t, &cfg.dir()).context("the master config: tls")?),
        None => None,
    };
    let client_certs = crate::grpc::ClientCerts {
        all: cfg.config.tls.as_ref().is_some_and(|t| t.require_client_cert),
        workers: cfg.config.workers.iter().filter(|w| w.require_client_cert).map(|w| w.name.clone()).collect(),
    };
    if !client_certs.workers.is_empty() && !tls.as_ref().is_some_and(|t| t.client_ca) {
        let names: Vec<&str> = client_certs.workers.iter().map(String::as_str).collect();
        anyhow::bail!(
            "the master config: workers {} set require_client_cert, which needs tls.cert, tls.key and tls.client_ca",
            names.join(", ")
        );
    }
    let retention = match &cfg.config.retention {
        None => None,
        Some(r) => {
            let every = match &r.interval {
                Some(v) => Duration::from_millis(
                    parse_duration_ms(v.as_str()).map_err(|e| anyhow::anyhow!("retention.interval: {e}"))?.max(1000),
                ),
                None => Duration::from_secs(3600),
            };
            Some((crate::engine::RetentionPolicy::from_config(r), every))
        }
    };
    let mut status_targets = BTreeMap::new();
    for r in &cfg.config.repositories {
        if let Some(t) = crate::forge::status::target_from_config(r, &cfg.dir()).map_err(|e| anyhow::anyhow!("{e}"))? {
            status_targets.insert(r.effective_name(), t);
        }
    }
    Ok(Master {
        engine,
        sources,
        api_token: cfg.config.api_token.clone(),
        security: Arc::new(security),
        tls,
        client_certs,
        fresh,
        starting: Some(starting),
        retention,
        status_targets,
        public_url: cfg.config.public_url.clone(),
        checkout_url: cfg.config.checkout_url.clone(),
        notifications: cfg.config.notifications.clone(),
    })
}

/// Serves until `shutdown` resolves. Calls `ready` once both listeners are bound.
pub async fn serve(
    master: Master,
    opts: &MasterOptions,
    ready: impl FnOnce(Bound),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let grpc =
        tokio::net::TcpListener::bind(opts.grpc).await.with_context(|| format!("binding gRPC on {}", opts.grpc))?;
    let http =
        tokio::net::TcpListener::bind(opts.http).await.with_context(|| format!("binding HTTP on {}", opts.http))?;
    let bound = Bound { http: http.local_addr()?, grpc: grpc.local_addr()?, tls: master.tls.is_some() };
    if matches!(master.engine.database(), crate::store::kv::Db::Pg(_)) {
        // Standbys forward their ports here. A wildcard address is reached on loopback by a
        // standby on this host; one elsewhere needs the host's name (checkout_url's).
        let host = master.checkout_url.as_deref().map(|url| {
            let authority = url.split("://").nth(1).unwrap_or(url).split('/').next().unwrap_or_default();
            authority.rsplit_once(':').map_or(authority, |(h, _)| h).to_owned()
        });
        let reach = |addr: SocketAddr| match (&host, addr.ip().is_unspecified()) {
            (Some(h), _) => format!("{h}:{}", addr.port()),
            (None, true) => format!("127.0.0.1:{}", addr.port()),
            (None, false) => addr.to_string(),
        };
        let (http_at, grpc_at) = (reach(bound.http), reach(bound.grpc));
        let engine = master.engine.clone();
        tokio::task::spawn_blocking(move || engine.store().set_active(&http_at, &grpc_at))
            .await?
            .context("recording this master's address for standbys")?;
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let Master {
        engine,
        sources,
        api_token: _,
        security,
        tls,
        client_certs,
        fresh,
        starting,
        retention,
        status_targets,
        public_url,
        checkout_url: _,
        notifications,
    } = master;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let public_url = public_url.unwrap_or_else(|| format!("{scheme}://{}", bound.http));
    if !notifications.is_empty() {
        crate::forge::notifier::spawn(
            engine.clone(),
            notifications,
            public_url.clone(),
            Arc::new(crate::forge::sender::CurlTransport),
            stop.clone(),
        );
    }
    if !status_targets.is_empty() {
        // Build states queue commit statuses in the same transaction; a sender delivers them.
        let wake = Arc::new(tokio::sync::Notify::new());
        let base_url = public_url.clone();
        engine.report_statuses(crate::engine::StatusSink {
            repos: status_targets.keys().cloned().collect(),
            base_url,
            wake: wake.clone(),
        });
        let outbox = crate::forge::outbox_store::StateOutbox::open(EngineDatabase(engine.clone()))
            .map_err(|e| anyhow::anyhow!("opening the status outbox: {e}"))?;
        let targets: crate::forge::sender::Targets = Arc::new(move |repo: &str| status_targets.get(repo).cloned());
        crate::forge::sender::spawn(
            Arc::new(outbox),
            Arc::new(crate::forge::sender::CurlTransport),
            targets,
            wake,
            stop.clone(),
        );
    }
    let starting_stopped = Arc::new(AtomicBool::new(false));
    let mut start_thread = None;
    match starting {
        None => sources.spawn_pollers(engine.clone(), fresh, stop.clone()),
        Some(start) => {
            // The API answers meanwhile; pollers start once the head plan is read, and
            // webhooks that arrive before then wake them.
            let (engine, sources, stop) = (engine.clone(), sources.clone(), stop.clone());
            // A thread of its own, not the blocking pool: requests waiting for the plan hold
            // pool threads, and must not keep the work they wait for from starting.
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let e = Arc::downgrade(&engine);
            let mut fresh_now = fresh.clone();
            let stopping = starting_stopped.clone();
            start_thread = Some(
                std::thread::Builder::new()
                    .name("rbb-start".into())
                    .spawn(move || {
                        if let Err(e) = start.finish(&e, &mut fresh_now, &stopping) {
                            tracing::error!(error = %format!("{e:#}"), "start: first fetch");
                        }
                        let _ = done_tx.send(fresh_now);
                    })
                    .context("starting the start-up thread")?,
            );
            tokio::spawn(async move {
                let fresh = done_rx.await.unwrap_or_else(|_| {
                    tracing::error!("start: the first fetch and plan thread failed");
                    fresh
                });
                sources.spawn_pollers(engine, fresh, stop);
            });
        }
    }

    // The janitor: retention in the background, one run per interval (with the config's
    // `retention`), and the step cache held to its size limit more often than that.
    let janitor_engine = engine.clone();
    let janitor_stop = stop.clone();
    tokio::spawn(async move {
        let (policy, every) = match retention {
            Some((p, every)) => (Some(p), every),
            None => (None, Duration::from_secs(3600)),
        };
        let mut tick = tokio::time::interval(every);
        let mut cache_tick = tokio::time::interval(CACHE_GC_INTERVAL);
        loop {
            tokio::select! {
                _ = janitor_stop.cancelled() => break,
                _ = tick.tick(), if policy.is_some() => {
                    let e = janitor_engine.clone();
                    let p = policy.clone().unwrap_or_default();
                    let now = crate::model::now_ms();
                    match tokio::task::spawn_blocking(move || e.retention(&p, now)).await {
                        Ok(Err(err)) => tracing::error!(error = %err, "retention failed"),
                        Err(err) => tracing::error!(error = %err, "retention task failed"),
                        Ok(Ok(_)) => {}
                    }
                }
                _ = cache_tick.tick() => {
                    let e = janitor_engine.clone();
                    match tokio::task::spawn_blocking(move || e.cache_gc()).await {
                        Ok(Err(err)) => tracing::error!(error = %err, "step cache collection failed"),
                        Err(err) => tracing::error!(error = %err, "step cache collection task failed"),
                        Ok(Ok(_)) => {}
                    }
                }
            }
        }
    });

    // Cron schedules: a tick every second; each schedule fires once per matching minute.
    let cron_engine = engine.clone();
    let cron_stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = cron_stop.cancelled() => break,
                _ = tick.tick() => {
                    let e = cron_engine.clone();
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
                    match tokio::task::spawn_blocking(move || e.cron_tick(now)).await {
                        Ok(Err(err)) => tracing::error!(error = %err, "cron tick failed"),
                        Err(err) => tracing::error!(error = %err, "cron task failed"),
                        Ok(Ok(_)) => {}
                    }
                }
            }
        }
    });

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

    // A step's outputs list travels in one StepFinished: room for about a million files.
    let svc = WorkerServer::new(crate::grpc::WorkerService { engine: engine.clone(), certs: client_certs })
        .max_decoding_message_size(256 << 20);
    let grpc_stop = stop.clone();
    let grpc_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        // Workers stream logs in 64 KiB chunks: with the default 64 KiB window every chunk
        // would wait a round trip for a window update.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(svc);
    let grpc_task = match &tls {
        Some(t) => {
            let incoming = crate::tls::accept(grpc, t.grpc.clone(), "grpc", stop.clone());
            let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(incoming), |c| {
                Ok::<_, std::io::Error>(c)
            });
            tokio::spawn(grpc_server.serve_with_incoming_shutdown(incoming, async move { grpc_stop.cancelled().await }))
        }
        None => {
            // Small messages (a lease, a cancel) go out at once: without TCP_NODELAY one
            // written behind another waits for the worker's delayed ACK (40 ms).
            let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(grpc), |tcp| {
                tcp.inspect(|t| {
                    let _ = t.set_nodelay(true);
                })
            });
            tokio::spawn(grpc_server.serve_with_incoming_shutdown(incoming, async move { grpc_stop.cancelled().await }))
        }
    };
    let http_stop = stop.clone();
    let app = crate::http::router_secured(engine.clone(), Some(sources.clone()), security)
        .into_make_service_with_connect_info::<SocketAddr>();
    let http_task = match &tls {
        Some(t) => {
            use axum::serve::ListenerExt;
            let incoming = crate::tls::accept(http, t.http.clone(), "http", stop.clone());
            let listener = crate::tls::HttpsListener { incoming, local: bound.http }.tap_io(|_| ());
            tokio::spawn(async move {
                axum::serve(listener, app).with_graceful_shutdown(async move { http_stop.cancelled().await }).await
            })
        }
        None => {
            use axum::serve::ListenerExt;
            let http = http.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            tokio::spawn(async move {
                axum::serve(http, app).with_graceful_shutdown(async move { http_stop.cancelled().await }).await
            })
        }
    };
    ready(bound);
    shutdown.await;
    // Stop taking work, tell the workers, make every stored change durable; then give the
    // listeners a few seconds to close their connections.
    stop.cancel();
    // The start-up work holds the engine while it reads the head plan: let it end first
    // (the fetches stop at once), so the state closes cleanly.
    starting_stopped.store(true, Ordering::Release);
    if let Some(t) = start_thread {
        let joined = tokio::task::spawn_blocking(move || t.join());
        if tokio::time::timeout(SHUTDOWN_GRACE, joined).await.is_err() {
            tracing::warn!("the start-up work still runs after {:?}; stopping without it", SHUTDOWN_GRACE);
        }
    }
    engine.shut_down();
    let closing = async {
        let _ = grpc_task.await;
        let _ = http_task.await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, closing).await.is_err() {
        tracing::warn!("connections still open after {:?}; closing them", SHUTDOWN_GRACE);
    }
    tracing::info!("stopped");
    Ok(())
}

/// How often the janitor holds the step cache to its size limit (besides its retention
/// runs): uploads between two collections may pass the limit by what steps store meanwhile.
const CACHE_GC_INTERVAL: Duration = Duration::from_secs(60);

/// How long open connections get to close at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
