//! The worker's connection to its master: dial, say Hello, heartbeat, run leased steps and
//! report them, and reconnect with capped exponential backoff when the stream is lost.
//!
//! This module speaks the protocol of `schema/proto/worker.proto` and owns the map of running
//! leases; it must not run processes or git itself (that is [`crate::executor`] and
//! [`crate::checkout`]) and must not exit the process: a refusal is returned as
//! [`WorkerError::Refused`] and the binary decides what to do with it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rbb_schema::proto::master_message::Msg as MasterMsg;
use rbb_schema::proto::worker_client::WorkerClient;
use rbb_schema::proto::worker_message::Msg;
use rbb_schema::proto::{
    Heartbeat, Hello, Lease, LeaseRefused, LogChunk, LogStream, MasterMessage, OutputFile, PROTOCOL_VERSION,
    StepFinished, StepResult, StepStarted, WorkerMessage,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Endpoint;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::cache::{self, After, Before, BlobStore, CACHE_DIR, CacheClient, StepCache};
use crate::checkout::{self, CheckoutError, CheckoutSpec, join_inside};
use crate::executor::{
    ContainerOptions, Executor, HealthSpec, MAX_CHUNK, MountSpec, NativeExecutor, Output, ServiceSpec, StepOutcome,
    StepSpec, cancelled, format_secs,
};
use crate::guard::{GuardLink, STATE_DIR};
use crate::mask::{self, Masker};

/// First reconnect delay; doubled after each failed attempt up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Heartbeat interval when Welcome does not set one.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(1000);
/// How long the master may take to answer Hello with Welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long running steps get to stop and report when a session ends.
const WIND_DOWN: Duration = Duration::from_secs(10);
/// Messages queued towards the master (log chunks are up to 1 MiB each).
const OUTBOUND_CAPACITY: usize = 64;
/// Output chunks queued between an executor and the session.
const OUTPUT_CAPACITY: usize = 16;

/// What a worker needs to know to serve a master.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Master URL, e.g. `http://127.0.0.1:7070` (`http://` is assumed when no scheme is given);
    /// several, comma-separated, are tried in turn (a master and its standbys).
    pub master: String,
    pub name: String,
    pub token: String,
    /// Labels offered in Hello.
    pub labels: Vec<String>,
    /// Root of all checkouts; created if missing.
    pub workdir: PathBuf,
    /// Steps run at once (at least 1).
    pub max_steps: u32,
    /// Bytes the local copy of cache blobs may take ([`crate::cache::DEFAULT_MAX_BYTES`]).
    pub cache_max_bytes: u64,
    /// The guard that kills the processes of checkouts if the worker dies (the executor has
    /// its own for the steps' commands); `None` leaves them to the worker alone.
    pub guard: Option<Arc<GuardLink>>,
    /// How to verify an `https://` master (and the checkouts it serves).
    pub tls: Option<crate::tls::TlsFiles>,
}

/// Why [`run`] stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The master refused the session (bad token, unknown worker, protocol version mismatch).
    /// Retrying cannot fix it.
    #[error("the master refused this worker ({code:?}): {message}")]
    Refused { code: Code, message: String },
    /// The TLS handshake failed over certificates (the master's, or this worker's).
    #[error("refusing the master at {url}: {reason}")]
    Tls { url: String, reason: String },
    #[error("invalid master URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("invalid {what}: {reason}")]
    BadConfig { what: &'static str, reason: String },
    #[error("cannot prepare the work directory {}: {source}", path.display())]
    Workdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the step cache's directory: {0}")]
    Cache(#[source] cache::CacheError),
}

/// Serves the master with the native executor until `shutdown` fires (then `Ok`), or until
/// the master refuses this worker or the config is unusable (then `Err`). Lost connections
/// are retried forever.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    run_with_executor(config, Arc::new(NativeExecutor::new()), shutdown).await
}

/// [`run`] with any executor.
pub async fn run_with_executor(
    config: WorkerConfig,
    executor: Arc<dyn Executor>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    // Several masters (a standby that takes over): one connection each, tried in turn.
    let urls: Vec<&str> = config.master.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let first = Connection::new(&config, urls.first().copied().unwrap_or_default(), executor)?;
    let mut conns = Vec::with_capacity(urls.len());
    for url in urls.iter().skip(1) {
        conns.push(first.with_master(url, &config)?);
    }
    conns.insert(0, first);
    let mut next = 0;
    let mut backoff = INITIAL_BACKOFF;
    let mut attempt: u32 = 0;
    loop {
        let conn = &conns[next];
        match conn.session(&shutdown).await {
            Ok(SessionEnd::Shutdown) => {
                info!("shut down");
                return Ok(());
            }
            Ok(SessionEnd::Lost { reason, welcomed }) => {
                // A plain-text worker on a TLS port sees only an HTTP/2 error: ask the port.
                if !welcomed
                    && conn.tls.is_none()
                    && reason.contains("h2 protocol error")
                    && let Some(addr) = conn.url.strip_prefix("http://")
                    && crate::tls::speaks_tls(addr).await
                {
                    let reason =
                        "the master serves TLS on this port: use an https:// master URL and --ca-file".to_owned();
                    error!(master = %conn.url, %reason, "not retrying");
                    return Err(WorkerError::Tls { url: conn.url.clone(), reason });
                }
                if welcomed {
                    backoff = INITIAL_BACKOFF;
                    attempt = 0;
                }
                attempt += 1;
                next = (next + 1) % conns.len();
                warn!(
                    attempt,
                    delay_ms = backoff.as_millis() as u64,
                    %reason,
                    master = %conn.url,
                    "no session with the master; reconnecting"
                );
            }
            Err(err) => {
                error!(%err, master = %conn.url, "the master refused this worker; not retrying");
                return Err(err);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => {
                info!("shut down");
                return Ok(());
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

enum SessionEnd {
    Shutdown,
    Lost { reason: String, welcomed: bool },
}

fn lost(reason: impl Into<String>, welcomed: bool) -> Result<SessionEnd, WorkerError> {
    Ok(SessionEnd::Lost { reason: reason.into(), welcomed })
}

/// A refusal status is fatal; any other status ends the session and is retried.
fn status_end(status: &tonic::Status, welcomed: bool) -> Result<SessionEnd, WorkerError> {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied | Code::FailedPrecondition => {
            Err(WorkerError::Refused { code: status.code(), message: status.message().to_owned() })
        }
        code => lost(format!("{code:?}: {}", status.message()), welcomed),
    }
}

/// Everything fixed across sessions.
struct Connection {
    url: String,
    endpoint: Endpoint,
    /// The TLS dialer of an `https://` master.
    tls: Option<crate::tls::Connector>,
    hello: Hello,
    protocol: AsciiMetadataValue,
    name: AsciiMetadataValue,
    authorization: AsciiMetadataValue,
    max_steps: usize,
    steps: Arc<StepContext>,
}

/// What a step task needs.
struct StepContext {
    workdir: PathBuf,
    executor: Arc<dyn Executor>,
    guard: Option<Arc<GuardLink>>,
    /// The local copy of cache blobs.
    store: BlobStore,
    /// How to authenticate to the master's git service (checkouts it serves).
    git_auth: String,
    /// The CA file that checkouts over https verify the master with.
    ca_file: Option<PathBuf>,
}

/// A master's URL as dialled: the URL, its endpoint, and the TLS dialer of an `https://` one.
fn dial(master: &str, config: &WorkerConfig) -> Result<(String, Endpoint, Option<crate::tls::Connector>), WorkerError> {
    let url = if master.contains("://") { master.to_owned() } else { format!("http://{master}") };
    let bad_url = |reason: String| WorkerError::BadUrl { url: url.clone(), reason };
    let tls = if let Some(rest) = url.strip_prefix("https://") {
        let files = config.tls.as_ref().ok_or_else(|| {
            bad_url("an https:// master needs --ca-file: the CA certificate that signed the master's".to_owned())
        })?;
        let client =
            crate::tls::client_config(files).map_err(|reason| WorkerError::BadConfig { what: "TLS files", reason })?;
        Some((crate::tls::Connector::new(client), format!("http://{rest}")))
    } else if url.starts_with("http://") {
        None
    } else {
        return Err(bad_url("only http:// and https:// are supported".to_owned()));
    };
    // Over TLS the connector speaks TLS itself: tonic sees the address as http.
    let dial = tls.as_ref().map_or_else(|| url.clone(), |(_, plain)| plain.clone());
    let endpoint = Endpoint::from_shared(dial)
        .map_err(|err| bad_url(err.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        // Log chunks flow to the master: large HTTP/2 windows keep them from waiting for
        // a window update per chunk.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20));
    Ok((url, endpoint, tls.map(|(c, _)| c)))
}

impl Connection {
    fn new(config: &WorkerConfig, master: &str, executor: Arc<dyn Executor>) -> Result<Connection, WorkerError> {
        let (url, endpoint, tls) = dial(master, config)?;
        if config.name.is_empty() {
            return Err(WorkerError::BadConfig { what: "worker name", reason: "it is empty".to_owned() });
        }
        if config.max_steps == 0 {
            return Err(WorkerError::BadConfig { what: "max steps", reason: "it must be at least 1".to_owned() });
        }
        let metadata = |what: &'static str, value: String| {
            AsciiMetadataValue::try_from(value)
                .map_err(|_| WorkerError::BadConfig { what, reason: "it must be printable ASCII".to_owned() })
        };
        std::fs::create_dir_all(&config.workdir)
            .map_err(|source| WorkerError::Workdir { path: config.workdir.clone(), source })?;
        let workdir = config
            .workdir
            .canonicalize()
            .map_err(|source| WorkerError::Workdir { path: config.workdir.clone(), source })?;
        let store = BlobStore::open(&workdir, config.cache_max_bytes).map_err(WorkerError::Cache)?;
        Ok(Connection {
            endpoint,
            tls,
            hello: Hello {
                name: config.name.clone(),
                labels: config.labels.clone(),
                max_steps: config.max_steps,
                platform: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                image_platform: executor.image_platform().unwrap_or_default(),
                allowed_mounts: executor.allowed_mounts(),
            },
            protocol: metadata("protocol version", PROTOCOL_VERSION.to_owned())?,
            name: metadata("worker name", config.name.clone())?,
            authorization: metadata("token", format!("Bearer {}", config.token))?,
            max_steps: usize::try_from(config.max_steps).unwrap_or(usize::MAX),
            steps: Arc::new(StepContext {
                workdir,
                executor,
                guard: config.guard.clone(),
                store,
                git_auth: checkout::basic_auth(&config.name, &config.token),
                ca_file: config.tls.as_ref().map(|t| t.ca_file.clone()),
            }),
            url,
        })
    }

    /// The same worker towards another master (sharing the step context and blob store).
    fn with_master(&self, master: &str, config: &WorkerConfig) -> Result<Connection, WorkerError> {
        let (url, endpoint, tls) = dial(master, config)?;
        Ok(Connection {
            url,
            endpoint,
            tls,
            hello: self.hello.clone(),
            protocol: self.protocol.clone(),
            name: self.name.clone(),
            authorization: self.authorization.clone(),
            max_steps: self.max_steps,
            steps: self.steps.clone(),
        })
    }

    /// One session: connect, Hello/Welcome, serve until the stream ends or `shutdown`.
    async fn session(&self, shutdown: &CancellationToken) -> Result<SessionEnd, WorkerError> {
        let connecting = async {
            match &self.tls {
                Some(c) => self.endpoint.connect_with_connector(c.clone()).await,
                None => self.endpoint.connect().await,
            }
        };
        let channel = tokio::select! {
            channel = connecting => match channel {
                Ok(channel) => channel,
                Err(err) => {
                    let refused = self.tls.as_ref().and_then(|c| c.refused.lock().unwrap_or_else(|p| p.into_inner()).take());
                    if let Some(reason) = refused {
                        return Err(WorkerError::Tls { url: self.url.clone(), reason });
                    }
                    return lost(format!("cannot connect: {}", error_chain(&err)), false);
                }
            },
            () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        // The session and the cache calls carry the same metadata.
        let metadata = vec![
            ("rbb-protocol", self.protocol.clone()),
            ("rbb-worker", self.name.clone()),
            ("authorization", self.authorization.clone()),
        ];
        let cache = CacheClient::new(channel.clone(), metadata.clone());
        let mut client = WorkerClient::new(channel);
        let (tx, rx) = mpsc::channel::<WorkerMessage>(OUTBOUND_CAPACITY);
        // The first message is Hello; it is queued before the call so it goes out at once.
        let _ = tx.try_send(message(Msg::Hello(self.hello.clone())));
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        for (key, value) in metadata {
            request.metadata_mut().insert(key, value);
        }

        let response = tokio::select! {
            response = tokio::time::timeout(WELCOME_TIMEOUT, client.session(request)) => response,
            () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        let mut inbound = match response {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return status_end(&status, false),
            Err(_) => {
                return lost(format!("no answer within {}", format_secs(WELCOME_TIMEOUT)), false);
            }
        };
        let first = tokio::select! {
            first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()) => first,
            () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        let welcome = match first {
            Ok(Ok(Some(MasterMessage { msg: Some(MasterMsg::Welcome(welcome)) }))) => welcome,
            Ok(Ok(Some(other))) => {
                return lost(format!("expected Welcome, got {other:?}"), false);
            }
            Ok(Ok(None)) => return lost("the master closed the stream before Welcome", false),
            Ok(Err(status)) => return status_end(&status, false),
            Err(_) => {
                return lost(format!("no Welcome within {}", format_secs(WELCOME_TIMEOUT)), false);
            }
        };
        let interval = match welcome.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        info!(
            master = %self.url,
            master_version = %welcome.master_version,
            labels = ?welcome.labels,
            heartbeat_ms = interval.as_millis() as u64,
            "connected"
        );

        let mut steps = Steps::new(self.max_steps);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(SessionEnd::Shutdown),
                _ = ticker.tick() => {
                    let beat = Heartbeat { sent_unix_ms: unix_ms() };
                    // A full queue means messages are flowing anyway; never block on a beat.
                    if tx.try_send(message(Msg::Heartbeat(beat))).is_err() {
                        debug!("outbound queue full; heartbeat skipped");
                    }
                }
                Some(joined) = steps.tasks.join_next_with_id(), if !steps.tasks.is_empty() => {
                    steps.reap(joined, &tx);
                }
                received = inbound.message() => match received {
                    Ok(Some(MasterMessage { msg: Some(msg) })) => {
                        self.handle(msg, &mut steps, &tx, &cache, shutdown);
                    }
                    Ok(Some(MasterMessage { msg: None })) => debug!("empty message from the master"),
                    Ok(None) => break lost("the master closed the stream", true),
                    Err(status) => break status_end(&status, true),
                },
            }
        };

        // Running steps can only report on this stream: stop them all. Their results are not
        // reported (on shutdown, or because the stream is gone): a step stopped because the
        // session ended did not end by itself, and the master retries it when it sees the
        // session end.
        steps.session_over.cancel();
        if !steps.running.is_empty() {
            info!(steps = steps.running.len(), "stopping running steps");
        }
        for token in steps.running.values() {
            token.cancel();
        }
        if tokio::time::timeout(WIND_DOWN, async { while steps.tasks.join_next().await.is_some() {} }).await.is_err() {
            warn!("steps did not stop in time; aborting them");
            steps.tasks.shutdown().await;
        }
        if matches!(end, Ok(SessionEnd::Shutdown)) {
            // Let the last messages out: close our side and wait briefly for the master's end.
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
        }
        end
    }

    fn handle(
        &self,
        msg: MasterMsg,
        steps: &mut Steps,
        tx: &mpsc::Sender<WorkerMessage>,
        cache: &CacheClient,
        shutdown: &CancellationToken,
    ) {
        match msg {
            MasterMsg::Welcome(_) => debug!("ignoring a second Welcome"),
            MasterMsg::Ended(ended) => {
                let executor = Arc::clone(&self.steps.executor);
                tokio::spawn(async move { executor.end_build_container(ended.build).await });
            }
            MasterMsg::Cancel(cancel) => match steps.running.get(&cancel.lease) {
                Some(token) => {
                    info!(lease = cancel.lease, reason = %cancel.reason, "cancelling step");
                    token.cancel();
                }
                None => debug!(lease = cancel.lease, "cancel for a lease that is not running"),
            },
            MasterMsg::Lease(lease) => {
                let id = lease.lease;
                // A lease that cannot be taken is refused, never answered with a result: the
                // master queues the step again.
                let refuse = |reason: String| {
                    warn!(lease = id, %reason, "lease refused");
                    let refusal = message(Msg::Refused(LeaseRefused { lease: id, reason }));
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(refusal).await;
                    });
                };
                if shutdown.is_cancelled() {
                    return refuse("the worker is shutting down".to_owned());
                }
                if steps.running.contains_key(&id) {
                    return refuse(format!("lease {id} is already running on this worker"));
                }
                // A slot is taken here and given back by the step just before it reports its
                // result, so a lease sent after that result always finds it free.
                let Ok(slot) = Arc::clone(&steps.slots).try_acquire_owned() else {
                    return refuse(format!(
                        "the worker is full ({} of {} steps running)",
                        self.max_steps, self.max_steps
                    ));
                };
                let token = CancellationToken::new();
                steps.running.insert(id, token.clone());
                let task = run_step(
                    lease,
                    Arc::clone(&self.steps),
                    cache.clone(),
                    tx.clone(),
                    slot,
                    token,
                    Ending { shutdown: shutdown.clone(), session_over: steps.session_over.clone() },
                );
                let handle = steps.tasks.spawn(task);
                steps.leases.insert(handle.id(), id);
            }
        }
    }
}

/// The steps running in one session.
struct Steps {
    /// One permit per step the worker may run at once; each running step owns one until it
    /// is about to report its result.
    slots: Arc<Semaphore>,
    /// Lease id → the token that stops it (until its task is reaped).
    running: HashMap<u64, CancellationToken>,
    tasks: JoinSet<()>,
    /// Task id → lease id, to know which lease a finished (or panicked) task was.
    leases: HashMap<tokio::task::Id, u64>,
    /// Fired when the session ends: steps stopped from then on report nothing.
    session_over: CancellationToken,
}

/// Why a step may be stopped without it being the step's own result.
struct Ending {
    shutdown: CancellationToken,
    session_over: CancellationToken,
}

impl Ending {
    fn reason(&self) -> Option<&'static str> {
        if self.shutdown.is_cancelled() {
            Some("the worker is shutting down")
        } else if self.session_over.is_cancelled() {
            Some("the session with the master ended")
        } else {
            None
        }
    }
}

impl Steps {
    fn new(max_steps: usize) -> Steps {
        Steps {
            slots: Arc::new(Semaphore::new(max_steps.min(Semaphore::MAX_PERMITS))),
            running: HashMap::new(),
            tasks: JoinSet::new(),
            leases: HashMap::new(),
            session_over: CancellationToken::new(),
        }
    }

    fn reap(
        &mut self,
        joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
        tx: &mpsc::Sender<WorkerMessage>,
    ) {
        let (task, failure) = match joined {
            Ok((task, ())) => (task, None),
            Err(err) => (err.id(), Some(err)),
        };
        let Some(lease) = self.leases.remove(&task) else {
            return;
        };
        self.running.remove(&lease);
        if let Some(err) = failure {
            error!(lease, %err, "step task failed");
            let outcome = StepOutcome::exception(format!("worker bug: {err}"), Duration::ZERO);
            let report = finished(lease, &Report::ran(outcome));
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(report).await;
            });
        }
    }
}

/// Runs one lease: StepStarted, the checkout if the lease carries one, the command, then
/// StepFinished, with all output as LogChunks in between. `slot` is given back just before
/// StepFinished is queued.
async fn run_step(
    lease: Lease,
    ctx: Arc<StepContext>,
    cache: CacheClient,
    tx: mpsc::Sender<WorkerMessage>,
    slot: OwnedSemaphorePermit,
    cancel: CancellationToken,
    ending: Ending,
) {
    let id = lease.lease;
    let span = info_span!("step", lease = id, build = lease.build, step = %lease.step_name);
    async move {
        info!(builder = %lease.builder, command = %lease.command, "step started");
        let start = Instant::now();
        let _ = tx.send(message(Msg::Started(StepStarted { lease: id }))).await;
        if lease.mask.iter().any(|v| v.len() < mask::MIN_MASKED_LEN) {
            warn!("a secret of this step is shorter than {} bytes: it is not masked in the log", mask::MIN_MASKED_LEN);
        }
        let masker = Masker::new(&lease.mask).map(Arc::new);
        let (out_tx, out_rx) = mpsc::channel(OUTPUT_CAPACITY);
        let step_masker = masker.clone();
        let work = async move {
            let mut report = execute(&lease, &ctx, &cache, &out_tx, &cancel).await;
            // The secrets are this step's only: they go with the lease, here.
            drop(lease);
            let outcome = &mut report.outcome;
            outcome.duration = start.elapsed();
            if let Some(m) = &step_masker {
                outcome.reason = m.mask_str(&outcome.reason);
            }
            // Stopped because the worker shuts down or the session ended: not a result of the
            // step. It is not reported; the master sees the session end and retries the step.
            let interrupted = match ending.reason() {
                Some(why) if outcome.result == StepResult::Cancelled => Some(why),
                _ => None,
            };
            let summary = if let Some(why) = interrupted {
                format!("# stopped: {why} (after {})\n", took(outcome.duration))
            } else if report.cached {
                format!("# cached: not run (took {})\n", took(outcome.duration))
            } else if outcome.result == StepResult::Success {
                format!("# exit code 0 (took {})\n", took(outcome.duration))
            } else {
                format!(
                    "# {}: {} (took {})\n",
                    outcome.result.as_str_name().trim_start_matches("STEP_RESULT_"),
                    outcome.reason,
                    took(outcome.duration)
                )
            };
            let _ = out_tx.send(Output::Header(summary.into_bytes())).await;
            (report, interrupted)
        };
        let ((report, interrupted), ()) = tokio::join!(work, forward_logs(id, out_rx, tx.clone(), masker));
        drop(slot);
        if let Some(why) = interrupted {
            info!(%why, "step stopped; left for the master to retry");
            return;
        }
        info!(result = ?report.outcome.result, reason = %report.outcome.reason, cached = report.cached, "step finished");
        let _ = tx.send(finished(id, &report)).await;
    }
    .instrument(span)
    .await;
}

/// How a step ended, as reported in its StepFinished.
struct Report {
    outcome: StepOutcome,
    /// What its `outputs` matched, every blob uploaded (after a SUCCESS of a cacheable step).
    outputs: Vec<OutputFile>,
    /// Restored from the cache instead of run.
    cached: bool,
}

impl Report {
    fn ran(outcome: StepOutcome) -> Report {
        Report { outcome, outputs: Vec::new(), cached: false }
    }
}

/// One step: prepare its checkout, ask the cache (when the lease allows it), run it, and store
/// its outputs after a SUCCESS. The cache never makes a step fail: its troubles are header
/// lines, and a Cancel while it works ends the step CANCELLED.
async fn execute(
    lease: &Lease,
    ctx: &StepContext,
    cache: &CacheClient,
    out: &mpsc::Sender<Output>,
    cancel: &CancellationToken,
) -> Report {
    let start = Instant::now();
    // `pass_env` values are read once: the Lookup hashes what the step then gets. The step's
    // own `env` wins over a passed variable of the same name.
    let passed = cache::pass_env_values(&lease.pass_env);
    let mut env: BTreeMap<String, String> = passed
        .iter()
        .filter_map(|(name, value)| Some((name.clone(), value.as_ref()?.to_string_lossy().into_owned())))
        .collect();
    env.extend(lease.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    // For this step only; the spec (and with it the values) is dropped when the step ends.
    env.extend(lease.secret_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let spec = match prepare(lease, ctx, env, out, cancel).await {
        Ok(spec) => spec,
        Err(outcome) => return Report::ran(outcome),
    };
    let Some(step_cache) = &lease.cache else {
        return Report::ran(ctx.executor.run(spec, out.clone(), cancel.clone()).await);
    };
    let checkout = spec.container.checkout.clone();
    let cx = StepCache {
        client: cache,
        store: &ctx.store,
        executor: ctx.executor.as_ref(),
        lease,
        outputs: &step_cache.outputs,
        checkout: &checkout,
        pass_env: &passed,
        out,
        cancel,
    };
    let answered = match cx.before().await {
        Before::Restored(outcome) => {
            if !lease.image.is_empty() && lease.build_container && lease.last_in_container {
                ctx.executor.end_build_container(lease.build).await;
            }
            return Report { outcome, outputs: Vec::new(), cached: true };
        }
        Before::Cancelled => return Report::ran(cancelled(start.elapsed())),
        Before::Run(answered) => answered,
    };
    let outcome = ctx.executor.run(spec, out.clone(), cancel.clone()).await;
    if outcome.result != StepResult::Success {
        return Report::ran(outcome);
    }
    match cx.after(answered.as_ref(), &outcome).await {
        After::Stored(outputs) => Report { outcome, outputs, cached: false },
        After::NotStored => Report::ran(outcome),
        After::Cancelled => Report::ran(cancelled(start.elapsed())),
    }
}

/// Makes the step ready to run: the checkout when the lease carries one (or the check that
/// the directory holds this build's), then the spec. `Err` is the step's outcome.
async fn prepare(
    lease: &Lease,
    ctx: &StepContext,
    env: BTreeMap<String, String>,
    out: &mpsc::Sender<Output>,
    cancel: &CancellationToken,
) -> Result<StepSpec, StepOutcome> {
    let start = Instant::now();
    // The step's summary line carries the reason into the log as well.
    let failed = |reason: String| StepOutcome::exception(reason, start.elapsed());
    let checkout_path = match join_inside(&ctx.workdir, &lease.checkout_dir, "checkout_dir", false) {
        Ok(path) => path,
        Err(err) => return Err(failed(err.to_string())),
    };
    if checkout_path.starts_with(ctx.workdir.join(STATE_DIR)) || checkout_path.starts_with(ctx.workdir.join(CACHE_DIR))
    {
        return Err(failed(format!("checkout_dir {:?} is the worker's own directory", lease.checkout_dir)));
    }
    if let Some(wanted) = &lease.checkout {
        let spec = CheckoutSpec {
            workdir: &ctx.workdir,
            checkout_dir: &lease.checkout_dir,
            url: &wanted.url,
            commit: &wanted.commit,
            build: lease.build,
            auth: wanted.from_master.then_some(ctx.git_auth.as_str()),
            ca_file: ctx.ca_file.as_deref(),
        };
        match checkout::checkout(&spec, out, cancel, ctx.guard.as_ref()).await {
            Ok(_) => {}
            Err(CheckoutError::Cancelled) => return Err(cancelled(start.elapsed())),
            Err(err) => return Err(failed(format!("checkout failed: {err}"))),
        }
    } else {
        // A later step of a build runs in that build's checkout, never in a tree another build
        // (or a failed checkout) left there.
        let path = checkout_path.display();
        let build = lease.build;
        match checkout::marked_build(&checkout_path) {
            Some(held) if held == build => {}
            _ if !checkout_path.is_dir() => {
                return Err(failed(format!(
                    "checkout directory {path} does not exist (the build's checkout failed or was never leased to this worker)"
                )));
            }
            Some(held) => {
                return Err(failed(format!(
                    "checkout directory {path} holds build {held}'s checkout, not build {build}'s (this build's checkout failed or was never leased to this worker)"
                )));
            }
            None => {
                return Err(failed(format!(
                    "checkout directory {path} holds no checkout of build {build} (its checkout failed or was never leased to this worker)"
                )));
            }
        }
    }
    let cwd = match join_inside(&checkout_path, &lease.workdir, "workdir", true) {
        Ok(path) => path,
        Err(err) => return Err(failed(err.to_string())),
    };
    if !lease.workdir.is_empty() {
        let _ = out.send(Output::Header(format!("$ cd {}\n", lease.workdir).into_bytes())).await;
    }
    let _ = out.send(Output::Header(format!("$ {}\n", lease.command).into_bytes())).await;
    let spec = StepSpec {
        command: lease.command.clone(),
        env,
        cwd,
        timeout: (lease.timeout_secs > 0).then(|| Duration::from_secs(lease.timeout_secs)),
        image: (!lease.image.is_empty()).then(|| lease.image.clone()),
        container: ContainerOptions {
            build: lease.build,
            checkout: checkout_path,
            build_container: lease.build_container,
            last_in_container: lease.last_in_container,
            memory_bytes: lease.memory_bytes,
            cpus_milli: lease.cpus_milli,
            network: lease.network.clone(),
            user: lease.user.clone(),
            mounts: lease
                .mounts
                .iter()
                .map(|m| MountSpec { source: m.source.clone(), target: m.target.clone() })
                .collect(),
            platform: lease.platform.clone(),
            services: lease.services.iter().map(service_spec).collect(),
        },
    };
    Ok(spec)
}

/// A lease's service as the executor takes it.
fn service_spec(s: &rbb_schema::proto::Service) -> ServiceSpec {
    ServiceSpec {
        name: s.name.clone(),
        image: s.image.clone(),
        env: s.env.clone().into_iter().collect(),
        command: Some(s.command.clone()).filter(|c| !c.is_empty()),
        health: (!s.health_command.is_empty()).then(|| HealthSpec {
            command: s.health_command.clone(),
            interval: Duration::from_millis(s.health_interval_ms.max(1)),
            retries: s.health_retries.max(1),
            timeout: Duration::from_millis(s.health_timeout_ms.max(1)),
        }),
    }
}

/// Forwards output chunks as LogChunks until the step drops its sender, masking the step's
/// secrets first when it has some. If the session is gone, chunks are dropped so the step is
/// never blocked.
async fn forward_logs(
    lease: u64,
    mut out: mpsc::Receiver<Output>,
    tx: mpsc::Sender<WorkerMessage>,
    masker: Option<Arc<Masker>>,
) {
    let mut open = true;
    // With secrets, the end of a chunk that may start one waits for the next chunk of the
    // same stream; another stream's chunk or the end of the step sends it.
    let mut masking = masker.as_ref().map(|m| (m.stream(), LogStream::Stdout));
    let send = |stream: LogStream, data: Vec<u8>| {
        let tx = tx.clone();
        async move {
            for piece in data.chunks(MAX_CHUNK) {
                let log = LogChunk { lease, stream: stream as i32, data: piece.to_vec() };
                if tx.send(message(Msg::Log(log))).await.is_err() {
                    return false;
                }
            }
            true
        }
    };
    while let Some(chunk) = out.recv().await {
        if !open {
            continue;
        }
        let (stream, data) = match chunk {
            Output::Stdout(data) => (LogStream::Stdout, data),
            Output::Stderr(data) => (LogStream::Stderr, data),
            Output::Header(data) => (LogStream::Header, data),
        };
        let data = match &mut masking {
            None => data,
            Some((masked, current)) => {
                if *current != stream {
                    let rest = masked.finish();
                    if !rest.is_empty() && !send(*current, rest).await {
                        open = false;
                        continue;
                    }
                    *current = stream;
                }
                masked.push(&data)
            }
        };
        if !data.is_empty() && !send(stream, data).await {
            open = false;
        }
    }
    if open && let Some((mut masked, current)) = masking {
        let rest = masked.finish();
        if !rest.is_empty() {
            send(current, rest).await;
        }
    }
}

fn finished(lease: u64, report: &Report) -> WorkerMessage {
    let outcome = &report.outcome;
    message(Msg::Finished(StepFinished {
        lease,
        result: outcome.result as i32,
        exit_code: outcome.exit_code,
        reason: outcome.reason.clone(),
        duration_ms: u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
        image_digest: outcome.image_digest.clone(),
        outputs: report.outputs.clone(),
        cached: report.cached,
    }))
}

fn message(msg: Msg) -> WorkerMessage {
    WorkerMessage { msg: Some(msg) }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

fn took(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// An error and its sources, `: `-separated (transport errors hide the cause in sources).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
