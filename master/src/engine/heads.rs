//! The head plan at start: the engine opens without it, so the API answers while every
//! repository's pipeline is read and compiled in the background; whatever decides from the
//! head plan (forces, pushes, pull requests, rebuilds, cron, the builder endpoints) waits
//! for it instead of deciding from an empty plan.

use super::{Engine, EngineError};
use std::time::Duration;

/// Whether the head plan has been read since the engine opened.
pub(super) struct Heads {
    read: std::sync::Mutex<bool>,
    done: std::sync::Condvar,
    watch: tokio::sync::watch::Sender<bool>,
}

impl Heads {
    pub(super) fn new() -> Heads {
        Heads {
            read: std::sync::Mutex::new(false),
            done: std::sync::Condvar::new(),
            watch: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Engine {
    /// Reads every repository's pipeline at its branch head, compiles the head plan and
    /// makes it the engine's; from then on nothing waits for it. A repository that cannot be
    /// read is logged and keeps no builders until its next push.
    pub fn read_heads(&self) -> Result<(), EngineError> {
        // Whatever happens below (an error, a panic), nothing waits for the plan afterwards.
        struct Done<'a>(&'a Heads);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                *self.0.read.lock().unwrap_or_else(|p| p.into_inner()) = true;
                self.0.done.notify_all();
                self.0.watch.send_replace(true);
            }
        }
        let _done = Done(&self.heads);
        if let Err(e) = self.planner.refresh_heads() {
            tracing::error!(error = %e, "cannot read every pipeline at its branch head");
        }
        let plan = self.planner.head_plan();
        self.run(|_, tx| {
            tx.set_head_plan(plan);
            tx.durable();
            Ok(())
        })
    }

    /// Whether [`Engine::read_heads`] has run.
    pub fn heads_read(&self) -> bool {
        *self.heads.read.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until the head plan has been read (for the blocking paths that decide from it).
    pub(super) fn wait_heads(&self) {
        let mut read = self.heads.read.lock().unwrap_or_else(|p| p.into_inner());
        while !*read {
            read = self.heads.done.wait(read).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits, at most `limit`, until the head plan has been read; false when it has not.
    pub async fn heads_ready(&self, limit: Duration) -> bool {
        let mut rx = self.heads.watch.subscribe();
        matches!(tokio::time::timeout(limit, rx.wait_for(|read| *read)).await, Ok(Ok(_)))
    }
}

impl Engine {
    /// `repo`'s mirror holds its branches now, after the head plan was read without them (a
    /// new mirror whose first fetch failed): its pipeline joins the head plan. Nothing to do
    /// for a repository the head plan has read.
    pub fn head_fetched(&self, repo: &str) -> Result<(), EngineError> {
        if !self.heads_read() || self.planner.has_head(repo) {
            return Ok(());
        }
        let Some(r) = self.repos.get(repo) else { return Ok(()) };
        let Ok(commit) = super::resolve(&r.git_dir, &r.branch) else { return Ok(()) };
        if let Err(e) = self.planner.head_moved(repo, &commit) {
            tracing::warn!(repo, error = %e, "cannot read the pipeline at the branch head");
            return Ok(());
        }
        tracing::info!(repo, "the repository's pipeline joins the head plan");
        let plan = self.planner.head_plan();
        self.run(|_, tx| {
            tx.set_head_plan(plan);
            Ok(())
        })
    }
}
