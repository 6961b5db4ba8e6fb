//! Sends the configured notifications when a build finishes: it follows the engine's build
//! events, reads each finished build once, and posts webhooks (through the sender's
//! transport) and e-mail off the async threads. Delivery is best effort: a failure is
//! logged, never retried, and never touches build state.

use super::notify::{self, Finished};
use super::sender::Transport;
use crate::engine::{Engine, Event};
use rbb_schema::config::NotificationConfig;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// Builds already notified, remembered so a repeated event sends nothing twice.
const REMEMBERED: usize = 4096;

pub fn spawn(
    engine: Arc<Engine>,
    rules: Vec<NotificationConfig>,
    base_url: String,
    transport: Arc<dyn Transport>,
    stop: tokio_util::sync::CancellationToken,
) {
    let rules = Arc::new(rules);
    tokio::spawn(async move {
        let mut events = engine.subscribe();
        let mut seen: VecDeque<u64> = VecDeque::new();
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => break,
                e = events.recv() => e,
            };
            let id = match event {
                Ok(Event::Build { id }) => id,
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "notifications fell behind the build events; some may be missed");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            if seen.contains(&id) {
                continue;
            }
            let (e, r, t, url) = (engine.clone(), rules.clone(), transport.clone(), base_url.clone());
            let sent = tokio::task::spawn_blocking(move || deliver(&e, &r, t.as_ref(), &url, id)).await;
            if let Ok(true) = sent {
                seen.push_back(id);
                if seen.len() > REMEMBERED {
                    seen.pop_front();
                }
            }
        }
    });
}

/// Sends what the rules want for build `id`; false if it has not finished.
fn deliver(engine: &Engine, rules: &[NotificationConfig], transport: &dyn Transport, base_url: &str, id: u64) -> bool {
    let fb = match engine.finished_build(id) {
        Ok(Some(fb)) => fb,
        Ok(None) => return false,
        Err(e) => {
            tracing::error!(build = id, error = %e, "cannot read a finished build for its notifications");
            return false;
        }
    };
    let f = Finished {
        build: &fb.build,
        previous: fb.previous,
        authors: fb.authors.clone(),
        url: format!("{}/#/builds/{id}", base_url.trim_end_matches('/')),
    };
    for rule in rules {
        match notify::wanted(rule, &f) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::error!(error = %e, "notification rule");
                continue;
            }
        }
        if let Some(req) = notify::webhook_request(rule, &f) {
            match transport.post(&req, Duration::from_secs(10)) {
                Ok((code, _)) if (200..300).contains(&code) => tracing::info!(build = id, code, "notification sent"),
                Ok((code, _)) => tracing::warn!(build = id, code, "notification webhook refused"),
                Err(e) => tracing::warn!(build = id, error = %e, "notification webhook failed"),
            }
        }
        if let Some(email) = &rule.email {
            let sent = notify::email_message(email, &f)
                .and_then(|m| m.map_or(Ok(()), |m| notify::send_email(email, &m, Duration::from_secs(30))));
            if let Err(e) = sent {
                tracing::warn!(build = id, error = %e, "notification e-mail failed");
            }
        }
    }
    true
}
