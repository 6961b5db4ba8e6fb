//! The Docker executor against the real engine of this machine, with the images built from
//! scratch by `testdata/docker/build-images.sh` (no registry).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rbb_schema::proto::StepResult;
use rbb_worker::docker::LABEL_WORKER;
use rbb_worker::{ContainerOptions, DockerExecutor, Executor, NativeExecutor, Output, StepOutcome, StepSpec};
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
