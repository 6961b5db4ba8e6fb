//! TLS end to end: certificates made by the test (rcgen), the real `rbb master` and
//! `rbb-worker` binaries on loopback. A worker with the right CA connects, builds, and checks
//! out from the master's mirror over https; a wrong CA, an expired or misnamed server
//! certificate, a plain-text client on a TLS port and a worker without its required client
//! certificate are refused, with the reason at the worker and in the master's log.

mod support;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: PathBuf,
}

fn ca(dir: &Path, name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
    let pem = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&pem, issuer.pem()).expect("write CA");
    Ca { issuer, pem }
}

/// A certificate for `names` (subject alternative names) with common name `cn`, signed by
/// `ca`; expired a few years ago when `expired`. Returns (cert, key) PEM files.
fn leaf(dir: &Path, ca: &Ca, file: &str, cn: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
    let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca.issuer).expect("sign");
    let (cert_path, key_path) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}-key.pem")));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (cert_path, key_path)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A master config with TLS from `cert`/`key` (and `extra`), one repository and workers
/// w1 and w2 (tokens t1, t2).
fn config(dir: &Path, cert: &Path, key: &Path, extra: &str, workers_extra: &str) -> PathBuf {
    make_repo(
        &dir.join("app"),
        "builders:\n  build:\n    steps: [{ name: hello, run: 'cat README && echo built-over-tls' }]\n",
        &[("README", "hello from the repository\n")],
    );
    let text = format!(
        "repositories:\n  - url: app\n    poll_interval: 1h\nworkers:\n  - name: w1\n    token: t1\n{workers_extra}  - name: w2\n    token: t2\n\
         api_token: admin-token\ntls:\n  cert: {}\n  key: {}\n{extra}",
        cert.display(),
        key.display()
    );
    let path = dir.join("rbb.yaml");
    std::fs::write(&path, text).expect("config");
    path
}

/// Starts `rbb-worker` with `args` besides name and token; stderr goes to `<dir>/<log>`.
fn worker(dir: &Path, log: &str, name: &str, token: &str, args: &[&str]) -> (Child, PathBuf) {
    let log = dir.join(log);
    let err = std::fs::File::create(&log).expect("log");
    let child = Command::new(worker_bin())
        .args(["--name", name, "--token", token])
        .arg("--workdir")
        .arg(dir.join(format!("work-{name}-{}", log.file_stem().and_then(|s| s.to_str()).unwrap_or("w"))))
        .args(args)
        .env("RBB_LOG", "info")
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("start rbb-worker");
    (child, log)
}

/// Waits for a worker to exit; returns its exit code and log.
fn exits(mut child: Child, log: &Path) -> (Option<i32>, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (status.code(), std::fs::read_to_string(log).unwrap_or_default());
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!(
                "the worker did not exit within 30 s; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `curl` against the master's HTTPS port, verifying with `ca`: (status, body).
fn curl(ca: &Path, method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "30", "--write-out", "\n%{http_code}", "-X", method])
        .arg("--cacert")
        .arg(ca);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.arg(url).output().expect("curl");
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), body.to_owned())
}

fn wait_log(m: &Master, what: &str, needle: &[&str]) -> String {
    wait_for(Duration::from_secs(20), what, || {
        let log = m.log_text();
        log.lines().find(|l| needle.iter().all(|n| l.contains(n))).map(str::to_owned)
    })
}

#[test]
fn a_worker_with_the_ca_builds_over_tls_and_checks_out_over_https() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = ca(d, "rbb");
    let (cert, key) = leaf(d, &pki, "master", "master", &["127.0.0.1", "localhost"], false);
    let http_port = free_port();
    let cfg = config(d, &cert, &key, &format!("checkout_url: https://127.0.0.1:{http_port}\n"), "");
    let m = Master::start_at(&cfg, &d.join("state"), &format!("127.0.0.1:{http_port}"), "127.0.0.1:0");
    let base = format!("https://{}", m.http);
    let (mut w, wlog) = worker(
        d,
        "w1.log",
        "w1",
        "t1",
        &["--master", &format!("https://{}", m.grpc), "--ca-file", pki.pem.to_str().expect("utf8")],
    );
    wait_for(Duration::from_secs(30), "w1 to connect over TLS", || {
        let (_, body) = curl(&pki.pem, "GET", &format!("{base}/api/v2/workers"), None);
        body.contains("\"connected\":true").then_some(())
    });
    let (status, body) =
        curl(&pki.pem, "POST", &format!("{base}/api/v2/builders/app%2Fbuild/force"), Some("admin-token"));
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).expect("json")["build"].as_u64().expect("id");
    let build = wait_for(Duration::from_secs(60), "the build to finish", || {
        let (_, body) = curl(&pki.pem, "GET", &format!("{base}/api/v2/builds/{id}"), None);
        let b: serde_json::Value = serde_json::from_str(&body).expect("json");
        (b["state"] == "finished").then_some(b)
    });
    let log_id = build["steps"][0]["log_id"].as_u64().expect("log id");
    let (_, log) = curl(&pki.pem, "GET", &format!("{base}/api/v2/logs/{log_id}/raw"), None);
    assert_eq!(build["result"], "SUCCESS", "{build}\n{log}\n{}", std::fs::read_to_string(&wlog).unwrap_or_default());
    assert!(log.contains(&format!("https://127.0.0.1:{http_port}/git/app.git")), "{log}");
    assert!(log.contains("hello from the repository") && log.contains("built-over-tls"), "{log}");

    // Plain HTTP on the HTTPS port gets no answer, and the master says why.
    let mut s = std::net::TcpStream::connect(&m.http).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    s.write_all(b"GET /api/v2/builds HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1"), "plain HTTP was answered: {answer:?}");
    let line = wait_log(
        &m,
        "the master to log the plain-text client",
        &["refused a TLS connection", "does not speak TLS", "port=\"http\""],
    );
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    // curl without the CA does not trust the master.
    let out = Command::new("curl")
        .args(["--silent", "--max-time", "10", &format!("{base}/api/v2/builds")])
        .output()
        .expect("curl");
    assert_eq!(out.status.code(), Some(60), "curl must refuse an unknown issuer");
    let _ = w.kill();
    let _ = w.wait();
}

#[test]
fn workers_refuse_a_master_whose_certificate_does_not_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = ca(d, "rbb");
    let other = ca(d, "other");
    let cases: [(&str, (PathBuf, PathBuf), &Path, &str); 3] = [
        ("unknown-issuer", leaf(d, &pki, "good", "master", &["127.0.0.1"], false), &other.pem, "unknown issuer"),
        ("expired", leaf(d, &pki, "expired", "master", &["127.0.0.1"], true), &pki.pem, "expired"),
        ("wrong-name", leaf(d, &pki, "misnamed", "master", &["ci.example.com"], false), &pki.pem, "wrong name"),
    ];
    for (case, (cert, key), ca_file, reason) in cases {
        let sub = d.join(case);
        std::fs::create_dir_all(&sub).expect("mkdir");
        let cfg = config(&sub, &cert, &key, "", "");
        let m = Master::start(&cfg, &sub.join("state"));
        let (w, log) = worker(
            &sub,
            "w1.log",
            "w1",
            "t1",
            &["--master", &format!("https://{}", m.grpc), "--ca-file", ca_file.to_str().expect("utf8")],
        );
        let (code, text) = exits(w, &log);
        assert_eq!(code, Some(2), "{case}: the worker must stop (exit 2):\n{text}");
        assert!(text.contains("the master's certificate does not verify") && text.contains(reason), "{case}:\n{text}");
        let line = wait_log(
            &m,
            &format!("{case}: the master to log the refusal"),
            &["refused a TLS connection", "port=\"grpc\""],
        );
        assert!(
            line.contains("peer=127.0.0.1:") && line.contains("refused this master's certificate"),
            "{case}: {line}"
        );
    }
}

#[test]
fn a_plain_text_worker_on_the_tls_port_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = ca(d, "rbb");
    let (cert, key) = leaf(d, &pki, "master", "master", &["127.0.0.1"], false);
    let cfg = config(d, &cert, &key, "", "");
    let m = Master::start(&cfg, &d.join("state"));
    let (w, log) = worker(d, "plain.log", "w1", "t1", &["--master", &format!("http://{}", m.grpc)]);
    let line = wait_log(
        &m,
        "the master to log the plain-text worker",
        &["refused a TLS connection", "does not speak TLS", "port=\"grpc\""],
    );
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    let (code, text) = exits(w, &log);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("https://") && text.contains("--ca-file"),
        "the worker must say the master speaks TLS:\n{text}"
    );
}

#[test]
fn a_required_client_certificate_must_name_the_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = ca(d, "rbb");
    let other = ca(d, "other");
    let (cert, key) = leaf(d, &pki, "master", "master", &["127.0.0.1"], false);
    let cfg =
        config(d, &cert, &key, &format!("  client_ca: {}\n", pki.pem.display()), "    require_client_cert: true\n");
    let m = Master::start(&cfg, &d.join("state"));
    let url = format!("https://{}", m.grpc);
    let ca_file = pki.pem.to_str().expect("utf8").to_owned();
    let base = ["--master", url.as_str(), "--ca-file", ca_file.as_str()];

    // No certificate at all.
    let (w, log) = worker(d, "none.log", "w1", "t1", &base);
    let (code, text) = exits(w, &log);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("must present a client certificate") && text.contains("presented no client certificate"),
        "{text}"
    );
    wait_log(
        &m,
        "the master to log the missing certificate",
        &["client certificate is required", "worker=w1", "presented no client certificate", "peer=127.0.0.1:"],
    );

    // A certificate naming another worker.
    let (c, k) = leaf(d, &pki, "w2-cert", "w2", &["w2"], false);
    let args: Vec<&str> =
        base.iter().copied().chain(["--cert", c.to_str().expect("utf8"), "--key", k.to_str().expect("utf8")]).collect();
    let (w, log) = worker(d, "other-name.log", "w1", "t1", &args);
    let (code, text) = exits(w, &log);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("names w2, not `w1`"), "{text}");

    // A certificate from another CA fails the handshake.
    let (c, k) = leaf(d, &other, "w1-other", "w1", &["w1"], false);
    let args: Vec<&str> =
        base.iter().copied().chain(["--cert", c.to_str().expect("utf8"), "--key", k.to_str().expect("utf8")]).collect();
    let (w, log) = worker(d, "other-ca.log", "w1", "t1", &args);
    let (code, text) = exits(w, &log);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("the master refused this worker's client certificate"), "{text}");
    wait_log(
        &m,
        "the master to log the unknown client CA",
        &["refused a TLS connection", "unknown issuer", "port=\"grpc\""],
    );

    // The right certificate connects; w2 needs none.
    let (c, k) = leaf(d, &pki, "w1-cert", "w1", &["w1"], false);
    let args: Vec<&str> =
        base.iter().copied().chain(["--cert", c.to_str().expect("utf8"), "--key", k.to_str().expect("utf8")]).collect();
    let (mut w1, _) = worker(d, "good.log", "w1", "t1", &args);
    let (mut w2, _) = worker(d, "w2.log", "w2", "t2", &base);
    wait_for(Duration::from_secs(30), "w1 and w2 to connect", || {
        let (_, body) = curl(&pki.pem, "GET", &format!("https://{}/api/v2/workers?connected=true", m.http), None);
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["meta"]["total"] == 2).then_some(())
    });
    for w in [&mut w1, &mut w2] {
        let _ = w.kill();
        let _ = w.wait();
    }
}

/// The production example of docs/security.md, run: its config (with this test's repository,
/// certificates and addresses), its worker command line and its tokens.
#[test]
fn the_production_example_of_the_security_doc_runs() {
    const DASHBOARD: &str = "rbb_9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d";
    const RELEASE: &str = "rbb_4f1c0d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d";
    let doc = std::fs::read_to_string(root().join("docs/security.md")).expect("docs/security.md");
    assert!(doc.contains(DASHBOARD) && doc.contains(RELEASE), "the doc names the example's tokens");
    let yaml = doc.split("```yaml\n").nth(1).and_then(|b| b.split("```").next()).expect("the config example");
    assert!(yaml.contains("anonymous: none"), "the first example is the production config");
    let worker_cmd: String = doc
        .split("```sh\n")
        .find(|b| b.starts_with("rbb-worker"))
        .and_then(|b| b.split("```").next())
        .expect("the worker example")
        .replace("\\\n", " ");

    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = ca(d, "rbb");
    let (cert, key) = leaf(d, &pki, "master", "master", &["127.0.0.1"], false);
    let (wcert, wkey) = leaf(d, &pki, "linux-1", "linux-1", &["linux-1"], false);
    make_repo(&d.join("app"), "builders:\n  build:\n    steps: [{ run: 'cat README' }]\n", &[("README", "prod\n")]);
    let http_port = free_port();
    let master_url = format!("https://127.0.0.1:{http_port}");
    let text = yaml
        .replace("https://git.example.com/team/app.git", &d.join("app").display().to_string())
        .replace("/etc/rbb/master.pem", &cert.display().to_string())
        .replace("/etc/rbb/master-key.pem", &key.display().to_string())
        .replace("/etc/rbb/workers-ca.pem", &pki.pem.display().to_string())
        .replace("https://ci.internal:8010", &master_url);
    let cfg = d.join("rbb.yaml");
    std::fs::write(&cfg, text).expect("config");
    let m = Master::start_at(&cfg, &d.join("state"), &format!("127.0.0.1:{http_port}"), "127.0.0.1:0");

    let cmd = worker_cmd
        .replace("rbb-worker ", &format!("{} ", worker_bin().display()))
        .replace("https://ci.internal:7070", &format!("https://{}", m.grpc))
        .replace("/etc/rbb/ca.pem", &pki.pem.display().to_string())
        .replace("/etc/rbb/linux-1.pem", &wcert.display().to_string())
        .replace("/etc/rbb/linux-1-key.pem", &wkey.display().to_string());
    let wlog = d.join("linux-1.log");
    let mut w = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {} --workdir {}", cmd.trim(), d.join("work").display()))
        .env("RBB_LOG", "info")
        .stderr(std::fs::File::create(&wlog).expect("log"))
        .spawn()
        .expect("the worker example");

    let (status, body) = curl(&pki.pem, "GET", &format!("{master_url}/api/v2/builds"), None);
    assert_eq!(status, 401, "anonymous: none: {body}");
    let (_, who) = curl(&pki.pem, "GET", &format!("{master_url}/api/v2/whoami"), Some(DASHBOARD));
    assert!(who.contains("\"name\":\"dashboard\"") && who.contains("\"role\":\"read\""), "{who}");
    let (status, _) =
        curl(&pki.pem, "POST", &format!("{master_url}/api/v2/builders/app%2Fbuild/force"), Some(DASHBOARD));
    assert_eq!(status, 403);
    wait_for(Duration::from_secs(30), "linux-1 to connect with its client certificate", || {
        let (_, body) = curl(&pki.pem, "GET", &format!("{master_url}/api/v2/workers?name=linux-1"), Some(DASHBOARD));
        body.contains("\"connected\":true").then_some(())
    });
    let (status, body) =
        curl(&pki.pem, "POST", &format!("{master_url}/api/v2/builders/app%2Fbuild/force"), Some(RELEASE));
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).expect("json")["build"].as_u64().expect("id");
    let build = wait_for(Duration::from_secs(60), "the build to finish", || {
        let (_, body) = curl(&pki.pem, "GET", &format!("{master_url}/api/v2/builds/{id}"), Some(DASHBOARD));
        let b: serde_json::Value = serde_json::from_str(&body).ok()?;
        (b["state"] == "finished").then_some(b)
    });
    assert_eq!(build["result"], "SUCCESS", "{build}\n{}", std::fs::read_to_string(&wlog).unwrap_or_default());
    let (_, audit) = curl(&pki.pem, "GET", &format!("{master_url}/api/v2/audit"), Some(RELEASE));
    let audit: serde_json::Value = serde_json::from_str(&audit).expect("json");
    let rows: Vec<(String, String, String)> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| (e["who"].to_string(), e["action"].to_string(), e["result"].to_string()))
        .collect();
    let row = |w: &str, a: &str, r: &str| (format!("\"{w}\""), format!("\"{a}\""), format!("\"{r}\""));
    assert_eq!(rows, vec![row("release-team", "force", "ok"), row("dashboard", "force", "refused")]);
    assert!(audit["entries"][0]["from"].as_str().expect("from").starts_with("127.0.0.1:"));
    let _ = w.kill();
    let _ = w.wait();
}
