//! `cargo xtask bench tls`: what TLS costs. The same release `rbb master` and `rbb-worker`
//! run twice on loopback, in plain text and with TLS on both ports (certificates made here
//! with rcgen), and the two figures TLS could hurt are measured in each: a step writing
//! 500,000 lines (50 MiB, streamed over the worker's gRPC connection) and a forced build's
//! trigger → first instruction (an HTTPS force, a gRPC lease). Every build is checked
//! SUCCESS through the API; a failure aborts the bench.

use crate::make_repo_from;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How the bench reaches the master's HTTP port.
struct Client {
    http: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    /// A one-shot HTTP/1.1 request; returns the body of a 2xx answer.
    fn request(&self, method: &str, path: &str, body: &str) -> Result<String> {
        let tcp = std::net::TcpStream::connect(&self.http).with_context(|| format!("connecting to {}", self.http))?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
        tcp.set_nodelay(true)?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.http,
            body.len()
        );
        let mut out = Vec::new();
        match &self.tls {
            None => {
                let mut s = tcp;
                s.write_all(req.as_bytes())?;
                s.read_to_end(&mut out)?;
            }
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
                let conn = rustls::ClientConnection::new(config.clone(), name)?;
                let mut s = rustls::StreamOwned::new(conn, tcp);
                s.write_all(req.as_bytes())?;
                // A peer closing without close_notify is an error here; the body is complete
                // by then (Connection: close, Content-Length).
                if let Err(e) = s.read_to_end(&mut out)
                    && e.kind() != std::io::ErrorKind::UnexpectedEof
                {
                    return Err(e.into());
                }
            }
        }
        let out = String::from_utf8_lossy(&out).into_owned();
        let (head, rest) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        if !head.starts_with("HTTP/1.1 2") {
            bail!("{method} {path}: {}", head.lines().next().unwrap_or(""));
        }
        Ok(rest.to_owned())
    }

    fn get(&self, path: &str) -> Result<Value> {
        Ok(serde_json::from_str(&self.request("GET", path, "")?)?)
    }

    fn force(&self, builder: &str) -> Result<u64> {
        let v: Value =
            serde_json::from_str(&self.request("POST", &format!("/api/v2/builders/repo%2F{builder}/force"), "{}")?)?;
        v["build"].as_u64().context("force returned no build id")
    }

    fn finished(&self, id: u64) -> Result<Value> {
        let start = Instant::now();
        loop {
            let b = self.get(&format!("/api/v2/builds/{id}"))?;
            if b["state"] == "finished" {
                if let Some(why) = crate::runs::not_success(&b) {
                    bail!("the bench stopped: {why}; its figures would be meaningless");
                }
                return Ok(b);
            }
            if start.elapsed() > Duration::from_secs(300) {
                bail!("build {id} did not finish in 5 minutes");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The test CA and the master's certificate for 127.0.0.1: (CA file, cert, key).
fn certificates(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "rbb bench CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    leaf.distinguished_name.push(DnType::CommonName, "rbb bench master");
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &ca)?;
    let paths = (dir.join("ca.pem"), dir.join("master.pem"), dir.join("master-key.pem"));
    std::fs::write(&paths.0, ca.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Figures of one mode: (50 MiB step ms, trigger → first instruction ms).
fn measure(bin: &Path, dir: &Path, tls: Option<(&Path, &Path, &Path)>, marker: &Path) -> Result<(f64, f64)> {
    let mut config =
        String::from("repositories:\n  - url: repo\nworkers:\n  - name: w\n    token: t\n    max_steps: 1\n");
    if let Some((_, cert, key)) = tls {
        config.push_str(&format!("tls:\n  cert: {}\n  key: {}\n", cert.display(), key.display()));
    }
    std::fs::write(dir.join("rbb.yaml"), config)?;
    let mut master = Command::new(bin.join("rbb"))
        .args(["master", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .arg("--config")
        .arg(dir.join("rbb.yaml"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RBB_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting rbb master")?;
    let (http, grpc) = crate::listening(&mut master)?;
    let _master = Proc(master);
    let mut worker = Command::new(bin.join("rbb-worker"));
    worker.args(["--name", "w", "--token", "t", "--max-steps", "1"]).arg("--workdir").arg(dir.join("work"));
    match tls {
        Some((ca, _, _)) => worker.args(["--master", &format!("https://{grpc}")]).arg("--ca-file").arg(ca),
        None => worker.args(["--master", &format!("http://{grpc}")]),
    };
    let _worker = Proc(worker.env("RBB_LOG", "warn").stderr(Stdio::null()).spawn().context("starting rbb-worker")?);
    let client = Client { http, tls: tls.map(|(ca, _, _)| client_config(ca)).transpose()? };
    let t = Instant::now();
    while client.get("/api/v2/workers")?["workers"][0]["connected"] != true {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the worker did not connect");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The first builds clone the checkout: warm-up.
    client.finished(client.force("stamp")?)?;
    client.finished(client.force("big")?)?;
    let mut big = Vec::new();
    for _ in 0..5 {
        let b = client.finished(client.force("big")?)?;
        let s = &b["steps"][0];
        let logged = s["log_bytes"].as_u64().unwrap_or(0);
        if logged < 52_500_000 {
            bail!("the bench stopped: build {}: the step's log holds {logged} bytes, not 50 MiB", b["id"]);
        }
        match (s["started_at"].as_u64(), s["finished_at"].as_u64()) {
            (Some(a), Some(z)) if z >= a => big.push((z - a) as f64),
            _ => bail!("no start and finish time in {s}"),
        }
    }
    let mut lat = Vec::new();
    for _ in 0..9 {
        let _ = std::fs::remove_file(marker);
        let before = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        client.finished(client.force("stamp")?)?;
        let stamp: u128 = std::fs::read_to_string(marker)?.trim().parse().context("stamp")?;
        lat.push(stamp.saturating_sub(before) as f64 / 1e6);
    }
    Ok((median(big), median(lat)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(root: &Path, bin: &Path, work: &Path) -> Result<()> {
    let marker = work.join("started-at");
    let line: String = "rbb bench log line: the quick brown fox jumps over the lazy dog 0123456789 "
        .chars()
        .cycle()
        .take(104)
        .collect();
    let pipeline = format!(
        "builders:\n  big:\n    steps:\n      - run: \"yes '{line}' | head -n 500000\"\n  stamp:\n    steps:\n      - run: date +%s%N > {}\n",
        marker.display()
    );
    let src = work.join("repo-src");
    std::fs::create_dir_all(src.join(".rbb"))?;
    std::fs::write(src.join(".rbb/pipeline.yaml"), pipeline)?;
    let (ca, cert, key) = certificates(work)?;
    let profile = bin.file_name().and_then(|n| n.to_str()).unwrap_or("?");
    println!("TLS against plain text: {profile} rbb master + one rbb-worker on loopback, medians");
    let mut figures = Vec::new();
    for (name, tls) in [("plain", None), ("tls", Some((ca.as_path(), cert.as_path(), key.as_path())))] {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir)?;
        make_repo_from(root, &src, &dir.join("repo"))?;
        figures.push(measure(bin, &dir, tls, &marker)?);
    }
    let ((big_plain, lat_plain), (big_tls, lat_tls)) = (figures[0], figures[1]);
    println!(
        "  step writing 500,000 lines (50 MiB)  plain {big_plain:>7.0} ms   TLS {big_tls:>7.0} ms   {:.2}×",
        big_tls / big_plain.max(0.001)
    );
    println!(
        "  trigger → first instruction          plain {lat_plain:>7.2} ms   TLS {lat_tls:>7.2} ms   {:.2}×  (HTTPS force, lease over gRPC/TLS)",
        lat_tls / lat_plain.max(0.001)
    );
    Ok(())
}
