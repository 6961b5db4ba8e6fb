//! The worker's session against an in-test master speaking the real protocol.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rbb_schema::proto::master_message::Msg as MasterMsg;
use rbb_schema::proto::worker_message::Msg;
use rbb_schema::proto::{Cancel, Checkout, Lease, LogStream, StepResult};
use rbb_worker::{Executor, WorkerConfig, WorkerError, run_with_executor};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::fake_executor::FakeExecutor;
use crate::fake_master::{FakeMaster, MasterSession};
use crate::{init_logs, make_repo, prepared_checkout, process_gone, wait_until};

pub const TOKEN: &str = "s3cret";

/// A worker running in this process until `shutdown` fires.
pub struct TestWorker {
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), WorkerError>>,
}

impl TestWorker {
    pub fn start(url: String, workdir: &Path, max_steps: u32, executor: Arc<dyn Executor>) -> TestWorker {
        let config = WorkerConfig {
            master: url,
            name: "w1".to_owned(),
            token: TOKEN.to_owned(),
            labels: vec!["linux".to_owned(), "fast".to_owned()],
            workdir: workdir.to_owned(),
            max_steps,
            cache_max_bytes: rbb_worker::cache::DEFAULT_MAX_BYTES,
            guard: None,
            tls: None,
        };
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(run_with_executor(config, executor, shutdown.clone()));
        TestWorker { shutdown, handle }
    }

    pub fn native(url: String, workdir: &Path) -> TestWorker {
        TestWorker::start(url, workdir, 1, Arc::new(rbb_worker::NativeExecutor::new()))
    }

    /// Shuts the worker down; it must stop cleanly and in time.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(15), self.handle)
            .await
            .expect("worker did not shut down in time")
            .unwrap();
        result.expect("worker ended with an error");
    }
}

pub fn lease(id: u64, command: &str) -> Lease {
    Lease {
        lease: id,
        build: 7,
        builder: "app/test".to_owned(),
        step_name: format!("step{id}"),
        step_index: 0,
        checkout_dir: "builds/7".to_owned(),
        checkout: None,
        command: command.to_owned(),
        env: HashMap::new(),
        workdir: String::new(),
        timeout_secs: 60,
        image: String::new(),
        ..Default::default()
    }
}

/// The log of `lease` in `messages`, per stream.
pub fn logs(messages: &[Msg], lease: u64) -> HashMap<LogStream, String> {
    let mut logs: HashMap<LogStream, String> = HashMap::new();
    for msg in messages {
        if let Msg::Log(chunk) = msg {
            assert_eq!(chunk.lease, lease);
            assert!(chunk.data.len() <= rbb_worker::executor::MAX_CHUNK);
            let stream = LogStream::try_from(chunk.stream).unwrap();
            logs.entry(stream).or_default().push_str(&String::from_utf8_lossy(&chunk.data));
        }
    }
    logs
}

#[tokio::test]
async fn runs_leased_steps_with_a_checkout() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    let repo = scratch.path().join("repo");
    let commit = make_repo(scratch.path(), &repo, &[("hello.txt", "hello from git\n"), ("sub/x.txt", "x\n")]);
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let worker = TestWorker::native(master.url(), &scratch.path().join("work"));

    let mut session = master.next_session().await;
    let header = |key: &str| session.metadata.get(key).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(header("rbb-protocol").as_deref(), Some(rbb_schema::proto::PROTOCOL_VERSION));
    assert_eq!(header("rbb-worker").as_deref(), Some("w1"));
    assert_eq!(header("authorization"), Some(format!("Bearer {TOKEN}")));
    let hello = session.handshake(50).await;
    assert_eq!(hello.name, "w1");
    assert_eq!(hello.labels, ["linux", "fast"]);
    assert_eq!(hello.max_steps, 1);
    assert_eq!(hello.platform, format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH));
    assert_eq!(hello.version, env!("CARGO_PKG_VERSION"));

    let mut first = lease(1, "cat hello.txt; echo oops >&2; echo \"$GREETING\"");
    first.checkout =
        Some(Checkout { url: repo.to_str().unwrap().to_owned(), commit: commit.clone(), ..Checkout::default() });
    first.env.insert("GREETING".to_owned(), "hi".to_owned());
    session.send(MasterMsg::Lease(first)).await;
    let (messages, finished) = session.until_finished(1).await;
    assert!(
        matches!(messages.first(), Some(Msg::Started(s)) if s.lease == 1),
        "StepStarted must come first: {messages:?}"
    );
    let log = logs(&messages[1..], 1);
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}\n{log:?}");
    assert_eq!(finished.exit_code, Some(0));
    assert_eq!(log[&LogStream::Stdout], "hello from git\nhi\n");
    assert_eq!(log[&LogStream::Stderr], "oops\n");
    let header_log = &log[&LogStream::Header];
    assert!(header_log.contains("$ git clone"), "{header_log}");
    assert!(header_log.contains("$ cat hello.txt"), "{header_log}");
    assert!(header_log.contains("# exit code 0"), "{header_log}");

    // The build's next step reuses the checkout, in a subdirectory.
    let mut second = lease(2, "cat x.txt; pwd -P; exit 4");
    second.workdir = "sub".to_owned();
    session.send(MasterMsg::Lease(second)).await;
    let (messages, finished) = session.until_finished(2).await;
    let log = logs(&messages[1..], 2);
    assert_eq!(finished.result, StepResult::Failure as i32);
    assert_eq!(finished.exit_code, Some(4));
    assert_eq!(finished.reason, "exit code 4");
    let sub = scratch.path().join("work/builds/7/sub").canonicalize().unwrap();
    assert_eq!(log[&LogStream::Stdout], format!("x\n{}\n", sub.display()));

    // A checkout that fails is an EXCEPTION with git's story in the log.
    let mut broken = lease(3, "true");
    broken.checkout_dir = "builds/8".to_owned();
    broken.checkout = Some(Checkout {
        url: repo.to_str().unwrap().to_owned(),
        commit: "0123456789abcdef0123456789abcdef01234567".to_owned(),
        ..Checkout::default()
    });
    session.send(MasterMsg::Lease(broken)).await;
    let (_, finished) = session.until_finished(3).await;
    assert_eq!(finished.result, StepResult::Exception as i32);
    assert!(finished.reason.contains("checkout failed"), "{}", finished.reason);

    // Heartbeats flow at the Welcome's interval.
    wait_until("heartbeats arrive", Duration::from_secs(10), || session.heartbeats > 0).await;
    worker.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_running_step() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    prepared_checkout(&scratch.path().join("work"), "builds/7", 7);
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let worker = TestWorker::native(master.url(), &scratch.path().join("work"));
    let mut session = master.next_session().await;
    session.handshake(1000).await;

    session.send(MasterMsg::Lease(lease(5, "sleep 30"))).await;
    assert!(matches!(session.recv().await, Msg::Started(s) if s.lease == 5));
    let start = Instant::now();
    session.send(MasterMsg::Cancel(Cancel { lease: 5, reason: "user asked".to_owned() })).await;
    let (_, finished) = session.until_finished(5).await;
    assert_eq!(finished.result, StepResult::Cancelled as i32, "{finished:?}");
    assert_eq!(finished.reason, "cancelled");
    assert!(start.elapsed() < Duration::from_secs(5));
    worker.stop().await;
}

#[tokio::test]
async fn steps_run_in_lease_order() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    prepared_checkout(&scratch.path().join("work"), "builds/7", 7);
    let fake = Arc::new(
        FakeExecutor::default()
            .expect("make", StepResult::Success, "made\n")
            .expect("make test", StepResult::Failure, "")
            .expect("make deploy", StepResult::Success, ""),
    );
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let worker = TestWorker::start(master.url(), &scratch.path().join("work"), 1, fake.clone());
    let mut session = master.next_session().await;
    session.handshake(1000).await;

    for (id, command) in [(1, "make"), (2, "make test"), (3, "make deploy")] {
        let mut next = lease(id, command);
        next.timeout_secs = 0;
        session.send(MasterMsg::Lease(next)).await;
        let (messages, finished) = session.until_finished(id).await;
        assert!(matches!(messages.first(), Some(Msg::Started(_))));
        if id == 1 {
            assert_eq!(logs(&messages[1..], 1)[&LogStream::Stdout], "made\n");
        }
        let expected = if id == 2 { StepResult::Failure } else { StepResult::Success };
        assert_eq!(finished.result, expected as i32);
    }
    fake.assert_done();
    let specs = fake.specs();
    assert!(specs.iter().all(|s| s.timeout.is_none() && s.image.is_none()));
    assert!(specs.iter().all(|s| s.cwd.ends_with("work/builds/7")));
    worker.stop().await;
}

/// The next LeaseRefused (lease, reason); log chunks of running steps are skipped, anything
/// else (a StepFinished above all) is a failure.
async fn refusal(session: &mut MasterSession) -> (u64, String) {
    loop {
        match session.recv().await {
            Msg::Refused(refused) => return (refused.lease, refused.reason),
            Msg::Log(_) => {}
            other => panic!("expected LeaseRefused, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_over_lease_is_refused_not_failed() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    prepared_checkout(&scratch.path().join("work"), "builds/7", 7);
    let fake = Arc::new(FakeExecutor::default().expect_blocking("long"));
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let worker = TestWorker::start(master.url(), &scratch.path().join("work"), 1, fake.clone());
    let mut session = master.next_session().await;
    session.handshake(1000).await;

    session.send(MasterMsg::Lease(lease(1, "long"))).await;
    assert!(matches!(session.recv().await, Msg::Started(s) if s.lease == 1));
    session.send(MasterMsg::Lease(lease(2, "second"))).await;
    assert_eq!(refusal(&mut session).await, (2, "the worker is full (1 of 1 steps running)".to_owned()));
    // A lease already running is refused too, and the running one is untouched.
    session.send(MasterMsg::Lease(lease(1, "long"))).await;
    assert_eq!(refusal(&mut session).await, (1, "lease 1 is already running on this worker".to_owned()));

    session.send(MasterMsg::Cancel(Cancel { lease: 1, reason: String::new() })).await;
    let (_, finished) = session.until_finished(1).await;
    assert_eq!(finished.result, StepResult::Cancelled as i32);
    fake.assert_done();
    assert_eq!(fake.calls(), ["long"]);
    worker.stop().await;
}

#[tokio::test]
async fn a_refused_worker_stops_with_an_error() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    for code in [Code::Unauthenticated, Code::PermissionDenied, Code::FailedPrecondition] {
        let master = FakeMaster::refusing("127.0.0.1:0".parse().unwrap(), code, "go away").await;
        let worker = TestWorker::native(master.url(), &scratch.path().join("work"));
        let result = tokio::time::timeout(Duration::from_secs(10), worker.handle)
            .await
            .expect("a refused worker must stop")
            .unwrap();
        match result {
            Err(WorkerError::Refused { code: got, message }) => {
                assert_eq!(got, code);
                assert_eq!(message, "go away");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        master.stop().await;
    }
}

#[tokio::test]
async fn reconnects_when_the_master_restarts() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    prepared_checkout(&scratch.path().join("work"), "builds/7", 7);
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let worker = TestWorker::native(master.url(), &scratch.path().join("work"));
    let mut session = master.next_session().await;
    session.handshake(1000).await;

    // A running step is stopped when the stream is lost (the master retries it).
    session.send(MasterMsg::Lease(lease(1, "sleep 60 & echo $! > bg.pid; wait"))).await;
    assert!(matches!(session.recv().await, Msg::Started(_)));
    let pidfile = scratch.path().join("work/builds/7/bg.pid");
    wait_until("the step writes its pid", Duration::from_secs(10), || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();

    let addr = master.stop().await;
    wait_until("the lost step's processes are gone", Duration::from_secs(10), || process_gone(pid)).await;

    // While the master is down, connections fail; the worker keeps retrying.
    let down = tokio::net::TcpListener::bind(addr).await.unwrap();
    for _ in 0..2 {
        let (socket, _) = tokio::time::timeout(Duration::from_secs(10), down.accept())
            .await
            .expect("the worker should retry")
            .unwrap();
        drop(socket);
    }
    drop(down);

    let mut master = FakeMaster::start(addr).await;
    let mut session = master.next_session().await;
    let hello = session.handshake(1000).await;
    assert_eq!(hello.name, "w1");
    session.send(MasterMsg::Lease(lease(2, "echo again"))).await;
    let (messages, finished) = session.until_finished(2).await;
    assert_eq!(finished.result, StepResult::Success as i32);
    assert_eq!(logs(&messages[1..], 2)[&LogStream::Stdout], "again\n");
    worker.stop().await;
}

#[tokio::test]
async fn shutdown_stops_running_steps_and_closes_the_session() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    prepared_checkout(&scratch.path().join("work"), "builds/7", 7);
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let worker = TestWorker::native(master.url(), &scratch.path().join("work"));
    let mut session = master.next_session().await;
    session.handshake(1000).await;

    session.send(MasterMsg::Lease(lease(9, "sleep 60 & echo $! > bg.pid; wait"))).await;
    assert!(matches!(session.recv().await, Msg::Started(_)));
    let pidfile = scratch.path().join("work/builds/7/bg.pid");
    wait_until("the step writes its pid", Duration::from_secs(10), || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();

    worker.shutdown.cancel();
    // The step's processes die; no result is reported (the master retries the step when the
    // session ends), only a last log line; then the worker closes its stream.
    let mut rest = Vec::new();
    while let Some(msg) = session.try_recv().await {
        rest.push(msg);
    }
    assert!(!rest.iter().any(|m| matches!(m, Msg::Finished(_))), "no StepFinished expected: {rest:?}");
    let log = logs(&rest, 9);
    assert!(log[&LogStream::Header].contains("worker is shutting down"), "{log:?}");
    wait_until("the step's processes are gone", Duration::from_secs(10), || process_gone(pid)).await;
    let result =
        tokio::time::timeout(Duration::from_secs(10), worker.handle).await.expect("worker did not stop").unwrap();
    assert!(result.is_ok(), "{result:?}");
}

/// A master that leases the next step the instant it reads a StepFinished must find the slot
/// free: the worker frees it before it reports the step, so a 1-slot worker never refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_sent_right_after_a_result_finds_the_slot_free() {
    init_logs();
    const STEPS: u64 = 200;
    let scratch = tempfile::tempdir().unwrap();
    prepared_checkout(&scratch.path().join("work"), "builds/7", 7);
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let worker = TestWorker::native(master.url(), &scratch.path().join("work"));
    let mut session = master.next_session().await;
    session.handshake(1000).await;

    session.send(MasterMsg::Lease(lease(1, "true"))).await;
    let mut next = 1;
    let mut unexpected = Vec::new();
    while next <= STEPS {
        match session.recv().await {
            Msg::Finished(finished) => {
                assert_eq!(finished.lease, next, "{finished:?}");
                if finished.result != StepResult::Success as i32 {
                    unexpected.push(format!("lease {}: {:?} {}", finished.lease, finished.result, finished.reason));
                }
                next += 1;
                if next <= STEPS {
                    session.send(MasterMsg::Lease(lease(next, "true"))).await;
                }
            }
            Msg::Refused(refused) => {
                unexpected.push(format!("lease {} refused: {}", refused.lease, refused.reason));
                next += 1;
                if next <= STEPS {
                    session.send(MasterMsg::Lease(lease(next, "true"))).await;
                }
            }
            _ => {}
        }
    }
    assert!(unexpected.is_empty(), "{} of {STEPS} leases not run: {unexpected:?}", unexpected.len());
    worker.stop().await;
}

/// A step stopped because the session ended did not end by itself: the worker reports no
/// result for it (a CANCELLED would be taken for the step's own), the master retries it.
#[tokio::test]
async fn steps_stopped_by_a_lost_session_report_nothing() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    prepared_checkout(&scratch.path().join("work"), "builds/7", 7);
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let worker = TestWorker::native(master.url(), &scratch.path().join("work"));
    let mut session = master.next_session().await;
    session.handshake(1000).await;

    session.send(MasterMsg::Lease(lease(4, "sleep 30"))).await;
    assert!(matches!(session.recv().await, Msg::Started(s) if s.lease == 4));
    session.hang_up();
    let mut rest = Vec::new();
    while let Some(msg) = session.try_recv().await {
        rest.push(msg);
    }
    assert!(!rest.iter().any(|m| matches!(m, Msg::Finished(_))), "no StepFinished expected: {rest:?}");
    // The worker reconnects; the step is not running any more.
    let mut again = master.next_session().await;
    again.handshake(1000).await;
    worker.stop().await;
}

/// A build's later steps (`always_run` ones too) run in that build's checkout or not at all:
/// never in the tree an earlier build, or a failed checkout, left in the directory.
#[tokio::test]
async fn a_step_never_runs_in_another_builds_tree() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    let repo = scratch.path().join("repo");
    let commit = make_repo(scratch.path(), &repo, &[("hello.txt", "hello\n")]);
    let ran = scratch.path().join("ran");
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let worker = TestWorker::native(master.url(), &scratch.path().join("work"));
    let mut session = master.next_session().await;
    session.handshake(1000).await;
    let checkout = |commit: &str| {
        Some(Checkout { url: repo.to_str().unwrap().to_owned(), commit: commit.to_owned(), ..Checkout::default() })
    };
    let step = |id: u64, build: u64| {
        let mut step = lease(id, &format!("cat hello.txt && echo {id} >> {}", ran.display()));
        step.build = build;
        step
    };

    // Build 7 checks out and runs.
    let mut first = step(1, 7);
    first.checkout = checkout(&commit);
    session.send(MasterMsg::Lease(first)).await;
    let (_, finished) = session.until_finished(1).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}");

    // Build 8's checkout fails; its always_run step must not run in build 7's tree.
    let mut broken = step(2, 8);
    broken.checkout = checkout("0123456789abcdef0123456789abcdef01234567");
    session.send(MasterMsg::Lease(broken)).await;
    let (_, finished) = session.until_finished(2).await;
    assert_eq!(finished.result, StepResult::Exception as i32, "{finished:?}");
    session.send(MasterMsg::Lease(step(3, 8))).await;
    let (_, finished) = session.until_finished(3).await;
    assert_eq!(finished.result, StepResult::Exception as i32, "{finished:?}");
    assert!(finished.reason.contains("does not exist"), "{}", finished.reason);

    // Build 9 checks out; build 10, whose checkout this worker never got, may not use it.
    let mut third = step(4, 9);
    third.checkout = checkout(&commit);
    session.send(MasterMsg::Lease(third)).await;
    let (_, finished) = session.until_finished(4).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}");
    session.send(MasterMsg::Lease(step(5, 10))).await;
    let (_, finished) = session.until_finished(5).await;
    assert_eq!(finished.result, StepResult::Exception as i32, "{finished:?}");
    assert!(finished.reason.contains("holds build 9's checkout, not build 10's"), "{}", finished.reason);

    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "1\n4\n", "only the steps of checked-out builds ran");
    worker.stop().await;
}

#[tokio::test]
async fn a_step_gets_its_secrets_alone_and_they_are_masked_before_they_leave() {
    init_logs();
    let scratch = tempfile::tempdir().unwrap();
    let repo = scratch.path().join("repo");
    let commit = make_repo(scratch.path(), &repo, &[("hello.txt", "hello\n")]);
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let worker = TestWorker::native(master.url(), &scratch.path().join("work"));
    let mut session = master.next_session().await;
    session.handshake(1000).await;

    let value = "worker-side-s3cret";
    // The value straddles the end of the executor's first 1 MiB chunk and goes to stderr; a
    // later step of the build does not see it.
    let mut first =
        lease(1, "head -c 1048570 /dev/zero | tr '\\0' a; printf %s \"$TOKEN\"; echo; echo \"err $TOKEN\" >&2; exit 3");
    first.checkout = Some(Checkout { url: repo.to_str().unwrap().to_owned(), commit, ..Checkout::default() });
    first.secret_env.insert("TOKEN".to_owned(), value.to_owned());
    first.env.insert("TOKEN".to_owned(), "${{ secrets.TOKEN }}".to_owned());
    first.mask.push(value.to_owned());
    session.send(MasterMsg::Lease(first)).await;
    let (messages, finished) = session.until_finished(1).await;
    let log = logs(&messages[1..], 1);
    assert_eq!(finished.result, StepResult::Failure as i32, "{finished:?}");
    let stdout = &log[&LogStream::Stdout];
    assert!(!stdout.contains(value) && !log[&LogStream::Stderr].contains(value));
    assert!(stdout.ends_with("a***\n"), "{}", &stdout[stdout.len() - 40..]);
    assert_eq!(stdout.len(), 1048570 + "***\n".len());
    assert_eq!(log[&LogStream::Stderr], "err ***\n");

    let second = lease(2, "echo \"token: ${TOKEN:-unset}\"");
    session.send(MasterMsg::Lease(second)).await;
    let (messages, finished) = session.until_finished(2).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}");
    assert_eq!(logs(&messages[1..], 2)[&LogStream::Stdout], "token: unset\n");
    worker.stop().await;
}
