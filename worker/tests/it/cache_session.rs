//! The step cache around leased steps, against the in-test master: hits restore without
//! running, misses run and upload, and no cache trouble ever fails a step.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rbb_schema::proto::master_message::Msg as MasterMsg;
use rbb_schema::proto::{CacheAnswer, Cancel, Lease, LogStream, OutputFile, StepCache, StepFinished, StepResult};
use rbb_worker::cache::sha256_of;
use tonic::Code;

use crate::fake_executor::FakeExecutor;
use crate::fake_master::{FakeMaster, MasterSession};
use crate::session::{TOKEN, TestWorker, lease, logs};
use crate::{init_logs, prepared_checkout, wait_until};

const KEY: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// A master, a native worker with the checkout of build 7 ready, and its session.
struct Rig {
    scratch: tempfile::TempDir,
    master: FakeMaster,
    worker: TestWorker,
    session: MasterSession,
}

impl Rig {
    async fn native() -> Rig {
        Rig::with(TestWorker::native).await
    }

    async fn with(start: impl FnOnce(String, &Path) -> TestWorker) -> Rig {
        init_logs();
        let scratch = tempfile::tempdir().unwrap();
        let work = scratch.path().join("work");
        prepared_checkout(&work, "builds/7", 7);
        let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
        let worker = start(master.url(), &work);
        let mut session = master.next_session().await;
        session.handshake(1000).await;
        Rig { scratch, master, worker, session }
    }

    fn checkout(&self) -> PathBuf {
        self.scratch.path().join("work/builds/7")
    }

    fn local_blob(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.scratch.path().join(format!("work/.rbb-cache/blobs/{}/{hex}", &hex[..2]))
    }

    /// Runs `lease` to its end: (header log, StepFinished).
    async fn run(&mut self, lease: Lease) -> (String, StepFinished) {
        let id = lease.lease;
        self.session.send(MasterMsg::Lease(lease)).await;
        let (messages, finished) = self.session.until_finished(id).await;
        let log = logs(&messages, id);
        (log.get(&LogStream::Header).cloned().unwrap_or_default(), finished)
    }

    async fn stop(self) {
        let authorizations = self.master.cache.with(|s| s.authorizations.clone());
        assert!(authorizations.iter().all(|a| *a == format!("Bearer {TOKEN}")), "{authorizations:?}");
        self.worker.stop().await;
    }
}

fn cached(id: u64, command: &str, outputs: &[&str]) -> Lease {
    let mut lease = lease(id, command);
    lease.cache = Some(StepCache { outputs: outputs.iter().map(|o| (*o).to_owned()).collect() });
    lease
}

fn file(path: &str, mode: u32, content: &[u8]) -> OutputFile {
    OutputFile {
        path: path.to_owned(),
        mode,
        digest: sha256_of(content),
        size: content.len() as u64,
        ..OutputFile::default()
    }
}

fn hit(files: Vec<OutputFile>) -> CacheAnswer {
    CacheAnswer { key: KEY.to_owned(), hit: true, files, source: "build 12, step compile".to_owned() }
}

fn miss() -> CacheAnswer {
    CacheAnswer { key: KEY.to_owned(), hit: false, ..CacheAnswer::default() }
}

const MARKER: &str = "ran.marker";

/// A command that leaves a marker and writes `out/result.txt`.
fn marking(content: &str) -> String {
    format!("touch {MARKER} && mkdir -p out && printf '{content}' > out/result.txt")
}

#[tokio::test]
async fn a_hit_restores_the_outputs_without_running_the_step() {
    let mut rig = Rig::native().await;
    let result = b"result\n";
    let tool = b"#!/bin/sh\necho tool\n";
    let files = vec![
        OutputFile { path: "out/empty".into(), mode: 0o700, dir: true, ..OutputFile::default() },
        OutputFile { path: "out/link".into(), mode: 0o777, link: "result.txt".into(), ..OutputFile::default() },
        file("out/result.txt", 0o644, result),
        file("out/tool", 0o755, tool),
    ];
    rig.master.cache.with(|s| {
        s.lookup = Some(Ok(hit(files)));
        s.blobs.insert(sha256_of(result), result.to_vec());
        s.blobs.insert(sha256_of(tool), tool.to_vec());
    });
    std::fs::create_dir_all(rig.checkout().join("out")).unwrap();
    std::fs::write(rig.checkout().join("out/stale.txt"), "an older build's\n").unwrap();

    let mut step = cached(1, &marking("fresh"), &["out"]);
    step.pass_env = vec!["PATH".to_owned(), "RBB_TEST_NEVER_SET_ANYWHERE".to_owned()];
    let (header, finished) = rig.run(step).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}\n{header}");
    assert!(finished.cached, "{finished:?}");
    assert_eq!(finished.exit_code, None, "nothing ran");
    assert!(finished.outputs.is_empty());
    assert!(!rig.checkout().join(MARKER).exists(), "the command must not run on a hit");
    assert!(
        header
            .contains(&format!("# cache hit {KEY}: reused from build 12, step compile; restored 3 files, 0.0 MiB in ")),
        "{header}"
    );
    let out = rig.checkout().join("out");
    assert_eq!(std::fs::read(out.join("result.txt")).unwrap(), result);
    assert_eq!(std::fs::read(out.join("tool")).unwrap(), tool);
    assert_eq!(std::fs::metadata(out.join("tool")).unwrap().permissions().mode() & 0o777, 0o755);
    assert_eq!(std::fs::read_link(out.join("link")).unwrap(), Path::new("result.txt"));
    assert!(out.join("empty").is_dir());
    assert!(!out.join("stale.txt").exists(), "what was at the output path is replaced");
    assert!(rig.local_blob(&sha256_of(result)).is_file(), "fetched blobs are kept locally");

    // The query carried the lease and the hashed pass_env values (never the values).
    let query = rig.master.cache.with(|s| s.queries.last().cloned().unwrap());
    assert_eq!(query.lease, 1);
    assert_eq!(query.image_digest, "");
    let path = std::env::var_os("PATH").unwrap();
    let expected = HashMap::from([
        ("PATH".to_owned(), sha256_of(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))),
        ("RBB_TEST_NEVER_SET_ANYWHERE".to_owned(), String::new()),
    ]);
    assert_eq!(query.pass_env, expected);

    // The next hit finds the blobs in the local store: nothing is fetched again.
    let fetched = rig.master.cache.with(|s| s.fetched.len());
    assert_eq!(fetched, 2);
    std::fs::write(out.join("result.txt"), "changed by a later step\n").unwrap();
    let (header, finished) = rig.run(cached(2, &marking("fresh"), &["out"])).await;
    assert!(finished.cached, "{finished:?}\n{header}");
    assert_eq!(rig.master.cache.with(|s| s.fetched.len()), 2, "no blob fetched twice");
    assert_eq!(std::fs::read(out.join("result.txt")).unwrap(), result, "the store kept its own copy");
    rig.stop().await;
}

#[tokio::test]
async fn a_miss_runs_the_step_and_uploads_its_outputs() {
    let mut rig = Rig::native().await;
    rig.master.cache.with(|s| {
        s.lookup = Some(Ok(miss()));
        // The master has this one already: it is not uploaded again.
        s.blobs.insert(sha256_of(b"bb"), b"bb".to_vec());
    });
    let command = format!(
        "touch {MARKER} && mkdir -p out/sub/empty && printf a > out/a.txt && printf a > out/a2.txt \
         && printf bb > out/b.txt && ln -s a.txt out/l && head -c 2500000 /dev/urandom > out/big.bin \
         && printf x > not-an-output.txt"
    );
    let (header, finished) = rig.run(cached(1, &command, &["out", "out/*.txt", "missing"])).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}\n{header}");
    assert!(!finished.cached);
    assert!(rig.checkout().join(MARKER).exists());
    assert!(header.contains(&format!("# cache miss {KEY}")), "{header}");
    let paths: Vec<&str> = finished.outputs.iter().map(|o| o.path.as_str()).collect();
    assert_eq!(paths, ["out/a.txt", "out/a2.txt", "out/b.txt", "out/big.bin", "out/l", "out/sub/empty"]);
    let big = std::fs::read(rig.checkout().join("out/big.bin")).unwrap();
    let (digest_a, digest_b, digest_big) = (sha256_of(b"a"), sha256_of(b"bb"), sha256_of(&big));
    assert_eq!(finished.outputs[0].digest, digest_a);
    assert_eq!(finished.outputs[4].link, "a.txt");
    assert!(finished.outputs[5].dir);

    let (asked, puts) = rig.master.cache.with(|s| (s.asked.clone(), s.puts.clone()));
    let mut expected_asked = vec![digest_a.clone(), digest_b.clone(), digest_big.clone()];
    expected_asked.sort();
    assert_eq!(asked, [expected_asked], "each digest asked once");
    let mut expected_puts = vec![(digest_a.clone(), 1), (digest_big.clone(), big.len() as u64)];
    expected_puts.sort();
    let mut puts = puts;
    puts.sort();
    assert_eq!(puts, expected_puts, "only what the master lacked, content checked by the fake");
    assert_eq!(rig.master.cache.with(|s| s.blobs[&digest_big].clone()), big);
    assert!(rig.local_blob(&digest_big).is_file(), "uploaded blobs are kept locally");
    assert!(!rig.local_blob(&digest_b).exists(), "blobs the master had are not copied");
    assert!(header.contains("# outputs stored in the cache under"), "{header}");

    // A failing step stores nothing and asks nothing.
    let (_, finished) = rig.run(cached(2, "mkdir -p out && echo x > out/f.txt && exit 3", &["out"])).await;
    assert_eq!(finished.result, StepResult::Failure as i32);
    assert!(finished.outputs.is_empty());
    assert_eq!(rig.master.cache.with(|s| s.asked.len()), 1);
    rig.stop().await;
}

#[tokio::test]
async fn an_unavailable_cache_never_stops_a_step() {
    let mut rig = Rig::native().await;
    rig.master.cache.with(|s| s.lookup = Some(Err(Code::Unavailable)));
    let (header, finished) = rig.run(cached(1, &marking("ran"), &["out"])).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}\n{header}");
    assert!(!finished.cached && finished.outputs.is_empty());
    assert!(rig.checkout().join(MARKER).exists());
    assert!(header.contains("# cache lookup failed, running the step: Lookup failed (Unavailable)"), "{header}");
    assert!(header.contains("# outputs not stored in the cache: the cache lookup did not answer"), "{header}");
    assert!(rig.master.cache.with(|s| s.asked.is_empty() && s.puts.is_empty()));

    // A master without the cache calls at all: the same.
    rig.master.cache.with(|s| s.lookup = None);
    std::fs::remove_file(rig.checkout().join(MARKER)).unwrap();
    let (header, finished) = rig.run(cached(2, &marking("ran"), &["out"])).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}\n{header}");
    assert!(rig.checkout().join(MARKER).exists());
    assert!(header.contains("Unimplemented"), "{header}");
    rig.stop().await;
}

#[tokio::test]
async fn a_blob_the_master_cannot_serve_turns_the_hit_into_a_run() {
    let mut rig = Rig::native().await;
    let lost = b"lost\n";
    let garbled = b"garbled\n";
    rig.master.cache.with(|s| {
        s.lookup = Some(Ok(hit(vec![file("out/result.txt", 0o644, lost)])));
        s.get_errors.insert(sha256_of(lost), Code::DataLoss);
    });
    let (header, finished) = rig.run(cached(1, &marking("fresh"), &["out"])).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}\n{header}");
    assert!(!finished.cached);
    assert!(rig.checkout().join(MARKER).exists(), "the step ran");
    assert!(header.contains(&format!("# cache hit {KEY} not restored, running the step: GetBlob failed (DataLoss)")));
    assert_eq!(std::fs::read(rig.checkout().join("out/result.txt")).unwrap(), b"fresh");
    // Its fresh outputs replace the entry.
    assert_eq!(finished.outputs.len(), 1);
    assert_eq!(rig.master.cache.with(|s| s.puts.clone()), [(sha256_of(b"fresh"), 5)]);

    // A blob whose bytes do not match its digest is refused the same way.
    std::fs::remove_file(rig.checkout().join(MARKER)).unwrap();
    rig.master.cache.with(|s| {
        s.lookup = Some(Ok(hit(vec![file("out/result.txt", 0o644, garbled)])));
        s.blobs.insert(sha256_of(garbled), b"GARBLED\n".to_vec());
    });
    let (header, finished) = rig.run(cached(2, &marking("again"), &["out"])).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}\n{header}");
    assert!(!finished.cached);
    assert!(rig.checkout().join(MARKER).exists(), "the step ran");
    assert!(header.contains("is corrupt (as the master sent it)"), "{header}");
    assert!(!rig.local_blob(&sha256_of(garbled)).exists(), "a bad blob is not kept");

    // An entry naming a file outside the step's outputs is never restored.
    std::fs::remove_file(rig.checkout().join(MARKER)).unwrap();
    rig.master.cache.with(|s| {
        s.lookup = Some(Ok(hit(vec![file("src/evil.c", 0o644, b"bb")])));
        s.blobs.insert(sha256_of(b"bb"), b"bb".to_vec());
    });
    let (header, finished) = rig.run(cached(3, &marking("third"), &["out"])).await;
    assert!(!finished.cached && rig.checkout().join(MARKER).exists(), "{header}");
    assert!(!rig.checkout().join("src/evil.c").exists());
    rig.stop().await;
}

#[tokio::test]
async fn a_corrupt_local_blob_is_fetched_again() {
    let mut rig = Rig::native().await;
    let content = b"content\n";
    let digest = sha256_of(content);
    rig.master.cache.with(|s| {
        s.lookup = Some(Ok(hit(vec![file("out/f.txt", 0o644, content)])));
        s.blobs.insert(digest.clone(), content.to_vec());
    });
    let local = rig.local_blob(&digest);
    std::fs::create_dir_all(local.parent().unwrap()).unwrap();
    std::fs::write(&local, b"CONTENT\n").unwrap();
    let (header, finished) = rig.run(cached(1, &marking("x"), &["out"])).await;
    assert!(finished.cached, "{finished:?}\n{header}");
    assert!(header.contains("was corrupt in the worker's store; fetching it again"), "{header}");
    assert_eq!(std::fs::read(rig.checkout().join("out/f.txt")).unwrap(), content);
    assert_eq!(std::fs::read(&local).unwrap(), content);
    assert!(!rig.checkout().join(MARKER).exists());
    rig.stop().await;
}

#[tokio::test]
async fn outputs_with_an_escaping_symlink_are_not_stored() {
    let mut rig = Rig::native().await;
    rig.master.cache.with(|s| s.lookup = Some(Ok(miss())));
    let (header, finished) =
        rig.run(cached(1, "mkdir -p out && echo x > out/x && ln -s /etc/passwd out/pw", &["out"])).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}\n{header}");
    assert!(finished.outputs.is_empty());
    assert!(header.contains("# outputs not stored in the cache: out/pw is a symlink to \"/etc/passwd\""), "{header}");
    assert!(rig.master.cache.with(|s| s.asked.is_empty() && s.puts.is_empty()));
    rig.stop().await;
}

#[tokio::test]
async fn a_cancel_during_a_restore_reports_cancelled() {
    let mut rig = Rig::native().await;
    let content = b"never comes\n";
    rig.master.cache.with(|s| {
        s.lookup = Some(Ok(hit(vec![file("out/f.txt", 0o644, content)])));
        s.get_hangs.insert(sha256_of(content));
    });
    rig.session.send(MasterMsg::Lease(cached(5, &marking("x"), &["out"]))).await;
    let cache = Arc::clone(&rig.master.cache);
    wait_until("the worker fetches the blob", Duration::from_secs(10), || cache.with(|s| !s.fetched.is_empty())).await;
    let start = Instant::now();
    rig.session.send(MasterMsg::Cancel(Cancel { lease: 5, reason: "user asked".to_owned() })).await;
    let (_, finished) = rig.session.until_finished(5).await;
    assert_eq!(finished.result, StepResult::Cancelled as i32, "{finished:?}");
    assert!(!finished.cached);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(!rig.checkout().join(MARKER).exists());
    assert!(!rig.checkout().join("out/f.txt").exists());

    // The slot is free again.
    rig.master.cache.with(|s| s.lookup = Some(Ok(miss())));
    let (_, finished) = rig.run(cached(6, &marking("x"), &["out"])).await;
    assert_eq!(finished.result, StepResult::Success as i32);
    rig.stop().await;
}

#[tokio::test]
async fn a_cancel_during_an_upload_reports_cancelled() {
    let mut rig = Rig::native().await;
    rig.master.cache.with(|s| {
        s.lookup = Some(Ok(miss()));
        s.missing_hangs = true;
    });
    rig.session.send(MasterMsg::Lease(cached(5, &marking("x"), &["out"]))).await;
    let cache = Arc::clone(&rig.master.cache);
    wait_until("the worker asks which blobs are missing", Duration::from_secs(10), || {
        cache.with(|s| !s.asked.is_empty())
    })
    .await;
    let start = Instant::now();
    rig.session.send(MasterMsg::Cancel(Cancel { lease: 5, reason: "user asked".to_owned() })).await;
    let (_, finished) = rig.session.until_finished(5).await;
    assert_eq!(finished.result, StepResult::Cancelled as i32, "{finished:?}");
    assert!(finished.outputs.is_empty());
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(rig.master.cache.with(|s| s.puts.is_empty()));
    rig.stop().await;
}

#[tokio::test]
async fn pass_env_and_the_image_digest_reach_the_step_and_the_key() {
    let digest = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    let fake = Arc::new(
        FakeExecutor::default()
            .with_image("alpine:3", digest)
            .with_image("nameless:1", "")
            .expect("build", StepResult::Success, "")
            .expect("build", StepResult::Success, "")
            .expect("build", StepResult::Success, ""),
    );
    let executor = Arc::clone(&fake);
    let mut rig = Rig::with(move |url, work| TestWorker::start(url, work, 1, executor)).await;
    rig.master.cache.with(|s| s.lookup = Some(Ok(miss())));

    let mut step = cached(1, "build", &["out"]);
    step.image = "alpine:3".to_owned();
    step.pass_env = vec!["PATH".to_owned(), "HOME".to_owned(), "RBB_TEST_NEVER_SET_ANYWHERE".to_owned()];
    step.env.insert("HOME".to_owned(), "/the/step/s/own".to_owned());
    let (header, finished) = rig.run(step).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}\n{header}");
    assert_eq!(finished.image_digest, digest);
    assert!(header.contains("# outputs stored in the cache"), "{header}");
    let query = rig.master.cache.with(|s| s.queries[0].clone());
    assert_eq!(query.image_digest, digest);
    assert_eq!(query.pass_env["RBB_TEST_NEVER_SET_ANYWHERE"], "");
    let spec = fake.specs()[0].clone();
    assert_eq!(spec.env.get("PATH"), std::env::var("PATH").ok().as_ref(), "passed from the worker");
    assert_eq!(spec.env["HOME"], "/the/step/s/own", "the step's own env wins");
    assert!(!spec.env.contains_key("RBB_TEST_NEVER_SET_ANYWHERE"), "unset stays unset");

    // An image the engine does not have: no Lookup, the step runs (and fails as it would).
    let mut step = cached(2, "build", &["out"]);
    step.image = "nowhere:1".to_owned();
    let (header, finished) = rig.run(step).await;
    assert_eq!(finished.result, StepResult::Success as i32, "the fake answers what it was told");
    assert!(header.contains("# cache not used: image `nowhere:1` is unknown"), "{header}");
    assert_eq!(rig.master.cache.with(|s| s.queries.len()), 1);

    // An image the engine gives no digest for: no Lookup either.
    let mut step = cached(3, "build", &["out"]);
    step.image = "nameless:1".to_owned();
    let (header, _) = rig.run(step).await;
    assert!(header.contains("# cache not used: the engine gives no digest for image `nameless:1`"), "{header}");
    assert_eq!(rig.master.cache.with(|s| s.queries.len()), 1);
    fake.assert_done();
    rig.stop().await;
}

#[tokio::test]
async fn steps_without_cache_make_no_cache_call() {
    let mut rig = Rig::native().await;
    rig.master.cache.with(|s| s.lookup = Some(Ok(miss())));
    let (header, finished) = rig.run(lease(1, "mkdir -p out && echo x > out/x")).await;
    assert_eq!(finished.result, StepResult::Success as i32);
    assert!(!header.contains("cache"), "{header}");
    assert!(rig.master.cache.with(|s| s.queries.is_empty() && s.asked.is_empty()));
    rig.stop().await;
}

#[tokio::test]
async fn a_hit_on_the_last_step_in_a_build_container_removes_the_container() {
    let digest = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
    let fake = Arc::new(FakeExecutor::default().with_image("alpine:3", digest));
    let executor = Arc::clone(&fake);
    let mut rig = Rig::with(move |url, work| TestWorker::start(url, work, 1, executor)).await;
    rig.master.cache.with(|s| s.lookup = Some(Ok(hit(Vec::new()))));
    for (id, last) in [(1, false), (2, true)] {
        let mut step = cached(id, "build", &["out"]);
        step.image = "alpine:3".to_owned();
        step.build_container = true;
        step.last_in_container = last;
        let (header, finished) = rig.run(step).await;
        assert!(finished.cached, "{finished:?}\n{header}");
        assert_eq!(finished.image_digest, digest);
    }
    assert!(fake.calls().is_empty(), "nothing ran");
    assert_eq!(*fake.ended_containers.lock().unwrap(), [7], "only after the build's last step in it");
    rig.stop().await;
}
