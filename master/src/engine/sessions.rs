//! Worker sessions: who may connect, one session per worker name, liveness, and the
//! messages a session brings. Liveness is stamped by the gRPC reader as each message
//! arrives, without the engine's lock, so a long-held lock never makes a healthy worker
//! look silent.

use super::{Engine, EngineError, Event, Refusal, Session, SessionTx, Tx};
use crate::model::now_ms;
use rbb_schema::proto::{self, MasterMessage, master_message::Msg as MasterMsg};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// What the gRPC reader knows of a session without the engine: when its last message
/// arrived, and how many arrived messages the engine has not handled yet.
#[derive(Debug, Default)]
pub struct Liveness {
    last_ms: AtomicU64,
    backlog: AtomicUsize,
}

impl Liveness {
    /// A message arrived (call before handing it to the engine).
    pub fn arrived(&self, engine: &Engine) {
        self.last_ms.store(engine.clock_ms(), Ordering::Release);
        self.backlog.fetch_add(1, Ordering::AcqRel);
    }

    /// The engine handled one arrived message.
    pub fn handled(&self) {
        self.backlog.fetch_sub(1, Ordering::AcqRel);
    }

    /// Silent for longer than `limit_ms`, with nothing of it waiting to be handled.
    pub(super) fn silent(&self, now_ms: u64, limit_ms: u64) -> bool {
        self.backlog.load(Ordering::Acquire) == 0
            && now_ms.saturating_sub(self.last_ms.load(Ordering::Acquire)) > limit_ms
    }
}

/// A connected session, as the gRPC service holds it.
pub struct Connected {
    pub session: u64,
    pub liveness: Arc<Liveness>,
}

impl Engine {
    /// Checks a connecting worker's name and token.
    pub fn authenticate(&self, name: &str, token: &str) -> Result<(), Refusal> {
        let st = self.lock();
        let w = st.workers.get(name).ok_or(Refusal::UnknownWorker)?;
        match &w.config.token {
            Some(t) if t.as_bytes() == token.as_bytes() => Ok(()),
            None => Ok(()),
            Some(_) => Err(Refusal::BadToken),
        }
    }

    /// A worker finished its handshake. While another session of the same worker is alive,
    /// the new one is refused (`Conflict`): two processes with one name never take turns.
    pub fn connect(&self, hello: &proto::Hello, tx: SessionTx, peer: &str) -> Result<Connected, EngineError> {
        let mut st = self.lock();
        if st.closing {
            return Err(EngineError::ShuttingDown);
        }
        let limit = self.heartbeat_limit_ms();
        let now = self.clock_ms();
        let Some(w) = st.workers.get(&hello.name) else {
            return Err(EngineError::NotFound(format!("unknown worker {}", hello.name)));
        };
        if let Some(s) = &w.session {
            if !s.liveness.silent(now, limit) && !s.tx.is_closed() {
                tracing::warn!(worker = %hello.name, peer, connected_from = %s.peer, "refused a second worker with the same name");
                return Err(EngineError::Conflict(format!(
                    "worker `{}` is already connected (from {}, session {}); give each worker process its own name",
                    hello.name, s.peer, s.id
                )));
            }
            let old = s.id;
            self.transact(&mut st, |e, t| e.lose_session(t, &hello.name, old, "it connected again"))?;
        }
        let id = st.next_session;
        st.next_session += 1;
        let liveness = Arc::new(Liveness::default());
        liveness.last_ms.store(now, Ordering::Release);
        let Some(w) = st.workers.get_mut(&hello.name) else {
            return Err(EngineError::NotFound(format!("unknown worker {}", hello.name)));
        };
        w.labels = w.config.labels.iter().chain(hello.labels.iter()).cloned().collect();
        // The worker says what it can run; the config may only lower that.
        w.max_steps = hello.max_steps.max(1).min(w.config.max_steps.unwrap_or(u32::MAX)).max(1);
        w.platform = Some(hello.platform.clone()).filter(|p| !p.is_empty());
        w.image_platform = Some(hello.image_platform.clone()).filter(|p| !p.is_empty());
        w.allowed_mounts = hello.allowed_mounts.clone();
        w.last_seen_ms = Some(now_ms());
        let welcome = MasterMsg::Welcome(proto::Welcome {
            heartbeat_interval_ms: self.heartbeat.as_millis() as u32,
            master_version: env!("CARGO_PKG_VERSION").to_owned(),
            labels: w.config.labels.clone(),
        });
        let _ = tx.try_send(Ok(MasterMessage { msg: Some(welcome) }));
        w.session = Some(Session { id, tx, liveness: liveness.clone(), peer: peer.to_owned() });
        tracing::info!(worker = %hello.name, session = id, peer, labels = ?w.labels, max_steps = w.max_steps, "worker connected");
        let name = hello.name.clone();
        self.transact(&mut st, |e, t| {
            t.emit(Event::Worker { name });
            e.dispatch(t)
        })?;
        drop(st);
        self.settle();
        Ok(Connected { session: id, liveness })
    }

    /// The session's stream ended (the worker went away or the connection broke).
    pub fn disconnect(&self, worker: &str, session: u64, why: &str) {
        let r = self.run(|e, tx| {
            e.lose_session(tx, worker, session, why)?;
            e.dispatch(tx)
        });
        if let Err(e) = r {
            tracing::error!(worker, error = %e, "cannot record a lost worker");
        }
    }

    fn heartbeat_limit_ms(&self) -> u64 {
        u64::try_from((self.heartbeat * 3).as_millis()).unwrap_or(u64::MAX)
    }

    /// Drops sessions that have been silent for three heartbeat intervals, then retries
    /// whatever waits (a refused lease, a build a failed write left queued).
    pub fn check_heartbeats(&self) {
        let limit = self.heartbeat_limit_ms();
        let mut st = self.lock();
        let now = self.clock_ms();
        let silent: Vec<(String, u64)> = st
            .workers
            .values()
            .filter_map(|w| {
                w.session.as_ref().filter(|s| s.liveness.silent(now, limit)).map(|s| (w.config.name.clone(), s.id))
            })
            .collect();
        for (name, session) in silent {
            tracing::warn!(worker = %name, "no message for {limit} ms; treating the worker as lost");
            if let Err(e) = self.transact(&mut st, |e, tx| e.lose_session(tx, &name, session, "no heartbeat")) {
                tracing::error!(worker = %name, error = %e, "cannot record a lost worker");
            }
        }
        for (worker, f) in std::mem::take(&mut st.unapplied) {
            if self.transact(&mut st, |e, tx| e.step_finished(tx, f.clone())).is_err() {
                st.unapplied.push((worker, f));
            }
        }
        // Running builds whose worker has no session (a loss that could not be stored).
        let orphans: Vec<u64> = st
            .running
            .iter()
            .copied()
            .filter(|id| {
                let worker = st.builds.get(id).and_then(|b| b.worker.as_ref());
                worker.and_then(|w| st.workers.get(w)).is_none_or(|w| w.session.is_none())
            })
            .collect();
        for id in orphans {
            if let Err(e) =
                self.transact(&mut st, |e, tx| e.lose_build(tx, id, "its worker is gone", super::rules::Loss::Worker))
            {
                tracing::error!(build = id, error = %e, "cannot record a lost build");
            }
        }
        if let Err(e) = self.transact(&mut st, |e, tx| e.dispatch(tx)) {
            tracing::error!(error = %e, "dispatch failed");
        }
        drop(st);
        self.settle();
    }

    pub(super) fn lose_session(
        &self,
        tx: &mut Tx<'_>,
        worker: &str,
        session: u64,
        why: &str,
    ) -> Result<(), EngineError> {
        let Some(w) = tx.st.workers.get_mut(worker) else { return Ok(()) };
        if w.session.as_ref().map(|s| s.id) != Some(session) {
            return Ok(());
        }
        if let Some(s) = w.session.take() {
            let _ = s.tx.try_send(Err(tonic::Status::aborted(format!("session closed: {why}"))));
        }
        tracing::warn!(worker, session, why, "worker disconnected");
        let builds: Vec<u64> = w.builds.values().copied().collect();
        for id in builds {
            self.lose_build(tx, id, &format!("worker {worker} was lost ({why})"), super::rules::Loss::Worker)?;
        }
        tx.emit(Event::Worker { name: worker.to_owned() });
        Ok(())
    }

    /// A message from a worker's session, applied and made durable where it must be.
    pub fn on_message(&self, worker: &str, session: u64, msg: proto::worker_message::Msg) -> Result<(), EngineError> {
        let out = self.receive(worker, session, msg);
        self.settle();
        out
    }

    /// A message from a worker's session, applied without waiting for the disk: what must
    /// be durable waits (held) for [`Engine::settle`], which the caller runs when
    /// [`Engine::flush_needed`] says so.
    pub fn receive(&self, worker: &str, session: u64, msg: proto::worker_message::Msg) -> Result<(), EngineError> {
        use proto::worker_message::Msg;
        let mut st = self.lock();
        {
            let Some(w) = st.workers.get_mut(worker) else { return Ok(()) };
            if w.session.as_ref().map(|s| s.id) != Some(session) {
                return Ok(()); // a message from a replaced session
            }
            w.last_seen_ms = Some(now_ms());
        }
        match msg {
            Msg::Hello(_) | Msg::Heartbeat(_) => Ok(()),
            Msg::Started(s) => {
                let Some(l) = st.leases.get(&s.lease) else { return Ok(()) };
                let (build, step) = (l.build, l.step);
                self.emit_now(Event::Step { build, step });
                Ok(())
            }
            Msg::Log(chunk) => {
                let Some(l) = st.leases.get(&chunk.lease) else { return Ok(()) };
                let Some(log) =
                    st.builds.get(&l.build).and_then(|b| b.steps.get(l.step as usize)).and_then(|s| s.log_id)
                else {
                    return Ok(());
                };
                drop(st);
                if let Some(bytes) = self.logs.append(log, crate::logs::Stream::from_wire(chunk.stream), &chunk.data)? {
                    self.emit_now(Event::Log { id: log, bytes });
                }
                Ok(())
            }
            Msg::Finished(f) => {
                let r = self.transact(&mut st, |e, tx| e.step_finished(tx, f.clone()));
                if r.is_err() {
                    st.unapplied.push((worker.to_owned(), f));
                }
                r
            }
            // Leased again when the worker reports a step or on the next tick, not at once:
            // a worker that really is full must not be asked again in a loop.
            Msg::Refused(r) => self.transact(&mut st, |e, tx| e.lease_refused(tx, worker, r)),
        }
    }
}
