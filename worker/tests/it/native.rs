//! The native executor against real processes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rbb_schema::proto::StepResult;
use rbb_worker::executor::MAX_CHUNK;
use rbb_worker::{Executor, NativeExecutor, Output, StepOutcome, StepSpec};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{init_logs, process_gone, wait_until};

fn spec(command: &str, cwd: &Path) -> StepSpec {
    StepSpec {
        command: command.to_owned(),
        env: BTreeMap::new(),
        cwd: cwd.to_owned(),
        timeout: Some(Duration::from_secs(20)),
        image: None,
        container: Default::default(),
    }
}

/// Output of one run, split by stream, plus the largest chunk seen.
#[derive(Default)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    chunks: usize,
    largest: usize,
}

/// Runs `spec` while a separate task consumes the output concurrently.
async fn run(spec: StepSpec, cancel: CancellationToken) -> (StepOutcome, Collected) {
    let (tx, mut rx) = mpsc::channel::<Output>(4);
    let consumer = tokio::spawn(async move {
        let mut got = Collected::default();
        while let Some(chunk) = rx.recv().await {
            got.chunks += 1;
            got.largest = got.largest.max(chunk.data().len());
            match chunk {
                Output::Stdout(d) => got.stdout.extend_from_slice(&d),
                Output::Stderr(d) => got.stderr.extend_from_slice(&d),
                Output::Header(_) => panic!("the native executor writes no headers"),
            }
        }
        got
    });
    let outcome = NativeExecutor::new().run(spec, tx, cancel).await;
    (outcome, consumer.await.unwrap())
}

#[tokio::test]
async fn success_keeps_output_in_order() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (outcome, got) =
        run(spec("echo one; echo two >&2; echo three; printf four", dir.path()), CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Success, "{outcome:?}");
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.reason, "");
    assert_eq!(got.stdout, b"one\nthree\nfour");
    assert_eq!(got.stderr, b"two\n");
}

#[tokio::test]
async fn non_zero_exit_is_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, _) = run(spec("echo bye; exit 3", dir.path()), CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Failure);
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.reason, "exit code 3");

    let (outcome, _) = run(spec("kill -9 $$", dir.path()), CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Failure);
    assert_eq!(outcome.exit_code, None);
    assert_eq!(outcome.reason, "killed by signal 9");
}

#[tokio::test]
async fn large_output_arrives_complete_in_bounded_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, got) =
        run(spec("head -c 20000000 /dev/zero; head -c 3000000 /dev/zero >&2", dir.path()), CancellationToken::new())
            .await;
    assert_eq!(outcome.result, StepResult::Success, "{outcome:?}");
    assert_eq!(got.stdout.len(), 20_000_000);
    assert_eq!(got.stderr.len(), 3_000_000);
    assert!(got.stdout.iter().all(|&b| b == 0));
    assert!(got.largest <= MAX_CHUNK, "chunk of {} bytes", got.largest);
    assert!(got.chunks >= 23_000_000 / MAX_CHUNK, "{} chunks", got.chunks);
}

#[tokio::test]
async fn binary_output_is_passed_through_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, got) = run(
        spec("head -c 1000000 /dev/urandom > garbage.bin && cat garbage.bin", dir.path()),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome.result, StepResult::Success, "{outcome:?}");
    let expected = std::fs::read(dir.path().join("garbage.bin")).unwrap();
    assert_eq!(expected.len(), 1_000_000);
    assert!(got.stdout == expected, "binary output differs");
}

#[tokio::test]
async fn a_single_huge_line_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, got) =
        run(spec("head -c 10000000 /dev/zero | tr '\\0' a", dir.path()), CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Success, "{outcome:?}");
    assert_eq!(got.stdout.len(), 10_000_000);
    assert!(got.stdout.iter().all(|&b| b == b'a'));
    assert!(got.largest <= MAX_CHUNK);
}

#[tokio::test]
async fn timeout_kills_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec("sleep 30", dir.path());
    spec.timeout = Some(Duration::from_secs(1));
    let start = Instant::now();
    let (outcome, _) = run(spec, CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Failure);
    assert_eq!(outcome.reason, "timed out after 1s");
    assert_eq!(outcome.exit_code, None);
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

#[tokio::test]
async fn a_step_ignoring_sigterm_is_killed_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    // SIGTERM stays ignored across exec, so `sleep` ignores it too.
    let mut spec = spec("trap '' TERM; sleep 30", dir.path());
    spec.timeout = Some(Duration::from_millis(500));
    let start = Instant::now();
    let (outcome, _) = run(spec, CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Failure);
    assert_eq!(outcome.reason, "timed out after 0.5s");
    let took = start.elapsed();
    assert!(took >= Duration::from_secs(2), "killed before the grace: {took:?}");
    assert!(took < Duration::from_secs(6), "{took:?}");
}

#[tokio::test]
async fn cancel_kills_the_whole_process_group() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pidfile");
    let cancel = CancellationToken::new();
    let step = tokio::spawn(run(spec("sleep 60 & echo $! > pidfile; sleep 60", dir.path()), cancel.clone()));
    wait_until("the background pid is written", Duration::from_secs(10), || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(!process_gone(pid), "background sleep should be running");

    let start = Instant::now();
    cancel.cancel();
    let (outcome, _) =
        tokio::time::timeout(Duration::from_secs(10), step).await.expect("cancelled step did not finish").unwrap();
    assert_eq!(outcome.result, StepResult::Cancelled);
    assert_eq!(outcome.reason, "cancelled");
    assert!(start.elapsed() < Duration::from_secs(5));
    wait_until("the background process is gone", Duration::from_secs(10), || process_gone(pid)).await;
}

#[tokio::test]
async fn background_children_holding_the_pipes_do_not_hang_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let (outcome, got) =
        run(spec("sleep 60 & echo $! > pidfile; echo done", dir.path()), CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Success, "{outcome:?}");
    assert_eq!(got.stdout, b"done\n");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    let pid: i32 = std::fs::read_to_string(dir.path().join("pidfile")).unwrap().trim().parse().unwrap();
    wait_until("the background process is gone", Duration::from_secs(10), || process_gone(pid)).await;
}

#[tokio::test]
async fn env_and_cwd_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec("echo \"$RBB_TEST_VAR\"; pwd -P; test -n \"$PATH\"", dir.path());
    spec.env.insert("RBB_TEST_VAR".into(), "hello world".into());
    let (outcome, got) = run(spec, CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Success, "{outcome:?}");
    let expected = format!("hello world\n{}\n", dir.path().canonicalize().unwrap().display());
    assert_eq!(String::from_utf8(got.stdout).unwrap(), expected);
}

#[tokio::test]
async fn unrunnable_steps_are_exceptions() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, _) = run(spec("true", &dir.path().join("missing")), CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Exception);
    assert!(outcome.reason.contains("cannot start"), "{}", outcome.reason);

    let mut docker = spec("true", dir.path());
    docker.image = Some("alpine:3".into());
    let (outcome, _) = run(docker, CancellationToken::new()).await;
    assert_eq!(outcome.result, StepResult::Exception);
    assert_eq!(outcome.reason, "this worker has no Docker executor");
}

#[tokio::test]
async fn a_gone_receiver_does_not_block_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        NativeExecutor::new().run(spec("head -c 5000000 /dev/zero", dir.path()), tx, CancellationToken::new()),
    )
    .await
    .expect("step blocked on its output");
    assert_eq!(outcome.result, StepResult::Success, "{outcome:?}");
}
