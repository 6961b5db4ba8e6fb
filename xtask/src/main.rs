//! `cargo xtask`: the project's automation, as a Rust program so it runs the same everywhere.
//!
//! - `serve`: build and run the demo: a master, one native worker, the demo repositories.
//! - `test`: run every test of the workspace (what CI runs).
//! - `bench`: print performance figures with a baseline measured in the same run;
//!   `bench scale`: the master with a large history and a simulated fleet of workers;
//!   `bench log`: the 50 MiB step log without and with a secret masked by the worker;
//!   `bench key`: resolving a step's inputs from git for its full cache key;
//!   `bench forge`: push webhook to commit status, and a mirror's incremental fetch;
//!   `bench tls [--debug]`: TLS against plain text (50 MiB log, trigger → first instruction).
//! - `soak`: a chaos soak of the real binaries (killed workers and masters), judged at the end.
//! - `codegen`: rewrite generated files (the JSON Schemas under schema/).
//!
//! It only orchestrates: it spawns cargo and the project's binaries and holds no product logic.

mod bench;
mod cache_bench;
mod docker_bench;
mod forge_bench;
mod key_bench;
mod postgres;
mod repos_bench;
mod runs;
mod scale;
mod soak;
mod tls_bench;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = root();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&root, &args[1..]),
        Some("test") => test(&root, &args[1..]),
        Some("bench") => bench::main(&root, &args[1..]),
        Some("soak") => soak::main(&root, &args[1..]),
        Some("codegen") => codegen(&root),
        _ => {
            eprintln!("usage: cargo xtask <serve|test|bench|soak|codegen> [args]");
            eprintln!("  serve    run the demo: master + local worker + git repositories [HTTP_ADDR]");
            eprintln!("  test     run every test (cargo nextest if installed, else cargo test)");
            eprintln!("  bench    print compile, snippet and build-running figures (release build)");
            eprintln!("  bench log    the 50 MiB step log without and with a secret to mask");
            eprintln!("  bench key    resolve 50 inputs of a step's full cache key in a 10,000-file repository");
            eprintln!(
                "  bench forge  push webhook → commit status at a local forge; one new commit into a 10,000-commit mirror"
            );
            eprintln!(
                "  bench tls    TLS against plain text: the 50 MiB log and trigger → first instruction [--debug]"
            );
            eprintln!(
                "  bench scale  history of N builds + simulated fleet [--builds N] [--fleet-builds N] [--workers N] [--slots N] [--queue N] [--requests N] [--reuse]"
            );
            eprintln!("  soak     chaos soak: 4 workers, N builds, killed workers and masters [--builds N] [--seed S]");
            eprintln!("  codegen  rewrite schema/*.schema.json from the Rust types");
            bail!("unknown or missing command");
        }
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Where cargo puts binaries for `profile`.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

/// Makes a git repository at `dest` from the files in `src` (fixture script, fixed dates).
pub(crate) fn make_repo_from(root: &Path, src: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        std::fs::remove_dir_all(dest)?;
    }
    run(Command::new("sh")
        .arg(root.join("testdata/fixtures/mkrepo.sh"))
        .arg(src)
        .arg(dest)
        .stdout(std::process::Stdio::null()))
}

/// Makes the demo repositories (real git, via the fixture script) under `dir`.
pub(crate) fn make_demo(root: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("repos"))?;
    std::fs::copy(root.join("testdata/demo/rbb.yaml"), dir.join("rbb.yaml"))?;
    for repo in ["lib", "app", "docs"] {
        run(Command::new("sh")
            .arg(root.join("testdata/fixtures/mkrepo.sh"))
            .arg(root.join("testdata/repos").join(repo))
            .arg(dir.join("repos").join(repo))
            .stdout(std::process::Stdio::null()))?;
    }
    Ok(())
}

/// Adds the `containers` repository to the demo: one builder whose step runs in the busybox
/// test image (built from scratch by testdata/docker/build-images.sh).
fn docker_demo(root: &Path, demo: &Path) -> Result<()> {
    docker_bench::images(root)?;
    let src = demo.join("containers-src");
    std::fs::create_dir_all(src.join(".rbb"))?;
    std::fs::write(
        src.join(".rbb/pipeline.yaml"),
        "builders:\n  hello:\n    image: rbb-test/busybox:1\n    steps:\n      - name: in-a-container\n        run: echo \"hello from $(uname -s) in a container, in $(pwd)\"; ls\n",
    )?;
    std::fs::write(src.join("README.md"), "a repository built in a container\n")?;
    make_repo_from(root, &src, &demo.join("repos/containers"))?;
    let config = demo.join("rbb.yaml");
    let text = std::fs::read_to_string(&config)?;
    let text = text.replacen("repositories:\n", "repositories:\n  - url: repos/containers\n    poll_interval: 2s\n", 1);
    std::fs::write(&config, text)?;
    Ok(())
}

fn serve(root: &Path, args: &[String]) -> Result<()> {
    let http_addr = args.first().cloned().unwrap_or_else(|| "127.0.0.1:8010".to_owned());
    let demo = root.join(".rbb-state/demo");
    make_demo(root, &demo)?;
    let docker = docker_bench::engine_answers() && docker_demo(root, &demo).is_ok();
    build_like_test(root)?;
    let bin = target_dir(root).join("debug");
    let mut master = Command::new(bin.join("rbb"))
        .args(["master", "--grpc", "127.0.0.1:0", "--http", &http_addr])
        .arg("--config")
        .arg(demo.join("rbb.yaml"))
        .arg("--state-dir")
        .arg(demo.join("state"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting rbb master")?;
    let (http, grpc) = listening(&mut master)?;
    let mut worker = Command::new(bin.join("rbb-worker"))
        .args([
            "--master",
            &format!("http://{grpc}"),
            "--name",
            "local",
            "--token",
            "demo-token",
            "--labels",
            "linux",
            "--max-steps",
            "2",
        ])
        .args(docker.then_some("--docker"))
        .arg("--workdir")
        .arg(demo.join("work"))
        .spawn()
        .context("starting rbb-worker")?;
    // The demo's first build: app/package needs every app/test combination, which need
    // lib/build in the other repository.
    let forced = http_post(&http, "/api/v2/builders/app%2Fpackage/force", "{}")?;
    println!();
    println!("rbb is running the demo: master, one native worker, three git repositories.");
    println!("  builds:   http://{http}/api/v2/builds");
    println!("  builders: http://{http}/api/v2/builders");
    println!("  workers:  http://{http}/api/v2/workers");
    println!("  UI:       http://{http}/  (API token for the buttons: {DEMO_TOKEN})");
    println!(
        "  force:    curl -X POST -H 'Authorization: Bearer {DEMO_TOKEN}' http://{http}/api/v2/builders/lib%2Fbuild/force"
    );
    println!("  forced app/package: {forced}");
    if docker {
        let forced = http_post(&http, "/api/v2/builders/containers%2Fhello/force", "{}")?;
        println!("  Docker:   the worker runs steps with an image; forced containers/hello: {forced}");
    } else {
        println!("  Docker:   no engine answers here (or its test images cannot be built): no container steps");
    }
    println!("Ctrl-C stops it. State: {}", demo.join("state").display());
    let status = master.wait()?;
    let _ = worker.kill();
    let _ = worker.wait();
    if !status.success() {
        bail!("rbb master exited with {status}");
    }
    Ok(())
}

/// Reads the master's "listening" line: (http address, grpc address).
pub(crate) fn listening(master: &mut std::process::Child) -> Result<(String, String)> {
    use std::io::BufRead;
    let stdout = master.stdout.take().context("master stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line?;
        if line.starts_with("rbb master listening:") {
            let get = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(|a| a.trim_start_matches("http://").trim_start_matches("https://").to_owned())
                    .context("malformed listening line")
            };
            let addrs = (get("http=")?, get("grpc=")?);
            // Keep draining the master's stdout so it never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return Ok(addrs);
        }
    }
    bail!("rbb master exited before listening")
}

/// The demo's `api_token` (testdata/demo/rbb.yaml), sent with the demo's requests.
const DEMO_TOKEN: &str = "demo-api-token";

/// A one-shot HTTP/1.1 POST on loopback to the demo master, with its token; returns the
/// response body.
pub(crate) fn http_post(addr: &str, path: &str, body: &str) -> Result<String> {
    http_call(addr, "POST", path, body, Some(DEMO_TOKEN))
}

/// A one-shot HTTP/1.1 request on loopback without a token (the benches' masters declare
/// none, so every action is open; a token they do not know would be refused).
pub(crate) fn http_request(addr: &str, method: &str, path: &str, body: &str) -> Result<String> {
    http_call(addr, method, path, body, None)
}

fn http_call(addr: &str, method: &str, path: &str, body: &str, token: Option<&str>) -> Result<String> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().with_context(|| format!("bad address {addr}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, std::time::Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    // A master that stopped answering must not hang xtask.
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    s.set_write_timeout(Some(std::time::Duration::from_secs(60)))?;
    // One write, sent at once: a request written in pieces waits for the server's delayed
    // ACK (40 ms) between them, which a latency figure would count.
    s.set_nodelay(true)?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default(),
        body.len()
    );
    s.write_all(request.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, rest) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    if !head.starts_with("HTTP/1.1 2") {
        bail!("{method} {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(rest.to_owned())
}

/// Builds the binaries exactly as `cargo xtask test` does (`cargo test --workspace`), so the two
/// share every artefact: a plain `cargo build -p rbb-master` resolves other features (the tests'
/// dev-dependencies turn on features of shared crates such as `syn` and `getrandom`), which
/// rebuilds most dependencies when switching between the two. cargo's own progress is shown:
/// a cold build takes minutes.
fn build_like_test(root: &Path) -> Result<()> {
    eprintln!("building rbb (the same build as `cargo xtask test`, so the two share artefacts)…");
    run(cargo().current_dir(root).args(TEST_BUILD).arg("--no-run"))
}

/// The cargo command whose build `test` runs and `serve` reuses (nextest builds the same way).
const TEST_BUILD: &[&str] = &["test", "--workspace"];

fn test(root: &Path, args: &[String]) -> Result<()> {
    // Formatting is part of the checks (rustfmt.toml); rustfmt ships with the toolchain.
    run(cargo().current_dir(root).args(["fmt", "--all", "--check"]))?;
    // The PostgreSQL state's tests need a server: a throwaway cluster unless one is given.
    let _cluster = match std::env::var("RBB_TEST_POSTGRES") {
        Ok(url) => {
            eprintln!("tests: PostgreSQL at RBB_TEST_POSTGRES ({url})");
            None
        }
        Err(_) => {
            let c = postgres::Cluster::start()?;
            eprintln!("tests: a throwaway PostgreSQL cluster at {}", c.url);
            // SAFETY: set before any thread is started; the test processes inherit it.
            unsafe { std::env::set_var("RBB_TEST_POSTGRES", &c.url) };
            Some(c)
        }
    };
    let nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if nextest {
        run(cargo()
            .current_dir(root)
            .args(["nextest", "run", "--workspace", "--no-fail-fast", "--failure-output", "final"])
            .args(args))?;
        // nextest does not run doctests.
        run(cargo().current_dir(root).args(["test", "--workspace", "--doc"]))
    } else {
        run(cargo().current_dir(root).args(TEST_BUILD).arg("--no-fail-fast").args(args))
    }
}

fn codegen(root: &Path) -> Result<()> {
    build_like_test(root)?;
    let rbb = target_dir(root).join("debug/rbb");
    for (file, kind) in [("schema/pipeline.schema.json", "pipeline"), ("schema/config.schema.json", "config")] {
        let out = Command::new(&rbb).args(["schema", kind]).output().context("running rbb schema")?;
        if !out.status.success() {
            bail!("rbb schema {kind} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let path = root.join(file);
        let old = std::fs::read(&path).unwrap_or_default();
        if old != out.stdout {
            std::fs::write(&path, &out.stdout).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {file}");
        } else {
            println!("{file} is up to date");
        }
    }
    Ok(())
}
