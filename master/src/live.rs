//! Numbered live events for `GET /api/v2/events`: one task reads the engine's event channels,
//! gives each event an id, drops an event identical to the one before it, and keeps the
//! newest ones in a bounded ring so a client that reconnects with `Last-Event-ID` gets what
//! it missed, or a `reset` event when that is no longer held. It only reads the engine.

use crate::engine::{Engine, Event};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Events kept for resuming clients.
pub const RING: usize = 4096;

/// One numbered event as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbered {
    /// `<epoch>-<n>`: the epoch changes when the master restarts, so an id from an earlier
    /// run never resumes into this one.
    pub id: String,
    pub kind: &'static str,
    pub data: String,
}

struct Ring {
    events: VecDeque<(u64, Numbered)>,
    next: u64,
    last: Option<(&'static str, String)>,
}

/// The numbered event stream of one master.
pub struct Live {
    epoch: u64,
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Numbered>,
}

/// What a connecting client gets: events to replay (or a reset first), then the live stream.
pub struct Resume {
    pub replay: Vec<Numbered>,
    /// The client's `Last-Event-ID` is not held (too old, or from another run): it must reload.
    pub reset: bool,
    pub live: broadcast::Receiver<Numbered>,
}

impl Live {
    /// Starts numbering the engine's events; needs a Tokio runtime.
    pub fn start(engine: Arc<Engine>) -> Arc<Live> {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let (tx, _) = broadcast::channel(1024);
        let live =
            Arc::new(Live { epoch, ring: Mutex::new(Ring { events: VecDeque::new(), next: 1, last: None }), tx });
        let mut events = engine.subscribe();
        let mut logs = engine.subscribe_logs();
        let weak = Arc::downgrade(&live);
        tokio::spawn(async move {
            loop {
                let got = tokio::select! {
                    e = events.recv() => e,
                    e = logs.recv() => e,
                };
                let Some(live) = weak.upgrade() else { break };
                match got {
                    Ok(ev) => {
                        let (kind, data) = describe(&engine, &ev);
                        live.push(kind, data);
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        live.push("reset", serde_json::json!({ "missed": n }).to_string())
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        live
    }

    fn push(&self, kind: &'static str, data: String) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if kind != "reset" && ring.last.as_ref().is_some_and(|(k, d)| *k == kind && *d == data) {
            return;
        }
        let n = ring.next;
        ring.next += 1;
        ring.last = Some((kind, data.clone()));
        let ev = Numbered { id: format!("{}-{n}", self.epoch), kind, data };
        ring.events.push_back((n, ev.clone()));
        if ring.events.len() > RING {
            ring.events.pop_front();
        }
        // Sent under the lock, so a client subscribing under it sees each event once.
        let _ = self.tx.send(ev);
    }

    /// A client connects, with the `Last-Event-ID` it holds, if any.
    pub fn resume(&self, last_event_id: Option<&str>) -> Resume {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let live = self.tx.subscribe();
        let Some(last) = last_event_id.map(str::trim).filter(|s| !s.is_empty()) else {
            return Resume { replay: Vec::new(), reset: false, live };
        };
        let held = last
            .split_once('-')
            .filter(|(epoch, _)| epoch.parse::<u64>().ok() == Some(self.epoch))
            .and_then(|(_, n)| n.parse::<u64>().ok())
            .filter(|n| {
                *n < ring.next && ring.events.front().map_or(*n + 1 == ring.next, |(first, _)| *n + 1 >= *first)
            });
        match held {
            Some(n) => Resume {
                replay: ring.events.iter().filter(|(i, _)| *i > n).map(|(_, e)| e.clone()).collect(),
                reset: false,
                live,
            },
            None => Resume { replay: Vec::new(), reset: true, live },
        }
    }
}

/// The event's kind and data, with the state it announces, so that two equal events in a row
/// really say nothing new.
fn describe(engine: &Engine, ev: &Event) -> (&'static str, String) {
    use serde_json::json;
    let data = match ev {
        Event::Build { id } => {
            let b = engine.build(*id);
            ("build", json!({ "id": id, "state": b.as_ref().map(|b| b.state), "result": b.and_then(|b| b.result) }))
        }
        Event::Step { build, step } => {
            let s = engine.build(*build).and_then(|b| b.steps.into_iter().find(|s| s.number == *step));
            (
                "step",
                json!({ "build": build, "step": step, "state": s.as_ref().map(|s| s.state), "result": s.and_then(|s| s.result) }),
            )
        }
        Event::Log { id, bytes } => ("log", json!({ "id": id, "bytes": bytes })),
        Event::Worker { name } => {
            let w = engine.workers().into_iter().find(|w| w.name == *name);
            (
                "worker",
                json!({ "name": name, "connected": w.as_ref().map(|w| w.connected), "running": w.map(|w| w.running) }),
            )
        }
    };
    (data.0, data.1.to_string())
}
