//! Test support: real `rbb master` and `rbb-worker` processes on loopback, fixture git
//! repositories, a minimal HTTP client, and polling under a hard timeout.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The `rbb-worker` binary, built beside `rbb` by `cargo test --workspace`.
pub fn worker_bin() -> PathBuf {
    let rbb = PathBuf::from(env!("CARGO_BIN_EXE_rbb"));
    let w = rbb.with_file_name("rbb-worker");
    assert!(
        w.exists(),
        "{} is missing: run the tests for the whole workspace (cargo xtask test), or `cargo build -p rbb-worker` first",
        w.display()
    );
    w
}

/// Runs `sh script args...`, returns trimmed stdout.
pub fn sh(script: &Path, args: &[&str]) -> String {
    let out = Command::new("sh").arg(script).args(args).output().expect("run sh");
    assert!(out.status.success(), "{} {args:?} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Makes a git repository at `dest` whose `main` holds `pipeline` as `.rbb/pipeline.yaml`
/// (plus any `files`). Returns the commit id.
pub fn make_repo(dest: &Path, pipeline: &str, files: &[(&str, &str)]) -> String {
    let src = dest.with_extension("src");
    std::fs::create_dir_all(src.join(".rbb")).expect("mkdir");
    std::fs::write(src.join(".rbb/pipeline.yaml"), pipeline).expect("write pipeline");
    for (name, content) in files {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write file");
    }
    sh(&root().join("testdata/fixtures/mkrepo.sh"), &[src.to_str().expect("utf8"), dest.to_str().expect("utf8")])
}

/// Polls `f` until it returns `Some`, failing after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Http {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Http {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Http {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes()).expect("send");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).expect("chunk size");
            let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n];
            r.read_exact(&mut chunk).expect("chunk");
            body.extend_from_slice(&chunk);
            let mut crlf = [0; 2];
            r.read_exact(&mut crlf).expect("crlf");
        }
    } else {
        r.read_to_end(&mut body).expect("body");
    }
    Http { status, headers, body }
}

/// A running `rbb master`, killed on drop. Its stderr goes to `<dir>/master.log`.
pub struct Master {
    pub child: Child,
    pub http: String,
    pub grpc: String,
    pub log: PathBuf,
}

impl Master {
    pub fn start(config: &Path, state: &Path) -> Master {
        Self::start_on(config, state, "127.0.0.1:0")
    }

    /// Starts a master whose gRPC port is `grpc` (to restart one where workers look for it).
    pub fn start_on(config: &Path, state: &Path, grpc: &str) -> Master {
        Self::start_at(config, state, "127.0.0.1:0", grpc)
    }

    /// Starts a master on the given HTTP and gRPC addresses.
    pub fn start_at(config: &Path, state: &Path, http: &str, grpc: &str) -> Master {
        let log = state.with_extension("master.log");
        Self::attach(Self::spawn(config, state, http, grpc, &[], &log), log, Duration::from_secs(60))
    }

    /// Spawns `rbb master` (with `extra` arguments), its stderr appended to `log`.
    pub fn spawn(config: &Path, state: &Path, http: &str, grpc: &str, extra: &[&str], log: &Path) -> Child {
        let err = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
        Command::new(env!("CARGO_BIN_EXE_rbb"))
            .args(["master", "--http", http, "--grpc", grpc, "--heartbeat-ms", "200"])
            .args(extra)
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .env("RBB_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("start rbb master")
    }

    /// A spawned master, once it says where it listens (within `timeout`).
    pub fn attach(mut child: Child, log: PathBuf, timeout: Duration) -> Master {
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(timeout).unwrap_or_else(|_| {
            panic!("the master did not start; its log:\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        });
        let addr = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(|a| a.trim_start_matches("http://").trim_start_matches("https://").to_owned())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        let (http, grpc) = (addr("http="), addr("grpc="));
        Master { child, http, grpc, log }
    }

    pub fn get(&self, path: &str) -> Http {
        http(&self.http, "GET", path, &[], None)
    }

    pub fn post(&self, path: &str, body: &str) -> Http {
        http(&self.http, "POST", path, &[], Some(body))
    }

    /// Forces a builder; returns the new build's id.
    pub fn force(&self, builder: &str) -> u64 {
        let r = self.post(&format!("/api/v2/builders/{}/force", encode(builder)), "{}");
        assert_eq!(r.status, 201, "force {builder}: {}", r.text());
        r.json()["build"].as_u64().expect("build id")
    }

    pub fn build(&self, id: u64) -> serde_json::Value {
        let r = self.get(&format!("/api/v2/builds/{id}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Waits until build `id` is finished; returns it.
    pub fn finished(&self, id: u64, timeout: Duration) -> serde_json::Value {
        wait_for(timeout, &format!("build {id} to finish ({})", self.log.display()), || {
            let b = self.build(id);
            (b["state"] == "finished").then_some(b)
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- master log ({})\n{}", self.log.display(), self.log_text());
        }
    }
}

/// A running `rbb-worker`, killed on drop.
pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
}

impl Worker {
    pub fn start(master: &Master, name: &str, token: &str, workdir: &Path, env: &[(&str, &str)]) -> Worker {
        let log = workdir.with_extension("worker.log");
        let err = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let mut cmd = Command::new(worker_bin());
        cmd.args(["--master", &format!("http://{}", master.grpc), "--name", name, "--token", token])
            .arg("--workdir")
            .arg(workdir)
            .env("RBB_LOG", "info")
            .stdout(Stdio::null())
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Worker { child: cmd.spawn().expect("start rbb-worker"), log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- worker log ({})\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Percent-encodes a builder id for a URL path.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Writes a master config for one repository and the given workers `(name, token, labels)`.
pub fn write_config(dir: &Path, repos: &[&str], workers: &[(&str, &str, &[&str])]) -> PathBuf {
    let mut text = String::from("repositories:\n");
    for r in repos {
        text.push_str(&format!("  - url: {r}\n"));
    }
    text.push_str("workers:\n");
    for (name, token, labels) in workers {
        text.push_str(&format!(
            "  - name: {name}\n    token: {token}\n    labels: [{}]\n    max_steps: 2\n",
            labels.join(", ")
        ));
    }
    let p = dir.join("rbb.yaml");
    std::fs::write(&p, text).expect("write config");
    p
}

/// Commits `content` as `file` on the current branch of `repo` (fixture script, fixed
/// identity; `minutes` after the fixture epoch). Returns the commit id.
pub fn commit(repo: &Path, file: &str, content: &str, minutes: u32, message: &str) -> String {
    let mut child = Command::new("sh")
        .arg(root().join("testdata/fixtures/commit.sh"))
        .arg(repo)
        .arg(file)
        .arg(minutes.to_string())
        .arg(message)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("commit.sh");
    child.stdin.take().expect("stdin").write_all(content.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "commit.sh failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs git in `repo`.
pub fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git").arg("-C").arg(repo).args(args).output().expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// All builds, newest first.
pub fn builds(m: &Master) -> Vec<serde_json::Value> {
    m.get("/api/v2/builds?limit=1000").json()["builds"].as_array().cloned().unwrap_or_default()
}

/// All changes, newest first.
pub fn changes(m: &Master) -> Vec<serde_json::Value> {
    m.get("/api/v2/changes?limit=1000").json()["changes"].as_array().cloned().unwrap_or_default()
}
