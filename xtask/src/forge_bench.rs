//! `cargo xtask bench forge`: the forge round trip and the mirror's incremental fetch.
//!
//! (a) A signed GitHub push webhook to a real release `rbb master` (one `rbb-worker`), until
//! the pending commit status of the new commit's build arrives at a local fake forge; median
//! of several pushes, next to the floor of one `curl` POST of a status to the same forge.
//! (b) One new commit of a 10,000-commit repository (made with `git fast-import`) into the
//! release master's mirror, from its push webhook to the commit in the change log, next to
//! `git fetch` of the same commit with the same refspecs into a bare repository, in the same
//! rounds. (Through the release binary: the mirror code linked into xtask is a debug build.)
//!
//! Every timed operation is checked: the status arrived for that commit with the right state,
//! context and token (and the build's success status after it); the commit is in the mirror
//! and its branch points at it. A check that fails stops the bench.

use crate::runs;
use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PUSHES: usize = 7;
const HISTORY: usize = 10_000;
const FETCH_ROUNDS: usize = 9;
const PIPELINE: &str = "builders:\n  b:\n    on:\n      push: { branches: [main] }\n    steps: [{ run: 'true' }]\n";
const SECRET: &str = "bench-webhook-secret";
const TOKEN: &str = "bench-forge-token";

/// One status request the fake forge received: when (fully read), path, auth header, body.
#[derive(Clone)]
struct Seen {
    at: Instant,
    path: String,
    authorization: String,
    body: Value,
}

/// A forge's status API on loopback answering 201 to every request, recording each.
struct FakeForge {
    addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeForge {
    fn start() -> Result<FakeForge> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Some(s) = serve_one(stream) {
                    record.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                }
            }
        });
        Ok(FakeForge { addr, seen })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Reads one HTTP/1.1 request and answers 201 `{}`.
fn serve_one(mut s: TcpStream) -> Option<Seen> {
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let at = Instant::now();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let body = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
    let _ = s.write_all(
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    Some(Seen { at, path, authorization: header("authorization").unwrap_or_default(), body })
}

pub(crate) fn sign(body: &[u8]) -> Result<String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).context("hmac key")?;
    mac.update(body);
    Ok(mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect())
}

/// POSTs `body` to `path` with `headers`; answers the status code.
pub(crate) fn post(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Result<u16> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).with_context(|| format!("no HTTP status in {out:?}"))
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "rbb bench")
        .env("GIT_AUTHOR_EMAIL", "bench@rbb.invalid")
        .env("GIT_COMMITTER_NAME", "rbb bench")
        .env("GIT_COMMITTER_EMAIL", "bench@rbb.invalid")
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running git {args:?}"))?;
    if !out.status.success() {
        bail!("git {args:?} in {} failed: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Waits up to `timeout` for `f` to give `Some`, polling every millisecond.
pub(crate) fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn run(root: &Path, bin: &Path, work: &Path) -> Result<()> {
    let dir = work.join("forge");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    println!("forge: commit statuses and mirror fetches");
    webhook_to_status(root, bin, &dir)?;
    incremental_fetch(bin, &dir)
}

/// (a) Push webhook → pending status at the forge.
fn webhook_to_status(root: &Path, bin: &Path, dir: &Path) -> Result<()> {
    let forge = FakeForge::start()?;
    let src = dir.join("app-src");
    std::fs::create_dir_all(src.join(".rbb"))?;
    std::fs::write(src.join(".rbb/pipeline.yaml"), PIPELINE)?;
    let repo = dir.join("repos/app");
    crate::make_repo_from(root, &src, &repo)?;
    std::fs::write(
        dir.join("rbb.yaml"),
        format!(
            "repositories:\n  - url: repos/app\n    poll_interval: 1h\n    status: {{ forge: github, api: 'http://{}', project: acme/app, token: {TOKEN} }}\nwebhooks:\n  github_secret: {SECRET}\nworkers:\n  - name: w\n    token: t\n",
            forge.addr
        ),
    )?;
    let cluster = runs::start(bin, dir)?;
    let template: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("testdata/webhooks/github/push.json"))?)?;
    let mut times = Vec::new();
    let mut before = git(&repo, &["rev-parse", "HEAD"])?;
    for i in 0..=PUSHES {
        let sha = git(&repo, &["commit", "-q", "--allow-empty", "-m", &format!("bench push {i}")])
            .and_then(|_| git(&repo, &["rev-parse", "HEAD"]))?;
        let mut payload = template.clone();
        payload["before"] = before.clone().into();
        payload["after"] = sha.clone().into();
        let body = payload.to_string();
        let signature = format!("sha256={}", sign(body.as_bytes())?);
        let status_path = format!("/repos/acme/app/statuses/{sha}");
        let start = Instant::now();
        let code = post(
            &cluster.http,
            "/api/v2/hooks/github",
            &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &signature)],
            &body,
        )?;
        if code != 202 {
            bail!("the push webhook for {sha} was answered {code}, not 202");
        }
        let pending = poll(Duration::from_secs(60), "the pending status", || {
            Ok(forge.seen().into_iter().find(|s| s.path == status_path && s.body["state"] == "pending"))
        })?;
        if pending.body["context"] != "app/b" || pending.authorization != format!("Bearer {TOKEN}") {
            bail!("the pending status of {sha} is wrong: {} (authorization {:?})", pending.body, pending.authorization);
        }
        let took = pending.at.saturating_duration_since(start);
        // The build runs to its end and its success status arrives before the next push.
        poll(Duration::from_secs(60), "the success status", || {
            Ok(forge.seen().into_iter().find(|s| s.path == status_path && s.body["state"] == "success"))
        })?;
        let builds = runs::get(&cluster.http, &format!("/api/v2/builds?commit={sha}"))?;
        let b = builds["builds"].as_array().and_then(|a| a.first()).cloned().unwrap_or(Value::Null);
        if b["result"] != "SUCCESS" || b["reason"].as_str().is_some_and(|r| r == "force") {
            bail!("the build of pushed commit {sha} is not a successful push build: {b}");
        }
        if i > 0 {
            times.push(took); // the first push warms the master, worker and forge paths
        }
        before = sha;
    }
    // The floor: one status POSTed by curl (as the sender does) to the same forge.
    let mut floor = Vec::new();
    for i in 0..PUSHES {
        let path = format!("/repos/acme/app/statuses/floor{i}");
        let t = Instant::now();
        let out = Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-H", "Content-Type: application/json", "-H", &format!("Authorization: Bearer {TOKEN}")])
            .args(["--data-binary", r#"{"state":"pending","context":"app/b"}"#])
            .arg(format!("http://{}{path}", forge.addr))
            .output()?;
        floor.push(t.elapsed());
        if String::from_utf8_lossy(&out.stdout) != "201" {
            bail!("the floor's curl POST did not arrive: {}", String::from_utf8_lossy(&out.stderr));
        }
        // The fake forge answers before it records the request.
        poll(Duration::from_secs(5), "the floor's POST to be recorded", || {
            Ok(forge.seen().iter().any(|s| s.path == path).then_some(()))
        })?;
    }
    let (m, f) = (median(times.clone()), median(floor));
    println!("  push webhook → pending status at the forge (median of {PUSHES} pushes, each checked)");
    println!(
        "    rbb master + worker (release)    {:>9}   (min {}, max {})",
        ms(m),
        ms(*times.iter().min().unwrap_or(&m)),
        ms(*times.iter().max().unwrap_or(&m))
    );
    println!(
        "    baseline: one curl status POST   {:>9}   (the sender's own floor; rbb is {:.1}× it)",
        ms(f),
        m.as_secs_f64() / f.as_secs_f64().max(1e-9)
    );
    Ok(())
}

/// A `git fast-import` stream of `n` commits on `refs/heads/main` (after `from`, if given),
/// each changing one file.
fn history(n: usize, from: Option<&str>, first: usize) -> String {
    let mut s = String::with_capacity(n * 200);
    for i in first..first + n {
        let msg = format!("commit {i}\n");
        let content = format!("line {i}\n");
        s.push_str(&format!(
            "commit refs/heads/main\ncommitter rbb bench <bench@rbb.invalid> {} +0000\n",
            1_700_000_000 + i
        ));
        s.push_str(&format!("data {}\n{msg}", msg.len()));
        if let Some(parent) = from.filter(|_| i == first) {
            s.push_str(&format!("from {parent}\n"));
        }
        if i == 0 {
            s.push_str(&format!("M 644 inline .rbb/pipeline.yaml\ndata {}\n{PIPELINE}\n", PIPELINE.len()));
        }
        s.push_str(&format!("M 644 inline src/file{}.txt\ndata {}\n{content}\n", i % 100, content.len()));
    }
    s
}

fn fast_import(repo: &Path, stream: &str) -> Result<()> {
    let mut child = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["fast-import", "--quiet"])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("fast-import stdin")?.write_all(stream.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("git fast-import failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// (b) One new commit into the master's mirror of a 10,000-commit repository: from the
/// push webhook to the commit recorded as a change (the master's fetch through its mirror
/// code, then the change log), next to `git fetch` of the same commit into a bare mirror.
fn incremental_fetch(bin: &Path, dir: &Path) -> Result<()> {
    let dir = dir.join("fetch");
    std::fs::create_dir_all(&dir)?;
    let origin = dir.join("history.git");
    git(&dir, &["init", "-q", "--bare", "-b", "main", origin.to_str().context("path")?])?;
    let t = Instant::now();
    fast_import(&origin, &history(HISTORY, None, 0))?;
    let made = t.elapsed();
    let count: usize = git(&origin, &["rev-list", "--count", "main"])?.parse()?;
    if count != HISTORY {
        bail!("the generated repository has {count} commits, not {HISTORY}");
    }
    let url = origin.to_str().context("path")?.to_owned();
    std::fs::write(
        dir.join("rbb.yaml"),
        format!(
            "repositories:\n  - url: {url}\n    poll_interval: 1h\nwebhooks:\n  github_secret: {SECRET}\nworkers:\n  - name: w\n    token: t\n"
        ),
    )?;
    let t = Instant::now();
    let cluster = runs::start(bin, &dir)?;
    let recorded = |sha: &str| -> Result<bool> {
        let v = runs::get(&cluster.http, &format!("/api/v2/changes?commit={sha}"))?;
        Ok(v["changes"].as_array().is_some_and(|a| a.iter().any(|c| c["commit"] == sha)))
    };
    let head = git(&origin, &["rev-parse", "main"])?;
    poll(Duration::from_secs(120), "the master's first fetch of the history", || {
        let r = runs::get(&cluster.http, "/api/v2/repositories")?;
        Ok(r["repositories"][0]["last_success"].as_i64().map(|_| ()))
    })?;
    let master_first = t.elapsed();
    let base = dir.join("git-mirror.git");
    git(&dir, &["init", "-q", "--bare", base.to_str().context("path")?])?;
    let git_fetch = |base: &Path| -> Result<Duration> {
        let t = Instant::now();
        git(base, &["fetch", "--quiet", "--prune", &url, "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"])?;
        Ok(t.elapsed())
    };
    let git_first = git_fetch(&base)?;
    if git(&base, &["rev-parse", "refs/heads/main"])? != head {
        bail!("git fetch did not get the history's head {head}");
    }
    let template: Value =
        serde_json::from_str(&std::fs::read_to_string(crate::root().join("testdata/webhooks/github/push.json"))?)?;
    let mut rbb_times = Vec::new();
    let mut git_times = Vec::new();
    for round in 0..FETCH_ROUNDS {
        let parent = git(&origin, &["rev-parse", "main"])?;
        fast_import(&origin, &history(1, Some(&parent), HISTORY + round))?;
        let sha = git(&origin, &["rev-parse", "main"])?;
        let rbb = || -> Result<Duration> {
            let mut payload = template.clone();
            payload["before"] = parent.clone().into();
            payload["after"] = sha.clone().into();
            payload["repository"]["name"] = "history".into();
            let body = payload.to_string();
            let signature = format!("sha256={}", sign(body.as_bytes())?);
            let t = Instant::now();
            let code = post(
                &cluster.http,
                "/api/v2/hooks/github",
                &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &signature)],
                &body,
            )?;
            if code != 202 {
                bail!("the push webhook for {sha} was answered {code}, not 202");
            }
            poll(Duration::from_secs(60), "the new commit recorded", || Ok(recorded(&sha)?.then_some(())))?;
            let took = t.elapsed();
            // Its build runs to its end before anything else is timed.
            poll(Duration::from_secs(60), "the new commit's build", || {
                let v = runs::get(&cluster.http, &format!("/api/v2/builds?commit={sha}"))?;
                let b = v["builds"].as_array().and_then(|a| a.first()).cloned();
                Ok(b.filter(|b| b["state"] == "finished"))
            })
            .and_then(|b| if b["result"] == "SUCCESS" { Ok(()) } else { bail!("the build of {sha} failed: {b}") })?;
            Ok(took)
        };
        let plain = || -> Result<Duration> {
            let took = git_fetch(&base)?;
            if git(&base, &["rev-parse", "refs/heads/main"])? != sha {
                bail!("git fetch did not get commit {sha}");
            }
            Ok(took)
        };
        // Alternate who goes first: neither gets the warmer page cache every time.
        if round % 2 == 0 {
            rbb_times.push(rbb()?);
            git_times.push(plain()?);
        } else {
            git_times.push(plain()?);
            rbb_times.push(rbb()?);
        }
    }
    let (r, g) = (median(rbb_times), median(git_times));
    println!("  mirror of a {HISTORY}-commit repository (made by git fast-import in {}; local path)", ms(made));
    println!("    first fetch: master start to mirror ready {:>9}   git fetch {:>9}", ms(master_first), ms(git_first));
    println!("    one new commit (median of {FETCH_ROUNDS} pushes, each checked)");
    println!(
        "    push webhook → commit recorded   {:>9}   (the master's fetch through its mirror, plus the change log)",
        ms(r)
    );
    println!(
        "    baseline: git fetch, same refs   {:>9}   (rbb is {:.2}× it)\n",
        ms(g),
        r.as_secs_f64() / g.as_secs_f64().max(1e-9)
    );
    Ok(())
}
