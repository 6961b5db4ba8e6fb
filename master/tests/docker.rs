//! End to end on the real Docker engine: the real `rbb master` and `rbb-worker --docker`, the
//! images built from scratch by `testdata/docker/build-images.sh` (no registry). Every test
//! checks that nothing labelled with its worker's name is left on the engine.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(90);

/// Builds the test images if missing; fails loudly when this machine has no engine.
fn images() {
    let script = root().join("testdata/docker/build-images.sh");
    let out = Command::new("sh").arg(&script).output().expect("run build-images.sh");
    assert!(
        out.status.success(),
        "these tests need the Docker engine and the test images; {} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Ids of the containers labelled with `worker`'s name, running or not.
fn containers_of(worker: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=rbb.worker={worker}")])
        .output()
        .expect("docker ps");
    assert!(out.status.success(), "docker ps: {out:?}");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

struct Setup {
    dir: tempfile::TempDir,
    master: Master,
    worker: Worker,
    name: &'static str,
}

/// A master watching one repository with `pipeline`, and one `--docker` worker named `name`.
fn setup(name: &'static str, pipeline: &str) -> Setup {
    images();
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), pipeline, &[("README.md", "the app readme\n")]);
    let config = write_config(dir.path(), &["app"], &[(name, "t", &[])]);
    let master = Master::start(&config, &dir.path().join("state"));
    let worker = docker_worker(&master, name, &dir);
    Setup { dir, master, worker, name }
}

fn docker_worker(master: &Master, name: &str, dir: &tempfile::TempDir) -> Worker {
    Worker::start(master, name, "t", &dir.path().join(name), &[("RBB_WORKER_DOCKER", "true")])
}

fn step<'a>(build: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    build["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {build:#}"))
}

fn log_of(m: &Master, build: &serde_json::Value, name: &str) -> String {
    let id = step(build, name)["log_id"].as_u64().expect("log id");
    m.get(&format!("/api/v2/logs/{id}/raw")).text()
}

fn no_leftovers(s: &Setup) {
    wait_for(Duration::from_secs(20), "no container left on the engine", || {
        containers_of(s.name).is_empty().then_some(())
    });
}

const CODES: &str = r#"
builders:
  box:
    image: rbb-test/busybox:1
    env:
      GREETING: hello
    steps:
      - name: write
        run: echo "$GREETING from $(pwd) as $(id -u)"; cat README.md; echo kept > /tmp/state; mkdir -p out; echo made > out/file
      - name: read
        run: cat /tmp/state
      - name: fails
        run: echo about to fail >&2; exit 1
        halt_on_failure: false
      - name: missing-command
        run: no-such-command
        halt_on_failure: false
      - name: out-of-memory
        image: rbb-test/busybox:1
        memory: 16m
        run: x=$(head -c 200000000 /dev/zero | tr '\0' a); echo ${#x}
        halt_on_failure: false
      - name: own-container
        image: rbb-test/service:1
        workdir: out
        run: cat file; test ! -e /tmp/state
"#;

#[test]
fn steps_run_in_containers_with_the_right_results() {
    let s = setup("dock-codes", CODES);
    let m = &s.master;
    let id = m.force("app/box");
    let b = m.finished(id, T);
    let results: Vec<(&str, &str, Option<i64>)> = b["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| (s["name"].as_str().expect("name"), s["result"].as_str().expect("result"), s["exit_code"].as_i64()))
        .collect();
    assert_eq!(
        results,
        [
            ("write", "SUCCESS", Some(0)),
            ("read", "SUCCESS", Some(0)),
            ("fails", "FAILURE", Some(1)),
            ("missing-command", "FAILURE", Some(127)),
            ("out-of-memory", "FAILURE", Some(137)),
            ("own-container", "SUCCESS", Some(0)),
        ],
        "{b:#}"
    );
    let uid = getuid();
    let write = log_of(m, &b, "write");
    assert!(write.contains(&format!("hello from /workspace as {uid}")), "{write}");
    assert!(write.contains("the app readme"), "{write}");
    assert!(log_of(m, &b, "read").contains("kept"), "step 2 reads what step 1 left in the build's container");
    assert!(log_of(m, &b, "fails").contains("about to fail"));
    assert!(step(&b, "out-of-memory")["reason"].as_str().unwrap_or_default().contains("out of memory"), "{b:#}");
    assert!(log_of(m, &b, "own-container").contains("made"));
    let digest = step(&b, "own-container")["image_digest"].as_str().unwrap_or_default().to_owned();
    assert!(digest.starts_with("sha256:"), "the image's digest is recorded on the step: {b:#}");
    no_leftovers(&s);
    // What the steps made in the checkout is the worker's to remove.
    let checkout = std::fs::read_dir(s.dir.path().join(s.name))
        .expect("work dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join("out/file").exists())
        .expect("the checkout with out/file");
    std::fs::remove_dir_all(checkout.join("out")).expect("the worker removes what a container made");
}

const SLOW: &str = r#"
builders:
  timeout:
    steps:
      - image: rbb-test/busybox:1
        run: echo "$((6 * 7)) started"; sleep 120
        timeout: 2s
  stop:
    image: rbb-test/busybox:1
    steps:
      - run: echo "$((6 * 7)) started"; sleep 120
  missing:
    steps:
      - image: rbb-test/no-such-image:0
        run: "true"
"#;

#[test]
fn timeout_stop_and_a_missing_image() {
    let s = setup("dock-slow", SLOW);
    let m = &s.master;

    let started = Instant::now();
    let b = m.finished(m.force("app/timeout"), T);
    assert_eq!(b["steps"][0]["result"], "FAILURE", "{b:#}");
    assert_eq!(b["steps"][0]["reason"], "timed out after 2s", "{b:#}");
    assert!(started.elapsed() < Duration::from_secs(60), "the timeout ended the step in {:?}", started.elapsed());

    let id = m.force("app/stop");
    let log = wait_for(T, "the step to run", || m.build(id)["steps"][0]["log_id"].as_u64());
    wait_for(T, "the running step's output", || {
        m.get(&format!("/api/v2/logs/{log}/raw")).text().contains("42 started").then_some(())
    });
    assert_eq!(containers_of(s.name).len(), 1, "the step runs in one labelled container");
    let stopped = Instant::now();
    assert_eq!(m.post(&format!("/api/v2/builds/{id}/stop"), "").status, 202);
    let b = m.finished(id, Duration::from_secs(30));
    assert_eq!(b["result"], "CANCELLED", "{b:#}");
    assert!(stopped.elapsed() < Duration::from_secs(20), "stop took {:?}", stopped.elapsed());

    let b = m.finished(m.force("app/missing"), T);
    assert_eq!(b["steps"][0]["result"], "EXCEPTION", "{b:#}");
    let reason = b["steps"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("rbb-test/no-such-image:0"), "the reason names the image: {reason}");
    no_leftovers(&s);
}

const LONG: &str = r#"
builders:
  long:
    image: rbb-test/busybox:1
    steps:
      - run: echo "$((6 * 7)) started"; sleep 300
"#;

#[test]
fn a_restarted_worker_sweeps_what_its_killed_run_left() {
    let mut s = setup("dock-crash", LONG);
    let id = s.master.force("app/long");
    let log = wait_for(T, "the step to run", || s.master.build(id)["steps"][0]["log_id"].as_u64());
    wait_for(T, "the running step's output", || {
        s.master.get(&format!("/api/v2/logs/{log}/raw")).text().contains("42 started").then_some(())
    });
    s.worker.kill9();
    assert_eq!(containers_of(s.name).len(), 1, "a killed worker leaves its container behind");
    s.worker = docker_worker(&s.master, s.name, &s.dir);
    wait_for(T, "the restarted worker's sweep", || {
        s.worker.log_text().contains("removed Docker objects left by an earlier run").then_some(())
    });
    // The lost build is retried on the restarted worker: stop that one the normal way.
    let retry = wait_for(T, "the retry build", || {
        builds(&s.master).into_iter().find(|b| b["reason"] == format!("retry of build {id}"))?["id"].as_u64()
    });
    wait_for(T, "the retry's step to run", || (s.master.build(retry)["steps"][0]["state"] == "running").then_some(()));
    assert_eq!(s.master.post(&format!("/api/v2/builds/{retry}/stop"), "").status, 202);
    assert_eq!(s.master.finished(retry, T)["result"], "CANCELLED");
    no_leftovers(&s);
}

#[test]
fn a_worker_without_an_engine_offers_no_docker_label() {
    images();
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), LONG, &[("README.md", "readme\n")]);
    let config = write_config(dir.path(), &["app"], &[("dock-none", "t", &[])]);
    let m = Master::start(&config, &dir.path().join("state"));
    let w = Worker::start(
        &m,
        "dock-none",
        "t",
        &dir.path().join("w"),
        &[("RBB_WORKER_DOCKER", "true"), ("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    wait_for(T, "the worker to say there is no engine", || {
        w.log_text().contains("no Docker engine answers").then_some(())
    });
    let workers = wait_for(T, "the worker to connect", || {
        let j = m.get("/api/v2/workers").json();
        (j["workers"][0]["connected"] == true).then_some(j)
    });
    let labels = workers["workers"][0]["labels"].as_array().cloned().unwrap_or_default();
    assert!(!labels.iter().any(|l| l == "docker"), "{workers:#}");
}

unsafe extern "C" {
    safe fn getuid() -> u32;
}

/// The step cache with images: container steps (in the build's container and in one of their
/// own) are reused with their outputs; the worker reports the image's digest for the key.
#[test]
fn container_steps_are_reused_with_their_outputs() {
    let s = setup(
        "dock-cache",
        r#"
builders:
  box:
    image: rbb-test/busybox:1
    steps:
      - name: make
        run: mkdir -p out && cat README.md > out/made.txt
        inputs: [README.md]
        outputs: [out/made.txt]
      - name: other-image
        image: rbb-test/service:1
        run: mkdir -p out && echo other > out/other.txt
        inputs: [README.md]
        outputs: [out/other.txt]
      - name: show
        run: cat out/made.txt out/other.txt
        cache: false
"#,
    );
    let m = &s.master;
    let first = m.finished(m.force("app/box"), T);
    assert_eq!(first["result"], "SUCCESS", "{first:#}");
    let digest = step(&first, "make")["image_digest"].as_str().expect("image digest").to_owned();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let second = m.finished(m.force("app/box"), T);
    assert_eq!(step(&second, "make")["result"], "CACHED", "{second:#}");
    assert_eq!(step(&second, "other-image")["result"], "CACHED", "{second:#}");
    let shown = log_of(m, &second, "show");
    assert!(shown.contains("the app readme\nother"), "restored outputs: {shown}");
    no_leftovers(&s);
}

/// A step that fails halts its build: the build's container goes when the build ends, although
/// the step that would have been its last in the container never comes.
#[test]
fn a_halted_build_leaves_no_container() {
    let s = setup(
        "dock-halt",
        r#"
builders:
  box:
    image: rbb-test/busybox:1
    steps:
      - name: fails
        run: exit 3
      - name: never
        run: echo never
"#,
    );
    let m = &s.master;
    let b = m.finished(m.force("app/box"), T);
    assert_eq!(b["result"], "FAILURE", "{b:#}");
    assert_eq!(step(&b, "never")["result"], "SKIPPED", "{b:#}");
    no_leftovers(&s);
}
