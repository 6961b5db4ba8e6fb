//! The audit log: every control and admin action through the REST API (who, what, on what,
//! when, from where, and how it ended), kept durably in the store and read back newest first.
//! It records what the HTTP layer tells it; it decides nothing about access.

use crate::store::{self, StoreError};
use rbb_schema::api::{AuditEntry, AuditList, AuditMeta};

/// Largest page `GET /api/v2/audit` answers.
pub const MAX_PAGE: usize = 500;

/// How an action ended, from its HTTP status.
pub fn result_of(status: u16) -> &'static str {
    match status {
        200..=299 => "ok",
        401 | 403 => "refused",
        429 => "limited",
        _ => "failed",
    }
}

/// Stores `entry` (its `id` is assigned here) and returns its id.
pub fn record(database: &crate::store::kv::Db, mut entry: AuditEntry) -> Result<u64, StoreError> {
    entry.id = 0;
    let bytes = serde_json::to_vec(&entry).map_err(|e| StoreError::Corrupt {
        table: "audit",
        key: 0,
        message: e.to_string(),
    })?;
    store::audit_append(database, &bytes)
}

/// A page of entries older than `before` (newest first).
pub fn list(database: &crate::store::kv::Db, before: Option<u64>, limit: usize) -> Result<AuditList, StoreError> {
    let (rows, total) = store::audit_page(database, before, limit)?;
    let mut entries = Vec::with_capacity(rows.len());
    for (id, bytes) in rows {
        let mut e: AuditEntry = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            table: "audit",
            key: id,
            message: e.to_string(),
        })?;
        e.id = id;
        entries.push(e);
    }
    let next_before = if entries.len() == limit { entries.last().map(|e| e.id).filter(|id| *id > 1) } else { None };
    Ok(AuditList { entries, meta: AuditMeta { total, next_before } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rbb_schema::config::Access;

    fn entry(action: &str) -> AuditEntry {
        AuditEntry {
            id: 0,
            at_ms: 1,
            who: "alice".into(),
            role: Access::Control,
            action: action.into(),
            target: "app/test".into(),
            from: "127.0.0.1:1".into(),
            status: 201,
            result: "ok".into(),
        }
    }

    #[test]
    fn pages_run_newest_first_and_survive_a_reopen() {
        for place in store::testing::places() {
            {
                let s = place.open();
                assert_eq!(list(s.database(), None, 10).expect("empty").meta.total, 0);
                for i in 0..5 {
                    record(s.database(), entry(&format!("a{i}"))).expect("stored");
                }
            }
            let s = place.open();
            let database = s.database();
            let first = list(database, None, 2).expect("page");
            assert_eq!(first.entries.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["a4", "a3"]);
            assert_eq!(first.meta.total, 5, "{}", place.backend);
            let second = list(database, first.meta.next_before, 2).expect("page");
            assert_eq!(second.entries.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 2]);
            let last = list(database, second.meta.next_before, 2).expect("page");
            assert_eq!(last.entries.iter().map(|e| e.id).collect::<Vec<_>>(), [1]);
            assert_eq!(last.meta.next_before, None);
        }
    }

    #[test]
    fn the_janitor_deletes_entries_older_than_the_cutoff_in_batches_and_keeps_the_rest() {
        for place in store::testing::places() {
            let s = place.open();
            let database = s.database();
            assert_eq!(store::audit_expire(database, 100, 2).expect("empty"), 0);
            for at in [10, 20, 30, 40, 50, 60, 70] {
                record(database, AuditEntry { at_ms: at, ..entry(&format!("at{at}")) }).expect("stored");
            }
            // Five entries before 55, taken two per transaction.
            assert_eq!(store::audit_expire(database, 55, 2).expect("expire"), 5, "{}", place.backend);
            let left = list(database, None, 10).expect("page");
            assert_eq!(left.entries.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["at70", "at60"]);
            assert_eq!(left.meta.total, 2);
            assert_eq!(store::audit_expire(database, 55, 2).expect("again"), 0, "nothing more to delete");
            // The newest entry stays whatever its age, so ids keep growing.
            assert_eq!(store::audit_expire(database, 1_000, 2).expect("all old"), 1);
            assert_eq!(list(database, None, 10).expect("page").meta.total, 1);
            let id = record(database, entry("later")).expect("stored");
            assert_eq!(id, 8);
        }
    }
}
