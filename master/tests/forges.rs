//! Remote repositories against real servers on loopback: smart HTTP (`git http-backend` behind
//! a CGI bridge with basic auth), `sshd` (a key and host key made per run) and `git daemon`
//! for `git://`. Each server is started per connection in inetd mode on a port the test
//! binds, so nothing races for a port.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rbb_compiler::git::{FetchError, Remote};
use rbb_master::mirror::{Mirror, MirrorError, RefUpdate};
use rbb_schema::config::RepoAuth;

const USER: &str = "ci-bot";
const PASSWORD: &str = "s3cr3t-t0ken-never-shown";

fn globs() -> Vec<String> {
    vec!["*".to_owned(), "**".to_owned()]
}

/// Text that compresses badly, so a pack holding it is big.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = String::with_capacity(len + 1);
    while out.len() < len {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        out.push_str(&format!("{:016x}", x >> 3));
    }
    out.push('\n');
    out
}

/// A repository at `<root>/src.git` (with a work tree, as `git daemon` and `http-backend`
/// serve it all the same) whose `main` holds a big file. Returns its path and head.
fn source_repo(root: &Path) -> (PathBuf, String) {
    let repo = root.join("src.git");
    let big = noise(1, 1 << 20);
    let head =
        support::make_repo(&repo, "builders:\n  build:\n    steps: [{ run: make }]\n", &[("big.txt", big.as_str())]);
    (repo, head)
}

fn basic(user: &str, password: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = format!("{user}:{password}").into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

/// Accepts connections on a fresh loopback port and hands each socket, as stdin and stdout,
/// to a process `make` builds (inetd style).
fn inetd(make: impl Fn() -> Command + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let fd: OwnedFd = stream.into();
            let Ok(fd2) = fd.try_clone() else { continue };
            let mut cmd = make();
            cmd.stdin(Stdio::from(fd)).stdout(Stdio::from(fd2));
            if let Ok(mut child) = cmd.spawn() {
                std::thread::spawn(move || child.wait());
            }
        }
    });
    addr
}

fn git_daemon(root: &Path) -> SocketAddr {
    let root = root.to_owned();
    inetd(move || {
        let mut c = Command::new("git");
        c.args(["daemon", "--inetd", "--export-all"]).arg(format!("--base-path={}", root.display()));
        c.stderr(Stdio::null());
        c
    })
}

/// Forwards connections to `upstream`, but cuts each one after `limit` bytes came back: a
/// server going away in the middle of a fetch.
fn cutting_proxy(upstream: SocketAddr, limit: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let Ok(mut server) = TcpStream::connect(upstream) else { continue };
            let (Ok(mut client2), Ok(mut server2)) = (client.try_clone(), server.try_clone()) else { continue };
            std::thread::spawn(move || std::io::copy(&mut client2, &mut server2));
            std::thread::spawn(move || {
                let mut sent = 0;
                let mut buf = [0u8; 8192];
                while sent < limit {
                    match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let n = n.min(limit - sent);
                            if client.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            sent += n;
                        }
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

/// Accepts connections and never answers.
fn stalling_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (addr, accepted)
}

/// Smart HTTP: `git http-backend` as CGI behind basic auth, counting the bytes it sends.
struct HttpGit {
    addr: SocketAddr,
    sent: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HttpGit {
    fn start(root: &Path, auth: &str) -> HttpGit {
        Self::start_on(root, auth, "127.0.0.1:0")
    }

    fn start_on(root: &Path, auth: &str, addr: &str) -> HttpGit {
        use axum::body::Body;
        use axum::http::{Request, Response, StatusCode};
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let sent = Arc::new(AtomicUsize::new(0));
        let (root, auth, counter) = (root.to_owned(), auth.to_owned(), sent.clone());
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let (root, auth, counter) = (root.clone(), auth.clone(), counter.clone());
            async move {
                let given = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
                if given != auth {
                    return Response::builder()
                        .status(StatusCode::UNAUTHORIZED)
                        .header("www-authenticate", "Basic realm=\"git\"")
                        .body(Body::from("unauthorized\n"))
                        .expect("response");
                }
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX).await.expect("body");
                let header =
                    |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let mut cmd = Command::new("git");
                cmd.arg("http-backend")
                    .env("GIT_PROJECT_ROOT", &root)
                    .env("GIT_HTTP_EXPORT_ALL", "1")
                    .env("PATH_INFO", parts.uri.path())
                    .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
                    .env("REQUEST_METHOD", parts.method.as_str())
                    .env("CONTENT_TYPE", header("content-type"))
                    .env("CONTENT_LENGTH", body.len().to_string())
                    .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
                    .env("GIT_PROTOCOL", header("git-protocol"))
                    .env("REMOTE_USER", USER)
                    .env("REMOTE_ADDR", "127.0.0.1")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null());
                let out = tokio::task::spawn_blocking(move || {
                    let mut child = cmd.spawn().expect("http-backend");
                    let mut stdin = child.stdin.take().expect("stdin");
                    let writer = std::thread::spawn(move || stdin.write_all(&body));
                    let out = child.wait_with_output().expect("http-backend output");
                    let _ = writer.join();
                    out.stdout
                })
                .await
                .expect("cgi");
                let split = out.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4));
                let split = split.or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
                let (end, skip) = split.expect("CGI headers");
                let mut response = Response::builder();
                for line in String::from_utf8_lossy(&out[..end]).lines() {
                    let Some((k, v)) = line.split_once(':') else { continue };
                    if k.eq_ignore_ascii_case("status") {
                        let code = v.trim().split(' ').next().unwrap_or("500").parse().unwrap_or(500);
                        response = response.status(code);
                    } else {
                        response = response.header(k.trim(), v.trim());
                    }
                }
                let payload = out[end + skip..].to_vec();
                counter.fetch_add(payload.len(), Ordering::SeqCst);
                response.body(Body::from(payload)).expect("response")
            }
        });
        runtime.spawn(async move { axum::serve(listener, app).await });
        HttpGit { addr, sent, runtime: Some(runtime) }
    }

    fn url(&self) -> String {
        format!("http://{}/src.git", self.addr)
    }

    /// The server goes away: its port refuses connections from now on.
    fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for HttpGit {
    fn drop(&mut self) {
        self.stop();
    }
}

fn password_auth(password: &str) -> RepoAuth {
    RepoAuth { username: Some(USER.into()), password: Some(password.into()), ..RepoAuth::default() }
}

fn remote_mirror(tmp: &Path, url: &str, auth: Option<RepoAuth>, timeout: Duration) -> Mirror {
    Mirror::open(url, &tmp.join("state/mirrors/src.git"))
        .expect("open mirror")
        .with_remote(Remote::new(url, auth, timeout))
}

fn new_branch(branch: &str, head: &str) -> RefUpdate {
    RefUpdate { branch: branch.into(), old: None, new: Some(head.into()) }
}

#[test]
fn https_first_then_incremental_fetch_with_basic_auth() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, head) = source_repo(tmp.path());
    let server = HttpGit::start(tmp.path(), &basic(USER, PASSWORD));
    let mirror = remote_mirror(tmp.path(), &server.url(), Some(password_auth(PASSWORD)), Duration::from_secs(60));

    assert_eq!(mirror.fetch(&globs()).expect("first fetch"), vec![new_branch("main", &head)]);
    let first = server.sent.swap(0, Ordering::SeqCst);
    assert!(first > 400_000, "the first fetch carries the big file ({first} bytes)");

    let next = support::commit(&src, "small.txt", "one line\n", 1, "Add a line");
    let updates = mirror.fetch(&globs()).expect("second fetch");
    assert_eq!(updates, vec![RefUpdate { branch: "main".into(), old: Some(head.clone()), new: Some(next.clone()) }]);
    let second = server.sent.swap(0, Ordering::SeqCst);
    assert!(second * 20 < first, "an incremental fetch sends only the new objects: {second} bytes against {first}");
    assert_eq!(mirror.commit(&next).expect("read the new commit").message, "Add a line");

    assert_eq!(mirror.fetch(&globs()).expect("third fetch"), vec![]);
}

#[test]
fn https_token_from_a_credential_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_src, head) = source_repo(tmp.path());
    let server = HttpGit::start(tmp.path(), &basic("x-access-token", PASSWORD));
    let file = tmp.path().join("token");
    std::fs::write(&file, format!("  {PASSWORD}\n")).expect("write token");
    let auth = RepoAuth { password_file: Some(file.display().to_string()), ..RepoAuth::default() };
    let mirror = remote_mirror(tmp.path(), &server.url(), Some(auth), Duration::from_secs(60));
    assert_eq!(mirror.fetch(&globs()).expect("fetch"), vec![new_branch("main", &head)]);
}

#[test]
fn https_wrong_credentials_name_the_repository_and_hide_the_secret() {
    let tmp = tempfile::tempdir().expect("tempdir");
    source_repo(tmp.path());
    let server = HttpGit::start(tmp.path(), &basic(USER, PASSWORD));
    let wrong = "wrong-password-kept-secret";
    let mirror = remote_mirror(tmp.path(), &server.url(), Some(password_auth(wrong)), Duration::from_secs(60));
    let err = mirror.fetch(&globs()).expect_err("wrong credentials are refused");
    let text = format!("{err} / {err:?}");
    assert!(matches!(err, MirrorError::Remote(FetchError::Auth { .. })), "an auth error: {text}");
    assert!(text.contains(&server.url()), "the error names the repository: {text}");
    assert!(!text.contains(wrong) && !text.contains(PASSWORD), "no secret in the error: {text}");

    // Without any credentials: refused the same way, without a prompt.
    let anonymous = remote_mirror(tmp.path(), &server.url(), None, Duration::from_secs(60));
    let err = anonymous.fetch(&globs()).expect_err("anonymous is refused");
    assert!(matches!(err, MirrorError::Remote(FetchError::Auth { .. })), "an auth error: {err}");
}

#[test]
fn https_server_gone_keeps_the_mirror_and_a_stall_is_stopped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, head) = source_repo(tmp.path());
    let mut server = HttpGit::start(tmp.path(), &basic(USER, PASSWORD));
    let url = server.url();
    let mirror = remote_mirror(tmp.path(), &url, Some(password_auth(PASSWORD)), Duration::from_secs(60));
    mirror.fetch(&globs()).expect("first fetch");
    support::commit(&src, "small.txt", "x\n", 1, "More");
    server.stop();
    // The port stays taken by a listener that closes every connection: another test's server
    // (the suite runs in parallel) must not pick the freed port up and answer the fetch.
    let addr = url.trim_start_matches("http://").split('/').next().expect("host:port").to_owned();
    // Should another process take the port in the instant between, the fetch still fails but
    // its kind depends on what answers.
    let held = match std::net::TcpListener::bind(&addr) {
        Ok(gone) => {
            std::thread::spawn(move || {
                for conn in gone.incoming() {
                    drop(conn);
                }
            });
            true
        }
        Err(e) => {
            eprintln!("the stopped server's port {addr} was taken by another process: {e}");
            false
        }
    };
    let err = mirror.fetch(&globs()).expect_err("the server is gone");
    assert!(!held || matches!(err, MirrorError::Remote(FetchError::Failed { .. })), "a fetch error: {err}");
    assert!(err.to_string().contains(&url), "names the repository: {err}");
    assert_eq!(mirror.head("main").expect("head"), Some(head), "the mirror keeps what it had");

    // A forge that accepts and never answers is stopped by the timeout.
    let (stall, accepted) = stalling_server();
    let url = format!("http://{stall}/src.git");
    let timeout = Duration::from_secs(2);
    let stalled = Mirror::open(&url, &tmp.path().join("state/mirrors/stalled.git"))
        .expect("open")
        .with_remote(Remote::new(&url, Some(password_auth(PASSWORD)), timeout));
    let started = Instant::now();
    let err = stalled.fetch(&globs()).expect_err("a stalled forge");
    assert!(matches!(err, MirrorError::Remote(FetchError::Timeout { .. })), "a timeout: {err}");
    assert!(started.elapsed() < Duration::from_secs(20), "stopped in time: {:?}", started.elapsed());
    assert!(accepted.load(Ordering::SeqCst) >= 1, "the fetch reached the stalling server");
}

#[test]
fn https_pull_request_refs_are_fetched_and_a_missing_one_is_none() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, head) = source_repo(tmp.path());
    support::git(&src, &["checkout", "-q", "-b", "feature"]);
    let pr = support::commit(&src, "pr.txt", "pr\n", 2, "PR work");
    support::git(&src, &["update-ref", "refs/pull/7/head", &pr]);
    support::git(&src, &["checkout", "-q", "main"]);
    support::git(&src, &["branch", "-D", "feature"]);
    let server = HttpGit::start(tmp.path(), &basic(USER, PASSWORD));
    let mirror = remote_mirror(tmp.path(), &server.url(), Some(password_auth(PASSWORD)), Duration::from_secs(60));
    assert_eq!(mirror.fetch(&globs()).expect("fetch"), vec![new_branch("main", &head)]);
    assert_eq!(mirror.fetch_ref("refs/pull/7/head", "refs/rbb/pr-head/7").expect("PR ref"), Some(pr.clone()));
    assert!(mirror.has_commit(&pr).expect("has"));
    assert_eq!(mirror.fetch_ref("refs/pull/8/head", "refs/rbb/pr-head/8").expect("no such PR"), None);
}

#[test]
fn git_daemon_fetch_follows_a_force_push_and_survives_a_cut_connection() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, head) = source_repo(tmp.path());
    let daemon = git_daemon(tmp.path());
    let url = format!("git://{daemon}/src.git");

    // The server goes away in the middle of the first fetch: an error, nothing half-written.
    let cut = cutting_proxy(daemon, 64 * 1024);
    let cut_url = format!("git://{cut}/src.git");
    let broken = remote_mirror(tmp.path(), &cut_url, None, Duration::from_secs(60));
    let err = broken.fetch(&globs()).expect_err("a cut connection fails the fetch");
    assert!(err.to_string().contains(&cut_url), "names the repository: {err}");
    assert_eq!(broken.head("main").expect("head"), None, "no branch points at a half-received pack");

    // The same mirror, fetched whole.
    let mirror = remote_mirror(tmp.path(), &url, None, Duration::from_secs(60));
    assert_eq!(mirror.fetch(&globs()).expect("fetch"), vec![new_branch("main", &head)]);
    let second = support::commit(&src, "a.txt", "a\n", 1, "Second");
    assert_eq!(mirror.fetch(&globs()).expect("fetch")[0].new.as_deref(), Some(second.as_str()));

    // Force-push: main rewritten to a commit that does not descend from `second`.
    support::git(&src, &["reset", "-q", "--hard", &head]);
    let rewritten = support::commit(&src, "b.txt", "b\n", 2, "Rewritten");
    let updates = mirror.fetch(&globs()).expect("fetch after the force-push");
    assert_eq!(
        updates,
        vec![RefUpdate { branch: "main".into(), old: Some(second.clone()), new: Some(rewritten.clone()) }]
    );
    assert_eq!(mirror.head("main").expect("head"), Some(rewritten));
}

/// A real `sshd` for one test: host key, client key and known_hosts made per run.
struct Ssh {
    dir: PathBuf,
    addr: SocketAddr,
}

impl Ssh {
    fn start(dir: &Path) -> Ssh {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"].into_iter().map(PathBuf::from).find(|p| p.exists());
        let sshd = sshd.expect("sshd is missing: install openssh-server (.ci/run does)");
        let dir = dir.join("ssh");
        std::fs::create_dir_all(&dir).expect("mkdir");
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        for key in ["host", "client", "stranger"] {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key))
                .output()
                .expect("ssh-keygen");
            assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys")).expect("authorized_keys");
        let config = format!(
            "HostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PidFile none\nLogLevel ERROR\n",
            d = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config).expect("sshd_config");
        let (cfg, log) = (dir.join("sshd_config"), dir.join("sshd.log"));
        let addr = inetd(move || {
            let mut c = Command::new(&sshd);
            c.arg("-i").arg("-f").arg(&cfg).arg("-E").arg(&log);
            c.stderr(Stdio::null());
            c
        });
        let host_pub = std::fs::read_to_string(dir.join("host.pub")).expect("host.pub");
        let host_key = host_pub.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        std::fs::write(dir.join("known_hosts"), format!("[127.0.0.1]:{} {host_key}\n", addr.port()))
            .expect("known_hosts");
        std::fs::write(dir.join("empty_known_hosts"), "").expect("empty known_hosts");
        Ssh { dir, addr }
    }

    fn url(&self, repo: &Path) -> String {
        let out = Command::new("id").arg("-un").output().expect("id -un");
        let me = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        format!("ssh://{me}@127.0.0.1:{}{}", self.addr.port(), repo.display())
    }

    fn auth(&self, key: &str, known_hosts: &str) -> RepoAuth {
        RepoAuth {
            ssh_key: Some(self.dir.join(key).display().to_string()),
            known_hosts: Some(self.dir.join(known_hosts).display().to_string()),
            ..RepoAuth::default()
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

#[test]
fn ssh_fetch_with_a_key_and_known_hosts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, head) = source_repo(tmp.path());
    let ssh = Ssh::start(tmp.path());
    let url = ssh.url(&src);
    let mirror = remote_mirror(tmp.path(), &url, Some(ssh.auth("client", "known_hosts")), Duration::from_secs(60));
    let updates = mirror.fetch(&globs()).unwrap_or_else(|e| panic!("ssh fetch: {e}\nsshd log:\n{}", ssh.log()));
    assert_eq!(updates, vec![new_branch("main", &head)]);
    let next = support::commit(&src, "n.txt", "n\n", 1, "Next");
    assert_eq!(mirror.fetch(&globs()).expect("incremental")[0].new.as_deref(), Some(next.as_str()));

    // A key the server does not know.
    let stranger = Mirror::open(&url, &tmp.path().join("state/mirrors/stranger.git"))
        .expect("open")
        .with_remote(Remote::new(&url, Some(ssh.auth("stranger", "known_hosts")), Duration::from_secs(60)));
    let err = stranger.fetch(&globs()).expect_err("an unknown key is refused");
    assert!(matches!(err, MirrorError::Remote(FetchError::Auth { .. })), "an auth error: {err}");
    assert!(err.to_string().contains(&url), "names the repository: {err}");

    // A host whose key is not in known_hosts.
    let unknown = Mirror::open(&url, &tmp.path().join("state/mirrors/unknown.git"))
        .expect("open")
        .with_remote(Remote::new(&url, Some(ssh.auth("client", "empty_known_hosts")), Duration::from_secs(60)));
    let err = unknown.fetch(&globs()).expect_err("an unknown host is refused");
    assert!(matches!(err, MirrorError::Remote(FetchError::Auth { .. })), "an auth error: {err}");
}

#[test]
fn compile_reads_a_remote_repository_through_its_mirror() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_src, head) = source_repo(tmp.path());
    let server = HttpGit::start(tmp.path(), &basic(USER, PASSWORD));
    std::fs::write(tmp.path().join("token"), PASSWORD).expect("token");
    let config = tmp.path().join("rbb.yaml");
    std::fs::write(
        &config,
        format!(
            "repositories:\n  - url: {}\n    auth:\n      username: {USER}\n      password_file: token\n",
            server.url()
        ),
    )
    .expect("config");
    let loaded = rbb_compiler::git::load_config(&config).expect("config loads");
    let (sources, diags) = rbb_compiler::git::sources_from_config(&loaded, &Default::default());
    assert!(diags.is_empty(), "{diags:?}");
    assert_eq!(sources.len(), 1);
    assert_eq!(sources[0].origin.commit.as_deref(), Some(head.as_str()));
    assert!(!format!("{loaded:?}").contains(PASSWORD));
    // The command line too.
    let out = Command::new(env!("CARGO_BIN_EXE_rbb"))
        .args(["compile", "--format", "json", "--config"])
        .arg(&config)
        .output()
        .expect("rbb compile");
    let shown = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "rbb compile: {shown}");
    assert!(shown.contains(&head), "the plan names the fetched commit: {shown}");
    assert!(!shown.contains(PASSWORD), "{shown}");

    // Wrong token: a diagnostic at the url, with a hint, without the secret.
    std::fs::write(tmp.path().join("token"), "nope-secret").expect("token");
    let (_, diags) = rbb_compiler::git::sources_from_config(&loaded, &Default::default());
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert_eq!((diags[0].code, diags[0].line), ("repo-fetch", 2));
    assert!(diags[0].hint.as_deref().unwrap_or("").contains("auth"), "{diags:?}");
    assert!(!format!("{diags:?}").contains("nope-secret"));
}

#[test]
fn a_password_in_the_url_is_a_diagnostic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("rbb.yaml");
    std::fs::write(&config, "repositories:\n  - url: https://bot:hunter2@forge.invalid/org/app.git\n").expect("config");
    let diags = rbb_compiler::git::load_config(&config).expect_err("refused");
    assert_eq!((diags[0].code, diags[0].line, diags[0].col), ("secret-in-url", 2, 10));
    assert!(!format!("{diags:?}").contains("hunter2"));
}

#[test]
fn remote_url_forms() {
    use rbb_compiler::git::is_remote_url;
    for url in ["https://h/o/r.git", "http://h/r", "ssh://git@h:22/o/r.git", "git@github.com:org/r.git", "git://h/r"] {
        assert!(is_remote_url(url), "{url}");
    }
    for url in ["app", "../app", "/srv/app.git", "file:///srv/app.git", "C:/x", "dir/with:colon"] {
        assert!(!is_remote_url(url), "{url}");
    }
}

/// A forge that is down when the master starts: the master starts all the same, the API shows
/// the error on that repository (no secret in it) while the others fetch, the poller retries
/// with backoff, and once the forge is back the mirror's first fetch is a baseline (no build
/// for every old commit) and later pushes are changes.
#[test]
fn a_forge_down_at_start_is_an_error_on_its_repository_then_recovers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pipeline = "builders:\n  build:\n    steps: [{ run: 'true' }]\n";
    let src = tmp.path().join("src.git");
    let head = support::make_repo(&src, pipeline, &[]);
    support::make_repo(&tmp.path().join("local"), pipeline, &[]);
    // A port nothing listens on yet.
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    std::fs::write(tmp.path().join("token"), PASSWORD).expect("token");
    let url = format!("http://127.0.0.1:{port}/src.git");
    let config = tmp.path().join("rbb.yaml");
    std::fs::write(
        &config,
        format!(
            "repositories:\n  - url: {url}\n    name: remote\n    poll_interval: 200ms\n    auth:\n      username: {USER}\n      \
             password_file: token\n  - url: local\n    poll_interval: 200ms\nworkers:\n  - name: w1\n"
        ),
    )
    .expect("config");
    let mut master = support::Master::start(&config, &tmp.path().join("state"));
    let repos = |m: &support::Master| m.get("/api/v2/repositories").json()["repositories"].clone();
    let failing = support::wait_for(Duration::from_secs(30), "the remote's fetch error in the API", || {
        let r = repos(&master);
        (r[0]["failures"].as_u64().unwrap_or(0) >= 2).then_some(r)
    });
    let error = failing[0]["error"].as_str().unwrap_or("");
    assert!(error.contains(&url), "the error names the repository: {failing}");
    assert!(!failing.to_string().contains(PASSWORD), "no secret in the API: {failing}");
    assert_eq!(failing[1]["error"], serde_json::Value::Null, "the local repository fetches: {failing}");
    assert!(failing[1]["last_success"].is_i64(), "{failing}");
    let failures = failing[0]["failures"].as_u64().unwrap_or(0);
    assert_eq!(
        failing[0]["retry_in_ms"].as_u64(),
        Some(200 << (failures - 1)),
        "each failure doubles the wait: {failing}"
    );
    assert_eq!(failing[1]["retry_in_ms"].as_u64(), Some(200), "{failing}");

    let _server = HttpGit::start_on(tmp.path(), &basic(USER, PASSWORD), &format!("127.0.0.1:{port}"));
    support::wait_for(Duration::from_secs(60), "the remote's recovery", || {
        let r = repos(&master);
        (r[0]["error"].is_null() && r[0]["last_success"].is_i64()).then_some(())
    });
    let remote_changes =
        |m: &support::Master| support::changes(m).into_iter().filter(|c| c["repo"] == "remote").count();
    assert_eq!(remote_changes(&master), 0, "the first fetch is a baseline: {:?}", support::changes(&master));
    let next = support::commit(&src, "n.txt", "n\n", 1, "After the outage");
    support::wait_for(Duration::from_secs(30), "the new commit as a change", || {
        support::changes(&master).into_iter().find(|c| c["commit"] == next.as_str()).map(|_| ())
    });
    assert_ne!(head, next);
    assert!(!std::fs::read_to_string(&master.log).unwrap_or_default().contains(PASSWORD), "no secret in the log");
    master.kill();
}

/// Workers fetch from the master's mirror over its HTTP port, with their own name and token:
/// no forge credentials on the worker, and pushes are refused.
#[test]
fn workers_fetch_the_mirror_from_the_master_over_http() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let head = support::make_repo(&tmp.path().join("app"), "builders:\n  build:\n    steps: [{ run: make }]\n", &[]);
    let config = support::write_config(tmp.path(), &["app"], &[("w1", "tok-w1", &["linux"])]);
    let mut master = support::Master::start(&config, &tmp.path().join("state"));
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .current_dir(tmp.path())
            .output()
            .expect("git")
    };
    let url = |user: &str, token: &str| format!("http://{user}:{token}@{}/git/app.git", master.http);
    let out = git(&["clone", "-q", "--bare", &url("w1", "tok-w1"), "fetched.git"]);
    assert!(out.status.success(), "clone from the master: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(support::git(&tmp.path().join("fetched.git"), &["rev-parse", "refs/heads/main"]), head);

    let out = git(&["clone", "-q", "--bare", &url("w1", "wrong"), "refused.git"]);
    assert!(!out.status.success(), "a wrong token is refused");
    let out = git(&["ls-remote", &format!("http://{}/git/app.git", master.http)]);
    assert!(!out.status.success(), "no credentials, no mirror");
    let out = git(&["ls-remote", &url("w1", "tok-w1").replace("app.git", "other.git")]);
    assert!(!out.status.success(), "an unknown repository is not served");

    support::commit(&tmp.path().join("app"), "x.txt", "x\n", 1, "local");
    let work = tmp.path().join("work");
    let out = git(&["clone", "-q", &url("w1", "tok-w1"), work.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    support::commit(&work, "y.txt", "y\n", 2, "try to push");
    let out = Command::new("git")
        .arg("-C")
        .arg(&work)
        .args(["push", "-q", "origin", "HEAD:main"])
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("push");
    assert!(!out.status.success(), "the mirror is read-only");
    master.kill();
}
