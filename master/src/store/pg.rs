//! The state's tables in PostgreSQL: each table of the state is a table `rbb_<name>` of
//! (key bytea primary key, value bytea), keys encoded so that PostgreSQL's bytewise order is
//! the state's key order ([`super::kv::Codec`]).
//!
//! The store is synchronous (the engine writes under its lock, like redb's writes), so the
//! client's connections run on a runtime of their own and each call waits for its answer on
//! the calling thread. One connection writes (transactions are serialised, as redb's are);
//! reads take a connection from a small pool. A lazy write commits with
//! `synchronous_commit = off`: it survives the master's death, and only a crash of the
//! database server can lose it, as a crash of the machine can lose redb's.

use super::StoreError;
use std::collections::HashSet;
use std::ops::Bound;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio_postgres::types::{ToSql, Type};

/// Rows fetched per round trip of a range scan, at most: the first round trip fetches
/// [`FIRST_PAGE`] (most scans want the first row or a page of a list), each next one four
/// times more.
const PAGE: i64 = 256;
const FIRST_PAGE: i64 = 16;
/// Idle read connections kept.
const IDLE_READS: usize = 8;

pub fn pg_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Pg(describe(&e))
}

/// An error with what the server said (the driver's own message alone is often "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.hint() {
            Some(h) => format!("{}: {} (hint: {h})", d.severity(), d.message()),
            None => format!("{}: {}", d.severity(), d.message()),
        },
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}

/// `postgres://user:secret@host/db` with the password hidden: what messages may name.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.split_whitespace().filter(|w| !w.starts_with("password=")).collect::<Vec<_>>().join(" ");
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:<hidden>@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let kept: Vec<&str> = query.split('&').filter(|kv| !kv.starts_with("password=")).collect();
            if kept.is_empty() { path.to_owned() } else { format!("{path}?{}", kept.join("&")) }
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// One connection.
pub struct Conn {
    client: std::sync::Arc<tokio_postgres::Client>,
    /// Statements prepared on this connection, by their text (a few per table).
    prepared: Mutex<std::collections::HashMap<String, tokio_postgres::Statement>>,
    /// Writes sent in this transaction whose answers are not read yet ([`Conn::send`]).
    pending: Mutex<Vec<Pending>>,
    /// A statement failed since the transaction began: PostgreSQL aborted it, and its
    /// `COMMIT` would quietly roll back, so [`Write::commit`] refuses instead.
    failed: std::sync::atomic::AtomicBool,
    /// When a transaction last began on it.
    used: Mutex<std::time::Instant>,
}

type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, tokio_postgres::Error>> + Send>>;

fn wait<T>(f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, StoreError> {
    futures::executor::block_on(f).map_err(pg_error)
}

impl Conn {
    fn new(client: tokio_postgres::Client) -> Conn {
        Conn {
            client: std::sync::Arc::new(client),
            prepared: Mutex::default(),
            pending: Mutex::default(),
            failed: std::sync::atomic::AtomicBool::new(false),
            used: Mutex::new(std::time::Instant::now()),
        }
    }

    /// The statement for `sql` (all parameters bytea), prepared once per connection.
    fn statement(&self, sql: &str, params: usize) -> Result<tokio_postgres::Statement, StoreError> {
        if let Some(s) = self.prepared.lock().unwrap_or_else(|p| p.into_inner()).get(sql) {
            return Ok(s.clone());
        }
        let s = wait(self.client.prepare_typed(sql, &vec![Type::BYTEA; params]))?;
        self.prepared.lock().unwrap_or_else(|p| p.into_inner()).insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let statement = self.statement(sql, params.len()).inspect_err(|_| self.mark_failed())?;
        wait(self.client.query(&statement, params)).inspect_err(|_| self.mark_failed())
    }

    fn mark_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Sends a write without waiting for its answer: requests keep their order on the
    /// connection, so a later read sees it, and [`Conn::settle`] (before a commit) reads
    /// every answer. A failed write fails the transaction, and with it the commit.
    fn send(&self, sql: &str, params: Vec<Vec<u8>>) -> Result<(), StoreError> {
        let statement = self.statement(sql, params.len())?;
        let client = self.client.clone();
        let mut write: Pending = Box::pin(async move {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            client.execute(&statement, &refs).await
        });
        // The first poll puts the request on the connection, in the caller's order.
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        match write.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(done) => done.map(|_| ()).map_err(pg_error),
            std::task::Poll::Pending => {
                self.pending.lock().unwrap_or_else(|p| p.into_inner()).push(write);
                Ok(())
            }
        }
    }

    /// Sends statements of the simple protocol (`BEGIN`, `COMMIT`) without waiting for their
    /// answer, like [`Conn::send`].
    fn send_batch(&self, sql: &'static str) -> Result<(), StoreError> {
        let client = self.client.clone();
        let mut sent: Pending = Box::pin(async move { client.batch_execute(sql).await.map(|()| 0) });
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        match sent.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(done) => done.map(|_| ()).map_err(pg_error),
            std::task::Poll::Pending => {
                self.pending.lock().unwrap_or_else(|p| p.into_inner()).push(sent);
                Ok(())
            }
        }
    }

    /// Reads the answers of every write sent: the first failure, if any.
    fn settle(&self) -> Result<(), StoreError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut first = Ok(());
        for write in pending {
            if let Err(e) = futures::executor::block_on(write)
                && first.is_ok()
            {
                first = Err(pg_error(e));
            }
        }
        first
    }

    fn batch(&self, sql: &str) -> Result<(), StoreError> {
        wait(self.client.batch_execute(sql))
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Runs statements with no parameters (schema changes, administration).
    pub fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        self.batch(sql)
    }

    /// Runs a query whose parameters are all text.
    pub fn query_text(&self, sql: &str, params: &[&str]) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let typed: Vec<(&(dyn ToSql + Sync), Type)> =
            params.iter().map(|p| (p as &(dyn ToSql + Sync), Type::TEXT)).collect();
        wait(self.client.query_typed(sql, &typed)).inspect_err(|_| self.mark_failed())
    }

    /// [`Conn::query_text`], given up after `limit` (None): a connection whose server went
    /// silent does not hold the caller for the TCP retransmission time.
    fn query_text_within(
        &self,
        runtime: &tokio::runtime::Handle,
        limit: Duration,
        sql: &str,
        params: &[&str],
    ) -> Result<Option<Vec<tokio_postgres::Row>>, StoreError> {
        let typed: Vec<(&(dyn ToSql + Sync), Type)> =
            params.iter().map(|p| (p as &(dyn ToSql + Sync), Type::TEXT)).collect();
        // The timer is made inside the runtime (the caller is a thread of its own).
        match runtime.block_on(async { tokio::time::timeout(limit, self.client.query_typed(sql, &typed)).await }) {
            Ok(done) => done.map(Some).map_err(pg_error),
            Err(_) => Ok(None),
        }
    }
}

/// A connection to the state's database.
pub struct Pg {
    runtime: Option<tokio::runtime::Runtime>,
    config: tokio_postgres::Config,
    /// The URL with its password hidden.
    pub shown: String,
    write: Mutex<Conn>,
    idle: Mutex<Vec<Conn>>,
    /// Tables known to exist.
    tables: Mutex<HashSet<String>>,
    /// Whether this process holds the master's lock (on the writing connection).
    locked: std::sync::atomic::AtomicBool,
    /// How long this master's lease lasts without a renewal ([`Pg::set_lease`]).
    lease: Duration,
    /// This master's term on the state, once it holds the lock (0 before): the lease row's
    /// epoch when it took the lock.
    epoch: AtomicI64,
    /// Why this master lost the state, once another master took it over: from then on every
    /// write is refused ([`StoreError::Fenced`]).
    lost: tokio::sync::watch::Sender<Option<String>>,
    /// Dropped with the `Pg`: stops the lease's renewal.
    renewing: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// A writing connection idle this long is asked whether it still answers before a
    /// transaction ([`Pg::begin_write`]).
    idle_probe: Duration,
}

/// A master's lease on the state unless its config says otherwise (`state.lease`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// The lease row: the current term (epoch) on the state, who holds it, and when it was last
/// renewed. A master renews it every quarter of its `ttl_ms`; a standby that finds it older
/// than that ends the holder's session (which fences it: only the lock-holding connection
/// writes) and takes the lock.
const LEASE_TABLE: &str = "CREATE TABLE IF NOT EXISTS rbb_master_lease (\
     id int PRIMARY KEY, epoch bigint NOT NULL, holder text NOT NULL, ttl_ms bigint NOT NULL, \
     renewed_at timestamptz NOT NULL, pid int NOT NULL)";

/// The advisory lock a master holds on its state database.
const MASTER_LOCK: i64 = 0x0072_6262;

impl Drop for Pg {
    fn drop(&mut self) {
        self.renewing.lock().unwrap_or_else(|p| p.into_inner()).take();
        if self.locked.load(std::sync::atomic::Ordering::Acquire) && self.lost.borrow().is_none() {
            // Released now rather than when the server notices the connection is gone, so a
            // master started right after this one stopped finds the database free.
            let conn = self.write.lock().unwrap_or_else(|p| p.into_inner());
            if !conn.is_closed() {
                let _ = conn.batch(&format!("SELECT pg_advisory_unlock({MASTER_LOCK})"));
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn sql_name(table: &str) -> Result<String, StoreError> {
    if table.is_empty() || !table.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_') {
        return Err(StoreError::Pg(format!("table name {table:?} is not a plain identifier")));
    }
    Ok(format!("rbb_{table}"))
}

impl Pg {
    /// Connects (credentials from the URL, or libpq's usual environment: `PGPASSWORD` is
    /// read by the caller, [`Pg::connect`] takes it in `password`).
    pub fn connect(url: &str, password: Option<&str>) -> Result<Pg, StoreError> {
        let shown = redact(url);
        let mut config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            StoreError::Pg(format!("cannot read the state URL {shown}: {}", describe(&e)))
        })?;
        if let Some(p) = password
            && config.get_password().is_none()
        {
            config.password(p);
        }
        if config.get_application_name().is_none() {
            let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
            config.application_name(format!("rbb on {host} (pid {})", std::process::id()));
        }
        config.connect_timeout(std::time::Duration::from_secs(10));
        // A master that vanished (its host died, the network dropped) is noticed in about 20
        // seconds from both sides, so its lock goes and another master may start.
        config.keepalives(true).keepalives_idle(std::time::Duration::from_secs(10));
        let mut options = config.get_options().unwrap_or_default().to_owned();
        options.push_str(" -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=2");
        config.options(options.trim_start());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rbb-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Pg(format!("cannot start the PostgreSQL client: {e}")))?;
        let write = open_conn(&runtime, &config, &shown)?;
        Ok(Pg {
            runtime: Some(runtime),
            config,
            shown,
            write: Mutex::new(write),
            idle: Mutex::new(Vec::new()),
            tables: Mutex::new(HashSet::new()),
            locked: std::sync::atomic::AtomicBool::new(false),
            lease: DEFAULT_LEASE,
            epoch: AtomicI64::new(0),
            lost: tokio::sync::watch::channel(None).0,
            renewing: Mutex::new(None),
            idle_probe: Duration::from_secs(1),
        })
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime lives until drop")
    }

    /// A connection for reads, from the pool (or a new one).
    pub fn read_conn(&self) -> Result<Pooled<'_>, StoreError> {
        let conn = loop {
            let next = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match next {
                Some(c) if c.is_closed() => continue,
                Some(c) => break c,
                None => break open_conn(self.runtime(), &self.config, &self.shown)?,
            }
        };
        Ok(Pooled { pg: self, conn: Some(conn) })
    }

    /// The writing connection, reconnected if the server dropped it (taking the master's
    /// lock again, which another master may have taken meanwhile).
    pub fn write_conn(&self) -> Result<MutexGuard<'_, Conn>, StoreError> {
        let guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        self.usable(guard, false)
    }

    /// `guard`'s connection, made again (and the lock retaken) when it has ended, or when
    /// `suspect` and it does not answer.
    fn usable<'a>(&self, mut guard: MutexGuard<'a, Conn>, suspect: bool) -> Result<MutexGuard<'a, Conn>, StoreError> {
        if let Some(why) = self.lost.borrow().as_ref() {
            return Err(StoreError::Fenced { shown: self.shown.clone(), why: why.clone() });
        }
        // An empty query answers on a live connection; an error means it has ended.
        let broken = suspect
            && !guard.is_closed()
            && futures::executor::block_on(guard.client.simple_query(""))
                .inspect_err(|e| {
                    tracing::warn!(database = %self.shown, error = %describe(e), "the writing connection does not answer");
                })
                .is_err();
        if broken || guard.is_closed() {
            tracing::warn!(database = %self.shown, "the state database closed the connection; connecting again");
            let fresh = open_conn(self.runtime(), &self.config, &self.shown)?;
            if self.locked.load(std::sync::atomic::Ordering::Acquire) {
                // Until the lock and the term are this master's again, the new connection
                // is not the writing one (dropped on an error, it holds nothing).
                self.retake_lock(&fresh)?;
            }
            *guard = fresh;
        }
        Ok(guard)
    }

    /// Takes the lock that keeps a second master off this database, or names who holds it.
    pub fn lock_master(&self) -> Result<(), StoreError> {
        let conn = self.write_conn()?;
        self.take_lock(&conn)?;
        self.locked.store(true, std::sync::atomic::Ordering::Release);
        self.claim_lease(&conn)
    }

    /// How long this master's lease lasts without a renewal (before it locks the state).
    pub fn set_lease(&mut self, lease: Duration) {
        self.lease = lease.max(Duration::from_millis(200));
    }

    /// Answers why once another master took the state over (this one is fenced off).
    pub fn lost(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.lost.subscribe()
    }

    /// Who holds the state, as `rbb state check` shows it: the lease's holder, term and age,
    /// and whether a master holds the lock now. None when no master ever took a term.
    pub fn master_status(&self) -> Result<Option<String>, StoreError> {
        let conn = self.read_conn()?;
        if !exists(&conn, "rbb_master_lease")? {
            return Ok(None);
        }
        let rows = conn.query_text(
            &format!(
                "SELECT holder, epoch, ttl_ms, \
                 (extract(epoch FROM clock_timestamp() - renewed_at) * 1000)::bigint, \
                 EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = 0 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND objid = {MASTER_LOCK}) \
                 FROM rbb_master_lease WHERE id = 1"
            ),
            &[],
        )?;
        Ok(rows.first().map(|r| {
            let (holder, epoch, ttl, age, held): (String, i64, i64, i64, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            let secs = |ms: i64| format!("{:.1} s", ms as f64 / 1000.0);
            if held {
                format!("{holder}, term {epoch}, lease renewed {} ago (it lasts {})", secs(age), secs(ttl))
            } else {
                format!("none now (the last: {holder}, term {epoch}, {} ago)", secs(age))
            }
        }))
    }

    /// This master's term on the state (0 before it holds the lock).
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// After a lost connection: the lock again, and only if no other master took a term
    /// meanwhile (the lease's epoch is still this master's).
    fn retake_lock(&self, conn: &Conn) -> Result<(), StoreError> {
        let taken = match self.take_lock(conn) {
            Ok(()) => {
                let epoch = lease_epoch(conn)?;
                if epoch == Some(self.epoch()) {
                    // The lease names the session that holds the lock: a standby ends only it.
                    conn.query_text(
                        "UPDATE rbb_master_lease SET pid = pg_backend_pid() WHERE id = 1 AND epoch = $1::text::bigint",
                        &[&self.epoch().to_string()],
                    )?;
                    return Ok(());
                }
                let _ = conn.batch(&format!("SELECT pg_advisory_unlock({MASTER_LOCK})"));
                format!("another master took a term on the state (epoch {})", epoch.unwrap_or(0))
            }
            Err(StoreError::InUse { holder, .. }) => format!("another master holds the state: {holder}"),
            Err(e) => return Err(e),
        };
        Err(self.fence(taken))
    }

    /// Marks this master fenced off; the error its writes get from now on.
    fn fence(&self, why: String) -> StoreError {
        tracing::error!(database = %self.shown, reason = %why, "this master lost the state to another master; it writes nothing more");
        self.lost.send_if_modified(|l| {
            if l.is_none() {
                *l = Some(why.clone());
                true
            } else {
                false
            }
        });
        StoreError::Fenced { shown: self.shown.clone(), why }
    }

    /// Starts this master's term: the lease's epoch goes up by one, and a thread renews the
    /// lease (on a connection of its own) until the `Pg` is dropped.
    fn claim_lease(&self, conn: &Conn) -> Result<(), StoreError> {
        if !exists(conn, "rbb_master_lease")? {
            conn.batch(LEASE_TABLE)?;
        }
        let holder = self.config.get_application_name().unwrap_or("rbb").to_owned();
        let ttl = (self.lease.as_millis() as i64).to_string();
        let row = conn.query_text(
            "INSERT INTO rbb_master_lease (id, epoch, holder, ttl_ms, renewed_at, pid) \
             VALUES (1, 1, $1, $2::text::bigint, clock_timestamp(), pg_backend_pid()) \
             ON CONFLICT (id) DO UPDATE SET epoch = rbb_master_lease.epoch + 1, holder = $1, \
             ttl_ms = $2::text::bigint, renewed_at = clock_timestamp(), pid = pg_backend_pid() RETURNING epoch",
            &[&holder, &ttl],
        )?;
        let epoch: i64 = row.first().map(|r| r.get(0)).unwrap_or(0);
        self.epoch.store(epoch, Ordering::Release);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        *self.renewing.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop);
        let renewer = Renewer {
            runtime: self.runtime().handle().clone(),
            config: self.config.clone(),
            shown: self.shown.clone(),
            epoch,
            every: self.lease / 4,
            lost: self.lost.clone(),
        };
        std::thread::Builder::new()
            .name("rbb-lease".into())
            .spawn(move || renewer.run(&stopped))
            .map_err(|e| StoreError::Pg(format!("cannot start the lease's renewal: {e}")))?;
        Ok(())
    }

    /// Fences off the holder of a lease that ran out (`stale`, as [`LeaseWatch`] saw it):
    /// takes a new term, if the lease is still the one seen, then ends the session the lease
    /// names if it holds the lock, which releases the lock and cuts off the holder's writes.
    /// Answers why it did.
    fn fence_stale(&self, conn: &Conn, stale: &Stale) -> Result<Option<String>, StoreError> {
        let me = self.config.get_application_name().unwrap_or("rbb").to_owned();
        let taken = conn.query_text(
            "UPDATE rbb_master_lease SET epoch = epoch + 1, holder = $1, renewed_at = clock_timestamp() \
             WHERE id = 1 AND epoch = $2::text::bigint AND renewed_at = $3::text::timestamptz RETURNING pid",
            &[&me, &stale.epoch.to_string(), &stale.renewed],
        )?;
        let Some(pid) = taken.first().map(|r| r.get::<_, i32>(0)) else { return Ok(None) };
        conn.query_text(
            &format!(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.pid = $1::text::int \
                 AND l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND l.objid = {MASTER_LOCK}"
            ),
            &[&pid.to_string()],
        )?;
        Ok(Some(format!("{} did not renew its lease for {} ms", stale.holder, stale.ttl.as_millis())))
    }

    /// Takes the master's lock, waiting for the master that holds it to stop (a standby):
    /// `waiting` is told who holds it first. The server grants the lock the moment the
    /// holder's connection ends (it stopped, or was killed and its socket closed; a vanished
    /// host takes the keepalive time).
    ///
    /// A holder that stopped renewing its lease (hung, stopped, cut off from its workers but
    /// not from the database) is fenced off once its lease has not moved for its length, by
    /// this standby's clock: see [`Pg::fence_stale`].
    ///
    /// A wait the database ends meanwhile (a restart, a failover, its session ended) goes on
    /// on a new connection, made once a second until one is. After such a reconnect the
    /// lease decides, not a free lock: the active master, cut off by the same restart, gets
    /// its lease's length to come back before this standby takes the state.
    pub fn lock_master_waiting(&self, waiting: impl FnOnce(&str)) -> Result<(), StoreError> {
        let mut waiting = Some(waiting);
        let mut conn = self.write_conn()?;
        let mut reconnected = false;
        loop {
            // The term is part of the wait: a connection that ends as it is taken (the
            // database restarting) waits again.
            let taken = self.wait_for_lock(&conn, &mut waiting, reconnected).and_then(|()| {
                self.locked.store(true, std::sync::atomic::Ordering::Release);
                self.claim_lease(&conn)
            });
            let Err(e) = taken else { return Ok(()) };
            self.locked.store(false, std::sync::atomic::Ordering::Release);
            tracing::warn!(database = %self.shown, error = %e, "standby: the wait for the state ended; connecting again");
            // Not a busy loop when the error is not the connection's.
            std::thread::sleep(BEAT);
            reconnected = true;
            conn = loop {
                match open_conn(self.runtime(), &self.config, &self.shown) {
                    Ok(c) => {
                        *conn = c;
                        break conn;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "standby: cannot reach the state database; trying again in a second");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            };
        }
    }

    /// Whether the writing connection has ended.
    pub fn write_closed(&self) -> bool {
        self.write.lock().unwrap_or_else(|p| p.into_inner()).is_closed()
    }

    /// Takes the master's lock on `conn`, waiting a beat at a time while another master holds
    /// it (`waiting` is told who, once) and watching the holder's lease between beats.
    fn wait_for_lock(
        &self,
        conn: &Conn,
        waiting: &mut Option<impl FnOnce(&str)>,
        mut reconnected: bool,
    ) -> Result<(), StoreError> {
        let mut watch = LeaseWatch::default();
        if !reconnected {
            match self.take_lock(conn) {
                Ok(()) => return Ok(()),
                Err(StoreError::InUse { holder, .. }) => {
                    if let Some(tell) = waiting.take() {
                        tell(&holder);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        conn.batch(&format!("SET lock_timeout = '{}ms'", BEAT.as_millis()))?;
        loop {
            let stale = watch.look(conn)?;
            if reconnected && watch.held() && stale.is_none() {
                if lock_held(conn)? {
                    tracing::info!(database = %self.shown, "standby: the active master holds the state again; waiting for it");
                    reconnected = false;
                } else {
                    // The lease still moves (or has not been watched for its length yet):
                    // its master may be reconnecting after the same interruption.
                    std::thread::sleep(BEAT);
                    continue;
                }
            }
            let sql = format!("SELECT pg_advisory_lock({MASTER_LOCK})");
            match futures::executor::block_on(conn.client.batch_execute(&sql)) {
                Ok(()) => break,
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {}
                Err(e) => return Err(pg_error(e)),
            }
            if let Some(stale) = stale
                && let Some(why) = self.fence_stale(conn, &stale)?
            {
                tracing::warn!(database = %self.shown, reason = %why, "standby: taking the state over from a master that stopped answering");
            }
        }
        conn.batch("SET lock_timeout = 0")
    }

    fn take_lock(&self, conn: &Conn) -> Result<(), StoreError> {
        let got = conn.query_text(&format!("SELECT pg_try_advisory_lock({MASTER_LOCK})"), &[])?;
        if got.first().is_some_and(|r| r.get::<_, bool>(0)) {
            return Ok(());
        }
        let holder = conn
            .query_text(
                &format!(
                    "SELECT a.application_name || ' from ' || coalesce(host(a.client_addr), 'a local socket') \
                     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND l.objid = {MASTER_LOCK}"
                ),
                &[],
            )?
            .first()
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|| "unknown".to_owned());
        Err(StoreError::InUse { shown: self.shown.clone(), holder })
    }

    /// A transaction on the writing connection. `BEGIN` goes out with the transaction's first
    /// request and `COMMIT` with its last writes: a transaction that reads nothing costs one
    /// round trip.
    ///
    /// A connection idle for a second or more is asked first (one round trip): a database
    /// that restarted meanwhile ended it, and the transaction goes to a new one rather than
    /// failing. A busy master's transactions skip the question.
    pub fn begin_write(&self, durable: bool) -> Result<Write<'_>, StoreError> {
        let guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let idle = guard.used.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= self.idle_probe;
        let conn = self.usable(guard, idle)?;
        *conn.used.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
        conn.failed.store(false, Ordering::Release);
        conn.send_batch(if durable { "BEGIN" } else { "BEGIN; SET LOCAL synchronous_commit TO OFF" })?;
        Ok(Write { pg: self, conn, done: false })
    }

    pub fn begin_read(&self) -> Result<Read<'_>, StoreError> {
        Ok(Read { pg: self, conn: self.read_conn()? })
    }

    fn known(&self, name: &str) -> bool {
        self.tables.lock().unwrap_or_else(|p| p.into_inner()).contains(name)
    }

    fn learn(&self, name: &str) {
        self.tables.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned());
    }

    /// Creates a table if it does not exist (on a connection of its own, so the table stays
    /// whatever becomes of the transaction that first needed it).
    fn ensure(&self, name: &str) -> Result<(), StoreError> {
        if self.known(name) {
            return Ok(());
        }
        let conn = self.read_conn()?;
        conn.batch(&format!("CREATE TABLE IF NOT EXISTS {name} (k bytea PRIMARY KEY, v bytea NOT NULL)")).or_else(
            |e| {
                // Two masters creating the same table at once: one of them loses the race on
                // the catalogue, and the table exists.
                if exists(&conn, name)? { Ok(()) } else { Err(e) }
            },
        )?;
        self.learn(name);
        Ok(())
    }
}

/// How long a standby waits for the lock at a time, between looks at the lease.
const BEAT: Duration = Duration::from_millis(500);

/// A lease that has not moved for its length.
struct Stale {
    epoch: i64,
    /// `renewed_at` as the database wrote it (compared, never interpreted).
    renewed: String,
    holder: String,
    ttl: Duration,
}

/// What a standby saw of the active master's lease, and since when by its own clock: a
/// lease is stale once it has not moved (a renewal, a new term) for its length as this
/// standby counts it, so neither clock of the database's host nor a standby's own late
/// start fences a master that renews.
#[derive(Default)]
struct LeaseWatch {
    seen: Option<(i64, String)>,
    since: Option<std::time::Instant>,
}

impl LeaseWatch {
    /// Whether the state has a lease at all (a master of this version took a term).
    fn held(&self) -> bool {
        self.seen.is_some()
    }

    /// Reads the lease; the lease when it has not moved for its length.
    fn look(&mut self, conn: &Conn) -> Result<Option<Stale>, StoreError> {
        if !exists(conn, "rbb_master_lease")? {
            return Ok(None);
        }
        let rows =
            conn.query_text("SELECT epoch, renewed_at::text, holder, ttl_ms FROM rbb_master_lease WHERE id = 1", &[])?;
        let Some(row) = rows.first() else { return Ok(None) };
        let now = (row.get::<_, i64>(0), row.get::<_, String>(1));
        let ttl = Duration::from_millis(row.get::<_, i64>(3).max(0) as u64);
        if self.seen.as_ref() != Some(&now) {
            self.seen = Some(now);
            self.since = Some(std::time::Instant::now());
            return Ok(None);
        }
        if self.since.is_none_or(|t| t.elapsed() < ttl) {
            return Ok(None);
        }
        let (epoch, renewed) = now;
        Ok(Some(Stale { epoch, renewed, holder: row.get(2), ttl }))
    }
}

/// Whether a master holds the lock now.
fn lock_held(conn: &Conn) -> Result<bool, StoreError> {
    let rows = conn.query_text(
        &format!(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = 0 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND objid = {MASTER_LOCK})"
        ),
        &[],
    )?;
    Ok(rows.first().is_some_and(|r| r.get::<_, bool>(0)))
}

/// The lease's current epoch (None: no master ever took a term).
fn lease_epoch(conn: &Conn) -> Result<Option<i64>, StoreError> {
    if !exists(conn, "rbb_master_lease")? {
        return Ok(None);
    }
    Ok(conn.query_text("SELECT epoch FROM rbb_master_lease WHERE id = 1", &[])?.first().map(|r| r.get(0)))
}

/// Renews a master's lease until told to stop; marks the master fenced when the lease's
/// epoch moved on (another master took the state).
struct Renewer {
    runtime: tokio::runtime::Handle,
    config: tokio_postgres::Config,
    shown: String,
    epoch: i64,
    every: Duration,
    lost: tokio::sync::watch::Sender<Option<String>>,
}

impl Renewer {
    fn run(self, stop: &std::sync::mpsc::Receiver<()>) {
        let mut conn: Option<Conn> = None;
        let epoch = self.epoch.to_string();
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(self.every) {
            if self.lost.borrow().is_some() {
                return;
            }
            if conn.as_ref().is_none_or(Conn::is_closed) {
                conn = match open_conn_on(&self.runtime, &self.config, &self.shown) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew this master's lease on the state");
                        continue;
                    }
                };
            }
            let Some(c) = conn.as_ref() else { continue };
            match c.query_text_within(
                &self.runtime,
                self.every,
                "UPDATE rbb_master_lease SET renewed_at = clock_timestamp() WHERE id = 1 AND epoch = $1::text::bigint \
                 RETURNING epoch",
                &[&epoch],
            ) {
                Ok(Some(rows)) if rows.is_empty() => {}
                Ok(Some(_)) => continue,
                Ok(None) => {
                    // No answer within a beat: a new connection next time.
                    tracing::warn!("cannot renew this master's lease on the state: no answer");
                    conn = None;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew this master's lease on the state");
                    continue;
                }
            }
            // Zero rows: the epoch moved on.
            let why = format!("another master took the state over (this master's term {} ended)", self.epoch);
            tracing::error!(database = %self.shown, reason = %why, "this master lost the state to another master; it writes nothing more");
            self.lost.send_replace(Some(why));
            return;
        }
    }
}

fn exists(conn: &Conn, name: &str) -> Result<bool, StoreError> {
    let rows = conn.query_text("SELECT to_regclass($1) IS NOT NULL", &[name])?;
    Ok(rows.first().is_some_and(|r| r.get::<_, bool>(0)))
}

fn open_conn(rt: &tokio::runtime::Runtime, config: &tokio_postgres::Config, shown: &str) -> Result<Conn, StoreError> {
    open_conn_on(rt.handle(), config, shown)
}

fn open_conn_on(rt: &tokio::runtime::Handle, config: &tokio_postgres::Config, shown: &str) -> Result<Conn, StoreError> {
    let config = config.clone();
    let connect = rt.spawn(async move {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %describe(&e), "connection to the state database ended");
            }
        });
        Ok::<_, tokio_postgres::Error>(client)
    });
    match futures::executor::block_on(connect) {
        Ok(Ok(client)) => Ok(Conn::new(client)),
        Ok(Err(e)) => Err(StoreError::Pg(format!("cannot connect to the state database {shown}: {}", describe(&e)))),
        Err(e) => Err(StoreError::Pg(format!("cannot connect to the state database {shown}: {e}"))),
    }
}

/// A pooled read connection; back to the pool when dropped.
pub struct Pooled<'p> {
    pg: &'p Pg,
    conn: Option<Conn>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("held until drop")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take()
            && !c.is_closed()
        {
            let mut idle = self.pg.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IDLE_READS {
                idle.push(c);
            }
        }
    }
}

pub struct Write<'p> {
    pg: &'p Pg,
    conn: MutexGuard<'p, Conn>,
    done: bool,
}

impl Write<'_> {
    pub fn table(&self, name: &str) -> Result<Table<'_>, StoreError> {
        let name = sql_name(name)?;
        self.pg.ensure(&name)?;
        Ok(Table { conn: &self.conn, name })
    }

    /// Sends `COMMIT` behind the writes, then reads every answer. A write the server refused
    /// aborted the transaction, which makes its `COMMIT` a rollback: the refusal is the
    /// answer, and nothing of the transaction is stored.
    pub fn commit(mut self) -> Result<(), StoreError> {
        if self.conn.failed.load(Ordering::Acquire) {
            // Rolled back on drop.
            return Err(StoreError::Pg("a statement of this transaction failed: nothing of it is stored".into()));
        }
        self.conn.send_batch("COMMIT")?;
        self.done = true;
        self.conn.settle()
    }

    /// The transaction's connection, for statements of the caller's own.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }
}

impl Drop for Write<'_> {
    fn drop(&mut self) {
        // Answers of writes sent are read (and dropped) before the rollback.
        let _ = self.conn.settle();
        if !self.done
            && let Err(e) = self.conn.batch("ROLLBACK")
        {
            tracing::warn!(error = %e, "cannot roll back a state transaction");
        }
    }
}

pub struct Read<'p> {
    pg: &'p Pg,
    conn: Pooled<'p>,
}

impl Read<'_> {
    /// The table, or None when it was never created.
    pub fn table(&self, name: &str) -> Result<Option<Table<'_>>, StoreError> {
        let name = sql_name(name)?;
        if !self.pg.known(&name) {
            if !exists(&self.conn, &name)? {
                return Ok(None);
            }
            self.pg.learn(&name);
        }
        Ok(Some(Table { conn: &self.conn, name }))
    }

    pub fn conn(&self) -> &Conn {
        &self.conn
    }
}

/// A table, through a transaction's (or a read's) connection.
pub struct Table<'c> {
    conn: &'c Conn,
    name: String,
}

impl<'c> Table<'c> {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self.conn.query(&format!("SELECT v FROM {} WHERE k = $1", self.name), &[&k])?;
        Ok(rows.first().map(|r| r.get::<_, Vec<u8>>(0)))
    }

    /// Writes a row (pipelined: its answer is read before the commit).
    pub fn put(&self, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        self.conn.send(
            &format!("INSERT INTO {} (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v", self.name),
            vec![k.to_vec(), v.to_vec()],
        )
    }

    /// Adds `delta` to the count (an 8-byte big-endian u64) at `k`, never below zero; a count
    /// that ends at zero is deleted. Pipelined like [`Table::put`]: nothing is read back.
    pub fn add(&self, k: &[u8], delta: i64) -> Result<(), StoreError> {
        let n = |v: &str| format!("('x' || encode({v}, 'hex'))::bit(64)::bigint");
        self.conn.send(
            &format!(
                "INSERT INTO {t} (k, v) VALUES ($1, int8send(GREATEST(0, {d}))) \
                 ON CONFLICT (k) DO UPDATE SET v = int8send(GREATEST(0, {old} + {d}))",
                t = self.name,
                d = n("$2"),
                old = n(&format!("{}.v", self.name)),
            ),
            vec![k.to_vec(), delta.to_be_bytes().to_vec()],
        )?;
        if delta <= 0 {
            self.conn
                .send(&format!("DELETE FROM {} WHERE k = $1 AND v = $2", self.name), vec![k.to_vec(), vec![0; 8]])?;
        }
        Ok(())
    }

    /// Deletes a row (pipelined, like [`Table::put`]).
    pub fn delete(&self, k: &[u8]) -> Result<(), StoreError> {
        self.conn.send(&format!("DELETE FROM {} WHERE k = $1", self.name), vec![k.to_vec()])
    }

    /// Writes many rows in one statement.
    pub fn put_many(&self, keys: &[Vec<u8>], vals: &[Vec<u8>]) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO {} (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
             ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
            self.name
        );
        wait(self.conn.client.query_typed(&sql, &[(&keys, Type::BYTEA_ARRAY), (&vals, Type::BYTEA_ARRAY)]))?;
        Ok(())
    }

    pub fn swap(&self, k: &[u8], v: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let n = &self.name;
        let rows = self.conn.query(
            &format!(
                "WITH old AS (SELECT v FROM {n} WHERE k = $1), \
                 up AS (INSERT INTO {n} (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v) \
                 SELECT v FROM old"
            ),
            &[&k, &v],
        )?;
        Ok(rows.first().map(|r| r.get::<_, Vec<u8>>(0)))
    }

    pub fn remove(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self.conn.query(&format!("DELETE FROM {} WHERE k = $1 RETURNING v", self.name), &[&k])?;
        Ok(rows.first().map(|r| r.get::<_, Vec<u8>>(0)))
    }

    #[allow(clippy::len_without_is_empty)] // emptiness is asked through a scan (kv::Table)
    pub fn len(&self) -> Result<u64, StoreError> {
        let rows = self.conn.query(&format!("SELECT count(*) FROM {}", self.name), &[])?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)) as u64)
    }

    /// Rows between two bounds, fetched a page at a time as the caller reads them.
    pub fn scan(&self, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>, rev: bool) -> Scan<'c> {
        Scan {
            conn: self.conn,
            name: self.name.clone(),
            lo,
            hi,
            rev,
            page: Vec::new().into_iter(),
            size: FIRST_PAGE,
            done: false,
        }
    }
}

pub struct Scan<'c> {
    conn: &'c Conn,
    name: String,
    lo: Bound<Vec<u8>>,
    hi: Bound<Vec<u8>>,
    rev: bool,
    page: std::vec::IntoIter<(Vec<u8>, Vec<u8>)>,
    /// Rows the next round trip fetches.
    size: i64,
    done: bool,
}

impl Scan<'_> {
    fn fetch(&mut self) -> Result<(), StoreError> {
        let mut cond = Vec::new();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for (b, incl, excl) in [(&self.lo, ">=", ">"), (&self.hi, "<=", "<")] {
            match b {
                Bound::Included(k) => {
                    params.push(k);
                    cond.push(format!("k {incl} ${}", params.len()));
                }
                Bound::Excluded(k) => {
                    params.push(k);
                    cond.push(format!("k {excl} ${}", params.len()));
                }
                Bound::Unbounded => {}
            }
        }
        let filter = if cond.is_empty() { String::new() } else { format!("WHERE {}", cond.join(" AND ")) };
        let order = if self.rev { "DESC" } else { "ASC" };
        let sql = format!("SELECT k, v FROM {} {filter} ORDER BY k {order} LIMIT {}", self.name, self.size);
        let rows = self.conn.query(&sql, &params)?;
        let rows: Vec<(Vec<u8>, Vec<u8>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if (rows.len() as i64) < self.size {
            self.done = true;
        }
        self.size = (self.size * 4).min(PAGE);
        if let Some((last, _)) = rows.last() {
            // The next page starts after the last key read.
            if self.rev {
                self.hi = Bound::Excluded(last.clone());
            } else {
                self.lo = Bound::Excluded(last.clone());
            }
        }
        self.page = rows.into_iter();
        Ok(())
    }
}

impl Iterator for Scan<'_> {
    type Item = Result<(Vec<u8>, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(row) = self.page.next() {
                return Some(Ok(row));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.fetch() {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn a_state_url_is_shown_without_its_password() {
        assert_eq!(redact("postgres://rbb:s3cret@db.example:5432/ci"), "postgres://rbb:<hidden>@db.example:5432/ci");
        assert_eq!(
            redact("postgres://rbb@127.0.0.1/ci?password=s3cret&sslmode=disable"),
            "postgres://rbb@127.0.0.1/ci?sslmode=disable"
        );
        assert_eq!(redact("postgresql://h/ci"), "postgresql://h/ci");
        assert_eq!(redact("host=h user=u password=s3cret dbname=ci"), "host=h user=u dbname=ci");
    }

    /// The writing connection ended by the server (a restart) between transactions: the
    /// next transaction, which asks first, runs on a new connection that holds the lock
    /// again, instead of failing.
    #[test]
    fn a_transaction_after_the_server_ended_the_connection_runs_on_a_new_one() {
        let url = crate::store::testing::fresh_database();
        let mut pg = super::Pg::connect(&url, None).expect("connect");
        pg.idle_probe = std::time::Duration::ZERO;
        pg.lock_master().expect("lock");
        let txn = pg.begin_write(true).expect("begin");
        txn.table("probe").expect("table").put(b"a", b"1").expect("put");
        txn.commit().expect("commit");
        let pid: i32 =
            pg.write_conn().expect("conn").query_text("SELECT pg_backend_pid()", &[]).expect("pid")[0].get(0);
        let admin = super::Pg::connect(&url, None).expect("admin");
        let ended = admin
            .read_conn()
            .expect("conn")
            .query_text("SELECT pg_terminate_backend($1::text::int, 10000)", &[&pid.to_string()])
            .expect("terminate");
        assert!(ended[0].get::<_, bool>(0), "the writing session ended");
        let txn = pg.begin_write(true).expect("a new connection");
        txn.table("probe").expect("table").put(b"b", b"2").expect("put");
        txn.commit().expect("the transaction commits");
        let read = pg.begin_read().expect("read");
        let t = read.table("probe").expect("table").expect("exists");
        assert_eq!((t.get(b"a").expect("a"), t.get(b"b").expect("b")), (Some(b"1".to_vec()), Some(b"2".to_vec())));
        let held = admin.master_status().expect("status").expect("a lease");
        assert!(held.contains("term 1") && !held.starts_with("none"), "the lock is held again: {held}");
    }

    /// PostgreSQL aborts a transaction at its first failed statement and answers its
    /// `COMMIT` with a rollback, not an error: the commit must fail all the same.
    #[test]
    fn a_transaction_with_a_failed_statement_does_not_commit_and_says_so() {
        let pg = super::Pg::connect(&crate::store::testing::fresh_database(), None).expect("connect");
        let txn = pg.begin_write(true).expect("begin");
        txn.table("failed_txn").expect("table").put(b"a", b"1").expect("put");
        assert!(txn.conn().query_text("SELECT 1/0", &[]).is_err(), "division by zero");
        let e = txn.commit().expect_err("a failed statement fails the commit");
        assert!(e.to_string().contains("nothing of it is stored"), "{e}");
        let txn = pg.begin_write(true).expect("begin again");
        assert_eq!(txn.table("failed_txn").expect("table").get(b"a").expect("get"), None, "nothing stored");
        txn.table("failed_txn").expect("table").put(b"b", b"2").expect("put");
        txn.commit().expect("the next transaction commits");
        let read = pg.begin_read().expect("read");
        let t = read.table("failed_txn").expect("table").expect("exists");
        assert_eq!(t.get(b"b").expect("get"), Some(b"2".to_vec()));
    }
}
