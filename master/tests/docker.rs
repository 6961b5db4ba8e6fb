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
    assert!(workers["workers"][0].get("image_platform").is_none(), "no engine, no image platform: {workers:#}");
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

/// Ids of the networks labelled with `worker`'s name.
fn networks_of(worker: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["network", "ls", "-q", "--filter", &format!("label=rbb.worker={worker}")])
        .output()
        .expect("docker network ls");
    assert!(out.status.success(), "docker network ls: {out:?}");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

fn nothing_left(name: &str) {
    wait_for(Duration::from_secs(20), "no container or network left on the engine", || {
        (containers_of(name).is_empty() && networks_of(name).is_empty()).then_some(())
    });
}

const SERVICES: &str = r#"
builders:
  web:
    image: rbb-test/busybox:1
    services:
      - name: web
        image: rbb-test/service:1
        health: { command: "wget -q -O /dev/null http://localhost:8080/", interval: 200ms, retries: 20 }
    steps:
      - name: fetch
        run: wget -q -O- http://web:8080/
      - name: own-container
        image: rbb-test/busybox:1
        run: wget -q -O /dev/null http://web:8080/ && echo reached
  broken:
    image: rbb-test/busybox:1
    services:
      - name: db
        image: rbb-test/service:1
        command: echo starting the database; echo cannot bind 5432 >&2; sleep 600
        health: { command: "test -e /tmp/ready", interval: 200ms, retries: 3, timeout: 1s }
    steps:
      - name: test
        run: echo never runs
  failing:
    image: rbb-test/busybox:1
    services:
      - { name: web, image: rbb-test/service:1 }
    steps:
      - run: wget -q -O- http://web:8080/ && exit 4
  hold:
    image: rbb-test/busybox:1
    services:
      - { name: web, image: rbb-test/service:1 }
    steps:
      - run: echo "$((6 * 7)) started"; sleep 300
"#;

#[test]
fn services_are_reached_by_name_and_removed_with_the_build() {
    let s = setup("dock-services", SERVICES);
    let m = &s.master;
    let b = m.finished(m.force("app/web"), T);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    let fetch = log_of(m, &b, "fetch");
    assert!(fetch.contains("service web: image rbb-test/service:1, healthy after "), "{fetch}");
    assert!(fetch.contains("\nok\n"), "the step read the service's page: {fetch}");
    assert!(log_of(m, &b, "own-container").contains("reached"));
    nothing_left(s.name);

    let b = m.finished(m.force("app/broken"), T);
    assert_eq!(b["result"], "FAILURE", "{b:#}");
    let reason = step(&b, "test")["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.starts_with("service db never became healthy: `test -e /tmp/ready` failed 3 times"), "{reason}");
    let log = log_of(m, &b, "test");
    assert!(log.contains("service db | cannot bind 5432"), "the service's last output: {log}");
    assert_eq!(log.matches("never runs").count(), 1, "only the command's header line: {log}");
    nothing_left(s.name);

    let b = m.finished(m.force("app/failing"), T);
    assert_eq!((&b["result"], &b["steps"][0]["exit_code"]), (&"FAILURE".into(), &4.into()), "{b:#}");
    nothing_left(s.name);
}

#[test]
fn services_go_after_a_stop_and_after_a_killed_worker() {
    let mut s = setup("dock-services-kill", SERVICES);
    let id = s.master.force("app/hold");
    let log = wait_for(T, "the step to run", || s.master.build(id)["steps"][0]["log_id"].as_u64());
    wait_for(T, "the running step's output", || {
        s.master.get(&format!("/api/v2/logs/{log}/raw")).text().contains("42 started").then_some(())
    });
    assert_eq!(containers_of(s.name).len(), 2, "the service and the build's container");
    assert_eq!(networks_of(s.name).len(), 1, "the build's network");
    s.worker.kill9();
    assert_eq!(containers_of(s.name).len(), 2, "a killed worker leaves them behind");
    s.worker = docker_worker(&s.master, s.name, &s.dir);
    wait_for(T, "the restarted worker's sweep", || {
        s.worker.log_text().contains("removed Docker objects left by an earlier run").then_some(())
    });
    let retry = wait_for(T, "the retry build", || {
        builds(&s.master).into_iter().find(|b| b["reason"] == format!("retry of build {id}"))?["id"].as_u64()
    });
    let log = wait_for(T, "the retry's step to run", || s.master.build(retry)["steps"][0]["log_id"].as_u64());
    wait_for(T, "the retry's output", || {
        s.master.get(&format!("/api/v2/logs/{log}/raw")).text().contains("42 started").then_some(())
    });
    assert_eq!(s.master.post(&format!("/api/v2/builds/{retry}/stop"), "").status, 202);
    assert_eq!(s.master.finished(retry, T)["result"], "CANCELLED");
    nothing_left(s.name);
}

/// A `--docker` worker with more environment (its flags' variables).
fn docker_worker_with(master: &Master, name: &str, dir: &tempfile::TempDir, env: &[(&str, &str)]) -> Worker {
    let mut all = vec![("RBB_WORKER_DOCKER", "true")];
    all.extend_from_slice(env);
    Worker::start(master, name, "t", &dir.path().join(name), &all)
}

#[test]
fn mounts_need_a_worker_that_allows_them() {
    images();
    let dir = tempfile::tempdir().expect("tempdir");
    let host = dir.path().join("host");
    std::fs::create_dir_all(host.join("shared")).expect("mkdir");
    std::fs::create_dir_all(host.join("secret")).expect("mkdir");
    std::fs::write(host.join("shared/data.txt"), "shared data\n").expect("write");
    std::fs::write(host.join("secret/key"), "secret\n").expect("write");
    std::os::unix::fs::symlink(host.join("secret"), host.join("shared/link")).expect("symlink");
    let shared = host.join("shared").canonicalize().expect("canonical");
    let shared = shared.display();
    let pipeline = format!(
        r#"
builders:
  read:
    image: rbb-test/busybox:1
    mounts: [{{ source: {shared}, target: /data }}]
    steps:
      - run: cat /data/data.txt; touch /data/new 2>/dev/null || echo read-only
  sneaky:
    image: rbb-test/busybox:1
    steps:
      - run: cat /data/key
        mounts: [{{ source: {shared}/link, target: /data }}]
"#
    );
    make_repo(&dir.path().join("app"), &pipeline, &[("README.md", "readme\n")]);
    let config = write_config(dir.path(), &["app"], &[("dock-nomount", "t", &[]), ("dock-mount", "t", &[])]);
    let m = Master::start(&config, &dir.path().join("state"));
    let _plain = docker_worker(&m, "dock-nomount", &dir);
    wait_for(T, "the worker to connect", || {
        let j = m.get("/api/v2/workers").json();
        j["workers"].as_array()?.iter().any(|w| w["name"] == "dock-nomount" && w["connected"] == true).then_some(())
    });
    let id = m.force("app/read");
    let waiting = wait_for(T, "the build's waiting reason", || {
        m.build(id)["waiting"].as_str().filter(|w| w.contains("mount")).map(str::to_owned)
    });
    assert_eq!(
        waiting,
        format!(
            "no connected worker allows mounting {shared} (a worker allows it with `rbb-worker --allow-mount PATH`)"
        )
    );
    let allowed = host.join("shared").display().to_string();
    let _w = docker_worker_with(&m, "dock-mount", &dir, &[("RBB_WORKER_ALLOW_MOUNTS", &allowed)]);
    let b = m.finished(id, T);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    assert_eq!(b["worker"], "dock-mount", "{b:#}");
    let log = log_of(&m, &b, "step-1");
    assert!(log.contains("shared data\nread-only\n"), "{log}");
    let workers = m.get("/api/v2/workers").json();
    let w = workers["workers"].as_array().expect("workers").iter().find(|w| w["name"] == "dock-mount").cloned();
    assert_eq!(w.as_ref().map(|w| w["allowed_mounts"].clone()), Some(serde_json::json!([shared.to_string()])));

    // Lexically under the allowed path, but a symlink out of it: the worker refuses.
    let b = m.finished(m.force("app/sneaky"), T);
    assert_eq!(b["result"], "FAILURE", "{b:#}");
    let reason = b["steps"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&format!("does not allow mounting {shared}/link (it resolves to ")), "{reason}");
    assert!(!log_of(&m, &b, "step-1").contains("secret\n"));
    nothing_left("dock-mount");
}

#[test]
fn platforms_are_matched_and_an_unreachable_registry_is_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let registry = format!("127.0.0.1:{port}");
    images();
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = r#"
builders:
  arm:
    image: rbb-test/busybox:1
    platform: linux/s390x
    steps: [{ run: "true" }]
  pull:
    image: rbb-test/absent:1
    steps: [{ run: "true" }]
"#;
    make_repo(&dir.path().join("app"), pipeline, &[("README.md", "readme\n")]);
    let config = write_config(dir.path(), &["app"], &[("dock-platform", "t", &[])]);
    let m = Master::start(&config, &dir.path().join("state"));
    let _w = docker_worker_with(&m, "dock-platform", &dir, &[("RBB_WORKER_REGISTRY", &registry)]);
    let workers = wait_for(T, "the worker to connect", || {
        let j = m.get("/api/v2/workers").json();
        (j["workers"][0]["connected"] == true).then_some(j)
    });
    let platform = workers["workers"][0]["image_platform"].as_str().unwrap_or_default().to_owned();
    assert!(platform.starts_with("linux/") && platform != "linux/s390x", "{workers:#}");

    let id = m.force("app/arm");
    let waiting = wait_for(T, "the build's waiting reason", || m.build(id)["waiting"].as_str().map(str::to_owned));
    assert_eq!(waiting, "no connected worker runs linux/s390x images");

    let b = m.finished(m.force("app/pull"), T);
    assert_eq!(b["steps"][0]["result"], "EXCEPTION", "{b:#}");
    let reason = b["steps"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("cannot pull image `rbb-test/absent:1` from registry {registry}: ")),
        "{reason}"
    );
    assert!(log_of(&m, &b, "step-1").contains(&format!("pulling image `rbb-test/absent:1` from registry {registry}")));
    assert_eq!(m.post(&format!("/api/v2/builds/{id}/stop"), "").status, 202);
    nothing_left("dock-platform");
}
