//! Delivers the outbox's due statuses to the forges, one request at a time per round, with
//! exponential backoff on failures. It reads rows through the [`Outbox`] trait and talks
//! HTTP through a [`Transport`]; it never touches build state.

use super::status::{self, StatusRow, StatusTarget, Verdict};
use std::io::Write;
use std::time::Duration;

/// A row waiting in the outbox, with its delivery history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub status: StatusRow,
    /// Failed attempts so far.
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// The durable queue of statuses. Only the latest row per (repository, commit, context) is
/// ever due: writing a newer one supersedes the older.
pub trait Outbox: Send + Sync {
    /// Rows due at `now` (unix milliseconds), oldest first.
    fn due(&self, now: u64) -> Vec<Row>;
    /// The row was delivered: it is never sent again.
    fn delivered(&self, id: u64);
    /// The row failed: try again at `retry_at` (unix milliseconds), or never (`None`).
    fn failed(&self, id: u64, retry_at: Option<u64>, error: &str);
}

/// Sends one HTTP POST with a JSON body; answers (status, body).
pub trait Transport: Send + Sync {
    fn post(&self, request: &status::Request, timeout: Duration) -> Result<(u16, String), String>;
}

/// The longest wait between two attempts of one row.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(30 * 60);

/// The wait after the `attempts`-th failure: 1 s, doubling, capped at [`MAX_RETRY_WAIT`].
pub fn retry_wait(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(20)).min(MAX_RETRY_WAIT)
}

/// What one [`send_due`] round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    pub delivered: Vec<u64>,
    pub retried: Vec<(u64, String)>,
    pub given_up: Vec<(u64, String)>,
}

/// Sends every row due at `now`. `target` says where a repository's statuses go (`None`:
/// the repository has no status target any more, the row is dropped as given up).
pub fn send_due(
    outbox: &dyn Outbox,
    transport: &dyn Transport,
    target: &dyn Fn(&str) -> Option<StatusTarget>,
    now: u64,
    timeout: Duration,
) -> Round {
    let mut round = Round::default();
    for row in outbox.due(now) {
        let id = row.status.id;
        let Some(target) = target(&row.status.repo) else {
            let why = format!("repository {} has no status target", row.status.repo);
            outbox.failed(id, None, &why);
            round.given_up.push((id, why));
            continue;
        };
        let request = status::request(&target, &row.status);
        let verdict = match transport.post(&request, timeout) {
            Ok((code, body)) => status::verdict(target.forge, code, &body),
            Err(e) => Verdict::Retry(e),
        };
        let scrub = |s: String| if target.token.is_empty() { s } else { s.replace(&target.token, "<hidden>") };
        match verdict {
            Verdict::Delivered => {
                outbox.delivered(id);
                round.delivered.push(id);
            }
            Verdict::Retry(why) => {
                let why = scrub(why);
                let wait = retry_wait(row.attempts + 1);
                tracing::warn!(repo = %row.status.repo, sha = %row.status.sha, context = %row.status.context,
                    error = %why, retry_in = ?wait, "commit status not delivered");
                outbox.failed(id, Some(now + wait.as_millis() as u64), &why);
                round.retried.push((id, why));
            }
            Verdict::GiveUp(why) => {
                let why = scrub(why);
                tracing::warn!(repo = %row.status.repo, sha = %row.status.sha, context = %row.status.context,
                    error = %why, "commit status refused for good");
                outbox.failed(id, None, &why);
                round.given_up.push((id, why));
            }
        }
    }
    round
}

/// Posts with the `curl` binary: https with the system's CA store and proxies, a hard
/// timeout, and the token passed on stdin (curl's `-K -` config), never on its command line.
#[derive(Debug, Default, Clone)]
pub struct CurlTransport;

fn curl_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Transport for CurlTransport {
    fn post(&self, request: &status::Request, timeout: Duration) -> Result<(u16, String), String> {
        let mut config = format!("url = {}\nrequest = \"POST\"\n", curl_quote(&request.url));
        config.push_str("header = \"Content-Type: application/json\"\nheader = \"User-Agent: rbb\"\n");
        for (k, v) in &request.headers {
            config.push_str(&format!("header = {}\n", curl_quote(&format!("{k}: {v}"))));
        }
        config.push_str(&format!("data-binary = {}\n", curl_quote(&request.body)));
        let mut child = std::process::Command::new("curl")
            .args(["--silent", "--show-error", "--max-time"])
            .arg(format!("{:.3}", timeout.as_secs_f64()))
            .args(["--write-out", "\n%{http_code}", "--config", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run curl: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(config.as_bytes()).map_err(|e| format!("cannot talk to curl: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("curl: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(if out.status.code() == Some(28) {
                format!("timed out after {timeout:?}: {err}")
            } else {
                err
            });
        }
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        let code = code.trim().parse().map_err(|_| format!("curl gave no HTTP status: {stdout:?}"))?;
        Ok((code, body.to_owned()))
    }
}

/// Where a repository's statuses go, shared with the sender's task.
pub type Targets = std::sync::Arc<dyn Fn(&str) -> Option<StatusTarget> + Send + Sync>;

/// Runs [`send_due`] on a blocking thread every `tick` (and when `wake` is notified) until
/// `stop`.
pub fn spawn(
    outbox: std::sync::Arc<dyn Outbox>,
    transport: std::sync::Arc<dyn Transport>,
    targets: Targets,
    wake: std::sync::Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let (o, t, g) = (outbox.clone(), transport.clone(), targets.clone());
            let round = tokio::task::spawn_blocking(move || {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                send_due(o.as_ref(), t.as_ref(), &|repo| g(repo), now, Duration::from_secs(10))
            })
            .await;
            if let Err(e) = round {
                tracing::error!(error = %e, "status sender round failed");
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
}
