//! The Docker executor against the real engine of this machine, with the images built from
//! scratch by `testdata/docker/build-images.sh` (no registry).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rbb_schema::proto::StepResult;
use rbb_worker::docker::{LABEL_WORKER, Registry};
use rbb_worker::{
    ContainerOptions, DockerExecutor, Executor, HealthSpec, MountSpec, NativeExecutor, Output, ServiceSpec,
    StepOutcome, StepSpec,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::init_logs;

pub const BUSYBOX: &str = "rbb-test/busybox:1";

/// Builds the test images if they are missing; panics loudly when there is no engine.
pub fn images() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/docker/build-images.sh");
    let output = Command::new("sh").arg(&script).output().expect("running build-images.sh");
    assert!(
        output.status.success(),
        "these tests need the Docker engine and the test images; {} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Ids of the containers labelled with `worker`'s name, running or not.
pub fn containers_of(worker: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={LABEL_WORKER}={worker}")])
        .output()
        .expect("running docker ps");
    assert!(output.status.success(), "docker ps failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
}

async fn executor(worker: &str) -> DockerExecutor {
    init_logs();
    images();
    DockerExecutor::connect(worker, NativeExecutor::new()).await.expect("the Docker engine answers")
}

fn spec(command: &str, checkout: &Path) -> StepSpec {
    StepSpec {
        command: command.to_owned(),
        env: BTreeMap::new(),
        cwd: checkout.to_owned(),
        timeout: Some(Duration::from_secs(30)),
        image: Some(BUSYBOX.to_owned()),
        container: ContainerOptions { build: 7, checkout: checkout.to_owned(), ..Default::default() },
    }
}

#[derive(Default, Debug)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

async fn run(docker: &DockerExecutor, spec: StepSpec, cancel: CancellationToken) -> (StepOutcome, Collected) {
    let (tx, mut rx) = mpsc::channel::<Output>(4);
    let consumer = tokio::spawn(async move {
        let mut got = Collected::default();
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Output::Stdout(d) => got.stdout.extend_from_slice(&d),
                Output::Stderr(d) => got.stderr.extend_from_slice(&d),
                Output::Header(_) => panic!("the executor writes no headers"),
            }
        }
        got
    });
    let outcome = docker.run(spec, tx, cancel).await;
    (outcome, consumer.await.unwrap())
}

#[tokio::test]
async fn exit_codes_are_results() {
    let worker = "it-docker-exit";
    let docker = executor(worker).await;
    let dir = tempfile::tempdir().unwrap();
    let mut memory = spec("x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}", dir.path());
    memory.container.memory_bytes = 16 * 1024 * 1024;
    let cases = [
        (spec("echo out; echo err >&2", dir.path()), StepResult::Success, 0, ""),
        (spec("exit 1", dir.path()), StepResult::Failure, 1, "exit code 1"),
        (spec("no-such-command", dir.path()), StepResult::Failure, 127, "exit code 127"),
        (spec("sh -c 'kill -9 $$'; exit $?", dir.path()), StepResult::Failure, 137, "exit code 137 (killed)"),
        (memory, StepResult::Failure, 137, "exit code 137 (killed: out of memory)"),
    ];
    for (spec, result, code, reason) in cases {
        let command = spec.command.clone();
        let (outcome, got) = run(&docker, spec, CancellationToken::new()).await;
        assert_eq!(
            (outcome.result, outcome.exit_code, outcome.reason.as_str()),
            (result, Some(code), reason),
            "{command}: {outcome:?} {got:?}"
        );
        assert!(outcome.image_digest.starts_with("sha256:"), "{command}: digest {:?}", outcome.image_digest);
        if code == 0 {
            assert_eq!((got.stdout.as_slice(), got.stderr.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
        }
    }
    assert_eq!(containers_of(worker), Vec::<String>::new(), "step containers are removed");
}

#[tokio::test]
async fn env_workdir_and_file_owner() {
    let worker = "it-docker-env";
    let docker = executor(worker).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let mut s = spec("echo \"$GREETING $(pwd)\"; mkdir made; echo x > made/file", dir.path());
    s.cwd = dir.path().join("sub");
    s.env.insert("GREETING".into(), "hello there".into());
    let (outcome, got) = run(&docker, s, CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Success, "{outcome:?} {got:?}");
    assert_eq!(String::from_utf8_lossy(&got.stdout), "hello there /workspace/sub\n");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    for made in ["sub/made", "sub/made/file"] {
        assert_eq!(std::fs::metadata(dir.path().join(made)).unwrap().uid(), uid, "{made} belongs to the worker's user");
    }
    std::fs::remove_dir_all(dir.path().join("sub/made")).expect("the worker can remove what the step made");
}

#[tokio::test]
async fn a_missing_image_is_named() {
    let docker = executor("it-docker-missing").await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("true", dir.path());
    s.image = Some("rbb-test/no-such-image:0".into());
    let (outcome, _) = run(&docker, s, CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Exception, "{outcome:?}");
    assert!(outcome.reason.contains("rbb-test/no-such-image:0"), "{}", outcome.reason);
}

#[tokio::test]
async fn output_streams_and_cancel_kills_the_container() {
    let worker = "it-docker-cancel";
    let docker = executor(worker).await;
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::channel::<Output>(4);
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let step = docker.run(spec("echo first; sleep 60; echo never", dir.path()), tx, cancel.clone());
    let watcher = async {
        // The first line arrives while the command still runs: output is streamed.
        let first = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap();
        assert_eq!(first, Output::Stdout(b"first\n".to_vec()));
        assert_eq!(containers_of(worker).len(), 1, "the step runs in one labelled container");
        cancel.cancel();
        let mut rest = Vec::new();
        while let Some(chunk) = rx.recv().await {
            rest.extend_from_slice(chunk.data());
        }
        rest
    };
    let (outcome, rest) = tokio::join!(step, watcher);
    assert_eq!(outcome.result, StepResult::Cancelled, "{outcome:?}");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(started.elapsed() < Duration::from_secs(20), "cancel took {:?}", started.elapsed());
    assert_eq!(containers_of(worker), Vec::<String>::new());
}

#[tokio::test]
async fn a_timeout_kills_the_container() {
    let worker = "it-docker-timeout";
    let docker = executor(worker).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("sleep 60", dir.path());
    s.timeout = Some(Duration::from_secs(1));
    let started = Instant::now();
    let (outcome, _) = run(&docker, s, CancellationToken::new()).await;
    assert_eq!((outcome.result, outcome.reason.as_str()), (StepResult::Failure, "timed out after 1s"), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(15), "timeout took {:?}", started.elapsed());
    assert_eq!(containers_of(worker), Vec::<String>::new());
}

#[tokio::test]
async fn a_build_container_is_reused_then_removed() {
    let worker = "it-docker-build";
    let docker = executor(worker).await;
    let dir = tempfile::tempdir().unwrap();
    let step = |command: &str, last: bool| {
        let mut s = spec(command, dir.path());
        s.container.build_container = true;
        s.container.last_in_container = last;
        s
    };
    // /tmp is the container's own: only the same container can read it back.
    let (first, got) = run(&docker, step("echo $$ > /tmp/state; echo one", false), CancellationToken::new()).await;
    assert_eq!(first.result, StepResult::Success, "{first:?} {got:?}");
    assert_eq!(containers_of(worker).len(), 1, "the build's container stays between steps");
    let (failed, _) = run(&docker, step("exit 3", false), CancellationToken::new()).await;
    assert_eq!((failed.result, failed.exit_code), (StepResult::Failure, Some(3)), "{failed:?}");
    let (second, got) =
        run(&docker, step("cat /tmp/state >/dev/null && echo reused", true), CancellationToken::new()).await;
    assert_eq!(second.result, StepResult::Success, "{second:?} {got:?}");
    assert_eq!(String::from_utf8_lossy(&got.stdout), "reused\n");
    assert_eq!(first.image_digest, second.image_digest);
    assert_eq!(containers_of(worker), Vec::<String>::new(), "the last step removes the build's container");
}

#[tokio::test]
async fn sweep_removes_what_an_earlier_run_left() {
    let worker = "it-docker-sweep";
    let docker = executor(worker).await;
    let output = Command::new("docker")
        .args(["run", "-d", "--label", &format!("{LABEL_WORKER}={worker}"), BUSYBOX, "sleep", "600"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let network = Command::new("docker")
        .args(["network", "create", "--label", &format!("{LABEL_WORKER}={worker}"), "rbb-it-docker-sweep"])
        .output()
        .unwrap();
    assert!(network.status.success(), "{network:?}");
    assert_eq!(containers_of(worker).len(), 1);
    assert_eq!(docker.sweep().await.unwrap(), 2);
    assert_eq!(containers_of(worker), Vec::<String>::new());
    let left =
        Command::new("docker").args(["network", "ls", "-q", "--filter", "name=rbb-it-docker-sweep"]).output().unwrap();
    assert!(left.stdout.is_empty(), "the network is removed");
}

#[tokio::test]
async fn the_image_digest_comes_without_running_and_a_skipped_last_step_ends_the_container() {
    let worker = "it-docker-digest";
    let docker = executor(worker).await;
    let dir = tempfile::tempdir().unwrap();
    let digest = docker.image_digest(BUSYBOX).await.expect("the test image is on the engine");
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    assert_eq!(docker.image_digest("").await, Ok(String::new()), "a native step has none");
    let missing = docker.image_digest("rbb-test/not-there:0").await.unwrap_err();
    assert!(missing.contains("is not on this worker's Docker engine"), "{missing}");
    assert_eq!(containers_of(worker), Vec::<String>::new(), "resolving a digest runs nothing");

    let mut step = spec("echo one", dir.path());
    step.container.build_container = true;
    let (outcome, _) = run(&docker, step, CancellationToken::new()).await;
    assert_eq!(outcome.image_digest, digest, "the step ran in the image whose digest the key has");
    assert_eq!(containers_of(worker).len(), 1);
    // The build's last step in it was reused from the cache: the container goes all the same.
    docker.end_build_container(7).await;
    assert_eq!(containers_of(worker), Vec::<String>::new());
    docker.end_build_container(7).await;
}

const SERVICE: &str = "rbb-test/service:1";

/// Ids of the networks labelled with `worker`'s name.
pub fn networks_of(worker: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args(["network", "ls", "-q", "--filter", &format!("label={LABEL_WORKER}={worker}")])
        .output()
        .expect("running docker network ls");
    assert!(output.status.success(), "docker network ls failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
}

/// Runs `spec` and returns its outcome with everything it wrote, headers included.
async fn run_all(docker: &DockerExecutor, spec: StepSpec) -> (StepOutcome, String) {
    let (tx, mut rx) = mpsc::channel::<Output>(4);
    let consumer = tokio::spawn(async move {
        let mut text = Vec::new();
        while let Some(chunk) = rx.recv().await {
            text.extend_from_slice(chunk.data());
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let outcome = docker.run(spec, tx, CancellationToken::new()).await;
    (outcome, consumer.await.unwrap())
}

fn web_service(health: &str) -> ServiceSpec {
    ServiceSpec {
        name: "web".into(),
        image: SERVICE.into(),
        env: BTreeMap::new(),
        command: None,
        health: Some(HealthSpec {
            command: health.into(),
            interval: Duration::from_millis(200),
            retries: 3,
            timeout: Duration::from_secs(2),
        }),
    }
}

#[tokio::test]
async fn a_service_is_reached_by_name_and_goes_with_the_build() {
    let worker = "it-docker-service";
    let docker = executor(worker).await;
    docker.sweep().await.unwrap(); // what a failed earlier run of this test left
    let dir = tempfile::tempdir().unwrap();
    let step = |command: &str| {
        let mut s = spec(command, dir.path());
        s.container.build = 11;
        s.container.build_container = true;
        s.container.services = vec![web_service("wget -q -O /dev/null http://localhost:8080/")];
        s
    };
    let (first, log) = run_all(&docker, step("wget -q -O- http://web:8080/")).await;
    assert_eq!(first.result, StepResult::Success, "{first:?}\n{log}");
    assert!(log.contains("service web: image rbb-test/service:1, healthy after "), "{log}");
    assert!(log.ends_with("ok\n"), "the step read the service's page: {log}");
    assert_eq!(networks_of(worker).len(), 1, "one network for the build");
    assert_eq!(containers_of(worker).len(), 2, "the service and the build's container");
    // The second step finds the services running: no second start.
    let (second, log) = run_all(&docker, step("wget -q -O /dev/null http://web:8080/ && echo again")).await;
    assert_eq!(second.result, StepResult::Success, "{second:?}\n{log}");
    assert!(!log.contains("service web:"), "{log}");
    // A step in a container of its own joins the same network.
    let mut own = step("wget -q -O- http://web:8080/");
    own.container.build_container = false;
    let (third, log) = run_all(&docker, own).await;
    assert_eq!(third.result, StepResult::Success, "{third:?}\n{log}");
    docker.end_build_container(11).await;
    assert_eq!(containers_of(worker), Vec::<String>::new());
    assert_eq!(networks_of(worker), Vec::<String>::new());
}

#[tokio::test]
async fn a_service_that_never_becomes_healthy_fails_the_step_with_its_output() {
    let worker = "it-docker-unhealthy";
    let docker = executor(worker).await;
    docker.sweep().await.unwrap(); // what a failed earlier run of this test left
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("echo never runs", dir.path());
    let mut db = web_service("test -e /tmp/ready");
    db.name = "db".into();
    db.command = Some("echo starting the database; echo cannot bind 5432 >&2; sleep 600".into());
    s.container.services = vec![db];
    let started = Instant::now();
    let (outcome, log) = run_all(&docker, s).await;
    assert_eq!(outcome.result, StepResult::Failure, "{outcome:?}\n{log}");
    assert!(
        outcome.reason.starts_with("service db never became healthy: `test -e /tmp/ready` failed 3 times"),
        "{outcome:?}"
    );
    assert!(log.contains("service db | starting the database"), "{log}");
    assert!(log.contains("service db | cannot bind 5432"), "{log}");
    assert!(!log.contains("never runs"), "{log}");
    assert!(started.elapsed() < Duration::from_secs(30), "bounded: {:?}", started.elapsed());
    assert_eq!(containers_of(worker), Vec::<String>::new(), "a failed start leaves nothing");
    assert_eq!(networks_of(worker), Vec::<String>::new());

    // A service that exits is not waited for.
    let mut s = spec("echo never runs", dir.path());
    let mut gone = web_service("false");
    gone.command = Some("echo bye; exit 3".into());
    s.container.services = vec![gone];
    let (outcome, log) = run_all(&docker, s).await;
    assert_eq!(outcome.result, StepResult::Failure, "{outcome:?}\n{log}");
    assert!(outcome.reason.contains("service web exited with code 3"), "{outcome:?}");
    assert!(log.contains("service web | bye"), "{log}");
    assert_eq!(containers_of(worker), Vec::<String>::new());
    assert_eq!(networks_of(worker), Vec::<String>::new());
}

#[tokio::test]
async fn only_allowed_host_paths_are_mounted_read_only() {
    init_logs();
    images();
    let worker = "it-docker-mounts";
    let host = tempfile::tempdir().unwrap();
    let allowed = host.path().join("allowed");
    let secret = host.path().join("secret");
    std::fs::create_dir_all(allowed.join("data")).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(allowed.join("data/file"), "shared\n").unwrap();
    std::fs::write(secret.join("key"), "secret\n").unwrap();
    std::os::unix::fs::symlink(&secret, allowed.join("link")).unwrap();
    let docker = DockerExecutor::connect(worker, NativeExecutor::new())
        .await
        .expect("the Docker engine answers")
        .allow_mounts(std::slice::from_ref(&allowed))
        .unwrap();
    assert_eq!(docker.allowed_mounts(), [allowed.canonicalize().unwrap().display().to_string()]);
    let missing = DockerExecutor::connect(worker, NativeExecutor::new())
        .await
        .unwrap()
        .allow_mounts(&[host.path().join("nope")])
        .unwrap_err();
    assert!(missing.contains("nope"), "{missing}");
    let dir = tempfile::tempdir().unwrap();
    let with_mount = |command: &str, source: &Path| {
        let mut s = spec(command, dir.path());
        s.container.mounts = vec![MountSpec { source: source.display().to_string(), target: "/data".into() }];
        s
    };
    let (ok, log) = run_all(
        &docker,
        with_mount("cat /data/file; touch /data/x 2>/dev/null || echo read-only", &allowed.join("data")),
    )
    .await;
    assert_eq!(ok.result, StepResult::Success, "{ok:?}\n{log}");
    assert!(log.contains("shared\nread-only\n"), "{log}");
    assert!(!allowed.join("data/x").exists());
    let tricks = [
        (secret.clone(), "does not allow mounting"),
        (allowed.join("../secret"), "does not allow mounting"),
        (allowed.join("link"), "resolves to"),
        (allowed.join("data/../../secret"), "does not allow mounting"),
        (host.path().join("allowed-not"), "cannot mount"),
    ];
    for (source, says) in tricks {
        let (outcome, log) = run_all(&docker, with_mount("cat /data/key", &source)).await;
        assert_eq!(outcome.result, StepResult::Failure, "{source:?}: {outcome:?}\n{log}");
        assert!(outcome.reason.contains(says), "{source:?}: {outcome:?}");
        assert!(!log.contains("secret"), "{source:?}: {log}");
    }
    assert_eq!(containers_of(worker), Vec::<String>::new(), "a refused mount creates nothing");
}

#[tokio::test]
async fn another_platform_is_refused_and_an_unreachable_registry_is_named() {
    let worker = "it-docker-registry";
    let docker = executor(worker).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = docker.image_platform().expect("the engine's platform");
    assert_eq!(engine, docker.platform());
    let mut s = spec("true", dir.path());
    s.container.platform = "linux/s390x".into();
    let (outcome, _) = run_all(&docker, s).await;
    assert_eq!(outcome.result, StepResult::Failure, "{outcome:?}");
    assert_eq!(outcome.reason, format!("this worker's Docker engine runs {engine} images, not linux/s390x"));

    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let host = format!("127.0.0.1:{port}");
    let docker = docker.with_registry(Some(Registry { host: host.clone(), credentials: None }));
    let mut s = spec("true", dir.path());
    s.image = Some("rbb-test/not-here:1".into());
    let (outcome, log) = run_all(&docker, s).await;
    assert_eq!(outcome.result, StepResult::Exception, "{outcome:?}");
    assert!(
        outcome.reason.starts_with(&format!("cannot pull image `rbb-test/not-here:1` from registry {host}: ")),
        "{outcome:?}"
    );
    assert!(log.contains(&format!("pulling image `rbb-test/not-here:1` from registry {host}")), "{log}");
    let mut s = spec("true", dir.path());
    s.image = Some("elsewhere.example:5000/app:1".into());
    let (outcome, _) = run_all(&docker, s).await;
    assert!(
        outcome.reason.contains("names registry elsewhere.example:5000; this worker pulls only from"),
        "{outcome:?}"
    );
    // Images on the engine are never pulled.
    let (outcome, log) = run_all(&docker, spec("true", dir.path())).await;
    assert_eq!(outcome.result, StepResult::Success, "{outcome:?}");
    assert!(!log.contains("pulling"), "{log}");
    assert_eq!(containers_of(worker), Vec::<String>::new());
}
