//! The status outbox in redb: its own tables in the master's database. Rows are written by
//! [`write_rows`] inside the caller's write transaction (the one that stores the build's
//! state), so a status is queued exactly when the state it reports is stored; the sender
//! reads and settles them through [`RedbOutbox`].
//!
//! Tables: `forge_outbox` (id → row as JSON, with its delivery state), `forge_outbox_due`
//! ((retry_at ms, id) → (), only rows still to send: the sender's reads cost what is in
//! flight, not history), `forge_outbox_latest` (repo\0sha\0context → newest id).

use super::sender::{Outbox, Row};
use super::status::StatusRow;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

const OUTBOX: TableDefinition<u64, &str> = TableDefinition::new("forge_outbox");
const DUE: TableDefinition<(u64, u64), ()> = TableDefinition::new("forge_outbox_due");
const LATEST: TableDefinition<&str, u64> = TableDefinition::new("forge_outbox_latest");

/// Where a row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Waiting to be sent (or sent again) at `retry_at`.
    Pending,
    Delivered,
    /// A newer state for the same commit and context was queued first: never sent.
    Superseded,
    /// The forge refused it for good, or the repository has no status target.
    GivenUp,
}

/// A row as stored, with its delivery state (what the API shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub row: Row,
    pub delivery: Delivery,
    /// When it is due (unix milliseconds) while pending.
    pub retry_at: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("status outbox: {0}")]
pub struct OutboxError(String);

fn err(e: impl std::fmt::Display) -> OutboxError {
    OutboxError(e.to_string())
}

/// Queues `rows` (due at once) inside `txn`, superseding any row still pending for the same
/// (repository, commit, context). Returns the ids given to them.
pub fn write_rows(txn: &WriteTransaction, rows: &[StatusRow]) -> Result<Vec<u64>, OutboxError> {
    let mut outbox = txn.open_table(OUTBOX).map_err(err)?;
    let mut due = txn.open_table(DUE).map_err(err)?;
    let mut latest = txn.open_table(LATEST).map_err(err)?;
    let mut ids = Vec::with_capacity(rows.len());
    for status in rows {
        let mut next = outbox.last().map_err(err)?.map(|(k, _)| k.value() + 1).unwrap_or(1);
        if next == 0 {
            next = 1;
        }
        let key = status.key();
        let previous = latest.get(key.as_str()).map_err(err)?.map(|v| v.value());
        if let Some(old_id) = previous {
            let old = outbox.get(old_id).map_err(err)?.map(|v| v.value().to_owned());
            if let Some(text) = old {
                let mut old: Stored = serde_json::from_str(&text).map_err(err)?;
                if old.delivery == Delivery::Pending {
                    due.remove((old.retry_at, old_id)).map_err(err)?;
                    old.delivery = Delivery::Superseded;
                    outbox.insert(old_id, serde_json::to_string(&old).map_err(err)?.as_str()).map_err(err)?;
                }
            }
        }
        let stored = Stored {
            row: Row { status: StatusRow { id: next, ..status.clone() }, attempts: 0, last_error: None },
            delivery: Delivery::Pending,
            retry_at: 0,
        };
        outbox.insert(next, serde_json::to_string(&stored).map_err(err)?.as_str()).map_err(err)?;
        due.insert((0, next), ()).map_err(err)?;
        latest.insert(key.as_str(), next).map_err(err)?;
        ids.push(next);
    }
    Ok(ids)
}

/// Gives access to the master's database (the store, or a bare database in tests).
pub trait DatabaseHandle: Send + Sync {
    fn database(&self) -> &Database;
}

impl DatabaseHandle for std::sync::Arc<Database> {
    fn database(&self) -> &Database {
        self
    }
}

/// The outbox over redb.
pub struct RedbOutbox<H: DatabaseHandle> {
    db: H,
}

impl<H: DatabaseHandle> RedbOutbox<H> {
    /// Creates the tables if missing.
    pub fn open(db: H) -> Result<Self, OutboxError> {
        let txn = db.database().begin_write().map_err(err)?;
        {
            txn.open_table(OUTBOX).map_err(err)?;
            txn.open_table(DUE).map_err(err)?;
            txn.open_table(LATEST).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(RedbOutbox { db })
    }

    /// Queues `rows` in a transaction of their own (the engine calls [`write_rows`] in its).
    pub fn push(&self, rows: &[StatusRow]) -> Result<Vec<u64>, OutboxError> {
        let txn = self.db.database().begin_write().map_err(err)?;
        let ids = write_rows(&txn, rows)?;
        txn.commit().map_err(err)?;
        Ok(ids)
    }

    /// One row with its delivery state.
    pub fn get(&self, id: u64) -> Result<Option<Stored>, OutboxError> {
        let txn = self.db.database().begin_read().map_err(err)?;
        let table = txn.open_table(OUTBOX).map_err(err)?;
        let text = table.get(id).map_err(err)?.map(|v| v.value().to_owned());
        text.map(|t| serde_json::from_str(&t).map_err(err)).transpose()
    }

    /// The newest `limit` rows, newest first (what the API lists).
    pub fn recent(&self, limit: usize) -> Result<Vec<Stored>, OutboxError> {
        let txn = self.db.database().begin_read().map_err(err)?;
        let table = txn.open_table(OUTBOX).map_err(err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(err)?.rev().take(limit) {
            let (_, v) = entry.map_err(err)?;
            out.push(serde_json::from_str(v.value()).map_err(err)?);
        }
        Ok(out)
    }

    fn settle(&self, id: u64, f: impl FnOnce(&mut Stored)) -> Result<(), OutboxError> {
        let txn = self.db.database().begin_write().map_err(err)?;
        {
            let mut outbox = txn.open_table(OUTBOX).map_err(err)?;
            let mut due = txn.open_table(DUE).map_err(err)?;
            let text = outbox.get(id).map_err(err)?.map(|v| v.value().to_owned());
            let Some(text) = text else { return Ok(()) };
            let mut stored: Stored = serde_json::from_str(&text).map_err(err)?;
            if stored.delivery != Delivery::Pending {
                return Ok(());
            }
            due.remove((stored.retry_at, id)).map_err(err)?;
            f(&mut stored);
            if stored.delivery == Delivery::Pending {
                due.insert((stored.retry_at, id), ()).map_err(err)?;
            }
            outbox.insert(id, serde_json::to_string(&stored).map_err(err)?.as_str()).map_err(err)?;
        }
        txn.commit().map_err(err)
    }
}

impl<H: DatabaseHandle> Outbox for RedbOutbox<H> {
    fn due(&self, now: u64) -> Vec<Row> {
        let read = || -> Result<Vec<Row>, OutboxError> {
            let txn = self.db.database().begin_read().map_err(err)?;
            let due = txn.open_table(DUE).map_err(err)?;
            let outbox = txn.open_table(OUTBOX).map_err(err)?;
            let mut ids: Vec<u64> = Vec::new();
            for entry in due.range((0, 0)..=(now, u64::MAX)).map_err(err)? {
                ids.push(entry.map_err(err)?.0.value().1);
            }
            // In the order they were queued: statuses of one commit arrive in order.
            ids.sort_unstable();
            let mut rows = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(v) = outbox.get(id).map_err(err)? {
                    let stored: Stored = serde_json::from_str(v.value()).map_err(err)?;
                    rows.push(stored.row);
                }
            }
            Ok(rows)
        };
        read().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the status outbox");
            Vec::new()
        })
    }

    fn delivered(&self, id: u64) {
        if let Err(e) = self.settle(id, |s| s.delivery = Delivery::Delivered) {
            tracing::error!(id, error = %e, "cannot mark a status delivered");
        }
    }

    fn failed(&self, id: u64, retry_at: Option<u64>, error: &str) {
        let res = self.settle(id, |s| {
            s.row.attempts += 1;
            s.row.last_error = Some(error.to_owned());
            match retry_at {
                Some(at) => s.retry_at = at,
                None => s.delivery = Delivery::GivenUp,
            }
        });
        if let Err(e) = res {
            tracing::error!(id, error = %e, "cannot record a failed status");
        }
    }
}
