//! The master's durable state in one redb file: every table and key encoding lives here,
//! with a schema version checked (and migrated forward) at open.
//!
//! Records are stored as JSON (small, debuggable, forward compatible by adding fields).
//! Builds and changes are indexed by the fields the API filters on, and counts per index
//! value are kept in the same transaction as the records, so a list is a key-range scan
//! and its total a lookup: reading costs what is asked for, not what is stored. The engine
//! keeps only live builds in memory and reads history from here.
//! Nothing outside this module names a table.

use crate::cache::{CacheEntry, CacheStats, Evicted, LastRun};
use crate::model::{BuildRecord, ChangeRecord, LogRecord, ScheduleRecord};
use kv::{Db, Table, WriteTxn};
use rbb_schema::api::State;
use redb::TableDefinition;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub mod kv;
pub mod pg;
pub mod testing;

/// Bumped when a table or encoding changes incompatibly. Version 1 (no indexes) is
/// migrated forward at open.
pub const SCHEMA_VERSION: u64 = 2;

/// A table of JSON records by id, and an index over one (`<field>\0<value>`, id).
type Records = TableDefinition<'static, u64, &'static [u8]>;
type Index = TableDefinition<'static, (&'static str, u64), ()>;
/// A plan's manifest and its parts (hash, JSON).
type PlanParts = (Vec<u8>, Vec<(String, Vec<u8>)>);

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const BUILDS: TableDefinition<u64, &[u8]> = TableDefinition::new("builds");
const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
/// Cron schedule state, keyed `<builder id>#<schedule index>`.
const SCHEDULES: TableDefinition<&str, &[u8]> = TableDefinition::new("schedules");
/// Every plan a build was pinned to, by hash: a rebuild runs exactly the same plan. The
/// value is a manifest naming one part per repository (older states hold whole plans).
const PLANS: TableDefinition<&str, &[u8]> = TableDefinition::new("plans");
/// One repository's builders of a plan, by the hash of their JSON: a pipeline commit in
/// one repository adds one part, not a copy of the fleet.
const PLAN_PARTS: TableDefinition<&str, &[u8]> = TableDefinition::new("plan_parts");
/// Build index: (`<field>\0<value>`, build id). Fields: [`BUILD_INDEXES`].
const BUILD_IDX: TableDefinition<(&str, u64), ()> = TableDefinition::new("build_idx");
/// Change index: (`<field>\0<value>`, change id). Fields: `change_repo`, `change_commit`
/// (`<repo>\0<sha>`): named apart from the build index's, as both share the counts.
const CHANGE_IDX: TableDefinition<(&str, u64), ()> = TableDefinition::new("change_idx");
/// Record counts: `builds`, `changes`, and one per index key; the step cache's totals
/// ([`CACHE_ENTRIES_COUNT`], [`CACHE_BLOBS_COUNT`], [`CACHE_BYTES_COUNT`]).
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");
/// Step cache entries: full key → JSON [`CacheEntry`].
const CACHE_ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("cache_entries");
/// When each entry was last used (Unix ms): full key → time...
const CACHE_USED: TableDefinition<&str, u64> = TableDefinition::new("cache_used");
/// ...and the same as an index, least recently used first: (time, full key).
const CACHE_LRU: TableDefinition<(u64, &str), ()> = TableDefinition::new("cache_lru");
/// Blob rows: digest → (stored bytes, references from entries, since when it has none or
/// was last uploaded, Unix ms). A row is written when an upload is complete on disk.
const CACHE_BLOBS: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("cache_blobs");
/// Blobs no entry uses, by the time they became so: (since, digest).
const CACHE_ORPHANS: TableDefinition<(u64, &str), ()> = TableDefinition::new("cache_orphans");
/// Hits and misses per builder: builder → (hits, misses).
const CACHE_HITS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("cache_hits");
/// The last successful execution of a step: `<builder>\0<step>` → JSON [`LastRun`].
const CACHE_LAST: TableDefinition<&str, &[u8]> = TableDefinition::new("cache_last");

/// Where the active master answers (`http`, `grpc` → `host:port`), for standbys that
/// forward to it. Not copied by `rbb state migrate`: it names a running master.
const ACTIVE: TableDefinition<&str, &str> = TableDefinition::new("active");

const CACHE_ENTRIES_COUNT: &str = "cache.entries";
const CACHE_BLOBS_COUNT: &str = "cache.blobs";
const CACHE_BYTES_COUNT: &str = "cache.stored_bytes";
/// Rows removed per eviction transaction.
const CACHE_EVICT_BATCH: usize = 256;
/// A blob uploaded but used by no entry this long is an orphan of a step that never
/// finished (or whose entry is gone), and is removed.
pub const CACHE_ORPHAN_AGE_MS: u64 = 3_600_000;

/// redb's page cache.
const STORE_CACHE_BYTES: usize = 32 << 20;

/// Build fields with an index (each answers `field=value` with a key-range scan).
pub const BUILD_INDEXES: &[&str] =
    &["builder", "repo", "branch", "commit", "result", "state", "worker", "event", "change"];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}: {source}")]
    Open { path: PathBuf, source: Box<redb::Error> },
    #[error(
        "the state database {shown} has schema version {found}, newer than this master's {SCHEMA_VERSION}: run the rbb version that wrote it (or newer)"
    )]
    Version { shown: String, found: u64 },
    #[error(
        "the state database {shown} has schema version {found}, older than this master's {SCHEMA_VERSION}: back it up, then start the master once with --migrate (or run `rbb state check --migrate`)"
    )]
    Older { shown: String, found: u64 },
    #[error("state database error: {0}")]
    Db(#[from] Box<redb::Error>),
    #[error("state database (PostgreSQL): {0}")]
    Pg(String),
    #[error(
        "the state database {shown} is in use by another rbb master (process {holder}); stop it first, or give this master a database of its own"
    )]
    InUse { shown: String, holder: String },
    #[error(
        "this master no longer holds the state database {shown}: {why}; it stops (start it again, as a --standby, to take over when the other master stops)"
    )]
    Fenced { shown: String, why: String },
    #[error("corrupt record in table {table} at key {key}: {message}")]
    Corrupt { table: &'static str, key: u64, message: String },
}

pub(crate) fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

fn encode<T: serde::Serialize>(table: &'static str, key: u64, r: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(r).map_err(|e| StoreError::Corrupt { table, key, message: e.to_string() })
}

fn decode<T: serde::de::DeserializeOwned>(table: &'static str, key: u64, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { table, key, message: e.to_string() })
}

/// The index keys of a build: `<field>\0<value>`.
pub fn build_keys(b: &BuildRecord) -> BTreeSet<String> {
    let state = match b.state {
        State::Pending => "pending",
        State::Running => "running",
        State::Finished => "finished",
    };
    let result = b.result.filter(|_| b.state == State::Finished).map_or("none".to_owned(), |r| r.to_string());
    let mut keys: BTreeSet<String> = [
        ("builder", b.builder.as_str()),
        ("repo", b.repo.as_str()),
        ("branch", b.branch.as_str()),
        ("commit", b.commit.as_str()),
        ("result", result.as_str()),
        ("state", state),
        ("worker", b.worker.as_deref().unwrap_or("none")),
        ("event", b.event.as_str()),
        ("plan", b.plan_hash.as_str()),
    ]
    .into_iter()
    .map(|(f, v)| index_key(f, v))
    .collect();
    keys.extend(b.changes.iter().map(|c| index_key("change", &c.to_string())));
    keys
}

fn change_keys(c: &ChangeRecord) -> BTreeSet<String> {
    [index_key("change_repo", &c.repo), index_key("change_commit", &format!("{}\0{}", c.repo, c.commit))]
        .into_iter()
        .collect()
}

/// The key of `field=value` in an index.
pub fn index_key(field: &str, value: &str) -> String {
    format!("{field}\0{value}")
}

pub struct Store {
    db: Db,
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicBool,
}

/// The schema version of a redb state file, read without changing it.
pub fn peek_redb_version(path: &Path) -> Result<Option<u64>, StoreError> {
    let database = redb::Database::open(path)
        .map_err(|e| StoreError::Open { path: path.to_owned(), source: Box::new(e.into()) })?;
    Store::with(Db::Redb(database)).schema_version()
}

/// The schema version of a PostgreSQL state, read without taking the master's lock.
pub fn peek_postgres_version(url: &str, password: Option<&str>) -> Result<Option<u64>, StoreError> {
    Store::peek_postgres(url, password)?.schema_version()
}

/// Where a master's state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// One redb file (a single master).
    File(PathBuf),
    /// A PostgreSQL database; the password, when the URL has none, from the config's file or
    /// environment variable.
    Postgres { url: String, password: Option<String>, lease: std::time::Duration },
}

impl Location {
    /// The config's `state` (relative files from `config_dir`), or the redb file in
    /// `state_dir` without it.
    pub fn from_config(
        state: Option<&rbb_schema::config::StateConfig>,
        state_dir: &Path,
        config_dir: &Path,
    ) -> Result<Location, String> {
        use rbb_schema::config::{StateConfig, StateDatabase as StateDatabaseConfig};
        let Some(state) = state else { return Ok(Location::File(state_dir.join("state.redb"))) };
        let url = state.url().trim();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(format!(
                "state: {:?} is not a postgres:// URL (leave `state` out to keep the state in a redb file in state_dir)",
                pg::redact(url)
            ));
        }
        let lease = match state {
            StateConfig::Database(StateDatabaseConfig { lease: Some(text), .. }) => {
                let ms = rbb_compiler::duration::parse_duration_ms(text).map_err(|e| format!("state: lease: {e}"))?;
                if ms < 1000 {
                    return Err(format!("state: lease: {text} is shorter than a second"));
                }
                std::time::Duration::from_millis(ms)
            }
            _ => pg::DEFAULT_LEASE,
        };
        let password = match state {
            StateConfig::Url(_) => std::env::var("PGPASSWORD").ok(),
            StateConfig::Database(d) => match (&d.password_file, &d.password_env) {
                (Some(_), Some(_)) => return Err("state: give password_file or password_env, not both".into()),
                (Some(file), None) => {
                    let path = config_dir.join(file);
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("state: cannot read password_file {}: {e}", path.display()))?;
                    Some(text.lines().next().unwrap_or("").to_owned())
                }
                (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
                    format!("state: password_env names {var}, which is not set in the master's environment")
                })?),
                (None, None) => std::env::var("PGPASSWORD").ok(),
            },
        };
        Ok(Location::Postgres { url: url.to_owned(), password, lease })
    }

    /// What messages may name: the path, or the URL without its password.
    pub fn shown(&self) -> String {
        match self {
            Location::File(p) => p.display().to_string(),
            Location::Postgres { url, .. } => pg::redact(url),
        }
    }
}

/// Whether opening a state with an older schema migrates it forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrate {
    Yes,
    No,
}

/// Records written together by [`Store::commit`]: all of them or none.
#[derive(Default)]
pub struct Batch<'a> {
    pub builds: Vec<&'a BuildRecord>,
    pub logs: Vec<&'a LogRecord>,
    pub changes: Vec<&'a ChangeRecord>,
    pub schedules: Vec<(&'a str, &'a ScheduleRecord)>,
    pub plans: Vec<&'a rbb_schema::plan::Plan>,
    /// Commit statuses to deliver, queued in the forge outbox with the build states they
    /// report: a status is never lost, nor sent for a state that was not stored.
    pub statuses: Vec<crate::forge::status::StatusRow>,
    /// Cache entries of steps that succeeded, last used at their `created_at`. Each takes a
    /// reference on its blobs; one naming a blob without a row is not stored (a blob must
    /// be whole on disk before an entry refers to it). An entry replaces one of the same key.
    pub cache_entries: Vec<&'a CacheEntry>,
    /// Entries a hit reused: (full key, when, Unix ms).
    pub cache_touches: Vec<(&'a str, u64)>,
    /// Hits and misses to add: (builder, hits, misses).
    pub cache_counts: Vec<(&'a str, u64, u64)>,
    /// The last successful execution of a step: (builder, step name, run).
    pub cache_last: Vec<(&'a str, &'a str, &'a LastRun)>,
}

impl Batch<'_> {
    pub fn is_empty(&self) -> bool {
        self.statuses.is_empty()
            && self.builds.is_empty()
            && self.logs.is_empty()
            && self.changes.is_empty()
            && self.schedules.is_empty()
            && self.plans.is_empty()
            && self.cache_entries.is_empty()
            && self.cache_touches.is_empty()
            && self.cache_counts.is_empty()
            && self.cache_last.is_empty()
    }
}

/// Whether a write must be on disk before `commit` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    Durable,
    Lazy,
}

/// Adds `delta` to a count.
fn bump(counts: &mut Table<'_, &'static str, u64>, key: &str, delta: i64) -> Result<(), StoreError> {
    counts.add(key, delta)
}

/// Writes `rec` (encoded as `bytes`) with its index entries and counts, replacing what an
/// earlier version of the same record had.
fn put_indexed(
    txn: &WriteTxn<'_>,
    (table, idx, total): (Records, Index, &str),
    id: u64,
    bytes: &[u8],
    new_keys: BTreeSet<String>,
    old_keys: impl FnOnce(&[u8]) -> Result<BTreeSet<String>, StoreError>,
) -> Result<(), StoreError> {
    let mut t = txn.open_table(table)?;
    let mut ix = txn.open_table(idx)?;
    let mut counts = txn.open_table(COUNTS)?;
    let old = match t.get(id)? {
        Some(v) => Some(old_keys(&v)?),
        None => None,
    };
    if old.is_none() {
        bump(&mut counts, total, 1)?;
    }
    let old = old.unwrap_or_default();
    for k in old.difference(&new_keys) {
        ix.delete((k.as_str(), id))?;
        bump(&mut counts, k, -1)?;
    }
    for k in new_keys.difference(&old) {
        ix.insert((k.as_str(), id), ())?;
        bump(&mut counts, k, 1)?;
    }
    t.insert(id, bytes)?;
    Ok(())
}

impl Store {
    /// The database, for modules that keep their own tables in it (the status outbox).
    pub fn database(&self) -> &Db {
        &self.db
    }

    /// Opens (creating it if needed) the state file of a single master, migrating an older
    /// schema forward.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        // A bounded page cache: redb's default (1 GiB) would let the master's memory follow
        // the size of the history it reads.
        let database = redb::Builder::new()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Open { path: path.to_owned(), source: Box::new(e.into()) })?;
        let store = Store::with(Db::Redb(database));
        store.init(&path.display().to_string(), Migrate::Yes)?;
        Ok(store)
    }

    /// Connects to a state database in PostgreSQL (`password` when the URL has none),
    /// creating its tables in an empty database. An older schema is migrated only with
    /// `migrate`; a newer one is refused.
    pub fn open_postgres(url: &str, password: Option<&str>, migrate: Migrate) -> Result<Store, StoreError> {
        Store::open_postgres_as(url, password, migrate, pg::DEFAULT_LEASE, None::<fn(&str)>)
    }

    /// [`Store::open_postgres`] with a lease of `lease`. A standby (`standby` given): when
    /// another master holds the database, waits until it stops or its lease runs out
    /// (`standby` is told who holds it), then opens it.
    pub fn open_postgres_as(
        url: &str,
        password: Option<&str>,
        migrate: Migrate,
        lease: std::time::Duration,
        standby: Option<impl FnOnce(&str)>,
    ) -> Result<Store, StoreError> {
        let is_standby = standby.is_some();
        let mut waiting = standby;
        loop {
            let mut pg = pg::Pg::connect(url, password)?;
            pg.set_lease(lease);
            match waiting.take() {
                Some(tell) => pg.lock_master_waiting(tell)?,
                None if is_standby => pg.lock_master_waiting(|_| {})?,
                None => pg.lock_master()?,
            }
            let shown = pg.shown.clone();
            let store = Store::with(Db::Pg(Box::new(pg)));
            match store.init(&shown, migrate) {
                Ok(()) => return Ok(store),
                // A standby whose connection ended the moment it got the state (the database
                // restarting) waits again rather than exiting.
                Err(e) if is_standby && matches!(&store.db, Db::Pg(pg) if pg.write_closed()) => {
                    tracing::warn!(state = %shown, error = %e, "standby: the connection ended as this master opened the state; waiting again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Which master holds a PostgreSQL state ([`pg::Pg::master_status`]); None on redb.
    pub fn master_status(&self) -> Result<Option<String>, StoreError> {
        match &self.db {
            Db::Pg(pg) => pg.master_status(),
            Db::Redb(_) => Ok(None),
        }
    }

    /// Answers why, once another master took this master's PostgreSQL state over (None on
    /// redb: nobody can).
    pub fn lost(&self) -> Option<tokio::sync::watch::Receiver<Option<String>>> {
        match &self.db {
            Db::Pg(pg) => Some(pg.lost()),
            Db::Redb(_) => None,
        }
    }

    /// A PostgreSQL state whose master's lock `pg` holds, its schema created or checked.
    /// Records where this (active) master answers HTTP and gRPC, durably.
    pub fn set_active(&self, http: &str, grpc: &str) -> Result<(), StoreError> {
        self.write(Sync::Durable, |txn| {
            let mut t = txn.open_table(ACTIVE)?;
            t.insert("http", http)?;
            t.insert("grpc", grpc)
        })
    }

    /// Where the active master answers `port` (`http` or `grpc`), as it recorded it.
    pub fn active(&self, port: &str) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let found = txn.open_table(ACTIVE)?.get(port)?;
        Ok(found)
    }

    /// A connection to a PostgreSQL state that takes no lock and writes nothing (a standby's
    /// view, `rbb state check`).
    pub fn peek_postgres(url: &str, password: Option<&str>) -> Result<Store, StoreError> {
        Ok(Store::with(Db::Pg(Box::new(pg::Pg::connect(url, password)?))))
    }

    /// Opens the state a master config names.
    pub fn open_at(at: &Location, migrate: Migrate) -> Result<Store, StoreError> {
        match at {
            Location::File(path) => Store::open(path),
            Location::Postgres { url, password, lease } => {
                Store::open_postgres_as(url, password.as_deref(), migrate, *lease, None::<fn(&str)>)
            }
        }
    }

    fn with(db: Db) -> Store {
        Store {
            db,
            #[cfg(test)]
            fail_writes: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The schema version the state holds, without changing anything (None: an empty state).
    pub fn schema_version(&self) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let found = txn.open_table(META)?.get("schema_version")?;
        Ok(found)
    }

    fn init(&self, shown: &str, migrate: Migrate) -> Result<(), StoreError> {
        let txn = durable_write(&self.db)?;
        let found = {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("schema_version")?;
            if found.is_none() {
                meta.insert("schema_version", SCHEMA_VERSION)?;
            }
            found
        };
        for t in [BUILDS, LOGS, CHANGES, AUDIT] {
            txn.open_table(t)?;
        }
        txn.open_table(PLANS)?;
        txn.open_table(PLAN_PARTS)?;
        txn.open_table(SCHEDULES)?;
        txn.open_table(BUILD_IDX)?;
        txn.open_table(CHANGE_IDX)?;
        txn.open_table(COUNTS)?;
        // The step cache's tables came after schema 2 and start empty: no migration.
        txn.open_table(CACHE_ENTRIES)?;
        txn.open_table(CACHE_USED)?;
        txn.open_table(CACHE_LRU)?;
        txn.open_table(CACHE_BLOBS)?;
        txn.open_table(CACHE_ORPHANS)?;
        txn.open_table(CACHE_HITS)?;
        txn.open_table(CACHE_LAST)?;
        match found {
            None => {}
            Some(SCHEMA_VERSION) => {}
            Some(1) if migrate == Migrate::Yes => {
                tracing::info!(state = %shown, "migrating the state database from schema version 1 to 2 (indexes)");
                migrate_v1(&txn)?;
                txn.open_table(META)?.insert("schema_version", SCHEMA_VERSION)?;
            }
            Some(v) if v < SCHEMA_VERSION => return Err(StoreError::Older { shown: shown.to_owned(), found: v }),
            Some(v) => return Err(StoreError::Version { shown: shown.to_owned(), found: v }),
        }
        txn.commit()
    }

    /// Writes every record of `batch` in one transaction, with their index entries and
    /// counts: a state change is stored whole or not at all.
    pub fn commit(&self, batch: Batch<'_>, sync: Sync) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.fail_writes.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Db(Box::new(redb::Error::Io(std::io::Error::other(
                "no space left on device (test)",
            )))));
        }
        let builds: Vec<(&BuildRecord, Vec<u8>)> =
            batch.builds.iter().map(|b| encode("builds", b.id, b).map(|v| (*b, v))).collect::<Result<_, _>>()?;
        let logs: Vec<(u64, Vec<u8>)> =
            batch.logs.iter().map(|l| encode("logs", l.id, l).map(|v| (l.id, v))).collect::<Result<_, _>>()?;
        let changes: Vec<(&ChangeRecord, Vec<u8>)> =
            batch.changes.iter().map(|c| encode("changes", c.id, c).map(|v| (*c, v))).collect::<Result<_, _>>()?;
        let schedules: Vec<(&str, Vec<u8>)> = batch
            .schedules
            .iter()
            .map(|(k, r)| encode("schedules", 0, r).map(|v| (*k, v)))
            .collect::<Result<_, _>>()?;
        let cache_entries: Vec<(&CacheEntry, Vec<u8>)> = batch
            .cache_entries
            .iter()
            .map(|e| encode("cache_entries", 0, e).map(|v| (*e, v)))
            .collect::<Result<_, _>>()?;
        let cache_last: Vec<(String, Vec<u8>)> = batch
            .cache_last
            .iter()
            .map(|(b, st, r)| encode("cache_last", 0, r).map(|v| (last_key(b, st), v)))
            .collect::<Result<_, _>>()?;
        let mut plans: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
        for p in &batch.plans {
            let (manifest, mut ps) = split_plan(p)?;
            plans.push((p.hash.as_str(), manifest));
            parts.append(&mut ps);
        }
        self.write(sync, |txn| {
            for (b, bytes) in &builds {
                put_indexed(txn, (BUILDS, BUILD_IDX, "builds"), b.id, bytes, build_keys(b), |old| {
                    build_keys_of(b.id, old)
                })?;
            }
            for (c, bytes) in &changes {
                put_indexed(txn, (CHANGES, CHANGE_IDX, "changes"), c.id, bytes, change_keys(c), |old| {
                    change_keys_of(c.id, old)
                })?;
            }
            if !logs.is_empty() {
                let mut t = txn.open_table(LOGS)?;
                for (id, bytes) in &logs {
                    t.insert(*id, bytes.as_slice())?;
                }
            }
            for (table, rows) in [(SCHEDULES, &schedules), (PLANS, &plans)] {
                if rows.is_empty() {
                    continue;
                }
                let mut t = txn.open_table(table)?;
                for (k, bytes) in rows {
                    t.insert(*k, bytes.as_slice())?;
                }
            }
            if !batch.statuses.is_empty() {
                crate::forge::outbox_store::write_rows(txn, &batch.statuses).map_err(|e| StoreError::Corrupt {
                    table: "outbox",
                    key: 0,
                    message: e.to_string(),
                })?;
            }
            if !parts.is_empty() {
                let mut t = txn.open_table(PLAN_PARTS)?;
                for (k, bytes) in &parts {
                    if t.get(k.as_str())?.is_none() {
                        t.insert(k.as_str(), bytes.as_slice())?;
                    }
                }
            }
            if !cache_entries.is_empty() || !batch.cache_touches.is_empty() {
                let mut c = CacheTables::open(txn)?;
                let now = crate::model::now_ms();
                for (e, bytes) in &cache_entries {
                    c.put_entry(e, bytes, now)?;
                }
                for (key, at) in &batch.cache_touches {
                    c.touch(key, *at)?;
                }
            }
            if !batch.cache_counts.is_empty() {
                let mut t = txn.open_table(CACHE_HITS)?;
                for (builder, hits, misses) in &batch.cache_counts {
                    let (h, m) = t.get(*builder)?.unwrap_or((0, 0));
                    t.insert(*builder, (h.saturating_add(*hits), m.saturating_add(*misses)))?;
                }
            }
            if !cache_last.is_empty() {
                let mut t = txn.open_table(CACHE_LAST)?;
                for (k, bytes) in &cache_last {
                    t.insert(k.as_str(), bytes.as_slice())?;
                }
            }
            Ok(())
        })
    }

    /// Makes every earlier lazy write durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        match &self.db {
            // An empty durable commit flushes the file.
            Db::Redb(_) => self.write(Sync::Durable, |_| Ok(())),
            // PostgreSQL flushes the WAL only for a transaction that wrote something: its
            // commit record comes after every earlier lazy commit's, so waiting for it waits
            // for them.
            Db::Pg(_) => {
                self.write(Sync::Durable, |txn| txn.open_table(META)?.insert("synced_at", crate::model::now_ms()))
            }
        }
    }

    /// Makes every later write fail, as a full disk would (tests only).
    #[cfg(test)]
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, std::sync::atomic::Ordering::Release);
    }

    fn write(&self, sync: Sync, f: impl FnOnce(&WriteTxn<'_>) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let txn = self.db.begin_write(sync == Sync::Durable)?;
        f(&txn)?;
        txn.commit()
    }

    fn get<T: serde::de::DeserializeOwned>(
        &self,
        table: Records,
        name: &'static str,
        id: u64,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        match t.get(id)? {
            Some(v) => decode(name, id, &v).map(Some),
            None => Ok(None),
        }
    }

    fn last_key(&self, table: Records) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        Ok(t.last()?.map(|(k, _)| k))
    }

    pub fn build(&self, id: u64) -> Result<Option<BuildRecord>, StoreError> {
        self.get(BUILDS, "builds", id)
    }

    pub fn log(&self, id: u64) -> Result<Option<LogRecord>, StoreError> {
        self.get(LOGS, "logs", id)
    }

    pub fn change(&self, id: u64) -> Result<Option<ChangeRecord>, StoreError> {
        self.get(CHANGES, "changes", id)
    }

    /// The highest ids in use: (build, log, change).
    pub fn last_ids(&self) -> Result<(u64, u64, u64), StoreError> {
        Ok((
            self.last_key(BUILDS)?.unwrap_or(0),
            self.last_key(LOGS)?.unwrap_or(0),
            self.last_key(CHANGES)?.unwrap_or(0),
        ))
    }

    /// A maintained count: `builds`, `changes`, or an index key ([`index_key`]).
    pub fn count(&self, key: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(COUNTS)?;
        Ok(t.get(key)?.unwrap_or(0))
    }

    /// Builds newest first (or oldest first), all of them or those under one index key,
    /// handed to `f` until it returns false.
    pub fn scan_builds(
        &self,
        index: Option<&str>,
        newest_first: bool,
        f: impl FnMut(BuildRecord) -> bool,
    ) -> Result<(), StoreError> {
        self.scan((BUILDS, BUILD_IDX, "builds"), index, newest_first, f)
    }

    /// The index keys of `field` whose value starts with `prefix`, with their counts (those
    /// counting at least one build): one range scan of the maintained counts.
    pub fn index_keys_under(&self, field: &str, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let start = index_key(field, prefix);
        let txn = self.db.begin_read()?;
        let t = txn.open_table(COUNTS)?;
        let mut out = Vec::new();
        for row in t.range(start.as_str()..)? {
            let (key, v) = row?;
            if !key.starts_with(&start) {
                break;
            }
            if v > 0 {
                out.push((key, v));
            }
        }
        Ok(out)
    }

    /// Builds under any of several index keys, newest first (or oldest first), handed to
    /// `f` until it returns false: one range scan per key, merged in id order (a build under
    /// two of the keys comes once).
    pub fn scan_builds_any(
        &self,
        keys: &[String],
        newest_first: bool,
        mut f: impl FnMut(BuildRecord) -> bool,
    ) -> Result<(), StoreError> {
        type Ids<'a> = Box<dyn Iterator<Item = Result<u64, StoreError>> + 'a>;
        let txn = self.db.begin_read()?;
        let t = txn.open_table(BUILDS)?;
        let ix = txn.open_table(BUILD_IDX)?;
        let mut ranges: Vec<Ids<'_>> = Vec::with_capacity(keys.len());
        for key in keys {
            let bounds = (key.as_str(), 0)..=(key.as_str(), u64::MAX);
            let range = if newest_first { ix.range_rev(bounds)? } else { ix.range(bounds)? };
            ranges.push(Box::new(range.map(|row| row.map(|((_, id), ())| id))));
        }
        let mut heads: Vec<Option<u64>> = Vec::with_capacity(ranges.len());
        for r in &mut ranges {
            heads.push(r.next().transpose()?);
        }
        let mut last = None;
        loop {
            let next = heads.iter().flatten().copied();
            let next = if newest_first { next.max() } else { next.min() };
            let Some(id) = next else { return Ok(()) };
            for (head, range) in heads.iter_mut().zip(&mut ranges) {
                if *head == Some(id) {
                    *head = range.next().transpose()?;
                }
            }
            if last == Some(id) {
                continue;
            }
            last = Some(id);
            if let Some(v) = t.get(id)?
                && !f(decode("builds", id, &v)?)
            {
                return Ok(());
            }
        }
    }

    /// Like [`Store::scan_builds`], reading only each build's head (no steps).
    pub fn scan_build_heads(
        &self,
        index: Option<&str>,
        newest_first: bool,
        f: impl FnMut(crate::model::BuildHead) -> bool,
    ) -> Result<(), StoreError> {
        self.scan((BUILDS, BUILD_IDX, "builds"), index, newest_first, f)
    }

    /// The newest pushed commit the state recorded on each of `branches` of `repo` (exact
    /// names), looking at that repository's newest `within` changes at most.
    pub fn recorded_heads(
        &self,
        repo: &str,
        branches: &[String],
        within: usize,
    ) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
        let mut found = std::collections::BTreeMap::new();
        let mut looked = 0;
        self.scan_changes(Some(&index_key("change_repo", repo)), true, |c| {
            looked += 1;
            if c.event == "push" && branches.contains(&c.branch) {
                found.entry(c.branch).or_insert(c.commit);
            }
            looked < within && found.len() < branches.len()
        })?;
        Ok(found)
    }

    /// Changes newest first (or oldest first), all or those under one index key.
    pub fn scan_changes(
        &self,
        index: Option<&str>,
        newest_first: bool,
        f: impl FnMut(ChangeRecord) -> bool,
    ) -> Result<(), StoreError> {
        self.scan((CHANGES, CHANGE_IDX, "changes"), index, newest_first, f)
    }

    fn scan<T: serde::de::DeserializeOwned>(
        &self,
        (table, idx, name): (Records, Index, &'static str),
        index: Option<&str>,
        newest_first: bool,
        mut f: impl FnMut(T) -> bool,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        match index {
            None => {
                let rows = if newest_first { t.iter_rev()? } else { t.iter()? };
                for row in rows {
                    let (id, v) = row?;
                    if !f(decode(name, id, &v)?) {
                        break;
                    }
                }
            }
            Some(key) => {
                let ix = txn.open_table(idx)?;
                let bounds = (key, 0)..=(key, u64::MAX);
                let rows = if newest_first { ix.range_rev(bounds)? } else { ix.range(bounds)? };
                for row in rows {
                    let ((_, id), ()) = row?;
                    if let Some(v) = t.get(id)?
                        && !f(decode(name, id, &v)?)
                    {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn schedules(&self) -> Result<Vec<(String, ScheduleRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SCHEDULES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.clone(), decode("schedules", 0, &v)?));
        }
        Ok(out)
    }

    pub fn put_plan(&self, plan: &rbb_schema::plan::Plan) -> Result<(), StoreError> {
        self.commit(Batch { plans: vec![plan], ..Batch::default() }, Sync::Durable)
    }

    /// The plan with this hash, if a build was ever pinned to it, put together from its parts.
    pub fn plan(&self, hash: &str) -> Result<Option<rbb_schema::plan::Plan>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PLANS)?;
        let Some(v) = t.get(hash)? else { return Ok(None) };
        let manifest: PlanManifest = match decode("plans", 0, &v) {
            Ok(m) => m,
            // Stored whole by an older version.
            Err(_) => return decode("plans", 0, &v).map(Some),
        };
        let parts = txn.open_table(PLAN_PARTS)?;
        let mut builders = Vec::new();
        for h in &manifest.parts {
            let bytes = parts.get(h.as_str())?.ok_or_else(|| StoreError::Corrupt {
                table: "plan_parts",
                key: 0,
                message: format!("plan {hash} names part {h}, which is missing"),
            })?;
            let mut part: Vec<rbb_schema::plan::PlanBuilder> = decode("plan_parts", 0, &bytes)?;
            builders.append(&mut part);
        }
        builders.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Some(rbb_schema::plan::Plan {
            format: manifest.format,
            hash: manifest.hash,
            repos: manifest.repos,
            builders,
        }))
    }

    /// Deletes builds (with their index entries and counts), log records, changes and plans
    /// in one transaction.
    pub fn delete(&self, builds: &[u64], logs: &[u64], changes: &[u64], plans: &[String]) -> Result<(), StoreError> {
        self.write(Sync::Lazy, |txn| {
            for (table, idx, total, ids, keys) in [
                (
                    BUILDS,
                    BUILD_IDX,
                    "builds",
                    builds,
                    build_keys_of as fn(u64, &[u8]) -> Result<BTreeSet<String>, StoreError>,
                ),
                (CHANGES, CHANGE_IDX, "changes", changes, change_keys_of),
            ] {
                let mut t = txn.open_table(table)?;
                let mut ix = txn.open_table(idx)?;
                let mut counts = txn.open_table(COUNTS)?;
                for id in ids {
                    let old = match t.remove(*id)? {
                        Some(v) => keys(*id, &v)?,
                        None => continue,
                    };
                    bump(&mut counts, total, -1)?;
                    for k in old {
                        ix.delete((k.as_str(), *id))?;
                        bump(&mut counts, &k, -1)?;
                    }
                }
            }
            let mut t = txn.open_table(LOGS)?;
            for id in logs {
                t.delete(*id)?;
            }
            let mut p = txn.open_table(PLANS)?;
            for h in plans {
                p.delete(h.as_str())?;
            }
            if !plans.is_empty() {
                // Parts no remaining plan names go too (plans are few: one per pipeline change).
                let mut used: BTreeSet<String> = BTreeSet::new();
                for row in p.iter()? {
                    let (_, v) = row?;
                    if let Ok(m) = serde_json::from_slice::<PlanManifest>(&v) {
                        used.extend(m.parts);
                    }
                }
                let mut parts = txn.open_table(PLAN_PARTS)?;
                let mut unused = Vec::new();
                for row in parts.iter()? {
                    let (k, _) = row?;
                    if !used.contains(&k) {
                        unused.push(k.clone());
                    }
                }
                for k in unused {
                    parts.delete(k.as_str())?;
                }
            }
            Ok(())
        })
    }

    /// Log records from id `from` upward, handed to `f` until it returns false.
    pub fn scan_logs(&self, from: u64, mut f: impl FnMut(LogRecord) -> bool) -> Result<(), StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(LOGS)?;
        for row in t.range(from..)? {
            let (k, v) = row?;
            if !f(decode("logs", k, &v)?) {
                break;
            }
        }
        Ok(())
    }

    /// Plan hashes, in order, from `after` (exclusive), at most `limit`.
    pub fn plan_hashes(&self, after: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PLANS)?;
        let mut out = Vec::new();
        for row in t.range(after..)? {
            let (k, _) = row?;
            if k != after {
                out.push(k.clone());
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// A number kept in the meta table (a janitor's cursor), 0 if unset.
    pub fn meta(&self, key: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(META)?;
        Ok(t.get(key)?.unwrap_or(0))
    }

    pub fn set_meta(&self, key: &str, value: u64) -> Result<(), StoreError> {
        self.write(Sync::Lazy, |txn| {
            txn.open_table(META)?.insert(key, value)?;
            Ok(())
        })
    }

    /// Every record's index entries and counts against the records themselves: the first
    /// difference found, if any (a check after a crash; costs a full scan).
    pub fn check_indexes(&self) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let builds = txn.open_table(BUILDS)?;
        let idx = txn.open_table(BUILD_IDX)?;
        let counts = txn.open_table(COUNTS)?;
        let mut expected: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        let mut n = 0;
        for row in builds.iter()? {
            let (k, v) = row?;
            let b: BuildRecord = decode("builds", k, &v)?;
            n += 1;
            for key in build_keys(&b) {
                if idx.get((key.as_str(), b.id))?.is_none() {
                    return Ok(Some(format!("build {} has no index entry {key:?}", b.id)));
                }
                *expected.entry(key).or_default() += 1;
            }
        }
        let mut entries = 0;
        for row in idx.iter()? {
            let (k, _) = row?;
            let (key, id) = k;
            entries += 1;
            if builds.get(id)?.is_none() {
                return Ok(Some(format!("index entry {key:?} names missing build {id}")));
            }
        }
        let want: u64 = expected.values().sum();
        if entries != want {
            return Ok(Some(format!("{entries} build index entries for {want} keys")));
        }
        if counts.get("builds")?.unwrap_or(0) != n {
            return Ok(Some(format!("count `builds` is not {n}")));
        }
        for (key, want) in expected {
            let got = counts.get(key.as_str())?.unwrap_or(0);
            if got != want {
                return Ok(Some(format!("count {key:?} is {got}, not {want}")));
            }
        }
        Ok(None)
    }
}

/// Every table of the state, in the order a copy writes them: `$m!(TABLE, ...)`.
macro_rules! every_table {
    ($m:ident) => {
        $m!(
            META,
            BUILDS,
            LOGS,
            CHANGES,
            SCHEDULES,
            PLANS,
            PLAN_PARTS,
            BUILD_IDX,
            CHANGE_IDX,
            COUNTS,
            CACHE_ENTRIES,
            CACHE_USED,
            CACHE_LRU,
            CACHE_BLOBS,
            CACHE_ORPHANS,
            CACHE_HITS,
            CACHE_LAST,
            AUDIT,
            crate::forge::outbox_store::OUTBOX,
            crate::forge::outbox_store::DUE,
            crate::forge::outbox_store::LATEST,
            crate::forge::outbox_store::BY_REPO,
            crate::forge::outbox_store::BY_COMMIT
        )
    };
}

/// Copying a whole state into another, and comparing them by counts.
impl Store {
    /// The number of rows of every table, by table name.
    pub fn table_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        use redb::TableHandle;
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        macro_rules! count {
            ($($t:expr),*) => { $( out.push(($t.name().to_owned(), kv::count_table(&txn, $t)?)); )* };
        }
        every_table!(count);
        Ok(out)
    }

    /// Whether the state holds nothing but its schema version.
    pub fn is_blank(&self) -> Result<bool, StoreError> {
        Ok(self.table_counts()?.iter().all(|(name, n)| *n == 0 || (name == "meta" && *n == 1))
            && self.schema_version()?.is_some_and(|v| v == SCHEMA_VERSION))
    }

    /// Copies every table into `to` in one durable transaction (all or nothing); answers the
    /// rows copied per table.
    pub fn copy_into(&self, to: &Store) -> Result<Vec<(String, u64)>, StoreError> {
        use redb::TableHandle;
        let from = self.db.begin_read()?;
        let txn = to.db.begin_write(true)?;
        let mut out = Vec::new();
        macro_rules! copy {
            ($($t:expr),*) => { $( out.push(($t.name().to_owned(), kv::copy_table(&from, &txn, $t)?)); )* };
        }
        every_table!(copy);
        txn.commit()?;
        Ok(out)
    }
}

/// `<builder>\0<step>`, the key of a step's last successful execution.
fn last_key(builder: &str, step: &str) -> String {
    format!("{builder}\0{step}")
}

fn decode_entry(key: &str, bytes: &[u8]) -> Result<CacheEntry, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table: "cache_entries",
        key: 0,
        message: format!("entry {key}: {e}"),
    })
}

/// The step cache's tables, open in one write transaction, with the rules that keep blob
/// references, the LRU index and the totals true. Every change of the cache goes through it.
struct CacheTables<'t> {
    entries: Table<'t, &'static str, &'static [u8]>,
    used: Table<'t, &'static str, u64>,
    lru: Table<'t, (u64, &'static str), ()>,
    blobs: Table<'t, &'static str, (u64, u64, u64)>,
    orphans: Table<'t, (u64, &'static str), ()>,
    counts: Table<'t, &'static str, u64>,
}

impl<'t> CacheTables<'t> {
    fn open(txn: &'t WriteTxn<'_>) -> Result<CacheTables<'t>, StoreError> {
        Ok(CacheTables {
            entries: txn.open_table(CACHE_ENTRIES)?,
            used: txn.open_table(CACHE_USED)?,
            lru: txn.open_table(CACHE_LRU)?,
            blobs: txn.open_table(CACHE_BLOBS)?,
            orphans: txn.open_table(CACHE_ORPHANS)?,
            counts: txn.open_table(COUNTS)?,
        })
    }

    fn blob(&self, digest: &str) -> Result<Option<(u64, u64, u64)>, StoreError> {
        self.blobs.get(digest)
    }

    fn count(&self, key: &str) -> Result<u64, StoreError> {
        Ok(self.counts.get(key)?.unwrap_or(0))
    }

    /// A finished upload: a new row has no reference yet (an orphan until an entry uses
    /// it); an existing row keeps its references.
    fn put_blob(&mut self, digest: &str, stored: u64, now: u64) -> Result<(), StoreError> {
        match self.blob(digest)? {
            Some((old, refs, since)) => {
                bump(&mut self.counts, CACHE_BYTES_COUNT, stored as i64 - old as i64)?;
                if refs == 0 {
                    // Uploaded again: its step may still finish, so its hour starts again.
                    self.orphans.delete((since, digest))?;
                    self.orphans.insert((now, digest), ())?;
                    self.blobs.insert(digest, (stored, 0, now))?;
                } else {
                    self.blobs.insert(digest, (stored, refs, since))?;
                }
            }
            None => {
                self.blobs.insert(digest, (stored, 0, now))?;
                self.orphans.insert((now, digest), ())?;
                bump(&mut self.counts, CACHE_BLOBS_COUNT, 1)?;
                bump(&mut self.counts, CACHE_BYTES_COUNT, stored as i64)?;
            }
        }
        Ok(())
    }

    /// One more entry uses the blob (whose row exists).
    fn reference(&mut self, digest: &str) -> Result<(), StoreError> {
        let Some((stored, refs, since)) = self.blob(digest)? else {
            return Err(StoreError::Corrupt {
                table: "cache_blobs",
                key: 0,
                message: format!("blob {digest} has no row"),
            });
        };
        if refs == 0 {
            self.orphans.delete((since, digest))?;
        }
        self.blobs.insert(digest, (stored, refs + 1, since))?;
        Ok(())
    }

    /// One entry fewer uses the blob. When none does: with `free`, its row goes and its
    /// stored size is answered (the caller removes the file after the commit); without,
    /// it becomes an orphan since `now`.
    fn release(&mut self, digest: &str, now: u64, free: bool) -> Result<Option<u64>, StoreError> {
        let Some((stored, refs, since)) = self.blob(digest)? else { return Ok(None) };
        if refs > 1 {
            self.blobs.insert(digest, (stored, refs - 1, since))?;
            return Ok(None);
        }
        if refs == 0 {
            self.orphans.delete((since, digest))?;
        }
        if free {
            self.blobs.delete(digest)?;
            bump(&mut self.counts, CACHE_BLOBS_COUNT, -1)?;
            bump(&mut self.counts, CACHE_BYTES_COUNT, -(stored as i64))?;
            Ok(Some(stored))
        } else {
            self.blobs.insert(digest, (stored, 0, now))?;
            self.orphans.insert((now, digest), ())?;
            Ok(None)
        }
    }

    fn set_used(&mut self, key: &str, at: u64) -> Result<(), StoreError> {
        if let Some(old) = self.used.swap(key, at)? {
            self.lru.delete((old, key))?;
        }
        self.lru.insert((at, key), ())?;
        Ok(())
    }

    /// Stores an entry (replacing one of the same key). Answers false, storing nothing,
    /// when a blob it names has no row: an entry never refers to a blob not whole on disk.
    fn put_entry(&mut self, e: &CacheEntry, bytes: &[u8], now: u64) -> Result<bool, StoreError> {
        let digests = e.digests();
        for d in &digests {
            if self.blob(d)?.is_none() {
                tracing::warn!(key = %e.key, blob = %d, "cache entry not stored: a blob it names was never uploaded");
                return Ok(false);
            }
        }
        // References first: a blob both versions use never drops to none.
        for d in &digests {
            self.reference(d)?;
        }
        let old = self.entries.swap(e.key.as_str(), bytes)?;
        match old {
            Some(old) => {
                for d in decode_entry(&e.key, &old)?.digests() {
                    self.release(d, now, false)?;
                }
            }
            None => bump(&mut self.counts, CACHE_ENTRIES_COUNT, 1)?,
        }
        self.set_used(&e.key, e.created_at)?;
        Ok(true)
    }

    /// A hit reused the entry at `at` (an entry that is gone stays gone).
    fn touch(&mut self, key: &str, at: u64) -> Result<(), StoreError> {
        let old = self.used.get(key)?;
        match old {
            Some(old) if at > old => self.set_used(key, at),
            _ => Ok(()),
        }
    }

    /// Removes an entry, adding to `out` it and the blobs no other entry uses (their rows
    /// deleted). False when there is no such entry.
    fn remove_entry(&mut self, key: &str, now: u64, out: &mut Evicted) -> Result<bool, StoreError> {
        let Some(bytes) = self.entries.remove(key)? else {
            return Ok(false);
        };
        bump(&mut self.counts, CACHE_ENTRIES_COUNT, -1)?;
        if let Some(at) = self.used.remove(key)? {
            self.lru.delete((at, key))?;
        }
        for d in decode_entry(key, &bytes)?.digests() {
            if let Some(stored) = self.release(d, now, true)? {
                out.blobs.push(d.to_owned());
                out.bytes += stored;
            }
        }
        out.entries += 1;
        Ok(true)
    }
}

/// The step cache (docs/cache.md): entries, blob rows, hit counters and last executions.
impl Store {
    /// The entry stored under a full key.
    pub fn cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CACHE_ENTRIES)?;
        match t.get(key)? {
            Some(v) => decode_entry(key, &v).map(Some),
            None => Ok(None),
        }
    }

    /// When the entry was last used (stored or reused), Unix ms.
    pub fn cache_used(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CACHE_USED)?;
        t.get(key)
    }

    /// The last successful execution of `step` of `builder`.
    pub fn cache_last(&self, builder: &str, step: &str) -> Result<Option<LastRun>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CACHE_LAST)?;
        match t.get(last_key(builder, step).as_str())? {
            Some(v) => decode("cache_last", 0, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Totals from the counts, and hits and misses of every builder that has some.
    pub fn cache_stats(&self) -> Result<CacheStats, StoreError> {
        let txn = self.db.begin_read()?;
        let counts = txn.open_table(COUNTS)?;
        let count = |k: &str| Ok::<u64, StoreError>(counts.get(k)?.unwrap_or(0));
        let hits = txn.open_table(CACHE_HITS)?;
        let mut per_builder = Vec::new();
        for row in hits.iter()? {
            let (k, v) = row?;
            let (h, m) = v;
            per_builder.push((k.clone(), h, m));
        }
        Ok(CacheStats {
            entries: count(CACHE_ENTRIES_COUNT)?,
            blobs: count(CACHE_BLOBS_COUNT)?,
            stored_bytes: count(CACHE_BYTES_COUNT)?,
            per_builder,
        })
    }

    /// For each digest, whether a step finishing now may count on its row: an entry uses
    /// it, or it was uploaded less than half [`CACHE_ORPHAN_AGE_MS`] ago. An older unused
    /// upload could be collected before that step's entry is stored, so it counts as
    /// missing: uploading it again restarts its clock.
    pub fn cache_blobs_known(&self, digests: &[String]) -> Result<Vec<bool>, StoreError> {
        self.cache_blobs_known_at(crate::model::now_ms(), digests)
    }

    fn cache_blobs_known_at(&self, now: u64, digests: &[String]) -> Result<Vec<bool>, StoreError> {
        let fresh_since = now.saturating_sub(CACHE_ORPHAN_AGE_MS / 2);
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CACHE_BLOBS)?;
        digests
            .iter()
            .map(|d| {
                Ok(t.get(d.as_str())?.is_some_and(|v| {
                    let (_, refs, since) = v;
                    refs > 0 || since >= fresh_since
                }))
            })
            .collect()
    }

    /// (stored bytes, references) of a blob's row.
    pub fn cache_blob(&self, digest: &str) -> Result<Option<(u64, u64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CACHE_BLOBS)?;
        Ok(t.get(digest)?.map(|v| (v.0, v.1)))
    }

    /// Records a blob whose file is complete, durably: from now on an entry may refer to
    /// it. A blob already known keeps its references.
    pub fn cache_put_blob(&self, digest: &str, stored: u64) -> Result<(), StoreError> {
        let now = crate::model::now_ms();
        self.write(Sync::Durable, |txn| CacheTables::open(txn)?.put_blob(digest, stored, now))
    }

    /// Removes an entry (a hit found one of its blobs missing or damaged). Answers the
    /// digests no entry uses any more: their rows are gone, the caller removes the files.
    pub fn cache_remove_entry(&self, key: &str) -> Result<Evicted, StoreError> {
        let now = crate::model::now_ms();
        let mut out = Evicted::default();
        self.write(Sync::Durable, |txn| CacheTables::open(txn)?.remove_entry(key, now, &mut out).map(|_| ()))?;
        Ok(out)
    }

    /// Removes orphan blob rows older than [`CACHE_ORPHAN_AGE_MS`], then least recently
    /// used entries (never one `pinned` answers true for) until the blobs take at most
    /// `target` stored bytes. Works in transactions of a bounded size. Answers what went;
    /// the caller removes the blob files after this returns.
    ///
    /// `pinned` is asked outside any write transaction (it may take the engine's lock);
    /// an entry touched between that question and its removal is left alone.
    pub fn cache_evict(&self, target: u64, pinned: impl Fn(&str) -> bool) -> Result<Evicted, StoreError> {
        self.cache_evict_at(crate::model::now_ms(), target, pinned)
    }

    fn cache_evict_at(&self, now: u64, target: u64, pinned: impl Fn(&str) -> bool) -> Result<Evicted, StoreError> {
        let cutoff = now.saturating_sub(CACHE_ORPHAN_AGE_MS);
        let mut out = Evicted::default();
        // Unused uploads past their hour; a quiet cache costs one read, not a write.
        while self.cache_has_orphans_before(cutoff)? {
            let mut done = Evicted::default();
            let mut seen = 0;
            self.write(Sync::Durable, |txn| {
                let mut c = CacheTables::open(txn)?;
                let mut old: Vec<(u64, String)> = Vec::new();
                for row in c.orphans.range(..(cutoff, ""))?.take(CACHE_EVICT_BATCH) {
                    let (k, _) = row?;
                    old.push(k);
                }
                seen = old.len();
                for (since, d) in &old {
                    c.orphans.delete((*since, d.as_str()))?;
                    if let Some((stored, 0, _)) = c.blob(d)? {
                        c.blobs.delete(d.as_str())?;
                        bump(&mut c.counts, CACHE_BLOBS_COUNT, -1)?;
                        bump(&mut c.counts, CACHE_BYTES_COUNT, -(stored as i64))?;
                        done.blobs.push(d.clone());
                        done.bytes += stored;
                    }
                }
                Ok(())
            })?;
            out.add(done);
            if seen < CACHE_EVICT_BATCH {
                break;
            }
        }
        // Least recently used first, from a cursor that moves past pinned entries.
        let mut after: Option<(u64, String)> = None;
        while self.count(CACHE_BYTES_COUNT)? > target {
            let mut candidates: Vec<(u64, String)> = Vec::new();
            {
                let txn = self.db.begin_read()?;
                let lru = txn.open_table(CACHE_LRU)?;
                let range = match &after {
                    None => lru.iter()?,
                    Some((t, k)) => {
                        lru.range((std::ops::Bound::Excluded((*t, k.as_str())), std::ops::Bound::Unbounded))?
                    }
                };
                for row in range {
                    let ((t, key), ()) = row?;
                    after = Some((t, key.clone()));
                    if !pinned(&key) {
                        candidates.push((t, key));
                        if candidates.len() >= CACHE_EVICT_BATCH {
                            break;
                        }
                    }
                }
            }
            if candidates.is_empty() {
                break;
            }
            let mut done = Evicted::default();
            self.write(Sync::Durable, |txn| {
                let mut c = CacheTables::open(txn)?;
                for (t, key) in &candidates {
                    if c.count(CACHE_BYTES_COUNT)? <= target {
                        break;
                    }
                    if c.lru.get((*t, key.as_str()))?.is_some() {
                        c.remove_entry(key, now, &mut done)?;
                    }
                }
                Ok(())
            })?;
            out.add(done);
        }
        Ok(out)
    }

    fn cache_has_orphans_before(&self, cutoff: u64) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CACHE_ORPHANS)?;
        Ok(t.range(..(cutoff, ""))?.next().is_some())
    }

    /// The builder's cache epoch: part of its steps' full keys, raised by a reset.
    pub fn cache_epoch(&self, builder: &str) -> Result<u64, StoreError> {
        self.meta(&format!("cache_epoch\0{builder}"))
    }

    /// Raises the builder's cache epoch (durably) and answers the new one.
    pub fn cache_reset(&self, builder: &str) -> Result<u64, StoreError> {
        let key = format!("cache_epoch\0{builder}");
        let mut next = 0;
        self.write(Sync::Durable, |txn| {
            let mut meta = txn.open_table(META)?;
            next = meta.get(key.as_str())?.unwrap_or(0) + 1;
            meta.insert(key.as_str(), next)?;
            Ok(())
        })?;
        Ok(next)
    }

    /// The cache's references, LRU index, orphan index and totals against the entries and
    /// rows themselves: the first difference found, if any (costs a full scan).
    pub fn check_cache(&self) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let entries = txn.open_table(CACHE_ENTRIES)?;
        let used = txn.open_table(CACHE_USED)?;
        let lru = txn.open_table(CACHE_LRU)?;
        let blobs = txn.open_table(CACHE_BLOBS)?;
        let orphans = txn.open_table(CACHE_ORPHANS)?;
        let counts = txn.open_table(COUNTS)?;
        let count = |k: &str| Ok::<u64, StoreError>(counts.get(k)?.unwrap_or(0));
        let mut refs: std::collections::BTreeMap<String, u64> = Default::default();
        let mut n = 0;
        for row in entries.iter()? {
            let (k, v) = row?;
            let key = k.as_str();
            let e = decode_entry(key, &v)?;
            n += 1;
            if e.key != key {
                return Ok(Some(format!("entry stored under {key} has key {}", e.key)));
            }
            let Some(at) = used.get(key)? else {
                return Ok(Some(format!("entry {key} has no last-used time")));
            };
            if lru.get((at, key))?.is_none() {
                return Ok(Some(format!("entry {key} is not in the LRU index at {at}")));
            }
            for d in e.digests() {
                *refs.entry(d.to_owned()).or_default() += 1;
            }
        }
        let lru_rows = lru.iter()?.count() as u64;
        let used_rows = used.iter()?.count() as u64;
        if lru_rows != n || used_rows != n {
            return Ok(Some(format!("{n} entries, {used_rows} last-used times, {lru_rows} LRU rows")));
        }
        if count(CACHE_ENTRIES_COUNT)? != n {
            return Ok(Some(format!("count {CACHE_ENTRIES_COUNT} is {}, not {n}", count(CACHE_ENTRIES_COUNT)?)));
        }
        let (mut rows, mut bytes, mut zero) = (0u64, 0u64, 0u64);
        for row in blobs.iter()? {
            let (k, v) = row?;
            let (d, (stored, r, since)) = (k.as_str(), v);
            rows += 1;
            bytes += stored;
            let want = refs.remove(d).unwrap_or(0);
            if r != want {
                return Ok(Some(format!("blob {d} has {r} references, entries make {want}")));
            }
            if r == 0 {
                zero += 1;
                if orphans.get((since, d))?.is_none() {
                    return Ok(Some(format!("unreferenced blob {d} is not in the orphan index")));
                }
            }
        }
        if let Some((d, _)) = refs.into_iter().next() {
            return Ok(Some(format!("an entry names blob {d}, which has no row")));
        }
        let orphan_rows = orphans.iter()?.count() as u64;
        if orphan_rows != zero {
            return Ok(Some(format!("{orphan_rows} orphan index rows for {zero} unreferenced blobs")));
        }
        for (key, want) in [(CACHE_BLOBS_COUNT, rows), (CACHE_BYTES_COUNT, bytes)] {
            if count(key)? != want {
                return Ok(Some(format!("count {key} is {}, not {want}", count(key)?)));
            }
        }
        Ok(None)
    }
}

/// How a plan is stored: its identity and the hashes of its per-repository parts.
#[derive(serde::Serialize, serde::Deserialize)]
struct PlanManifest {
    format: u32,
    hash: String,
    repos: Vec<rbb_schema::plan::PlanRepo>,
    parts: Vec<String>,
}

/// A plan's manifest and its parts (one per repository, keyed by the hash of its JSON).
fn split_plan(p: &rbb_schema::plan::Plan) -> Result<PlanParts, StoreError> {
    use sha2::Digest;
    let mut by_repo: std::collections::BTreeMap<&str, Vec<&rbb_schema::plan::PlanBuilder>> = Default::default();
    for b in &p.builders {
        by_repo.entry(b.repo.as_str()).or_default().push(b);
    }
    let mut parts = Vec::new();
    for builders in by_repo.values() {
        let bytes = encode("plan_parts", 0, builders)?;
        let hash = rbb_schema::hex(&sha2::Sha256::digest(&bytes));
        parts.push((hash, bytes));
    }
    let manifest = PlanManifest {
        format: p.format,
        hash: p.hash.clone(),
        repos: p.repos.clone(),
        parts: parts.iter().map(|(h, _)| h.clone()).collect(),
    };
    Ok((encode("plans", 0, &manifest)?, parts))
}

/// A stored build's index keys.
fn build_keys_of(id: u64, bytes: &[u8]) -> Result<BTreeSet<String>, StoreError> {
    decode::<BuildRecord>("builds", id, bytes).map(|b| build_keys(&b))
}

/// A stored change's index keys.
fn change_keys_of(id: u64, bytes: &[u8]) -> Result<BTreeSet<String>, StoreError> {
    decode::<ChangeRecord>("changes", id, bytes).map(|c| change_keys(&c))
}

/// Writes the index entries and counts of every record of `table`.
fn index_all(
    txn: &WriteTxn<'_>,
    (table, idx, total): (Records, Index, &str),
    keys: fn(u64, &[u8]) -> Result<BTreeSet<String>, StoreError>,
) -> Result<(), StoreError> {
    let mut rows: Vec<(u64, Vec<u8>)> = Vec::new();
    {
        let t = txn.open_table(table)?;
        for row in t.iter()? {
            let (k, v) = row?;
            rows.push((k, v));
        }
    }
    let mut ix = txn.open_table(idx)?;
    let mut counts = txn.open_table(COUNTS)?;
    for (id, bytes) in &rows {
        bump(&mut counts, total, 1)?;
        for k in keys(*id, bytes)? {
            ix.insert((k.as_str(), *id), ())?;
            bump(&mut counts, &k, 1)?;
        }
    }
    Ok(())
}

/// Schema 1 had the records without indexes: build them.
fn migrate_v1(txn: &WriteTxn<'_>) -> Result<(), StoreError> {
    index_all(txn, (BUILDS, BUILD_IDX, "builds"), build_keys_of)?;
    index_all(txn, (CHANGES, CHANGE_IDX, "changes"), change_keys_of)
}

// ---- Audit log ----
// Who did which control or admin action, appended by the HTTP layer (`crate::audit`). The
// table came after schema 2 and is created by its first entry: no migration, and a state
// dir without it reads as an empty log.

/// Entry id (growing) → the entry as JSON.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// A write transaction whose commit is on disk when it returns: the one place every durable
/// commit of the state file starts. (redb's quick repair, which saves the allocator state
/// with each commit so that opening after a crash does not walk the file, halved the step
/// rate on a million-build history: the walk after a `kill -9` is the price, see
/// ARCHITECTURE.md.)
pub fn durable_write(database: &Db) -> Result<WriteTxn<'_>, StoreError> {
    database.begin_write(true)
}

/// Appends one audit entry (JSON) durably; returns its id.
pub fn audit_append(database: &Db, entry: &[u8]) -> Result<u64, StoreError> {
    let txn = durable_write(database)?;
    let id = {
        let mut t = txn.open_table(AUDIT)?;
        let id = t.last()?.map_or(1, |(k, _)| k + 1);
        t.insert(id, entry)?;
        id
    };
    txn.commit()?;
    Ok(id)
}

/// Deletes the audit entries recorded before `before_ms` (Unix milliseconds), oldest first,
/// `batch` per transaction; returns how many went. Ids grow with time, so each batch reads
/// from the oldest entry and stops at the first one young enough. The newest entry stays
/// whatever its age: the next id is one past it.
pub fn audit_expire(database: &Db, before_ms: u64, batch: usize) -> Result<u64, StoreError> {
    #[derive(serde::Deserialize)]
    struct Stamp {
        at_ms: u64,
    }
    let mut deleted = 0;
    loop {
        let txn = durable_write(database)?;
        let mut done = false;
        let n = {
            let mut t = txn.open_table(AUDIT)?;
            let newest = t.last()?.map(|(k, _)| k);
            let mut old = Vec::new();
            for row in t.iter()?.take(batch) {
                let (k, v) = row?;
                if Some(k) == newest {
                    done = true;
                    break;
                }
                let stamp: Stamp = decode("audit", k, &v)?;
                if stamp.at_ms >= before_ms {
                    done = true;
                    break;
                }
                old.push(k);
            }
            done |= old.len() < batch;
            for id in &old {
                t.delete(*id)?;
            }
            old.len() as u64
        };
        txn.commit()?;
        deleted += n;
        if done {
            return Ok(deleted);
        }
    }
}

/// A page of audit entries (id, JSON) and the number of entries.
pub type AuditPage = (Vec<(u64, Vec<u8>)>, u64);

/// Up to `limit` audit entries with ids below `before` (all without it), newest first, and
/// the number of entries: reads only the page and the oldest entry. Ids are contiguous (an
/// entry is appended one past the newest, and expiry deletes from the oldest), so the
/// number is the span of ids.
pub fn audit_page(database: &Db, before: Option<u64>, limit: usize) -> Result<AuditPage, StoreError> {
    let txn = database.begin_read()?;
    let t = txn.open_table(AUDIT)?;
    let total = match (t.first()?, t.last()?) {
        (Some((oldest, _)), Some((newest, _))) => newest - oldest + 1,
        _ => 0,
    };
    let mut out = Vec::with_capacity(limit.min(1000));
    for row in t.range_rev(..before.unwrap_or(u64::MAX))?.take(limit) {
        out.push(row?);
    }
    Ok((out, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> rbb_schema::plan::Plan {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/compiler/cross-repo-needs/plan.json");
        serde_json::from_slice(&std::fs::read(path).expect("golden plan")).expect("plan")
    }

    fn parts(s: &Store) -> usize {
        let txn = s.db.begin_read().expect("read");
        txn.open_table(PLAN_PARTS).expect("table").iter().expect("iter").count()
    }

    fn a_plan_is_stored_by_repository_parts_and_read_back_whole(dir: &testing::Place) {
        let s = dir.open();
        let a = plan();
        s.put_plan(&a).expect("put");
        assert_eq!(parts(&s), 2, "one part per repository");
        assert_eq!(s.plan(&a.hash).expect("read").as_ref(), Some(&a));
        // A change in one repository's pipeline adds one part; the other is shared.
        let mut b = a.clone();
        b.hash = "sha256:changed".into();
        let i = b.builders.iter().position(|x| x.repo == "lib").expect("a lib builder");
        b.builders[i].description = Some("changed".into());
        s.put_plan(&b).expect("put");
        assert_eq!(parts(&s), 3);
        assert_eq!(s.plan(&b.hash).expect("read").as_ref(), Some(&b));
        assert_eq!(s.plan(&a.hash).expect("read").as_ref(), Some(&a));
        // Deleting a plan collects the part only it used.
        s.delete(&[], &[], &[], std::slice::from_ref(&b.hash)).expect("delete");
        assert_eq!(parts(&s), 2);
        assert_eq!(s.plan(&a.hash).expect("read").as_ref(), Some(&a));
    }
    crate::store::testing::on_each_backend!(a_plan_is_stored_by_repository_parts_and_read_back_whole);

    #[test]
    fn a_state_config_names_what_is_wrong_with_it_and_never_shows_a_password() {
        use rbb_schema::config::{StateConfig, StateDatabase};
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |c: &StateConfig| Location::from_config(Some(c), Path::new("/state"), dir.path());
        let db = |url: &str, file: Option<&str>, env: Option<&str>| {
            StateConfig::Database(StateDatabase {
                url: url.into(),
                password_file: file.map(Into::into),
                password_env: env.map(Into::into),
                lease: None,
            })
        };
        assert_eq!(
            Location::from_config(None, Path::new("/state"), dir.path()),
            Ok(Location::File("/state/state.redb".into()))
        );
        let e = at(&StateConfig::Url("mysql://u:hunter2@h/db".into())).expect_err("not postgres");
        assert!(e.contains("is not a postgres:// URL") && !e.contains("hunter2"), "{e}");
        let e = at(&db("postgres://u@h/db", Some("pw"), Some("PW"))).expect_err("both sources");
        assert!(e.contains("not both"), "{e}");
        let e = at(&db("postgres://u@h/db", Some("missing"), None)).expect_err("no file");
        assert!(e.contains("cannot read password_file") && e.contains("missing"), "{e}");
        let e = at(&db("postgres://u@h/db", None, Some("RBB_TEST_UNSET_PASSWORD_VAR"))).expect_err("no variable");
        assert!(e.contains("RBB_TEST_UNSET_PASSWORD_VAR") && e.contains("not set"), "{e}");
        std::fs::write(dir.path().join("pw"), "s3cret\nignored\n").expect("write");
        let ok = at(&db(" postgres://u@h/db ", Some("pw"), None)).expect("file");
        assert_eq!(
            ok,
            Location::Postgres {
                url: "postgres://u@h/db".into(),
                password: Some("s3cret".into()),
                lease: pg::DEFAULT_LEASE
            }
        );
        assert_eq!(
            Location::Postgres { url: "postgres://u:s3cret@h/db".into(), password: None, lease: pg::DEFAULT_LEASE }
                .shown(),
            "postgres://u:<hidden>@h/db"
        );
        let leased = |lease: &str| {
            at(&StateConfig::Database(StateDatabase {
                url: "postgres://u@h/db".into(),
                password_file: None,
                password_env: None,
                lease: Some(lease.into()),
            }))
        };
        match leased("30s") {
            Ok(Location::Postgres { lease, .. }) => assert_eq!(lease, std::time::Duration::from_secs(30)),
            other => panic!("{other:?}"),
        }
        let e = leased("500ms").expect_err("too short");
        assert!(e.contains("state: lease") && e.contains("shorter than a second"), "{e}");
        let e = leased("soon").expect_err("not a duration");
        assert!(e.contains("state: lease") && e.contains("soon"), "{e}");
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use crate::cache::OutputFile;

    fn digest(n: u64) -> String {
        format!("sha256:{n:064x}")
    }

    fn entry(key: &str, blobs: &[u64], at: u64) -> CacheEntry {
        CacheEntry {
            key: key.to_owned(),
            builder: "app/build".into(),
            step: "compile".into(),
            build: 1,
            step_index: 0,
            log_id: None,
            files: blobs
                .iter()
                .enumerate()
                .map(|(i, b)| OutputFile {
                    path: format!("out/{i}"),
                    mode: 0o644,
                    digest: digest(*b),
                    size: 10,
                    link: String::new(),
                    dir: false,
                })
                .collect(),
            bytes: 10 * blobs.len() as u64,
            created_at: at,
        }
    }

    fn insert(s: &Store, e: &CacheEntry) {
        s.commit(Batch { cache_entries: vec![e], ..Batch::default() }, Sync::Lazy).expect("insert");
    }

    fn touch(s: &Store, key: &str, at: u64) {
        s.commit(Batch { cache_touches: vec![(key, at)], ..Batch::default() }, Sync::Lazy).expect("touch");
    }

    fn open(place: &testing::Place) -> Store {
        place.open()
    }

    fn consistent(s: &Store) {
        assert_eq!(s.check_cache().expect("check"), None);
    }

    fn cache_entries_sharing_a_blob_hold_a_reference_each(dir: &testing::Place) {
        let s = open(dir);
        for b in [1, 2, 3] {
            s.cache_put_blob(&digest(b), 100).expect("blob");
        }
        insert(&s, &entry("k1", &[1, 2], 10));
        insert(&s, &entry("k2", &[2, 3, 3], 20));
        assert_eq!(s.cache_blob(&digest(2)).expect("row"), Some((100, 2)));
        assert_eq!(s.cache_blob(&digest(3)).expect("row"), Some((100, 1)), "one reference per entry");
        let stats = s.cache_stats().expect("stats");
        assert_eq!((stats.entries, stats.blobs, stats.stored_bytes), (2, 3, 300));
        consistent(&s);
        // An entry naming a blob that was never uploaded is not stored, and the rest of the
        // batch is.
        let bad = entry("k3", &[1, 9], 30);
        let run = LastRun { key: "k3".into(), build: 4, step_index: 0, manifest: serde_json::json!({}), at_ms: 30 };
        s.commit(
            Batch { cache_entries: vec![&bad], cache_last: vec![("app/build", "compile", &run)], ..Batch::default() },
            Sync::Lazy,
        )
        .expect("commit");
        assert_eq!(s.cache_entry("k3").expect("read"), None);
        assert_eq!(s.cache_last("app/build", "compile").expect("read"), Some(run));
        assert_eq!(s.cache_blob(&digest(1)).expect("row"), Some((100, 1)));
        // Replacing an entry moves its references.
        insert(&s, &entry("k1", &[3], 40));
        assert_eq!(s.cache_blob(&digest(1)).expect("row"), Some((100, 0)));
        assert_eq!(s.cache_blob(&digest(3)).expect("row"), Some((100, 2)));
        assert_eq!(s.cache_stats().expect("stats").entries, 2);
        consistent(&s);
        // Removing one entry frees only what no other entry uses.
        let gone = s.cache_remove_entry("k2").expect("remove");
        assert_eq!(gone.entries, 1);
        assert_eq!(gone.blobs, vec![digest(2)]);
        assert_eq!(s.cache_blob(&digest(3)).expect("row"), Some((100, 1)));
        assert_eq!(s.cache_remove_entry("k2").expect("again"), Evicted::default());
        consistent(&s);
    }

    fn cache_eviction_goes_by_last_use_and_spares_pinned_entries(dir: &testing::Place) {
        let s = open(dir);
        // Four entries with a blob of their own (100 bytes) and one they all share (50).
        s.cache_put_blob(&digest(99), 50).expect("blob");
        for i in 1..=4 {
            s.cache_put_blob(&digest(i), 100).expect("blob");
            insert(&s, &entry(&format!("k{i}"), &[i, 99], i * 10));
        }
        // k1 is reused: it is now the most recently used.
        touch(&s, "k1", 100);
        // An older time does not move an entry back.
        touch(&s, "k4", 5);
        assert_eq!(s.cache_used("k4").expect("used"), Some(40));
        assert_eq!(s.cache_stats().expect("stats").stored_bytes, 450);
        // Down to 250 bytes: two entries go. k2 is the least recently used but pinned, so
        // k3 and k4 go.
        let out = s.cache_evict(250, |k| k == "k2").expect("evict");
        assert_eq!(out.entries, 2);
        let mut blobs = out.blobs.clone();
        blobs.sort();
        assert_eq!(blobs, vec![digest(3), digest(4)], "the shared blob stays");
        assert_eq!(out.bytes, 200);
        for (k, present) in [("k1", true), ("k2", true), ("k3", false), ("k4", false)] {
            assert_eq!(s.cache_entry(k).expect("read").is_some(), present, "{k}");
        }
        // Already at the target: nothing more goes.
        assert_eq!(s.cache_evict(250, |_| false).expect("evict"), Evicted::default());
        // Everything: the pinned entry stays, and with it its blobs.
        let out = s.cache_evict(0, |k| k == "k2").expect("evict");
        assert_eq!((out.entries, out.blobs.clone()), (1, vec![digest(1)]));
        assert_eq!(s.cache_blob(&digest(99)).expect("row"), Some((50, 1)));
        let out = s.cache_evict(0, |_| false).expect("evict");
        let mut blobs = out.blobs.clone();
        blobs.sort();
        assert_eq!(blobs, vec![digest(2), digest(99)]);
        let stats = s.cache_stats().expect("stats");
        assert_eq!((stats.entries, stats.blobs, stats.stored_bytes), (0, 0, 0));
        consistent(&s);
    }

    fn cache_orphan_blobs_go_after_an_hour(dir: &testing::Place) {
        let s = open(dir);
        s.cache_put_blob(&digest(1), 10).expect("blob");
        s.cache_put_blob(&digest(2), 10).expect("blob");
        insert(&s, &entry("k", &[2], 1));
        let now = crate::model::now_ms();
        let asked = [digest(1), digest(2), digest(3)];
        assert_eq!(s.cache_blobs_known_at(now, &asked).expect("known"), vec![true, true, false]);
        // Half an hour on, the unused upload is as good as missing (a step must upload it
        // again, which restarts its clock); a used one is not.
        let later = now + CACHE_ORPHAN_AGE_MS / 2 + 1000;
        assert_eq!(s.cache_blobs_known_at(later, &asked).expect("known"), vec![false, true, false]);
        // Young orphans stay, even above the target.
        assert_eq!(s.cache_evict_at(now + 1000, u64::MAX, |_| true).expect("evict"), Evicted::default());
        let out = s.cache_evict_at(now + CACHE_ORPHAN_AGE_MS + 1000, u64::MAX, |_| true).expect("evict");
        assert_eq!((out.entries, out.blobs, out.bytes), (0, vec![digest(1)], 10));
        assert_eq!(s.cache_blob(&digest(2)).expect("row"), Some((10, 1)), "a used blob is no orphan");
        consistent(&s);
    }

    fn cache_counts_match_a_scan_after_random_operations(dir: &testing::Place) {
        let mut s = open(dir);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut t = 1;
        let (mut most, mut evicted, mut orphaned) = (0, 0, 0);
        for round in 0..400 {
            t += 1;
            match rand(10) {
                0..=2 => s.cache_put_blob(&digest(rand(12)), 1 + rand(1000)).expect("blob"),
                3..=5 => {
                    let blobs: Vec<u64> = (0..rand(4)).map(|_| rand(12)).collect();
                    insert(&s, &entry(&format!("k{}", rand(16)), &blobs, t));
                }
                6 => touch(&s, &format!("k{}", rand(16)), t),
                7 => {
                    s.cache_remove_entry(&format!("k{}", rand(16))).expect("remove");
                }
                8 => {
                    let pin = rand(16);
                    let target = rand(3000);
                    let out = s
                        .cache_evict_at(crate::model::now_ms() + rand(2) * 2 * CACHE_ORPHAN_AGE_MS, target, |k| {
                            k == format!("k{pin}")
                        })
                        .expect("evict");
                    evicted += out.entries;
                    orphaned += out.blobs.len() as u64;
                }
                _ => {
                    s.commit(Batch { cache_counts: vec![("app/build", 1, rand(2))], ..Batch::default() }, Sync::Lazy)
                        .expect("counts");
                }
            }
            if let Some(diff) = s.check_cache().expect("check") {
                panic!("after operation {round}: {diff}");
            }
            most = most.max(s.cache_stats().expect("stats").entries);
            if round % 100 == 99 {
                let before = s.cache_stats().expect("stats");
                drop(s);
                s = open(dir);
                assert_eq!(s.cache_stats().expect("stats"), before, "reopening keeps everything");
            }
        }
        assert!(
            most > 3 && evicted > 3 && orphaned > evicted,
            "the walk stored {most} entries at most, evicted {evicted} and {orphaned} blobs"
        );
    }

    fn cache_records_survive_reopening_and_epochs_grow(dir: &testing::Place) {
        let run = LastRun {
            key: "k".into(),
            build: 3,
            step_index: 1,
            manifest: serde_json::json!({"inputs": {"src": "abc"}}),
            at_ms: 7,
        };
        {
            let s = open(dir);
            s.cache_put_blob(&digest(1), 10).expect("blob");
            let e = entry("k", &[1], 5);
            s.commit(
                Batch {
                    cache_entries: vec![&e],
                    cache_counts: vec![("app/build", 2, 3), ("app/lint", 0, 1)],
                    cache_last: vec![("app/build", "compile", &run)],
                    ..Batch::default()
                },
                Sync::Durable,
            )
            .expect("commit");
            assert_eq!(s.cache_epoch("app/build").expect("epoch"), 0);
            assert_eq!(s.cache_reset("app/build").expect("reset"), 1);
            assert_eq!(s.cache_reset("app/build").expect("reset"), 2);
        }
        let s = open(dir);
        assert_eq!(s.cache_entry("k").expect("read"), Some(entry("k", &[1], 5)));
        assert_eq!(s.cache_last("app/build", "compile").expect("read"), Some(run));
        assert_eq!(s.cache_last("app/build", "test").expect("read"), None);
        assert_eq!(s.cache_epoch("app/build").expect("epoch"), 2);
        assert_eq!(s.cache_epoch("app/lint").expect("epoch"), 0);
        let stats = s.cache_stats().expect("stats");
        assert_eq!(stats.per_builder, vec![("app/build".to_owned(), 2, 3), ("app/lint".to_owned(), 0, 1)]);
        assert_eq!((stats.entries, stats.blobs, stats.stored_bytes), (1, 1, 10));
        consistent(&s);
    }
    crate::store::testing::on_each_backend!(
        cache_entries_sharing_a_blob_hold_a_reference_each,
        cache_eviction_goes_by_last_use_and_spares_pinned_entries,
        cache_orphan_blobs_go_after_an_hour,
        cache_counts_match_a_scan_after_random_operations,
        cache_records_survive_reopening_and_epochs_grow
    );
}
