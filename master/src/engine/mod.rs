//! The engine: builds, steps, workers and leases, and the rules that move them along.
//!
//! Every state change runs as one transaction ([`Tx`]) under the engine's lock: the change is
//! computed on the in-memory state (each record it touches is saved first), written to the
//! store in one redb transaction, and only then announced (events to subscribers, messages to
//! workers). When the store refuses the write, the saved records are put back and nothing is
//! announced: memory, disk and what subscribers hear never disagree. Nothing outside this
//! module mutates build state. The rules that decide a result are pure functions in
//! [`rules`]; the submodules split the rest by concern:
//! - `dispatch`: the queue: which pending build starts where, and why the others wait;
//! - `steps`: step semantics: leasing the next step, results, finishing and losing builds;
//! - `sessions`: worker sessions, liveness and their messages;
//! - `triggers`: changes, forces, rebuilds, stops, queue policy and cron;
//! - `heads`: the head plan read after the engine opened, and what waits for it;
//! - `read`: the read side the REST API uses;
//! - `retention`: the janitor that ages logs and builds out of the store;
//! - `cache`: the step cache's lookups, hits and misses;
//! - `cache_admin`: the step cache's size limit, eviction, stats and resets.

mod cache;
mod cache_admin;
mod dispatch;
mod heads;
mod read;
mod retention;
pub mod rules;
mod sessions;
mod steps;
#[cfg(test)]
mod tests;
mod triggers;

use crate::logs::LogFiles;
use crate::model::{BuildRecord, ChangeRecord, LogRecord, ScheduleRecord};
use crate::planner::Planner;
use crate::store::{Batch, Store, StoreError, Sync};
use rbb_schema::api::State;
use rbb_schema::config::WorkerConfig;
use rbb_schema::plan::Plan;
use rbb_schema::proto::{MasterMessage, master_message::Msg as MasterMsg};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};

pub use cache::LookupError;
pub use read::FinishedBuild;
pub use retention::{Policy as RetentionPolicy, Report as RetentionReport};
pub use sessions::Liveness;
pub use triggers::{NewCommit, PullRequestChange, branch_matches, paths_match};

/// A build is given up on (EXCEPTION) once this many of its attempts lost their worker.
const MAX_WORKER_LOSSES: u32 = 3;

/// What changed, for live subscribers (SSE, tests).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Build { id: u64 },
    Step { build: u64, step: u32 },
    Log { id: u64, bytes: u64 },
    Worker { name: String },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("log file: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Blob(#[from] crate::cache::blobs::BlobError),
    #[error("the master is shutting down")]
    ShuttingDown,
}

/// Why a worker was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownWorker,
    BadToken,
}

/// A repository as the engine needs it to start builds.
#[derive(Debug, Clone)]
pub struct Repo {
    pub name: String,
    /// Local path of the repository (what workers clone).
    pub path: PathBuf,
    /// Where the master reads commits from (the repository's bare mirror).
    pub git_dir: PathBuf,
    pub branch: String,
}

pub type SessionTx = mpsc::Sender<Result<MasterMessage, tonic::Status>>;

struct Session {
    id: u64,
    tx: SessionTx,
    /// Stamped by the gRPC reader as each message arrives, before the engine's lock.
    liveness: Arc<Liveness>,
    peer: String,
}

struct WorkerState {
    config: WorkerConfig,
    labels: BTreeSet<String>,
    max_steps: u32,
    platform: Option<String>,
    /// The platform of the images its engine runs, as its Hello said; `None` without one.
    image_platform: Option<String>,
    /// Host path prefixes its containers may mount (its `--allow-mount`).
    allowed_mounts: Vec<String>,
    session: Option<Session>,
    /// Builds assigned to this worker, by builder id (one build per builder at a time: the
    /// checkout directory is per builder).
    builds: BTreeMap<String, u64>,
    last_seen_ms: Option<u64>,
}

#[derive(Debug, Clone)]
struct LeaseInfo {
    build: u64,
    step: u32,
    worker: String,
    /// Whether the lease carried the build's checkout.
    checkout: bool,
    /// What `Lookup` answered for the step (its key, and the entry it reuses on a hit: the
    /// entry is pinned while the lease lives).
    cache: Option<Box<cache::LeaseCache>>,
}

struct Inner {
    plan: Arc<Plan>,
    /// Plans by hash: those live builds and recent reads use (history stays in the store).
    plans: HashMap<String, Arc<Plan>>,
    /// Live builds (pending and running); finished ones are read from the store.
    builds: BTreeMap<u64, BuildRecord>,
    /// Pending builds in dispatch order: (negated priority, id).
    pending: BTreeSet<(i64, u64)>,
    running: BTreeSet<u64>,
    /// Why each pending build waits, as the last dispatch saw it.
    waiting: HashMap<u64, String>,
    /// Logs being written; finished ones are read from the store.
    logs: HashMap<u64, LogRecord>,
    workers: BTreeMap<String, WorkerState>,
    leases: HashMap<u64, LeaseInfo>,
    /// Running builds whose last lease was refused: their next step waits for a free slot.
    stalled: BTreeSet<u64>,
    schedules: HashMap<String, ScheduleRecord>,
    next_change: u64,
    next_build: u64,
    next_lease: u64,
    next_log: u64,
    next_session: u64,
    /// Step results the store could not take yet (a full disk): applied again on the next
    /// heartbeat tick, so no build waits forever for a result that already arrived.
    unapplied: Vec<(String, rbb_schema::proto::StepFinished)>,
    /// Group commit: the sequence number of the last change that must be durable, the
    /// last one that is, whether a flush runs, and the effects waiting for it (in order).
    next_seq: u64,
    durable_seq: u64,
    flushing: bool,
    /// A flush was handed to the blocking pool and has not started yet.
    flush_scheduled: bool,
    held: std::collections::VecDeque<(u64, Vec<Effect>)>,
    /// Set once shutdown began: no new work is accepted.
    closing: bool,
}

/// Plans kept in memory beyond those live builds and the head use.
const SPARE_PLANS: usize = 16;

impl Inner {
    /// Drops plans no live build uses once there are more than a few spare ones.
    fn trim_plans(&mut self) {
        if self.plans.len() <= SPARE_PLANS {
            return;
        }
        let used: BTreeSet<&str> =
            self.builds.values().map(|b| b.plan_hash.as_str()).chain([self.plan.hash.as_str()]).collect();
        let drop: Vec<String> = self.plans.keys().filter(|h| !used.contains(h.as_str())).cloned().collect();
        for h in drop {
            self.plans.remove(&h);
        }
    }

    fn index(&mut self, id: u64) {
        let Some(b) = self.builds.get(&id) else {
            self.running.remove(&id);
            self.pending.retain(|(_, i)| *i != id);
            return;
        };
        let key = (-i64::from(b.priority), id);
        match b.state {
            State::Pending => {
                self.running.remove(&id);
                self.pending.insert(key);
            }
            State::Running => {
                self.pending.remove(&key);
                self.waiting.remove(&id);
                self.running.insert(id);
            }
            State::Finished => {
                self.pending.remove(&key);
                self.waiting.remove(&id);
                self.running.remove(&id);
            }
        }
    }
}

pub struct Engine {
    state: Mutex<Inner>,
    store: Store,
    pub logs: LogFiles,
    events: broadcast::Sender<Event>,
    /// Log progress has its own channel: a busy log never pushes build events out of a
    /// slow subscriber's window.
    log_events: broadcast::Sender<Event>,
    repos: BTreeMap<String, Repo>,
    planner: Planner,
    /// Declared locks and their `max`.
    locks: BTreeMap<String, u32>,
    pub heartbeat: Duration,
    /// Engine clock origin for liveness stamps.
    epoch: Instant,
    /// Signalled when a group-commit flush ends.
    flushed: std::sync::Condvar,
    /// Repositories that report commit statuses, the link base, and the sender to wake.
    statuses: std::sync::RwLock<Option<StatusSink>>,
    /// The step cache's blob files.
    blobs: crate::cache::blobs::Blobs,
    /// `cache.max_size`, in stored bytes.
    cache_limit: std::sync::atomic::AtomicU64,
    /// Held by the one cache collection running, and by a lookup while it checks an entry
    /// and pins it: an entry offered as a hit is never collected under its lease.
    cache_gc: Mutex<()>,
    /// Git ids of step inputs, read from the mirrors (the repositories stay open).
    inputs: crate::cache::key::InputResolver,
    /// Where workers clone from when the master serves its mirrors (`checkout_url`): leases
    /// then name `<base>/git/<repository>.git` instead of the mirror's path.
    checkout_base: std::sync::RwLock<Option<String>>,
    /// The declared secrets' values (never stored, never announced): leases of steps that
    /// use one carry them in `secret_env`.
    secrets: std::sync::RwLock<Arc<crate::secrets::Secrets>>,
    /// Whether the head plan has been read since the engine opened.
    heads: heads::Heads,
    /// (durable sequence number, failed flushes), for sessions awaiting a flush.
    flushes: tokio::sync::watch::Sender<(u64, u64)>,
}

/// Where build states go as commit statuses (see `forge`).
pub struct StatusSink {
    pub repos: BTreeSet<String>,
    /// The UI's address, for the statuses' links.
    pub base_url: String,
    pub wake: Arc<tokio::sync::Notify>,
}

impl Engine {
    /// Opens the state directory and recovers from a previous run: finished results are
    /// kept; builds that were running are marked RETRY and queued again (CANCELLED if they
    /// had been stopped); pending ones wait.
    pub fn open(
        state_dir: &std::path::Path,
        store: Store,
        planner: Planner,
        repos: Vec<Repo>,
        workers: Vec<WorkerConfig>,
        locks: BTreeMap<String, u32>,
        heartbeat: Duration,
    ) -> Result<Arc<Engine>, EngineError> {
        std::fs::create_dir_all(state_dir)?;
        // The head plan is read afterwards ([`Engine::read_heads`]): until then it is empty
        // and what decides from it waits.
        let plan = planner.head_plan();
        let logs = LogFiles::new(&state_dir.join("logs"))?;
        let blobs = crate::cache::blobs::Blobs::open(state_dir)?;
        // Only live builds come into memory: history is read from the store on demand.
        let mut builds: BTreeMap<u64, BuildRecord> = BTreeMap::new();
        for state in ["pending", "running"] {
            store.scan_builds(Some(&crate::store::index_key("state", state)), false, |b| {
                builds.insert(b.id, b);
                true
            })?;
        }
        let mut plans: HashMap<String, Arc<Plan>> = HashMap::new();
        plans.insert(plan.hash.clone(), plan.clone());
        for b in builds.values() {
            if !plans.contains_key(&b.plan_hash)
                && let Some(p) = store.plan(&b.plan_hash)?
            {
                plans.insert(p.hash.clone(), Arc::new(p));
            }
        }
        let (last_build, last_log, last_change) = store.last_ids()?;
        let schedules = store.schedules()?.into_iter().collect();
        // Logs that were being written when the master stopped: their length is what reached
        // the disk.
        let mut repaired = Vec::new();
        for b in builds.values() {
            for s in b.steps.iter().filter(|s| s.state == State::Running) {
                if let Some(mut l) = s.log_id.map(|id| store.log(id)).transpose()?.flatten()
                    && !l.finished
                {
                    l.bytes = logs.size_on_disk(&l.file);
                    l.finished = true;
                    repaired.push(l);
                }
            }
        }
        store.commit(Batch { logs: repaired.iter().collect(), ..Batch::default() }, Sync::Durable)?;
        let workers = workers
            .into_iter()
            .map(|w| {
                let labels = w.labels.iter().cloned().collect();
                let max_steps = w.max_steps.unwrap_or(1).max(1);
                (
                    w.name.clone(),
                    WorkerState {
                        config: w,
                        labels,
                        max_steps,
                        platform: None,
                        image_platform: None,
                        allowed_mounts: Vec::new(),
                        session: None,
                        builds: BTreeMap::new(),
                        last_seen_ms: None,
                    },
                )
            })
            .collect();
        let mut inner = Inner {
            plan,
            plans,
            builds,
            pending: BTreeSet::new(),
            running: BTreeSet::new(),
            waiting: HashMap::new(),
            logs: HashMap::new(),
            workers,
            leases: HashMap::new(),
            stalled: BTreeSet::new(),
            schedules,
            next_change: last_change + 1,
            next_build: last_build + 1,
            next_lease: 1,
            next_log: last_log + 1,
            next_session: 1,
            unapplied: Vec::new(),
            next_seq: 0,
            durable_seq: 0,
            flushing: false,
            flush_scheduled: false,
            held: std::collections::VecDeque::new(),
            closing: false,
        };
        let ids: Vec<u64> = inner.builds.keys().copied().collect();
        for id in ids {
            inner.index(id);
        }
        let (events, _) = broadcast::channel(4096);
        let (log_events, _) = broadcast::channel(4096);
        let engine = Arc::new(Engine {
            state: Mutex::new(inner),
            store,
            logs,
            events,
            log_events,
            repos: repos.into_iter().map(|r| (r.name.clone(), r)).collect(),
            planner,
            locks,
            heartbeat,
            epoch: Instant::now(),
            flushed: std::sync::Condvar::new(),
            statuses: std::sync::RwLock::new(None),
            blobs,
            cache_limit: std::sync::atomic::AtomicU64::new(crate::cache::DEFAULT_MAX_SIZE),
            cache_gc: Mutex::new(()),
            inputs: crate::cache::key::InputResolver::new(),
            checkout_base: std::sync::RwLock::new(None),
            secrets: std::sync::RwLock::new(Arc::default()),
            heads: heads::Heads::new(),
            flushes: tokio::sync::watch::channel((0, 0)).0,
        });
        engine.recover()?;
        Ok(engine)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Build, step and worker events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Log progress events (`Event::Log`).
    pub fn subscribe_logs(&self) -> broadcast::Receiver<Event> {
        self.log_events.subscribe()
    }

    fn emit_now(&self, e: Event) {
        let _ = match e {
            Event::Log { .. } => self.log_events.send(e),
            e => self.events.send(e),
        };
    }

    /// Milliseconds on the engine's monotonic clock.
    fn clock_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs one state change: `f` computes it on the state through a [`Tx`]; the changed
    /// records are written in one store transaction; then events and worker messages go
    /// out. If `f` or the store fails, every record `f` touched is put back and nothing is
    /// announced.
    fn transact<T>(
        &self,
        st: &mut Inner,
        f: impl FnOnce(&Engine, &mut Tx<'_>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut tx = Tx::begin(st, &self.store);
        let out = match f(self, &mut tx) {
            Ok(v) => v,
            Err(e) => {
                tx.rollback();
                return Err(e);
            }
        };
        let (effects, durable) = tx.commit(self)?;
        self.deliver(st, effects, durable);
        Ok(out)
    }

    /// Announces a committed transaction's effects at once, or, when the change must be
    /// durable first (or an earlier one is still waiting), holds them in order until
    /// [`Engine::settle`] has made the store durable.
    fn deliver(&self, st: &mut Inner, effects: Vec<Effect>, durable: bool) {
        if durable {
            st.next_seq += 1;
            let seq = st.next_seq;
            st.held.push_back((seq, effects));
        } else if let Some(seq) = st.held.back().map(|h| h.0) {
            st.held.push_back((seq, effects));
        } else {
            self.announce(st, effects);
        }
    }

    /// From now on, workers check out from the master's git service at `base` (the
    /// master's HTTP address as workers reach it) rather than from the mirror's path, so
    /// workers on other hosts need neither the master's disk nor the forge's credentials.
    pub fn serve_checkouts_from(&self, base: &str) {
        *self.checkout_base.write().unwrap_or_else(|p| p.into_inner()) = Some(base.trim_end_matches('/').to_owned());
    }

    /// The secrets leases fill in from now on (read from the master config at start).
    pub fn set_secrets(&self, secrets: crate::secrets::Secrets) {
        *self.secrets.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(secrets);
    }

    pub(crate) fn secrets(&self) -> Arc<crate::secrets::Secrets> {
        self.secrets.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The URL a build's first lease tells its worker to clone, and whether it is the
    /// master's own git service.
    fn checkout_url(&self, repo: &str, path: &str) -> (String, bool) {
        match self.checkout_base.read().unwrap_or_else(|p| p.into_inner()).as_deref() {
            Some(base) => (format!("{base}/git/{repo}.git"), true),
            None => (path.to_owned(), false),
        }
    }

    /// From now on, state changes of builds of `sink.repos` queue commit statuses in the
    /// same store transaction.
    pub fn report_statuses(&self, sink: StatusSink) {
        *self.statuses.write().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// The redb database, for the forge outbox's reader.
    pub fn database(&self) -> &crate::store::kv::Db {
        self.store.database()
    }

    /// The state store (the step cache's records are read and written through it).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The step cache's blob files.
    pub fn blobs(&self) -> &crate::cache::blobs::Blobs {
        &self.blobs
    }

    /// For changes that wait to be made durable: what to wait for (see
    /// [`Engine::durable_reached`]), and whether the caller should run [`Engine::settle`]
    /// for them: true once until a flush starts, and never while one runs (the running
    /// flush takes every change stored before its last look, so one thread flushes for
    /// everyone and no thread waits on another's flush). `None`: nothing waits.
    pub fn flush_needed(&self) -> Option<(u64, bool)> {
        let mut st = self.lock();
        if st.durable_seq >= st.next_seq {
            return None;
        }
        let run = !st.flushing && !st.flush_scheduled;
        st.flush_scheduled |= run;
        Some((st.next_seq, run))
    }

    /// Waits until every change that must be durable before it is announced (a result, a
    /// stop, recorded changes) is durable, so that a reader never sees what a crash could
    /// still take back. Costs nothing when none is pending; otherwise it shares the next
    /// group flush (and starts it when nobody has).
    pub async fn durable_for_readers(self: &Arc<Self>) {
        if let Some((target, run)) = self.flush_needed() {
            if run {
                let engine = self.clone();
                tokio::task::spawn_blocking(move || engine.settle());
            }
            self.durable_reached(target).await;
        }
    }

    /// Waits, without holding a thread, until the changes up to `target` (from
    /// [`Engine::flush_needed`]) are durable, or a flush failed (the next one retries).
    pub async fn durable_reached(&self, target: u64) {
        let mut rx = self.flushes.subscribe();
        let failures = rx.borrow().1;
        let _ = rx.wait_for(|(durable, failed)| *durable >= target || *failed != failures).await;
    }

    /// Group commit: makes every change stored so far durable with one fsync, taken outside
    /// the engine's lock (one caller flushes, the others wait for it), then announces what
    /// was held. Every entry point calls this after it let go of the lock; an API answer or
    /// a message to a worker that depends on a durable change therefore goes out only once
    /// it is on disk.
    pub fn settle(&self) {
        let mut st = self.lock();
        st.flush_scheduled = false;
        loop {
            if st.durable_seq >= st.next_seq {
                return;
            }
            if st.flushing {
                st = self.flushed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.flushing = true;
            let target = st.next_seq;
            drop(st);
            let synced = self.store.sync();
            st = self.lock();
            st.flushing = false;
            self.flushed.notify_all();
            if let Err(e) = synced {
                // Held effects stay held; the next entry point (or heartbeat tick) tries again.
                tracing::error!(error = %e, "cannot make the state durable");
                self.flushes.send_modify(|(_, failed)| *failed += 1);
                return;
            }
            st.durable_seq = target;
            while st.held.front().is_some_and(|h| h.0 <= target) {
                if let Some((_, effects)) = st.held.pop_front() {
                    self.announce(&mut st, effects);
                }
            }
            // Those waiting for this flush go on once what it made durable is announced.
            self.flushes.send_modify(|(durable, _)| *durable = target);
        }
    }

    /// Sends a committed transaction's events and worker messages. A worker whose queue is
    /// full or closed is lost, in a transaction of its own.
    fn announce(&self, st: &mut Inner, mut effects: Vec<Effect>) {
        while !effects.is_empty() {
            let mut lost = Vec::new();
            for e in effects.drain(..) {
                match e {
                    Effect::Emit(ev) => self.emit_now(ev),
                    Effect::Send { worker, msg } => {
                        let sent = st
                            .workers
                            .get(&worker)
                            .and_then(|w| w.session.as_ref())
                            .map(|s| (s.id, s.tx.try_send(Ok(MasterMessage { msg: Some(*msg) })).is_ok()));
                        if let Some((session, false)) = sent {
                            lost.push((worker, session));
                        }
                    }
                }
            }
            for (worker, session) in lost {
                let mut tx = Tx::begin(st, &self.store);
                let done = match self.lose_session(&mut tx, &worker, session, "its message queue is full or closed") {
                    Ok(()) => tx.commit(self),
                    Err(e) => {
                        tx.rollback();
                        Err(e)
                    }
                };
                match done {
                    Ok((more, false)) if st.held.is_empty() => effects.extend(more),
                    Ok((more, durable)) => self.deliver(st, more, durable),
                    Err(err) => tracing::error!(worker, error = %err, "cannot record a lost worker"),
                }
            }
        }
    }

    /// [`Engine::transact`] under the engine's lock.
    fn run<T>(&self, f: impl FnOnce(&Engine, &mut Tx<'_>) -> Result<T, EngineError>) -> Result<T, EngineError> {
        let out = {
            let mut st = self.lock();
            self.transact(&mut st, f)
        };
        self.settle();
        out
    }

    fn recover(&self) -> Result<(), EngineError> {
        let mut st = self.lock();
        let running: Vec<u64> = st.running.iter().copied().collect();
        for id in running {
            tracing::warn!(build = id, "build was running when the master stopped");
            self.transact(&mut st, |e, tx| {
                e.lose_build(tx, id, "the master restarted while it ran", rules::Loss::Master)
            })?;
        }
        Ok(())
    }

    /// Stops taking work: workers are told the master is going away and their sessions
    /// end, so listeners can close. Results already stored stay; running builds are
    /// retried by the next start.
    pub fn shut_down(&self) {
        let mut st = self.lock();
        st.closing = true;
        match self.store.sync() {
            Ok(()) => {
                st.durable_seq = st.next_seq;
                let durable = st.durable_seq;
                self.flushes.send_modify(|(d, _)| *d = durable);
                while let Some((_, effects)) = st.held.pop_front() {
                    self.announce(&mut st, effects);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot make the last changes durable"),
        }
        for w in st.workers.values_mut() {
            if let Some(s) = w.session.take() {
                let _ = s.tx.try_send(Err(tonic::Status::unavailable("the master is shutting down")));
            }
        }
    }
}

/// Something a committed transaction announces.
enum Effect {
    Emit(Event),
    Send { worker: String, msg: Box<MasterMsg> },
}

/// The records a transaction touched, as they were in memory before it (`None`: not in
/// memory; history read from the store is put back there by dropping it).
#[derive(Default)]
struct Undo {
    builds: HashMap<u64, Option<BuildRecord>>,
    logs: HashMap<u64, Option<LogRecord>>,
    schedules: HashMap<String, Option<ScheduleRecord>>,
    leases: Option<HashMap<u64, LeaseInfo>>,
    worker_builds: HashMap<String, BTreeMap<String, u64>>,
    stalled: Option<BTreeSet<u64>>,
    plan: Option<Arc<Plan>>,
    plans: Vec<String>,
    counters: [u64; 4],
}

/// One state change in progress. Reads go through `Deref` (live state) or [`Tx::build`]
/// (any build); every mutation goes through a method that saves the record first, so a
/// failed store write can be undone.
struct Tx<'a> {
    st: &'a mut Inner,
    store: &'a Store,
    undo: Undo,
    /// Changes recorded by this transaction (they live only in the store).
    changes: Vec<ChangeRecord>,
    /// Step cache rows this transaction writes (they live only in the store).
    cache: cache::TxCache,
    effects: Vec<Effect>,
    sync: Sync,
}

impl std::ops::Deref for Tx<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        self.st
    }
}

impl<'a> Tx<'a> {
    fn begin(st: &'a mut Inner, store: &'a Store) -> Tx<'a> {
        let counters = [st.next_change, st.next_build, st.next_lease, st.next_log];
        Tx {
            st,
            store,
            undo: Undo { counters, ..Undo::default() },
            changes: Vec::new(),
            cache: cache::TxCache::default(),
            effects: Vec::new(),
            sync: Sync::Lazy,
        }
    }

    /// The write must be on disk before anything is announced.
    fn durable(&mut self) {
        self.sync = Sync::Durable;
    }

    fn emit(&mut self, e: Event) {
        self.effects.push(Effect::Emit(e));
    }

    fn send(&mut self, worker: &str, msg: MasterMsg) {
        self.effects.push(Effect::Send { worker: worker.to_owned(), msg: Box::new(msg) });
    }

    /// Any build: live (or touched by this transaction) from memory, history from the store.
    fn build(&self, id: u64) -> Result<Option<std::borrow::Cow<'_, BuildRecord>>, EngineError> {
        if let Some(b) = self.st.builds.get(&id) {
            return Ok(Some(std::borrow::Cow::Borrowed(b)));
        }
        Ok(self.store.build(id)?.map(std::borrow::Cow::Owned))
    }

    fn save_build(&mut self, id: u64) {
        if !self.undo.builds.contains_key(&id) {
            self.undo.builds.insert(id, self.st.builds.get(&id).cloned());
        }
    }

    /// A build to change; a finished one is brought into memory for the transaction.
    fn build_mut(&mut self, id: u64) -> Option<&mut BuildRecord> {
        self.save_build(id);
        if !self.st.builds.contains_key(&id) {
            match self.store.build(id) {
                Ok(Some(b)) => {
                    self.st.builds.insert(id, b);
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::error!(build = id, error = %e, "cannot read a build");
                    return None;
                }
            }
        }
        self.st.builds.get_mut(&id)
    }

    fn insert_build(&mut self, b: BuildRecord) {
        let id = b.id;
        self.save_build(id);
        self.st.builds.insert(id, b);
        self.st.index(id);
    }

    /// The only way a build's state changes: keeps the pending and running indexes true.
    fn set_state(&mut self, id: u64, state: State) {
        if let Some(b) = self.build_mut(id) {
            b.state = state;
        }
        self.st.index(id);
    }

    fn next_build_id(&mut self) -> u64 {
        let id = self.st.next_build;
        self.st.next_build += 1;
        id
    }

    fn next_log_id(&mut self) -> u64 {
        let id = self.st.next_log;
        self.st.next_log += 1;
        id
    }

    fn next_lease_id(&mut self) -> u64 {
        let id = self.st.next_lease;
        self.st.next_lease += 1;
        id
    }

    fn leases_mut(&mut self) -> &mut HashMap<u64, LeaseInfo> {
        if self.undo.leases.is_none() {
            self.undo.leases = Some(self.st.leases.clone());
        }
        &mut self.st.leases
    }

    fn stalled_mut(&mut self) -> &mut BTreeSet<u64> {
        if self.undo.stalled.is_none() {
            self.undo.stalled = Some(self.st.stalled.clone());
        }
        &mut self.st.stalled
    }

    fn worker_builds_mut(&mut self, worker: &str) -> Option<&mut BTreeMap<String, u64>> {
        let w = self.st.workers.get_mut(worker)?;
        if !self.undo.worker_builds.contains_key(worker) {
            self.undo.worker_builds.insert(worker.to_owned(), w.builds.clone());
        }
        Some(&mut w.builds)
    }

    fn insert_log(&mut self, rec: LogRecord) {
        if !self.undo.logs.contains_key(&rec.id) {
            self.undo.logs.insert(rec.id, self.st.logs.get(&rec.id).cloned());
        }
        self.st.logs.insert(rec.id, rec);
    }

    fn log_mut(&mut self, id: u64) -> Option<&mut LogRecord> {
        if !self.undo.logs.contains_key(&id) {
            self.undo.logs.insert(id, self.st.logs.get(&id).cloned());
        }
        if !self.st.logs.contains_key(&id)
            && let Ok(Some(l)) = self.store.log(id)
        {
            self.st.logs.insert(id, l);
        }
        self.st.logs.get_mut(&id)
    }

    fn insert_change(&mut self, mut c: ChangeRecord) -> u64 {
        let id = self.st.next_change;
        self.st.next_change += 1;
        c.id = id;
        self.changes.push(c);
        id
    }

    fn put_schedule(&mut self, key: &str, rec: ScheduleRecord) {
        if !self.undo.schedules.contains_key(key) {
            self.undo.schedules.insert(key.to_owned(), self.st.schedules.get(key).cloned());
        }
        self.st.schedules.insert(key.to_owned(), rec);
    }

    /// The plan with `hash`: from memory, else from the store (and kept for later).
    fn plan(&mut self, hash: &str) -> Option<Arc<Plan>> {
        if let Some(p) = self.st.plans.get(hash) {
            return Some(p.clone());
        }
        let p = Arc::new(self.store.plan(hash).ok().flatten()?);
        self.st.plans.insert(hash.to_owned(), p.clone());
        Some(p)
    }

    fn remember_plan(&mut self, plan: &Arc<Plan>) {
        if !self.st.plans.contains_key(&plan.hash) {
            self.undo.plans.push(plan.hash.clone());
            self.st.plans.insert(plan.hash.clone(), plan.clone());
        }
    }

    fn set_head_plan(&mut self, plan: Arc<Plan>) {
        self.remember_plan(&plan);
        if self.undo.plan.is_none() {
            self.undo.plan = Some(self.st.plan.clone());
        }
        self.st.plan = plan;
    }

    /// Writes every touched record in one store transaction, then lets finished builds and
    /// logs leave memory. On failure the state is put back as it was and the error returned.
    fn commit(self, engine: &Engine) -> Result<(Vec<Effect>, bool), EngineError> {
        let batch = Batch {
            builds: self.undo.builds.keys().filter_map(|id| self.st.builds.get(id)).collect(),
            logs: self.undo.logs.keys().filter_map(|id| self.st.logs.get(id)).collect(),
            changes: self.changes.iter().collect(),
            schedules: self
                .undo
                .schedules
                .keys()
                .filter_map(|k| self.st.schedules.get(k).map(|r| (k.as_str(), r)))
                .collect(),
            plans: self.undo.plans.iter().filter_map(|h| self.st.plans.get(h).map(|p| p.as_ref())).collect(),
            statuses: Vec::new(),
            cache_entries: self.cache.entries.iter().collect(),
            cache_touches: self.cache.touches.iter().map(|(k, t)| (k.as_str(), *t)).collect(),
            cache_counts: self.cache.counts.iter().map(|(b, (h, m))| (b.as_str(), *h, *m)).collect(),
            cache_last: self.cache.last.iter().map(|(b, s, l)| (b.as_str(), s.as_str(), l)).collect(),
        };
        let sink = engine.statuses.read().unwrap_or_else(|p| p.into_inner());
        let mut batch = batch;
        if let Some(sink) = sink.as_ref() {
            use crate::forge::status::{commit_state, statuses_for};
            for (id, old) in &self.undo.builds {
                let Some(b) = self.st.builds.get(id) else { continue };
                let before = old.as_ref().map(|o| commit_state(o.state, o.result));
                if sink.repos.contains(&b.repo) && before != Some(commit_state(b.state, b.result)) {
                    batch.statuses.extend(statuses_for(b, &sink.base_url));
                }
            }
        }
        let queued = !batch.statuses.is_empty();
        let empty = batch.is_empty();
        // Written at once without an fsync; a change that must be durable is flushed by the
        // group commit in `Engine::settle` before anything of it is announced.
        let written = if empty { Ok(()) } else { engine.store.commit(batch, Sync::Lazy) };
        let durable = self.sync == Sync::Durable;
        match written {
            Ok(()) => {
                if queued && let Some(sink) = sink.as_ref() {
                    sink.wake.notify_one();
                }
                drop(sink);
                let Tx { st, undo, effects, .. } = self;
                for id in undo.builds.keys() {
                    if st.builds.get(id).is_some_and(|b| b.state == State::Finished) {
                        st.builds.remove(id);
                        st.waiting.remove(id);
                    }
                }
                for id in undo.logs.keys() {
                    if st.logs.get(id).is_some_and(|l| l.finished) {
                        st.logs.remove(id);
                    }
                }
                st.trim_plans();
                Ok((effects, durable))
            }
            Err(e) => {
                drop(sink);
                tracing::error!(error = %e, "cannot store a state change; it is not applied");
                self.rollback();
                Err(e.into())
            }
        }
    }

    fn rollback(self) {
        let Tx { st, undo, .. } = self;
        for (id, old) in undo.builds {
            match old {
                Some(b) => {
                    st.builds.insert(id, b);
                }
                None => {
                    st.builds.remove(&id);
                }
            }
            // Priority never changes, so the index entry can be found from either version.
            st.running.remove(&id);
            st.pending.retain(|(_, i)| *i != id);
            st.index(id);
        }
        for (id, old) in undo.logs {
            match old {
                Some(l) => st.logs.insert(id, l),
                None => st.logs.remove(&id),
            };
        }
        for (k, old) in undo.schedules {
            match old {
                Some(r) => st.schedules.insert(k, r),
                None => st.schedules.remove(&k),
            };
        }
        if let Some(l) = undo.leases {
            st.leases = l;
        }
        if let Some(s) = undo.stalled {
            st.stalled = s;
        }
        for (w, b) in undo.worker_builds {
            if let Some(ws) = st.workers.get_mut(&w) {
                ws.builds = b;
            }
        }
        if let Some(p) = undo.plan {
            st.plan = p;
        }
        for h in undo.plans {
            st.plans.remove(&h);
        }
        [st.next_change, st.next_build, st.next_lease, st.next_log] = undo.counters;
    }
}

/// Directory name of a builder's checkout on a worker: the builder id made safe for a
/// file name, plus a short hash of the id so two builders never share a checkout
/// (`app/lint_docs` and `app_lint/docs` make the same safe name).
pub fn checkout_dir(builder: &str) -> String {
    use sha2::Digest;
    let safe: String = builder
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect();
    let digest = sha2::Sha256::digest(builder.as_bytes());
    let short = rbb_schema::hex(&digest[..4]);
    format!("{safe}-{short}")
}

/// Resolves a revision (branch, tag, commit) in a local repository to a commit id.
pub fn resolve(path: &std::path::Path, rev: &str) -> Result<String, String> {
    rbb_compiler::git::resolve_commit(path, rev).map_err(|e| e.to_string())
}

/// Builder-name suffix of the build that reports a pipeline that does not compile.
pub const PIPELINE_BUILDER: &str = "(pipeline)";
const PIPELINE_PATH: &str = rbb_schema::config::PIPELINE_PATH;
