//! The status outbox: its own tables in the master's state database. Rows are written by
//! [`write_rows`] inside the caller's write transaction (the one that stores the build's
//! state), so a status is queued exactly when the state it reports is stored; the sender
//! reads and settles them through [`StateOutbox`].
//!
//! Tables: `forge_outbox` (id → row as JSON, with its delivery state), `forge_outbox_due`
//! ((retry_at ms, id) → (), only rows still to send: the sender's reads cost what is in
//! flight, not history), `forge_outbox_latest` (repo\0sha\0context → newest id),
//! `forge_outbox_by_repo` ((repo, id) → ()) and `forge_outbox_by_commit` ((sha, id) → ()):
//! the API's listings walk these newest first and read only the page they answer.

use super::sender::{Outbox, Row};
use super::status::StatusRow;
use crate::store::kv::{Db, WriteTxn};
use redb::TableDefinition;
use serde::{Deserialize, Serialize};

pub(crate) const OUTBOX: TableDefinition<u64, &str> = TableDefinition::new("forge_outbox");
pub(crate) const DUE: TableDefinition<(u64, u64), ()> = TableDefinition::new("forge_outbox_due");
pub(crate) const LATEST: TableDefinition<&str, u64> = TableDefinition::new("forge_outbox_latest");
pub(crate) const BY_REPO: TableDefinition<(&str, u64), ()> = TableDefinition::new("forge_outbox_by_repo");
pub(crate) const BY_COMMIT: TableDefinition<(&str, u64), ()> = TableDefinition::new("forge_outbox_by_commit");

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
    /// When it was queued, and when its delivery state last changed (unix milliseconds; 0 in
    /// rows written before these were kept).
    #[serde(default)]
    pub queued_at: u64,
    #[serde(default)]
    pub updated_at: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
#[error("status outbox: {0}")]
pub struct OutboxError(String);

fn err(e: impl std::fmt::Display) -> OutboxError {
    OutboxError(e.to_string())
}

/// Queues `rows` (due at once) inside `txn`, superseding any row still pending for the same
/// (repository, commit, context). Returns the ids given to them.
pub fn write_rows(txn: &WriteTxn<'_>, rows: &[StatusRow]) -> Result<Vec<u64>, OutboxError> {
    let mut outbox = txn.open_table(OUTBOX).map_err(err)?;
    let mut due = txn.open_table(DUE).map_err(err)?;
    let mut latest = txn.open_table(LATEST).map_err(err)?;
    let mut by_repo = txn.open_table(BY_REPO).map_err(err)?;
    let mut by_commit = txn.open_table(BY_COMMIT).map_err(err)?;
    let now = now_ms();
    let mut ids = Vec::with_capacity(rows.len());
    for status in rows {
        let mut next = outbox.last().map_err(err)?.map(|(k, _)| k + 1).unwrap_or(1);
        if next == 0 {
            next = 1;
        }
        let key = status.key();
        let previous = latest.get(key.as_str()).map_err(err)?;
        if let Some(old_id) = previous {
            let old = outbox.get(old_id).map_err(err)?;
            if let Some(text) = old {
                let mut old: Stored = serde_json::from_str(&text).map_err(err)?;
                if old.delivery == Delivery::Pending {
                    due.delete((old.retry_at, old_id)).map_err(err)?;
                    old.delivery = Delivery::Superseded;
                    old.updated_at = now;
                    outbox.insert(old_id, serde_json::to_string(&old).map_err(err)?.as_str()).map_err(err)?;
                }
            }
        }
        let stored = Stored {
            row: Row { status: StatusRow { id: next, ..status.clone() }, attempts: 0, last_error: None },
            delivery: Delivery::Pending,
            retry_at: 0,
            queued_at: now,
            updated_at: now,
        };
        outbox.insert(next, serde_json::to_string(&stored).map_err(err)?.as_str()).map_err(err)?;
        due.insert((0, next), ()).map_err(err)?;
        by_repo.insert((status.repo.as_str(), next), ()).map_err(err)?;
        by_commit.insert((status.sha.as_str(), next), ()).map_err(err)?;
        latest.insert(key.as_str(), next).map_err(err)?;
        ids.push(next);
    }
    Ok(ids)
}

/// Gives access to the master's database (the store, or a bare database in tests).
pub trait DatabaseHandle: Send + Sync {
    fn database(&self) -> &Db;
}

impl DatabaseHandle for std::sync::Arc<Db> {
    fn database(&self) -> &Db {
        self
    }
}

/// The outbox in the state database.
pub struct StateOutbox<H: DatabaseHandle> {
    db: H,
}

impl<H: DatabaseHandle> StateOutbox<H> {
    /// Creates the tables if missing, and the listing indexes of an outbox written before
    /// they were kept.
    pub fn open(db: H) -> Result<Self, OutboxError> {
        let txn = crate::store::durable_write(db.database()).map_err(err)?;
        {
            let outbox = txn.open_table(OUTBOX).map_err(err)?;
            txn.open_table(DUE).map_err(err)?;
            txn.open_table(LATEST).map_err(err)?;
            let mut by_repo = txn.open_table(BY_REPO).map_err(err)?;
            let mut by_commit = txn.open_table(BY_COMMIT).map_err(err)?;
            if by_repo.is_empty().map_err(err)? && !outbox.is_empty().map_err(err)? {
                for entry in outbox.iter().map_err(err)? {
                    let (k, v) = entry.map_err(err)?;
                    let stored: Stored = serde_json::from_str(&v).map_err(err)?;
                    by_repo.insert((stored.row.status.repo.as_str(), k), ()).map_err(err)?;
                    by_commit.insert((stored.row.status.sha.as_str(), k), ()).map_err(err)?;
                }
            }
        }
        txn.commit().map_err(err)?;
        Ok(StateOutbox { db })
    }

    /// Queues `rows` in a transaction of their own (the engine calls [`write_rows`] in its).
    pub fn push(&self, rows: &[StatusRow]) -> Result<Vec<u64>, OutboxError> {
        let txn = crate::store::durable_write(self.db.database()).map_err(err)?;
        let ids = write_rows(&txn, rows)?;
        txn.commit().map_err(err)?;
        Ok(ids)
    }

    /// One row with its delivery state.
    pub fn get(&self, id: u64) -> Result<Option<Stored>, OutboxError> {
        let txn = self.db.database().begin_read().map_err(err)?;
        let table = txn.open_table(OUTBOX).map_err(err)?;
        let text = table.get(id).map_err(err)?;
        text.map(|t| serde_json::from_str(&t).map_err(err)).transpose()
    }

    /// The newest `limit` rows, newest first (what the API lists).
    pub fn recent(&self, limit: usize) -> Result<Vec<Stored>, OutboxError> {
        let txn = self.db.database().begin_read().map_err(err)?;
        let table = txn.open_table(OUTBOX).map_err(err)?;
        let mut out = Vec::new();
        for entry in table.iter_rev().map_err(err)?.take(limit) {
            let (_, v) = entry.map_err(err)?;
            out.push(serde_json::from_str(&v).map_err(err)?);
        }
        Ok(out)
    }

    fn settle(&self, id: u64, f: impl FnOnce(&mut Stored)) -> Result<(), OutboxError> {
        let txn = crate::store::durable_write(self.db.database()).map_err(err)?;
        {
            let mut outbox = txn.open_table(OUTBOX).map_err(err)?;
            let mut due = txn.open_table(DUE).map_err(err)?;
            let text = outbox.get(id).map_err(err)?;
            let Some(text) = text else { return Ok(()) };
            let mut stored: Stored = serde_json::from_str(&text).map_err(err)?;
            if stored.delivery != Delivery::Pending {
                return Ok(());
            }
            due.delete((stored.retry_at, id)).map_err(err)?;
            f(&mut stored);
            stored.updated_at = now_ms();
            if stored.delivery == Delivery::Pending {
                due.insert((stored.retry_at, id), ()).map_err(err)?;
            }
            outbox.insert(id, serde_json::to_string(&stored).map_err(err)?.as_str()).map_err(err)?;
        }
        txn.commit().map_err(err)
    }
}

impl<H: DatabaseHandle> Outbox for StateOutbox<H> {
    fn due(&self, now: u64) -> Vec<Row> {
        let read = || -> Result<Vec<Row>, OutboxError> {
            let txn = self.db.database().begin_read().map_err(err)?;
            let due = txn.open_table(DUE).map_err(err)?;
            let outbox = txn.open_table(OUTBOX).map_err(err)?;
            let mut ids: Vec<u64> = Vec::new();
            for entry in due.range((0, 0)..=(now, u64::MAX)).map_err(err)? {
                ids.push(entry.map_err(err)?.0.1);
            }
            // In the order they were queued: statuses of one commit arrive in order.
            ids.sort_unstable();
            let mut rows = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(v) = outbox.get(id).map_err(err)? {
                    let stored: Stored = serde_json::from_str(&v).map_err(err)?;
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

/// Where a row stands, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting for its first attempt.
    Queued,
    /// Delivered to the forge.
    Sent,
    /// Failed at least once; tried again at `next_try_at`.
    Retrying,
    /// Refused for good (or the repository has no status target any more): never sent again.
    GivenUp,
    /// A newer state for the same commit and context was queued before it was sent.
    Superseded,
}

impl DeliveryState {
    pub fn of(stored: &Stored) -> DeliveryState {
        match stored.delivery {
            Delivery::Pending if stored.row.attempts == 0 => DeliveryState::Queued,
            Delivery::Pending => DeliveryState::Retrying,
            Delivery::Delivered => DeliveryState::Sent,
            Delivery::GivenUp => DeliveryState::GivenUp,
            Delivery::Superseded => DeliveryState::Superseded,
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryState> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

/// What a listing asks for; every filter is optional.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub repo: Option<String>,
    /// A full commit id.
    pub commit: Option<String>,
    pub state: Option<super::status::CommitState>,
    pub delivery: Option<DeliveryState>,
    pub offset: usize,
    pub limit: usize,
}

impl Filter {
    fn keeps(&self, s: &Stored) -> bool {
        let st = &s.row.status;
        self.repo.as_ref().is_none_or(|r| *r == st.repo)
            && self.commit.as_ref().is_none_or(|c| *c == st.sha)
            && self.state.is_none_or(|x| x == st.state)
            && self.delivery.is_none_or(|d| d == DeliveryState::of(s))
    }
}

/// A page of a listing, newest first.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub rows: Vec<Stored>,
    /// More rows match after this page.
    pub more: bool,
    /// The walk stopped after [`MAX_SCAN`] rows without filling the page: older matches may
    /// exist (narrow the filter with `repo` or `commit`).
    pub truncated: bool,
}

/// The most rows one listing reads before it answers with what it found.
pub const MAX_SCAN: usize = 20_000;

/// Lists rows newest first, walking the narrowest index the filter allows: the due table
/// for queued and retrying rows (what is in flight), the commit's or the repository's
/// index, else the outbox itself. Reads at most [`MAX_SCAN`] rows.
pub fn list(db: &Db, filter: &Filter) -> Result<Page, OutboxError> {
    let txn = db.begin_read().map_err(err)?;
    let outbox = txn.open_table(OUTBOX).map_err(err)?;
    let mut page = Page::default();
    let mut matched = 0usize;
    let mut scanned = 0usize;
    // Visits one candidate; answers false to stop the walk.
    let mut visit = |stored: Option<Stored>, page: &mut Page| -> bool {
        scanned += 1;
        if let Some(s) = stored.filter(|s| filter.keeps(s)) {
            matched += 1;
            if matched > filter.offset + filter.limit {
                page.more = true;
                return false;
            }
            if matched > filter.offset {
                page.rows.push(s);
            }
        }
        if scanned >= MAX_SCAN {
            page.truncated = true;
            return false;
        }
        true
    };
    let load = |id: u64| -> Result<Option<Stored>, OutboxError> {
        let text = outbox.get(id).map_err(err)?;
        text.map(|t| serde_json::from_str(&t).map_err(err)).transpose()
    };
    let pending_only = matches!(filter.delivery, Some(DeliveryState::Queued | DeliveryState::Retrying));
    if pending_only {
        let due = txn.open_table(DUE).map_err(err)?;
        let mut ids = Vec::new();
        for entry in due.iter().map_err(err)? {
            ids.push(entry.map_err(err)?.0.1);
            if ids.len() >= MAX_SCAN {
                break;
            }
        }
        ids.sort_unstable_by(|a, b| b.cmp(a));
        for id in ids {
            if !visit(load(id)?, &mut page) {
                break;
            }
        }
    } else if let Some(key) =
        filter.commit.as_deref().map(|c| (BY_COMMIT, c)).or(filter.repo.as_deref().map(|r| (BY_REPO, r)))
    {
        let (table, value) = key;
        let index = txn.open_table(table).map_err(err)?;
        for entry in index.range_rev((value, 0)..=(value, u64::MAX)).map_err(err)? {
            let id = entry.map_err(err)?.0.1;
            if !visit(load(id)?, &mut page) {
                break;
            }
        }
    } else {
        for entry in outbox.iter_rev().map_err(err)? {
            let (_, v) = entry.map_err(err)?;
            let stored = serde_json::from_str(&v).map_err(err)?;
            if !visit(Some(stored), &mut page) {
                break;
            }
        }
    }
    Ok(page)
}

/// One commit status as the API shows it (`GET /api/v2/statuses`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CommitStatus {
    /// The outbox row's id (newer rows have larger ids).
    pub id: u64,
    pub repo: String,
    pub commit: String,
    /// The status's context: the builder's id.
    pub context: String,
    pub build: u64,
    /// The build's state as rbb names it: pending, running, success, failure, error, cancelled.
    pub state: super::status::CommitState,
    /// What the forge is told: pending, success, failure or error (GitLab spells some of
    /// them its own way on the wire).
    pub forge_state: String,
    pub description: String,
    pub target_url: String,
    pub delivery: DeliveryState,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When the next attempt is due (unix milliseconds), while queued or retrying.
    pub next_try_at: Option<u64>,
    /// Why the last attempt failed, with credentials hidden.
    pub last_error: Option<String>,
    /// When it was queued and when its delivery state last changed (unix milliseconds).
    pub queued_at: u64,
    pub updated_at: u64,
}

/// Hides what may be a credential in a delivery error: the user part of URLs
/// (`https://user:secret@host` becomes `https://<hidden>@host`) and the word after
/// `Bearer`, `token` or `PRIVATE-TOKEN:` when it looks like one (8 or more token characters).
pub fn hide_credentials(message: &str) -> String {
    let mut words: Vec<String> = Vec::new();
    let mut hide_next = false;
    for word in message.split(' ') {
        let credential_like = word.len() >= 8
            && word
                .trim_end_matches(['"', '\'', ',', '}'])
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.=+/".contains(c));
        if hide_next && credential_like {
            words.push("<hidden>".to_owned());
            hide_next = false;
            continue;
        }
        let lower = word.to_ascii_lowercase();
        hide_next = matches!(lower.trim_start_matches(['"', '\'']), "bearer" | "token" | "private-token:");
        let hidden = match word.split_once("://") {
            Some((scheme, rest)) => {
                let authority_end = rest.find('/').unwrap_or(rest.len());
                match rest[..authority_end].rfind('@') {
                    Some(at) => format!("{scheme}://<hidden>{}", &rest[at..]),
                    None => word.to_owned(),
                }
            }
            None => word.to_owned(),
        };
        words.push(hidden);
    }
    words.join(" ")
}

impl CommitStatus {
    pub fn of(stored: &Stored) -> CommitStatus {
        use super::status::CommitState as C;
        let st = &stored.row.status;
        let delivery = DeliveryState::of(stored);
        let forge_state = match st.state {
            C::Pending | C::Running => "pending",
            C::Success => "success",
            C::Failure => "failure",
            C::Error | C::Cancelled => "error",
        };
        CommitStatus {
            id: st.id,
            repo: st.repo.clone(),
            commit: st.sha.clone(),
            context: st.context.clone(),
            build: st.build,
            state: st.state,
            forge_state: forge_state.to_owned(),
            description: st.description.clone(),
            target_url: st.target_url.clone(),
            delivery,
            attempts: stored.row.attempts,
            next_try_at: matches!(delivery, DeliveryState::Queued | DeliveryState::Retrying)
                .then_some(stored.retry_at.max(stored.queued_at)),
            last_error: stored.row.last_error.as_deref().map(hide_credentials),
            queued_at: stored.queued_at,
            updated_at: stored.updated_at,
        }
    }
}

/// A page of `GET /api/v2/statuses`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StatusList {
    pub statuses: Vec<CommitStatus>,
    pub meta: StatusListMeta,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StatusListMeta {
    pub offset: usize,
    pub limit: usize,
    /// More statuses match after this page (ask again with a larger `offset`).
    pub more: bool,
    /// The listing stopped after reading its most rows: older matches may exist; narrow it
    /// with `repo` or `commit`.
    pub truncated: bool,
}
