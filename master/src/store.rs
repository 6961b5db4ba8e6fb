//! The master's durable state in one redb file: every table and key encoding lives here,
//! with a schema version checked at open.
//!
//! Records are stored as JSON (small, debuggable, forward compatible by adding fields).
//! Writes that finish something (a step, a build) are durable when `commit` returns; writes
//! of intermediate progress may be lost in a crash and are repaired at start-up.
//! Nothing outside this module names a table.

use crate::model::{BuildRecord, ChangeRecord, LogRecord, ScheduleRecord};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

/// Bumped when a table or encoding changes incompatibly.
pub const SCHEMA_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const BUILDS: TableDefinition<u64, &[u8]> = TableDefinition::new("builds");
const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
/// Cron schedule state, keyed `<builder id>#<schedule index>`.
const SCHEDULES: TableDefinition<&str, &[u8]> = TableDefinition::new("schedules");
/// Every plan a build was pinned to, by hash: a rebuild runs exactly the same plan.
const PLANS: TableDefinition<&str, &[u8]> = TableDefinition::new("plans");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}: {source}")]
    Open { path: PathBuf, source: Box<redb::Error> },
    #[error("the state database {path} has schema version {found}; this master reads version {SCHEMA_VERSION}")]
    Version { path: PathBuf, found: u64 },
    #[error("state database error: {0}")]
    Db(#[from] Box<redb::Error>),
    #[error("corrupt record in table {table} at key {key}: {message}")]
    Corrupt { table: &'static str, key: u64, message: String },
}

/// A table of JSON records keyed by id, with its name for error messages.
type Table = (TableDefinition<'static, u64, &'static [u8]>, &'static str);

fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
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
}

impl Batch<'_> {
    pub fn is_empty(&self) -> bool {
        self.builds.is_empty()
            && self.logs.is_empty()
            && self.changes.is_empty()
            && self.schedules.is_empty()
            && self.plans.is_empty()
    }
}

fn encode<T: serde::Serialize>(table: &'static str, key: u64, r: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(r).map_err(|e| StoreError::Corrupt { table, key, message: e.to_string() })
}

/// Whether a write must be on disk before `commit` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    Durable,
    Lazy,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let database = Database::create(path)
            .map_err(|e| StoreError::Open { path: path.to_owned(), source: Box::new(e.into()) })?;
        let store = Store {
            db: database,
            #[cfg(test)]
            fail_writes: std::sync::atomic::AtomicBool::new(false),
        };
        let txn = store.db.begin_write().map_err(db)?;
        {
            let mut meta = txn.open_table(META).map_err(db)?;
            let found = meta.get("schema_version").map_err(db)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION).map_err(db)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v) => return Err(StoreError::Version { path: path.to_owned(), found: v }),
            }
            txn.open_table(BUILDS).map_err(db)?;
            txn.open_table(LOGS).map_err(db)?;
            txn.open_table(PLANS).map_err(db)?;
            txn.open_table(CHANGES).map_err(db)?;
            txn.open_table(SCHEDULES).map_err(db)?;
        }
        txn.commit().map_err(db)?;
        Ok(store)
    }

    /// Writes every record of `batch` in one transaction: a state change is stored whole or
    /// not at all.
    pub fn commit(&self, batch: Batch<'_>, sync: Sync) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.fail_writes.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Db(Box::new(redb::Error::Io(std::io::Error::other(
                "no space left on device (test)",
            )))));
        }
        let builds: Vec<(u64, Vec<u8>)> =
            batch.builds.iter().map(|b| encode("builds", b.id, b).map(|v| (b.id, v))).collect::<Result<_, _>>()?;
        let logs: Vec<(u64, Vec<u8>)> =
            batch.logs.iter().map(|l| encode("logs", l.id, l).map(|v| (l.id, v))).collect::<Result<_, _>>()?;
        let changes: Vec<(u64, Vec<u8>)> =
            batch.changes.iter().map(|c| encode("changes", c.id, c).map(|v| (c.id, v))).collect::<Result<_, _>>()?;
        let schedules: Vec<(&str, Vec<u8>)> = batch
            .schedules
            .iter()
            .map(|(k, r)| encode("schedules", 0, r).map(|v| (*k, v)))
            .collect::<Result<_, _>>()?;
        let plans: Vec<(&str, Vec<u8>)> = batch
            .plans
            .iter()
            .map(|p| encode("plans", 0, p).map(|v| (p.hash.as_str(), v)))
            .collect::<Result<_, _>>()?;
        self.write(sync, |txn| {
            for (table, rows) in [(BUILDS, &builds), (LOGS, &logs), (CHANGES, &changes)] {
                if rows.is_empty() {
                    continue;
                }
                let mut t = txn.open_table(table).map_err(db)?;
                for (id, bytes) in rows {
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

    /// Writes JSON records keyed by id into `table`, in one transaction.
    fn put_all<'a, T: serde::Serialize + 'a>(
        &self,
        (table, name): Table,
        records: impl IntoIterator<Item = (u64, &'a T)>,
        sync: Sync,
    ) -> Result<(), StoreError> {
        let encoded: Vec<(u64, Vec<u8>)> = records
            .into_iter()
            .map(|(id, r)| {
                serde_json::to_vec(r).map(|v| (id, v)).map_err(|e| StoreError::Corrupt {
                    table: name,
                    key: id,
                    message: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        self.write(sync, |txn| {
            let mut t = txn.open_table(table).map_err(db)?;
            for (id, bytes) in &encoded {
                t.insert(*id, bytes.as_slice()).map_err(db)?;
            }
            Ok(())
        })
    }

    /// Every JSON record of `table`, in key order.
    fn all<T: serde::de::DeserializeOwned>(&self, (table, name): Table) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(table).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                table: name,
                key: k.value(),
                message: e.to_string(),
            })?);
        }
        Ok(out)
    }

    pub fn put_build(&self, b: &BuildRecord, sync: Sync) -> Result<(), StoreError> {
        self.put_all((BUILDS, "builds"), [(b.id, b)], sync)
    }

    /// Writes several builds in one transaction.
    pub fn put_builds<'a>(
        &self,
        builds: impl IntoIterator<Item = &'a BuildRecord>,
        sync: Sync,
    ) -> Result<(), StoreError> {
        self.put_all((BUILDS, "builds"), builds.into_iter().map(|b| (b.id, b)), sync)
    }

    pub fn builds(&self) -> Result<Vec<BuildRecord>, StoreError> {
        self.all((BUILDS, "builds"))
    }

    pub fn put_changes(&self, changes: &[ChangeRecord]) -> Result<(), StoreError> {
        self.put_all((CHANGES, "changes"), changes.iter().map(|c| (c.id, c)), Sync::Durable)
    }

    pub fn changes(&self) -> Result<Vec<ChangeRecord>, StoreError> {
        self.all((CHANGES, "changes"))
    }

    pub fn put_schedule(&self, key: &str, rec: &ScheduleRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| StoreError::Corrupt {
            table: "schedules",
            key: 0,
            message: e.to_string(),
        })?;
        self.write(Sync::Durable, |txn| {
            txn.open_table(SCHEDULES).map_err(db)?.insert(key, bytes.as_slice()).map_err(db)?;
            Ok(())
        })
    }

    pub fn schedules(&self) -> Result<Vec<(String, ScheduleRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(SCHEDULES).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let rec = serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                table: "schedules",
                key: 0,
                message: e.to_string(),
            })?;
            out.push((k.value().to_owned(), rec));
        }
        Ok(out)
    }

    pub fn put_plan(&self, plan: &rbb_schema::plan::Plan) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(plan).map_err(|e| StoreError::Corrupt {
            table: "plans",
            key: 0,
            message: e.to_string(),
        })?;
        self.write(Sync::Durable, |txn| {
            txn.open_table(PLANS).map_err(db)?.insert(plan.hash.as_str(), bytes.as_slice()).map_err(db)?;
            Ok(())
        })
    }

    pub fn plans(&self) -> Result<Vec<rbb_schema::plan::Plan>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(PLANS).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            let plan = serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                table: "plans",
                key: 0,
                message: e.to_string(),
            })?;
            out.push(plan);
        }
        Ok(out)
    }

    pub fn put_log(&self, l: &LogRecord, sync: Sync) -> Result<(), StoreError> {
        self.put_all((LOGS, "logs"), [(l.id, l)], sync)
    }

    pub fn logs(&self) -> Result<Vec<LogRecord>, StoreError> {
        self.all((LOGS, "logs"))
    }
}
