//! The master's durable state in one redb file: every table and key encoding lives here,
//! with a schema version checked (and migrated forward) at open.
//!
//! Records are stored as JSON (small, debuggable, forward compatible by adding fields).
//! Builds and changes are indexed by the fields the API filters on, and counts per index
//! value are kept in the same transaction as the records, so a list is a key-range scan
//! and its total a lookup: reading costs what is asked for, not what is stored. The engine
//! keeps only live builds in memory and reads history from here.
//! Nothing outside this module names a table.

use crate::model::{BuildRecord, ChangeRecord, LogRecord, ScheduleRecord};
use rbb_schema::api::State;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bumped when a table or encoding changes incompatibly. Version 1 (no indexes) is
/// migrated forward at open.
pub const SCHEMA_VERSION: u64 = 2;

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
/// Record counts: `builds`, `changes`, and one per index key.
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");

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
        "the state database {path} has schema version {found}, newer than this master's {SCHEMA_VERSION}: run the rbb version that wrote it (or newer)"
    )]
    Version { path: PathBuf, found: u64 },
    #[error("state database error: {0}")]
    Db(#[from] Box<redb::Error>),
    #[error("corrupt record in table {table} at key {key}: {message}")]
    Corrupt { table: &'static str, key: u64, message: String },
}

fn db<E: Into<redb::Error>>(e: E) -> StoreError {
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
    db: Database,
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicBool,
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
}

impl Batch<'_> {
    pub fn is_empty(&self) -> bool {
        self.statuses.is_empty()
            && self.builds.is_empty()
            && self.logs.is_empty()
            && self.changes.is_empty()
            && self.schedules.is_empty()
            && self.plans.is_empty()
    }
}

/// Whether a write must be on disk before `commit` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    Durable,
    Lazy,
}

/// Adds `delta` to a count.
fn bump(counts: &mut redb::Table<&str, u64>, key: &str, delta: i64) -> Result<(), StoreError> {
    let now = counts.get(key).map_err(db)?.map_or(0, |v| v.value());
    let next = now.saturating_add_signed(delta);
    if next == 0 {
        counts.remove(key).map_err(db)?;
    } else {
        counts.insert(key, next).map_err(db)?;
    }
    Ok(())
}

/// Writes `rec` (encoded as `bytes`) with its index entries and counts, replacing what an
/// earlier version of the same record had.
fn put_indexed(
    txn: &redb::WriteTransaction,
    (table, idx, total): (TableDefinition<u64, &[u8]>, TableDefinition<(&str, u64), ()>, &str),
    id: u64,
    bytes: &[u8],
    new_keys: BTreeSet<String>,
    old_keys: impl FnOnce(&[u8]) -> Result<BTreeSet<String>, StoreError>,
) -> Result<(), StoreError> {
    let mut t = txn.open_table(table).map_err(db)?;
    let mut ix = txn.open_table(idx).map_err(db)?;
    let mut counts = txn.open_table(COUNTS).map_err(db)?;
    let old = match t.get(id).map_err(db)? {
        Some(v) => Some(old_keys(v.value())?),
        None => None,
    };
    if old.is_none() {
        bump(&mut counts, total, 1)?;
    }
    let old = old.unwrap_or_default();
    for k in old.difference(&new_keys) {
        ix.remove((k.as_str(), id)).map_err(db)?;
        bump(&mut counts, k, -1)?;
    }
    for k in new_keys.difference(&old) {
        ix.insert((k.as_str(), id), ()).map_err(db)?;
        bump(&mut counts, k, 1)?;
    }
    t.insert(id, bytes).map_err(db)?;
    Ok(())
}

impl Store {
    /// The database, for modules that keep their own tables in it (the status outbox).
    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn open(path: &Path) -> Result<Store, StoreError> {
        // A bounded page cache: redb's default (1 GiB) would let the master's memory follow
        // the size of the history it reads.
        let database = redb::Builder::new()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Open { path: path.to_owned(), source: Box::new(e.into()) })?;
        let store = Store {
            db: database,
            #[cfg(test)]
            fail_writes: std::sync::atomic::AtomicBool::new(false),
        };
        let txn = store.db.begin_write().map_err(db)?;
        let found = {
            let mut meta = txn.open_table(META).map_err(db)?;
            let found = meta.get("schema_version").map_err(db)?.map(|v| v.value());
            if found.is_none() {
                meta.insert("schema_version", SCHEMA_VERSION).map_err(db)?;
            }
            found
        };
        for t in [BUILDS, LOGS, CHANGES] {
            txn.open_table(t).map_err(db)?;
        }
        txn.open_table(PLANS).map_err(db)?;
        txn.open_table(PLAN_PARTS).map_err(db)?;
        txn.open_table(SCHEDULES).map_err(db)?;
        txn.open_table(BUILD_IDX).map_err(db)?;
        txn.open_table(CHANGE_IDX).map_err(db)?;
        txn.open_table(COUNTS).map_err(db)?;
        match found {
            None => {}
            Some(SCHEMA_VERSION) => {}
            Some(1) => {
                tracing::info!(path = %path.display(), "migrating the state database from schema version 1 to 2 (indexes)");
                migrate_v1(&txn)?;
                txn.open_table(META).map_err(db)?.insert("schema_version", SCHEMA_VERSION).map_err(db)?;
            }
            Some(v) => return Err(StoreError::Version { path: path.to_owned(), found: v }),
        }
        txn.commit().map_err(db)?;
        Ok(store)
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
                let mut t = txn.open_table(LOGS).map_err(db)?;
                for (id, bytes) in &logs {
                    t.insert(*id, bytes.as_slice()).map_err(db)?;
                }
            }
            for (table, rows) in [(SCHEDULES, &schedules), (PLANS, &plans)] {
                if rows.is_empty() {
                    continue;
                }
                let mut t = txn.open_table(table).map_err(db)?;
                for (k, bytes) in rows {
                    t.insert(*k, bytes.as_slice()).map_err(db)?;
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
                let mut t = txn.open_table(PLAN_PARTS).map_err(db)?;
                for (k, bytes) in &parts {
                    if t.get(k.as_str()).map_err(db)?.is_none() {
                        t.insert(k.as_str(), bytes.as_slice()).map_err(db)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Makes every earlier lazy write durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.write(Sync::Durable, |_| Ok(()))
    }

    /// Makes every later write fail, as a full disk would (tests only).
    #[cfg(test)]
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, std::sync::atomic::Ordering::Release);
    }

    fn write(
        &self,
        sync: Sync,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(db)?;
        txn.set_durability(match sync {
            Sync::Durable => Durability::Immediate,
            Sync::Lazy => Durability::None,
        })
        .map_err(db)?;
        f(&txn)?;
        txn.commit().map_err(db)
    }

    fn get<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<u64, &[u8]>,
        name: &'static str,
        id: u64,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(table).map_err(db)?;
        match t.get(id).map_err(db)? {
            Some(v) => decode(name, id, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn last_key(&self, table: TableDefinition<u64, &[u8]>) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(table).map_err(db)?;
        Ok(t.last().map_err(db)?.map(|(k, _)| k.value()))
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
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(COUNTS).map_err(db)?;
        Ok(t.get(key).map_err(db)?.map_or(0, |v| v.value()))
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

    /// Like [`Store::scan_builds`], reading only each build's head (no steps).
    pub fn scan_build_heads(
        &self,
        index: Option<&str>,
        newest_first: bool,
        f: impl FnMut(crate::model::BuildHead) -> bool,
    ) -> Result<(), StoreError> {
        self.scan((BUILDS, BUILD_IDX, "builds"), index, newest_first, f)
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
        (table, idx, name): (TableDefinition<u64, &[u8]>, TableDefinition<(&str, u64), ()>, &'static str),
        index: Option<&str>,
        newest_first: bool,
        mut f: impl FnMut(T) -> bool,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(table).map_err(db)?;
        match index {
            None => {
                let range = t.iter().map_err(db)?;
                let step = |row: Result<(redb::AccessGuard<u64>, redb::AccessGuard<&[u8]>), redb::StorageError>| {
                    let (k, v) = row.map_err(db)?;
                    Ok::<bool, StoreError>(f(decode(name, k.value(), v.value())?))
                };
                walk(range, newest_first, step)?;
            }
            Some(key) => {
                let ix = txn.open_table(idx).map_err(db)?;
                let range = ix.range((key, 0)..=(key, u64::MAX)).map_err(db)?;
                let step =
                    |row: Result<(redb::AccessGuard<(&str, u64)>, redb::AccessGuard<()>), redb::StorageError>| {
                        let (k, _) = row.map_err(db)?;
                        let id = k.value().1;
                        match t.get(id).map_err(db)? {
                            Some(v) => Ok::<bool, StoreError>(f(decode(name, id, v.value())?)),
                            None => Ok(true),
                        }
                    };
                walk(range, newest_first, step)?;
            }
        }
        Ok(())
    }

    pub fn schedules(&self) -> Result<Vec<(String, ScheduleRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(SCHEDULES).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            out.push((k.value().to_owned(), decode("schedules", 0, v.value())?));
        }
        Ok(out)
    }

    pub fn put_plan(&self, plan: &rbb_schema::plan::Plan) -> Result<(), StoreError> {
        self.commit(Batch { plans: vec![plan], ..Batch::default() }, Sync::Durable)
    }

    /// The plan with this hash, if a build was ever pinned to it, put together from its parts.
    pub fn plan(&self, hash: &str) -> Result<Option<rbb_schema::plan::Plan>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(PLANS).map_err(db)?;
        let Some(v) = t.get(hash).map_err(db)? else { return Ok(None) };
        let manifest: PlanManifest = match decode("plans", 0, v.value()) {
            Ok(m) => m,
            // Stored whole by an older version.
            Err(_) => return decode("plans", 0, v.value()).map(Some),
        };
        let parts = txn.open_table(PLAN_PARTS).map_err(db)?;
        let mut builders = Vec::new();
        for h in &manifest.parts {
            let bytes = parts.get(h.as_str()).map_err(db)?.ok_or_else(|| StoreError::Corrupt {
                table: "plan_parts",
                key: 0,
                message: format!("plan {hash} names part {h}, which is missing"),
            })?;
            let mut part: Vec<rbb_schema::plan::PlanBuilder> = decode("plan_parts", 0, bytes.value())?;
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
                let mut t = txn.open_table(table).map_err(db)?;
                let mut ix = txn.open_table(idx).map_err(db)?;
                let mut counts = txn.open_table(COUNTS).map_err(db)?;
                for id in ids {
                    let old = match t.remove(*id).map_err(db)? {
                        Some(v) => keys(*id, v.value())?,
                        None => continue,
                    };
                    bump(&mut counts, total, -1)?;
                    for k in old {
                        ix.remove((k.as_str(), *id)).map_err(db)?;
                        bump(&mut counts, &k, -1)?;
                    }
                }
            }
            let mut t = txn.open_table(LOGS).map_err(db)?;
            for id in logs {
                t.remove(*id).map_err(db)?;
            }
            let mut p = txn.open_table(PLANS).map_err(db)?;
            for h in plans {
                p.remove(h.as_str()).map_err(db)?;
            }
            if !plans.is_empty() {
                // Parts no remaining plan names go too (plans are few: one per pipeline change).
                let mut used: BTreeSet<String> = BTreeSet::new();
                for row in p.iter().map_err(db)? {
                    let (_, v) = row.map_err(db)?;
                    if let Ok(m) = serde_json::from_slice::<PlanManifest>(v.value()) {
                        used.extend(m.parts);
                    }
                }
                let mut parts = txn.open_table(PLAN_PARTS).map_err(db)?;
                let mut unused = Vec::new();
                for row in parts.iter().map_err(db)? {
                    let (k, _) = row.map_err(db)?;
                    if !used.contains(k.value()) {
                        unused.push(k.value().to_owned());
                    }
                }
                for k in unused {
                    parts.remove(k.as_str()).map_err(db)?;
                }
            }
            Ok(())
        })
    }

    /// Log records from id `from` upward, handed to `f` until it returns false.
    pub fn scan_logs(&self, from: u64, mut f: impl FnMut(LogRecord) -> bool) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(LOGS).map_err(db)?;
        for row in t.range(from..).map_err(db)? {
            let (k, v) = row.map_err(db)?;
            if !f(decode("logs", k.value(), v.value())?) {
                break;
            }
        }
        Ok(())
    }

    /// Plan hashes, in order, from `after` (exclusive), at most `limit`.
    pub fn plan_hashes(&self, after: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(PLANS).map_err(db)?;
        let mut out = Vec::new();
        for row in t.range(after..).map_err(db)? {
            let (k, _) = row.map_err(db)?;
            if k.value() != after {
                out.push(k.value().to_owned());
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// A number kept in the meta table (a janitor's cursor), 0 if unset.
    pub fn meta(&self, key: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(META).map_err(db)?;
        Ok(t.get(key).map_err(db)?.map_or(0, |v| v.value()))
    }

    pub fn set_meta(&self, key: &str, value: u64) -> Result<(), StoreError> {
        self.write(Sync::Lazy, |txn| {
            txn.open_table(META).map_err(db)?.insert(key, value).map_err(db)?;
            Ok(())
        })
    }

    /// Every record's index entries and counts against the records themselves: the first
    /// difference found, if any (a check after a crash; costs a full scan).
    pub fn check_indexes(&self) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let builds = txn.open_table(BUILDS).map_err(db)?;
        let idx = txn.open_table(BUILD_IDX).map_err(db)?;
        let counts = txn.open_table(COUNTS).map_err(db)?;
        let mut expected: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        let mut n = 0;
        for row in builds.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let b: BuildRecord = decode("builds", k.value(), v.value())?;
            n += 1;
            for key in build_keys(&b) {
                if idx.get((key.as_str(), b.id)).map_err(db)?.is_none() {
                    return Ok(Some(format!("build {} has no index entry {key:?}", b.id)));
                }
                *expected.entry(key).or_default() += 1;
            }
        }
        let mut entries = 0;
        for row in idx.iter().map_err(db)? {
            let (k, _) = row.map_err(db)?;
            let (key, id) = k.value();
            entries += 1;
            if builds.get(id).map_err(db)?.is_none() {
                return Ok(Some(format!("index entry {key:?} names missing build {id}")));
            }
        }
        let want: u64 = expected.values().sum();
        if entries != want {
            return Ok(Some(format!("{entries} build index entries for {want} keys")));
        }
        if counts.get("builds").map_err(db)?.map_or(0, |v| v.value()) != n {
            return Ok(Some(format!("count `builds` is not {n}")));
        }
        for (key, want) in expected {
            let got = counts.get(key.as_str()).map_err(db)?.map_or(0, |v| v.value());
            if got != want {
                return Ok(Some(format!("count {key:?} is {got}, not {want}")));
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
fn split_plan(p: &rbb_schema::plan::Plan) -> Result<(Vec<u8>, Vec<(String, Vec<u8>)>), StoreError> {
    use sha2::Digest;
    let mut by_repo: std::collections::BTreeMap<&str, Vec<&rbb_schema::plan::PlanBuilder>> = Default::default();
    for b in &p.builders {
        by_repo.entry(b.repo.as_str()).or_default().push(b);
    }
    let mut parts = Vec::new();
    for builders in by_repo.values() {
        let bytes = encode("plan_parts", 0, builders)?;
        let hash: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
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

/// Hands each row of `range` to `step`, last first when `newest_first`, until it returns
/// false.
fn walk<R>(
    range: impl DoubleEndedIterator<Item = R>,
    newest_first: bool,
    mut step: impl FnMut(R) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let rows: Box<dyn Iterator<Item = R>> = if newest_first { Box::new(range.rev()) } else { Box::new(range) };
    for row in rows {
        if !step(row)? {
            break;
        }
    }
    Ok(())
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
    txn: &redb::WriteTransaction,
    (table, idx, total): (TableDefinition<u64, &[u8]>, TableDefinition<(&str, u64), ()>, &str),
    keys: fn(u64, &[u8]) -> Result<BTreeSet<String>, StoreError>,
) -> Result<(), StoreError> {
    let mut rows: Vec<(u64, Vec<u8>)> = Vec::new();
    {
        let t = txn.open_table(table).map_err(db)?;
        for row in t.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            rows.push((k.value(), v.value().to_vec()));
        }
    }
    let mut ix = txn.open_table(idx).map_err(db)?;
    let mut counts = txn.open_table(COUNTS).map_err(db)?;
    for (id, bytes) in &rows {
        bump(&mut counts, total, 1)?;
        for k in keys(*id, bytes)? {
            ix.insert((k.as_str(), *id), ()).map_err(db)?;
            bump(&mut counts, &k, 1)?;
        }
    }
    Ok(())
}

/// Schema 1 had the records without indexes: build them.
fn migrate_v1(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    index_all(txn, (BUILDS, BUILD_IDX, "builds"), build_keys_of)?;
    index_all(txn, (CHANGES, CHANGE_IDX, "changes"), change_keys_of)
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

    #[test]
    fn a_plan_is_stored_by_repository_parts_and_read_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("state.redb")).expect("open");
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
}
