//! The engine against a real redb file and a real git repository, with workers played by
//! the test through the same calls the gRPC service makes.

use super::*;
use crate::server::{MasterOptions, open};
use rbb_schema::api::ForceRequest;
use rbb_schema::proto::{self, worker_message::Msg};
use rbb_schema::results::Outcome;
use std::path::Path;
use std::process::Command;

struct Fixture {
    dir: tempfile::TempDir,
    engine: Arc<Engine>,
}

const PIPELINE: &str = "\
builders:
  build:
    steps: [{ name: compile, run: make }, { name: test, run: make test }]
  test:
    matrix: { mode: [debug, release] }
    on: { push: { branches: [main] } }
    steps: [{ run: make check }]
  deploy:
    needs: [test]
    on: { push: { branches: [main] } }
    steps: [{ run: make deploy }]
  lint:
    collapse: true
    on: { push: { branches: [main] } }
    steps: [{ run: make lint }]
  nightly:
    on: { schedule: [{ cron: '* * * * *' }] }
    steps: [{ run: make nightly }]
";

fn sh(args: &[&str]) -> String {
    let out = Command::new("sh").args(args).output().expect("sh");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("root").join("testdata/fixtures")
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("app.src");
    std::fs::create_dir_all(src.join(".rbb")).expect("mkdir");
    std::fs::write(src.join(".rbb/pipeline.yaml"), PIPELINE).expect("pipeline");
    let app = dir.path().join("app");
    sh(&[
        fixtures().join("mkrepo.sh").to_str().expect("utf8"),
        src.to_str().expect("utf8"),
        app.to_str().expect("utf8"),
    ]);
    std::fs::write(
        dir.path().join("rbb.yaml"),
        "repositories:\n  - url: app\n    poll_interval: 1h\nworkers:\n  - name: w1\n    max_steps: 1\n  - name: w2\n    labels: [gpu]\n",
    )
    .expect("config");
    let engine = reopen(dir.path());
    Fixture { dir, engine }
}

fn reopen(dir: &Path) -> Arc<Engine> {
    let opts = MasterOptions {
        config: dir.join("rbb.yaml"),
        state_dir: Some(dir.join("state")),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: "127.0.0.1:0".parse().expect("addr"),
        heartbeat: Duration::from_secs(3600),
        migrate: false,
        standby: false,
    };
    open(&opts).expect("master").engine
}

/// A worker played by the test: its session's outbound queue.
struct FakeWorker {
    name: String,
    session: u64,
    liveness: Arc<Liveness>,
    rx: mpsc::Receiver<Result<MasterMessage, tonic::Status>>,
}

impl FakeWorker {
    fn connect(e: &Engine, name: &str, max_steps: u32) -> Result<FakeWorker, EngineError> {
        let (tx, mut rx) = mpsc::channel(64);
        let hello = proto::Hello { name: name.into(), max_steps, ..Default::default() };
        let c = e.connect(&hello, tx, "test")?;
        match rx.try_recv() {
            Ok(Ok(MasterMessage { msg: Some(MasterMsg::Welcome(_)) })) => {}
            other => panic!("expected Welcome, got {other:?}"),
        }
        Ok(FakeWorker { name: name.into(), session: c.session, liveness: c.liveness, rx })
    }

    /// The next lease sent to this worker, if any is queued.
    fn lease(&mut self) -> Option<proto::Lease> {
        loop {
            match self.rx.try_recv() {
                Ok(Ok(MasterMessage { msg: Some(MasterMsg::Lease(l)) })) => return Some(l),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    fn finish(&self, e: &Engine, lease: u64, result: proto::StepResult) -> Result<(), EngineError> {
        let f = proto::StepFinished {
            lease,
            result: result as i32,
            exit_code: Some(0),
            reason: "r".into(),
            duration_ms: 1,
            ..Default::default()
        };
        e.on_message(&self.name, self.session, Msg::Finished(f))
    }
}

fn all_builds(e: &Engine) -> Vec<rbb_schema::api::Build> {
    let q = crate::query::ListQuery::parse(&[("limit".into(), "1000".into())], &["id"], &[]).expect("query");
    let (page, _) = e.list_builds(&q).expect("list");
    page.into_iter().map(|v| serde_json::from_value(v).expect("build")).collect()
}

fn force(e: &Engine, builder: &str) -> u64 {
    e.force(builder, ForceRequest::default()).expect("force").build
}

fn result(e: &Engine, id: u64) -> (State, Option<Outcome>, String) {
    let b = e.build(id).expect("build");
    (b.state, b.result, b.result_reason)
}

#[test]
fn a_refused_lease_goes_back_to_the_queue_and_is_not_a_result() {
    let f = fixture();
    let e = &f.engine;
    let mut w = FakeWorker::connect(e, "w1", 1).expect("connect");
    let id = force(e, "app/build");
    let first = w.lease().expect("a lease");
    assert!(first.checkout.is_some());
    e.on_message("w1", w.session, Msg::Refused(proto::LeaseRefused { lease: first.lease, reason: "full".into() }))
        .expect("refusal");
    let b = e.build(id).expect("build");
    assert_eq!(b.state, State::Running);
    assert_eq!(b.steps[0].state, State::Pending, "the refused step waits, it has no result");
    assert_eq!(b.result, None);
    // The next tick leases it again, with the checkout it never got.
    e.check_heartbeats();
    let again = w.lease().expect("leased again");
    assert_eq!(again.step_index, 0);
    assert!(again.checkout.is_some(), "the checkout travels with the lease that runs");
    w.finish(e, again.lease, proto::StepResult::Success).expect("finish");
    let next = w.lease().expect("step 2");
    w.finish(e, next.lease, proto::StepResult::Success).expect("finish");
    assert_eq!(result(e, id).1, Some(Outcome::Success));
}

#[test]
fn a_stop_that_races_a_successful_step_ends_cancelled() {
    let f = fixture();
    let e = &f.engine;
    let mut w = FakeWorker::connect(e, "w1", 1).expect("connect");
    let id = force(e, "app/build");
    let l = w.lease().expect("lease");
    e.stop(id, "by alice").expect("stop");
    // The step exited 0 before the cancel reached the worker.
    w.finish(e, l.lease, proto::StepResult::Success).expect("finish");
    let (state, res, why) = result(e, id);
    assert_eq!((state, res), (State::Finished, Some(Outcome::Cancelled)), "{why}");
    assert_eq!(why, "stopped: by alice");
    assert!(w.lease().is_none(), "nothing else runs after a stop");
}

#[test]
fn a_stop_is_durable_and_a_restart_does_not_retry_the_build() {
    let f = fixture();
    let mut w = FakeWorker::connect(&f.engine, "w1", 1).expect("connect");
    let id = force(&f.engine, "app/build");
    w.lease().expect("lease");
    f.engine.stop(id, "by bob").expect("stop");
    // The master dies before the worker reports: the next start finds a stopped build.
    drop(w);
    let dir = f.dir.path().to_owned();
    drop(f.engine);
    let e = reopen(&dir);
    let (state, res, why) = result(&e, id);
    assert_eq!((state, res), (State::Finished, Some(Outcome::Cancelled)), "{why}");
    assert!(e.build(id + 1).is_none(), "a stopped build is not retried");
}

#[test]
fn a_reader_waits_for_a_result_to_be_durable_before_it_is_shown() {
    let f = fixture();
    let e = &f.engine;
    let mut w = FakeWorker::connect(e, "w1", 1).expect("connect");
    let id = force(e, "app/build");
    let first = w.lease().expect("lease");
    w.finish(e, first.lease, proto::StepResult::Success).expect("finish");
    let last = w.lease().expect("lease");
    let mut events = e.subscribe();
    while events.try_recv().is_ok() {}
    // The last result arrives the way a session applies it: stored, not yet durable.
    let done = proto::StepFinished {
        lease: last.lease,
        result: proto::StepResult::Success as i32,
        exit_code: Some(0),
        duration_ms: 1,
        ..Default::default()
    };
    e.receive("w1", w.session, Msg::Finished(done)).expect("receive");
    assert_eq!(e.build(id).expect("build").state, State::Finished);
    assert!(events.try_recv().is_err(), "a result is announced only once it is durable");
    // What the API does before it answers a read: wait for that flush (starting it).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(e.durable_for_readers());
    assert!(events.try_recv().is_ok(), "the read went on only after the flush announced the result");
    // The flush ran on the runtime's blocking pool, holding the engine: the runtime waits
    // for it as it goes, so the state below is the reopen's alone.
    drop(rt);
    // And it is on disk: a master killed now finds it.
    drop(w);
    let dir = f.dir.path().to_owned();
    drop(f.engine);
    let e = reopen(&dir);
    assert_eq!(result(&e, id).1, Some(Outcome::Success));
    assert!(e.build(id + 1).is_none(), "no retry of a finished build");
}

#[test]
fn a_change_makes_one_build_per_builder_even_when_another_needs_it() {
    let f = fixture();
    let e = &f.engine;
    let head = resolve(&f.dir.path().join("state/mirrors/app.git"), "main").expect("head");
    let commit = NewCommit { id: head.clone(), files: vec!["src/a.c".into()], ..Default::default() };
    let made = e.on_push("app", "main", &[commit], "test").expect("push");
    let builds = all_builds(e);
    for builder in ["app/test[mode=debug]", "app/test[mode=release]", "app/deploy", "app/lint"] {
        let n = builds.iter().filter(|b| b.builder == builder && b.commit == head).count();
        assert_eq!(n, 1, "{builder} was built {n} times for one push");
    }
    assert_eq!(made.len(), builds.len());
}

#[test]
fn pending_builds_say_why_they_wait() {
    let f = fixture();
    let e = &f.engine;
    let id = force(e, "app/build");
    let req = e.build_requests();
    assert_eq!(req[0].waiting.as_deref(), Some("no worker is connected"));
    let mut w = FakeWorker::connect(e, "w1", 1).expect("connect");
    let first = w.lease().expect("lease");
    let second = force(e, "app/build");
    let why = e.build(second).expect("build").waiting.expect("waiting");
    assert!(why.contains("every capable worker is busy") && why.contains("w1"), "{why}");
    w.finish(e, first.lease, proto::StepResult::Success).expect("finish");
    assert_eq!(result(e, id).0, State::Running);
}

#[test]
fn a_second_worker_with_the_same_name_is_refused_and_the_first_keeps_its_session() {
    let f = fixture();
    let e = &f.engine;
    let mut first = FakeWorker::connect(e, "w1", 1).expect("connect");
    let err = FakeWorker::connect(e, "w1", 1).err().expect("refused");
    assert!(matches!(err, EngineError::Conflict(ref m) if m.contains("already connected")), "{err}");
    let id = force(e, "app/build");
    assert!(first.lease().is_some(), "the first worker still gets work");
    assert_eq!(e.build(id).expect("build").worker.as_deref(), Some("w1"));
}

#[test]
fn liveness_counts_arrivals_not_the_engines_lock() {
    let f = fixture();
    let e = &f.engine;
    let w = FakeWorker::connect(e, "w1", 1).expect("connect");
    // A message arrived, but the engine has not handled it yet (its lock was busy): the
    // worker is alive however long that takes.
    w.liveness.arrived(e);
    assert!(!w.liveness.silent(e.clock_ms() + 10_000_000, 1000));
    w.liveness.handled();
    assert!(w.liveness.silent(e.clock_ms() + 10_000_000, 1000));
    assert!(!w.liveness.silent(e.clock_ms(), 1000));
}

#[test]
fn a_write_the_store_refuses_changes_nothing_and_is_applied_later() {
    let f = fixture();
    let e = &f.engine;
    let mut w = FakeWorker::connect(e, "w1", 1).expect("connect");
    let id = force(e, "app/build");
    let l = w.lease().expect("lease");
    let mut events = e.subscribe();
    e.store.fail_writes(true);
    assert!(w.finish(e, l.lease, proto::StepResult::Success).is_err());
    let b = e.build(id).expect("build");
    assert_eq!(b.steps[0].state, State::Running, "memory is as it was: the step still runs");
    assert!(w.lease().is_none(), "nothing was sent");
    assert!(events.try_recv().is_err(), "nothing was announced");
    // A force while the disk is full is refused whole.
    assert!(e.force("app/lint", ForceRequest::default()).is_err());
    assert_eq!(e.build_requests().len(), 0);
    e.store.fail_writes(false);
    e.check_heartbeats();
    let b = e.build(id).expect("build");
    assert_eq!(b.steps[0].result, Some(Outcome::Success), "the result that arrived is applied");
    assert!(w.lease().is_some(), "and the build goes on");
}

#[test]
fn a_cron_minute_and_its_build_are_stored_together() {
    let f = fixture();
    let e = &f.engine;
    let now = 1_795_491_000;
    e.store.fail_writes(true);
    assert!(e.cron_tick(now).is_err());
    assert!(all_builds(e).is_empty());
    e.store.fail_writes(false);
    let fired = e.cron_tick(now).expect("tick");
    assert_eq!(fired.len(), 1);
    // The same minute again, and after a restart: no second build.
    assert!(e.cron_tick(now + 10).expect("tick").is_empty());
    let dir = f.dir.path().to_owned();
    drop(f.engine);
    let e = reopen(&dir);
    assert!(e.cron_tick(now + 20).expect("tick").is_empty());
    assert_eq!(all_builds(&e).len(), 1);
}

#[test]
fn a_rebuild_of_an_old_commit_replaces_nothing() {
    let f = fixture();
    let e = &f.engine;
    let git = f.dir.path().join("state/mirrors/app.git");
    let head = resolve(&git, "main").expect("head");
    let push = |id: &str| {
        let c = NewCommit { id: id.to_owned(), files: vec!["x".into()], ..Default::default() };
        e.on_push("app", "main", &[c], "test").expect("push")
    };
    push(&head);
    let lint = e.builds_of("app/lint", 10).expect("builds")[0].id;
    // Nothing runs (no worker): stop it so it can be rebuilt.
    e.stop(lint, "test").expect("stop");
    let rebuilt = e.rebuild(lint).expect("rebuild");
    push(&head);
    let newest = e.builds_of("app/lint", 10).expect("builds")[0].id;
    assert_ne!(newest, rebuilt);
    assert_eq!(result(e, rebuilt).0, State::Pending, "a rebuild is never collapsed");
    assert_eq!(result(e, newest).0, State::Pending, "a push of the same commit collapses nothing");
}

#[test]
fn checkout_directories_never_collide() {
    assert_ne!(checkout_dir("app/lint_docs"), checkout_dir("app_lint/docs"));
    assert!(checkout_dir("app/test[os=linux]").starts_with("app_test_os_linux_-"));
}

#[test]
fn retention_compresses_then_expires_logs_and_deletes_old_builds_but_the_newest() {
    let f = fixture();
    let e = &f.engine;
    let mut w = FakeWorker::connect(e, "w1", 1).expect("connect");
    let mut ids = Vec::new();
    let mut first_log = None;
    for builder in ["app/build", "app/build", "app/build", "app/lint"] {
        let id = force(e, builder);
        ids.push(id);
        while let Some(l) = w.lease() {
            let chunk = proto::LogChunk { lease: l.lease, stream: 0, data: format!("output of {id}\n").into_bytes() };
            e.on_message("w1", w.session, Msg::Log(chunk)).expect("log");
            w.finish(e, l.lease, proto::StepResult::Success).expect("finish");
        }
        assert_eq!(result(e, id).1, Some(Outcome::Success));
        first_log.get_or_insert(e.build(id).expect("build").steps[0].log_id.expect("log"));
    }
    let log = first_log.expect("a log");
    let now = crate::model::now_ms();
    let day = 86_400_000;
    let compress = RetentionPolicy { compress_age_ms: Some(day), ..Default::default() };
    let r = e.retention(&compress, now + 2 * day).expect("retention");
    assert_eq!(r.logs_compressed, 7, "{r:?}");
    let (rec, path, _) = e.log(log).expect("log");
    assert!(rec.compressed && rec.file.ends_with(".zst"));
    assert_eq!(std::fs::read_to_string(path).expect("read"), format!("output of {}\n", ids[0]));
    // A second run finds nothing new to do.
    assert_eq!(e.retention(&compress, now + 2 * day).expect("retention"), RetentionReport::default());
    let expire = RetentionPolicy { log_age_ms: Some(10 * day), ..compress.clone() };
    let r = e.retention(&expire, now + 20 * day).expect("retention");
    assert_eq!(r.logs_deleted, 7, "{r:?}");
    assert!(e.log(log).expect("log record").0.expired);
    let builds = RetentionPolicy { build_age_ms: Some(30 * day), keep_builds: 1, ..expire };
    let r = e.retention(&builds, now + 40 * day).expect("retention");
    assert_eq!(r.builds_deleted, 2, "{r:?}");
    assert!(e.build(ids[0]).is_none() && e.build(ids[1]).is_none());
    assert!(e.build(ids[2]).is_some() && e.build(ids[3]).is_some(), "the newest build of each builder stays");
    assert_eq!(e.store.check_indexes().expect("check"), None);
    assert_eq!(e.store.count("builds").expect("count"), 2);
}
