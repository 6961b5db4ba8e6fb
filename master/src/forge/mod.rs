//! Commit statuses back to the forges: what each build's state means to GitHub, GitLab and
//! Gitea/Forgejo (`status`), the durable outbox they wait in (`outbox_store`, redb), and the
//! sender that delivers them with retries and backoff (`sender`); and notifications of
//! finished builds (`notify`: outgoing signed webhooks, Slack text, e-mail over SMTP).
//!
//! A forge that is down or slow never blocks a build: builds only write outbox rows (in the
//! transaction that stores their state); the sender reads them on its own. Only the latest
//! state per (repository, commit, context) is ever sent, and a delivered row is never sent
//! again. This module must not change build state.

pub mod notifier;
pub mod notify;
pub mod outbox_store;
pub mod sender;
pub mod status;

pub use outbox_store::StateOutbox;
pub use sender::{Outbox, Transport};
pub use status::{CommitState, StatusRow, StatusTarget, statuses_for};
